/* db/: the statements that record one instance (used by the group commit). */
#ifndef DB_PUT_H
#define DB_PUT_H

#include "db_internal.h"

struct db_put_stmts {
    sqlite3_stmt *patient, *study, *series, *old, *instance, *recount, *refresh;
};

int db_put_prepare(struct db_put_stmts *s, sqlite3 *conn, char *err, size_t errlen);
void db_put_finalize(struct db_put_stmts *s);
/* Inside an open transaction: upserts patient, study, series and instance.
 * Returns 0; 1 when the instance is refused (its series is in another study,
 * or its SOP instance in another series), with the reason in err; -1 on a
 * database error. After 1 or -1 the caller rolls back. */
int db_put_one(struct db_put_stmts *s, const struct db_instance *in, char *old_path,
               size_t old_path_len, char *err, size_t errlen);

#endif
