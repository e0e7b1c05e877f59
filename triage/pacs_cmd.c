/* triage/pacs_cmd.c: `ichtriage pacs list|retry`, the results-to-PACS queue
 * for an admin: what waits and what was given up, per destination, and
 * putting what was given up back in the queue once the cause is fixed.
 * Safe while the node runs: it changes only rows the sender no longer
 * touches (given up), in one transaction, and the sender finds them at its
 * next look at the queue. No patient names: UIDs and reasons only. */
#include "pacs_cmd.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "db.h"
#include "db_outbox.h"
#include "rows.h"

#define LIST_MAX 1000 /* given-up objects listed, newest first */
#define DESTS_MAX 64  /* destinations listed: configured now or before */

static void usage(FILE *f)
{
    fprintf(f, "usage: ichtriage pacs [-c FILE] [--set section.key=value]... list [--json]\n"
               "       ichtriage pacs [-c FILE] [--set section.key=value]... retry STUDY_UID...\n"
               "       ichtriage pacs [-c FILE] [--set section.key=value]... retry --all\n"
               "\n"
               "The queue of results to PACS (the SR and SC of each triaged study).\n"
               "\n"
               "list   per destination, the objects waiting (pending), delivered (sent) and\n"
               "       given up (failed); results waiting to be built and those whose\n"
               "       building was given up; then each object given up, newest first, with\n"
               "       its study UID, revision, destination, attempts and last error.\n"
               "retry  puts the objects given up (for every destination) back in the queue\n"
               "       with pacs.max_attempts fresh attempts, due at once, and the results\n"
               "       whose building was given up back to be built: those of the studies\n"
               "       named, or all with --all. Safe while the node runs, which picks them up\n"
               "       within a minute (at its next look at the queue). A study given up has\n"
               "       its files kept (retention skips it) until its results are delivered.\n"
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
        printf("%-40s %8s %8s %8s\n", "destination", "pending", "failed", "sent");
        for (int i = 0; i < n; i++)
            printf("%-40s %8lld %8lld %8lld\n", d[i].destination, (long long)d[i].pending,
                   (long long)d[i].failed, (long long)d[i].sent);
        printf("results waiting to be built: %lld; not built (given up): %lld\n",
               (long long)c.revisions_pending, (long long)c.revisions_failed);
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
    }
    cJSON_AddNumberToObject(o, "results_to_build", (double)c.revisions_pending);
    cJSON_AddNumberToObject(o, "results_not_built", (double)c.revisions_failed);
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

/* What the command line asks. */
struct request {
    bool list, json;
    char **studies; /* retry: these, or all when none */
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
    r->list = !bad && strcmp(argv[1], "list") == 0;
    if (!bad && !r->list && strcmp(argv[1], "retry") != 0) bad = true;
    for (int i = 2; !bad && i < argc; i++)
        if (r->list && strcmp(argv[i], "--json") == 0)
            r->json = true;
        else if (!r->list && strcmp(argv[i], "--all") == 0)
            all = true;
        else if (!r->list && argv[i][0] != '-')
            r->studies[r->nstudies++] = argv[i];
        else
            bad = true;
    if (!r->list && all == (r->nstudies > 0)) bad = true; /* STUDY_UID... or --all */
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
    char path[1200];
    snprintf(path, sizeof path, "%s/ichtriage.db", triage_config_str(&cfg, CFG_STORE_DIR));
    triage_config_free(&cfg);
    struct request r;
    int rc = parse(argc, argv, &r);
    if (rc != 1) return rc;
    struct db *db;
    if (db_open_existing(&db, path, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage pacs: %s\n", err);
        return 1;
    }
    if (r.list) {
        rc = list(db, r.json) == 0 ? 0 : 1;
        if (rc) fprintf(stderr, "ichtriage pacs list: cannot read the queue\n");
    } else {
        rc = retry(db, r.studies, r.nstudies);
    }
    db_close(db);
    return rc;
}
