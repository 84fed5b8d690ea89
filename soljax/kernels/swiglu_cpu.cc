// The SwiGLU MLP of a few decode rows, as an XLA FFI handler for CPU:
// out = (silu(x @ w_gate) * (x @ w_up)) @ w_down, with one layer's weights read in place from the
// stacked [L, D, F] / [L, F, D] arrays (the layer chosen by an operand, so a layer loop never
// copies a layer's weights), and only the rows of w_gate / w_up of input channels some row uses:
// a channel that is zero in every row (pruned) costs nothing. Each task streams a run of
// consecutive weight rows into its own partial sums, which are added up at the end. float32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace {
using namespace soljax_cpu;

constexpr int64_t kRowsPerTask = 32;
constexpr int64_t kMaxRows = 64;  // rows of x whose accumulators one pass over the weights updates

// acc[r][0:n] += sum_j a[r][j] * w[j][0:n] for the N rows r of acc (stride n) and the R weight
// rows w[j] (R <= 4, coefficients a[r * R + j]): each chunk of 8 weights is loaded once for all
// N rows, and each row's accumulator is loaded and stored once per R weight rows.
template <int R>
inline void add_rows(float* acc, int64_t N, const float* a, const float* const* w, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    f8 wv[R];
    for (int j = 0; j < R; ++j) wv[j] = *reinterpret_cast<const f8*>(w[j] + i);
    for (int64_t r = 0; r < N; ++r) {
      f8 s = *reinterpret_cast<const f8*>(acc + r * n + i);
      for (int j = 0; j < R; ++j) s += a[r * R + j] * wv[j];
      *reinterpret_cast<f8*>(acc + r * n + i) = s;
    }
  }
  for (; i < n; ++i)
    for (int64_t r = 0; r < N; ++r)
      for (int j = 0; j < R; ++j) acc[r * n + i] += a[r * R + j] * w[j][i];
}

// acc[N, n] += coef[N, rows] @ w[rows, n] over the listed weight rows (row k at w + idx[k] * n,
// coefficient column idx[k] of coef, whose rows are `stride` apart), four rows at a time, for up
// to kMaxRows rows of acc at once.
void add_listed_rows(float* acc, int64_t N, const float* coef, int64_t stride, const float* w,
                     const int64_t* idx, int64_t count, int64_t n) {
  for (int64_t r0 = 0; r0 < N; r0 += kMaxRows) {
    const int64_t nr = std::min(kMaxRows, N - r0);
    float* ac = acc + r0 * n;
    const float* cf = coef + r0 * stride;
    float a[4 * kMaxRows];  // [nr, 4] coefficients of one group of weight rows
    const float* rows[4];
    int64_t k = 0;
    for (; k + 4 <= count; k += 4) {
      for (int j = 0; j < 4; ++j) rows[j] = w + idx[k + j] * n;
      for (int64_t r = 0; r < nr; ++r)
        for (int j = 0; j < 4; ++j) a[r * 4 + j] = cf[r * stride + idx[k + j]];
      add_rows<4>(ac, nr, a, rows, n);
    }
    for (; k < count; ++k) {
      rows[0] = w + idx[k] * n;
      for (int64_t r = 0; r < nr; ++r) a[r] = cf[r * stride + idx[k]];
      add_rows<1>(ac, nr, a, rows, n);
    }
  }
}

// out[N, n] = sum over tasks of partial[t][N, n]
void add_partials(const std::vector<float>& partial, int64_t tasks, int64_t size, float* out) {
  std::fill(out, out + size, 0.0f);
  for (int64_t t = 0; t < tasks; ++t) {
    const float* p = partial.data() + t * size;
    for (int64_t i = 0; i < size; ++i) out[i] += p[i];
  }
}

ffi::Error SwigluRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_gate,
                      ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down, ffi::Buffer<ffi::S32> layer,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), gd = w_gate.dimensions(), ud = w_up.dimensions(), dd = w_down.dimensions();
  if (xd.size() != 2 || gd.size() != 3 || ud.size() != 3 || dd.size() != 3)
    return ffi::Error::InvalidArgument("expected x [N, D], w_gate and w_up [L, D, F], w_down [L, F, D]");
  const int64_t N = xd[0], D = xd[1], L = gd[0], F = gd[2];
  if (gd[1] != D || ud[0] != L || ud[1] != D || ud[2] != F || dd[0] != L || dd[1] != F || dd[2] != D)
    return ffi::Error::InvalidArgument("the MLP weights do not match x's width");
  const int32_t li = layer.typed_data()[0];
  if (li < 0 || li >= L) return ffi::Error::InvalidArgument("layer index out of range");
  const float* xs = x.typed_data();
  const float* wg = w_gate.typed_data() + li * D * F;
  const float* wu = w_up.typed_data() + li * D * F;
  const float* wd = w_down.typed_data() + li * F * D;

  // gate and up over the used input channels
  std::vector<int64_t> used;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t n = 0; n < N; ++n)
      if (xs[n * D + d] != 0.0f) {
        used.push_back(d);
        break;
      }
  const int64_t U = static_cast<int64_t>(used.size());
  const int64_t tasks1 = std::max<int64_t>(1, (U + kRowsPerTask - 1) / kRowsPerTask);
  std::vector<float> gu_part(tasks1 * N * 2 * F);  // per task: gate [N, F] then up [N, F]
  auto gate_up = [&](int64_t t) {
    float* g = gu_part.data() + t * N * 2 * F;
    std::fill(g, g + N * 2 * F, 0.0f);
    const int64_t first = t * kRowsPerTask, count = std::min(U, first + kRowsPerTask) - first;
    add_listed_rows(g, N, xs, D, wg, used.data() + first, count, F);
    add_listed_rows(g + N * F, N, xs, D, wu, used.data() + first, count, F);
  };
  parallel_for(pool, tasks1, gate_up);
  std::vector<float> gu(N * 2 * F);
  add_partials(gu_part, tasks1, N * 2 * F, gu.data());
  std::vector<float> act(N * F);  // silu(gate) * up
  for (int64_t n = 0; n < N; ++n)
    for (int64_t f = 0; f < F; ++f) {
      const float g = gu[n * F + f];
      act[n * F + f] = g / (1.0f + std::exp(-g)) * gu[(N + n) * F + f];
    }

  // down over every row of w_down
  std::vector<int64_t> all_rows(F);
  for (int64_t f = 0; f < F; ++f) all_rows[f] = f;
  const int64_t tasks2 = (F + 4 * kRowsPerTask - 1) / (4 * kRowsPerTask);
  std::vector<float> down_part(tasks2 * N * D);
  auto down = [&](int64_t t) {
    float* o = down_part.data() + t * N * D;
    std::fill(o, o + N * D, 0.0f);
    const int64_t first = t * 4 * kRowsPerTask, count = std::min(F, first + 4 * kRowsPerTask) - first;
    add_listed_rows(o, N, act.data(), F, wd, all_rows.data() + first, count, D);
  };
  parallel_for(pool, tasks2, down);
  add_partials(down_part, tasks2, N * D, out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(soljax_swiglu_rows_cpu, SwigluRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_gate [L, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_up [L, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_down [L, F, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer [1]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [N, D]
