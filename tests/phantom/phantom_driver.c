/* Runs `ichtriage phantom` without the rest of the node, so the phantom
 * tests do not depend on every module of the command being built. */
#include "phantom.h"

int main(int argc, char **argv)
{
    return train_phantom_main(argc, argv);
}
