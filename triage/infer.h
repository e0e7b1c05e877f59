/* The inference thread: takes triage jobs from SQLite one at a time, runs
 * the model, writes the results. A thread of its own (not libuv's pool,
 * which file work needs) at lower CPU priority than receiving. */
#ifndef TRIAGE_INFER_H
#define TRIAGE_INFER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "decode.h"

struct triage_infer;

struct triage_infer_config {
    const char *store_dir; /* relative file paths in the index start here */
    const char *db_path;
    const char *model; /* triage.model (may be empty) */
    double max_tilt_deg;
    /* triage.min_slices, checked again on the slices the volume placed
     * (completion counts frames whose positions are read only here). */
    int min_slices;
    int threads;        /* CPU threads for the model (nn_set_threads) */
    const char *device; /* nn.device: auto, cpu or cuda (NULL: auto) */
    /* How pixels are decoded (triage.pixel_decoder); NULL: inline. Borrowed
     * until triage_infer_stop(). */
    const struct triage_decoder *decoder;
    /* Called on the inference thread after each job ends (result or failure). */
    void (*on_done)(void *ud);
    void *ud;
};

/* Must be called before any other thread of the process starts (it lowers
 * the priority of the threads OpenBLAS made at load, see infer.c).
 * Starts the thread, which opens its own database connection and loads the
 * model. A model that cannot be loaded does not stop the node: jobs wait,
 * and triage_infer_model() says why. Returns 0, or -1 with a message. The
 * caller owns *out: triage_infer_stop(). */
int triage_infer_start(struct triage_infer **out, const struct triage_infer_config *cfg, char *err,
                       size_t errlen);
/* Wakes the thread: new jobs may be queued. Any thread. */
void triage_infer_kick(struct triage_infer *t);
/* Asks for the model to be loaded again from path (empty: resolve again;
 * NULL: as configured before); the old one stays if the new one fails.
 * Any thread. */
void triage_infer_reload(struct triage_infer *t, const char *model);
/* Copies the loaded model's version (or "" ) and, when none is loaded, the
 * reason into the buffers. Returns true when a model is loaded. */
bool triage_infer_model(struct triage_infer *t, char *version, size_t vlen, char *why, size_t wlen);
/* Asks the thread to stop after the job in progress, without waiting
 * (any thread; NULL is a no-op). */
void triage_infer_request_stop(struct triage_infer *t);
/* Finishes the job in progress, stops and frees. NULL is a no-op. */
void triage_infer_stop(struct triage_infer *t);

#endif
