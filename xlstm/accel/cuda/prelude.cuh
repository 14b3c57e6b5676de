// What every cell's pointwise header uses: the host/device qualifier, the index type
// of the kernels and tanh for float and double. xlstm.accel.cuda.kernels.source puts it in
// front of the cell's header; nothing else includes it.

#ifndef XLSTM_POINTWISE_PRELUDE
#define XLSTM_POINTWISE_PRELUDE
#if defined(__CUDACC__)
#define XLSTM_HD __host__ __device__
#else
#define XLSTM_HD
#endif

#if !defined(__CUDACC_RTC__)
#include <math.h>  // NVRTC has the math functions built in and no system headers
#endif

namespace xlstm {
typedef long long index_t;
XLSTM_HD inline float act_tanh(float x) { return tanhf(x); }
XLSTM_HD inline double act_tanh(double x) { return tanh(x); }
}  // namespace xlstm
#endif  // XLSTM_POINTWISE_PRELUDE
