// QUEST page-sparse decode attention over the prefix cache, as an XLA FFI handler for CPU.
//
// The prefix half of soljax.kernels.quest_attention's contract: every (row b, schedule k, KV head h)
// reads only the pages of its used slots, straight from the cache (which may hold every layer:
// [L, B, M, Hkv, Dh], the layer chosen by an operand, so a layer loop never copies its slice),
// query head g of the group attending a slot's page iff bit g of its bitmask is set. It returns
// each query head's softmax-normalized output over those keys and its log-sum-exp (-inf when it
// attended nothing), which the caller merges with the suffix keys.
//
// Page lists of shape [B, 1, Hkv, NP] with K > 1 queries are shared by the K queries of a row:
// each page is then read once for all K * G query heads of a KV head (a many-query pass over a
// cache, such as a dense replay of T tokens). float32; work is split over (b, list, chunk of
// slots) on XLA's intra-op thread pool, each task serving every KV head, with an online softmax
// per page.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace {
using namespace soljax_cpu;

constexpr int64_t kMaxPage = 256;
constexpr int64_t kMaxGroup = 31;
constexpr int64_t kSlotsPerTask = 32;

// acc[0:8C] = acc * alpha + sum_i w[i] * rows[i * stride + 0:8C] with C independent accumulators
// in registers (one chain per chunk of 8 would wait on the FMA latency at every row).
template <int C>
inline void scale_add_block(float* acc, float alpha, const float* w, const float* rows, int64_t count,
                            int64_t stride) {
  f8 a[C];
  for (int c = 0; c < C; ++c) a[c] = *reinterpret_cast<const f8*>(acc + 8 * c) * alpha;
  for (int64_t i = 0; i < count; ++i) {
    const float* r = rows + i * stride;
    for (int c = 0; c < C; ++c) a[c] += w[i] * *reinterpret_cast<const f8*>(r + 8 * c);
  }
  for (int c = 0; c < C; ++c) *reinterpret_cast<f8*>(acc + 8 * c) = a[c];
}

// acc[0:n] = acc * alpha + sum_i w[i] * rows[i * stride + 0:n], for `count` rows.
inline void scale_add_rows(float* acc, float alpha, const float* w, const float* rows, int64_t count,
                           int64_t stride, int64_t n) {
  int64_t d = 0;
  for (; d + 64 <= n; d += 64) scale_add_block<8>(acc + d, alpha, w, rows + d, count, stride);
  for (; d + 32 <= n; d += 32) scale_add_block<4>(acc + d, alpha, w, rows + d, count, stride);
  for (; d + 8 <= n; d += 8) scale_add_block<1>(acc + d, alpha, w, rows + d, count, stride);
  for (; d < n; ++d) {
    float a = acc[d] * alpha;
    for (int64_t i = 0; i < count; ++i) a += w[i] * rows[i * stride + d];
    acc[d] = a;
  }
}

struct Shape {
  int64_t B, K, KL, Hq, Hkv, G, Dh, M, NP, page;  // KL: the page lists' K (K, or 1 = shared)
};

// The query heads one task serves, each with an online softmax state over the task's slots: for
// every KV head h, the G heads of one (b, k, h), or with shared lists the K * G heads of (b, h),
// k-major; rows [h * per_head, (h + 1) * per_head) belong to KV head h.
struct Rows {
  int64_t n, per_head;
  std::vector<const float*> q;  // [n] query vectors
  std::vector<int32_t> g;       // [n] the head's bit in the page bitmasks
  std::vector<float> m, l, acc;  // [n], [n], [n, Dh]
  std::vector<float> kt;        // [Dh, kKeyBlock]: a block of keys, transposed (many rows per head)
};

// Rows of a KV head from which on a block of keys is transposed once, so that each row's logits
// are plain multiply-adds over the block (no per-key horizontal sums); fewer rows use dot products.
constexpr int64_t kManyRows = 8;
constexpr int64_t kKeyBlock = 32;

// Folds n keys' logits (scaled; overwritten) into row j's online softmax and accumulator.
inline void fold(Rows& r, int64_t j, float* logit, int64_t n, const float* vp, int64_t row, int64_t Dh) {
  float top = r.m[j];
  for (int64_t i = 0; i < n; ++i) top = std::max(top, logit[i]);
  const float alpha = std::isinf(r.m[j]) ? 0.0f : exp_f32(r.m[j] - top);
  f8 sum8 = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const f8 e = exp_f32(*reinterpret_cast<const f8*>(logit + i) - top);
    *reinterpret_cast<f8*>(logit + i) = e;
    sum8 += e;
  }
  float sum = hsum(sum8);
  for (; i < n; ++i) {
    logit[i] = exp_f32(logit[i] - top);
    sum += logit[i];
  }
  r.m[j] = top;
  r.l[j] = r.l[j] * alpha + sum;
  scale_add_rows(r.acc.data() + j * Dh, alpha, logit, vp, n, row, Dh);
}

// The rows of KV head h whose bit is set, over n <= kKeyBlock keys at kp / vp: the keys are
// transposed into r.kt, then each pair of rows takes 2 * kKeyBlock / 8 independent accumulators.
void fold_block(Rows& r, int64_t h, uint32_t bits, const float* kp, const float* vp, int64_t n, int64_t row,
                int64_t Dh, float scale) {
  float* kt = r.kt.data();
  for (int64_t d = 0; d < Dh; ++d) {
    for (int64_t i = 0; i < n; ++i) kt[d * kKeyBlock + i] = kp[i * row + d];
    for (int64_t i = n; i < kKeyBlock; ++i) kt[d * kKeyBlock + i] = 0.0f;
  }
  constexpr int C = kKeyBlock / 8;
  alignas(32) float logit[2][kKeyBlock];
  int64_t pair[2], np = 0;
  auto flush = [&] {
    f8 a[2][C] = {};
    for (int64_t d = 0; d < Dh; ++d) {
      const float q0 = r.q[pair[0]][d], q1 = np > 1 ? r.q[pair[1]][d] : 0.0f;
      for (int c = 0; c < C; ++c) {
        const f8 kc = *reinterpret_cast<const f8*>(kt + d * kKeyBlock + 8 * c);
        a[0][c] += q0 * kc;
        a[1][c] += q1 * kc;
      }
    }
    for (int64_t p = 0; p < np; ++p) {
      for (int c = 0; c < C; ++c) *reinterpret_cast<f8*>(logit[p] + 8 * c) = a[p][c] * scale;
      fold(r, pair[p], logit[p], n, vp, row, Dh);
    }
    np = 0;
  };
  for (int64_t j = h * r.per_head; j < (h + 1) * r.per_head; ++j) {
    if (!((bits >> r.g[j]) & 1u)) continue;
    pair[np++] = j;
    if (np == 2) flush();
  }
  if (np) flush();
}

// One task: slots [first, last) of the page lists of every KV head of one (b, list). At each slot
// the KV heads take turns, so where their lists agree (a dense pass, a shared selection) the
// task reads whole cache rows in order, which streams; a KV head's own rows are strided (Dh
// floats every Hkv * Dh), which the hardware prefetchers follow poorly: the next slot's page is
// asked for while this one computes.
void attend_slots(const Shape& s, const float* k, const float* v, const int32_t* pages, const int32_t* heads,
                  const int32_t* num, int64_t first, int64_t last, int64_t length, float scale, Rows& r) {
  const int64_t row = s.Hkv * s.Dh;  // floats between consecutive positions
  std::fill(r.m.begin(), r.m.end(), -INFINITY);
  std::fill(r.l.begin(), r.l.end(), 0.0f);
  std::fill(r.acc.begin(), r.acc.end(), 0.0f);
  const bool many = r.per_head >= kManyRows;
  if (many) r.kt.resize(s.Dh * kKeyBlock);
  float logit[kMaxPage];
  for (int64_t slot = first; slot < last; ++slot)
    for (int64_t h = 0; h < s.Hkv; ++h) {
      const int64_t used = std::min<int64_t>(num[h], s.NP);
      if (slot >= used) continue;
      if (slot + 1 < used) {
        const int64_t p1 = static_cast<int64_t>(pages[h * s.NP + slot + 1]) * s.page;
        for (int64_t i = 0; i < std::min(s.page, length - p1); ++i)
          for (int64_t d = 0; d < s.Dh; d += 16) {  // one 64-byte line per 16 floats
            __builtin_prefetch(k + (p1 + i) * row + h * s.Dh + d);
            __builtin_prefetch(v + (p1 + i) * row + h * s.Dh + d);
          }
      }
      const int64_t p0 = static_cast<int64_t>(pages[h * s.NP + slot]) * s.page;
      const int64_t n = std::min(s.page, length - p0);
      const uint32_t bits = static_cast<uint32_t>(heads[h * s.NP + slot]);
      if (p0 < 0 || n <= 0 || bits == 0) continue;
      const float* kp = k + p0 * row + h * s.Dh;
      const float* vp = v + p0 * row + h * s.Dh;
      if (many) {
        for (int64_t i0 = 0; i0 < n; i0 += kKeyBlock)
          fold_block(r, h, bits, kp + i0 * row, vp + i0 * row, std::min(kKeyBlock, n - i0), row, s.Dh, scale);
        continue;
      }
      for (int64_t j = h * r.per_head; j < (h + 1) * r.per_head; ++j) {
        if (!((bits >> r.g[j]) & 1u)) continue;
        for (int64_t i = 0; i < n; ++i) logit[i] = dot(r.q[j], kp + i * row, s.Dh) * scale;
        fold(r, j, logit, n, vp, row, s.Dh);
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
  const Shape s{qd[0], qd[1], pd[1], qd[2], cd[3], qd[2] / cd[3], qd[3], cd[2], pd[3], page_size};
  const int64_t L = cd[0];
  const int32_t li = layer.typed_data()[0];
  if (li < 0 || li >= L) return ffi::Error::InvalidArgument("layer index out of range");
  if (s.page < 1 || s.page > kMaxPage) return ffi::Error::InvalidArgument("page_size must be in 1..256");
  if (s.G > kMaxGroup || s.G * s.Hkv != s.Hq) return ffi::Error::InvalidArgument("bad query/KV head counts");
  if (s.KL != s.K && s.KL != 1) return ffi::Error::InvalidArgument("page lists must have K or 1 schedules");
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.Dh));
  const int64_t layer_stride = s.B * s.M * s.Hkv * s.Dh;
  const float* kl = k_cache.typed_data() + li * layer_stride;
  const float* vl = v_cache.typed_data() + li * layer_stride;
  const int64_t per_list = s.KL == s.K ? 1 : s.K;  // queries per page list
  const int64_t per_head = per_list * s.G;        // rows per KV head in a task

  struct Task { int64_t b, list, first, last; };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t c = 0; c < s.KL; ++c) {
      int64_t used = 0;
      for (int64_t h = 0; h < s.Hkv; ++h)
        used = std::max<int64_t>(used, std::min<int64_t>(num_pages.typed_data()[(b * s.KL + c) * s.Hkv + h], s.NP));
      for (int64_t f = 0; f < std::max<int64_t>(used, 1); f += kSlotsPerTask)
        tasks.push_back({b, c, f, std::min(used, f + kSlotsPerTask)});
    }
  const int64_t T = static_cast<int64_t>(tasks.size());
  // row j of a task: KV head h = j / per_head, query k = list * per_list + (j % per_head) / G (or
  // k = list), head g = j % G of the group
  auto query = [&](const Task& tk, int64_t j) {
    const int64_t h = j / per_head, i = j % per_head;
    return (tk.b * s.K + tk.list * per_list + i / s.G) * s.Hq + h * s.G + i % s.G;
  };
  std::vector<Rows> rows(T);
  for (int64_t t = 0; t < T; ++t) {
    Rows& r = rows[t];
    r.n = s.Hkv * per_head, r.per_head = per_head;
    r.m.resize(r.n), r.l.resize(r.n), r.acc.resize(r.n * s.Dh);
    for (int64_t j = 0; j < r.n; ++j) {
      r.q.push_back(q.typed_data() + query(tasks[t], j) * s.Dh);
      r.g.push_back(static_cast<int32_t>(j % s.G));
    }
  }
  auto run = [&](int64_t t) {
    const Task& tk = tasks[t];
    const int64_t list = (tk.b * s.KL + tk.list) * s.Hkv;
    const int64_t length = std::min<int64_t>(prefix_len.typed_data()[tk.b], s.M);
    const int64_t at = tk.b * s.M * s.Hkv * s.Dh;
    attend_slots(s, kl + at, vl + at, pages.typed_data() + list * s.NP, page_heads.typed_data() + list * s.NP,
                 num_pages.typed_data() + list, tk.first, tk.last, length, scale, rows[t]);
  };
  parallel_for(pool, T, run);

  // merge the chunks of each list's rows: tasks of one list are consecutive
  float* o = out->typed_data();
  float* ls = lse->typed_data();
  for (int64_t t0 = 0; t0 < T;) {
    int64_t t1 = t0 + 1;
    const Task& tk = tasks[t0];
    while (t1 < T && tasks[t1].b == tk.b && tasks[t1].list == tk.list) ++t1;
    for (int64_t j = 0; j < rows[t0].n; ++j) {
      const int64_t hq = query(tk, j);
      float top = -INFINITY;
      for (int64_t t = t0; t < t1; ++t)
        if (rows[t].l[j] > 0) top = std::max(top, rows[t].m[j]);
      float* og = o + hq * s.Dh;
      std::fill(og, og + s.Dh, 0.0f);
      float den = 0.0f;
      for (int64_t t = t0; t < t1; ++t) {
        if (!(rows[t].l[j] > 0)) continue;
        const float w = exp_f32(rows[t].m[j] - top);
        den += w * rows[t].l[j];
        const float* a = rows[t].acc.data() + j * s.Dh;
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
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pages [B, K or 1, Hkv, NP]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_pages [B, K or 1, Hkv]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_heads [B, K or 1, Hkv, NP]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, K, Hq, Dh]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse [B, K, Hq]
                                  .Attr<int64_t>("page_size"));
