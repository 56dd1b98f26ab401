// CPU: gradient truncation and the fused WormSGD step (truncate, decay, momentum,
// update in one pass over each parameter).
//
// Rounding follows torch.optim.SGD's single-tensor path op by op, so results match
// the reference bit for bit where ATen's kernels do the same arithmetic: every op
// rounds to the parameter dtype; `a.add(b, alpha=s)` is fma(b, s, a) in fp32 (ATen's
// vectorised kernels fuse it when its CPU capability is AVX2/AVX512), with s rounded
// to the dtype for bf16/fp16; `a.mul(s)` keeps s in fp32.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common.h"

namespace worm {
namespace {

template <int DT> struct Elem;
template <> struct Elem<kF32> { using T = float; };
template <> struct Elem<kBF16> { using T = c10::BFloat16; };
template <> struct Elem<kF16> { using T = c10::Half; };

template <int DT>
inline float ld(const typename Elem<DT>::T* p, int64_t i) { return float(p[i]); }
template <int DT>
inline float rnd(float x) { return float(typename Elem<DT>::T(x)); }  // round to dtype
template <int DT>
inline float alpha_of(double a) { return rnd<DT>(float(a)); }           // ATen's alpha cast

template <bool FMA>
inline float madd(float a, float b, float c) {  // a * b + c
  if constexpr (FMA) return __builtin_fmaf(a, b, c);
  else return a * b + c;
}

template <class F>
inline void dispatch_dt(int32_t dt, F&& f) {
  if (dt == kF32) f(std::integral_constant<int, kF32>{});
  else if (dt == kBF16) f(std::integral_constant<int, kBF16>{});
  else f(std::integral_constant<int, kF16>{});
}

// Whether ATen's CPU kernels fuse multiply-add here (its AVX2/AVX512 kernels do).
bool aten_uses_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool v = [] {
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env && (std::strcmp(env, "default") == 0 || std::strcmp(env, "DEFAULT") == 0)) return false;
    return bool(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
  }();
  return v;
#else
  return true;  // aarch64: fused everywhere
#endif
}

struct SgdArgs {
  float r, lr, wd, mom, damp1, mom_a;  // damp1 = 1 - dampening (as ATen's alpha)
  bool has_wd, has_mom, nesterov, maximize;
};

// The per-entry math, with the hyper-parameter switches as template flags so the
// loop over 8 entries (one mask byte) has no branches and vectorises. Truncation is a
// multiply by 1 (exact) or r chosen by the bit: random masks would defeat a branch.
// MOM: 0 no momentum, 1 first step (buffer = gradient), 2 running buffer.
template <int DT, bool FMA, bool WD, int MOM, bool NEST, bool MAXI>
inline __attribute__((always_inline)) void sgd_kernel(
    typename Elem<DT>::T* __restrict p, const typename Elem<DT>::T* __restrict g,
    typename Elem<DT>::T* __restrict buf, const uint8_t* bits, const SgdArgs& a, int64_t b,
    int64_t e) {
  using T = typename Elem<DT>::T;
  // alphas exactly as ATen receives them (rounded to the dtype for bf16/fp16)
  const float wd = alpha_of<DT>(a.wd), d1 = alpha_of<DT>(a.damp1);
  const float ma = alpha_of<DT>(a.mom_a), nlr = alpha_of<DT>(-double(a.lr));
  const float mom = a.mom;
  const float scale[2] = {a.r, 1.0f};  // r stays fp32: one rounding of g * r
  auto body = [&](int64_t i, uint32_t keep) __attribute__((always_inline)) {
    float gi = ld<DT>(g, i);
    if (bits) gi = rnd<DT>(gi * scale[keep]);
    if constexpr (MAXI) gi = -gi;
    const float pi = ld<DT>(p, i);
    if constexpr (WD) gi = rnd<DT>(madd<FMA>(pi, wd, gi));
    if constexpr (MOM != 0) {
      float bi;
      if constexpr (MOM == 1) {
        bi = gi;
      } else {
        bi = rnd<DT>(ld<DT>(buf, i) * mom);
        bi = rnd<DT>(madd<FMA>(gi, d1, bi));
      }
      buf[i] = T(bi);
      if constexpr (NEST) gi = rnd<DT>(madd<FMA>(bi, ma, gi));
      else gi = bi;
    }
    p[i] = T(madd<FMA>(gi, nlr, pi));
  };
  int64_t i0 = b;
  for (; i0 + 8 <= e; i0 += 8) {
    const uint32_t byte = bits ? bits[i0 >> 3] : 0xffu;
    for (int j = 0; j < 8; ++j) body(i0 + j, (byte >> j) & 1u);
  }
  if (i0 < e) {
    const uint32_t byte = bits ? bits[i0 >> 3] : 0xffu;
    for (int64_t i = i0; i < e; ++i) body(i, (byte >> (i - i0)) & 1u);
  }
}

// One range [b, e) of one parameter; b is a multiple of 8 (a mask byte).
template <int DT, bool FMA>
inline __attribute__((always_inline)) void sgd_range(
    typename Elem<DT>::T* p, const typename Elem<DT>::T* g, typename Elem<DT>::T* buf,
    const uint8_t* bits, bool fresh, const SgdArgs& a, int64_t b, int64_t e) {
  const int mom = a.has_mom ? (fresh ? 1 : 2) : 0;
  auto go = [&](auto wd, auto m, auto nest, auto maxi) {
    sgd_kernel<DT, FMA, decltype(wd)::value, decltype(m)::value, decltype(nest)::value,
               decltype(maxi)::value>(p, g, buf, bits, a, b, e);
  };
  using t_ = std::true_type;
  using f_ = std::false_type;
  auto with_maxi = [&](auto wd, auto m, auto nest) {
    if (a.maximize) go(wd, m, nest, t_{}); else go(wd, m, nest, f_{});
  };
  auto with_nest = [&](auto wd, auto m) {
    if (a.nesterov && decltype(m)::value != 0) with_maxi(wd, m, t_{}); else with_maxi(wd, m, f_{});
  };
  auto with_mom = [&](auto wd) {
    if (mom == 0) with_nest(wd, std::integral_constant<int, 0>{});
    else if (mom == 1) with_nest(wd, std::integral_constant<int, 1>{});
    else with_nest(wd, std::integral_constant<int, 2>{});
  };
  if (a.has_wd) with_mom(t_{}); else with_mom(f_{});
}

template <int DT, bool FMA>
inline __attribute__((always_inline)) void truncate_range(typename Elem<DT>::T* __restrict g,
                                                          const uint8_t* bits, float r_in,
                                                          int64_t b, int64_t e) {
  using T = typename Elem<DT>::T;
  // fp32 product rounded once to the dtype (the reference); kept entries are
  // multiplied by 1, which is exact, so the byte loop needs no branch per entry.
  const float scale[2] = {r_in, 1.0f};
  int64_t i0 = b;
  for (; i0 + 8 <= e; i0 += 8) {
    const uint32_t byte = bits[i0 >> 3];
    if (byte == 0xffu) continue;  // all kept: nothing to scale
    for (int j = 0; j < 8; ++j) g[i0 + j] = T(float(g[i0 + j]) * scale[(byte >> j) & 1u]);
  }
  if (i0 < e) {
    const uint32_t byte = bits[i0 >> 3];
    for (int64_t i = i0; i < e; ++i) g[i] = T(float(g[i]) * scale[(byte >> (i - i0)) & 1u]);
  }
}

struct Job {
  void* p; const void* g; void* buf; const uint8_t* bits; bool fresh; int32_t dt;
};

// Two builds of the hot loops: plain, and (x86) AVX2+FMA to match ATen's fused
// kernels and vectorise; picked at run time.
void run_sgd_default(const Job& j, const SgdArgs& a, int64_t b, int64_t e) {
  dispatch_dt(j.dt, [&](auto dtc) {
    constexpr int DT = decltype(dtc)::value;
    using T = typename Elem<DT>::T;
    sgd_range<DT, false>((T*)j.p, (const T*)j.g, (T*)j.buf, j.bits, j.fresh, a, b, e);
  });
}
void trunc_default(const Job& j, float r, int64_t b, int64_t e) {
  dispatch_dt(j.dt, [&](auto dtc) {
    constexpr int DT = decltype(dtc)::value;
    using T = typename Elem<DT>::T;
    truncate_range<DT, false>((T*)j.p, j.bits, r, b, e);
  });
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2,fma"))) void run_sgd_fma(const Job& j, const SgdArgs& a, int64_t b,
                                                      int64_t e) {
  using namespace c10;
  if (j.dt == kF32)
    sgd_range<kF32, true>((float*)j.p, (const float*)j.g, (float*)j.buf, j.bits, j.fresh, a, b, e);
  else if (j.dt == kBF16)
    sgd_range<kBF16, true>((BFloat16*)j.p, (const BFloat16*)j.g, (BFloat16*)j.buf, j.bits, j.fresh,
                           a, b, e);
  else
    sgd_range<kF16, true>((Half*)j.p, (const Half*)j.g, (Half*)j.buf, j.bits, j.fresh, a, b, e);
}
__attribute__((target("avx2,fma"))) void trunc_fma(const Job& j, float r, int64_t b, int64_t e) {
  if (j.dt == kF32) truncate_range<kF32, true>((float*)j.p, j.bits, r, b, e);
  else if (j.dt == kBF16) truncate_range<kBF16, true>((c10::BFloat16*)j.p, j.bits, r, b, e);
  else truncate_range<kF16, true>((c10::Half*)j.p, j.bits, r, b, e);
}
#else
void run_sgd_fma(const Job& j, const SgdArgs& a, int64_t b, int64_t e) {
  dispatch_dt(j.dt, [&](auto dtc) {
    constexpr int DT = decltype(dtc)::value;
    using T = typename Elem<DT>::T;
    sgd_range<DT, true>((T*)j.p, (const T*)j.g, (T*)j.buf, j.bits, j.fresh, a, b, e);
  });
}
void trunc_fma(const Job& j, float r, int64_t b, int64_t e) { trunc_default(j, r, b, e); }
#endif

// Splits every job into 64 Ki-entry units and runs fn(job, begin, end) over them.
template <class F>
void for_units(const std::vector<Job>& jobs, const std::vector<int64_t>& sizes, F&& fn) {
  struct Unit { int32_t j; int64_t b, e; };
  std::vector<Unit> units;
  constexpr int64_t kUnit = 1 << 16;
  for (size_t j = 0; j < jobs.size(); ++j)
    for (int64_t b = 0; b < sizes[j]; b += kUnit)
      units.push_back({int32_t(j), b, std::min(sizes[j], b + kUnit)});
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  const int64_t grain = total >= kMinParallelEntries ? 1 : int64_t(units.size()) + 1;
  at::parallel_for(0, units.size(), grain, [&](int64_t ub, int64_t ue) {
    for (int64_t u = ub; u < ue; ++u) fn(jobs[units[u].j], units[u].b, units[u].e);
  });
}

void truncate_cpu(at::TensorList grads_, at::TensorList bits, double r) {
  std::vector<at::Tensor> grads(grads_.begin(), grads_.end());
  if (grads.empty()) return;
  const auto dev = grads[0].device();
  TORCH_CHECK(dev.is_cpu(), "worm: the C++ truncate_ takes CPU tensors");
  check_list(grads, "grads", dev);
  TORCH_CHECK(bits.size() == grads.size(), "worm: ", grads.size(), " grads but ", bits.size(),
              " keep_bits");
  std::vector<Job> jobs;
  std::vector<int64_t> sizes;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_bits(bits[i], grads[i].numel(), dev, "grads", i);
    jobs.push_back({grads[i].data_ptr(), nullptr, nullptr, bits[i].data_ptr<uint8_t>(), false,
                    dtype_code(grads[i], "grads", i)});
    sizes.push_back(grads[i].numel());
  }
  const bool fma = aten_uses_fma();
  const float rf = float(r);
  for_units(jobs, sizes, [&](const Job& j, int64_t b, int64_t e) {
    if (fma) trunc_fma(j, rf, b, e); else trunc_default(j, rf, b, e);
  });
}

void sgd_step_cpu(at::TensorList params_, at::TensorList grads_, at::TensorList bufs_,
                  at::IntArrayRef fresh, const c10::List<std::optional<at::Tensor>>& bits_,
                  double r, double lr, double weight_decay, double momentum, double dampening,
                  bool nesterov, bool maximize) {
  auto [params, grads, bufs, bits] = sgd_lists(params_, grads_, bufs_, fresh, bits_, momentum);
  TORCH_CHECK(params[0].is_cpu(), "worm: the C++ sgd_step_ takes CPU tensors");
  SgdArgs a{float(r), float(lr), float(weight_decay), float(momentum), float(1.0 - dampening),
            float(momentum), weight_decay != 0.0, momentum != 0.0, nesterov, maximize};
  const bool truncating = r != 1.0;
  std::vector<Job> jobs;
  std::vector<int64_t> sizes;
  for (size_t i = 0; i < params.size(); ++i) {
    const bool mom = momentum != 0.0;
    jobs.push_back({params[i].data_ptr(), grads[i].data_ptr(), mom ? bufs[i].data_ptr() : nullptr,
                    truncating && bits[i].has_value() ? bits[i]->data_ptr<uint8_t>() : nullptr,
                    mom && fresh[i] != 0, dtype_code(params[i], "params", i)});
    sizes.push_back(params[i].numel());
  }
  const bool fma = aten_uses_fma();
  for_units(jobs, sizes, [&](const Job& j, int64_t b, int64_t e) {
    if (fma) run_sgd_fma(j, a, b, e); else run_sgd_default(j, a, b, e);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(worm_native, CPU, m) {
  m.impl("truncate_", &truncate_cpu);
  m.impl("sgd_step_", &sgd_step_cpu);
}

}  // namespace worm
