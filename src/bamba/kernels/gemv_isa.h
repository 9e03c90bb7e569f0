// The decode kernels for one instruction set: gemv.cpp includes this file inside `namespace avx512` under
// `#pragma GCC target("avx512...")` and inside `namespace avx2` under `#pragma GCC target("avx2,fma")`,
// with BAMBA_VW = 16 or 8 floats per vector; and a third time, with BAMBA_BF16 = 1, for the one kernel that
// needs AVX512-BF16 (namespace avx512bf16).
//
// Every kernel computes rows [n0, n1) of y (M, N) = x (M, K) @ W.T for a few input rows M (decoding),
// reading each weight once from memory: the rows of x are re-read from L1 for each weight tile.
// Plain references in PyTorch: bamba/kernels/__init__.py.

#if !BAMBA_BF16
#if BAMBA_VW == 16
using vf = __m512;
using vi = __m512i;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf wload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf wload(const uint16_t* p) {  // bf16 -> fp32: the 16 bits on top of a zero half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline vf wload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
#else
using vf = __m256;
using vi = __m256i;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline vf wload(const float* p) { return _mm256_loadu_ps(p); }
static inline vf wload(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline vf wload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#endif
constexpr int VW = BAMBA_VW;

#if BAMBA_VW == 16
static inline vf vset1(float v) { return _mm512_set1_ps(v); }
static inline vf vabs(vf a) { return _mm512_abs_ps(a); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline float vmaxred(vf a) { return _mm512_reduce_max_ps(a); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline void vstore_i8(int8_t* p, vf q) {  // q holds integers in -127..127
  _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
}
static inline vi viload(const char* p) { return _mm512_load_si512(p); }
static inline vi viadd(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline int32_t visum(vi a) { return _mm512_reduce_add_epi32(a); }
#else
static inline vf vset1(float v) { return _mm256_set1_ps(v); }
static inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline float vmaxred(vf a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline void vstore_i8(int8_t* p, vf q) {
  const __m256i i32 = _mm256_cvtps_epi32(q);
  const __m256i i16 = _mm256_packs_epi32(i32, i32);  // per half: q0-3 q0-3 | q4-7 q4-7
  const __m256i i8 = _mm256_packs_epi16(i16, i16);
  const int32_t lo = _mm_cvtsi128_si32(_mm256_castsi256_si128(i8)), hi = _mm_cvtsi128_si32(_mm256_extracti128_si256(i8, 1));
  std::memcpy(p, &lo, 4);
  std::memcpy(p + 4, &hi, 4);
}
static inline vi viload(const char* p) { return _mm256_load_si256((const __m256i*)p); }
static inline vi viadd(vi a, vi b) { return _mm256_add_epi32(a, b); }
static inline int32_t visum(vi a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// The memory-bandwidth probe: the int32 sum of `bytes` bytes at p (64-byte aligned, a multiple of 256).
static int32_t read_sum(const char* p, int64_t bytes) {
  vi s0 = viload(p), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t i = 0; i < bytes; i += 4 * sizeof(vi)) {
    s0 = viadd(s0, viload(p + i));
    s1 = viadd(s1, viload(p + i + sizeof(vi)));
    s2 = viadd(s2, viload(p + i + 2 * sizeof(vi)));
    s3 = viadd(s3, viload(p + i + 3 * sizeof(vi)));
  }
  return visum(viadd(viadd(s0, s1), viadd(s2, s3)));
}

// Input rows quantized for the int4 kernel: per block of 32, scale = max |x| / 127 and q = round(x / scale)
// (half to even; an all-zero block has scale 0); per group, the sum of q * scale over its blocks.
static void quantize_blocks(const float* x, int64_t M, int64_t K, int64_t group, int8_t* xq, float* xs, float* xg) {
  const int64_t nblk = K / 32, per = group / 32;
  for (int64_t m = 0; m < M; m++)
    for (int64_t b = 0; b < nblk; b++) {
      const float* xb = x + m * K + b * 32;
      int8_t* qb = xq + m * K + b * 32;
      vf mx = vzero();
      for (int i = 0; i < 32; i += VW) mx = vmax(mx, vabs(vload(xb + i)));
      const float s = vmaxred(mx) / 127.0f;
      float qsum = 0.0f;
      if (s > 0.0f) {
        const vf sv = vset1(s);
        vf qs = vzero();
        for (int i = 0; i < 32; i += VW) {
          const vf q = vround(vdiv(vload(xb + i), sv));
          qs = vadd(qs, q);
          vstore_i8(qb + i, q);
        }
        qsum = vsum(qs);  // exact: integers below 2^24
      } else {
        std::memset(qb, 0, 32);
      }
      xs[m * nblk + b] = s;
      float& g = xg[m * (K / group) + b / per];
      g = (b % per ? g : 0.0f) + s * qsum;
    }
}

// ----- dense weights: fp32, bf16 (as uint16) or int8 (times a per-row scale), row-major (N, K) -----------
// One tile: R weight rows by MC input rows; out[m * R + r] = sum_k x[m, k] w[r, k].
template <typename WT, int R, int MC>
static inline void dense_tile(const float* x, int64_t K, const WT* w, float* out) {
  vf acc[MC][R];
  for (int m = 0; m < MC; m++)
    for (int r = 0; r < R; r++) acc[m][r] = vzero();
  const int64_t kv = K - K % VW;
  constexpr int64_t line = 64 / sizeof(WT);  // weights per cache line: one prefetch per row and line
  for (int64_t k = 0; k < kv; k += VW) {
    if (k % line == 0)
      for (int r = 0; r < R; r++) _mm_prefetch((const char*)(w + r * K + k) + BAMBA_PREFETCH, _MM_HINT_T0);
    vf wv[R];
    for (int r = 0; r < R; r++) wv[r] = wload(w + r * K + k);
    for (int m = 0; m < MC; m++) {
      const vf xv = vload(x + m * K + k);
      for (int r = 0; r < R; r++) acc[m][r] = vfma(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MC; m++)
    for (int r = 0; r < R; r++) {
      float s = vsum(acc[m][r]);
      for (int64_t k = kv; k < K; k++) s += x[m * K + k] * to_float(w[r * K + k]);
      out[m * R + r] = s;
    }
}

template <typename WT, int R>
static void dense_rows_r(const DenseArgs& a, int64_t n) {
  float out[4 * R];
  const WT* w = (const WT*)a.w + n * a.K;
  for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
    const float* x = a.x + m0 * a.K;
    const int mc = (int)std::min<int64_t>(4, a.M - m0);
    switch (mc) {
      case 4: dense_tile<WT, R, 4>(x, a.K, w, out); break;
      case 3: dense_tile<WT, R, 3>(x, a.K, w, out); break;
      case 2: dense_tile<WT, R, 2>(x, a.K, w, out); break;
      default: dense_tile<WT, R, 1>(x, a.K, w, out); break;
    }
    for (int m = 0; m < mc; m++)
      for (int r = 0; r < R; r++) {
        float v = out[m * R + r];
        if (a.scales) v *= bf16_to_float(a.scales[n + r]);
        if (a.bias) v += a.bias[n + r];
        a.y[(m0 + m) * a.N + n + r] = v;
      }
  }
}

// One input row: each weight row read start to end (one sequential stream), four sums in flight.
template <typename WT>
static void dense_seq(const DenseArgs& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K, kv = K - K % (4 * VW);
  constexpr int64_t line = 64 / sizeof(WT);
  for (int64_t n = n0; n < n1; n++) {
    const WT* w = (const WT*)a.w + n * K;
    vf acc[4] = {vzero(), vzero(), vzero(), vzero()};
    for (int64_t k = 0; k < kv; k += 4 * VW) {
      for (int64_t j = 0; j < 4 * VW; j += line) _mm_prefetch((const char*)(w + k + j) + BAMBA_PREFETCH, _MM_HINT_T0);
      for (int u = 0; u < 4; u++) acc[u] = vfma(wload(w + k + u * VW), vload(a.x + k + u * VW), acc[u]);
    }
    float s = vsum(vadd(vadd(acc[0], acc[1]), vadd(acc[2], acc[3])));
    for (int64_t k = kv; k < K; k++) s += a.x[k] * to_float(w[k]);
    if (a.scales) s *= bf16_to_float(a.scales[n]);
    a.y[n] = s + (a.bias ? a.bias[n] : 0.0f);
  }
}

template <typename WT>
static void dense_rows(const DenseArgs& a, int64_t n0, int64_t n1) {
  if (a.M == 1 && BAMBA_SEQ) return dense_seq<WT>(a, n0, n1);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) dense_rows_r<WT, 4>(a, n);
  for (; n < n1; n++) dense_rows_r<WT, 1>(a, n);
}

#if BAMBA_VW == 16
// ----- int8 weights by input rows in two int8 parts (AVX-512 VNNI) -----------------------------------------
// Each input row x is split as x ~ s (h + l / 254), s = max |x| / 127, h = round(x / s), l = round(254 (x / s - h)),
// both in -127..127 (error at most s / 508: about 1.5e-5 of the row's largest value). With u8 = part + 128,
// sum_k part[k] w[n, k] = sum_k u8[k] w[n, k] - 128 sum_k w[n, k], all exact in int32 (K <= Q8_MAX_K): three
// u8 x s8 dot products (VNNI) per 64 weights at one row, against 12 instructions converting them to fp32.
constexpr int64_t Q8_MAX_K = 65536;  // 255 * 127 * K stays below 2^31

static void split_rows(const float* x, int64_t M, int64_t K, uint8_t* hu, uint8_t* lu, float* scale) {
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * K;
    __m512 mx = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
    float amax = _mm512_reduce_max_ps(mx);
    for (; k < K; k++) amax = std::max(amax, std::fabs(xr[k]));
    const float s = amax / 127.0f;
    scale[m] = s;
    const __m512 sv = _mm512_set1_ps(s > 0.0f ? s : 1.0f), c254 = _mm512_set1_ps(254.0f);
    const __m512i c128 = _mm512_set1_epi32(128);
    for (k = 0; k < K; k += 16) {
      const __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
      const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, xr + k), sv);
      const __m512 h = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, h), c254),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_mask_storeu_epi8(hu + m * K + k, mk, _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(h), c128)));
      _mm_mask_storeu_epi8(lu + m * K + k, mk, _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(l), c128)));
    }
  }
}

// R weight rows by MC split input rows: out[m * R + r] = sum_k (h + l / 254)[m, k] w[r, k] (unscaled)
template <int R, int MC>
static inline void q8_tile(const uint8_t* hu, const uint8_t* lu, int64_t K, const int8_t* w, float* out) {
  __m512i ah[MC][R], al[MC][R], aw[R];
  for (int r = 0; r < R; r++) {
    aw[r] = _mm512_setzero_si512();
    for (int m = 0; m < MC; m++) ah[m][r] = al[m][r] = _mm512_setzero_si512();
  }
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mk = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
    __m512i wv[R];
    for (int r = 0; r < R; r++) {
      _mm_prefetch((const char*)(w + r * K + k) + BAMBA_PREFETCH, _MM_HINT_T0);
      wv[r] = _mm512_maskz_loadu_epi8(mk, w + r * K + k);
      aw[r] = _mm512_dpbusd_epi32(aw[r], ones, wv[r]);
    }
    for (int m = 0; m < MC; m++) {
      const __m512i h = _mm512_maskz_loadu_epi8(mk, hu + m * K + k), l = _mm512_maskz_loadu_epi8(mk, lu + m * K + k);
      for (int r = 0; r < R; r++) {
        ah[m][r] = _mm512_dpbusd_epi32(ah[m][r], h, wv[r]);
        al[m][r] = _mm512_dpbusd_epi32(al[m][r], l, wv[r]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    const int32_t shift = 128 * _mm512_reduce_add_epi32(aw[r]);
    for (int m = 0; m < MC; m++) {
      const float hs = (float)(_mm512_reduce_add_epi32(ah[m][r]) - shift);
      const float ls = (float)(_mm512_reduce_add_epi32(al[m][r]) - shift);
      out[m * R + r] = hs + ls * (1.0f / 254.0f);
    }
  }
}

template <int R>
static void q8_rows_r(const Q8Args& a, int64_t n) {
  float out[2 * R];
  const int8_t* w = a.w + n * a.K;
  for (int64_t m0 = 0; m0 < a.M; m0 += 2) {
    const int mc = (int)std::min<int64_t>(2, a.M - m0);
    if (mc == 2)
      q8_tile<R, 2>(a.hu + m0 * a.K, a.lu + m0 * a.K, a.K, w, out);
    else
      q8_tile<R, 1>(a.hu + m0 * a.K, a.lu + m0 * a.K, a.K, w, out);
    for (int m = 0; m < mc; m++)
      for (int r = 0; r < R; r++) {
        const float v = out[m * R + r] * a.xscale[m0 + m] * bf16_to_float(a.scales[n + r]);
        a.y[(m0 + m) * a.N + n + r] = v + (a.bias ? a.bias[n + r] : 0.0f);
      }
  }
}

static void q8_rows(const Q8Args& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) q8_rows_r<4>(a, n);
  for (; n < n1; n++) q8_rows_r<1>(a, n);
}
#endif

// ----- int4 weights in PyTorch's CPU layout by int8-quantized input rows ---------------------------------
// Weights: uint8 (N / 64, K, 32), byte [nb, k, j] = q[64 nb + j, k] | q[64 nb + 32 + j, k] << 4 (q 0..15);
// scales_and_zeros (K / g, N, 2) bf16, w[n, k] = (q[n, k] - 8) * scale[k / g, n] + zero[k / g, n].
// Input rows: xq int8 (M, K), one scale per block of 32 (xs (M, K / 32)), and per group the sum of the
// quantized row's values, xg (M, K / g) = sum_k xq[k] * xs[k / 32]. For one block of 64 outputs:
//   y[n] = sum_groups scale[n] * sum_blocks xs * (sum_k xq[k] q[n, k]) + (zero[n] - 8 scale[n]) * xg,
// the inner sums exact in int32 (VNNI u8 x s8 dot products on AVX-512, maddubs + madd on AVX2).
constexpr int Q4_MC = BAMBA_VW == 16 ? 2 : 1;  // input rows per pass over the weights (sums in registers)

#if BAMBA_VW == 16
// 64 outputs x 4 inputs (k..k+3: 128 bytes) as 4 vectors of u8: lane n (dword) = q[n, k..k+3]
static inline void q4_unpack(const uint8_t* p, const vi idx0, const vi idx1, vi q[4]) {
  const vi a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 64);  // (k, k+1), (k+2, k+3)
  const vi lo4 = _mm512_set1_epi8(0x0F);
  const vi t0 = _mm512_permutex2var_epi8(a, idx0, b), t1 = _mm512_permutex2var_epi8(a, idx1, b);
  q[0] = _mm512_and_si512(t0, lo4);
  q[1] = _mm512_and_si512(t1, lo4);
  q[2] = _mm512_and_si512(_mm512_srli_epi16(t0, 4), lo4);
  q[3] = _mm512_and_si512(_mm512_srli_epi16(t1, 4), lo4);
}
static inline vi q4_dot(vi acc, vi q, vi x) { return _mm512_dpbusd_epi32(acc, q, x); }
static inline vi vizero() { return _mm512_setzero_si512(); }
static inline vi viset1(int32_t v) { return _mm512_set1_epi32(v); }
static inline vf vcvt(vi v) { return _mm512_cvtepi32_ps(v); }
// the scales and zeros of 16 outputs: 16 dwords of (scale, zero) bf16 pairs
static inline void q4_sz(const uint16_t* p, vf& s, vf& z) {
  const vi v = _mm512_loadu_si512(p);
  s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000)));
}
#else
// AVX2: the same 4 x 64 bytes as 8 vectors of 8 outputs, in the order j = 0-3|16-19, 4-7|20-23, 8-11|24-27,
// 12-15|28-31 (the unpacks work within 128-bit halves), low nibbles then high ones; q4_rows reorders
static inline void q4_unpack(const uint8_t* p, vi q[8]) {
  const vi a0 = _mm256_loadu_si256((const vi*)p), a1 = _mm256_loadu_si256((const vi*)(p + 32));
  const vi a2 = _mm256_loadu_si256((const vi*)(p + 64)), a3 = _mm256_loadu_si256((const vi*)(p + 96));
  const vi t0 = _mm256_unpacklo_epi8(a0, a1), t1 = _mm256_unpackhi_epi8(a0, a1);
  const vi t2 = _mm256_unpacklo_epi8(a2, a3), t3 = _mm256_unpackhi_epi8(a2, a3);
  const vi u[4] = {_mm256_unpacklo_epi16(t0, t2), _mm256_unpackhi_epi16(t0, t2), _mm256_unpacklo_epi16(t1, t3),
                   _mm256_unpackhi_epi16(t1, t3)};
  const vi lo4 = _mm256_set1_epi8(0x0F);
  for (int i = 0; i < 4; i++) {
    q[i] = _mm256_and_si256(u[i], lo4);
    q[4 + i] = _mm256_and_si256(_mm256_srli_epi16(u[i], 4), lo4);
  }
}
static inline vi q4_dot(vi acc, vi q, vi x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1)));
}
static inline vi vizero() { return _mm256_setzero_si256(); }
static inline vi viset1(int32_t v) { return _mm256_set1_epi32(v); }
static inline vf vcvt(vi v) { return _mm256_cvtepi32_ps(v); }
static inline void q4_sz(const uint16_t* p, vf& s, vf& z) {
  const vi v = _mm256_loadu_si256((const vi*)p);
  s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)));
}
#endif
constexpr int Q4_V = 64 / VW;  // vectors per block of 64 outputs

// One block of 64 outputs (nb) for MC input rows starting at row m0: adds each group's share to acc
// (MC x 64 floats, in natural output order).
template <int MC>
static inline void q4_block(const Q4Args& a, int64_t nb, int64_t m0, float* acc) {
  const int64_t K = a.K, g = a.group, nblk = K / 32, ngrp = K / g;
  const uint8_t* wb = a.w + nb * K * 32;
#if BAMBA_VW == 16
  alignas(64) uint8_t i0[64], i1[64];
  for (int j = 0; j < 16; j++)
    for (int i = 0; i < 2; i++)
      for (int h = 0; h < 2; h++) {  // byte 4j + 2i + h of lane j: k + 2i + h, from a (i = 0) or b (i = 1)
        i0[4 * j + 2 * i + h] = (uint8_t)(64 * i + 32 * h + j);
        i1[4 * j + 2 * i + h] = (uint8_t)(64 * i + 32 * h + 16 + j);
      }
  const vi idx0 = _mm512_load_si512(i0), idx1 = _mm512_load_si512(i1);
#endif
  for (int64_t gi = 0; gi < ngrp; gi++) {
    vf fsum[MC][Q4_V];
    for (int m = 0; m < MC; m++)
      for (int v = 0; v < Q4_V; v++) fsum[m][v] = vzero();
    for (int64_t b = gi * g / 32; b < (gi + 1) * g / 32; b++) {
      vi isum[MC][Q4_V];
      for (int m = 0; m < MC; m++)
        for (int v = 0; v < Q4_V; v++) isum[m][v] = vizero();
      for (int64_t k = b * 32; k < b * 32 + 32; k += 4) {
        _mm_prefetch((const char*)(wb + k * 32) + BAMBA_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char*)(wb + k * 32) + BAMBA_PREFETCH + 64, _MM_HINT_T0);
        vi q[Q4_V];
#if BAMBA_VW == 16
        q4_unpack(wb + k * 32, idx0, idx1, q);
#else
        q4_unpack(wb + k * 32, q);
#endif
        for (int m = 0; m < MC; m++) {
          int32_t xv;
          std::memcpy(&xv, a.xq + (m0 + m) * K + k, 4);
          const vi xb = viset1(xv);
          for (int v = 0; v < Q4_V; v++) isum[m][v] = q4_dot(isum[m][v], q[v], xb);
        }
      }
      for (int m = 0; m < MC; m++) {
        const vf xs = vset1(a.xs[(m0 + m) * nblk + b]);
        for (int v = 0; v < Q4_V; v++) fsum[m][v] = vfma(vcvt(isum[m][v]), xs, fsum[m][v]);
      }
    }
    const uint16_t* sz = a.sz + (gi * a.N + nb * 64) * 2;
    for (int v = 0; v < Q4_V; v++) {
      vf s, z;
#if BAMBA_VW == 16
      q4_sz(sz + v * 32, s, z);
#else  // vector v holds outputs base(v) + 0..3 and base(v) + 16..19 (see q4_unpack)
      const int base = (v % 4) * 4 + (v / 4) * 32;
      alignas(32) uint32_t tmp[8];
      for (int i = 0; i < 8; i++) std::memcpy(&tmp[i], sz + 2 * (base + i % 4 + 16 * (i / 4)), 4);
      q4_sz((const uint16_t*)tmp, s, z);
#endif
      const vf zc = vfma(s, vset1(-8.0f), z);  // zero - 8 scale: the term of the sum of the inputs
      for (int m = 0; m < MC; m++) {
        float* out = acc + m * 64 + v * VW;
        const vf xg = vset1(a.xg[(m0 + m) * ngrp + gi]);
#if BAMBA_VW == 16
        _mm512_storeu_ps(out, vfma(s, fsum[m][v], vfma(zc, xg, vload(out))));
#else
        _mm256_storeu_ps(out, vfma(s, fsum[m][v], vfma(zc, xg, vload(out))));
#endif
      }
    }
  }
}

static void q4_rows(const Q4Args& a, int64_t nb0, int64_t nb1) {
  alignas(64) float acc[Q4_MC * 64];
  for (int64_t nb = nb0; nb < nb1; nb++) {
    for (int64_t m0 = 0; m0 < a.M; m0 += Q4_MC) {
      const int mc = (int)std::min<int64_t>(Q4_MC, a.M - m0);
      std::memset(acc, 0, sizeof(acc));
      if (mc == 2)
        q4_block<2>(a, nb, m0, acc);
      else
        q4_block<1>(a, nb, m0, acc);
      for (int m = 0; m < mc; m++)
        for (int i = 0; i < 64; i++) {
#if BAMBA_VW == 16
          const int n = i;
#else  // acc position i = 8 v + l holds output base(v) + l % 4 + 16 (l / 4)
          const int v = i / 8, l = i % 8, n = (v % 4) * 4 + (v / 4) * 32 + l % 4 + 16 * (l / 4);
#endif
          const int64_t col = nb * 64 + n;
          if (col < a.n_out) a.y[(m0 + m) * a.n_out + col] = acc[m * 64 + i] + (a.bias ? a.bias[col] : 0.0f);
        }
    }
  }
}

#else  // BAMBA_BF16: only the kernel that needs AVX512-BF16
// bf16 weights by bf16 input rows (AVX512-BF16): pairs of bf16 products summed into fp32 lanes, the
// products exact, as `dense_tile` computes them from the same bf16 values.
template <int R, int MC>
static inline void bf16_tile(const uint16_t* x, int64_t K, const uint16_t* w, float* out) {
  __m512 acc[MC][R];
  for (int m = 0; m < MC; m++)
    for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
  const int64_t kv = K - K % 32;
  for (int64_t k = 0; k < kv; k += 32) {
    __m512i wv[R];
    for (int r = 0; r < R; r++) {
      _mm_prefetch((const char*)(w + r * K + k) + BAMBA_PREFETCH, _MM_HINT_T0);
      wv[r] = _mm512_loadu_si512(w + r * K + k);
    }
    for (int m = 0; m < MC; m++) {
      const __m512i xv = _mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  for (int m = 0; m < MC; m++)
    for (int r = 0; r < R; r++) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      for (int64_t k = kv; k < K; k++) s += bf16_to_float(x[m * K + k]) * bf16_to_float(w[r * K + k]);
      out[m * R + r] = s;
    }
}

template <int R>
static void bf16_rows_r(const DenseArgs& a, int64_t n) {
  float out[4 * R];
  const uint16_t* w = (const uint16_t*)a.w + n * a.K;
  for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
    const uint16_t* x = a.x16 + m0 * a.K;
    const int mc = (int)std::min<int64_t>(4, a.M - m0);
    switch (mc) {
      case 4: bf16_tile<R, 4>(x, a.K, w, out); break;
      case 3: bf16_tile<R, 3>(x, a.K, w, out); break;
      case 2: bf16_tile<R, 2>(x, a.K, w, out); break;
      default: bf16_tile<R, 1>(x, a.K, w, out); break;
    }
    for (int m = 0; m < mc; m++)
      for (int r = 0; r < R; r++) a.y[(m0 + m) * a.N + n + r] = out[m * R + r] + (a.bias ? a.bias[n + r] : 0.0f);
  }
}

static void bf16_seq(const DenseArgs& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K, kv = K - K % 128;
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t* w = (const uint16_t*)a.w + n * K;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < kv; k += 128) {
      for (int u = 0; u < 4; u++) {
        _mm_prefetch((const char*)(w + k + 32 * u) + BAMBA_PREFETCH, _MM_HINT_T0);
        acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_loadu_si512(w + k + 32 * u),
                                  (__m512bh)_mm512_loadu_si512(a.x16 + k + 32 * u));
      }
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    for (int64_t k = kv; k < K; k++) s += bf16_to_float(a.x16[k]) * bf16_to_float(w[k]);
    a.y[n] = s + (a.bias ? a.bias[n] : 0.0f);
  }
}

static void bf16_rows(const DenseArgs& a, int64_t n0, int64_t n1) {
  if (a.M == 1 && BAMBA_SEQ) return bf16_seq(a, n0, n1);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) bf16_rows_r<4>(a, n);
  for (; n < n1; n++) bf16_rows_r<1>(a, n);
}
#endif
