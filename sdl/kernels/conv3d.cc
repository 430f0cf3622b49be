// Direct 3D convolution for layers with few input channels, for XLA:CPU through its FFI.
//
// CosmoFlow's and 3D U-Net's first layers read 1-4 channels: as a GEMM their reduction is
// only 27 x C deep and their output 16-32 wide, so im2col + GEMM (and XLA's own
// convolution) run them at a third of the machine's GEMM rate (docs/benchmarks.md). Here
// each output row `y[n, z, r, :, :]` is a register tile of W_BLOCK positions x O
// channels, accumulated over every tap and input channel by broadcast-multiply-adds:
// input and kernel are read from cache, the output is written once (large outputs with
// streaming stores, past the caches: the `stream_bytes` attribute). The kernel gradient
// does the same with a tile of `3 x 4 x 32` (width taps x input x output channels)
// accumulators over a block of rows.
//
// Layouts (what sdl/kernels/conv3d.py passes): x `[N, D, H, W, C]` already padded (a
// valid convolution), kernel `[kd, kh, kw, C, O]`, y `[N, D - kd + 1, H - kh + 1,
// W - kw + 1, O]`, stride 1, fp32, O a multiple of 16. Work is split over output rows
// between the calling thread and threads of its own (`parallel_chunks`).
//
// Vectors are GCC/Clang vector extensions of 16 floats: one AVX-512 or SVE-512 register,
// two AVX2 registers, four NEON registers. The build compiles for the host CPU
// (sdl/kernels/build.py).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
// A store that bypasses the caches (x86 `vmovntps`, Arm `stnp` under Clang): for outputs
// far larger than the caches it saves reading each line in before it is overwritten.
// `p` must be aligned to a whole vector. Where neither is available, a plain store.
inline void stream(float* p, Vec v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  const __m256* h = reinterpret_cast<const __m256*>(&v);
  _mm256_stream_ps(p, h[0]);
  _mm256_stream_ps(p + 8, h[1]);
#elif defined(__clang__)
  __builtin_nontemporal_store(v, reinterpret_cast<Vec*>(p));
#else
  store(p, v);
#endif
}
// Every lane `a`. (Not `Vec{} + a`: without -ffast-math that is a real addition of 0,
// one more floating-point instruction per broadcast in the inner loops.)
inline Vec splat(float a) {
  static_assert(kLanes == 16, "splat lists every lane");
  return Vec{a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a};
}

struct Dims {
  int64_t n, d, h, w, c;      // padded input
  int64_t kd, kh, kw, o;      // kernel
  int64_t d_out, h_out, w_out;
};

// Runs body(chunk) for chunk in [0, chunks) on the calling thread and up to
// hardware_concurrency - 1 threads of its own, each claiming chunks one by one. Threads
// of its own, not XLA's intra-op pool: with several (fake) devices in one process XLA:CPU
// blocks pool threads in collective rendezvous, and a kernel that waits on pool tasks
// would depend on them.
template <typename Body>
void parallel_chunks(int64_t chunks, Body body) {
  std::atomic<int64_t> next{0};
  auto drain = [&]() {
    for (int64_t i; (i = next.fetch_add(1)) < chunks;) body(i);
  };
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t helpers = std::min<int64_t>(cores - 1, chunks - 1);
  std::vector<std::thread> threads;
  for (int64_t t = 0; t < helpers; ++t) threads.emplace_back(drain);
  drain();
  for (auto& thread : threads) thread.join();
}

// ---------------------------------------------------------------------------------------
// Forward: a tile of WB output positions x OV vectors of output channels.
template <int OV, int WB>
inline void forward_tile(const Dims& s, const float* const* rows, const float* kernel,
                         float* y_row, int64_t w0, int64_t o0, bool streaming) {
  Vec acc[WB][OV] = {};
  const int64_t taps = s.kd * s.kh;
  for (int64_t t = 0; t < taps; ++t) {
    const float* x_row = rows[t] + w0 * s.c;
    const float* k_tap = kernel + t * s.kw * s.c * s.o + o0;
    for (int64_t j = 0; j < s.kw; ++j) {
      for (int64_t ci = 0; ci < s.c; ++ci) {
        const float* kv = k_tap + (j * s.c + ci) * s.o;
        Vec wv[OV];
        for (int v = 0; v < OV; ++v) wv[v] = load(kv + v * kLanes);
        const float* xp = x_row + j * s.c + ci;
#pragma GCC unroll 16
        for (int b = 0; b < WB; ++b) {
          const Vec a = splat(xp[b * s.c]);
          for (int v = 0; v < OV; ++v) acc[b][v] += a * wv[v];
        }
      }
    }
  }
  for (int b = 0; b < WB; ++b)
    for (int v = 0; v < OV; ++v) {
      float* p = y_row + (w0 + b) * s.o + o0 + v * kLanes;
      if (streaming) {
        stream(p, acc[b][v]);
      } else {
        store(p, acc[b][v]);
      }
    }
}

template <int OV, int WB>
inline void forward_row(const Dims& s, const float* const* rows, const float* kernel,
                        float* y_row, int64_t o0, bool streaming) {
  int64_t w0 = 0;
  for (; w0 + WB <= s.w_out; w0 += WB)
    forward_tile<OV, WB>(s, rows, kernel, y_row, w0, o0, streaming);
  for (; w0 + 4 <= s.w_out; w0 += 4)
    forward_tile<OV, 4>(s, rows, kernel, y_row, w0, o0, streaming);
  for (; w0 < s.w_out; ++w0) forward_tile<OV, 1>(s, rows, kernel, y_row, w0, o0, streaming);
}

void forward_output_row(const Dims& s, const float* x, const float* kernel, float* y,
                        int64_t n, int64_t z, int64_t r, bool streaming) {
  std::vector<const float*> rows(s.kd * s.kh);
  for (int64_t a = 0; a < s.kd; ++a)
    for (int64_t b = 0; b < s.kh; ++b)
      rows[a * s.kh + b] = x + (((n * s.d + z + a) * s.h + r + b) * s.w) * s.c;
  float* y_row = y + (((n * s.d_out + z) * s.h_out + r) * s.w_out) * s.o;
  int64_t o0 = 0;
  for (; o0 + 64 <= s.o; o0 += 64)
    forward_row<4, 6>(s, rows.data(), kernel, y_row, o0, streaming);
  for (; o0 + 32 <= s.o; o0 += 32)
    forward_row<2, 12>(s, rows.data(), kernel, y_row, o0, streaming);
  for (; o0 < s.o; o0 += 16) forward_row<1, 16>(s, rows.data(), kernel, y_row, o0, streaming);
}

// ---------------------------------------------------------------------------------------
// Kernel gradient: dk[a, b, j, ci, o] = sum over n, z, r, w of
// x[n, z + a, r + b, w + j, ci] * dy[n, z, r, w, o]. A tile holds KW x CB x OV
// accumulators for one (a, b) tap pair, a block of CB input channels and OV vectors of
// output channels, summed over a block of output rows (flattened (n, z, r)) and their
// positions, then added to `dk`. The row block is sized so its output gradient stays in
// cache while every tile re-reads it, and so that narrow rows (4³, 8³ layers) still give
// each tile hundreds of positions to sum.
template <int KW, int CB, int OV>
inline void kernel_grad_tile(const Dims& s, const float* x, const float* dy, float* dk,
                             int64_t row0, int64_t row1, int64_t a, int64_t b, int64_t j0,
                             int64_t c0, int64_t o0) {
  Vec acc[KW][CB][OV] = {};
  for (int64_t i = row0; i < row1; ++i) {
    const int64_t r = i % s.h_out, nz = i / s.h_out, z = nz % s.d_out, n = nz / s.d_out;
    const float* x_row = x + (((n * s.d + z + a) * s.h + r + b) * s.w + j0) * s.c + c0;
    const float* dy_row = dy + i * s.w_out * s.o + o0;
    for (int64_t w = 0; w < s.w_out; ++w) {
      Vec g[OV];
      for (int v = 0; v < OV; ++v) g[v] = load(dy_row + w * s.o + v * kLanes);
      const float* xp = x_row + w * s.c;
      for (int j = 0; j < KW; ++j)
        for (int ci = 0; ci < CB; ++ci) {
          const Vec e = splat(xp[j * s.c + ci]);
          for (int v = 0; v < OV; ++v) acc[j][ci][v] += e * g[v];
        }
    }
  }
  float* dk_tap = dk + ((a * s.kh + b) * s.kw + j0) * s.c * s.o;
  for (int j = 0; j < KW; ++j)
    for (int ci = 0; ci < CB; ++ci)
      for (int v = 0; v < OV; ++v) {
        float* p = dk_tap + (j * s.c + c0 + ci) * s.o + o0 + v * kLanes;
        store(p, load(p) + acc[j][ci][v]);
      }
}

template <int KW, int CB>
inline void kernel_grad_channels(const Dims& s, const float* x, const float* dy, float* dk,
                                 int64_t row0, int64_t row1, int64_t a, int64_t b,
                                 int64_t j0, int64_t c0) {
  int64_t o0 = 0;
  for (; o0 + 32 <= s.o; o0 += 32)
    kernel_grad_tile<KW, CB, 2>(s, x, dy, dk, row0, row1, a, b, j0, c0, o0);
  for (; o0 < s.o; o0 += 16)
    kernel_grad_tile<KW, CB, 1>(s, x, dy, dk, row0, row1, a, b, j0, c0, o0);
}

template <int KW>
void kernel_grad_taps(const Dims& s, const float* x, const float* dy, float* dk,
                      int64_t row0, int64_t row1, int64_t a, int64_t b, int64_t j0) {
  int64_t c0 = 0;
  for (; c0 + 4 <= s.c; c0 += 4)
    kernel_grad_channels<KW, 4>(s, x, dy, dk, row0, row1, a, b, j0, c0);
  switch (s.c - c0) {
    case 3: kernel_grad_channels<KW, 3>(s, x, dy, dk, row0, row1, a, b, j0, c0); break;
    case 2: kernel_grad_channels<KW, 2>(s, x, dy, dk, row0, row1, a, b, j0, c0); break;
    case 1: kernel_grad_channels<KW, 1>(s, x, dy, dk, row0, row1, a, b, j0, c0); break;
    default: break;
  }
}

// Width taps not given a tile of their own are done one at a time (KW = 1, offset j0).
void kernel_grad_rows(const Dims& s, const float* x, const float* dy, float* dk,
                      int64_t row0, int64_t row1) {
  for (int64_t a = 0; a < s.kd; ++a)
    for (int64_t b = 0; b < s.kh; ++b) {
      int64_t j = 0;
      for (; j + 3 <= s.kw; j += 3) kernel_grad_taps<3>(s, x, dy, dk, row0, row1, a, b, j);
      for (; j < s.kw; ++j) kernel_grad_taps<1>(s, x, dy, dk, row0, row1, a, b, j);
    }
}

// ---------------------------------------------------------------------------------------
ffi::Error check(const Dims& s) {
  if (s.o % kLanes != 0) {
    return ffi::Error::InvalidArgument("sdl_conv3d: output channels must be a multiple of 16");
  }
  if (s.d_out <= 0 || s.h_out <= 0 || s.w_out <= 0) {
    return ffi::Error::InvalidArgument("sdl_conv3d: the kernel is larger than the input");
  }
  return ffi::Error::Success();
}

Dims dims_of(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k) {
  Dims s{x[0], x[1], x[2], x[3], x[4], k[0], k[1], k[2], k[4], 0, 0, 0};
  s.d_out = s.d - s.kd + 1;
  s.h_out = s.h - s.kh + 1;
  s.w_out = s.w - s.kw + 1;
  return s;
}

// `stream_bytes`: outputs of at least this many bytes are written with streaming stores
// (`stream`), when aligned; 0 streams all, a negative value none.
ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stream_bytes) {
  if (x.dimensions().size() != 5 || kernel.dimensions().size() != 5 ||
      kernel.dimensions()[3] != x.dimensions()[4]) {
    return ffi::Error::InvalidArgument(
        "sdl_conv3d: x [N, D, H, W, C] and kernel [kd, kh, kw, C, O] expected");
  }
  const Dims s = dims_of(x.dimensions(), kernel.dimensions());
  if (auto error = check(s); error.failure()) return error;
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  const int64_t rows = s.n * s.d_out * s.h_out;
  const int64_t per_chunk = s.h_out;  // one output plane per chunk
  const bool streaming = stream_bytes >= 0 &&
      rows * s.w_out * s.o * int64_t{sizeof(float)} >= stream_bytes &&
      reinterpret_cast<std::uintptr_t>(yp) % sizeof(Vec) == 0;
  parallel_chunks(rows / per_chunk, [&](int64_t chunk) {
    for (int64_t i = chunk * per_chunk; i < (chunk + 1) * per_chunk; ++i) {
      const int64_t r = i % s.h_out, nz = i / s.h_out;
      forward_output_row(s, xp, kp, yp, nz / s.d_out, nz % s.d_out, r, streaming);
    }
    // Streaming stores are weakly ordered: make them visible before the chunk counts
    // as done.
    if (streaming) std::atomic_thread_fence(std::memory_order_seq_cst);
  });
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk) {
  auto kd = dk->dimensions();
  if (x.dimensions().size() != 5 || dy.dimensions().size() != 5 || kd.size() != 5) {
    return ffi::Error::InvalidArgument("sdl_conv3d_kernel_grad: 5D operands expected");
  }
  const Dims s = dims_of(x.dimensions(), kd);
  if (auto error = check(s); error.failure()) return error;
  auto g = dy.dimensions();
  if (g[0] != s.n || g[1] != s.d_out || g[2] != s.h_out || g[3] != s.w_out || g[4] != s.o) {
    return ffi::Error::InvalidArgument("sdl_conv3d_kernel_grad: dy's shape does not match");
  }
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  const int64_t size = s.kd * s.kh * s.kw * s.c * s.o;
  const int64_t rows = s.n * s.d_out * s.h_out;
  // Rows per block: about 256 KiB of output gradient, at least one row.
  const int64_t block = std::max<int64_t>(1, (int64_t{64} << 10) / (s.w_out * s.o));
  const int64_t blocks = (rows + block - 1) / block;
  // Each chunk (a run of row blocks) sums into its own buffer, at most 64 of them and at
  // most 64 MiB in all; the buffers are added at the end in a fixed order, so the result
  // does not depend on the thread schedule.
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>({blocks, 64, (int64_t{16} << 20) / size}));
  std::vector<float> partial(chunks * size, 0.0f);
  parallel_chunks(chunks, [&](int64_t chunk) {
    float* mine = partial.data() + chunk * size;
    for (int64_t k = chunk * blocks / chunks; k < (chunk + 1) * blocks / chunks; ++k)
      kernel_grad_rows(s, xp, gp, mine, k * block, std::min(rows, (k + 1) * block));
  });
  float* out = dk->typed_data();
  std::copy(partial.begin(), partial.begin() + size, out);
  for (int64_t chunk = 1; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < size; ++i) out[i] += partial[chunk * size + i];
  return ffi::Error::Success();
}

// Both handlers take two fp32 operands and return one fp32 buffer.
auto binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SdlConv3dF32, Forward,
                              binding().Attr<int64_t>("stream_bytes"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SdlConv3dKernelGradF32, KernelGrad, binding());
