/* `ichtriage worklist [--json]`. */
#ifndef TRIAGE_WORKLIST_H
#define TRIAGE_WORKLIST_H

int triage_worklist_main(int argc, char **argv);

#endif
