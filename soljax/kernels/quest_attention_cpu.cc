// QUEST page-sparse decode attention over the prefix cache, as an XLA FFI handler for CPU.
//
// The prefix half of soljax.kernels.quest_attention's contract: every (row b, schedule k, KV head h)
// reads only the pages of its used slots, straight from the cache (which may hold every layer:
// [L, B, M, Hkv, Dh], the layer chosen by an operand, so a layer loop never copies its slice),
// query head g of the group attending a slot's page iff bit g of its bitmask is set. It returns
// each query head's softmax-normalized output over those keys and its log-sum-exp (-inf when it
// attended nothing), which the caller merges with the suffix keys. float32; work is split over
// (b, k, h, chunk of slots) on XLA's intra-op thread pool, with an online softmax per page.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxPage = 256;
constexpr int64_t kMaxGroup = 31;
constexpr int64_t kSlotsPerTask = 32;

// e^x in float32 for x <= 88 (inputs below -87 give ~0): Cody-Waite reduction by ln 2 and a
// degree-6 polynomial, within a few ulp, written so that loops over it vectorize.
inline float exp_f32(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Shape {
  int64_t B, K, Hq, Hkv, G, Dh, M, NP, page;
};

// Online softmax state of the G query heads of one (b, k, h) over some slots.
struct State {
  float m[kMaxGroup], l[kMaxGroup];
  std::vector<float> acc;  // [G, Dh]
};

void attend_slots(const Shape& s, const float* q, const float* k, const float* v, const int32_t* pages,
                  const int32_t* heads, int64_t first, int64_t last, int64_t length, float scale, State& st) {
  const int64_t row = s.Hkv * s.Dh;  // floats between consecutive positions of one KV head
  std::fill(st.m, st.m + s.G, -INFINITY);
  std::fill(st.l, st.l + s.G, 0.0f);
  std::fill(st.acc.begin(), st.acc.end(), 0.0f);
  float logit[kMaxPage];
  for (int64_t slot = first; slot < last; ++slot) {
    const int64_t p0 = static_cast<int64_t>(pages[slot]) * s.page;
    const int64_t n = std::min(s.page, length - p0);
    const uint32_t bits = static_cast<uint32_t>(heads[slot]);
    if (p0 < 0 || n <= 0 || bits == 0) continue;
    for (int64_t g = 0; g < s.G; ++g) {
      if (!((bits >> g) & 1u)) continue;
      const float* qg = q + g * s.Dh;
      float top = st.m[g];
      for (int64_t i = 0; i < n; ++i) {
        const float* kr = k + (p0 + i) * row;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < s.Dh; ++d) dot += qg[d] * kr[d];
        logit[i] = dot * scale;
        top = std::max(top, logit[i]);
      }
      const float alpha = std::isinf(st.m[g]) ? 0.0f : exp_f32(st.m[g] - top);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < n; ++i) {
        logit[i] = exp_f32(logit[i] - top);
        sum += logit[i];
      }
      st.m[g] = top;
      st.l[g] = st.l[g] * alpha + sum;
      float* a = st.acc.data() + g * s.Dh;
#pragma omp simd
      for (int64_t d = 0; d < s.Dh; ++d) a[d] *= alpha;
      for (int64_t i = 0; i < n; ++i) {
        const float* vr = v + (p0 + i) * row;
        const float w = logit[i];
#pragma omp simd
        for (int64_t d = 0; d < s.Dh; ++d) a[d] += w * vr[d];
      }
    }
  }
}

ffi::Error QuestDecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache,
                                ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::S32> layer,
                                ffi::Buffer<ffi::S32> prefix_len, ffi::Buffer<ffi::S32> pages,
                                ffi::Buffer<ffi::S32> num_pages, ffi::Buffer<ffi::S32> page_heads,
                                ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, int64_t page_size) {
  const auto qd = q.dimensions(), cd = k_cache.dimensions(), pd = pages.dimensions();
  if (qd.size() != 4 || cd.size() != 5 || pd.size() != 4)
    return ffi::Error::InvalidArgument("expected q [B, K, Hq, Dh], caches [L, B, M, Hkv, Dh], pages [B, K, Hkv, NP]");
  const Shape s{qd[0], qd[1], qd[2], cd[3], qd[2] / cd[3], qd[3], cd[2], pd[3], page_size};
  const int64_t L = cd[0];
  const int32_t li = layer.typed_data()[0];
  if (li < 0 || li >= L) return ffi::Error::InvalidArgument("layer index out of range");
  if (s.page < 1 || s.page > kMaxPage) return ffi::Error::InvalidArgument("page_size must be in 1..256");
  if (s.G > kMaxGroup || s.G * s.Hkv != s.Hq) return ffi::Error::InvalidArgument("bad query/KV head counts");
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.Dh));
  const int64_t layer_stride = s.B * s.M * s.Hkv * s.Dh;
  const float* kl = k_cache.typed_data() + li * layer_stride;
  const float* vl = v_cache.typed_data() + li * layer_stride;

  struct Task { int64_t b, k, h, first, last; };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t k = 0; k < s.K; ++k)
      for (int64_t h = 0; h < s.Hkv; ++h) {
        const int64_t used = std::min<int64_t>(num_pages.typed_data()[(b * s.K + k) * s.Hkv + h], s.NP);
        for (int64_t f = 0; f < std::max<int64_t>(used, 1); f += kSlotsPerTask)
          tasks.push_back({b, k, h, f, std::min(used, f + kSlotsPerTask)});
      }
  const int64_t T = static_cast<int64_t>(tasks.size());
  std::vector<State> states(T);
  for (State& st : states) st.acc.resize(s.G * s.Dh);
  auto run = [&](int64_t t) {
    const Task& tk = tasks[t];
    const int64_t list = ((tk.b * s.K + tk.k) * s.Hkv + tk.h) * s.NP;
    const int64_t length = std::min<int64_t>(prefix_len.typed_data()[tk.b], s.M);
    attend_slots(s, q.typed_data() + ((tk.b * s.K + tk.k) * s.Hq + tk.h * s.G) * s.Dh,
                 kl + tk.b * s.M * s.Hkv * s.Dh + tk.h * s.Dh, vl + tk.b * s.M * s.Hkv * s.Dh + tk.h * s.Dh,
                 pages.typed_data() + list, page_heads.typed_data() + list, tk.first, tk.last, length, scale,
                 states[t]);
  };
  // Workers take tasks until none is left. The counters outlive this call (a helper may start, or
  // look for a next task, after the last task is done and this function has returned); the
  // task data is touched only for tasks below T, all done before it returns.
  struct Counters { std::atomic<int64_t> next{0}, done{0}; };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, T, &run] {
    for (int64_t t; (t = counters->next.fetch_add(1)) < T;) {
      run(t);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), T) - 1;
  for (int64_t w = 0; w < helpers; ++w) pool.Schedule(std::function<void()>(work));
  work();
  while (counters->done.load(std::memory_order_acquire) < T) std::this_thread::yield();

  // merge the chunks of each (b, k, h): tasks of one list are consecutive
  float* o = out->typed_data();
  float* ls = lse->typed_data();
  for (int64_t t0 = 0; t0 < T;) {
    int64_t t1 = t0 + 1;
    const Task& tk = tasks[t0];
    while (t1 < T && tasks[t1].b == tk.b && tasks[t1].k == tk.k && tasks[t1].h == tk.h) ++t1;
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t hq = (tk.b * s.K + tk.k) * s.Hq + tk.h * s.G + g;
      float top = -INFINITY;
      for (int64_t t = t0; t < t1; ++t)
        if (states[t].l[g] > 0) top = std::max(top, states[t].m[g]);
      float* og = o + hq * s.Dh;
      std::fill(og, og + s.Dh, 0.0f);
      float den = 0.0f;
      for (int64_t t = t0; t < t1; ++t) {
        if (!(states[t].l[g] > 0)) continue;
        const float w = exp_f32(states[t].m[g] - top);
        den += w * states[t].l[g];
        const float* a = states[t].acc.data() + g * s.Dh;
        for (int64_t d = 0; d < s.Dh; ++d) og[d] += w * a[d];
      }
      if (den > 0)
        for (int64_t d = 0; d < s.Dh; ++d) og[d] /= den;
      ls[hq] = den > 0 ? top + std::log(den) : -INFINITY;
    }
    t0 = t1;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(soljax_quest_decode_attention_cpu, QuestDecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, K, Hq, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache [L, B, M, Hkv, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer [1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // prefix_len [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pages [B, K, Hkv, NP]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_pages [B, K, Hkv]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_heads [B, K, Hkv, NP]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, K, Hq, Dh]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse [B, K, Hq]
                                  .Attr<int64_t>("page_size"));
