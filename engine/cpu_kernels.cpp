// The engine's CPU kernels (engine/cpu_kernels.py). On CPUs with AVX512-BF16: bf16 decode steps (one new token's
// attention over a bf16 KV cache in fp32, its recycle set, the small operations and four-bit products of a layer)
// and a bf16 question's attention over the blocks before it. On CPUs with AVX2 and FMA: that attention in fp32.
//
// For each KV head, the query heads of its group score every cached key with bf16 dot products accumulated in
// fp32, take an exact softmax in fp32 and sum the values in fp32; the output is rounded to bf16 once. Keys are
// split in chunks spread over the threads (each chunk's softmax is merged by its max and sum), so two threads
// stay busy whatever the number of KV heads: the reason for this kernel, with reading each key once.
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <omp.h>
#include <algorithm>
#include <functional>
#include <vector>

static inline void store_output(float x, float* dst) { *dst = x; }
static inline void store_output(float x, uint16_t* dst) {  // round to nearest even
  uint32_t b; __builtin_memcpy(&b, &x, 4);
  b += 0x7FFF + ((b >> 16) & 1); *dst = (uint16_t)(b >> 16);
}

// One query row's output from its chunks' softmax maxima `ms`, sums `ls` and value sums `accs` (chunk c's at
// c * stride, its value sums at c * stride * D): merged by their maxima and written once into `dst` (rounded to
// bf16 where it is bf16). Returns the row's log-sum-exp.
template <int D, typename Out>
static float merge_chunks(const float* ms, const float* ls, const float* accs, int64_t chunks, int64_t stride,
                          Out* dst) {
  float m = -INFINITY;
  for (int64_t c = 0; c < chunks; ++c) m = std::max(m, ms[c * stride]);
  float l = 0, o[D] = {0};
  for (int64_t c = 0; c < chunks; ++c) {
    float w = expf(ms[c * stride] - m);
    l += w * ls[c * stride];
    for (int d = 0; d < D; ++d) o[d] += w * accs[c * stride * D + d];
  }
  for (int d = 0; d < D; ++d) store_output(o[d] / l, dst + d);
  return m + logf(l);
}

// 2^f on [-0.5, 0.5]: the Taylor series of e^(f ln 2) to degree 6, within about 1e-7 relative (Horner's order)
static const float EXP2_TAYLOR[7] = {1.5403530393381609954437e-4f, 1.3333558146428443423412e-3f,
                                     9.6181291076284771619790e-3f, 5.5504108664821579953142e-2f,
                                     2.4022650695910071233355e-1f, 6.9314718055994530941723e-1f, 1.0f};

#if defined(__AVX512F__) && defined(__AVX512BF16__)
enum { BF16_KERNELS = 1 };

static inline __m512 exp512(__m512 x) {
  // exp(x) = 2^n * p(f), x*log2e = n + f, f in [-0.5, 0.5]
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(EXP2_TAYLOR[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_TAYLOR[i]));
  return _mm512_scalef_ps(p, n);
}

static inline __m512 bf16_to_f32(__m256i x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

static inline __m512bh load_bf16(const uint16_t* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// The lanes of 16 elements from i that lie before n: all, some, or none.
static inline __mmask16 part(int64_t i, int64_t n) {
  return n - i >= 16 ? 0xFFFF : n <= i ? 0 : (__mmask16)((1u << (n - i)) - 1);
}

enum { CHUNK = 256 };

template <int G, int D>
static void chunk(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t row, int64_t n,
                  float scale, float* m_out, float* l_out, float* acc_out, float* logits, int64_t length) {
  constexpr int DV = (D + 31) / 32;  // 32 bf16 per register; a last half register read under a mask
  constexpr __mmask32 TAIL = D % 32 ? 0xFFFF : 0xFFFFFFFF;
  __m512bh qv[G][DV];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DV; ++c) qv[g][c] = load_bf16(q + g * D + c * 32, c == DV - 1 ? TAIL : 0xFFFFFFFF);
  alignas(64) float s[G][CHUNK];
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* kj = k + j * row;
    __m512bh kv[DV];
    for (int c = 0; c < DV; ++c) kv[c] = load_bf16(kj + c * 32, c == DV - 1 ? TAIL : 0xFFFFFFFF);
    for (int g = 0; g < G; ++g) {
      __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[g][0], kv[0]);
      for (int c = 1; c < DV; ++c) a = _mm512_dpbf16_ps(a, qv[g][c], kv[c]);
      s[g][j] = _mm512_reduce_add_ps(a) * scale;
    }
  }
  if (logits)  // the scaled scores, for the recycle set: [group, length], this chunk's part
    for (int g = 0; g < G; ++g) std::copy(s[g], s[g] + n, logits + g * length);
  int64_t padded = (n + 15) & ~15;
  for (int g = 0; g < G; ++g) {
    for (int64_t j = n; j < padded; ++j) s[g][j] = -INFINITY;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < padded; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(&s[g][j]));
    m_out[g] = _mm512_reduce_max_ps(mx);
    __m512 mv = _mm512_set1_ps(m_out[g]), sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) {
      __m512 p = exp512(_mm512_sub_ps(_mm512_load_ps(&s[g][j]), mv));
      p = _mm512_mask_blend_ps(part(j, n), _mm512_setzero_ps(), p);
      _mm512_store_ps(&s[g][j], p);
      sum = _mm512_add_ps(sum, p);
    }
    l_out[g] = _mm512_reduce_add_ps(sum);
  }
  constexpr int DF = D / 16;
  __m512 acc[G][DF];
  for (int g = 0; g < G; ++g) for (int c = 0; c < DF; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* vj = v + j * row;
    __m512 vf[DF];
    for (int c = 0; c < DF; ++c) vf[c] = bf16_to_f32(_mm256_loadu_si256((const __m256i*)(vj + c * 16)));
    for (int g = 0; g < G; ++g) {
      __m512 p = _mm512_set1_ps(s[g][j]);
      for (int c = 0; c < DF; ++c) acc[g][c] = _mm512_fmadd_ps(p, vf[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g) for (int c = 0; c < DF; ++c) _mm512_storeu_ps(acc_out + g * D + c * 16, acc[g][c]);
}

template <int G, int D>
static void attend(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t head_stride, int64_t row,
                   int64_t length, int kv_heads, float scale, uint16_t* out, float* lse, float* logits, float* scratch,
                   int threads) {
  int64_t chunks = (length + CHUNK - 1) / CHUNK, tasks = kv_heads * chunks;
  float* ms = scratch;                 // [tasks, G]
  float* ls = ms + tasks * G;          // [tasks, G]
  float* accs = ls + tasks * G;        // [tasks, G, D]
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    int64_t h = t / chunks, c = t % chunks, first = c * CHUNK;
    chunk<G, D>(q + h * G * D, k + h * head_stride + first * row, v + h * head_stride + first * row, row,
                std::min<int64_t>(CHUNK, length - first), scale, ms + t * G, ls + t * G, accs + t * G * D,
                logits ? logits + h * G * length + first : nullptr, length);
  }
  for (int h = 0; h < kv_heads; ++h)
    for (int g = 0; g < G; ++g) {
      int64_t first = h * chunks * G + g;
      float l = merge_chunks<D>(ms + first, ls + first, accs + first * D, chunks, G, out + (h * G + g) * D);
      if (lse) lse[h * G + g] = l;
    }
}

extern "C" int64_t blockrag_scratch_floats(int64_t length, int kv_heads, int group, int dim) {
  int64_t tasks = kv_heads * ((length + CHUNK - 1) / CHUNK);
  return tasks * group * (dim + 2);
}

// q [kv_heads, group, dim]; k, v: kv_heads rows of `length` keys, `head_stride` and `row` elements apart;
// out [kv_heads, group, dim]; lse [kv_heads, group] or null; logits [kv_heads, group, length] (the scaled scores)
// or null. Returns 0, or 1 for an unsupported shape.
extern "C" int blockrag_decode_attention(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t head_stride,
                                         int64_t row, int64_t length, int kv_heads, int group, int dim, float scale,
                                         uint16_t* out, float* lse, float* logits, float* scratch, int threads) {
#define CASE(G) \
  if (group == G && dim == 16) return attend<G, 16>(q, k, v, head_stride, row, length, kv_heads, scale, out, lse, logits, scratch, threads), 0; \
  if (group == G && dim == 32) return attend<G, 32>(q, k, v, head_stride, row, length, kv_heads, scale, out, lse, logits, scratch, threads), 0; \
  if (group == G && dim == 64) return attend<G, 64>(q, k, v, head_stride, row, length, kv_heads, scale, out, lse, logits, scratch, threads), 0; \
  if (group == G && dim == 128) return attend<G, 128>(q, k, v, head_stride, row, length, kv_heads, scale, out, lse, logits, scratch, threads), 0;
  CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
  return 1;
}

// 16 floats' bits as unsigned keys that order as the floats do (-0 taken as +0, so that they tie as equals): a
// negative float's bits inverted, a positive one's sign bit set.
static inline __m512i order_keys(__m512 x) {
  __m512i b = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NEQ_UQ), _mm512_castps_si512(x));
  return _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32((int)0x80000000u)));
}

// The lanes of `x` where `m` is set, stored side by side from `dst` (a compress into a register, then a masked
// store: a compress straight to memory is slow on some CPUs). Returns how many.
static inline int store_compressed(uint32_t* dst, __mmask16 m, __m512i x) {
  int count = __builtin_popcount(m);
  _mm512_mask_storeu_epi32(dst, (__mmask16)((1u << count) - 1), _mm512_maskz_compress_epi32(m, x));
  return count;
}

static inline int store_compressed(int64_t* dst, __mmask8 m, __m512i x) {
  int count = __builtin_popcount(m);
  _mm512_mask_storeu_epi64(dst, (__mmask8)((1u << count) - 1), _mm512_maskz_compress_epi64(m, x));
  return count;
}

// Of `keys` [n], those whose bits from `shift` up equal `prefix`, stored side by side into `to`; returns how many.
static int64_t keys_with_prefix(const uint32_t* keys, int64_t n, int shift, uint32_t prefix, uint32_t* to) {
  int64_t count = 0;
  const __m512i wanted = _mm512_set1_epi32((int)prefix);
  for (int64_t j = 0; j < n; j += 16) {
    __mmask16 m = part(j, n);
    __m512i x = _mm512_maskz_loadu_epi32(m, keys + j);
    count += store_compressed(to + count, _mm512_mask_cmpeq_epi32_mask(m, _mm512_srli_epi32(x, shift), wanted), x);
  }
  return count;
}

// Of `keys` [n], the bin of their bits [shift, shift + 11) that holds the `k`-th largest (all keys sharing the bits
// above those), and in `k` its rank within the bin. Four histograms, summed after, so that runs of keys in one bin
// do not wait on each other's counts.
static uint32_t bin_of_kth(const uint32_t* keys, int64_t n, int shift, int64_t& k) {
  enum { BINS = 1 << 11 };
  int32_t histograms[4][BINS] = {{0}};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int w = 0; w < 4; ++w) ++histograms[w][(keys[j + w] >> shift) & (BINS - 1)];
  for (; j < n; ++j) ++histograms[0][(keys[j] >> shift) & (BINS - 1)];
  auto count_of = [&](int b) { return histograms[0][b] + histograms[1][b] + histograms[2][b] + histograms[3][b]; };
  int bin = BINS - 1;
  while (count_of(bin) < k) k -= count_of(bin--);
  return bin;
}

// The k-th largest of `keys` [n] (1 <= k <= n): histograms of their top 11 bits, then of the next 11 among those
// in the k-th's bin, narrow it to the keys sharing its top 22 bits (in `candidates`, room for n), and a partial
// sort of those finds the key itself.
static uint32_t kth_largest(const uint32_t* keys, int64_t n, int64_t k, uint32_t* candidates) {
  uint32_t top = bin_of_kth(keys, n, 21, k);
  int64_t count = keys_with_prefix(keys, n, 21, top, candidates);
  uint32_t next = (top << 11) | bin_of_kth(candidates, count, 10, k);
  count = keys_with_prefix(candidates, count, 10, next, candidates);
  std::nth_element(candidates, candidates + (k - 1), candidates + count, std::greater<uint32_t>());
  return candidates[k - 1];
}

extern "C" int64_t blockrag_recycle_scratch(int64_t length, int kv_heads, int pool) {
  return kv_heads * (4 * length + pool);
}

// The recycle set of each KV head from a full step's `logits` [kv_heads, group, length] and `lse` [kv_heads, group]:
// a position scores the largest log-probability of its group's query heads, max-pooled over the `pool` positions
// centred on it; positions [0, sinks) and [tail_first, tail_end) are kept whatever they score; of the rest, the
// highest scores fill `k` places, the earliest first among equal scores. Writes each head's k positions ascending
// into `positions` [kv_heads, k]; `scratch` holds blockrag_recycle_scratch() 4-byte words.
extern "C" void blockrag_recycle_set(const float* logits, const float* lse, int kv_heads, int group, int64_t length,
                                     int pool, int64_t k, int64_t sinks, int64_t tail_first, int64_t tail_end,
                                     float* scratch, int64_t* positions, int threads) {
  int64_t r = pool / 2;
#pragma omp parallel for num_threads(std::min(threads, kv_heads)) schedule(static)
  for (int h = 0; h < kv_heads; ++h) {
    float* best = scratch + h * (4 * length + pool);  // [r + length + r]: -inf on either side
    float* pooled = best + length + pool;             // [length]
    uint32_t* keys = (uint32_t*)(pooled + length);    // [length], then candidates [length]
    for (int64_t j = 0; j < r; ++j) best[j] = best[r + length + j] = -INFINITY;
    for (int64_t j = 0; j < length; j += 16) {
      __mmask16 m = part(j, length);
      __m512 b = _mm512_set1_ps(-INFINITY);
      for (int g = 0; g < group; ++g)
        b = _mm512_max_ps(b, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, logits + (h * group + g) * length + j),
                                           _mm512_set1_ps(lse[h * group + g])));
      _mm512_mask_storeu_ps(best + r + j, m, b);
    }
    for (int64_t j = 0; j < length; j += 16) {
      __mmask16 m = part(j, length);
      __m512 p = _mm512_maskz_loadu_ps(m, best + j);
      for (int i = 1; i < pool; ++i) p = _mm512_max_ps(p, _mm512_maskz_loadu_ps(m, best + j + i));
      _mm512_mask_storeu_ps(pooled + j, m, p);
    }
    for (int64_t j = 0; j < std::min(sinks, length); ++j) pooled[j] = INFINITY;
    for (int64_t j = std::max<int64_t>(tail_first, 0); j < std::min(tail_end, length); ++j) pooled[j] = INFINITY;
    for (int64_t j = 0; j < length; j += 16) {
      __mmask16 m = part(j, length);
      _mm512_mask_storeu_epi32(keys + j, m, order_keys(_mm512_maskz_loadu_ps(m, pooled + j)));
    }
    // The k-th highest score: above it all are in; at it, the earliest.
    uint32_t kth = kth_largest(keys, length, k, keys + length);
    const __m512i kth_v = _mm512_set1_epi32((int)kth);
    int64_t above = 0;
    for (int64_t j = 0; j < length; j += 16) {
      __mmask16 m = part(j, length);
      above += __builtin_popcount(_mm512_mask_cmpgt_epu32_mask(m, _mm512_maskz_loadu_epi32(m, keys + j), kth_v));
    }
    int64_t* chosen = positions + h * k;
    int64_t count = 0, at_kth = k - above;
    const __m512i low = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), eight = _mm512_set1_epi64(8);
    for (int64_t j = 0; j < length && count < k; j += 16) {
      __mmask16 m = part(j, length);
      __m512i x = _mm512_maskz_loadu_epi32(m, keys + j);
      __mmask16 ties = _mm512_mask_cmpeq_epu32_mask(m, x, kth_v);
      if (ties && at_kth > 0) {  // one by one where the k-th score's ties are taken, earliest first
        for (int64_t i = j; i < std::min(j + 16, length) && count < k; ++i)
          if (keys[i] > kth || (keys[i] == kth && at_kth-- > 0)) chosen[count++] = i;
        continue;
      }
      __mmask16 in = _mm512_mask_cmpgt_epu32_mask(m, x, kth_v);
      __m512i first = _mm512_add_epi64(_mm512_set1_epi64(j), low);
      count += store_compressed(chosen + count, (__mmask8)in, first);
      count += store_compressed(chosen + count, (__mmask8)(in >> 8), _mm512_add_epi64(first, eight));
    }
  }
}

// Each KV head's rows at `positions` [kv_heads, k] of `keys` and `values` (`head_stride` and `row` elements apart)
// copied, in that order, into the first k rows of each head of `to_keys` and `to_values` (`to_head_stride` and
// `to_row` apart).
extern "C" void blockrag_gather_rows(const uint16_t* keys, const uint16_t* values, int64_t head_stride, int64_t row,
                                     const int64_t* positions, int kv_heads, int64_t k, int dim, uint16_t* to_keys,
                                     uint16_t* to_values, int64_t to_head_stride, int64_t to_row,
                                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (int h = 0; h < kv_heads; ++h)
    for (int which = 0; which < 2; ++which) {
      const uint16_t* from = (which ? values : keys) + h * head_stride;
      uint16_t* to = (which ? to_values : to_keys) + h * to_head_stride;
      for (int64_t i = 0; i < k; ++i)
        __builtin_memcpy(to + i * to_row, from + positions[h * k + i] * row, dim * sizeof(uint16_t));
    }
}

// The small operations of a decode step's layer, each what torch computes in bf16 (every operation's result
// rounded to bf16 to nearest even; results below bf16's normal range flush to zero, where torch keeps them, far
// below any activation's scale), fused so that a step makes a few calls instead of dozens.
static inline __m512 load_part(const uint16_t* p, __mmask16 m) {
  return bf16_to_f32(_mm256_maskz_loadu_epi16(m, p));
}
static inline __m512 rounded(__m512 x) { return bf16_to_f32((__m256i)_mm512_cvtneps_pbh(x)); }
static inline void store_part(uint16_t* p, __m512 x, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x));
}

// Each of `rows` rows of `hidden` [rows, n]: where `delta` is given, hidden += delta first (in place); then
// out = (hidden * rsqrt(mean(hidden^2) + eps)) * weight, the normalised row rounded before the weight's product as
// torch.rms_norm followed by the product rounds it.
extern "C" void blockrag_add_rms_norm(uint16_t* hidden, const uint16_t* delta, const uint16_t* weight, int64_t rows,
                                      int64_t n, float eps, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* h = hidden + r * n;
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      __mmask16 m = part(i, n);
      __m512 x = load_part(h + i, m);
      if (delta) {
        x = rounded(_mm512_add_ps(x, load_part(delta + r * n + i, m)));
        store_part(h + i, x, m);
      }
      squares = _mm512_fmadd_ps(x, x, squares);
    }
    __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 16) {
      __mmask16 m = part(i, n);
      __m512 x = rounded(_mm512_mul_ps(load_part(h + i, m), scale));
      store_part(out + r * n + i, _mm512_mul_ps(x, load_part(weight + i, m)), m);
    }
  }
}

// Each of `rows` rows of `x` [rows, d] rotated to its position: out = x * cos + roll(x, d / 2) * signed_sin, the
// two products rounded before their sum (engine/transformer.py's _rotate, operation by operation).
extern "C" void blockrag_rotate(const uint16_t* x, const uint16_t* cos, const uint16_t* signed_sin, int64_t rows,
                                int64_t d, uint16_t* out) {
  int64_t half = d / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* a = x + r * d;
    uint16_t* o = out + r * d;
    for (int64_t i = 0; i < half; i += 16) {
      __mmask16 m = part(i, half);
      __m512 lo = load_part(a + i, m), hi = load_part(a + half + i, m);
      store_part(o + i, _mm512_add_ps(rounded(_mm512_mul_ps(lo, load_part(cos + i, m))),
                                      rounded(_mm512_mul_ps(hi, load_part(signed_sin + i, m)))), m);
      store_part(o + half + i, _mm512_add_ps(rounded(_mm512_mul_ps(hi, load_part(cos + half + i, m))),
                                             rounded(_mm512_mul_ps(lo, load_part(signed_sin + half + i, m)))), m);
    }
  }
}

// Keys moved to new positions (engine/rope.py): each row of `keys` [layers, heads, tokens, d] (any strides, rows
// contiguous) rotated by its token's angle difference, pairs (i, i + d/2) by cos[t, i] and sin[t, i] (fp32, [tokens,
// d/2]) in fp32, and written rounded to bf16 into `out` (a block's slots in a request's cache): one pass over the
// keys, where torch reads them, converts and rotates in several.
extern "C" void blockrag_rerotate(const uint16_t* keys, const int64_t* key_strides, const float* cos, const float* sin,
                                  uint16_t* out, const int64_t* out_strides, int64_t layers, int64_t heads,
                                  int64_t tokens, int64_t d, int threads) {
  int64_t half = d / 2;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < tokens; ++t) {
        const uint16_t* k = keys + l * key_strides[0] + h * key_strides[1] + t * key_strides[2];
        uint16_t* o = out + l * out_strides[0] + h * out_strides[1] + t * out_strides[2];
        const float *c = cos + t * half, *sn = sin + t * half;
        for (int64_t i = 0; i < half; i += 16) {
          __mmask16 m = part(i, half);
          __m512 lo = load_part(k + i, m), hi = load_part(k + half + i, m);
          __m512 cv = _mm512_maskz_loadu_ps(m, c + i), sv = _mm512_maskz_loadu_ps(m, sn + i);
          store_part(o + i, _mm512_fmsub_ps(lo, cv, _mm512_mul_ps(hi, sv)), m);
          store_part(o + half + i, _mm512_fmadd_ps(hi, cv, _mm512_mul_ps(lo, sv)), m);
        }
      }
}

// The gated activation of a SiLU MLP: out = silu(gate) * up for gate_up = [gate (n), up (n)], silu(x) = x / (1 +
// exp(-x)) in fp32 and rounded before the product.
extern "C" void blockrag_silu_mul(const uint16_t* gate_up, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = part(i, n);
    __m512 g = load_part(gate_up + i, m);
    __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    store_part(out + i, _mm512_mul_ps(rounded(silu), load_part(gate_up + n + i, m)), m);
  }
}

// A query's summary for the dynamic schedule of Recycled Attention (engine/decoding.py's QuerySimilarity): the
// mean over its `heads` rows of `query` [heads, dim] (bf16) in fp32, into `mean` (the rows summed in order, then
// divided, as torch's mean of fp32 rows), and, where `anchor` [dim] is given, the cosine similarity of the two,
// summed in double (each norm at least 1e-8, as torch.cosine_similarity takes them).
extern "C" double blockrag_query_similarity(const uint16_t* query, int64_t heads, int64_t dim, const float* anchor,
                                            float* mean) {
  double dot = 0, squares = 0, anchor_squares = 0;
  for (int64_t i = 0; i < dim; ++i) {
    float sum = 0;
    for (int64_t h = 0; h < heads; ++h) {
      uint32_t bits = (uint32_t)query[h * dim + i] << 16;
      float x;
      __builtin_memcpy(&x, &bits, 4);
      sum += x;
    }
    mean[i] = sum / (float)heads;
    if (anchor) {
      dot += (double)mean[i] * anchor[i];
      squares += (double)mean[i] * mean[i];
      anchor_squares += (double)anchor[i] * anchor[i];
    }
  }
  return anchor ? dot / (std::max(sqrt(squares), 1e-8) * std::max(sqrt(anchor_squares), 1e-8)) : 0.0;
}

// Attention of many query rows over a long run of keys, none masked: a question's tokens over the blocks assembled
// before them (engine/transformer.py's attend_suffix). The keys are split in chunks over the threads; each chunk's
// keys and values are packed once in the layout of bf16 dot-product pairs and serve every query row of its KV head.
// Scores are bf16 dot products accumulated in fp32; the softmax is fp32; its probabilities are rounded to bf16 for
// their products with the values (as torch's flash kernel rounds them), summed in fp32; each chunk's softmax is
// merged by its max and sum, and the output is rounded to bf16 once.
enum { PREFIX_CHUNK = 256 };

static inline __m512i pair_of(const uint16_t* p) {  // two bf16 side by side, broadcast to every 32-bit lane
  int32_t pair;
  __builtin_memcpy(&pair, p, 4);
  return _mm512_set1_epi32(pair);
}

// scores[r][j] = scale * q[r] . k[j] for RT rows and 32 keys from `packed` [D/2][32 keys... of the chunk][2]
template <int D, int RT>
static inline void score_tile(const uint16_t* q, const uint16_t* packed, int64_t keys_padded, float scale,
                              float* scores, int64_t score_row) {
  __m512 acc[RT][2];
  for (int r = 0; r < RT; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int p = 0; p < D / 2; ++p) {
    __m512bh k0 = (__m512bh)_mm512_loadu_si512(packed + (p * keys_padded) * 2);
    __m512bh k1 = (__m512bh)_mm512_loadu_si512(packed + (p * keys_padded + 16) * 2);
    for (int r = 0; r < RT; ++r) {
      __m512bh qp = (__m512bh)pair_of(q + r * D + 2 * p);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], k0, qp);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], k1, qp);
    }
  }
  __m512 sv = _mm512_set1_ps(scale);
  for (int r = 0; r < RT; ++r) {
    _mm512_storeu_ps(scores + r * score_row, _mm512_mul_ps(acc[r][0], sv));
    _mm512_storeu_ps(scores + r * score_row + 16, _mm512_mul_ps(acc[r][1], sv));
  }
}

// acc[r] += sum_j probs[r][j] v[j] for RT rows, from `packed` values [keys/2][D][2] and probs [RT][keys] bf16
template <int D, int RT>
static inline void value_tile(const uint16_t* probs, int64_t prob_row, const uint16_t* packed, int64_t pairs,
                              float* acc, int64_t acc_row) {
  constexpr int DV = D / 16;
  __m512 o[RT][DV];
  for (int r = 0; r < RT; ++r) for (int c = 0; c < DV; ++c) o[r][c] = _mm512_loadu_ps(acc + r * acc_row + c * 16);
  for (int64_t jp = 0; jp < pairs; ++jp) {
    __m512bh v[DV];
    for (int c = 0; c < DV; ++c) v[c] = (__m512bh)_mm512_loadu_si512(packed + (jp * D + c * 16) * 2);
    for (int r = 0; r < RT; ++r) {
      __m512bh pp = (__m512bh)pair_of(probs + r * prob_row + 2 * jp);
      for (int c = 0; c < DV; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], v[c], pp);
    }
  }
  for (int r = 0; r < RT; ++r) for (int c = 0; c < DV; ++c) _mm512_storeu_ps(acc + r * acc_row + c * 16, o[r][c]);
}

template <int D, int RT>
static void score_rows(const uint16_t* q, int64_t rows, const uint16_t* packed, int64_t keys_padded, float scale,
                       float* scores) {
  int64_t r = 0;
  for (; r + RT <= rows; r += RT)
    for (int64_t j = 0; j < keys_padded; j += 32)
      score_tile<D, RT>(q + r * D, packed + j * 2, keys_padded, scale, scores + r * keys_padded + j, keys_padded);
  for (; r < rows; ++r)
    for (int64_t j = 0; j < keys_padded; j += 32)
      score_tile<D, 1>(q + r * D, packed + j * 2, keys_padded, scale, scores + r * keys_padded + j, keys_padded);
}

template <int D, int RT>
static void value_rows(const uint16_t* probs, int64_t rows, int64_t keys_padded, const uint16_t* packed, float* acc) {
  int64_t r = 0;
  for (; r + RT <= rows; r += RT)
    value_tile<D, RT>(probs + r * keys_padded, keys_padded, packed, keys_padded / 2, acc + r * D, D);
  for (; r < rows; ++r) value_tile<D, 1>(probs + r * keys_padded, keys_padded, packed, keys_padded / 2, acc + r * D, D);
}

// A chunk's `n` keys (`row` elements apart) as [D/2][padded][2]: each key's pairs of elements, key after key; zero
// past n. Pairs are moved as 32-bit words (rows start at even elements: checked by the caller).
template <int D>
static void pack_keys(const uint16_t* k, int64_t row, int64_t n, int64_t padded, uint16_t* packed) {
  uint32_t* to = (uint32_t*)packed;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t* pairs = (const uint32_t*)(k + j * row);
    for (int p = 0; p < D / 2; ++p) to[p * padded + j] = pairs[p];
  }
  for (int p = 0; p < D / 2; ++p) std::fill(to + p * padded + n, to + (p + 1) * padded, 0u);
}

// A chunk's `n` values as [padded/2][D][2]: the rows of two keys interleaved element by element; zero past n.
template <int D>
static void pack_values(const uint16_t* v, int64_t row, int64_t n, int64_t padded, uint16_t* packed) {
  alignas(64) static const uint16_t LOW[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_load_si512(LOW), high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t j = 0; j < padded; j += 2)
    for (int c = 0; c < D / 32; ++c) {
      __m512i a = j < n ? _mm512_loadu_si512(v + j * row + c * 32) : _mm512_setzero_si512();
      __m512i b = j + 1 < n ? _mm512_loadu_si512(v + (j + 1) * row + c * 32) : _mm512_setzero_si512();
      _mm512_storeu_si512(packed + ((j / 2) * D + c * 32) * 2, _mm512_permutex2var_epi16(a, low, b));
      _mm512_storeu_si512(packed + ((j / 2) * D + c * 32 + 16) * 2, _mm512_permutex2var_epi16(a, high, b));
    }
}

template <int D>
static void prefix_attend(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t head_stride, int64_t row,
                          int64_t length, int kv_heads, int64_t rows, float scale, uint16_t* out, float* lse,
                          float* scratch, int threads) {
  constexpr int SCORE_ROWS = 8, VALUE_ROWS = std::min(8, 384 / D);  // tiles that fit the 32 vector registers
  int64_t chunks = (length + PREFIX_CHUNK - 1) / PREFIX_CHUNK, tasks = kv_heads * chunks;
  float* ms = scratch;                  // [tasks, rows]
  float* ls = ms + tasks * rows;        // [tasks, rows]
  float* accs = ls + tasks * rows;      // [tasks, rows, D]
  float* own = accs + tasks * rows * D; // per thread: scores [rows, CHUNK] f32, probs [rows, CHUNK] bf16, K, V
  int64_t per_thread = rows * PREFIX_CHUNK + rows * PREFIX_CHUNK / 2 + D * PREFIX_CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    int64_t h = t / chunks, first = (t % chunks) * PREFIX_CHUNK, n = std::min<int64_t>(PREFIX_CHUNK, length - first);
    int64_t padded = (n + 31) & ~31;
    float* scores = own + omp_get_thread_num() * per_thread;
    uint16_t* probs = (uint16_t*)(scores + rows * PREFIX_CHUNK);
    uint16_t* packed_k = probs + rows * PREFIX_CHUNK;
    uint16_t* packed_v = packed_k + D * PREFIX_CHUNK;
    const uint16_t* kh = k + h * head_stride + first * row;
    const uint16_t* vh = v + h * head_stride + first * row;
    pack_keys<D>(kh, row, n, padded, packed_k);
    pack_values<D>(vh, row, n, padded, packed_v);
    const uint16_t* qh = q + h * rows * D;
    score_rows<D, SCORE_ROWS>(qh, rows, packed_k, padded, scale, scores);
    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores + r * padded;
      for (int64_t j = n; j < padded; ++j) s[j] = -INFINITY;
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < padded; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
      float m = _mm512_reduce_max_ps(mx);
      __m512 mv = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < padded; j += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv));
        e = _mm512_mask_blend_ps(part(j, n), _mm512_setzero_ps(), e);  // exactly 0 past n
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256((__m256i*)(probs + r * padded + j), (__m256i)_mm512_cvtneps_pbh(e));
      }
      ms[t * rows + r] = m;
      ls[t * rows + r] = _mm512_reduce_add_ps(sum);
    }
    float* acc = accs + t * rows * D;
    std::fill(acc, acc + rows * D, 0.0f);
    value_rows<D, VALUE_ROWS>(probs, rows, padded, packed_v, acc);
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t hr = 0; hr < kv_heads * rows; ++hr) {
    int64_t first = (hr / rows) * chunks * rows + hr % rows;
    lse[hr] = merge_chunks<D>(ms + first, ls + first, accs + first * D, chunks, rows, out + hr * D);
  }
}

extern "C" int64_t blockrag_prefix_scratch(int64_t length, int kv_heads, int64_t rows, int dim, int threads) {
  int64_t tasks = kv_heads * ((length + PREFIX_CHUNK - 1) / PREFIX_CHUNK);
  return tasks * rows * (dim + 2) + threads * (rows * PREFIX_CHUNK + rows * PREFIX_CHUNK / 2 + dim * PREFIX_CHUNK);
}

// q [kv_heads, rows, dim] (a KV head's query rows: its group's heads, each over the tokens); k, v: kv_heads rows of
// `length` keys, `head_stride` and `row` elements apart; out [kv_heads, rows, dim]; lse [kv_heads, rows]. Returns
// 0, or 1 for an unsupported head size.
extern "C" int blockrag_prefix_attention(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t head_stride,
                                         int64_t row, int64_t length, int kv_heads, int64_t rows, int dim,
                                         float scale, uint16_t* out, float* lse, float* scratch, int threads) {
  if (dim == 32) return prefix_attend<32>(q, k, v, head_stride, row, length, kv_heads, rows, scale, out, lse, scratch, threads), 0;
  if (dim == 64) return prefix_attend<64>(q, k, v, head_stride, row, length, kv_heads, rows, scale, out, lse, scratch, threads), 0;
  if (dim == 128) return prefix_attend<128>(q, k, v, head_stride, row, length, kv_heads, rows, scale, out, lse, scratch, threads), 0;
  return 1;
}

// A four-bit weight [rows, inputs] times one bf16 vector, near the speed of reading the weight (engine/fourbit.py):
// a decode step's products. Within each group of 32 inputs of a row a weight is (q - 8) * scale + zero, q in
// 0..15. The weight is stored in tiles of 16 rows, group after group, each tile-group 160 16-bit words: four words
// of 32 lanes (lane 2r + e: row r), whose nibble j in word c holds q of input 8c + 2j + e; then the 16 rows'
// scales and their 16 zeros, in bf16. A nibble ORed into bf16 128.0 is 128 + q exactly, so each nibble plane is a
// register of bf16 pairs for a dot-product step against one pair of inputs broadcast: 16 rows' sums in 16 lanes,
// 136 times the inputs' sum subtracted per group. Sums are fp32; the output is rounded to bf16 once.
enum { FOUR_BIT_GROUP = 32, FOUR_BIT_TILE_WORDS = 160 };

// Each group's sum of the inputs `x` [groups * 32], in fp32.
static std::vector<float> group_sums(const uint16_t* x, int64_t groups) {
  std::vector<float> sums(groups);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 a = _mm512_add_ps(bf16_to_f32(_mm256_loadu_si256((const __m256i*)(x + g * FOUR_BIT_GROUP))),
                             bf16_to_f32(_mm256_loadu_si256((const __m256i*)(x + g * FOUR_BIT_GROUP + 16))));
    sums[g] = _mm512_reduce_add_ps(a);
  }
  return sums;
}

// The 16 rows' sums of (128 + q) * x over a group of 32 inputs `xg`, q read from the four words of 32 lanes at
// `planes` (the layout above).
static inline __m512 nibble_dot(const uint16_t* planes, const uint16_t* xg) {
  const __m512i low = _mm512_set1_epi16(0xF), one_twenty_eight = _mm512_set1_epi16(0x4300);
  __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps(), d2 = _mm512_setzero_ps(), d3 = _mm512_setzero_ps();
  for (int c = 0; c < 4; ++c) {
    __m512i w = _mm512_loadu_si512(planes + c * 32);
    __m512i n0 = _mm512_ternarylogic_epi32(w, low, one_twenty_eight, 0xEA);  // (w & low) | 128
    __m512i n1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), low, one_twenty_eight, 0xEA);
    __m512i n2 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), low, one_twenty_eight, 0xEA);
    __m512i n3 = _mm512_or_si512(_mm512_srli_epi16(w, 12), one_twenty_eight);
    d0 = _mm512_dpbf16_ps(d0, (__m512bh)n0, (__m512bh)pair_of(xg + 8 * c));
    d1 = _mm512_dpbf16_ps(d1, (__m512bh)n1, (__m512bh)pair_of(xg + 8 * c + 2));
    d2 = _mm512_dpbf16_ps(d2, (__m512bh)n2, (__m512bh)pair_of(xg + 8 * c + 4));
    d3 = _mm512_dpbf16_ps(d3, (__m512bh)n3, (__m512bh)pair_of(xg + 8 * c + 6));
  }
  return _mm512_add_ps(_mm512_add_ps(d0, d1), _mm512_add_ps(d2, d3));
}

// The product of an eight-bit weight (Q8_0's: each group of 32 inputs of a row is scale * q, q in -127..127) with
// `x`. With q + 128 = 16 high + low, each tile-group is 272 words: the high nibbles' four words of 32 lanes, the
// low nibbles' (the layout above), then the 16 rows' scales in bf16; a group adds scale * (16 (high - 8) . x +
// (low - 8) . x + 8 sum(x)). Half the input and five sixths of the bytes of two four-bit halves with a scale and
// zero each.
enum { EIGHT_BIT_TILE_WORDS = 272 };

// Both products: 16 rows per tile, one tile per iteration spread over the threads.
template <bool EIGHT>
static void nibble_matvec(const uint16_t* tiles, int64_t tile_count, int64_t groups, const uint16_t* x,
                          uint16_t* out, int threads) {
  constexpr int64_t words = EIGHT ? EIGHT_BIT_TILE_WORDS : FOUR_BIT_TILE_WORDS;
  std::vector<float> sums = group_sums(x, groups);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tile_count; ++t) {
    const uint16_t* tile = tiles + t * groups * words;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t* block = tile + g * words;
      const uint16_t* xg = x + g * FOUR_BIT_GROUP;
      __m512 sum = _mm512_set1_ps(sums[g]), offset = _mm512_set1_ps(136.0f);
      __m512 qx = _mm512_fnmadd_ps(offset, sum, nibble_dot(block, xg));
      if constexpr (EIGHT) {
        __m512 low = _mm512_fnmadd_ps(offset, sum, nibble_dot(block + 128, xg));
        qx = _mm512_fmadd_ps(_mm512_set1_ps(16.0f), qx, _mm512_fmadd_ps(_mm512_set1_ps(8.0f), sum, low));
        acc = _mm512_fmadd_ps(bf16_to_f32(_mm256_loadu_si256((const __m256i*)(block + 256))), qx, acc);
      } else {
        __m512 scale = bf16_to_f32(_mm256_loadu_si256((const __m256i*)(block + 128)));
        __m512 zero = bf16_to_f32(_mm256_loadu_si256((const __m256i*)(block + 144)));
        acc = _mm512_fmadd_ps(zero, sum, _mm512_fmadd_ps(scale, qx, acc));
      }
    }
    _mm256_storeu_si256((__m256i*)(out + t * 16), (__m256i)_mm512_cvtneps_pbh(acc));
  }
}

extern "C" void blockrag_four_bit_matvec(const uint16_t* tiles, int64_t tile_count, int64_t groups, const uint16_t* x,
                                         uint16_t* out, int threads) {
  nibble_matvec<false>(tiles, tile_count, groups, x, out, threads);
}

extern "C" void blockrag_eight_bit_matvec(const uint16_t* tiles, int64_t tile_count, int64_t groups,
                                          const uint16_t* x, uint16_t* out, int threads) {
  nibble_matvec<true>(tiles, tile_count, groups, x, out, threads);
}

// A decoder layer after its attention, in one call of a decode step: the output product of the attention's
// `attended` [n_in], the residual sum into `hidden` [n] in place and the norm of it (weight `norm`), the gate and up
// products, the SiLU gate and the down product into `delta` [n]; the same calls as one by one, in the same order.
// `scratch` holds n + n + 2m + m values, m the MLP's width.
extern "C" void blockrag_mlp_after_attention(const uint16_t* attended, uint16_t* hidden, const uint16_t* o_tiles,
                                             int64_t o_groups, const uint16_t* norm, int64_t n, float eps,
                                             const uint16_t* gate_up_tiles, int64_t m, const uint16_t* down_tiles,
                                             int64_t down_groups, uint16_t* delta, uint16_t* scratch, int threads) {
  uint16_t *o = scratch, *x = o + n, *gate_up = x + n, *gated = gate_up + 2 * m;
  blockrag_four_bit_matvec(o_tiles, n / 16, o_groups, attended, o, threads);
  blockrag_add_rms_norm(hidden, o, norm, 1, n, eps, x);
  blockrag_four_bit_matvec(gate_up_tiles, 2 * m / 16, n / FOUR_BIT_GROUP, x, gate_up, threads);
  blockrag_silu_mul(gate_up, m, gated);
  blockrag_four_bit_matvec(down_tiles, n / 16, down_groups, gated, delta, threads);
}

// The first part of a decoder layer of a decode step (blockrag_decode_layer): `hidden` += `delta` in place (no sum
// where `delta` is null) and its norm, the query, key and value product and the rotation of the query and key,
// into `projection`: [n] the norm, [(heads + 2 kv_heads) dim] the product (query, key, value), [(heads + kv_heads)
// dim] the rotated query and key.
extern "C" void blockrag_project_qkv(uint16_t* hidden, const uint16_t* delta, const uint16_t* in_norm, float in_eps,
                                     int64_t n, const uint16_t* qkv_tiles, const uint16_t* cos,
                                     const uint16_t* signed_sin, int heads, int kv_heads, int dim,
                                     uint16_t* projection, int threads) {
  uint16_t *x = projection, *qkv = x + n;
  blockrag_add_rms_norm(hidden, delta, in_norm, 1, n, in_eps, x);
  blockrag_four_bit_matvec(qkv_tiles, (heads + 2 * kv_heads) * dim / 16, n / FOUR_BIT_GROUP, x, qkv, threads);
  blockrag_rotate(qkv, cos, signed_sin, heads + kv_heads, dim, qkv + (heads + 2 * kv_heads) * dim);
}

// A decoder layer of a decode step in one call, where its attention reads one run of rows: blockrag_project_qkv
// into `projection` (unless `projected`: done already), the new key and value written at row `at` of
// `keys`/`values` (and at row `also_at` of `also_keys`/`also_values` where given: a recycle set or a window beside
// the cache), the query's attention over the first `length` rows of the last memory written, then
// blockrag_mlp_after_attention into `delta_out`: the same calls as one by one, in the same order. Where `positions`
// is given (a full step of Recycled Attention), the attention also keeps its scores, blockrag_recycle_set chooses
// each KV head's `k` positions from them (`pool`, `sinks`, `[kept_first, kept_end)` as there) into `positions`
// [kv_heads, k], and blockrag_gather_rows copies their rows into `chosen_keys`/`chosen_values`. Returns 0, or 1,
// doing nothing, for a head size or group the attention does not take.
extern "C" int blockrag_decode_layer(uint16_t* hidden, const uint16_t* delta, const uint16_t* in_norm, float in_eps,
                                     int64_t n, const uint16_t* qkv_tiles, const uint16_t* cos,
                                     const uint16_t* signed_sin, int heads, int kv_heads, int dim,
                                     uint16_t* projection, int projected, uint16_t* keys, uint16_t* values,
                                     int64_t head_stride, int64_t row, int64_t at, uint16_t* also_keys,
                                     uint16_t* also_values, int64_t also_head_stride, int64_t also_row,
                                     int64_t also_at, int64_t length, float scaling, const uint16_t* o_tiles,
                                     const uint16_t* post_norm, float post_eps, const uint16_t* gate_up_tiles,
                                     int64_t m, const uint16_t* down_tiles, uint16_t* delta_out, int64_t* positions,
                                     int64_t k, int pool, int64_t sinks, int64_t kept_first, int64_t kept_end,
                                     uint16_t* chosen_keys, uint16_t* chosen_values, int64_t chosen_head_stride,
                                     int64_t chosen_row, int threads) {
  int group = heads / kv_heads;
  if (group < 1 || group > 8 || !(dim == 16 || dim == 32 || dim == 64 || dim == 128)) return 1;  // nothing done
  int64_t q_size = heads * dim, kv_size = kv_heads * dim;
  static thread_local std::vector<uint16_t> words;
  static thread_local std::vector<float> floats;
  words.resize(q_size + 2 * n + 3 * m);
  int64_t attention_floats = blockrag_scratch_floats(length, kv_heads, group, dim), scores = kv_heads * group;
  floats.resize(attention_floats + (positions ? scores * (length + 1) + blockrag_recycle_scratch(length, kv_heads, pool)
                                              : 0));
  float *lse = positions ? floats.data() + attention_floats : nullptr, *logits = positions ? lse + scores : nullptr;
  uint16_t *attended = words.data(), *after = attended + q_size;
  if (!projected)
    blockrag_project_qkv(hidden, delta, in_norm, in_eps, n, qkv_tiles, cos, signed_sin, heads, kv_heads, dim,
                         projection, threads);
  const uint16_t *qkv = projection + n, *rotated = qkv + q_size + 2 * kv_size;
  const uint16_t *key = rotated + q_size, *value = qkv + q_size + kv_size;
  for (int h = 0; h < kv_heads; ++h) {
    std::copy(key + h * dim, key + (h + 1) * dim, keys + h * head_stride + at * row);
    std::copy(value + h * dim, value + (h + 1) * dim, values + h * head_stride + at * row);
    if (also_keys) {
      std::copy(key + h * dim, key + (h + 1) * dim, also_keys + h * also_head_stride + also_at * also_row);
      std::copy(value + h * dim, value + (h + 1) * dim, also_values + h * also_head_stride + also_at * also_row);
    }
  }
  const uint16_t *from_keys = also_keys ? also_keys : keys, *from_values = also_keys ? also_values : values;
  int64_t from_head_stride = also_keys ? also_head_stride : head_stride, from_row = also_keys ? also_row : row;
  blockrag_decode_attention(rotated, from_keys, from_values, from_head_stride, from_row, length, kv_heads, group, dim,
                            scaling, attended, lse, logits, floats.data(), threads);
  if (positions) {
    blockrag_recycle_set(logits, lse, kv_heads, group, length, pool, k, sinks, kept_first, kept_end,
                         logits + scores * length, positions, threads);
    blockrag_gather_rows(from_keys, from_values, from_head_stride, from_row, positions, kv_heads, k, dim, chosen_keys,
                         chosen_values, chosen_head_stride, chosen_row, threads);
  }
  blockrag_mlp_after_attention(attended, hidden, o_tiles, q_size / FOUR_BIT_GROUP, post_norm, n, post_eps,
                               gate_up_tiles, m, down_tiles, m / FOUR_BIT_GROUP, delta_out, after, threads);
  return 0;
}
#else
enum { BF16_KERNELS = 0 };
#endif

// A question's attention over the blocks before it in fp32, on CPUs with AVX2 and FMA (engine/transformer.py's
// attend_suffix, through cpu_kernels.prefix_attention): fp32 dot products, an fp32 softmax and fp32 sums of the
// values, as torch's flash kernel computes them in fp32, to the order of its sums. A KV head's query rows are
// transposed once, so a tile of keys read in place (no packing) scores 16 rows per pair of vectors and the
// softmax runs down the columns, 8 rows at a time; each thread takes a span of keys with an online softmax over
// chunks of them, and the spans are merged by their maxima and sums.
#if defined(__AVX2__) && defined(__FMA__)
enum { F32_KERNELS = 2, F32_CHUNK = 64, F32_SPAN = 512 };

static inline __m256 exp256(__m256 x) {
  // exp(x) = 2^n * p(f), x*log2e = n + f, f in [-0.5, 0.5]; the exponent built in its bits (n >= -126)
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(EXP2_TAYLOR[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_TAYLOR[i]));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// scores[i][c..c + 8 * RV) = queries[c..] . key i for KT keys `row` apart, from queries transposed [D][padded]
template <int D, int KT, int RV>
static inline void f32_score_tile(const float* qt, int64_t padded, const float* k, int64_t row, float* scores) {
  __m256 acc[KT][RV];
  for (int i = 0; i < KT; ++i) for (int c = 0; c < RV; ++c) acc[i][c] = _mm256_setzero_ps();
  for (int p = 0; p < D; ++p) {
    __m256 q[RV];
    for (int c = 0; c < RV; ++c) q[c] = _mm256_loadu_ps(qt + p * padded + 8 * c);
    for (int i = 0; i < KT; ++i) {
      __m256 b = _mm256_broadcast_ss(k + i * row + p);
      for (int c = 0; c < RV; ++c) acc[i][c] = _mm256_fmadd_ps(b, q[c], acc[i][c]);
    }
  }
  for (int i = 0; i < KT; ++i) for (int c = 0; c < RV; ++c) _mm256_storeu_ps(scores + i * padded + 8 * c, acc[i][c]);
}

// Every row's scores for KT keys: 16 rows a tile, then the last 8.
template <int D, int KT>
static inline void f32_score_keys(const float* qt, int64_t padded, const float* k, int64_t row, float* scores) {
  int64_t c = 0;
  for (; c + 16 <= padded; c += 16) f32_score_tile<D, KT, 2>(qt + c, padded, k, row, scores + c);
  if (c < padded) f32_score_tile<D, KT, 1>(qt + c, padded, k, row, scores + c);
}

// acc[r][0..16) += sum_j probs[j][r] v[j][0..16) for RT rows over n keys, probs transposed [n][padded]
template <int RT>
static inline void f32_value_tile(const float* probs, int64_t padded, const float* v, int64_t row, int64_t n,
                                  float* acc, int64_t acc_row) {
  __m256 o[RT][2];
  for (int r = 0; r < RT; ++r) for (int c = 0; c < 2; ++c) o[r][c] = _mm256_loadu_ps(acc + r * acc_row + 8 * c);
  for (int64_t j = 0; j < n; ++j) {
    __m256 v0 = _mm256_loadu_ps(v + j * row), v1 = _mm256_loadu_ps(v + j * row + 8);
    for (int r = 0; r < RT; ++r) {
      __m256 b = _mm256_broadcast_ss(probs + j * padded + r);
      o[r][0] = _mm256_fmadd_ps(b, v0, o[r][0]);
      o[r][1] = _mm256_fmadd_ps(b, v1, o[r][1]);
    }
  }
  for (int r = 0; r < RT; ++r) for (int c = 0; c < 2; ++c) _mm256_storeu_ps(acc + r * acc_row + 8 * c, o[r][c]);
}

// A KV head's `rows` query rows (scaled, transposed [D][padded], padded a multiple of 8) over n keys, chunk after
// chunk with an online softmax: its maxima and sums into m, l [padded], its value sums into acc [rows][D].
template <int D>
static void f32_span(const float* qt, int64_t rows, int64_t padded, const float* k, const float* v, int64_t row,
                     int64_t n, float* m, float* l, float* acc, float* scores) {
  constexpr int KT = 6, RT = 6;  // tiles that fit the 16 vector registers
  std::fill(m, m + padded, -INFINITY);
  std::fill(l, l + padded, 0.0f);
  std::fill(acc, acc + rows * D, 0.0f);
  for (int64_t first = 0; first < n; first += F32_CHUNK) {
    int64_t keys = std::min<int64_t>(F32_CHUNK, n - first), j = 0;
    const float* kc = k + first * row;
    const float* vc = v + first * row;
    for (; j + KT <= keys; j += KT) f32_score_keys<D, KT>(qt, padded, kc + j * row, row, scores + j * padded);
    for (; j < keys; ++j) f32_score_keys<D, 1>(qt, padded, kc + j * row, row, scores + j * padded);
    for (int64_t c = 0; c < padded; c += 8) {
      __m256 before = _mm256_loadu_ps(m + c), top = before;
      for (j = 0; j < keys; ++j) top = _mm256_max_ps(top, _mm256_loadu_ps(scores + j * padded + c));
      __m256 sum = _mm256_setzero_ps();
      for (j = 0; j < keys; ++j) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + j * padded + c), top));
        sum = _mm256_add_ps(sum, e);
        _mm256_storeu_ps(scores + j * padded + c, e);
      }
      alignas(32) float kept[8];  // what the earlier chunks' sums keep of themselves under the new maxima
      _mm256_store_ps(kept, exp256(_mm256_sub_ps(before, top)));
      _mm256_storeu_ps(l + c, _mm256_fmadd_ps(_mm256_loadu_ps(l + c), _mm256_load_ps(kept), sum));
      _mm256_storeu_ps(m + c, top);
      if (first == 0) continue;  // nothing summed yet
      for (int64_t r = c; r < std::min<int64_t>(c + 8, rows); ++r)
        if (kept[r - c] != 1.0f)
          for (int d = 0; d < D; ++d) acc[r * D + d] *= kept[r - c];
    }
    for (int c = 0; c < D; c += 16) {
      int64_t r = 0;
      for (; r + RT <= rows; r += RT) f32_value_tile<RT>(scores + r, padded, vc + c, row, keys, acc + r * D + c, D);
      for (; r < rows; ++r) f32_value_tile<1>(scores + r, padded, vc + c, row, keys, acc + r * D + c, D);
    }
  }
}

// Spans per KV head: as few as keep them at most F32_SPAN keys and give every thread as many of all the heads'.
static int64_t f32_spans(int64_t length, int kv_heads, int threads) {
  int64_t spans = std::max<int64_t>(1, (length + F32_SPAN - 1) / F32_SPAN);
  while ((kv_heads * spans) % threads != 0 && spans < length) ++spans;
  return spans;
}

template <int D>
static void f32_prefix_attend(const float* q, const float* k, const float* v, int64_t head_stride, int64_t row,
                              int64_t length, int kv_heads, int64_t rows, float scale, float* out, float* lse,
                              float* scratch, int threads) {
  int64_t padded = (rows + 7) & ~7, spans = f32_spans(length, kv_heads, threads), tasks = kv_heads * spans;
  int64_t span = (length + spans - 1) / spans;
  float* qt = scratch;                    // [kv_heads][D][padded]
  float* ms = qt + kv_heads * D * padded; // [tasks][padded]
  float* ls = ms + tasks * padded;        // [tasks][padded]
  float* accs = ls + tasks * padded;      // [tasks][rows][D]
  float* own = accs + tasks * rows * D;   // per thread: scores [F32_CHUNK][padded]
  for (int h = 0; h < kv_heads; ++h)
    for (int p = 0; p < D; ++p)
      for (int64_t r = 0; r < padded; ++r) qt[(h * D + p) * padded + r] = r < rows ? q[(h * rows + r) * D + p] * scale : 0;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    int64_t h = t / spans, first = std::min(length, (t % spans) * span), n = std::min(span, length - first);
    f32_span<D>(qt + h * D * padded, rows, padded, k + h * head_stride + first * row, v + h * head_stride + first * row,
                row, n, ms + t * padded, ls + t * padded, accs + t * rows * D, own + omp_get_thread_num() * F32_CHUNK * padded);
  }
  for (int64_t t = 0; t < tasks; ++t)  // the sums of rows as merge_chunks reads them: [tasks][rows]
    for (int64_t r = 0; r < rows; ++r) ms[t * rows + r] = ms[t * padded + r], ls[t * rows + r] = ls[t * padded + r];
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t hr = 0; hr < kv_heads * rows; ++hr) {
    int64_t first = (hr / rows) * spans * rows + hr % rows;
    lse[hr] = merge_chunks<D>(ms + first, ls + first, accs + first * D, spans, rows, out + hr * D);
  }
}

extern "C" int64_t blockrag_prefix_scratch_f32(int64_t length, int kv_heads, int64_t rows, int dim, int threads) {
  int64_t padded = (rows + 7) & ~7, tasks = kv_heads * f32_spans(length, kv_heads, threads);
  return kv_heads * dim * padded + tasks * (2 * padded + rows * dim) + threads * F32_CHUNK * padded;
}

// q [kv_heads, rows, dim] fp32 (a KV head's query rows: its group's heads, each over the tokens); k, v: kv_heads
// rows of `length` keys, `head_stride` and `row` elements apart; out [kv_heads, rows, dim]; lse [kv_heads, rows].
// Returns 0, or 1 for an unsupported head size.
extern "C" int blockrag_prefix_attention_f32(const float* q, const float* k, const float* v, int64_t head_stride,
                                             int64_t row, int64_t length, int kv_heads, int64_t rows, int dim,
                                             float scale, float* out, float* lse, float* scratch, int threads) {
  if (dim == 16) return f32_prefix_attend<16>(q, k, v, head_stride, row, length, kv_heads, rows, scale, out, lse, scratch, threads), 0;
  if (dim == 32) return f32_prefix_attend<32>(q, k, v, head_stride, row, length, kv_heads, rows, scale, out, lse, scratch, threads), 0;
  if (dim == 64) return f32_prefix_attend<64>(q, k, v, head_stride, row, length, kv_heads, rows, scale, out, lse, scratch, threads), 0;
  if (dim == 128) return f32_prefix_attend<128>(q, k, v, head_stride, row, length, kv_heads, rows, scale, out, lse, scratch, threads), 0;
  return 1;
}
// Blocks' fp32 keys moved into a request's cache (engine/rope.py): (k0 c - k1 s, k1 c + k0 s) for each pair (i, i +
// d / 2), its products and sums each rounded as torch's eager operations round them (no fused multiply-add), in one
// pass on the threads; strides as blockrag_rerotate's.
extern "C" __attribute__((optimize("fp-contract=off"))) void blockrag_rerotate_f32(
    const float* keys, const int64_t* key_strides, const float* cos, const float* sin, float* out,
    const int64_t* out_strides, int64_t layers, int64_t heads, int64_t tokens, int64_t d, int threads) {
  int64_t half = d / 2;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < tokens; ++t) {
        const float* k = keys + l * key_strides[0] + h * key_strides[1] + t * key_strides[2];
        float* o = out + l * out_strides[0] + h * out_strides[1] + t * out_strides[2];
        const float *c = cos + t * half, *sn = sin + t * half;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {
          __m256 lo = _mm256_loadu_ps(k + i), hi = _mm256_loadu_ps(k + half + i);
          __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(sn + i);
          _mm256_storeu_ps(o + i, _mm256_sub_ps(_mm256_mul_ps(lo, cv), _mm256_mul_ps(hi, sv)));
          _mm256_storeu_ps(o + half + i, _mm256_add_ps(_mm256_mul_ps(hi, cv), _mm256_mul_ps(lo, sv)));
        }
        for (; i < half; ++i) {
          float lo = k[i], hi = k[half + i];
          o[i] = lo * c[i] - hi * sn[i];
          o[half + i] = hi * c[i] + lo * sn[i];
        }
      }
}
#else
enum { F32_KERNELS = 0 };
#endif

// What this build runs: 1, the bf16 kernels (AVX512-BF16); 2, the fp32 ones of a block prompt (AVX2 and FMA).
extern "C" int blockrag_features() { return BF16_KERNELS | F32_KERNELS; }
