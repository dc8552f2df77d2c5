/* Links against libgift_fast_kernels and shows how a kernel is launched from C.
 *
 * Built by CMake as gift_fast_example. On a machine without a CUDA driver (where this project is
 * built) it only lists the compiled kernels: the driver API is resolved at load time, so every
 * driver call reports CUDA_ERROR_NOT_INITIALIZED and nothing is launched. On a GPU host the
 * application creates the context and the device buffers; launch_combine shows the call shape.
 */
#include <stdio.h>

#include "gift_fast_kernels.h"

/* Merges the vocabulary splits of n_rows rows (see kernels/logprob_forward.py): float32 [n_split,
 * N] partial statistics in, per-row lse, target logit, entropy and argmax out; row_max (the max
 * logit, used by the vocabulary-parallel path) only in the algorithms compiled with WANT_ROW_MAX:
 * pass any float32 [N] buffer otherwise, as the Python launcher passes lse. */
static CUresult launch_combine(CUstream stream, CUdeviceptr parts[6], CUdeviceptr lse,
                               CUdeviceptr zy, CUdeviceptr ent, CUdeviceptr argmax,
                               CUdeviceptr row_max, int n_rows,
                               int n_split, int algo_id, unsigned int block) {
  gift_fast_set_grid((n_rows + block - 1) / block, 1, 1);
#if defined(GIFT_FAST_SM90)
  return combine_sm90(stream, parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], lse, zy,
                      ent, argmax, row_max, n_rows, n_split, algo_id);
#elif defined(GIFT_FAST_SM80)
  return combine_sm80(stream, parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], lse, zy,
                      ent, argmax, row_max, n_rows, n_split, algo_id);
#else
  (void)stream; (void)parts; (void)lse; (void)zy; (void)ent; (void)argmax; (void)row_max;
  (void)n_rows;
  (void)n_split; (void)algo_id;
  return CUDA_ERROR_NOT_SUPPORTED;
#endif
}

int main(void) {
  for (int i = 0; i < gift_fast_num_kernels; ++i)
    printf("%-20s sm_%d: %d algorithms\n", gift_fast_kernels[i].kernel, gift_fast_kernels[i].arch,
           gift_fast_kernels[i].num_algos());
  int major = 0;
  if (cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 0) !=
      CUDA_SUCCESS) {
    printf("no initialised CUDA driver: nothing launched\n");
    return 0;
  }
  printf("device 0 is sm_%d0-class; create a context and buffers to call launch_combine\n", major);
  (void)launch_combine;
  return 0;
}
