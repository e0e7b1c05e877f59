/* triage/backup_list.c: the MANIFEST's file list (backup_list.h). */
#include "backup_list.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "scp_info.h"

/* Appends an entry for path; its size and digest are the caller's to set. */
static struct backup_listed *append(struct backup_list *l, const char *path, char *err,
                                    size_t errlen)
{
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 64;
        struct backup_listed *grown = realloc(l->v, sizeof *grown * (size_t)cap);
        if (!grown) {
            snprintf(err, errlen, "out of memory");
            return NULL;
        }
        l->v = grown;
        l->cap = cap;
    }
    struct backup_listed *e = &l->v[l->n];
    *e = (struct backup_listed){.path = strdup(path)};
    if (!e->path) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    l->n++;
    l->sorted = false;
    return e;
}

int backup_list_add(struct backup_list *l, const char *rel, const char *full, char *err,
                    size_t errlen)
{
    if (strchr(rel, '\n')) {
        snprintf(err, errlen, "cannot list %.1000s in MANIFEST: its name holds a line break", full);
        return -1;
    }
    char sha[65];
    long long size;
    if (scp_file_digest(full, 0, sha, &size, err, errlen) != 0) return -1;
    struct backup_listed *e = append(l, rel, err, errlen);
    if (!e) return -1;
    e->size = size;
    memcpy(e->sha256, sha, sizeof sha);
    return 0;
}

void backup_list_write(const struct backup_list *l, FILE *f)
{
    for (int i = 0; i < l->n; i++)
        fprintf(f, "file = %s %" PRId64 " %s\n", l->v[i].sha256, l->v[i].size, l->v[i].path);
}

int backup_list_parse(struct backup_list *l, const char *value, char *err, size_t errlen)
{
    char sha[65];
    long long size;
    int used = 0;
    if (sscanf(value, "%64[0-9a-f] %lld %n", sha, &size, &used) != 2 || strlen(sha) != 64 ||
        size < 0 || !used || !value[used]) {
        snprintf(err, errlen, "a malformed file line in MANIFEST: '%.200s'", value);
        return -1;
    }
    struct backup_listed *e = append(l, value + used, err, errlen);
    if (!e) return -1;
    e->size = size;
    memcpy(e->sha256, sha, sizeof sha);
    return 0;
}

static int by_path(const void *a, const void *b)
{
    return strcmp(((const struct backup_listed *)a)->path, ((const struct backup_listed *)b)->path);
}

int backup_list_check(struct backup_list *l, const char *rel, const char *full, char *err,
                      size_t errlen)
{
    if (!l->sorted) {
        qsort(l->v, (size_t)l->n, sizeof *l->v, by_path);
        l->sorted = true;
    }
    struct backup_listed key = {.path = (char *)rel};
    struct backup_listed *e = bsearch(&key, l->v, (size_t)l->n, sizeof *l->v, by_path);
    if (!e) {
        snprintf(err, errlen, "%.1000s is not in the backup's MANIFEST (not part of the backup)",
                 full);
        return -1;
    }
    char sha[65];
    long long size;
    if (scp_file_digest(full, 0, sha, &size, err, errlen) != 0) return -1;
    if (size != e->size) {
        snprintf(err, errlen, "%.1000s has %lld bytes, MANIFEST lists %lld (damaged)", full, size,
                 (long long)e->size);
        return -1;
    }
    if (strcmp(sha, e->sha256) != 0) {
        snprintf(err, errlen, "%.1000s does not hold the bytes MANIFEST lists (damaged)", full);
        return -1;
    }
    e->seen = true;
    return 0;
}

const struct backup_listed *backup_list_unseen(const struct backup_list *l, const char *prefix)
{
    for (int i = 0; i < l->n; i++)
        if (!l->v[i].seen && !strncmp(l->v[i].path, prefix, strlen(prefix))) return &l->v[i];
    return NULL;
}

void backup_list_free(struct backup_list *l)
{
    for (int i = 0; i < l->n; i++)
        free(l->v[i].path);
    free(l->v);
    *l = (struct backup_list){0};
}
