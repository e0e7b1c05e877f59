/* db/: what the module's files share and nobody else sees. */
#ifndef DB_INTERNAL_H
#define DB_INTERNAL_H

#include "db.h"

#include <sqlite3.h>

int db_migrate(sqlite3 *conn, char *err, size_t errlen);

#endif
