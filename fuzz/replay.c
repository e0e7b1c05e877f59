/* fuzz/replay.c: a main() for the fuzz targets without libFuzzer, so that
 * every input that once crashed one (fuzz/regressions/TARGET/) is replayed by
 * the ordinary test suite with gcc, and under the sanitizers in CI.
 *   fuzz_replay_TARGET FILE|DIR...  (exit 0 when every input ran) */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return -1;
    }
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            uint8_t *b = realloc(buf, cap *= 2);
            if (!b) {
                free(buf);
                buf = NULL;
            }
            buf = b;
        }
    }
    fclose(f);
    if (!buf) {
        fprintf(stderr, "%s: out of memory\n", path);
        return -1;
    }
    fprintf(stderr, "replay %s (%zu bytes)\n", path, n);
    LLVMFuzzerTestOneInput(buf, n);
    free(buf);
    return 0;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv)
{
    int files = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            perror(argv[i]);
            return 1;
        }
        if (!S_ISDIR(st.st_mode)) {
            if (run_file(argv[i]) != 0) return 1;
            files++;
            continue;
        }
        struct dirent **names;
        int n = scandir(argv[i], &names, NULL, NULL);
        if (n < 0) {
            perror(argv[i]);
            return 1;
        }
        char **paths = calloc((size_t)n, sizeof *paths);
        int m = 0;
        for (int j = 0; j < n; j++) {
            if (names[j]->d_name[0] != '.' && paths) {
                size_t len = strlen(argv[i]) + strlen(names[j]->d_name) + 2;
                if ((paths[m] = malloc(len)))
                    snprintf(paths[m++], len, "%s/%s", argv[i], names[j]->d_name);
            }
            free(names[j]);
        }
        free(names);
        if (paths) qsort(paths, (size_t)m, sizeof *paths, by_name);
        for (int j = 0; j < m; j++) {
            if (run_file(paths[j]) != 0) return 1;
            files++;
            free(paths[j]);
        }
        free(paths);
    }
    fprintf(stderr, "%d inputs replayed\n", files);
    return files > 0 ? 0 : 1; /* no input at all means a wrong path: fail */
}
