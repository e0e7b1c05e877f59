/* triage/store.c: making a received instance durable.
 *
 * Order, so that no crash leaves the index pointing at missing bytes:
 *   1. the temp file is complete and fsynced (scp/ did that);
 *   2. it is renamed, never over an existing file, into
 *      spool/<study>/<series>/<sop>.dcm (or <sop>~N.dcm when an earlier copy
 *      of the same instance is still there), and the folder is fsynced;
 *   3. the row is committed (group commit, synchronous=FULL);
 *   4. an earlier copy, if any, is removed.
 * A crash between 2 and 3 leaves a file no row points to; a crash between 3
 * and 4 leaves the earlier copy; triage_store_recover() removes both at the
 * next start. Only after 3 does the peer hear "success". */
#include "store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/time.h>
#include <unistd.h>

#include "log.h"

static int fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

static int dir_path_parent(const char *path, char *out, size_t n)
{
    snprintf(out, n, "%s", path);
    char *slash = strrchr(out, '/');
    if (!slash) return -1;
    *slash = 0;
    return 0;
}

/* mkdir that makes a new folder durable in its parent. */
static int mkdir_durable(const char *path)
{
    if (mkdir(path, 0700) == 0) {
        char parent[2048];
        if (dir_path_parent(path, parent, sizeof parent) == 0 && fsync_dir(parent) != 0) return -1;
        return 0;
    }
    return errno == EEXIST ? 0 : -1;
}

int triage_store_prepare(struct triage_store *s, const char *dir, int64_t window_seconds, char *err,
                         size_t errlen)
{
    snprintf(s->dir, sizeof s->dir, "%s", dir);
    snprintf(s->spool, sizeof s->spool, "%s/spool", dir);
    snprintf(s->tmp, sizeof s->tmp, "%s/.tmp", s->spool);
    /* Missing parents of store.dir are created too (mode 0700 as well). */
    char partial[1024];
    snprintf(partial, sizeof partial, "%s", dir);
    for (char *p = partial + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir_durable(partial) != 0) {
            snprintf(err, errlen, "cannot create %s: %s", partial, strerror(errno));
            return -1;
        }
        *p = '/';
    }
    const char *paths[] = {s->dir, s->spool, s->tmp};
    for (int i = 0; i < 3; i++) {
        if (mkdir_durable(paths[i]) != 0) {
            snprintf(err, errlen, "cannot create %s: %s", paths[i], strerror(errno));
            return -1;
        }
        /* Patient data: readable by the service's user only. */
        if (chmod(paths[i], 0700) != 0) {
            snprintf(err, errlen, "cannot set mode of %s: %s", paths[i], strerror(errno));
            return -1;
        }
    }
    triage_store_health_init(&s->health, s->dir, window_seconds);
    return 0;
}

void triage_store_finish(struct triage_store *s)
{
    triage_store_health_free(&s->health);
}

static int64_t now_ms(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

int triage_store_measure_space(struct triage_store *s, char *reason, size_t reason_len)
{
    struct statvfs v;
    if (statvfs(s->spool, &v) != 0) {
        snprintf(reason, reason_len, "cannot check free space of %s: %s", s->spool,
                 strerror(errno));
        return -1;
    }
    int64_t avail = (int64_t)v.f_bavail * (int64_t)v.f_frsize;
    bool low = avail < s->min_free_bytes;
    bool was = atomic_exchange(&s->low_space, low);
    if (low != was)
        util_log(low ? UTIL_LOG_ERROR : UTIL_LOG_INFO, low ? "disk_low" : "disk_ok",
                 "spool=%s free_mb=%lld min_free_mb=%lld", s->spool, (long long)(avail >> 20),
                 (long long)(s->min_free_bytes >> 20));
    if (low)
        snprintf(reason, reason_len, "free space %lld MiB below store.min_free_mb=%lld",
                 (long long)(avail >> 20), (long long)(s->min_free_bytes >> 20));
    return low ? 1 : 0;
}

int triage_store_check_space(void *ud, char *reason, size_t reason_len)
{
    struct triage_store *s = ud;
    int rc = triage_store_measure_space(s, reason, reason_len);
    if (rc == 1) atomic_fetch_add(&s->refused, 1);
    return rc;
}

/* Renames tmp to dir/<sop>.dcm, or <sop>~N.dcm when that name is taken,
 * never replacing a file. Writes the chosen name (relative to dir) to name. */
static int place_file(const char *tmp, const char *dir, const char *sop, char *name, size_t n)
{
    for (int gen = 0; gen < 10; gen++) {
        if (gen == 0)
            snprintf(name, n, "%s.dcm", sop);
        else
            snprintf(name, n, "%s~%d.dcm", sop, gen);
        char path[2048];
        snprintf(path, sizeof path, "%s/%s", dir, name);
        if (renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RENAME_NOREPLACE) == 0) return 0;
        if (errno == EINVAL) {
            /* A file system without RENAME_NOREPLACE: link() is exclusive too. */
            if (link(tmp, path) == 0) {
                unlink(tmp);
                return 0;
            }
        }
        if (errno != EEXIST) return -1;
    }
    errno = EEXIST;
    return -1;
}

void triage_store_outcome(void *ud, unsigned status, enum scp_refusal why, const char *reason)
{
    struct triage_store *s = ud;
    if (triage_store_health_record(&s->health, now_ms(), status, why, reason) && s->on_health)
        s->on_health(s->ud);
}

unsigned triage_store_instance(void *ud, const struct scp_received *r, enum scp_refusal *why,
                               char *reason, size_t reason_len)
{
    struct triage_store *s = ud;
    const struct scp_info *in = r->info;
    char study_dir[1400], series_dir[1500], name[160], rel[1024], full[2600];
    snprintf(study_dir, sizeof study_dir, "%s/%s", s->spool, in->study_uid);
    snprintf(series_dir, sizeof series_dir, "%s/%s", study_dir, in->series_uid);
    /* Retention removes a study's folders once its files are gone; it may do
     * so between the mkdir and the rename here, so ENOENT makes them again. */
    int placed = -1;
    for (int attempt = 0; attempt < 3 && placed != 0; attempt++) {
        if (mkdir_durable(study_dir) != 0 || mkdir_durable(series_dir) != 0) {
            if (errno == ENOENT && attempt < 2) continue;
            *why = scp_refusal_from_errno(errno);
            snprintf(reason, reason_len, "cannot create %s: %s", series_dir, strerror(errno));
            return SCP_STATUS_OUT_OF_RESOURCES;
        }
        placed = place_file(r->tmp_path, series_dir, in->sop_uid, name, sizeof name);
        if (placed != 0 && errno != ENOENT) break;
    }
    if (placed != 0) {
        *why = scp_refusal_from_errno(errno);
        snprintf(reason, reason_len, "cannot move into spool: %s", strerror(errno));
        return SCP_STATUS_OUT_OF_RESOURCES;
    }
    snprintf(rel, sizeof rel, "spool/%s/%s/%s", in->study_uid, in->series_uid, name);
    snprintf(full, sizeof full, "%s/%s", series_dir, name);
    if (fsync_dir(series_dir) != 0) {
        *why = scp_refusal_from_errno(errno);
        snprintf(reason, reason_len, "cannot sync %s: %s", series_dir, strerror(errno));
        unlink(full);
        return SCP_STATUS_OUT_OF_RESOURCES;
    }

    struct db_instance row = {
        .patient_id = in->patient_id,
        .patient_name = in->patient_name,
        .specific_charset = in->specific_charset,
        .patient_birth_date = in->patient_birth_date,
        .patient_sex = in->patient_sex,
        .study_uid = in->study_uid,
        .accession = in->accession,
        .study_id = in->study_id,
        .study_date = in->study_date,
        .study_time = in->study_time,
        .study_desc = in->study_desc,
        .series_uid = in->series_uid,
        .modality = in->modality,
        .body_part = in->body_part,
        .series_desc = in->series_desc,
        .frame_of_ref_uid = in->frame_of_ref_uid,
        .convolution_kernel = in->convolution_kernel,
        .manufacturer = in->manufacturer,
        .station_name = in->station_name,
        .series_number = in->series_number,
        .sop_uid = in->sop_uid,
        .sop_class = in->sop_class,
        .transfer_syntax = in->transfer_syntax,
        .image_type = in->image_type,
        .instance_number = in->instance_number,
        .rows = in->rows,
        .columns = in->columns,
        .number_of_frames = in->number_of_frames,
        .images_in_acquisition = in->images_in_acquisition,
        .has_pixel_spacing = in->has_pixel_spacing,
        .has_position = in->has_position,
        .has_orientation = in->has_orientation,
        .slice_thickness = in->slice_thickness,
        .rescale_slope = in->rescale_slope,
        .rescale_intercept = in->rescale_intercept,
        .file_path = rel,
        .file_size = r->file_size,
        .content_digest = r->digest,
        .calling_ae = r->calling_ae,
        .peer_addr = r->peer_addr,
        .received_at_ms = now_ms(),
    };
    memcpy(row.pixel_spacing, in->pixel_spacing, sizeof row.pixel_spacing);
    memcpy(row.position, in->position, sizeof row.position);
    memcpy(row.orientation, in->orientation, sizeof row.orientation);

    char old[1024], err[512];
    int put = db_instance_put(s->db, &row, old, sizeof old, err, sizeof err);
    if (put != 0) {
        /* Not indexed, so not stored: the file must not outlive the failure. */
        unlink(full);
        *why = put == 1 ? SCP_REFUSED_UID_CONFLICT : SCP_REFUSED_DATABASE;
        snprintf(reason, reason_len, "%s", err);
        return put == 1 ? SCP_STATUS_DOES_NOT_MATCH_SOP_CLASS : SCP_STATUS_OUT_OF_RESOURCES;
    }
    if (old[0] && strcmp(old, rel) != 0) {
        char old_full[2100];
        snprintf(old_full, sizeof old_full, "%s/%s", s->dir, old);
        if (unlink(old_full) != 0 && errno != ENOENT)
            util_log(UTIL_LOG_WARN, "replace_cleanup_failed", "path=%s error=\"%s\"", old,
                     strerror(errno));
        util_log(UTIL_LOG_INFO, "instance_replaced", "sop=%s", in->sop_uid);
    }
    atomic_fetch_add(&s->stored, 1);
    if (s->on_stored) s->on_stored(s->ud);
    return SCP_STATUS_SUCCESS;
}

int triage_store_lock(const char *dir, char *err, size_t errlen)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/ichtriage.lock", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    /* A command that only looks (db_open_existing takes a shared lock for
     * an instant to see whether a node runs) is waited for, a second at
     * most; a node or a restore holds it for good. */
    int rc;
    for (int i = 0; (rc = flock(fd, LOCK_EX | LOCK_NB)) != 0 && errno == EWOULDBLOCK && i < 20; i++)
        usleep(50000);
    if (rc != 0) {
        if (errno == EWOULDBLOCK)
            snprintf(err, errlen,
                     "another ichtriage node runs on store.dir %s (it holds %s); refusing to "
                     "start on the same store",
                     dir, path);
        else
            snprintf(err, errlen, "cannot lock %s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    return 0; /* fd stays open: the lock is the process's until it ends */
}

/* Walks dir (relative path rel under the store) removing .dcm files that no
 * row points to (only counting them when dry). */
static int sweep(struct triage_store *s, const char *rel, int depth, bool dry, long *removed)
{
    char path[2100];
    snprintf(path, sizeof path, "%s/%s", s->dir, rel);
    DIR *d = opendir(path);
    if (!d && errno == ENOTDIR) {
        /* Not the node's: left alone, and no reason not to start. */
        util_log(UTIL_LOG_WARN, "spool_stray_file", "path=%s", rel);
        return 0;
    }
    if (!d) return errno == ENOENT ? 0 : -1;
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue; /* ., .. and .tmp */
        char child[1024];
        if ((size_t)snprintf(child, sizeof child, "%s/%s", rel, e->d_name) >= sizeof child) {
            util_log(UTIL_LOG_WARN, "spool_stray_file", "path=%s/%.64s...", rel, e->d_name);
            continue; /* not a name of the node's (UIDs are 64 at most) */
        }
        if (depth < 2) {
            if (sweep(s, child, depth + 1, dry, removed) != 0) rc = -1;
            continue;
        }
        bool indexed = false; /* without an index (s->db NULL), none is */
        if (s->db && db_file_is_indexed(s->db, child, &indexed) != 0) {
            rc = -1;
            continue;
        }
        if (!indexed && dry) {
            (*removed)++;
        } else if (!indexed) {
            char full[2100];
            snprintf(full, sizeof full, "%s/%s", s->dir, child);
            if (unlink(full) == 0) (*removed)++;
        }
    }
    closedir(d);
    return rc;
}

/* Written by a clean stop, after every association ended and the index
 * closed: no rename can then lack its row, and the next start need not
 * check every spool file against the index (minutes on a store of
 * millions). A crash leaves none, and the next start checks them all. */
#define CLEAN_MARKER ".clean-shutdown"

void triage_store_mark_clean(struct triage_store *s)
{
    char path[1300];
    snprintf(path, sizeof path, "%s/" CLEAN_MARKER, s->spool);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || fsync(fd) != 0 || fsync_dir(s->spool) != 0)
        util_log(UTIL_LOG_WARN, "clean_marker_failed", "path=%s error=\"%s\"", path,
                 strerror(errno));
    if (fd >= 0) close(fd);
}

int triage_store_check_lost_index(struct triage_store *s, char *err, size_t errlen)
{
    /* Files without an index are a lost index, not a crash between rename
     * and commit. */
    long files = 0;
    if (sweep(s, "spool", 0, true, &files) != 0) {
        snprintf(err, errlen, "cannot read the spool: %s", strerror(errno));
        return -1;
    }
    if (files) {
        snprintf(err, errlen,
                 "%s/ichtriage.db is missing or empty but the spool holds %ld instance files: "
                 "refusing to delete them; restore a backup (move %s aside, make it again "
                 "empty, then ichtriage restore BACKUP: docs/operations.md, \"To restore\") "
                 "or move %s away",
                 s->dir, files, s->dir, s->spool);
        return -1;
    }
    return 0;
}

int triage_store_recover(struct triage_store *s, char *err, size_t errlen)
{
    long temps = 0, orphans = 0;
    DIR *d = opendir(s->tmp);
    if (!d) {
        snprintf(err, errlen, "cannot open %s: %s", s->tmp, strerror(errno));
        return -1;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (unlinkat(dirfd(d), e->d_name, 0) == 0) temps++;
    }
    closedir(d);
    char marker[1300];
    snprintf(marker, sizeof marker, "%s/" CLEAN_MARKER, s->spool);
    bool clean = access(marker, F_OK) == 0;
    if (clean) {
        /* Gone, durably, before anything is received: a crash from here on
         * must find no marker. */
        if (unlink(marker) != 0 || fsync_dir(s->spool) != 0) {
            snprintf(err, errlen, "cannot remove %s: %s", marker, strerror(errno));
            return -1;
        }
    } else if (sweep(s, "spool", 0, false, &orphans) != 0) {
        snprintf(err, errlen, "cannot check the spool against the index: %s", strerror(errno));
        return -1;
    }
    if (temps || orphans) fsync_dir(s->tmp);
    util_log(temps || orphans ? UTIL_LOG_WARN : UTIL_LOG_INFO, "recovered",
             "after=%s temp_files_removed=%ld unindexed_files_removed=%ld",
             clean ? "clean_stop" : "crash_or_first_start", temps, orphans);
    return 0;
}
