// Decode kernels of bamba (x86): products of a few input rows by a large weight, each weight read once.
// Built at first use by bamba/kernels/__init__.py (torch.utils.cpp_extension.load) and called through
// ctypes: no PyTorch headers, so the build takes seconds. Each instruction set's kernels come from
// gemv_isa.h, compiled twice under `#pragma GCC target`; the caller picks one (`isa`: 2 AVX-512, 1 AVX2),
// so a machine runs every path it supports (the tests compare each with its PyTorch reference).
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifndef BAMBA_SEQ
#define BAMBA_SEQ 1  // one input row: one weight row at a time (dense_seq)
#endif
#ifndef BAMBA_PREFETCH
#define BAMBA_PREFETCH 1024  // bytes ahead that each weight row is prefetched (software, into L1)
#endif

namespace {

struct DenseArgs {
  const float* x;  // (M, K)
  const uint16_t* x16;  // (M, K) the same rows in bf16 (bf16 weights on the AVX512-BF16 path), else null
  const void* w;   // (N, K): float, bf16 (uint16) or int8
  const uint16_t* scales;  // (N,) bf16 per-row scales of int8 weights, else null
  const float* bias;  // (N,) or null
  float* y;  // (M, N)
  int64_t M, N, K;
};

struct Q8Args {
  const uint8_t* hu;  // (M, K) the input rows' high parts + 128
  const uint8_t* lu;  // (M, K) their low parts + 128
  const float* xscale;  // (M,) their scales
  const int8_t* w;  // (N, K)
  const uint16_t* scales;  // (N,) bf16
  const float* bias;  // (N,) or null
  float* y;  // (M, N)
  int64_t M, N, K;
};

struct Q4Args {
  const int8_t* xq;  // (M, K) the input rows quantized, one scale per block of 32
  const float* xs;   // (M, K / 32) those scales
  const float* xg;   // (M, K / group) per group: sum of the quantized inputs times their scales
  const uint8_t* w;  // (N / 64, K, 32) PyTorch's CPU int4 layout
  const uint16_t* sz;  // (K / group, N, 2) bf16 scale and zero
  const float* bias;   // (n_out,) or null
  float* y;            // (M, n_out)
  int64_t M, N, K, group, n_out;
};

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline float to_float(int8_t v) { return (float)v; }

// Blocks [0, nblocks) of work split evenly over nt OpenMP threads (PyTorch's own pool: the same libgomp).
template <typename F>
void parallel_blocks(int64_t nblocks, int nt, const F& f) {
  if (nt <= 1 || nblocks <= 1) {
    f(0, nblocks);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t b0 = nblocks * t / T, b1 = nblocks * (t + 1) / T;
    if (b0 < b1) f(b0, b1);
  }
}

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define BAMBA_VW 8
#include "gemv_isa.h"
#undef BAMBA_VW
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c")
namespace avx512 {
#define BAMBA_VW 16
#include "gemv_isa.h"
#undef BAMBA_VW
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace amx {
// bf16 weights by bf16 input rows with AMX tiles: C (16 weight rows x M) += A (16 weight rows x 32 k, read
// in place from the row-major weight) . B (the rows' 32 k as 16 pairs x M, packed once per call by
// pack_pairs). The pair products are exact and summed in fp32, as in `bf16_tile`; several times the
// throughput of AVX512-BF16 from 3 rows on, where the vector kernels stop keeping up with the memory.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// x (M, K) bf16 -> (K / 32, 16, M, 2): block kb, pair p, row m holds x[m, 32 kb + 2 p + (0, 1)]
static void pack_pairs(const uint16_t* x, int64_t M, int64_t K, uint16_t* xp) {
  for (int64_t kb = 0; kb < K / 32; kb++)
    for (int p = 0; p < 16; p++)
      for (int64_t m = 0; m < M; m++) {
        uint16_t* dst = xp + ((kb * 16 + p) * M + m) * 2;
        dst[0] = x[m * K + kb * 32 + 2 * p];
        dst[1] = x[m * K + kb * 32 + 2 * p + 1];
      }
}

// rows [n0, n1) of y (a multiple of 16 rows); M <= 16, K a multiple of 32
static void bf16_rows(const DenseArgs& a, const uint16_t* xp, int64_t n0, int64_t n1) {
  TileConfig cfg;
  const int M = (int)a.M;
  cfg.rows[0] = 16, cfg.colsb[0] = (uint16_t)(4 * M);  // tmm0: C, fp32
  cfg.rows[1] = 16, cfg.colsb[1] = 64;                 // tmm1: A, 16 rows of 32 bf16
  cfg.rows[2] = 16, cfg.colsb[2] = (uint16_t)(4 * M);  // tmm2: B, 16 pairs x M rows
  _tile_loadconfig(&cfg);
  alignas(64) float c[16 * 16];
  for (int64_t n = n0; n < n1; n += 16) {
    const uint16_t* w = (const uint16_t*)a.w + n * a.K;
    _tile_zero(0);
    for (int64_t k = 0; k < a.K; k += 32) {
      for (int r = 0; r < 16; r++) _mm_prefetch((const char*)(w + r * a.K + k) + BAMBA_PREFETCH, _MM_HINT_T0);
      _tile_loadd(1, w + k, a.K * 2);
      _tile_loadd(2, xp + k * M, 4 * M);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, c, 4 * M);
    for (int r = 0; r < 16; r++)
      for (int m = 0; m < M; m++) a.y[m * a.N + n + r] = c[r * M + m] + (a.bias ? a.bias[n + r] : 0.0f);
  }
  _tile_release();
}

// int8 weights by split input rows (see gemv_isa.h, split_rows) with AMX-INT8 tiles: Ch (16 weight rows x
// M) += A (16 weight rows x 64 k, s8, in place) . Bh (the rows' high parts + 128, u8, as 16 groups of 4 k x
// M); Cl the same with the low parts; Cs with ones (the weight rows' sums, for the shift). Exact int32
// sums, the same as the VNNI kernel's.
static void pack_quads(const uint8_t* xu, int64_t M, int64_t K, uint8_t* xp) {
  // xu (M, K) -> (K / 64, 16, M, 4): block kb, quad q, row m holds xu[m, 64 kb + 4 q + 0..3]
  for (int64_t kb = 0; kb < K / 64; kb++)
    for (int q = 0; q < 16; q++)
      for (int64_t m = 0; m < M; m++) std::memcpy(xp + ((kb * 16 + q) * M + m) * 4, xu + m * K + kb * 64 + 4 * q, 4);
}

static void q8_rows(const Q8Args& a, const uint8_t* hp, const uint8_t* lp, int64_t n0, int64_t n1) {
  TileConfig cfg;
  const int M = (int)a.M;
  for (int t : {0, 1, 4, 5}) cfg.rows[t] = 16, cfg.colsb[t] = (uint16_t)(4 * M);  // Ch, Cl; Bh, Bl
  cfg.rows[2] = 16, cfg.colsb[2] = 4;   // tmm2: Cs, the sums
  cfg.rows[3] = 16, cfg.colsb[3] = 64;  // tmm3: A, 16 rows of 64 int8
  cfg.rows[6] = 16, cfg.colsb[6] = 4;   // tmm6: ones
  _tile_loadconfig(&cfg);
  alignas(64) int32_t ch[16 * 16], cl[16 * 16], cs[16];
  alignas(64) const uint8_t ones[16 * 4] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                            1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                            1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  _tile_loadd(6, ones, 4);
  for (int64_t n = n0; n < n1; n += 16) {
    const int8_t* w = a.w + n * a.K;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t k = 0; k < a.K; k += 64) {
      for (int r = 0; r < 16; r++) _mm_prefetch((const char*)(w + r * a.K + k) + BAMBA_PREFETCH, _MM_HINT_T0);
      _tile_loadd(3, w + k, a.K);
      _tile_loadd(4, hp + k * M, 4 * M);
      _tile_loadd(5, lp + k * M, 4 * M);
      _tile_dpbsud(0, 3, 4);
      _tile_dpbsud(1, 3, 5);
      _tile_dpbsud(2, 3, 6);
    }
    _tile_stored(0, ch, 4 * M);
    _tile_stored(1, cl, 4 * M);
    _tile_stored(2, cs, 4);
    for (int r = 0; r < 16; r++) {
      const int32_t shift = 128 * cs[r];
      const float ws = bf16_to_float(a.scales[n + r]);
      for (int m = 0; m < M; m++) {
        const float dot = (float)(ch[r * M + m] - shift) + (float)(cl[r * M + m] - shift) * (1.0f / 254.0f);
        a.y[m * a.N + n + r] = dot * a.xscale[m] * ws + (a.bias ? a.bias[n + r] : 0.0f);
      }
    }
  }
  _tile_release();
}
}  // namespace amx
#pragma GCC pop_options

// Can this thread use AMX-BF16 and AMX-INT8 tiles? The CPU has them (CPUID 7.0 EDX bits 22, 24, 25) and Linux grants this
// process their state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; PyTorch's oneDNN asks too).
static bool amx_usable() {
  unsigned a, b, c, d;
  const unsigned bf16_tile_int8 = (1u << 22) | (1u << 24) | (1u << 25);
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (d & bf16_tile_int8) != bf16_tile_int8) return false;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512bf16,avx2,fma,f16c")
namespace avx512bf16 {
#define BAMBA_VW 16
#define BAMBA_BF16 1
#include "gemv_isa.h"
#undef BAMBA_BF16
#undef BAMBA_VW
}  // namespace avx512bf16
#pragma GCC pop_options

extern "C" {

// 4: 3 and AMX-BF16 and AMX-INT8 (Sapphire Rapids and later Xeons); 3: AVX-512 with VNNI, VBMI and BF16 (Zen 4 and
// later); 2: the same without BF16 (Ice Lake); 1: AVX2 with FMA; 0: none of these.
int bamba_isa(void) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi"))
    return __builtin_cpu_supports("avx512bf16") ? (amx_usable() ? 4 : 3) : 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
  return 0;
}

// y (M, N) = x (M, K) @ W.T (* scales per row) (+ bias); wtype 0 fp32, 1 bf16, 2 int8; x fp32, or bf16 (as
// uint16) with bf16 weights (x_bf16 = 1). Returns 0, or -1 for an unknown isa or wtype.
int bamba_dense(int isa, int wtype, const void* x, int x_bf16, int64_t M, int64_t K, const void* w, int64_t N,
                const uint16_t* scales, const float* bias, float* y, int nt) {
  if (x_bf16 && wtype != 1) return -1;
  std::vector<float> xf;
  if (x_bf16 && isa < 3) {  // the paths without bf16 products take the same rows in fp32 (exact)
    xf.resize(M * K);
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(((const uint16_t*)x)[i]);
  }
  const DenseArgs a{x_bf16 ? xf.data() : (const float*)x, x_bf16 ? (const uint16_t*)x : nullptr, w, scales, bias,
                    y, M, N, K};
  const int64_t nblocks = (N + 3) / 4;
  auto rows = [&](auto fn) {
    parallel_blocks(nblocks, nt, [&](int64_t b0, int64_t b1) { fn(a, 4 * b0, std::min(N, 4 * b1)); });
  };
  if (isa == 4 && x_bf16 && M >= 3 && M <= 16 && K % 32 == 0) {  // AMX: 16 rows at a time, the rest below
    std::vector<uint16_t> xp(M * K);
    amx::pack_pairs((const uint16_t*)x, M, K, xp.data());
    parallel_blocks(N / 16, nt, [&](int64_t b0, int64_t b1) { amx::bf16_rows(a, xp.data(), 16 * b0, 16 * b1); });
    if (N % 16) avx512bf16::bf16_rows(a, N - N % 16, N);
    return 0;
  }
  if (isa >= 3 && x_bf16) return rows(avx512bf16::bf16_rows), 0;
  if (isa >= 2 && wtype == 2 && K <= avx512::Q8_MAX_K) {  // int8 weights: the rows split in two int8 parts
    std::vector<uint8_t> parts(2 * M * K);
    std::vector<float> xscale(M);
    avx512::split_rows((const float*)x, M, K, parts.data(), parts.data() + M * K, xscale.data());
    const Q8Args q{parts.data(), parts.data() + M * K, xscale.data(), (const int8_t*)w, scales, bias, y, M, N, K};
    if (isa == 4 && M >= 3 && M <= 16 && K % 64 == 0) {  // AMX: 16 rows at a time, the rest below
      std::vector<uint8_t> hp(M * K), lp(M * K);
      amx::pack_quads(q.hu, M, K, hp.data());
      amx::pack_quads(q.lu, M, K, lp.data());
      parallel_blocks(N / 16, nt, [&](int64_t b0, int64_t b1) { amx::q8_rows(q, hp.data(), lp.data(), 16 * b0, 16 * b1); });
      if (N % 16) avx512::q8_rows(q, N - N % 16, N);
      return 0;
    }
    parallel_blocks(nblocks, nt, [&](int64_t b0, int64_t b1) { avx512::q8_rows(q, 4 * b0, std::min(N, 4 * b1)); });
    return 0;
  }
  if (isa >= 2 && isa <= 4) {
    if (wtype == 0) return rows(avx512::dense_rows<float>), 0;
    if (wtype == 1) return rows(avx512::dense_rows<uint16_t>), 0;
    if (wtype == 2) return rows(avx512::dense_rows<int8_t>), 0;
  } else if (isa == 1) {
    if (wtype == 0) return rows(avx2::dense_rows<float>), 0;
    if (wtype == 1) return rows(avx2::dense_rows<uint16_t>), 0;
    if (wtype == 2) return rows(avx2::dense_rows<int8_t>), 0;
  }
  return -1;
}

// y (M, n_out) = x (M, K) quantized per block of 32 @ dequantized int4 W[:n_out].T (+ bias); W (N / 64, K, 32)
// uint8 and sz (K / group, N, 2) bf16 as bamba.quantize stores them. Returns 0, -1 for an unknown isa, -2
// for shapes it cannot take (N % 64, K % group, group % 32).
int bamba_q4(int isa, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, const uint16_t* sz,
             int64_t group, const float* bias, float* y, int64_t n_out, int nt) {
  if (isa < 1 || isa > 4) return -1;
  if (N % 64 || group % 32 || group <= 0 || K % group || n_out > N) return -2;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M * (K / 32)), xg(M * (K / group));
  if (isa >= 2)
    avx512::quantize_blocks(x, M, K, group, xq.data(), xs.data(), xg.data());
  else
    avx2::quantize_blocks(x, M, K, group, xq.data(), xs.data(), xg.data());
  const Q4Args a{xq.data(), xs.data(), xg.data(), w, sz, bias, y, M, N, K, group, n_out};
  parallel_blocks(N / 64, nt, [&](int64_t b0, int64_t b1) {
    if (isa >= 2)
      avx512::q4_rows(a, b0, b1);
    else
      avx2::q4_rows(a, b0, b1);
  });
  return 0;
}

// The first n_out rows of the int4 weight W (N / 64, K, 32) with sz (K / group, N, 2), dequantized:
// out (n_out, K) fp32 = (q - 8) * scale + zero (bamba.quantize.dequantize_int4), for prompts. Tiles of 64
// rows by 16 inputs (512 bytes read, 64 rows of 64 bytes written). Returns 0, -2 for shapes it cannot take.
int bamba_q4_dequantize(const uint8_t* w, int64_t N, int64_t K, const uint16_t* sz, int64_t group, float* out,
                        int64_t n_out, int nt) {
  if (N % 64 || group % 32 || group <= 0 || K % group || n_out > N) return -2;
  parallel_blocks(N / 64, nt, [&](int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1; nb++)
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const uint8_t* p = w + (nb * K + k0) * 32;
        const int64_t gi = k0 / group;
        for (int j = 0; j < 64; j++) {
          const int64_t n = nb * 64 + j;
          if (n >= n_out) break;
          const float s = bf16_to_float(sz[(gi * N + n) * 2]), z = bf16_to_float(sz[(gi * N + n) * 2 + 1]);
          const int jj = j & 31, shift = (j >> 5) * 4;
          float* o = out + n * K + k0;
          for (int i = 0; i < 16; i++) o[i] = (float)(((p[i * 32 + jj] >> shift) & 15) - 8) * s + z;
        }
      }
  });
  return 0;
}

// Reads `bytes` bytes at p (64-byte aligned, a multiple of 64 * nt) on nt threads with AVX-512 or AVX2
// loads; returns a checksum (so the reads are not optimized away). The memory-bandwidth probe.
double bamba_read(int isa, const void* p, int64_t bytes, int nt) {
  std::vector<double> part(std::max(nt, 1), 0.0);
  const int64_t nblocks = bytes / 256;
  parallel_blocks(nblocks, nt, [&](int64_t b0, int64_t b1) {
    const float s = isa >= 2 ? avx512::read_sum((const char*)p + 256 * b0, 256 * (b1 - b0))
                             : avx2::read_sum((const char*)p + 256 * b0, 256 * (b1 - b0));
    part[omp_in_parallel() ? omp_get_thread_num() : 0] = s;
  });
  double total = 0.0;
  for (double v : part) total += v;
  return total;
}

}  // extern "C"
