/* triage/pacs_cmd.c: `ichtriage pacs list|retry|dismiss`, the
 * results-to-PACS queue for an admin: what waits and what was given up, per
 * destination; putting what was given up back in the queue once the cause
 * is fixed; or letting go for good what never can be delivered (a
 * destination removed from pacs.destinations, a key slice no longer
 * indexed). Safe while the node runs: retry and dismiss change only rows
 * the sender no longer touches (given up), in one transaction; the sender
 * finds retried ones at its next look at the queue, and dismiss removes
 * the files of a revision with nothing left to send under the sender's own
 * rule (triage_pacs_drop_files). No patient names: UIDs and reasons only. */
#include "pacs_cmd.h"

#include <cjson/cJSON.h>
#include <pwd.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "db.h"
#include "db_outbox.h"
#include "log.h"
#include "pacs.h"
#include "rows.h"

#define LIST_MAX 1000 /* given-up objects listed, newest first */
#define DESTS_MAX 64  /* destinations listed: configured now or before */

static void usage(FILE *f)
{
    fprintf(f, "usage: ichtriage pacs [-c FILE] [--set section.key=value]... list [--json]\n"
               "       ichtriage pacs [-c FILE] [--set section.key=value]... retry STUDY_UID...\n"
               "       ichtriage pacs [-c FILE] [--set section.key=value]... retry --all\n"
               "       ichtriage pacs [-c FILE] [--set section.key=value]... dismiss STUDY_UID...\n"
               "       ichtriage pacs [-c FILE] [--set section.key=value]... dismiss --all\n"
               "\n"
               "The queue of results to PACS (the SR and SC of each triaged study).\n"
               "\n"
               "list     per destination, the objects waiting (pending), given up (failed),\n"
               "         delivered (sent) and dismissed; results waiting to be built, those\n"
               "         whose building was given up and those dismissed; then each object\n"
               "         given up, newest first, with its study UID, revision, destination,\n"
               "         attempts and last error.\n"
               "retry    puts the objects given up (for every destination) back in the queue\n"
               "         with pacs.max_attempts fresh attempts, due at once, and the results\n"
               "         whose building was given up back to be built: those of the studies\n"
               "         named, or all with --all. Safe while the node runs, which picks them\n"
               "         up within a minute (at its next look at the queue). A study given up\n"
               "         has its files kept (retention skips it) until its results are\n"
               "         delivered or dismissed. It leaves dismissed ones as they are.\n"
               "dismiss  lets go for good of the objects and results given up (never those\n"
               "         pending or sent) of the studies named, or all with --all: for what\n"
               "         can never be delivered, such as objects for a destination removed\n"
               "         from pacs.destinations, or results whose key slice is no longer\n"
               "         indexed. They count as done: their study may go by retention, and the\n"
               "         files of a result with nothing left to send are removed from outbox/.\n"
               "         Each is logged (event=pacs_dismissed) and recorded in the audit table\n"
               "         (action pacs_dismissed, user $SUDO_USER or the account running this).\n"
               "         Final: retry does nothing to them. Safe while the node runs.\n"
               "\n"
               "Exit status: 0 done; 1 a study named has nothing given up, or the database\n"
               "cannot be read or written; 2 usage.\n");
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const char *or_empty(const char *s)
{
    return s ? s : "";
}

/* The fields of GET /api/pacs/failures. */
static int failure_json(void *ud, const struct db_outbox_failure *f)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) return -1;
    char when[40];
    triage_iso_time(f->last_attempt_ms, when, sizeof when);
    cJSON_AddStringToObject(o, "study_uid", or_empty(f->study_uid));
    cJSON_AddNumberToObject(o, "revision", f->revision);
    cJSON_AddStringToObject(o, "object", or_empty(f->object));
    cJSON_AddStringToObject(o, "destination", or_empty(f->destination));
    cJSON_AddStringToObject(o, "sop_uid", or_empty(f->sop_uid));
    cJSON_AddNumberToObject(o, "attempts", f->attempts);
    cJSON_AddStringToObject(o, "last_attempt_at", when);
    triage_json_add_utf8(o, "error", or_empty(f->error));
    cJSON_AddItemToArray(ud, o);
    return 0;
}

static int failure_text(void *ud, const struct db_outbox_failure *f)
{
    (void)ud;
    char when[40];
    triage_iso_time(f->last_attempt_ms, when, sizeof when);
    printf("%s  %s  rev %d  %s  %s  attempts %d  %s\n", when, or_empty(f->study_uid), f->revision,
           or_empty(f->object), f->destination && f->destination[0] ? f->destination : "-",
           f->attempts, or_empty(f->error));
    return 0;
}

static int list(struct db *db, bool json)
{
    struct db_outbox_counts c;
    struct db_outbox_destination d[DESTS_MAX];
    int n;
    if (db_outbox_counts(db, &c) != 0 || db_outbox_by_destination(db, d, DESTS_MAX, &n) != 0)
        return -1;
    if (!json) {
        printf("%-40s %8s %8s %8s %9s\n", "destination", "pending", "failed", "sent", "dismissed");
        for (int i = 0; i < n; i++)
            printf("%-40s %8lld %8lld %8lld %9lld\n", d[i].destination, (long long)d[i].pending,
                   (long long)d[i].failed, (long long)d[i].sent, (long long)d[i].dismissed);
        printf("results waiting to be built: %lld; not built (given up): %lld; dismissed: %lld\n",
               (long long)c.revisions_pending, (long long)c.revisions_failed,
               (long long)c.revisions_dismissed);
        if (c.failed + c.revisions_failed == 0) return 0;
        printf("\ngiven up, newest first (object build: the result could not be built):\n");
        return db_outbox_failed(db, LIST_MAX, failure_text, NULL);
    }
    cJSON *o = cJSON_CreateObject(), *dests = cJSON_AddArrayToObject(o, "destinations");
    cJSON *failed = cJSON_AddArrayToObject(o, "failed");
    for (int i = 0; dests && i < n; i++) {
        cJSON *x = cJSON_CreateObject();
        cJSON_AddItemToArray(dests, x);
        cJSON_AddStringToObject(x, "destination", d[i].destination);
        cJSON_AddNumberToObject(x, "pending", (double)d[i].pending);
        cJSON_AddNumberToObject(x, "sent", (double)d[i].sent);
        cJSON_AddNumberToObject(x, "failed", (double)d[i].failed);
        cJSON_AddNumberToObject(x, "dismissed", (double)d[i].dismissed);
    }
    cJSON_AddNumberToObject(o, "results_to_build", (double)c.revisions_pending);
    cJSON_AddNumberToObject(o, "results_not_built", (double)c.revisions_failed);
    cJSON_AddNumberToObject(o, "results_dismissed", (double)c.revisions_dismissed);
    int rc = -1;
    if (failed && db_outbox_failed(db, LIST_MAX, failure_json, failed) == 0) {
        char *text = cJSON_Print(o);
        if (text) {
            puts(text);
            rc = 0;
        }
        cJSON_free(text);
    }
    cJSON_Delete(o);
    return rc;
}

/* Puts back what was given up: studies[0..n), or all when n is 0. */
static int retry(struct db *db, char **studies, int n)
{
    int rc = 0;
    for (int i = 0; i < (n ? n : 1); i++) {
        const char *study = n ? studies[i] : NULL;
        int deliveries, revisions;
        char err[512];
        if (db_outbox_retry(db, study, now_ms(), &deliveries, &revisions, err, sizeof err) != 0) {
            fprintf(stderr, "ichtriage pacs retry: %s\n", err);
            return 1;
        }
        printf("%s: %d objects back in the queue, %d results to build again\n",
               study ? study : "all studies", deliveries, revisions);
        if (study && deliveries + revisions == 0) {
            fprintf(stderr, "ichtriage pacs retry: nothing of study %s was given up\n", study);
            rc = 1;
        }
    }
    return rc;
}

/* Who dismisses, for the audit: the person behind sudo (the docs run it
 * as the service user), else the account running it. */
static void who(char *out, size_t n)
{
    const char *sudo = getenv("SUDO_USER");
    const struct passwd *pw = getpwuid(geteuid());
    if (sudo && sudo[0])
        snprintf(out, n, "%s", sudo);
    else if (pw)
        snprintf(out, n, "%s", pw->pw_name);
    else
        snprintf(out, n, "uid %u", (unsigned)geteuid());
}

/* Lets go of what was given up: studies[0..n), or all when n is 0. The
 * files of each revision left with nothing to send go now, as the sender
 * removes those of a revision delivered everywhere; nothing else would
 * remove them (the sender looks at a revision only when it sends). */
static int dismiss(struct db *db, const char *store_dir, char **studies, int n)
{
    char user[256], safe_user[128];
    who(user, sizeof user);
    util_log_safe(safe_user, sizeof safe_user, user);
    int rc = 0;
    for (int i = 0; i < (n ? n : 1); i++) {
        const char *study = n ? studies[i] : NULL;
        struct db_outbox_dismissed *d;
        int nd, objects = 0, results = 0, files = 0;
        char err[512];
        if (db_outbox_dismiss(db, study, user, now_ms(), &d, &nd, err, sizeof err) != 0) {
            fprintf(stderr, "ichtriage pacs dismiss: %s\n", err);
            return 1;
        }
        for (int j = 0; j < nd; j++) {
            bool build = strcmp(d[j].object, "build") == 0;
            util_log(UTIL_LOG_INFO, "pacs_dismissed",
                     "study=%s revision=%d destination=%s object=%s sop=%s user=%s", d[j].study_uid,
                     d[j].revision, build ? "-" : d[j].destination, d[j].object,
                     build ? "-" : d[j].sop_uid, safe_user);
            if (build) {
                results++;
                continue;
            }
            objects++;
            int removed = 0;
            if (j == 0 || d[j].revision_id != d[j - 1].revision_id)
                removed = triage_pacs_drop_files(db, store_dir, d[j].revision_id);
            if (removed < 0) {
                fprintf(stderr,
                        "ichtriage pacs dismiss: cannot read the queue: files of"
                        " revision %d of study %s kept in outbox/\n",
                        d[j].revision, d[j].study_uid);
                rc = 1;
            }
            files += removed > 0 ? removed : 0;
        }
        free(d);
        printf("%s: %d objects dismissed, %d results dismissed, %d files removed from outbox/\n",
               study ? study : "all studies", objects, results, files);
        if (study && nd == 0) {
            fprintf(stderr,
                    "ichtriage pacs dismiss: nothing of study %s was given up (what is pending or"
                    " sent is never dismissed)\n",
                    study);
            rc = 1;
        }
    }
    return rc;
}

/* What the command line asks. */
enum pacs_action { PACS_LIST, PACS_RETRY, PACS_DISMISS };
struct request {
    enum pacs_action action;
    bool json;
    char **studies; /* retry, dismiss: these, or all when none */
    int nstudies;
};

/* Returns 1 to go on with *r, 0 after --help, 2 on a usage error. */
static int parse(int argc, char **argv, struct request *r)
{
    *r = (struct request){.studies = argv + 2};
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        }
    bool all = false, bad = argc < 2;
    if (!bad && strcmp(argv[1], "list") == 0)
        r->action = PACS_LIST;
    else if (!bad && strcmp(argv[1], "retry") == 0)
        r->action = PACS_RETRY;
    else if (!bad && strcmp(argv[1], "dismiss") == 0)
        r->action = PACS_DISMISS;
    else
        bad = true;
    bool list = r->action == PACS_LIST;
    for (int i = 2; !bad && i < argc; i++)
        if (list && strcmp(argv[i], "--json") == 0)
            r->json = true;
        else if (!list && strcmp(argv[i], "--all") == 0)
            all = true;
        else if (!list && argv[i][0] != '-')
            r->studies[r->nstudies++] = argv[i];
        else
            bad = true;
    if (!bad && !list && all == (r->nstudies > 0)) bad = true; /* STUDY_UID... or --all */
    if (bad) usage(stderr);
    return bad ? 2 : 1;
}

int triage_pacs_main(int argc, char **argv)
{
    struct triage_config cfg;
    char err[1024];
    if (triage_config_from_args(&cfg, &argc, argv, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage pacs: %s\n", err);
        return 2;
    }
    char store_dir[1024], path[1200];
    snprintf(store_dir, sizeof store_dir, "%s", triage_config_str(&cfg, CFG_STORE_DIR));
    snprintf(path, sizeof path, "%s/ichtriage.db", store_dir);
    triage_config_free(&cfg);
    struct request r;
    int rc = parse(argc, argv, &r);
    if (rc != 1) return rc;
    struct db *db;
    if (db_open_existing(&db, path, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage pacs: %s\n", err);
        return 1;
    }
    if (r.action == PACS_LIST) {
        rc = list(db, r.json) == 0 ? 0 : 1;
        if (rc) fprintf(stderr, "ichtriage pacs list: cannot read the queue\n");
    } else if (r.action == PACS_RETRY) {
        rc = retry(db, r.studies, r.nstudies);
    } else {
        rc = dismiss(db, store_dir, r.studies, r.nstudies);
    }
    db_close(db);
    return rc;
}
