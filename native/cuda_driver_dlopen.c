/* The CUDA driver API functions the generated launchers call, resolved at load time.
 *
 * The library is not linked against libcuda (build machines have no driver, and the driver's
 * version must be the one installed on the GPU host): each entry point below looks its real
 * symbol up in libcuda.so.1 with dlopen/dlsym on first use, as Triton's own runtime does.
 * Without a driver every call returns CUDA_ERROR_NOT_INITIALIZED (or NOT_FOUND for
 * cuGetErrorString) instead of failing to load.
 */
#include <cuda.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>

static void *libcuda;
static pthread_once_t libcuda_once = PTHREAD_ONCE_INIT;

static void open_libcuda(void) { libcuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL); }

static void *driver_symbol(const char *name) {
  pthread_once(&libcuda_once, open_libcuda);
  return libcuda ? dlsym(libcuda, name) : NULL;
}

/* cuda.h may #define an entry point to a versioned name (e.g. _v2, _ptsz): stringify the
 * expanded name so dlsym asks for the symbol the header means. */
#define GF_STR_(x) #x
#define GF_STR(x) GF_STR_(x)
#define GF_FORWARD(ret_fail, name, params, args)                      \
  CUresult CUDAAPI name params {                                      \
    typedef CUresult(CUDAAPI * fn_t) params;                          \
    static fn_t fn;                                                   \
    if (!fn) fn = (fn_t)driver_symbol(GF_STR(name));                  \
    return fn ? fn args : ret_fail;                                   \
  }

GF_FORWARD(CUDA_ERROR_NOT_FOUND, cuGetErrorString, (CUresult error, const char **str),
           (error, str))
GF_FORWARD(CUDA_ERROR_NOT_INITIALIZED, cuModuleLoadData, (CUmodule * module, const void *image),
           (module, image))
GF_FORWARD(CUDA_ERROR_NOT_INITIALIZED, cuModuleUnload, (CUmodule hmod), (hmod))
GF_FORWARD(CUDA_ERROR_NOT_INITIALIZED, cuModuleGetFunction,
           (CUfunction * hfunc, CUmodule hmod, const char *name), (hfunc, hmod, name))
GF_FORWARD(CUDA_ERROR_NOT_INITIALIZED, cuDeviceGetAttribute,
           (int *pi, CUdevice_attribute attrib, CUdevice dev), (pi, attrib, dev))
GF_FORWARD(CUDA_ERROR_NOT_INITIALIZED, cuFuncSetCacheConfig, (CUfunction hfunc, CUfunc_cache config),
           (hfunc, config))
GF_FORWARD(CUDA_ERROR_NOT_INITIALIZED, cuFuncSetAttribute,
           (CUfunction hfunc, CUfunction_attribute attrib, int value), (hfunc, attrib, value))
GF_FORWARD(CUDA_ERROR_NOT_INITIALIZED, cuLaunchKernel,
           (CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
            unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
            unsigned int sharedMemBytes, CUstream hStream, void **kernelParams, void **extra),
           (f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes,
            hStream, kernelParams, extra))
