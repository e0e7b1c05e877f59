/* train/: offline retraining, data sets and phantoms. Each subcommand that
 * lives here has an entry point of the form  int train_X_main(int argc, char **argv). */
#ifndef TRAIN_H
#define TRAIN_H
#endif
