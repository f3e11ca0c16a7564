// PLADIS weights on the CPU, row by row:
//
//     W = dense + scale * (entmax_alpha(z) - dense)      (residual: scale * (entmax_alpha(z) - dense))
//
// For joint attention, where z holds a row's text keys alone, the row is then scaled by its dense
// mass on them, exp(logsumexp(z) - the row's log-sum-exp over every key): from the softmax's own
// maximum and sum, rather than a pass of logsumexp and one of a product over the weights.
//
// The Newton iteration of entmax.py, from the same lower bound, on one row at a time while it
// sits in the cache. Newton from the left only raises tau, so a key below the lower bound never
// enters the support: each step works on the keys above it alone, usually a few of 77.
// torch.compile's C++ code instead runs each sum of the iteration as its own pass over every key
// of every row of the chunk. Each row stops when its own tau stops moving, as in entmax.py, so
// no row is left unsettled. cpu_rows.py builds this file with the machine's C++ compiler.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512VL__
#include <immintrin.h>
#endif

namespace {

constexpr int MAX_NEWTON_STEPS = 50;  // as entmax.py
constexpr float TINY = 1.17549435e-38f;
constexpr int GENERAL = -1;  // alpha without an integer beta: s^(beta - 1) by exp2 and log2
constexpr int CUBE_ROOT = -2;  // alpha 1.75: beta - 1 = 1/3
// Vector width of the loops below (8 floats in AVX registers): running maxima in as many lanes, and
// the keys of Newton padded to a multiple of it, so that no loop ends in scalar steps.
constexpr int LANES = 8;

// log2(s) for s >= 1e-30. In float, a power 2^(e log2 s) is off by about |e log2 s| 1e-7 of itself:
// below 1e-7 absolute for the powers of s <= 1, and in the root of a Newton step it only sizes the
// step (at the root, the mass is 1 and its log2 is 0).
inline float log2_positive(float s) {
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  const uint32_t mantissa_bits = (bits & 0x7fffffu) | 0x3f800000u;
  float m;  // s = m 2^k, m in [1, 2), then [sqrt(1/2), sqrt(2))
  std::memcpy(&m, &mantissa_bits, sizeof m);
  float k = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  k = high ? k + 1.f : k;
  // ln m = 2 atanh(t), t = (m - 1) / (m + 1), |t| <= 0.172: the series to t^9 is exact to float.
  const float t = (m - 1.f) / (m + 1.f), t2 = t * t;
  const float ln_m = t * (2.f + t2 * (2.f / 3 + t2 * (2.f / 5 + t2 * (2.f / 7 + t2 * (2.f / 9)))));
  return k + ln_m * 1.44269504f;
}

// 2^(n + f) for an integer n from -127 to 127 and |f| <= 1/2: e^(f ln 2) by Taylor to f^7, exact
// to float, times 2^n from its exponent bits (n = -127 gives 0 bits: 0 below 2^-126).
inline float exp2_parts(float n, float f) {
  f *= 0.693147181f;
  const float e_f = 1.f + f * (1.f + f * (0.5f + f * (1.f / 6 + f * (1.f / 24 + f * (1.f / 120 + f * (1.f / 720 + f * (1.f / 5040)))))));
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return e_f * two_n;
}

// 2^y. Clamped first, so that -inf and large y convert to int defined.
inline float exp2_of(float y) {
  y = std::min(std::max(y, -127.f), 127.f);
  const float n = std::floor(y + 0.5f);
  return exp2_parts(n, y - n);
}

// s^(1/3) for s >= 1e-30: from the exponent bits divided by 3 (within 4%), two steps of Halley's
// iteration, each cubing the error, make it exact to float. With it rows at alpha 1.75 take 0.5-0.7x
// the time they take with exp2 and log2.
inline float cube_root(float s) {
  uint32_t bits;  // unsigned: with int32_t, gcc 12's code made rows at alpha 1.75 1.5x slower
  std::memcpy(&bits, &s, sizeof bits);
  bits = static_cast<uint32_t>(static_cast<float>(bits) * (1.f / 3)) + 0x2a51067fu;
  float y;
  std::memcpy(&y, &bits, sizeof y);
  for (int i = 0; i < 2; ++i) {
    const float y3 = y * y * y;
    y *= (y3 + 2.f * s) / (2.f * y3 + s);
  }
  return y;
}

// s^(beta - 1) for s >= 0, with 0^0 = 0 so that only the support counts. P = beta - 1 where beta
// is an integer (multiplications only), CUBE_ROOT, else GENERAL with the exponent given.
template <int P>
inline float support_power(float s, float exponent) {
  if (P == CUBE_ROOT) return s > 0.f ? cube_root(s > 1e-30f ? s : 1e-30f) : 0.f;
  if (P == GENERAL) {
    const float v = exp2_of(exponent * log2_positive(s > 1e-30f ? s : 1e-30f));
    return s > 0.f ? v : 0.f;
  }
  float r = s > 0.f ? 1.f : 0.f;
  for (int i = 0; i < P; ++i) r *= s;
  return r;
}

// a^(1 / beta) for a >= 0, by square roots where beta allows.
template <int P>
inline float root(float a, float beta) {
  if (P == 0) return a;
  if (P == 1) return std::sqrt(a);
  if (P == 3) return std::sqrt(std::sqrt(a));
  if (P == 7) return std::sqrt(std::sqrt(std::sqrt(a)));
  if (P == CUBE_ROOT) return std::sqrt(a) * std::sqrt(std::sqrt(a));  // a^(3/4)
  const float v = exp2_of(log2_positive(a > 1e-30f ? a : 1e-30f) / beta);
  return a > 0.f ? v : 0.f;
}

// The keys whose x = (alpha - 1)(z - top) is above tau: x into xs and the key into at, in order.
// Returns how many. Without branches: a mispredicted one per key costs more than the rest.
inline int64_t keys_above(const float* z, int64_t keys, float alpha, float top, float tau, float* xs, int32_t* at) {
  int64_t live = 0, j = 0;
#ifdef __AVX512VL__
  // 8 keys at a time, compressed into place: a store of 8 from live never passes key j + 8.
  const __m256 lift = _mm256_set1_ps(alpha - 1.f), shift = _mm256_set1_ps(top), bound = _mm256_set1_ps(tau);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; j + 8 <= keys; j += 8) {
    const __m256 x = _mm256_mul_ps(lift, _mm256_sub_ps(_mm256_loadu_ps(z + j), shift));
    const __mmask8 kept = _mm256_cmp_ps_mask(x, bound, _CMP_GT_OQ);
    _mm256_storeu_ps(xs + live, _mm256_maskz_compress_ps(kept, x));
    const __m256i key = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(j)), lane);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + live), _mm256_maskz_compress_epi32(kept, key));
    live += __builtin_popcount(kept);
  }
#endif
  for (; j < keys; ++j) {
    const float x = (alpha - 1.f) * (z[j] - top);
    xs[live] = x;
    at[live] = static_cast<int32_t>(j);
    live += x > tau;
  }
  return live;
}

// xs, at: scratch of keys + LANES entries for the x above the lower bound, and of keys for their keys.
// lse: the row's log-sum-exp over every key of joint attention, or null.
template <int P>
void row(const float* z, float* w, int64_t keys, float alpha, float scale, bool residual, const float* lse, float* xs,
         int32_t* at) {
  const float beta = 1.f / (alpha - 1.f), exponent = beta - 1.f;
  // One running maximum would be a chain of dependent instructions, which the compiler keeps scalar.
  float lanes[LANES];
  std::fill(lanes, lanes + LANES, -INFINITY);
  int64_t tail = 0;
  for (; tail + LANES <= keys; tail += LANES)
    for (int l = 0; l < LANES; ++l) lanes[l] = std::max(lanes[l], z[tail + l]);
  float top = *std::max_element(lanes, lanes + LANES);
  for (; tail < keys; ++tail) top = std::max(top, z[tail]);
  if (top == -INFINITY) {  // every key masked: zeros
    std::fill(w, w + keys, 0.f);
    return;
  }
  // The softmax, unnormalised, in w; and for entmax.threshold_lower_bound, the sum of x + 1
  // over the keys with x = (alpha - 1)(z - max z) above -1, and their count.
  float dense_sum = 0.f, above = 0.f, inside = 0.f;
#pragma omp simd reduction(+ : dense_sum, above, inside)
  for (int64_t j = 0; j < keys; ++j) {
    w[j] = exp2_of((z[j] - top) * 1.44269504f);
    dense_sum += w[j];
    const float lifted = std::max((alpha - 1.f) * (z[j] - top) + 1.f, 0.f);
    above += lifted;
    inside += lifted > 0.f ? 1.f : 0.f;
  }
  // mean(x) - d^(-1/beta) over those d keys (the maximum among them), or -1.
  float tau = std::max(above / inside - 1.f - 1.f / root<P>(inside, beta), -1.f);
  const int64_t live = keys_above(z, keys, alpha, top, tau, xs, at);
  std::fill(xs + live, xs + live + LANES, -INFINITY);  // padding, where s = 0
  const int64_t padded = (live + LANES - 1) / LANES * LANES;
  // Newton on || [x - tau]_+ ||_beta = 1, from the left: it never overshoots (entmax.py). The keys
  // that fall below tau on the way count 0; dropping them would cost more than it saves.
  for (int step = 0; step < MAX_NEWTON_STEPS; ++step) {
    float mass = 0.f, slope = 0.f;
#pragma omp simd reduction(+ : mass, slope)
    for (int64_t i = 0; i < padded; ++i) {
      const float s = std::max(xs[i] - tau, 0.f);
      const float s_pow = support_power<P>(s, exponent);
      mass += s_pow * s;
      slope += s_pow;
    }
    const float norm = root<P>(mass, beta);  // and norm^(beta - 1) = mass / norm: no power of it
    const float moved = tau + std::max((norm - 1.f) * mass / std::max(norm * slope, TINY), 0.f);
    if (!(moved > tau)) break;
    tau = moved;
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < padded; ++i) {
    const float s = std::max(xs[i] - tau, 0.f);
    xs[i] = support_power<P>(s, exponent) * s;
    sum += xs[i];
  }
  // A row that sees no text key has no mass there (and -inf - -inf would be nan).
  const float log_mass = lse ? top + std::log(dense_sum) - *lse : 0.f;
  const float mass = std::isfinite(log_mass) ? std::exp(log_mass) : 0.f;
  // dense + scale * (sparse - dense): (1 - scale) dense everywhere, then scale * sparse on the support.
  const float keep = mass * (residual ? -scale : 1.f - scale) / dense_sum, add = mass * scale / std::max(sum, TINY);
#pragma omp simd
  for (int64_t j = 0; j < keys; ++j) w[j] *= keep;
  for (int64_t i = 0; i < live; ++i) w[at[i]] += add * xs[i];
}

template <int P>
void rows(const float* z, float* w, int64_t count, int64_t keys, float alpha, float scale, bool residual, const float* lse,
          int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> xs(keys + LANES);
    std::vector<int32_t> at(keys);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < count; ++r)
      row<P>(z + r * keys, w + r * keys, keys, alpha, scale, residual, lse ? lse + r : nullptr, xs.data(), at.data());
  }
}

}  // namespace

// z: float32 logits, count rows of keys, contiguous; w: the weights, in the same layout; lse: null, or
// count float32 log-sum-exps of joint attention's rows.
// power = beta - 1 = 1 / (alpha - 1) - 1 where that is an integer from 0 (sparsemax) to 9, -2 at
// alpha 1.75, else -1 (cpu_rows.POWERS).
extern "C" void pladis_rows(const float* z, float* w, int64_t count, int64_t keys, float alpha, float scale, int power,
                            bool residual, const float* lse, int threads) {
  switch (power) {
    case 0: return rows<0>(z, w, count, keys, alpha, scale, residual, lse, threads);
    case 1: return rows<1>(z, w, count, keys, alpha, scale, residual, lse, threads);
    case 2: return rows<2>(z, w, count, keys, alpha, scale, residual, lse, threads);
    case 3: return rows<3>(z, w, count, keys, alpha, scale, residual, lse, threads);
    case 4: return rows<4>(z, w, count, keys, alpha, scale, residual, lse, threads);
    case 5: return rows<5>(z, w, count, keys, alpha, scale, residual, lse, threads);
    case 6: return rows<6>(z, w, count, keys, alpha, scale, residual, lse, threads);
    case 7: return rows<7>(z, w, count, keys, alpha, scale, residual, lse, threads);
    case 8: return rows<8>(z, w, count, keys, alpha, scale, residual, lse, threads);
    case 9: return rows<9>(z, w, count, keys, alpha, scale, residual, lse, threads);
    case CUBE_ROOT: return rows<CUBE_ROOT>(z, w, count, keys, alpha, scale, residual, lse, threads);
    default: return rows<GENERAL>(z, w, count, keys, alpha, scale, residual, lse, threads);
  }
}
