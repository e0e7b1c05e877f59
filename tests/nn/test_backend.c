/* tests/nn/test_backend.c: the CPU backend's table runs the heavy ops
 * (conv2d, linear, forward and backward) like the CPU reference kernels (its
 * conv picks Winograd where the reference is im2col). The CUDA backend, whose
 * ops work on device memory, is checked op by op against these kernels by
 * test_cuda_ops.c (skipped where no GPU is present). */
#include "backend.h"
#include "nn_test.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

static float *buf(size_t n, unsigned long long seed)
{
    float *p = calloc(n + 1, sizeof(float));
    cr_assert(p);
    if (seed) fill_random(p, n, seed);
    return p;
}

static void conv_on(const nn_backend *be, int B, int c, int h, int w, int oc, int k, int s, int p)
{
    nn_conv_shape cs;
    nn_conv_shape_init(&cs, c, h, w, oc, k, s, p);
    size_t nx = (size_t)B * c * h * w, no = (size_t)B * oc * cs.oh * cs.ow,
           nw = (size_t)oc * c * k * k;
    float *x = buf(nx, 1), *wt = buf(nw, 2), *b = buf(oc, 3), *g = buf(no, 4);
    float *col = buf(nn_conv2d_col_size(&cs, B), 0);
    float *out = buf(no, 0), *ref = buf(no, 0);
    float *dx = buf(nx, 0), *dw = buf(nw, 0), *db = buf(oc, 0);
    float *rdx = buf(nx, 0), *rdw = buf(nw, 0), *rdb = buf(oc, 0);
    be->conv2d_forward(NULL, out, col, x, wt, b, B, &cs);
    nn_conv2d_forward_im2col(NULL, ref, col, x, wt, b, B, &cs);
    expect_close(be->name, out, ref, no, 1e-5);
    be->conv2d_backward(NULL, dx, dw, db, col, g, x, wt, B, &cs);
    /* the CPU table points at these very kernels, so for it only the forward
     * comparison (Winograd against im2col) has teeth; another backend is
     * held to the CPU's gradients here */
    nn_conv2d_backward(NULL, rdx, rdw, rdb, col, g, x, wt, B, &cs);
    expect_close("conv dx", dx, rdx, nx, 1e-5);
    expect_close("conv dw", dw, rdw, nw, 1e-5);
    expect_close("conv db", db, rdb, oc, 1e-5);
    free(x), free(wt), free(b), free(g), free(col), free(out), free(ref);
    free(dx), free(dw), free(db), free(rdx), free(rdw), free(rdb);
}

Test(backend, the_cpu_table_matches_the_cpu_kernels)
{
    cr_assert_geq(nn_backend_count(), 1);
    cr_expect_str_eq(nn_backend_at(0)->name, "cpu");
    cr_expect_null(nn_backend_at(nn_backend_count()));
    cr_expect_eq(nn_backend_count(), nn_backend_cuda() ? 2 : 1);
    {
        const nn_backend *be = nn_backend_cpu();
        conv_on(be, 3, 16, 9, 7, 8, 3, 1, 1); /* Winograd on the CPU */
        conv_on(be, 2, 3, 9, 7, 8, 3, 2, 1);
        conv_on(be, 2, 4, 5, 5, 6, 1, 1, 0);
        float *x = buf(5 * 7, 1), *w = buf(3 * 7, 2), *b = buf(3, 3), *g = buf(15, 4);
        float out[15], ref[15], dx[35] = {0}, dw[21] = {0}, db[3] = {0};
        float rdx[35] = {0}, rdw[21] = {0}, rdb[3] = {0};
        be->linear_forward(NULL, out, x, w, b, 5, 7, 3);
        nn_linear_forward(ref, x, w, b, 5, 7, 3);
        expect_close("linear", out, ref, 15, 1e-6);
        be->linear_backward(NULL, dx, dw, db, g, x, w, 5, 7, 3);
        nn_linear_backward(rdx, rdw, rdb, g, x, w, 5, 7, 3);
        expect_close("linear dx", dx, rdx, 35, 1e-6);
        expect_close("linear dw", dw, rdw, 21, 1e-6);
        expect_close("linear db", db, rdb, 3, 1e-6);
        free(x), free(w), free(b), free(g);
    }
}
