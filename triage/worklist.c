/* triage/worklist.c: `ichtriage worklist`, the worklist from the index in
 * the order radiologists see it. */
#include "worklist.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include "config.h"
#include "db.h"
#include "db_triage.h"
#include "rows.h"

struct print_ctx {
    cJSON *array;
    int rank;
    int64_t now;
};

static int on_row(void *ud, const struct db_worklist_row *row)
{
    struct print_ctx *p = ud;
    p->rank++;
    if (p->array) {
        cJSON *o = triage_row_json(row);
        if (!o) return -1;
        cJSON_AddItemToArray(p->array, o);
    } else {
        triage_row_print(stdout, p->rank, row, p->now);
    }
    return 0;
}

static const char *const statuses[] = {"received",       "waiting", "triaging", "triaged",
                                       "not_applicable", "failed",  "reviewed", NULL};

int triage_worklist_main(int argc, char **argv)
{
    struct triage_config cfg;
    char err[1024];
    if (triage_config_from_args(&cfg, &argc, argv, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage worklist: %s\n", err);
        return 2;
    }
    int json = 0, all = 0;
    const char *status = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else if (strcmp(argv[i], "--all") == 0) {
            all = 1;
        } else if (strcmp(argv[i], "--status") == 0 && i + 1 < argc) {
            status = argv[++i];
            int ok = 0;
            for (int k = 0; statuses[k]; k++)
                ok |= strcmp(statuses[k], status) == 0;
            if (!ok) {
                fprintf(stderr, "ichtriage worklist: unknown status '%s'\n", status);
                triage_config_free(&cfg);
                return 2;
            }
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            printf("usage: ichtriage worklist [-c FILE] [--set K=V]... [--json] [--all | --status "
                   "S]\n\n"
                   "Prints the worklist in the order radiologists see it: flagged and not yet\n"
                   "reviewed by probability, then studies not yet triaged or failed (oldest\n"
                   "first), then the other triaged ones by probability, then those not\n"
                   "applicable. Reviewed studies only with --status reviewed. Studies that\n"
                   "need no action (triaged and not flagged, not applicable) with no new\n"
                   "image or result for more than http.worklist_days (7; 0: none) are left\n"
                   "out, as on the page;\n"
                   "--all lists them, --status triaged or not_applicable lists every study of\n"
                   "that status. Flagged studies and those not yet known stay, whatever their\n"
                   "age. A study whose\n"
                   "files retention removed ends with \"images removed by retention on DATE\".\n"
                   "study_date is the study's own date, \"prior\" when it is more than 2 days\n"
                   "before the study arrived (an earlier study sent again, not a new one).\n"
                   "Decision support, not a diagnosis.\n");
            triage_config_free(&cfg);
            return 0;
        } else {
            fprintf(stderr, "ichtriage worklist: unexpected argument '%s'\n", argv[i]);
            triage_config_free(&cfg);
            return 2;
        }
    }
    int64_t days = 0;
    if (!all && !status &&
        triage_config_get(&cfg, CFG_HTTP_WORKLIST_DAYS, &days, err, sizeof err)) {
        fprintf(stderr, "ichtriage worklist: %s\n", err);
        triage_config_free(&cfg);
        return 2;
    }
    char path[1200];
    snprintf(path, sizeof path, "%s/ichtriage.db", triage_config_str(&cfg, CFG_STORE_DIR));
    triage_config_free(&cfg);
    struct db *db;
    if (db_open_existing(&db, path, err, sizeof err) != 0) {
        fprintf(stderr, "ichtriage worklist: %s\n", err);
        return 1;
    }
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct print_ctx p = {json ? cJSON_CreateArray() : NULL, 0,
                          (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000};
    if (!json) triage_row_print_header(stdout);
    int64_t since = triage_worklist_since(p.now, days);
    struct db_worklist_hidden hidden;
    int rc = db_worklist(db, status, since, on_row, &p);
    if (rc == 0) rc = db_worklist_hidden(db, since, &hidden);
    db_close(db);
    if (rc != 0) {
        fprintf(stderr, "ichtriage worklist: cannot read the worklist\n");
        cJSON_Delete(p.array);
        return 1;
    }
    if (json) {
        char *text = cJSON_Print(p.array);
        if (text) puts(text);
        cJSON_free(text);
        cJSON_Delete(p.array);
    } else {
        printf("-- %d studies. Decision support, not a diagnosis.\n", p.rank);
        if (hidden.triaged + hidden.not_applicable > 0)
            printf("-- %lld older studies that need no action not shown (%lld triaged, not "
                   "flagged; %lld not applicable; no new image or result for more than %lld days): "
                   "--all shows "
                   "them.\n",
                   (long long)(hidden.triaged + hidden.not_applicable), (long long)hidden.triaged,
                   (long long)hidden.not_applicable, (long long)days);
    }
    return 0;
}
