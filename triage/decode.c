/* triage/decode.c: a volume's slices decoded inline or in a child process
 * (see decode.h).
 *
 * The child's protocol, on one socket that is the child's stdin and stdout,
 * in this machine's byte order:
 *   request: "ICHDEC1\0", int32 n, rows, columns; then n times int32 frame,
 *            int32 path length, the path;
 *   reply:   per slice int32 0 and rows * columns floats, or int32 1, int32
 *            length and a message, after which the child stops.
 * The parent trusts nothing it reads: the sizes are its own, a message is
 * cut and made printable, and a child that says nothing for 10 times its
 * CPU limit is killed. */
#include "child.h"
#include "clock.h"
#include "decode.h"

#include <assert.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "preprocess.h"
#include "scp_pixels.h"

extern char **environ;

/* AddressSanitizer and ThreadSanitizer reserve terabytes of address space
 * for their shadow (under RLIMIT_AS ThreadSanitizer's child dies at start,
 * "failed to allocate ... error code 12"): a sanitizer build's child runs
 * without RLIMIT_AS (CPU limit kept). */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define DECODE_NO_AS_LIMIT 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define DECODE_NO_AS_LIMIT 1
#endif
#endif

#define MAGIC "ICHDEC1" /* with its NUL, 8 bytes */
#define MAX_PATH_LEN 4096
#define MAX_MESSAGE 512

struct triage_slices {
    const struct triage_volume *v;
    const char *const *paths;
    int lead; /* v's first slices that repeat later ones (triage_slices_open) */
    int next; /* the slice next() returns */
    /* inline */
    struct scp_pixels px;
    int px_file;
    /* child */
    pid_t pid; /* 0: inline, or reaped */
    int fd;
    float *buf;
    int wall_seconds, cpu_seconds;
    int64_t max_mb;
};

int triage_decoder_init(struct triage_decoder *d, bool child, int64_t max_mb, int cpu_seconds,
                        char *err, size_t errlen)
{
    memset(d, 0, sizeof *d);
    d->child = child;
    d->max_bytes = max_mb << 20;
    d->cpu_seconds = cpu_seconds;
    if (!child) return 0;
    /* The path, not /proc/self/exe at spawn time: under valgrind that names
     * valgrind, while readlink() here gives the program. */
    ssize_t n = readlink("/proc/self/exe", d->exe, sizeof d->exe - 1);
    if (n <= 0 || n >= (ssize_t)sizeof d->exe - 1) {
        snprintf(err, errlen, "cannot find this program for the pixel decoder: %s",
                 n < 0 ? strerror(errno) : "path too long");
        return -1;
    }
    d->exe[n] = 0;
    const char *gone = " (deleted)"; /* replaced by an upgrade: run the new one */
    size_t len = strlen(d->exe), gl = strlen(gone);
    if (len > gl && strcmp(d->exe + len - gl, gone) == 0) d->exe[len - gl] = 0;
    /* The environment as it is now, with OpenBLAS told to start no worker
     * threads in a process that never multiplies a matrix. */
    size_t count = 0;
    while (environ[count])
        count++;
    d->envp = calloc(count + 2, sizeof *d->envp);
    if (!d->envp) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    size_t k = 0;
    for (size_t i = 0; i < count; i++)
        if (strncmp(environ[i], "OPENBLAS_NUM_THREADS=", 21) != 0)
            if (!(d->envp[k++] = strdup(environ[i]))) goto oom;
    if (!(d->envp[k++] = strdup("OPENBLAS_NUM_THREADS=1"))) goto oom;
    return 0;
oom:
    triage_decoder_free(d);
    snprintf(err, errlen, "out of memory");
    return -1;
}

void triage_decoder_free(struct triage_decoder *d)
{
    if (!d) return;
    for (size_t i = 0; d->envp && d->envp[i]; i++)
        free(d->envp[i]);
    free(d->envp);
    d->envp = NULL;
}

/* --- inline ------------------------------------------------------------ */

static int inline_next(struct triage_slices *s, const float **hu, char *err, size_t errlen)
{
    const struct triage_volume *v = s->v;
    const struct triage_slice *sl = &v->slices[s->next];
    const char *path = s->paths[sl->file];
    if (sl->file != s->px_file) {
        /* Frames of one multi-frame file are decoded once. */
        scp_pixels_free(&s->px);
        s->px_file = -1;
        /* Its messages start with the path. */
        if (scp_pixels_read(path, &s->px, err, errlen) != 0) return -1;
        s->px_file = sl->file;
    }
    if (s->px.rows != v->rows || s->px.columns != v->columns || sl->frame >= s->px.frames) {
        snprintf(err, errlen, "%s: pixel data %dx%d (%d frames) does not match its header", path,
                 s->px.rows, s->px.columns, s->px.frames);
        return -1;
    }
    *hu = s->px.hu + (size_t)sl->frame * v->rows * v->columns;
    s->next++;
    return 0;
}

/* --- the parent's side of a child ---------------------------------------- */

/* Reads len bytes before the deadline. Returns 0, -1 at the end of the
 * stream or an error, -2 when the time is up. */
static int read_full(int fd, void *buf, size_t len, int64_t deadline)
{
    char *p = buf;
    while (len > 0) {
        int64_t left = deadline - (int64_t)util_clock_ms();
        if (left <= 0) return -2;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = poll(&pfd, 1, left > 60000 ? 60000 : (int)left);
        if (r < 0 && errno != EINTR) return -1;
        if (r <= 0) continue;
        ssize_t got = recv(fd, p, len, 0);
        if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (got <= 0) return -1;
        p += got;
        len -= (size_t)got;
    }
    return 0;
}

static int send_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Stops the child if it still runs, and reaps it. */
static void child_kill(struct triage_slices *s)
{
    if (s->pid <= 0) return;
    kill(s->pid, SIGKILL);
    while (waitpid(s->pid, NULL, 0) < 0 && errno == EINTR) {
    }
    s->pid = 0;
}

/* Where the stream stands, for a message: "at slice K of N (file)", K and N
 * counted in the series; a sample of the head crop is the slice it repeats. */
static void where(const struct triage_slices *s, char *out, size_t len)
{
    const struct triage_volume *v = s->v;
    int i = s->next < v->n ? s->next : v->n - 1, k = i;
    for (int j = s->lead; k < s->lead && j < v->n; j++)
        if (v->slices[j].file == v->slices[i].file && v->slices[j].frame == v->slices[i].frame)
            k = j;
    if (k < s->lead) k = s->lead; /* not repeated after all: never a number below 1 */
    snprintf(out, len, "at slice %d of %d%s (%s)", k - s->lead + 1, v->n - s->lead,
             i < s->lead ? ", read for the head crop" : "", s->paths[v->slices[i].file]);
}

/* What the child's exit status says (triage_decode_main), "" when nothing. */
static const char *exit_meaning(int status)
{
    switch (status) {
    case 4:
        return " (it could not set its limits)";
    case 5:
        return " (it refused the request)";
    case 6:
        return " (out of memory)";
    case 7:
        return " (it could not write its reply)";
    default:
        return "";
    }
}

/* The child is gone or must go: reaps it and says how it ended. */
static void child_ended(struct triage_slices *s, bool timed_out, char *err, size_t errlen)
{
    /* At the end of its reply the child has exited, or is exiting: a few
     * moments for that, then it is stopped. */
    int st = 0;
    pid_t got = 0;
    for (int waited = 0; !timed_out && waited < 200; waited++) {
        got = waitpid(s->pid, &st, WNOHANG);
        if (got != 0 && !(got < 0 && errno == EINTR)) break;
        usleep(10000);
    }
    bool lingered = !timed_out && got == 0;
    if (got <= 0) {
        kill(s->pid, SIGKILL);
        while (waitpid(s->pid, &st, 0) < 0 && errno == EINTR) {
        }
    }
    pid_t pid = s->pid;
    s->pid = 0;
    char at[1400];
    where(s, at, sizeof at);
    if (timed_out)
        snprintf(err, errlen, "pixel decoder stopped: no answer for %d s %s", s->wall_seconds, at);
    else if (lingered)
        snprintf(err, errlen, "pixel decoder ended its reply early and did not exit %s", at);
    else if (WIFSIGNALED(st) && WTERMSIG(st) == SIGXCPU)
        snprintf(err, errlen,
                 "pixel decoder stopped: over its CPU limit (triage.decoder_cpu_seconds=%d) %s",
                 s->cpu_seconds, at);
    else if (WIFSIGNALED(st))
        snprintf(err, errlen, "pixel decoder crashed: signal %d (%s) %s", WTERMSIG(st),
                 strsignal(WTERMSIG(st)), at);
    else if (WIFEXITED(st) && WEXITSTATUS(st) != 0)
        snprintf(err, errlen, "pixel decoder exited with status %d%s %s", WEXITSTATUS(st),
                 exit_meaning(WEXITSTATUS(st)), at);
    else
        snprintf(err, errlen, "pixel decoder ended its reply early %s", at);
    util_log(UTIL_LOG_WARN, "pixel_decoder_failed", "pid=%d reason=\"%s\"", (int)pid, err);
}

static int child_next(struct triage_slices *s, const float **hu, char *err, size_t errlen)
{
    size_t pixels = (size_t)s->v->rows * (size_t)s->v->columns;
    /* A series may take long when receiving keeps the CPU; a child that says
     * nothing at all for this long is stuck. */
    int64_t deadline = (int64_t)util_clock_ms() + (int64_t)s->wall_seconds * 1000;
    int32_t tag;
    int rc = read_full(s->fd, &tag, sizeof tag, deadline);
    if (rc == 0 && tag == 0) rc = read_full(s->fd, s->buf, pixels * sizeof(float), deadline);
    if (rc != 0) {
        child_ended(s, rc == -2, err, errlen);
        return -1;
    }
    if (tag == 0) {
        *hu = s->buf;
        s->next++;
        return 0;
    }
    int32_t len = 0;
    char msg[MAX_MESSAGE + 1] = "";
    if (tag == 1 && read_full(s->fd, &len, sizeof len, deadline) == 0 && len >= 0 &&
        len <= MAX_MESSAGE && read_full(s->fd, msg, (size_t)len, deadline) == 0) {
        msg[len] = 0;
        for (char *p = msg; *p; p++)
            if ((unsigned char)*p < 0x20 || *p == '"' || (unsigned char)*p == 0x7f) *p = '?';
        snprintf(err, errlen, "%s", msg);
        child_kill(s);
        return -1;
    }
    child_kill(s);
    char at[1400];
    where(s, at, sizeof at);
    snprintf(err, errlen, "pixel decoder: unreadable reply %s", at);
    return -1;
}

/* The request: the header, then each slice's frame and file. */
static char *request(const struct triage_volume *v, const char *const *paths, size_t *len)
{
    size_t cap = 8 + 12;
    for (int i = 0; i < v->n; i++)
        cap += 8 + strlen(paths[v->slices[i].file]);
    char *buf = malloc(cap), *p = buf;
    if (!buf) return NULL;
    int32_t head[3] = {v->n, v->rows, v->columns};
    memcpy(p, MAGIC, 8);
    memcpy(p + 8, head, sizeof head);
    p += 8 + sizeof head;
    for (int i = 0; i < v->n; i++) {
        const char *path = paths[v->slices[i].file];
        int32_t f[2] = {v->slices[i].frame, (int32_t)strlen(path)};
        memcpy(p, f, sizeof f);
        memcpy(p + sizeof f, path, (size_t)f[1]);
        p += sizeof f + (size_t)f[1];
    }
    *len = (size_t)(p - buf);
    return buf;
}

static int child_start(struct triage_slices *s, const struct triage_decoder *d, char *err,
                       size_t errlen)
{
    s->buf = malloc(sizeof(float) * (size_t)s->v->rows * (size_t)s->v->columns);
    size_t len = 0;
    char *req = request(s->v, s->paths, &len);
    if (!s->buf || !req) {
        free(req);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
        free(req);
        snprintf(err, errlen, "cannot start the pixel decoder: socketpair: %s", strerror(errno));
        return -1;
    }
    char max_mb[32], cpu[32];
    snprintf(max_mb, sizeof max_mb, "%lld", (long long)(d->max_bytes >> 20));
    snprintf(cpu, sizeof cpu, "%d", d->cpu_seconds);
    char *argv[] = {
        (char *)d->exe, "decode-pixels", "--max-mb", max_mb, "--cpu-seconds", cpu, NULL};
    /* The child gets the socket as stdin and stdout, and this thread's
     * scheduling (the inference thread's idle priority). */
    int rc = util_spawn(&s->pid, d->exe, argv, d->envp, sv[1], sv[1]);
    close(sv[1]);
    s->fd = sv[0];
    if (rc != 0) {
        s->pid = 0;
        free(req);
        snprintf(err, errlen, "cannot start the pixel decoder %s: %s", d->exe, strerror(rc));
        return -1;
    }
    struct timeval tv = {.tv_sec = s->wall_seconds};
    setsockopt(s->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    rc = send_all(s->fd, req, len);
    bool stuck = rc != 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
    free(req);
    shutdown(s->fd, SHUT_WR);
    if (rc != 0) {
        child_ended(s, stuck, err, errlen);
        return -1;
    }
    return 0;
}

int triage_slices_open(struct triage_slices **out, const struct triage_decoder *d,
                       const struct triage_volume *v, int lead, const char *const *paths, char *err,
                       size_t errlen)
{
    *out = NULL;
    assert(lead >= 0 && lead <= v->n);
    /* triage_volume_build keeps no other sizes; the buffers below are sized
     * by these. */
    if (v->rows < 1 || v->columns < 1 || v->rows > SCP_PIXELS_MAX_DIM ||
        v->columns > SCP_PIXELS_MAX_DIM) {
        snprintf(err, errlen, "image size %dx%d out of range", v->rows, v->columns);
        return -1;
    }
    struct triage_slices *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    s->v = v;
    s->lead = lead;
    s->paths = paths;
    s->px_file = -1;
    s->fd = -1;
    if (d && d->child && v->n > 0) {
        s->cpu_seconds = d->cpu_seconds;
        s->wall_seconds = d->cpu_seconds * 10;
        s->max_mb = d->max_bytes >> 20;
        if (child_start(s, d, err, errlen) != 0) {
            triage_slices_close(s);
            return -1;
        }
    }
    *out = s;
    return 0;
}

int triage_slices_next(struct triage_slices *s, const float **hu, char *err, size_t errlen)
{
    if (s->next >= s->v->n) {
        snprintf(err, errlen, "no slice left");
        return -1;
    }
    if (s->fd < 0) return inline_next(s, hu, err, errlen);
    if (s->pid == 0) {
        snprintf(err, errlen, "pixel decoder already stopped");
        return -1;
    }
    return child_next(s, hu, err, errlen);
}

void triage_slices_close(struct triage_slices *s)
{
    if (!s) return;
    child_kill(s); /* done, or stopped early by an error of ours */
    if (s->fd >= 0) close(s->fd);
    scp_pixels_free(&s->px);
    free(s->buf);
    free(s);
}

/* --- the child ------------------------------------------------------------ */

static int write_error(const char *msg)
{
    int32_t head[2] = {1, (int32_t)strnlen(msg, MAX_MESSAGE)};
    if (send_all(1, head, sizeof head) != 0) return -1;
    return send_all(1, msg, (size_t)head[1]);
}

#ifdef ICHTRIAGE_TEST_HOOKS
/* ICHTRIAGE_TEST_DECODER_FAULT=KIND:TEXT[,KIND:TEXT...] makes the child
 * misbehave before decoding a file whose path contains TEXT: segv, abort,
 * spin (CPU), hang (silence), hog (allocates until refused and says how much
 * it got). Only in builds with -Dtest_hooks=true (the default; packages turn
 * it off), for tests/robust/test_decoder.py. */
static void test_fault(const char *path, int64_t max_mb)
{
    const char *f = getenv("ICHTRIAGE_TEST_DECODER_FAULT");
    char kind[16] = "";
    for (; f && *f; f += strcspn(f, ","), f += *f == ',') {
        char spec[256];
        snprintf(spec, sizeof spec, "%.*s", (int)strcspn(f, ","), f);
        char *colon = strchr(spec, ':');
        if (colon && colon[1] && strstr(path, colon + 1)) {
            snprintf(kind, sizeof kind, "%.*s", (int)(colon - spec), spec);
            break;
        }
    }
    if (!strcmp(kind, "segv")) raise(SIGSEGV);
    if (!strcmp(kind, "abort")) abort();
    if (!strcmp(kind, "spin"))
        for (volatile unsigned long i = 0;; i++) {
        }
    if (!strcmp(kind, "hang"))
        for (;;)
            pause();
    if (!strcmp(kind, "hog")) {
        /* Bounded even without a limit: 4 times the limit at most. */
        int64_t got = 0;
        while (got < 4 * max_mb) {
            char *p = malloc(16 << 20);
            if (!p) break;
            memset(p, 1, 16 << 20);
            got += 16;
        }
        char msg[128];
        snprintf(msg, sizeof msg, "test hook: %lld MiB allocated, then %s", (long long)got,
                 got < 4 * max_mb ? "refused" : "stopped without a refusal");
        write_error(msg);
        exit(0);
    }
}
#endif

int triage_decode_main(int argc, char **argv)
{
    long long max_mb = 0, cpu = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--has-test-hooks")) {
#ifdef ICHTRIAGE_TEST_HOOKS
            return 0;
#else
            return 3;
#endif
        }
        if (i + 1 < argc && !strcmp(argv[i], "--max-mb"))
            max_mb = atoll(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--cpu-seconds"))
            cpu = atoll(argv[++i]);
    }
    if (max_mb <= 0 || cpu <= 0) {
        fprintf(stderr, "ichtriage decode-pixels: the node's pixel decoder, not for people\n");
        return 2;
    }
    /* Limits first, before any byte of the data is looked at. No core file
     * either: it would hold patient images. */
    struct rlimit r = {0, 0};
    setrlimit(RLIMIT_CORE, &r);
#ifndef DECODE_NO_AS_LIMIT
    r.rlim_cur = r.rlim_max = (rlim_t)max_mb << 20;
    if (setrlimit(RLIMIT_AS, &r) != 0) return 4;
#endif
    r.rlim_cur = (rlim_t)cpu;
    r.rlim_max = (rlim_t)cpu + 1;
    if (setrlimit(RLIMIT_CPU, &r) != 0) return 4;
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* the node's end is our end */

    char magic[8];
    int32_t head[3];
    int64_t forever = INT64_MAX;
    /* The stream is the head crop's samples, then every slice
     * (triage_preprocess_volume): up to TRIAGE_MAX_SLICES and those. */
    if (read_full(0, magic, 8, forever) || memcmp(magic, MAGIC, 8) ||
        read_full(0, head, sizeof head, forever) || head[0] <= 0 ||
        head[0] > TRIAGE_MAX_SLICES + TRIAGE_HEAD_SAMPLES || head[1] <= 0 ||
        head[1] > SCP_PIXELS_MAX_DIM || head[2] <= 0 || head[2] > SCP_PIXELS_MAX_DIM)
        return 5;
    struct triage_volume v = {.n = head[0], .rows = head[1], .columns = head[2]};
    v.slices = calloc((size_t)v.n, sizeof *v.slices);
    char **paths = calloc((size_t)v.n, sizeof *paths);
    if (!v.slices || !paths) return 6;
    int files = 0;
    for (int i = 0; i < v.n; i++) {
        int32_t f[2];
        if (read_full(0, f, sizeof f, forever) || f[0] < 0 || f[1] <= 0 || f[1] > MAX_PATH_LEN)
            return 5;
        char *path = malloc((size_t)f[1] + 1);
        if (!path || read_full(0, path, (size_t)f[1], forever)) return 5;
        path[f[1]] = 0;
        /* Frames of one file come one after the other: decoded once. */
        if (files > 0 && !strcmp(paths[files - 1], path)) {
            free(path);
        } else {
            paths[files++] = path;
        }
        v.slices[i].file = files - 1;
        v.slices[i].frame = f[0];
    }
    struct triage_slices *s;
    char err[1024];
    if (triage_slices_open(&s, NULL, &v, 0, (const char *const *)paths, err, sizeof err) != 0)
        return write_error(err) ? 7 : 0;
    size_t bytes = sizeof(float) * (size_t)v.rows * (size_t)v.columns;
    int rc = 0;
    for (int i = 0; i < v.n && rc == 0; i++) {
#ifdef ICHTRIAGE_TEST_HOOKS
        test_fault(paths[v.slices[i].file], max_mb);
#endif
        const float *hu;
        int32_t ok = 0;
        if (triage_slices_next(s, &hu, err, sizeof err) != 0) {
            write_error(err);
            break;
        }
        rc = send_all(1, &ok, sizeof ok) || send_all(1, hu, bytes);
    }
    triage_slices_close(s);
    for (int i = 0; i < files; i++)
        free(paths[i]);
    free(paths);
    free(v.slices);
    return rc ? 7 : 0;
}
