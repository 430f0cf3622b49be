// An fp32 GEMM for XLA:CPU that calls a BLAS library's cblas_sgemm through the XLA FFI.
//
// sdl/kernels/gemm.py compiles this file on first use, hands it the address of the
// cblas_sgemm it picked (`sdl_gemm_set_blas`), and registers `SdlGemmF32` as the CPU
// target "sdl_gemm_f32". The handler computes C = op(A) @ op(B) for row-major 2D
// buffers, op being a transpose where the attribute says so: the transpose is passed to
// BLAS, never copied.
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// CBLAS's enum values (cblas.h), the same in every implementation.
constexpr int kRowMajor = 101;
constexpr int kNoTrans = 111;
constexpr int kTrans = 112;

// cblas_sgemm with 32-bit (LP64) or 64-bit (ILP64) integers.
using Sgemm32 = void (*)(int, int, int, int32_t, int32_t, int32_t, float, const float*,
                         int32_t, const float*, int32_t, float, float*, int32_t);
using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*,
                         int64_t, const float*, int64_t, float, float*, int64_t);

void* blas_sgemm = nullptr;
bool blas_ilp64 = false;

ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (blas_sgemm == nullptr) {
    return ffi::Error::InvalidArgument(
        "sdl_gemm_f32: no BLAS set; call it through sdl.kernels.gemm");
  }
  auto a_dims = a.dimensions();
  auto b_dims = b.dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2) {
    return ffi::Error::InvalidArgument("sdl_gemm_f32: operands must be 2D");
  }
  const int64_t m = trans_a ? a_dims[1] : a_dims[0];
  const int64_t k = trans_a ? a_dims[0] : a_dims[1];
  const int64_t k_b = trans_b ? b_dims[1] : b_dims[0];
  const int64_t n = trans_b ? b_dims[0] : b_dims[1];
  if (k != k_b) {
    return ffi::Error::InvalidArgument("sdl_gemm_f32: contracting sizes differ");
  }
  float* out = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    for (int64_t i = 0; i < m * n; ++i) out[i] = 0.0f;
    return ffi::Error::Success();
  }
  const int ta = trans_a ? kTrans : kNoTrans;
  const int tb = trans_b ? kTrans : kNoTrans;
  const int64_t lda = a_dims[1], ldb = b_dims[1], ldc = n;
  if (blas_ilp64) {
    reinterpret_cast<Sgemm64>(blas_sgemm)(kRowMajor, ta, tb, m, n, k, 1.0f,
                                          a.typed_data(), lda, b.typed_data(), ldb,
                                          0.0f, out, ldc);
  } else {
    constexpr int64_t kMax = INT32_MAX;
    if (m > kMax || n > kMax || k > kMax || lda > kMax || ldb > kMax) {
      return ffi::Error::InvalidArgument(
          "sdl_gemm_f32: a dimension exceeds this 32-bit BLAS's range");
    }
    reinterpret_cast<Sgemm32>(blas_sgemm)(
        kRowMajor, ta, tb, static_cast<int32_t>(m), static_cast<int32_t>(n),
        static_cast<int32_t>(k), 1.0f, a.typed_data(), static_cast<int32_t>(lda),
        b.typed_data(), static_cast<int32_t>(ldb), 0.0f, out, static_cast<int32_t>(ldc));
  }
  return ffi::Error::Success();
}

}  // namespace

extern "C" void sdl_gemm_set_blas(void* sgemm, int ilp64) {
  blas_sgemm = sgemm;
  blas_ilp64 = ilp64 != 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SdlGemmF32, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
