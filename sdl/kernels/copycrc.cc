// Read a chunk file and compute its crc32c in one pass over the bytes.
//
// The reader's plain path is one `preadv` from the page cache into the caller's array. A
// checksum as a second pass reads the whole array again from memory, which on a 2-core
// VM cost about a fifth of the throughput. Here the file is read in pieces that stay in
// the L2 cache (a few hundred KiB into a bounce buffer), and each piece is checksummed and
// copied to the destination in the same loop: the checksum reads what the copy loads
// anyway, and the copy's stores bypass the cache on x86 (non-temporal), so the
// destination is written to memory once and never read first.
//
// The crc32c is the hardware instruction (SSE4.2 `crc32`, ARMv8 `crc32c`), three
// independent streams at a time to cover the instruction's latency, joined by
// multiplying by x^(8n) mod P (carry-less, the way zlib's crc32_combine works). Without
// either instruction a table is used (correct, slow).
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <unistd.h>

#if defined(__x86_64__) && defined(__SSE4_2__)
#include <immintrin.h>
#define SDL_CRC_X86 1
static inline uint64_t step64(uint64_t c, uint64_t v) { return _mm_crc32_u64(c, v); }
static inline uint32_t step8(uint32_t c, uint8_t v) { return _mm_crc32_u8(c, v); }
#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
static inline uint64_t step64(uint64_t c, uint64_t v) { return __crc32cd((uint32_t)c, v); }
static inline uint32_t step8(uint32_t c, uint8_t v) { return __crc32cb(c, v); }
#else
#define SDL_CRC_TABLE 1
#endif

namespace {

constexpr uint32_t POLY = 0x82F63B78u;  // crc32c (Castagnoli), bit-reflected

#ifdef SDL_CRC_TABLE
struct Table {
  uint32_t t[256];
  Table() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
      t[i] = c;
    }
  }
};
const Table table;
static inline uint32_t step8(uint32_t c, uint8_t v) { return table.t[(c ^ v) & 0xff] ^ (c >> 8); }
static inline uint64_t step64(uint64_t c, uint64_t v) {
  for (int k = 0; k < 8; ++k) c = step8((uint32_t)c, (uint8_t)(v >> (8 * k)));
  return c;
}
#endif

// a * b mod P, polynomials in the reflected order (bit 31 is x^0).
uint32_t mulmod(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t m = 1u << 31; m; m >>= 1) {
    if (a & m) product ^= b;
    b = b & 1 ? (b >> 1) ^ POLY : b >> 1;
  }
  return product;
}

// x^e mod P.
uint32_t xpow(uint64_t e) {
  uint32_t result = 1u << 31, base = 1u << 30;  // x^0, x^1
  for (; e; e >>= 1) {
    if (e & 1) result = mulmod(result, base);
    base = mulmod(base, base);
  }
  return result;
}

// x^(8 n) mod P: what a register is multiplied by when n zero bytes follow.
uint32_t shift_of(size_t n) { return xpow((uint64_t)n * 8); }

inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// One stream, in order; copies to `dst` when it is not null.
uint32_t serial(const uint8_t* src, uint8_t* dst, size_t n, uint32_t reg) {
  uint64_t c = reg;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) c = step64(c, load64(src + i));
  for (; i < n; ++i) c = step8((uint32_t)c, src[i]);
  if (dst) std::memcpy(dst, src, n);
  return (uint32_t)c;
}

// 64 bytes of one lane: checksum, and copy (streaming stores when `stream`).
template <bool copy, bool stream>
inline uint64_t line(const uint8_t* s, uint8_t* d, uint64_t c) {
  for (int k = 0; k < 64; k += 8) c = step64(c, load64(s + k));
  if (copy) {
#ifdef SDL_CRC_X86
    if (stream) {
      for (int k = 0; k < 64; k += 16)
        _mm_stream_si128((__m128i*)(d + k), _mm_loadu_si128((const __m128i*)(s + k)));
      return c;
    }
#endif
    std::memcpy(d, s, 64);
  }
  return c;
}

// Three lanes of `lane` bytes (a multiple of 64) side by side, then joined.
template <bool copy, bool stream>
uint32_t lanes(const uint8_t* src, uint8_t* dst, size_t lane, uint32_t reg) {
  uint64_t a = reg, b = 0, c = 0;
  const uint8_t *s0 = src, *s1 = src + lane, *s2 = src + 2 * lane;
  uint8_t *d0 = dst, *d1 = dst + lane, *d2 = dst + 2 * lane;
  for (size_t i = 0; i < lane; i += 64) {
    a = line<copy, stream>(s0 + i, copy ? d0 + i : nullptr, a);
    b = line<copy, stream>(s1 + i, copy ? d1 + i : nullptr, b);
    c = line<copy, stream>(s2 + i, copy ? d2 + i : nullptr, c);
  }
  uint32_t x = shift_of(lane);
  return mulmod(mulmod((uint32_t)a, x) ^ (uint32_t)b, x) ^ (uint32_t)c;
}

#if defined(SDL_CRC_X86) && defined(__VPCLMULQDQ__) && defined(__AVX512F__)
#define SDL_CRC_FOLD 1
// Carry-less folding, 256 bytes a step, for CPUs with 512-bit carry-less multiplies: four
// times the crc instruction's 8 bytes a cycle. Each 128-bit lane R of the message (bit k
// the coefficient of x^(127-k): the low quadword H is R's high-degree half) moves D bits
// on as H * x^(D+64) + L * x^D mod P. A carry-less multiply of two bit-reflected
// quadwords gives the reflected product times x, and a 32-bit constant in a quadword's
// low half stands for itself times x^32, so the constants are x^(D+31) and x^(D-33) mod P.
inline __m128i fold_constants(uint64_t distance) {
  return _mm_set_epi64x(xpow(distance - 33), xpow(distance + 31));
}

inline __m128i fold128(__m128i r, __m128i k, __m128i next) {
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(r, k, 0x00),
                                     _mm_clmulepi64_si128(r, k, 0x11)), next);
}

struct FoldConstants {
  __m512i by2048;  // per 128-bit lane
  __m128i by128;
  FoldConstants() : by2048(_mm512_broadcast_i32x4(fold_constants(2048))),
                    by128(fold_constants(128)) {}
};
const FoldConstants fold;

template <bool copy, bool stream>
inline __m512i take(const uint8_t* s, uint8_t* d) {
  __m512i v = _mm512_loadu_si512((const void*)s);
  if (copy) {
    if (stream) _mm512_stream_si512((__m512i*)d, v);
    else _mm512_storeu_si512((void*)d, v);
  }
  return v;
}

inline __m512i step512(__m512i x, __m512i next) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, fold.by2048, 0x00),
                                   _mm512_clmulepi64_epi128(x, fold.by2048, 0x11), next,
                                   0x96);  // a ^ b ^ c
}

// The register after `n` bytes (a multiple of 256, at least 256).
template <bool copy, bool stream>
uint32_t folds(const uint8_t* src, uint8_t* dst, size_t n, uint32_t reg) {
  __m512i x0 = take<copy, stream>(src, dst), x1 = take<copy, stream>(src + 64, dst + 64),
          x2 = take<copy, stream>(src + 128, dst + 128),
          x3 = take<copy, stream>(src + 192, dst + 192);
  x0 = _mm512_xor_si512(x0, _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)reg)));
  for (size_t i = 256; i < n; i += 256) {
    x0 = step512(x0, take<copy, stream>(src + i, dst + i));
    x1 = step512(x1, take<copy, stream>(src + i + 64, dst + i + 64));
    x2 = step512(x2, take<copy, stream>(src + i + 128, dst + i + 128));
    x3 = step512(x3, take<copy, stream>(src + i + 192, dst + i + 192));
  }
  alignas(64) __m128i part[16];
  _mm512_store_si512((void*)(part + 0), x0);
  _mm512_store_si512((void*)(part + 4), x1);
  _mm512_store_si512((void*)(part + 8), x2);
  _mm512_store_si512((void*)(part + 12), x3);
  __m128i r = part[0];
  for (int k = 1; k < 16; ++k) r = fold128(r, fold.by128, part[k]);
  // What is left, R, stands for the message mod P; its crc register is R x^32 mod P,
  // the crc instruction's result on R's 16 bytes from a zero register.
  uint64_t c = step64(0, (uint64_t)_mm_cvtsi128_si64(r));
  return (uint32_t)step64(c, (uint64_t)_mm_extract_epi64(r, 1));
}
#endif

// Which loop `update` runs; tests force each one the build has.
enum Path { FASTEST = 0, LANES = 1, SERIAL = 2 };

// The register after `n` bytes of `src`, copying them to `dst` unless it is null.
uint32_t update(const uint8_t* src, uint8_t* dst, size_t n, uint32_t reg,
                Path path = FASTEST) {
  if (path == SERIAL) return serial(src, dst, n, reg);
#ifdef SDL_CRC_FOLD
  if (n >= 1024 && path == FASTEST) {
    size_t bulk = n & ~(size_t)255;
    if (!dst) reg = folds<false, false>(src, dst, bulk, reg);
    else if ((uintptr_t)dst % 64 == 0) reg = folds<true, true>(src, dst, bulk, reg);
    else reg = folds<true, false>(src, dst, bulk, reg);
    return serial(src + bulk, dst ? dst + bulk : nullptr, n - bulk, reg);
  }
#endif
  size_t lane = (n / 3) & ~(size_t)63;
  if (lane >= 4096) {
    bool stream = dst && ((uintptr_t)dst % 16 == 0) && (lane % 16 == 0);
    if (!dst) reg = lanes<false, false>(src, dst, lane, reg);
    else if (stream) reg = lanes<true, true>(src, dst, lane, reg);
    else reg = lanes<true, false>(src, dst, lane, reg);
    src += 3 * lane;
    if (dst) dst += 3 * lane;
    n -= 3 * lane;
  }
  return serial(src, dst, n, reg);
}

}  // namespace

extern "C" {

// crc32c of `n` bytes continuing from `crc`, copying them to `dst` (unless null) as it
// goes, by `path` (0: the fastest this build has, 1: three crc streams, 2: one).
uint32_t sdl_copy_crc32c(const uint8_t* src, uint8_t* dst, size_t n, uint32_t crc,
                         int path) {
  uint32_t reg = ~update(src, dst, n, ~crc, (Path)path);
#ifdef SDL_CRC_X86
  _mm_sfence();  // streaming stores are visible to other threads after this
#endif
  return reg;
}

// Read file bytes [0, n) of `fd`, checksumming all of them and copying bytes [lo, hi) to
// `dst`, through `bounce` (`piece` bytes, 64-byte aligned), then the 4 bytes after them
// into `*trailer` (the zarr crc32c codec's stored checksum). Returns 0, -1 where the
// file ended first, or -errno; `*crc` receives the crc32c of the n bytes.
int sdl_read_crc32c(int fd, size_t n, size_t lo, size_t hi, uint8_t* dst, uint8_t* bounce,
                    size_t piece, uint32_t* crc, uint32_t* trailer) {
  uint32_t reg = ~0u;
  for (size_t at = 0; at < n + 4;) {
    // The last piece takes the trailer too when it fits, saving a system call.
    size_t want = n - at <= piece - 4 ? n + 4 - at : (n - at < piece ? n - at : piece);
    size_t got = 0;
    while (got < want) {
      ssize_t r = pread(fd, bounce + got, want - got, (off_t)(at + got));
      if (r < 0) {
        if (errno == EINTR) continue;
        return -errno;
      }
      if (r == 0) return -1;
      got += (size_t)r;
    }
    size_t end = at + want < n ? at + want : n;  // the data in this piece: [at, end)
    if (at < n) {
      // [at, end) splits into a part before `lo`, a part inside, a part after `hi`.
      size_t in0 = at < lo ? (lo < end ? lo : end) : at;
      size_t in1 = end < hi ? end : (hi > in0 ? hi : in0);
      reg = update(bounce, nullptr, in0 - at, reg);
      if (in1 > in0) reg = update(bounce + (in0 - at), dst + (in0 - lo), in1 - in0, reg);
      reg = update(bounce + (in1 - at), nullptr, end - in1, reg);
    }
    if (at + want == n + 4) std::memcpy(trailer, bounce + (n - at), 4);  // little-endian
    at += want;
  }
#ifdef SDL_CRC_X86
  _mm_sfence();
#endif
  *crc = ~reg;
  return 0;
}

// How the crc is computed here: what `-march=native` made available.
const char* sdl_crc32c_kind() {
#if defined(SDL_CRC_FOLD)
  return "x86 crc32 + 512-bit carry-less folding";
#elif defined(SDL_CRC_X86)
  return "x86 SSE4.2 crc32, 3 streams";
#elif defined(SDL_CRC_TABLE)
  return "table (no crc instruction)";
#else
  return "ARMv8 crc32c, 3 streams";
#endif
}

}  // extern "C"
