/* The decoded pixels (Hounsfield units) of a volume's slices, in the
 * volume's order, for the model. Decoding received pixel data is where an
 * untrusted file reaches the most code we cannot fix (dcmtk's JPEG, JPEG-LS
 * and RLE codecs), so the node runs it in a child process: this very
 * program, started with posix_spawn (never a bare fork in a threaded
 * process) as the hidden subcommand `decode-pixels`, under an address-space
 * and a CPU-time limit, streaming slice after slice back over a socket. A
 * child that crashes or runs over a limit fails that series with the
 * reason; the node goes on. `ichtriage predict` decodes inline. */
#ifndef TRIAGE_DECODE_H
#define TRIAGE_DECODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "volume.h"

struct triage_decoder {
    bool child;        /* false: decode in this process */
    char exe[1024];    /* the program the child runs: this one */
    char **envp;       /* the child's environment, owned */
    int64_t max_bytes; /* the child's RLIMIT_AS */
    int cpu_seconds;   /* the child's RLIMIT_CPU; the wall clock allows 10 times that */
};

/* Sets up a decoder (child: in a child process of this program, under
 * max_mb MiB of address space and cpu_seconds of CPU per series). Call it
 * before other threads start (it copies the environment). Returns 0, or -1
 * with a message; release with triage_decoder_free(). */
int triage_decoder_init(struct triage_decoder *d, bool child, int64_t max_mb, int cpu_seconds,
                        char *err, size_t errlen);
void triage_decoder_free(struct triage_decoder *d);

struct triage_slices;

/* Starts decoding the slices of v (paths as given to triage_volume_build)
 * with d (NULL: inline). The first lead of them repeat slices further on
 * (the head crop's samples): messages number slices as the series does,
 * v->n - lead of them. Returns 0, or -1 with a message; the caller closes
 * *out with triage_slices_close(). */
int triage_slices_open(struct triage_slices **out, const struct triage_decoder *d,
                       const struct triage_volume *v, int lead, const char *const *paths, char *err,
                       size_t errlen);
/* The next slice's v->rows * v->columns HU values, valid until the next
 * call. Returns 0, or -1 with a message naming the file or how the child
 * ended ("pixel decoder crashed: signal 11 (Segmentation fault) ..."). */
int triage_slices_next(struct triage_slices *s, const float **hu, char *err, size_t errlen);
/* Stops a child still running (SIGKILL) and reaps it. NULL is a no-op. */
void triage_slices_close(struct triage_slices *s);

/* `ichtriage decode-pixels --max-mb N --cpu-seconds S`: the child's side.
 * Not for people: reads a request on stdin, writes slices to stdout. */
int triage_decode_main(int argc, char **argv);

#endif
