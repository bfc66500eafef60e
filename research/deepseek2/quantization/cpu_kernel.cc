// Weight-quantized matrix products on CPU, for MindSpore Custom ops (func_type "aot"; see cpu_kernel.py).
//
// Why hand-written: MindSpore's CPU backend has no int8-weight matmul; from basic ops a quantized weight is first
// dequantized into a float copy (a full extra pass over memory, and the copy's size again), which is what bounds
// CPU decoding, a memory-bound product. Here each weight byte is read once, widened in registers and multiplied
// into float32 accumulators.
//
// Layouts (research/deepseek2/quantization/rtn.py):
//   x      (T, K) float32 activations
//   q      int8 (N, K), or int4 packed along the output channels (N/2, K): byte [j, k] holds channel 2j in its low
//          nibble and 2j + 1 in its high nibble (two's complement)
//   scale  (N, groups) float32; a group is K / groups consecutive inputs of one channel
//   y      (T, N) float32 = x (q * scale)^T
// The gathered product takes stacked experts q (E, N, K) / (E, N/2, K), scale (E, N, groups) and index (T,) int32:
// row t uses expert index[t]. Rows are grouped by expert first, so an expert's weights are read once for all of its
// rows (a prefill chunk), and only the experts named are read (a decode step).
//
// Work is split over output channels (blocks of 8, i.e. 4 packed rows for int4) by OpenMP; sums are accumulated per
// group in float32, group sums scaled and added in float32 (a float32 dot product of another order than MatMul's:
// results agree to rounding, not bit for bit).
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DS2_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 8;  // output channels per work item

#ifdef DS2_AVX2
inline float hsum(__m256 a) {
  __m128 lo = _mm256_castps256_ps128(a), hi = _mm256_extractf128_ps(a, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}
inline __m256i widen8(const int8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
// 8 bfloat16 (their bits) -> 8 float32: a bfloat16 is the high half of the float32 of the same value, exactly.
inline __m256 widen8_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#endif

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// y[t, c] for channels [c0, c0 + 4) of a bfloat16 weight (N, K), all K inputs.
inline void dot4_bf16(const float* x, const uint16_t* w, int64_t K, float out[4]) {
  int64_t k = 0;
#ifdef DS2_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(widen8_bf16(w + k), xv, a0);
    a1 = _mm256_fmadd_ps(widen8_bf16(w + K + k), xv, a1);
    a2 = _mm256_fmadd_ps(widen8_bf16(w + 2 * K + k), xv, a2);
    a3 = _mm256_fmadd_ps(widen8_bf16(w + 3 * K + k), xv, a3);
  }
  out[0] = hsum(a0); out[1] = hsum(a1); out[2] = hsum(a2); out[3] = hsum(a3);
#else
  out[0] = out[1] = out[2] = out[3] = 0.f;
#endif
  for (; k < K; ++k)
    for (int r = 0; r < 4; ++r) out[r] += x[k] * bf16_to_float(w[r * K + k]);
}

// y[t, c] for channels [c0, c0 + 4) of an int8 weight, one group [k0, k1) of inputs, 4 rows at once.
inline void dot4_int8(const float* x, const int8_t* w, int64_t K, int64_t k0, int64_t k1, float out[4]) {
#ifdef DS2_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    __m256 xv = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(widen8(w + k)), xv, a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(widen8(w + K + k)), xv, a1);
    a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(widen8(w + 2 * K + k)), xv, a2);
    a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(widen8(w + 3 * K + k)), xv, a3);
  }
  out[0] = hsum(a0); out[1] = hsum(a1); out[2] = hsum(a2); out[3] = hsum(a3);
#else
  int64_t k = k0;
  out[0] = out[1] = out[2] = out[3] = 0.f;
#endif
  for (; k < k1; ++k)
    for (int r = 0; r < 4; ++r) out[r] += x[k] * w[r * K + k];
}

// Channels [2j, 2j + 8) of an int4 weight: 4 packed rows -> 8 channel sums over inputs [k0, k1).
inline void dot8_int4(const float* x, const int8_t* w, int64_t K, int64_t k0, int64_t k1, float out[8]) {
  int64_t k = k0;
#ifdef DS2_AVX2
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  for (; k + 8 <= k1; k += 8) {
    __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < 4; ++r) {
      __m256i v = widen8(w + r * K + k);                         // sign-extended bytes
      __m256i lo = _mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28);
      __m256i hi = _mm256_srai_epi32(v, 4);
      acc[2 * r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), xv, acc[2 * r]);
      acc[2 * r + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), xv, acc[2 * r + 1]);
    }
  }
  for (int r = 0; r < 8; ++r) out[r] = hsum(acc[r]);
#else
  for (int r = 0; r < 8; ++r) out[r] = 0.f;
#endif
  for (; k < k1; ++k)
    for (int r = 0; r < 4; ++r) {
      int v = w[r * K + k];
      int lo = (v << 28) >> 28, hi = v >> 4;
      out[2 * r] += x[k] * lo;
      out[2 * r + 1] += x[k] * hi;
    }
}

// y[row, c0 .. c0 + kBlock) for the rows listed, against one weight (N or N/2 rows of K) and its scales (N, G).
void block(const float* x, const int64_t* rows, int64_t nrows, const int8_t* q, const float* scale, float* y,
           int64_t N, int64_t K, int64_t groups, int bits, int64_t c0) {
  const int64_t width = K / groups, c1 = c0 + kBlock < N ? c0 + kBlock : N;
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t t = rows ? rows[i] : i;
    const float* xt = x + t * K;
    float total[kBlock] = {0.f};
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * width, k1 = k0 + width;
      if (bits == 8) {
        for (int64_t c = c0; c < c1; c += 4) {
          float part[4];
          if (c + 4 <= c1) {
            dot4_int8(xt, q + c * K, K, k0, k1, part);
          } else {                                               // fewer than 4 channels left
            for (int64_t r = 0; r < c1 - c; ++r) {
              float s = 0.f;
              for (int64_t k = k0; k < k1; ++k) s += xt[k] * q[(c + r) * K + k];
              part[r] = s;
            }
          }
          for (int64_t r = 0; r < 4 && c + r < c1; ++r) total[c + r - c0] += part[r] * scale[(c + r) * groups + g];
        }
      } else {                                                   // c0, c1 even: whole packed rows
        float part[8];
        const int64_t packed = (c1 - c0) / 2;
        if (packed == 4) {
          dot8_int4(xt, q + (c0 / 2) * K, K, k0, k1, part);
        } else {
          for (int64_t r = 0; r < packed; ++r) {
            float lo_sum = 0.f, hi_sum = 0.f;
            for (int64_t k = k0; k < k1; ++k) {
              int v = q[(c0 / 2 + r) * K + k];
              lo_sum += xt[k] * ((v << 28) >> 28);
              hi_sum += xt[k] * (v >> 4);
            }
            part[2 * r] = lo_sum;
            part[2 * r + 1] = hi_sum;
          }
        }
        for (int64_t r = 0; r < c1 - c0; ++r) total[r] += part[r] * scale[(c0 + r) * groups + g];
      }
    }
    std::memcpy(y + t * N + c0, total, sizeof(float) * (c1 - c0));
  }
}

}  // namespace

// y (T, N) = x (T, K) (q * scale)^T.   params: x, q, scale, y
extern "C" int WeightQuantMatmul(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                                 void* stream, void* extra) {
  if (nparam != 4) return 1;
  const float* x = static_cast<const float*>(params[0]);
  const int8_t* q = static_cast<const int8_t*>(params[1]);
  const float* scale = static_cast<const float*>(params[2]);
  float* y = static_cast<float*>(params[3]);
  const int64_t T = shapes[0][0], K = shapes[0][1], N = shapes[2][0], groups = shapes[2][1];
  const int bits = shapes[1][0] == N ? 8 : 4;                   // int4: N/2 packed rows
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) block(x, nullptr, T, q, scale, y, N, K, groups, bits, b * kBlock);
  return 0;
}

// y (T, N): row t = x[t] (q[index[t]] * scale[index[t]])^T.   params: x, q (E, .., K), scale (E, N, G), index, y
extern "C" int GatheredWeightQuantMatmul(int nparam, void** params, int* ndims, int64_t** shapes,
                                         const char** dtypes, void* stream, void* extra) {
  if (nparam != 5) return 1;
  const float* x = static_cast<const float*>(params[0]);
  const int8_t* q = static_cast<const int8_t*>(params[1]);
  const float* scale = static_cast<const float*>(params[2]);
  const int32_t* index = static_cast<const int32_t*>(params[3]);
  float* y = static_cast<float*>(params[4]);
  const int64_t T = shapes[0][0], K = shapes[0][1], E = shapes[1][0], N = shapes[2][1], groups = shapes[2][2];
  const int bits = shapes[1][1] == N ? 8 : 4;
  const int64_t q_rows = shapes[1][1];
  // rows grouped by expert (counting sort): each expert's weights are read once for all of its rows
  std::vector<int64_t> start(E + 1, 0), order(T);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t e = index[t];
    if (e < 0 || e >= E) return 2;
    ++start[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < T; ++t) order[fill[index[t]]++] = t;
  // work items: (expert, block of output channels) for the experts that have rows
  std::vector<int64_t> items;
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e])
      for (int64_t b = 0; b < nblocks; ++b) items.push_back(e * nblocks + b);
  const int64_t nitems = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < nitems; ++i) {
    const int64_t e = items[i] / nblocks, b = items[i] % nblocks;
    block(x, order.data() + start[e], start[e + 1] - start[e], q + e * q_rows * K, scale + e * N * groups, y, N,
          K, groups, bits, b * kBlock);
  }
  return 0;
}

// MLA's absorbed products against a float weight held as kv_b_proj is, w (n * (D + V), R): head h's rows
// [h (D + V), h (D + V) + D) are W^UK (D, R), the next V rows W^UV (V, R); float32 or bfloat16 (dtypes[1]). Read in
// place: no per-call split, transpose or widened copy of the weight.
template <typename W>
inline float widen(W v);
template <>
inline float widen<float>(float v) { return v; }
template <>
inline float widen<uint16_t>(uint16_t v) { return bf16_to_float(v); }

// q_latent (n, T, R): row (h, t) = sum_d q[h, t, d] W^UK_h[d, :].   params: q (n, T, D), w, out
template <typename W>
void latent_query(const float* q, const W* w, float* out, int64_t n, int64_t T, int64_t D, int64_t V, int64_t R) {
#pragma omp parallel for schedule(static)
  for (int64_t ht = 0; ht < n * T; ++ht) {
    const int64_t h = ht / T;
    const float* qt = q + ht * D;
    float* o = out + ht * R;
    for (int64_t r = 0; r < R; ++r) o[r] = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const W* row = w + (h * (D + V) + d) * R;
      const float a = qt[d];
      for (int64_t r = 0; r < R; ++r) o[r] += a * widen<W>(row[r]);
    }
  }
}

#ifdef DS2_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return widen8_bf16(p); }
#endif

// x . w for one row of R (a dot product: written with AVX2 accumulators, which the compiler does not make of a float
// sum by itself).
template <typename W>
inline float dot(const float* x, const W* w, int64_t R) {
  int64_t r = 0;
  float s = 0.f;
#ifdef DS2_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (; r + 16 <= R; r += 16) {
    a0 = _mm256_fmadd_ps(load8(w + r), _mm256_loadu_ps(x + r), a0);
    a1 = _mm256_fmadd_ps(load8(w + r + 8), _mm256_loadu_ps(x + r + 8), a1);
  }
  s = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; r < R; ++r) s += x[r] * widen<W>(w[r]);
  return s;
}

// out (n, T, V): (h, t, v) = o_latent[h, t, :] . W^UV_h[v, :].   params: o (n, T, R), w, out
template <typename W>
void latent_value(const float* o, const W* w, float* out, int64_t n, int64_t T, int64_t D, int64_t V, int64_t R) {
#pragma omp parallel for schedule(static)
  for (int64_t hv = 0; hv < n * V; ++hv) {
    const int64_t h = hv / V, v = hv % V;
    const W* row = w + (h * (D + V) + D + v) * R;
    for (int64_t t = 0; t < T; ++t) out[(h * T + t) * V + v] = dot(o + (h * T + t) * R, row, R);
  }
}

// f(w) with the float weight w typed as its dtype says: const uint16_t* (bfloat16 bits) or const float*.
template <typename F>
inline void with_weight(const char* dtype, const void* w, F f) {
  if (std::strcmp(dtype, "bfloat16") == 0)
    f(static_cast<const uint16_t*>(w));
  else
    f(static_cast<const float*>(w));
}

extern "C" int LatentQuery(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                           void* stream, void* extra) {
  if (nparam != 3) return 1;
  const int64_t n = shapes[0][0], T = shapes[0][1], D = shapes[0][2], R = shapes[1][1];
  const int64_t V = shapes[1][0] / n - D;
  const float* q = static_cast<const float*>(params[0]);
  float* out = static_cast<float*>(params[2]);
  with_weight(dtypes[1], params[1], [&](auto w) { latent_query(q, w, out, n, T, D, V, R); });
  return 0;
}

extern "C" int LatentValue(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,
                           void* stream, void* extra) {
  if (nparam != 3) return 1;
  const int64_t n = shapes[0][0], T = shapes[0][1], R = shapes[0][2], V = shapes[2][2];
  const int64_t D = shapes[1][0] / n - V;
  const float* o = static_cast<const float*>(params[0]);
  float* out = static_cast<float*>(params[2]);
  with_weight(dtypes[1], params[1], [&](auto w) { latent_value(o, w, out, n, T, D, V, R); });
  return 0;
}

// y (T, N) = x (T, K) w^T for a bfloat16 weight w (N, K), accumulated in float32.   params: x, w, y
extern "C" int Bf16Matmul(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                          void* extra) {
  if (nparam != 3) return 1;
  const float* x = static_cast<const float*>(params[0]);
  const uint16_t* w = static_cast<const uint16_t*>(params[1]);
  float* y = static_cast<float*>(params[2]);
  const int64_t T = shapes[0][0], K = shapes[0][1], N = shapes[1][0];
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t c0 = b * kBlock, c1 = c0 + kBlock < N ? c0 + kBlock : N;
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * K;
      for (int64_t c = c0; c < c1; c += 4) {
        float part[4];
        if (c + 4 <= c1) {
          dot4_bf16(xt, w + c * K, K, part);
        } else {                                                 // fewer than 4 channels left
          for (int64_t r = 0; r < c1 - c; ++r) part[r] = dot(xt, w + (c + r) * K, K);
        }
        for (int64_t r = 0; r < 4 && c + r < c1; ++r) y[t * N + c + r] = part[r];
      }
    }
  }
  return 0;
}

// y (..., H) float32 = rows ids (...) of a bfloat16 table w (V, H), widened.   params: w, ids (int32), y
extern "C" int Bf16Gather(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,
                          void* extra) {
  if (nparam != 3) return 1;
  const uint16_t* w = static_cast<const uint16_t*>(params[0]);
  const int32_t* ids = static_cast<const int32_t*>(params[1]);
  float* y = static_cast<float*>(params[2]);
  const int64_t V = shapes[0][0], H = shapes[0][1];
  int64_t T = 1;
  for (int d = 0; d < ndims[1]; ++d) T *= shapes[1][d];
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] < 0 || ids[t] >= V) return 2;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const uint16_t* row = w + static_cast<int64_t>(ids[t]) * H;
    for (int64_t h = 0; h < H; ++h) y[t * H + h] = bf16_to_float(row[h]);
  }
  return 0;
}
