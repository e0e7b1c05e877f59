/* `ichtriage pacs`: the results-to-PACS queue for an admin (list what waits
 * and what was given up; retry what was given up). */
#ifndef TRIAGE_PACS_CMD_H
#define TRIAGE_PACS_CMD_H

/* Exit status: 0 done, 1 nothing to retry for a study named or a database
 * error, 2 usage or configuration. */
int triage_pacs_main(int argc, char **argv);

#endif
