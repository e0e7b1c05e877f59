/* train/: offline retraining, data sets and phantoms (issues 4 and 5). */
#include "train.h"
