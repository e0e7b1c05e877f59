/* triage/backup.c: `ichtriage backup DIR` and `ichtriage restore DIR`.
 *
 * A backup folder holds
 *   ichtriage.db   a snapshot of the index (SQLite online backup API),
 *   spool/...      every file that snapshot indexes, same relative paths,
 *   models/...     the model registry (registered models, the active one),
 *   outbox/...     the results built for PACS and not yet delivered,
 *   MANIFEST       written last: a folder without it is not a backup; it
 *                  lists every file outside the spool with its size and
 *                  SHA-256 (backup_list.h), the spool's being in the index.
 * Backup takes the snapshot first and copies the files the snapshot lists,
 * so the copy never holds a row without its file. An instance the node
 * stored again with the same bytes in between (under a new name, the old
 * one removed) is copied from its new name and its row moved there. A
 * file the node removes otherwise (retention purging its study, a resend
 * with other bytes replacing it) is left out, with its row, once the live
 * index confirms it has no row for it either; a study left with no
 * instance is marked purged in the copy.
 * outbox/ is copied after the snapshot too; a delivery whose file the node
 * removed meanwhile (it does so once every destination acknowledged it or
 * an admin dismissed what was given up) is marked sent or dismissed in the
 * copy once the live index says so; one whose file is gone undelivered
 * stays as it was, logged. Instances received
 * after the snapshot are not in the backup.
 *
 * Restore refuses a store.dir that holds anything; it checks the backup
 * (MANIFEST's list, database quick_check, every spool file present with
 * its size and digest) before it
 * writes, copies the files, and puts the database in place last, so an
 * interrupted restore leaves no index and is simply run again. Run as root
 * into an existing store.dir, what it writes takes that folder's owner. */
#include "backup.h"
#include "backup_list.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "db.h"
#include "db_backup.h"
#include "db_status.h"
#include "io.h"
#include "log.h"
#include "scp_info.h"
#include "store.h"

/* Format 2 adds the file list (backup_list.h); restore still takes 1. */
#define BACKUP_FORMAT "ichtriage-backup 2"
#define BACKUP_FORMAT_1 "ichtriage-backup 1"

/* Where copies go and who owns them; also the running totals. */
struct copier {
    const char *from, *to; /* folders the relative file paths hang off */
    uid_t uid;             /* chown target when chown is set */
    gid_t gid;
    bool chown;
    bool check_only; /* restore's first pass: only look at the sources */
    int64_t files, bytes;
    int64_t model_files, outbox_files; /* files copied by copy_tree */
    /* backup: copy_tree lists what it copies here; restore's first pass
     * (check_only): what copy_tree finds must be listed here. */
    struct backup_list *list;
    const char *live_db;    /* backup: the node's index, asked about a file gone meanwhile */
    struct db_live *live;   /* live_db, opened on the first question */
    bool leave_out_missing; /* backup: a file the index lists but the store lost is left out */
    bool leave_out_damaged; /* backup: so is one the index lists that holds other bytes */
    struct db_backup_change *changes; /* backup: rows of the snapshot to move or remove */
    int nchanges, capchanges, ngone;
    int nlost;           /* of ngone: files the store lost, left out by leave_out_missing */
    int ndamaged;        /* of ngone: files damaged in place, left out by leave_out_damaged */
    char last_dir[4096]; /* the destination folder synced last */
    char *err;
    size_t errlen;
};

static int fsync_path(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

/* A relative spool path from a database: "spool/...", no "..", no "//". */
static bool safe_rel_path(const char *p)
{
    if (strncmp(p, "spool/", 6) != 0 || strlen(p) > 1024) return false;
    for (const char *s = p; *s; s++) {
        if (s[0] == '/' && s[1] == '/') return false;
        if ((s == p || s[-1] == '/') && s[0] == '.' &&
            (s[1] == '/' || s[1] == 0 || (s[1] == '.' && (s[2] == '/' || s[2] == 0))))
            return false;
    }
    return true;
}

/* mkdir -p of path's parent folders below root, mode 0700, chowned. */
static int make_parents(struct copier *c, const char *path)
{
    char buf[4096];
    if ((size_t)snprintf(buf, sizeof buf, "%s", path) >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    size_t root_len = strlen(c->to);
    for (char *s = buf + root_len + 1; (s = strchr(s, '/')); s++) {
        *s = 0;
        if (mkdir(buf, 0700) == 0) {
            if (c->chown && chown(buf, c->uid, c->gid) != 0) return -1;
            /* The new folder's name is durable once its parent is synced. */
            char *up = strrchr(buf, '/');
            *up = 0;
            int synced = fsync_path(buf);
            *up = '/';
            if (synced != 0) return -1;
        } else if (errno != EEXIST) {
            return -1;
        }
        *s = '/';
    }
    return 0;
}

static int sync_dir_of(struct copier *c, const char *path)
{
    char dir[4096];
    if ((size_t)snprintf(dir, sizeof dir, "%s", path) >= sizeof dir) {
        errno = ENAMETOOLONG;
        return -1;
    }
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    if (strcmp(dir, c->last_dir) == 0) return 0;
    if (c->last_dir[0] && fsync_path(c->last_dir) != 0) return -1;
    snprintf(c->last_dir, sizeof c->last_dir, "%s", dir);
    return 0;
}

/* Copies src to a new file dst (never replacing one), synced, mode 0600. */
static int copy_file(struct copier *c, const char *src, const char *dst, int64_t size)
{
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) return -1;
    int out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (out < 0) {
        close(in);
        return -1;
    }
    int64_t done = 0;
    int rc = 0;
    bool by_hand = false; /* copy_file_range cannot: another file system */
    for (;;) {
        ssize_t n = by_hand ? -1 : copy_file_range(in, NULL, out, NULL, 1 << 30, 0);
        if (by_hand || (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP))) {
            char buf[1 << 16];
            by_hand = true;
            n = read(in, buf, sizeof buf);
            if (n > 0 && util_write_all(out, buf, (size_t)n) != 0) n = -1;
        }
        if (n < 0) {
            rc = -1;
            break;
        }
        if (n == 0) break;
        done += n;
    }
    if (rc == 0 && done != size) {
        errno = EIO;
        snprintf(c->err, c->errlen, "%.1000s has %lld bytes, the index says %lld", src,
                 (long long)done, (long long)size);
        rc = -2;
    }
    if (rc == 0 && c->chown && fchown(out, c->uid, c->gid) != 0) rc = -1;
    if (rc == 0 && fsync(out) != 0) rc = -1;
    close(in);
    if (close(out) != 0 && rc == 0) rc = -1;
    if (rc != 0) unlink(dst);
    return rc;
}

/* Whether the dataset of the file at path has the digest want ("": not
 * known, taken as matching). On a read error, false with the reason in
 * c->err. */
static bool digest_matches(struct copier *c, const char *path, const char *want)
{
    char got[65];
    if (!want[0]) return true;
    if (scp_dataset_digest(path, got, c->err, c->errlen) != 0) return false;
    c->err[0] = 0;
    return strcmp(got, want) == 0;
}

/* Adds a change to the copy's rows (new_path NULL: the row goes). */
static int add_change(struct copier *c, const char *rel, const char *new_path, int64_t new_size)
{
    if (c->nchanges == c->capchanges) {
        int cap = c->capchanges ? c->capchanges * 2 : 64;
        struct db_backup_change *grown = realloc(c->changes, sizeof *grown * (size_t)cap);
        if (!grown) {
            snprintf(c->err, c->errlen, "out of memory");
            return -1;
        }
        c->changes = grown;
        c->capchanges = cap;
    }
    struct db_backup_change *ch = &c->changes[c->nchanges];
    *ch = (struct db_backup_change){.file_path = strdup(rel),
                                    .new_path = new_path ? strdup(new_path) : NULL,
                                    .new_size = new_size};
    if (!ch->file_path || (new_path && !ch->new_path)) {
        free(ch->file_path);
        free(ch->new_path);
        snprintf(c->err, c->errlen, "out of memory");
        return -1;
    }
    c->nchanges++;
    if (!new_path) c->ngone++;
    return 0;
}

/* The snapshot's file of f is gone or holds other bytes. When the live
 * index has the same instance with the same bytes under another name (a
 * resend of the same dataset moves it to <sop>~1.dcm and removes the old
 * name; a meta header written anew can change its size), that file is
 * copied and the copy's row moved to it: 1. 0 when there is no such file
 * to copy, -1 on an error. A few tries: a resend may move it again while
 * it is copied. */
static int copy_moved(struct copier *c, const struct db_backup_file *f)
{
    if (!c->live && db_live_open(&c->live, c->live_db, c->err, c->errlen) != 0) return -1;
    for (int attempt = 0; f->digest[0] && attempt < 3; attempt++) {
        char path[1100], digest[65], src[4200], dst[4200];
        int64_t size = 0;
        bool found;
        if (db_live_instance(c->live, f->sop_uid, &found, path, sizeof path, &size, digest, c->err,
                             c->errlen) != 0)
            return -1;
        if (!found || strcmp(digest, f->digest) != 0) return 0;
        if (!strcmp(path, f->file_path) && size == f->file_size) return 0; /* the same file */
        if (!safe_rel_path(path)) {
            snprintf(c->err, c->errlen, "the index holds an unexpected file path '%.1000s'", path);
            return -1;
        }
        snprintf(src, sizeof src, "%s/%s", c->from, path);
        snprintf(dst, sizeof dst, "%s/%s", c->to, path);
        int rc = 0;
        if (make_parents(c, dst) != 0 || sync_dir_of(c, dst) != 0 ||
            (rc = copy_file(c, src, dst, size)) == -1) {
            if (errno == ENOENT && access(src, F_OK) != 0) continue; /* moved again */
            snprintf(c->err, c->errlen, "cannot copy %.1000s to %.1000s: %.1000s", src, dst,
                     strerror(errno));
            return -1;
        }
        if (rc == -2 || !digest_matches(c, dst, f->digest)) {
            unlink(dst); /* replaced again meanwhile */
            c->err[0] = 0;
            continue;
        }
        if (add_change(c, f->file_path, path, size) != 0) return -1;
        c->files++;
        c->bytes += size;
        return 1;
    }
    return 0;
}

/* The snapshot's file of f (at src) is gone, or holds other bytes than
 * its row says. Copied from its new name when the instance is stored
 * again with the same bytes (copy_moved). Else, when the live index no
 * longer has it with those bytes either (retention purged its study, or a
 * resend replaced it, and a later one may have taken its name again), it
 * is left out of the copy: its row is removed there after the walk.
 * missing: the file is gone (else it holds other bytes). A missing file
 * the live index still lists (the store lost it) fails the backup, or
 * with leave_out_missing is left out too, logged; so does one it still
 * lists with the digest the file no longer has (damaged in place), with
 * leave_out_damaged. */
static int forget(struct copier *c, const struct db_backup_file *f, const char *src, bool missing)
{
    int moved = copy_moved(c, f);
    if (moved != 0) return moved < 0 ? -1 : 0;
    bool indexed = true;
    if (db_live_file_indexed(c->live, f->file_path, missing ? "" : f->digest, &indexed, c->err,
                             c->errlen) != 0)
        return -1;
    if (indexed && (missing ? c->leave_out_missing : c->leave_out_damaged)) {
        util_log(UTIL_LOG_WARN, "backup_instance_left_out", "sop=%s path=%s reason=\"%s\"",
                 f->sop_uid, f->file_path,
                 missing ? "the index lists it, its file is missing from the store"
                         : "its file no longer holds the bytes its index row names (damaged)");
        if (missing)
            c->nlost++;
        else
            c->ndamaged++;
    } else if (indexed) {
        snprintf(c->err, c->errlen,
                 "%.1000s %s although the index lists it: %s, and every backup fails on it; "
                 "'ichtriage backup %s DIR' leaves such instances out of the backup, each "
                 "logged (docs/operations.md, \"Backup and restore\")",
                 src, missing ? "is missing" : "holds other bytes than its row names",
                 missing ? "the store has lost this file" : "the file is damaged",
                 missing ? "--leave-out-missing" : "--leave-out-damaged");
        return -1;
    }
    return add_change(c, f->file_path, NULL, 0);
}

/* db_backup_files callback: copies (or, check_only, checks) one file, and
 * checks its bytes against the row's digest (a copy that is not the
 * snapshot's instance is never kept). */
static int copy_one(void *ud, const struct db_backup_file *f)
{
    struct copier *c = ud;
    const char *rel = f->file_path;
    if (!safe_rel_path(rel)) {
        snprintf(c->err, c->errlen, "the index holds an unexpected file path '%.1000s'", rel);
        return -1;
    }
    char src[4200], dst[4200];
    snprintf(src, sizeof src, "%s/%s", c->from, rel);
    snprintf(dst, sizeof dst, "%s/%s", c->to, rel);
    if (c->check_only) {
        struct stat st;
        if (stat(src, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size != f->file_size) {
            snprintf(c->err, c->errlen, "%.1000s is missing or not %lld bytes", src,
                     (long long)f->file_size);
            return -1;
        }
        if (!digest_matches(c, src, f->digest)) {
            if (!c->err[0])
                snprintf(c->err, c->errlen,
                         "%.1000s does not hold the bytes its index row names (damaged)", src);
            return -1;
        }
    } else {
        int rc = 0;
        if (make_parents(c, dst) != 0 || sync_dir_of(c, dst) != 0 ||
            (rc = copy_file(c, src, dst, f->file_size)) == -1) {
            if (errno == ENOENT && access(src, F_OK) != 0 && c->live_db)
                return forget(c, f, src, true);
            snprintf(c->err, c->errlen, "cannot copy %.1000s to %.1000s: %.1000s", src, dst,
                     strerror(errno));
            return -1;
        }
        /* Other bytes than the snapshot's (another size, or the same size
         * and another digest): a resend took the name meanwhile. */
        if (rc == -2 || !digest_matches(c, dst, f->digest)) {
            unlink(dst);
            if (c->live_db) {
                c->err[0] = 0;
                return forget(c, f, src, false);
            }
            if (!c->err[0])
                snprintf(c->err, c->errlen, "%.1000s does not hold the bytes its index row names",
                         src);
            return -1;
        }
    }
    c->files++;
    c->bytes += f->file_size;
    return 0;
}

/* Copies the folder rel (relative to from: "models", the registry, or
 * "outbox", the results for PACS) and
 * what it holds, regular files only, leaving out the ".tmp" files of a
 * registration or a build in progress. Both replace files by rename, never
 * write one in place, so each copy is a whole file. Absent: nothing. With
 * check_only, checks each file against c->list instead. */
static int copy_tree(struct copier *c, const char *rel, int64_t *count)
{
    char src[4200], dst[4200];
    snprintf(src, sizeof src, "%s/%s", c->from, rel);
    snprintf(dst, sizeof dst, "%s/%s/", c->to, rel);
    DIR *d = opendir(src);
    if (!d) {
        if (errno == ENOENT) return 0;
        snprintf(c->err, c->errlen, "cannot read %.1000s: %.1000s", src, strerror(errno));
        return -1;
    }
    int rc = c->check_only ? 0 : make_parents(c, dst);
    if (rc != 0)
        snprintf(c->err, c->errlen, "cannot create %.1000s: %.1000s", dst, strerror(errno));
    for (struct dirent *e; rc == 0 && (e = readdir(d));) {
        size_t len = strlen(e->d_name);
        /* Dot files are locks (models/.lock), not data. */
        if (e->d_name[0] == '.' || (len > 4 && !strcmp(e->d_name + len - 4, ".tmp"))) continue;
        char sub[2100], from[4200], to[4200];
        struct stat st;
        if ((size_t)snprintf(sub, sizeof sub, "%s/%s", rel, e->d_name) >= sizeof sub) continue;
        snprintf(from, sizeof from, "%s/%s", c->from, sub);
        snprintf(to, sizeof to, "%s/%s", c->to, sub);
        if (lstat(from, &st) != 0) continue; /* replaced meanwhile: its new name is listed */
        if (S_ISDIR(st.st_mode)) {
            rc = copy_tree(c, sub, count);
        } else if (S_ISREG(st.st_mode) && c->check_only) {
            rc = backup_list_check(c->list, sub, from, c->err, c->errlen);
        } else if (S_ISREG(st.st_mode)) {
            rc = sync_dir_of(c, to) == 0 ? copy_file(c, from, to, st.st_size) : -1;
            if (rc == -1)
                snprintf(c->err, c->errlen, "cannot copy %.1000s to %.1000s: %.1000s", from, to,
                         strerror(errno));
            if (rc == 0 && c->list) rc = backup_list_add(c->list, sub, to, c->err, c->errlen);
            if (rc == 0) {
                (*count)++;
                c->bytes += st.st_size;
            }
        }
    }
    closedir(d);
    return rc == 0 ? 0 : -1;
}

static int finish_dirs(struct copier *c)
{
    return c->last_dir[0] ? fsync_path(c->last_dir) : 0;
}

/* True when dir does not exist or holds nothing but, at most, empty
 * spool/ and spool/.tmp/ folders and the store's lock file (what a node
 * leaves before any data). */
static bool dir_is_empty(const char *dir, int depth)
{
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT;
    bool empty = true;
    for (struct dirent *e; empty && (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (depth == 0 && !strcmp(e->d_name, "ichtriage.lock")) continue;
        const char *allowed = depth == 0 ? "spool" : depth == 1 ? ".tmp" : NULL;
        char sub[4200];
        snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name);
        empty = allowed && !strcmp(e->d_name, allowed) && dir_is_empty(sub, depth + 1);
    }
    closedir(d);
    return empty;
}

static int write_manifest(const char *dir, const struct db_status *st, const struct copier *c,
                          const char *store_dir, char *err, size_t errlen)
{
    char path[4200], part[4300], when[32];
    snprintf(path, sizeof path, "%s/MANIFEST", dir);
    snprintf(part, sizeof part, "%s.part", path);
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
    FILE *f = fopen(part, "wx");
    if (!f) {
        snprintf(err, errlen, "cannot write %.1000s: %.1000s", part, strerror(errno));
        return -1;
    }
    fprintf(f,
            "format = " BACKUP_FORMAT "\n"
            "created_at = %s\n"
            "ichtriage_version = %s\n"
            "schema_version = %d\n"
            "store_dir = %s\n"
            "instances = %lld\n"
            "files = %lld\n"
            "model_files = %lld\n"
            "outbox_files = %lld\n"
            "bytes = %lld\n"
            "listed_files = %d\n",
            when, ICHTRIAGE_VERSION, st->schema_version, store_dir, (long long)st->instances,
            (long long)c->files, (long long)c->model_files, (long long)c->outbox_files,
            (long long)c->bytes, c->list->n);
    backup_list_write(c->list, f);
    int bad = fflush(f) != 0 || fsync(fileno(f)) != 0;
    if (fclose(f) != 0) bad = 1;
    if (bad || rename(part, path) != 0 || fsync_path(dir) != 0) {
        snprintf(err, errlen, "cannot write %.1000s: %.1000s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* Parses the common options, option (when not NULL: a flag that sets
 * *option_set) and exactly one DIR argument. */
/* options: NULL-terminated, each setting *option_set[i]. */
static int parse_args(const char *cmd, const char *help, struct triage_config *cfg, int argc,
                      char **argv, const char **dir, const char *const *options,
                      bool *const *option_set)
{
    char err[1024];
    if (triage_config_from_args(cfg, &argc, argv, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage %s: %s\n", cmd, err);
        return 2;
    }
    *dir = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            printf("%s", help);
            triage_config_free(cfg);
            return 1;
        }
        int o = 0;
        while (options && options[o] && strcmp(argv[i], options[o]))
            o++;
        if (options && options[o]) {
            *option_set[o] = true;
            continue;
        }
        if (*dir || argv[i][0] == '-' || !argv[i][0]) {
            fprintf(stderr, "ichtriage %s: unexpected argument '%s'\n%s", cmd, argv[i], help);
            triage_config_free(cfg);
            return 2;
        }
        *dir = argv[i];
    }
    if (!*dir) {
        fprintf(stderr, "%s", help);
        triage_config_free(cfg);
        return 2;
    }
    return 0;
}

static const char backup_help[] =
    "usage: ichtriage backup [-c FILE] [--set section.key=value]... [--leave-out-missing]\n"
    "                        [--leave-out-damaged] DIR\n"
    "\n"
    "Copies the index (a consistent snapshot, taken while the node runs), every\n"
    "spool file it refers to, the model registry (models/) and the results waiting\n"
    "for PACS (outbox/) into DIR, which must not exist or be empty. DIR/MANIFEST is\n"
    "written last. The copy holds patient data: DIR is made readable by its owner\n"
    "only. 'ichtriage restore DIR' puts it back.\n"
    "\n"
    "  --leave-out-missing  an instance the index lists but whose spool file the\n"
    "                       store has lost is left out of the backup (logged,\n"
    "                       event=backup_instance_left_out) instead of failing it\n"
    "  --leave-out-damaged  so is one whose spool file no longer holds the bytes its\n"
    "                       index row names (damaged in place)\n";

static const char restore_help[] =
    "usage: ichtriage restore [-c FILE] [--set section.key=value]... DIR\n"
    "\n"
    "Puts a backup made by 'ichtriage backup' back into store.dir, which must not\n"
    "exist or be empty: stop the node and move the old store aside first. The\n"
    "backup is checked before anything is written (every file against MANIFEST or\n"
    "the index: present, its size, its SHA-256); the index is put in place last.\n"
    "Run as root into an existing store.dir, the files take that folder's owner.\n";

int triage_backup_main(int argc, char **argv)
{
    struct triage_config cfg;
    const char *dir;
    bool leave_out_missing = false, leave_out_damaged = false;
    const char *const options[] = {"--leave-out-missing", "--leave-out-damaged", NULL};
    bool *const set[] = {&leave_out_missing, &leave_out_damaged};
    int rc = parse_args("backup", backup_help, &cfg, argc, argv, &dir, options, set);
    if (rc) return rc == 1 ? 0 : rc;
    umask(077);
    const char *store = triage_config_str(&cfg, CFG_STORE_DIR);
    char err[2048] = "", db_path[1200], dst_db[4200];
    snprintf(db_path, sizeof db_path, "%s/ichtriage.db", store);
    snprintf(dst_db, sizeof dst_db, "%s/ichtriage.db", dir);
    struct backup_list list = {0};
    struct copier c = {
        .from = store, .to = dir, .live_db = db_path, .err = err, .errlen = sizeof err};
    c.list = &list;
    c.leave_out_missing = leave_out_missing;
    c.leave_out_damaged = leave_out_damaged;
    struct db_status st;
    rc = 1;
    bool started = false; /* dir is ours to call incomplete */
    if (access(db_path, R_OK) != 0) {
        snprintf(err, sizeof err, "no database at %.1000s: %.1000s", db_path, strerror(errno));
        goto out;
    }
    if (!dir_is_empty(dir, 2)) {
        snprintf(err, sizeof err, "%.1000s exists and is not empty", dir);
        goto out;
    }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, sizeof err, "cannot create %.1000s: %.1000s", dir, strerror(errno));
        goto out;
    }
    started = true;
    if (chmod(dir, 0700) != 0) {
        snprintf(err, sizeof err, "cannot set the mode of %.1000s: %.1000s", dir, strerror(errno));
        goto out;
    }
    util_log(UTIL_LOG_INFO, "backup_start", "store=%s backup=%s", store, dir);
    if (db_backup_copy(db_path, dst_db, err, sizeof err) != 0) goto out;
    if (db_backup_files(dst_db, copy_one, &c, err, sizeof err) != 0 ||
        copy_tree(&c, "models", &c.model_files) != 0 ||
        copy_tree(&c, "outbox", &c.outbox_files) != 0 || finish_dirs(&c) != 0) {
        if (!err[0])
            snprintf(err, sizeof err, "cannot sync %.1000s: %.1000s", c.last_dir, strerror(errno));
        goto out;
    }
    if (c.nchanges) {
        if (db_backup_amend_files(dst_db, c.changes, c.nchanges, (int64_t)time(NULL) * 1000, err,
                                  sizeof err) != 0)
            goto out;
        if (c.nchanges > c.ngone)
            util_log(UTIL_LOG_INFO, "backup_files_moved",
                     "files=%d reason=\"stored again with the same bytes while the backup ran\"",
                     c.nchanges - c.ngone);
        if (c.ngone > c.nlost + c.ndamaged)
            util_log(UTIL_LOG_INFO, "backup_files_left_out",
                     "files=%d reason=\"removed from the store while the backup ran\"",
                     c.ngone - c.nlost - c.ndamaged);
        if (c.nlost)
            util_log(UTIL_LOG_WARN, "backup_files_left_out",
                     "files=%d reason=\"missing from the store (--leave-out-missing)\"", c.nlost);
        if (c.ndamaged)
            util_log(UTIL_LOG_WARN, "backup_files_left_out",
                     "files=%d reason=\"damaged in the store (--leave-out-damaged)\"", c.ndamaged);
    }
    int settled = 0, outbox_missing = 0;
    if (db_backup_outbox_settle(dst_db, dir, db_path, &settled, &outbox_missing, err, sizeof err) !=
        0)
        goto out;
    if (settled)
        util_log(UTIL_LOG_INFO, "backup_outbox_settled",
                 "deliveries=%d reason=\"delivered or dismissed while the backup ran\"", settled);
    /* Listed once the copy's database is final. */
    if (backup_list_add(&list, "ichtriage.db", dst_db, err, sizeof err) != 0 ||
        db_status_read(dst_db, false, &st, err, sizeof err) != 0 ||
        write_manifest(dir, &st, &c, store, err, sizeof err) != 0)
        goto out;
    util_log(UTIL_LOG_INFO, "backup_done", "backup=%s instances=%lld files=%lld bytes=%lld", dir,
             (long long)st.instances, (long long)c.files, (long long)c.bytes);
    printf("backup of %s in %s: %lld instances, %lld files, %lld model files, %lld outbox files, "
           "%.1f MiB\n",
           store, dir, (long long)st.instances, (long long)c.files, (long long)c.model_files,
           (long long)c.outbox_files, (double)c.bytes / (1024.0 * 1024.0));
    if (c.nlost)
        printf("left out: %d instances whose files are missing from the store (logged, "
               "event=backup_instance_left_out)\n",
               c.nlost);
    if (c.ndamaged)
        printf("left out: %d instances whose files are damaged in the store (logged, "
               "event=backup_instance_left_out)\n",
               c.ndamaged);
    if (outbox_missing)
        printf("outbox: %d deliveries pending or given up whose files the store has lost (logged, "
               "event=backup_outbox_file_missing): they will fail to send\n",
               outbox_missing);
    rc = 0;
out:
    if (rc) {
        util_log(UTIL_LOG_ERROR, "backup_failed", "backup=%s", dir);
        fprintf(stderr, "ichtriage backup: %s\n", err);
        /* Only about a folder this run wrote into: an earlier backup found
         * there is left as it was, complete or not. */
        if (started)
            fprintf(stderr, "ichtriage backup: %s is not a complete backup (no MANIFEST)\n", dir);
    }
    for (int i = 0; i < c.nchanges; i++) {
        free(c.changes[i].file_path);
        free(c.changes[i].new_path);
    }
    free(c.changes);
    db_live_close(c.live);
    backup_list_free(&list);
    triage_config_free(&cfg);
    return rc;
}

/* Reads dir/MANIFEST: its format (2, or 1 for a backup made before the
 * file list), and for format 2 the file list into list. Returns the
 * format, or -1 with a message in err. */
static int read_manifest(const char *dir, struct backup_list *list, char *err, size_t errlen)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/MANIFEST", dir);
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%.1000s: %.1000s (not a complete backup)", path, strerror(errno));
        return -1;
    }
    int format = 0;
    long listed = -1;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, f)) > 0) {
        if (line[len - 1] == '\n') line[--len] = 0;
        if (!strcmp(line, "format = " BACKUP_FORMAT)) {
            format = 2;
        } else if (!strcmp(line, "format = " BACKUP_FORMAT_1)) {
            format = 1;
        } else if (!strncmp(line, "listed_files = ", 15)) {
            listed = strtol(line + 15, NULL, 10);
        } else if (!strncmp(line, "file = ", 7) &&
                   backup_list_parse(list, line + 7, err, errlen) != 0) {
            format = -1;
            break;
        }
    }
    free(line);
    fclose(f);
    if (format == 0)
        snprintf(err, errlen, "%.1000s: not a '" BACKUP_FORMAT "' manifest", path);
    else if (format == 2 && listed != list->n)
        snprintf(err, errlen, "%.1000s lists %d files of %ld (damaged)", path, list->n, listed);
    return format > 0 && (format == 1 || listed == list->n) ? format : -1;
}

/* Restore's check of what the spool's index does not cover: models/ and
 * outbox/ hold exactly the files MANIFEST lists, with their sizes and
 * SHA-256, and no listed file is missing (ichtriage.db, checked first,
 * is seen by then). */
static int check_listed(struct copier *c)
{
    if (copy_tree(c, "models", &c->model_files) != 0 ||
        copy_tree(c, "outbox", &c->outbox_files) != 0)
        return -1;
    const struct backup_listed *gone = backup_list_unseen(c->list, "");
    if (gone) {
        snprintf(c->err, c->errlen, "%.1000s/%.1000s is missing (MANIFEST lists it)", c->from,
                 gone->path);
        return -1;
    }
    return 0;
}

int triage_restore_main(int argc, char **argv)
{
    struct triage_config cfg;
    const char *dir;
    int rc = parse_args("restore", restore_help, &cfg, argc, argv, &dir, NULL, NULL);
    if (rc) return rc == 1 ? 0 : rc;
    umask(077);
    const char *store = triage_config_str(&cfg, CFG_STORE_DIR);
    char err[2048] = "", src_db[4200], db_path[1200];
    snprintf(src_db, sizeof src_db, "%s/ichtriage.db", dir);
    snprintf(db_path, sizeof db_path, "%s/ichtriage.db", store);
    struct backup_list list = {0};
    struct copier c = {
        .from = dir, .to = store, .check_only = true, .err = err, .errlen = sizeof err};
    c.list = &list;
    struct db_status st;
    struct stat sst;
    rc = 1;
    int format = read_manifest(dir, &list, err, sizeof err);
    if (format < 0) goto out;
    if (format == 2 && backup_list_check(&list, "ichtriage.db", src_db, err, sizeof err) != 0)
        goto out;
    if (db_status_read(src_db, true, &st, err, sizeof err) != 0) goto out;
    if (!st.quick_check_ok) {
        snprintf(err, sizeof err, "%.1000s: quick_check: %.1000s", src_db, st.quick_check);
        goto out;
    }
    if (st.schema_version > db_schema_version()) {
        snprintf(err, sizeof err, "%.1000s has schema version %d, newer than this build's %d",
                 src_db, st.schema_version, db_schema_version());
        goto out;
    }
    if (!dir_is_empty(store, 0)) {
        snprintf(err, sizeof err,
                 "store.dir %s is not empty: stop the node and move it aside first", store);
        goto out;
    }
    /* First pass: the backup is whole, before anything is written. */
    if (db_backup_files(src_db, copy_one, &c, err, sizeof err) != 0) goto out;
    if (format == 2 && check_listed(&c) != 0) goto out;
    if (format == 1) {
        /* Older backups are still restored (refusing them would leave a
         * site without its backups), with what could not be checked said. */
        util_log(UTIL_LOG_WARN, "restore_unchecked",
                 "backup=%s format=\"" BACKUP_FORMAT_1 "\" reason=\"no file list: ichtriage.db "
                 "checked by quick_check only, models/ and outbox/ not checked\"",
                 dir);
        fprintf(stderr,
                "ichtriage restore: warning: %s is an older backup (" BACKUP_FORMAT_1
                ") whose MANIFEST lists no files: the spool files were checked against the "
                "index, ichtriage.db by SQLite's quick_check only, and models/ and outbox/ could "
                "not be checked (a file missing or damaged there is not found); run "
                "'ichtriage status' and check the model loads after the restore\n",
                dir);
    }
    c.list = NULL;
    c.check_only = false;
    c.files = c.bytes = 0;
    if (mkdir(store, 0700) != 0 && errno != EEXIST) {
        snprintf(err, sizeof err, "cannot create %.1000s: %.1000s", store, strerror(errno));
        goto out;
    }
    if (stat(store, &sst) != 0) {
        snprintf(err, sizeof err, "%.1000s: %.1000s", store, strerror(errno));
        goto out;
    }
    c.chown = geteuid() == 0 && (sst.st_uid != 0 || sst.st_gid != 0);
    c.uid = sst.st_uid;
    c.gid = sst.st_gid;
    /* A node started meanwhile would clean up what is being restored. */
    if (triage_store_lock(store, err, sizeof err) != 0) goto out;
    char lock_path[1100];
    snprintf(lock_path, sizeof lock_path, "%.1000s/ichtriage.lock", store);
    if (c.chown && chown(lock_path, c.uid, c.gid) != 0) {
        snprintf(err, sizeof err, "cannot chown %.1000s: %.64s", lock_path, strerror(errno));
        goto out;
    }
    util_log(UTIL_LOG_INFO, "restore_start", "backup=%s store=%s", dir, store);
    if (db_backup_files(src_db, copy_one, &c, err, sizeof err) != 0 ||
        copy_tree(&c, "models", &c.model_files) != 0 ||
        copy_tree(&c, "outbox", &c.outbox_files) != 0 || finish_dirs(&c) != 0) {
        if (!err[0])
            snprintf(err, sizeof err, "cannot sync %.1000s: %.1000s", c.last_dir, strerror(errno));
        goto out;
    }
    if (db_backup_copy(src_db, db_path, err, sizeof err) != 0) goto out;
    if (c.chown && chown(db_path, c.uid, c.gid) != 0) {
        snprintf(err, sizeof err, "cannot chown %.1000s: %.1000s", db_path, strerror(errno));
        goto out;
    }
    util_log(UTIL_LOG_INFO, "restore_done", "store=%s instances=%lld files=%lld bytes=%lld", store,
             (long long)st.instances, (long long)c.files, (long long)c.bytes);
    printf("restored %s into %s: %lld instances, %lld files, %lld model files, %lld outbox files, "
           "%.1f MiB\n",
           dir, store, (long long)st.instances, (long long)c.files, (long long)c.model_files,
           (long long)c.outbox_files, (double)c.bytes / (1024.0 * 1024.0));
    rc = 0;
out:
    if (rc) {
        util_log(UTIL_LOG_ERROR, "restore_failed", "store=%s", store);
        fprintf(stderr, "ichtriage restore: %s\n", err);
    }
    backup_list_free(&list);
    triage_config_free(&cfg);
    return rc;
}
