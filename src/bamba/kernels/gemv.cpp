// Decode kernels of bamba (x86): products of a few input rows by a large weight, each weight read once.
// Built at first use by bamba/kernels/__init__.py (torch.utils.cpp_extension.load) and called through
// ctypes: no PyTorch headers, so the build takes seconds. Each instruction set's kernels come from
// gemv_isa.h, compiled twice under `#pragma GCC target`; the caller picks one (`isa`: 2 AVX-512, 1 AVX2),
// so a machine runs every path it supports (the tests compare each with its PyTorch reference).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// 3: AVX-512 with VNNI, VBMI and BF16 (Sapphire Rapids, Zen 4 and later); 2: the same without BF16 (Ice
// Lake); 1: AVX2 with FMA; 0: none of these.
int bamba_isa(void) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi"))
    return __builtin_cpu_supports("avx512bf16") ? 3 : 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
  return 0;
}

// y (M, N) = x (M, K) @ W.T (* scales per row) (+ bias); wtype 0 fp32, 1 bf16, 2 int8; x fp32, or bf16 (as
// uint16) with bf16 weights (x_bf16 = 1). Returns 0, or -1 for an unknown isa or wtype.
int bamba_dense(int isa, int wtype, const void* x, int x_bf16, int64_t M, int64_t K, const void* w, int64_t N,
                const uint16_t* scales, const float* bias, float* y, int nt) {
  if (x_bf16 && wtype != 1) return -1;
  std::vector<float> xf;
  if (x_bf16 && isa != 3) {  // the paths without bf16 products take the same rows in fp32 (exact)
    xf.resize(M * K);
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(((const uint16_t*)x)[i]);
  }
  const DenseArgs a{x_bf16 ? xf.data() : (const float*)x, x_bf16 ? (const uint16_t*)x : nullptr, w, scales, bias,
                    y, M, N, K};
  const int64_t nblocks = (N + 3) / 4;
  auto rows = [&](auto fn) {
    parallel_blocks(nblocks, nt, [&](int64_t b0, int64_t b1) { fn(a, 4 * b0, std::min(N, 4 * b1)); });
  };
  if (isa == 3 && x_bf16) return rows(avx512bf16::bf16_rows), 0;
  if (isa >= 2 && wtype == 2 && K <= avx512::Q8_MAX_K) {  // int8 weights: the rows split in two int8 parts
    std::vector<uint8_t> parts(2 * M * K);
    std::vector<float> xscale(M);
    avx512::split_rows((const float*)x, M, K, parts.data(), parts.data() + M * K, xscale.data());
    const Q8Args q{parts.data(), parts.data() + M * K, xscale.data(), (const int8_t*)w, scales, bias, y, M, N, K};
    parallel_blocks(nblocks, nt, [&](int64_t b0, int64_t b1) { avx512::q8_rows(q, 4 * b0, std::min(N, 4 * b1)); });
    return 0;
  }
  if (isa == 2 || isa == 3) {
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
  if (isa < 1 || isa > 3) return -1;
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
