/* nn/backend.h: the seam between the model code and the kernels that do the
 * heavy arithmetic (ggml-style: one table of function pointers per backend).
 * The CPU table points at layers.h; a GPU backend (nn/cuda/, issue 11) fills
 * its own table and is checked against the CPU one op by op. */
#ifndef NN_BACKEND_H
#define NN_BACKEND_H

#include "layers.h"

typedef struct nn_backend {
    const char *name;
    void (*conv2d_forward)(float *out, float *col, const float *in, const float *w, const float *b,
                           int B, const nn_conv_shape *s);
    void (*conv2d_backward)(float *din, float *dw, float *db, float *col, const float *dout,
                            const float *in, const float *w, int B, const nn_conv_shape *s);
    void (*linear_forward)(float *out, const float *in, const float *w, const float *b, int N,
                           int IC, int OC);
    void (*linear_backward)(float *din, float *dw, float *db, const float *dout, const float *in,
                            const float *w, int N, int IC, int OC);
} nn_backend;

/* The CPU backend (static storage, never freed). */
const nn_backend *nn_backend_cpu(void);
/* Every backend built into this library, CPU first: tests run the same ops
 * on each and compare them with the CPU reference kernels. */
int nn_backend_count(void);
const nn_backend *nn_backend_at(int i);

#endif
