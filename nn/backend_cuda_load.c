/* nn/backend_cuda_load.c: finds the CUDA backend module (nn/cuda/, built as
 * libichtriage-nn-cuda.so) at run time, on first use. With nn.device=auto
 * it is used only when a GPU may be there (nn_cuda_device_count: the NVIDIA
 * driver's libcuda.so.1 must load first), so on a machine without one no
 * `ichtriage` process maps the CUDA runtime, cuBLAS or cuDNN (about 200 MB
 * resident and most of a second per process: every command and every
 * pixel-decoder child would pay it). An explicit `cuda` device and the
 * backend tests open it directly. Where the module is looked for:
 * $ICHTRIAGE_NN_CUDA_MODULE, then the build tree, then the installed library
 * folder. */
#include "backend.h"
#include "nn.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef NN_CUDA_MODULE_BUILD
static const nn_cuda_module *module;
static pthread_once_t module_once = PTHREAD_ONCE_INIT;
static pthread_once_t driver_once = PTHREAD_ONCE_INIT;
static int driver;

static void open_module(void)
{
    const char *env = getenv("ICHTRIAGE_NN_CUDA_MODULE");
    const char *paths[] = {env && env[0] ? env : NULL, NN_CUDA_MODULE_BUILD,
                           NN_CUDA_MODULE_INSTALL};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        if (!paths[i] || access(paths[i], R_OK) != 0) continue;
        void *h = dlopen(paths[i], RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            fprintf(stderr, "nn: %s\n", dlerror());
            continue;
        }
        const nn_cuda_module *m = dlsym(h, "nn_cuda_module_entry");
        if (m && m->abi == NN_CUDA_MODULE_ABI) {
            module = m; /* kept open for the life of the process */
            return;
        }
        fprintf(stderr, "nn: %s: not a CUDA backend module of this version\n", paths[i]);
        dlclose(h);
    }
}

static void find_driver(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    driver = h != NULL;
    if (h) dlclose(h);
}

const nn_backend *nn_backend_cuda(void)
{
    pthread_once(&module_once, open_module);
    return module ? module->backend : NULL;
}

int nn_cuda_device_count(void)
{
    pthread_once(&driver_once, find_driver);
    if (!driver || !nn_backend_cuda()) return 0;
    return module->device_count();
}

int nn_cuda_built(void)
{
    return 1; /* the module was built; whether it loads is nn_backend_cuda()'s answer */
}
#else
const nn_backend *nn_backend_cuda(void)
{
    return NULL;
}

int nn_cuda_device_count(void)
{
    return 0;
}

int nn_cuda_built(void)
{
    return 0;
}
#endif
