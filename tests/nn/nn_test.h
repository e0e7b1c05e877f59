/* tests/nn/nn_test.h: helpers shared by the nn tests: reading the PyTorch
 * reference files and comparing buffers with a stated tolerance. */
#ifndef NN_TEST_H
#define NN_TEST_H

#include <stddef.h>

#include "nn.h"
#include "safetensors.h"

#ifndef NN_REF_DIR
#error "NN_REF_DIR must name tests/nn/ref"
#endif

/* Tolerances against PyTorch: max |ours - torch| <= tol * max |torch| + 1e-6. */
#define NN_TOL_OUT 1e-4
#define NN_TOL_GRAD 1e-3

/* Opens NN_REF_DIR/name; aborts the test with a message if it fails. */
nn_st_file *ref_open(const char *name);
/* A malloc'd F32 copy of tensor name (caller frees); *n gets the element count. */
float *ref_f32(const nn_st_file *f, const char *name, size_t *n);
/* A malloc'd I32 copy (caller frees). */
int *ref_i32(const nn_st_file *f, const char *name, size_t *n);
/* max |a - b| / max |b|, the relative error the tolerances bound. */
double rel_err(const float *a, const float *b, size_t n);
/* Asserts rel_err(a, b) <= tol, naming what is compared. */
void expect_close(const char *what, const float *a, const float *b, size_t n, double tol);
/* Deterministic test data in [-1, 1). */
void fill_random(float *x, size_t n, unsigned long long seed);

#endif
