/* `ichtriage status`: the node's health at a glance, read from its store
 * (database, spool, disk) without talking to the running node. */
#ifndef TRIAGE_STATUS_H
#define TRIAGE_STATUS_H

/* Exit status: 0 healthy, 1 a problem (listed), 2 usage or configuration. */
int triage_status_main(int argc, char **argv);

#endif
