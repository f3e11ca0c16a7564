// PLADIS weights on the CPU for alpha = 2, 1.5 and 1 + 1/n (1.25, 1.2, ...), row by row:
//
//     W = dense + scale * (entmax_alpha(z) - dense)      (residual: scale * (entmax_alpha(z) - dense))
//
// The Newton iteration of entmax.py, from the same lower bound, on one row at a time while it
// sits in the cache: torch.compile's C++ code runs each sum of the iteration as its own loop over
// every row of the chunk, which costs 2-4 times the host's dense attention at 77 keys. Each row
// stops when its own threshold stops moving, as in entmax.py, so no row is left unsettled.
// cpu_rows.py builds this file with the machine's C++ compiler (-O3 -march=native -fopenmp).
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int MAX_NEWTON_STEPS = 50;  // as entmax.py
constexpr float TINY = 1.17549435e-38f;

// s^P for s >= 0, with 0^0 = 0 so that only the support counts (P = beta - 1, beta = 1 / (alpha - 1)).
template <int P>
inline float support_power(float s) {
  float r = s > 0.f ? 1.f : 0.f;
  for (int i = 0; i < P; ++i) r *= s;
  return r;
}

// a^(1 / beta), by square roots where beta allows.
template <int P>
inline float root(float a) {
  if (P == 0) return a;
  if (P == 1) return std::sqrt(a);
  if (P == 3) return std::sqrt(std::sqrt(a));
  if (P == 7) return std::sqrt(std::sqrt(std::sqrt(a)));
  return std::pow(a, 1.f / (P + 1));
}

template <int P>
void row(const float* z, float* w, int64_t keys, float alpha, float scale, bool residual, float* x) {
  float top = -INFINITY;
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < keys; ++j) top = std::max(top, z[j]);
  if (top == -INFINITY) {  // every key masked: zeros (the softmax given in w is NaN there)
    std::fill(w, w + keys, 0.f);
    return;
  }
  // x = (alpha - 1)(z - max z), and entmax.threshold_lower_bound: mean(x) - d^(-1/beta) over the d finite keys, or -1.
  float total = 0.f, finite = 0.f;
#pragma omp simd reduction(+ : total, finite)
  for (int64_t j = 0; j < keys; ++j) {
    x[j] = (alpha - 1.f) * (z[j] - top);
    const bool seen = x[j] > -INFINITY;
    total += seen ? x[j] : 0.f;
    finite += seen ? 1.f : 0.f;
  }
  float tau = std::max(total / finite - 1.f / root<P>(finite), -1.f);
  // Newton on || [x - tau]_+ ||_beta = 1, from the left: it never overshoots (entmax.py).
  for (int step = 0; step < MAX_NEWTON_STEPS; ++step) {
    float mass = 0.f, slope = 0.f;
#pragma omp simd reduction(+ : mass, slope)
    for (int64_t j = 0; j < keys; ++j) {
      const float s = std::max(x[j] - tau, 0.f);
      const float s_pow = support_power<P>(s);
      mass += s_pow * s;
      slope += s_pow;
    }
    const float norm = root<P>(mass);
    const float moved = tau + std::max((norm - 1.f) * support_power<P>(norm) / std::max(slope, TINY), 0.f);
    if (!(moved > tau)) break;
    tau = moved;
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < keys; ++j) {
    const float s = std::max(x[j] - tau, 0.f);
    x[j] = support_power<P>(s) * s;
    sum += x[j];
  }
  const float inv = 1.f / std::max(sum, TINY);
#pragma omp simd
  for (int64_t j = 0; j < keys; ++j) {
    const float correction = scale * (x[j] * inv - w[j]);
    w[j] = residual ? correction : w[j] + correction;
  }
}

template <int P>
void rows(const float* z, float* w, int64_t count, int64_t keys, float alpha, float scale, bool residual, int threads) {
#pragma omp parallel num_threads(threads)
  {
    float* x = new float[keys];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < count; ++r) row<P>(z + r * keys, w + r * keys, keys, alpha, scale, residual, x);
    delete[] x;
  }
}

}  // namespace

// z: float32 logits, count rows of keys, contiguous. w: the same layout, softmax(z) on entry and
// the weights on return. power = beta - 1 = 1 / (alpha - 1) - 1, from 0 (sparsemax) to 9
// (cpu_rows.POWERS).
extern "C" void pladis_rows(const float* z, float* w, int64_t count, int64_t keys, float alpha, float scale, int power,
                            bool residual, int threads) {
  switch (power) {
    case 0: return rows<0>(z, w, count, keys, alpha, scale, residual, threads);
    case 1: return rows<1>(z, w, count, keys, alpha, scale, residual, threads);
    case 2: return rows<2>(z, w, count, keys, alpha, scale, residual, threads);
    case 3: return rows<3>(z, w, count, keys, alpha, scale, residual, threads);
    case 4: return rows<4>(z, w, count, keys, alpha, scale, residual, threads);
    case 5: return rows<5>(z, w, count, keys, alpha, scale, residual, threads);
    case 6: return rows<6>(z, w, count, keys, alpha, scale, residual, threads);
    case 7: return rows<7>(z, w, count, keys, alpha, scale, residual, threads);
    case 8: return rows<8>(z, w, count, keys, alpha, scale, residual, threads);
    case 9: return rows<9>(z, w, count, keys, alpha, scale, residual, threads);
  }
}
