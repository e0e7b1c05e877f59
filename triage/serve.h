/* `ichtriage serve`: the node. */
#ifndef TRIAGE_SERVE_H
#define TRIAGE_SERVE_H

int triage_serve_main(int argc, char **argv);

#endif
