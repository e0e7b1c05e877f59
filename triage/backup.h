/* `ichtriage backup DIR` and `ichtriage restore DIR`: a consistent copy of
 * the index (SQLite's online backup API, the node may keep running) plus
 * the spool files it refers to, and putting such a copy back into an empty
 * store.dir. docs/operations.md has the procedure. */
#ifndef TRIAGE_BACKUP_H
#define TRIAGE_BACKUP_H

/* Exit status: 0 done, 1 failed (nothing claimed complete), 2 usage. */
int triage_backup_main(int argc, char **argv);
int triage_restore_main(int argc, char **argv);

#endif
