// What soljax's C++ CPU kernels share: eight-float vectors, e^x, dot products, and running tasks
// on XLA's intra-op thread pool. Included by each kernel source (soljax.kernels.native hashes
// this header into every kernel's build key).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace soljax_cpu {

// Eight floats, loaded and stored at any alignment (GCC vector extensions: AVX on x86, NEON on
// ARM, or scalar code where there is none), and eight int32.
typedef float f8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t i8 __attribute__((vector_size(32)));

// e^x in float32 for x <= 88 (inputs below -87 give ~0), on one float or eight: Cody-Waite
// reduction by ln 2 (n rounded to nearest by the 1.5 * 2^23 shift) and a degree-6 polynomial,
// within a few ulp.
inline float clamp_exp_arg(float x) { return std::min(std::max(x, -87.0f), 88.0f); }
inline f8 clamp_exp_arg(f8 x) {
  x = x < -87.0f ? f8{} - 87.0f : x;
  return x > 88.0f ? f8{} + 88.0f : x;
}
inline float pow2(float n) {
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline f8 pow2(f8 n) { return reinterpret_cast<f8>((__builtin_convertvector(n, i8) + 127) << 23); }

template <class V>
inline V exp_f32(V x) {
  x = clamp_exp_arg(x);
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * pow2(n);
}

inline float hsum(f8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

inline float dot(const float* a, const float* b, int64_t n) {
  if (n % 8 == 0) {
    f8 s0 = {}, s1 = {};
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) {
      s0 += *reinterpret_cast<const f8*>(a + d) * *reinterpret_cast<const f8*>(b + d);
      s1 += *reinterpret_cast<const f8*>(a + d + 8) * *reinterpret_cast<const f8*>(b + d + 8);
    }
    if (d < n) s0 += *reinterpret_cast<const f8*>(a + d) * *reinterpret_cast<const f8*>(b + d);
    return hsum(s0 + s1);
  }
  float s = 0.0f;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// Runs fn(t) for t in [0, n) on the calling thread and the pool's workers. Workers take tasks
// until none is left. The counters outlive this call (a helper may start, or look for a next
// task, after the last task is done and this function has returned); fn is called only for tasks
// below n, all done before it returns.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F& fn) {
  struct Counters { std::atomic<int64_t> next{0}, done{0}; };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, n, &fn] {
    for (int64_t t; (t = counters->next.fetch_add(1)) < n;) {
      fn(t);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n) - 1;
  for (int64_t w = 0; w < helpers; ++w) pool.Schedule(std::function<void()>(work));
  work();
  while (counters->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace soljax_cpu
