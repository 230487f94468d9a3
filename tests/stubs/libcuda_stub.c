/*
 * A stand-in for the NVIDIA driver's libcuda.so.1 on machines without a GPU: it exports every
 * driver function kvtier's CUDA engine looks up, and cuInit answers CUDA_ERROR_NO_DEVICE, as the
 * real library does on a node whose GPUs are gone or hidden. With KVTIER_STUB_MISSING_SYMBOLS
 * defined at build time it exports only cuInit, like a driver too old for kvtier.
 *
 * Build: cc -shared -fPIC -o libcuda.so.1 libcuda_stub.c
 */
#include <stddef.h>

#define CUDA_ERROR_NO_DEVICE 100
#define CUDA_ERROR_NOT_INITIALIZED 3

int cuInit(unsigned flags) { (void)flags; return CUDA_ERROR_NO_DEVICE; }

#ifndef KVTIER_STUB_MISSING_SYMBOLS
int cuGetErrorName(int error, const char **name) {
    *name = error == CUDA_ERROR_NO_DEVICE ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_NOT_INITIALIZED";
    return 0;
}

int cuDeviceGetCount(int *count) { *count = 0; return CUDA_ERROR_NOT_INITIALIZED; }

/* Everything else fails as an uninitialised driver does; none is reached after cuInit fails. */
#define FAIL(name) int name(void) { return CUDA_ERROR_NOT_INITIALIZED; }
FAIL(cuDriverGetVersion)
FAIL(cuDeviceGet)
FAIL(cuDeviceGetName)
FAIL(cuDeviceGetAttribute)
FAIL(cuDevicePrimaryCtxRetain)
FAIL(cuDevicePrimaryCtxRelease_v2)
FAIL(cuCtxPushCurrent_v2)
FAIL(cuCtxPopCurrent_v2)
FAIL(cuStreamCreate)
FAIL(cuStreamDestroy_v2)
FAIL(cuStreamSynchronize)
FAIL(cuStreamWaitEvent)
FAIL(cuEventCreate)
FAIL(cuEventRecord)
FAIL(cuEventQuery)
FAIL(cuEventSynchronize)
FAIL(cuEventDestroy_v2)
FAIL(cuMemHostRegister_v2)
FAIL(cuMemHostUnregister)
FAIL(cuMemHostGetDevicePointer_v2)
FAIL(cuMemHostAlloc)
FAIL(cuMemFreeHost)
FAIL(cuMemcpyAsync)
FAIL(cuModuleLoadData)
FAIL(cuModuleUnload)
FAIL(cuModuleGetFunction)
FAIL(cuLaunchKernel)
#endif
