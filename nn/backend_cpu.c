/* nn/backend_cpu.c: the CPU backend table (OpenBLAS). */
#include "backend.h"

static const nn_backend cpu = {
    .name = "cpu",
    .conv2d_forward = nn_conv2d_forward,
    .conv2d_backward = nn_conv2d_backward,
    .linear_forward = nn_linear_forward,
    .linear_backward = nn_linear_backward,
};

const nn_backend *nn_backend_cpu(void)
{
    return &cpu;
}

int nn_backend_count(void)
{
    return 1;
}

const nn_backend *nn_backend_at(int i)
{
    return i == 0 ? &cpu : NULL;
}
