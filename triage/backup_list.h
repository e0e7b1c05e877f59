/* The file list of a backup's MANIFEST: the path (relative to the backup),
 * size and SHA-256 of every file outside the spool (ichtriage.db, models/,
 * outbox/), which restore checks before it writes anything. The spool's
 * files are checked against the index's own per-instance digests instead.
 * One MANIFEST line a file:
 *   file = <sha256, 64 hex digits> <size in bytes> <path>
 * (the path last, so it may hold spaces; a name with a line break cannot
 * be listed). */
#ifndef TRIAGE_BACKUP_LIST_H
#define TRIAGE_BACKUP_LIST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct backup_listed {
    char *path;
    int64_t size;
    char sha256[65];
    bool seen; /* restore: found in the backup with this size and digest */
};

/* Owned by the caller: zero it to start, backup_list_free at the end. */
struct backup_list {
    struct backup_listed *v;
    int n, cap;
    bool sorted;
};

/* Reads the file at full and lists it as rel. Returns 0, or -1 with a
 * message in err. */
int backup_list_add(struct backup_list *l, const char *rel, const char *full, char *err,
                    size_t errlen);

/* Writes the "file = ..." lines, in the order the files were added. */
void backup_list_write(const struct backup_list *l, FILE *f);

/* Adds the file a MANIFEST line's value ("<sha256> <size> <path>") names.
 * Returns 0, or -1 with a message in err (a malformed line, a path that
 * is not one of a backup's). */
int backup_list_parse(struct backup_list *l, const char *value, char *err, size_t errlen);

/* Restore's check of the file at full, found in the backup as rel: it is
 * listed, with its size and digest; marks it seen. Returns 0, or -1 with
 * a message in err. */
int backup_list_check(struct backup_list *l, const char *rel, const char *full, char *err,
                      size_t errlen);

/* The first listed file whose path starts with prefix and that
 * backup_list_check has not seen, or NULL. */
const struct backup_listed *backup_list_unseen(const struct backup_list *l, const char *prefix);

void backup_list_free(struct backup_list *l);

#endif
