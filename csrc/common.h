// Shared by the CPU and CUDA halves of worm._C: input checks and the dtype codes.
// Semantics: python/worm/reference.py (its module docstring fixes every layout).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>
#include <vector>

namespace worm {

// Dtype codes used inside kernels, where one list may mix dtypes.
enum DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline int32_t dtype_code(const at::Tensor& t, const char* what, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK(false, "worm: ", what, "[", i, "] has dtype ", t.scalar_type(),
                  "; supported: float32, bfloat16, float16");
  }
  return 0;
}

inline int64_t packed_nbytes(int64_t n) { return (n + 7) / 8; }

// Every tensor of a list: dense, contiguous, supported dtype, on `device`.
inline void check_list(const std::vector<at::Tensor>& ts, const char* what,
                       const at::Device& device, bool allow_empty_tensors = false) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK(t.layout() == at::kStrided, "worm: ", what, "[", i, "] is not a dense tensor");
    TORCH_CHECK(t.device() == device, "worm: ", what, "[", i, "] is on ", t.device(),
                " but the op runs on ", device, "; all tensors must share one device");
    dtype_code(t, what, i);
    TORCH_CHECK(t.is_contiguous(), "worm: ", what, "[", i, "] is not contiguous");
    TORCH_CHECK(allow_empty_tensors || t.numel() > 0, "worm: ", what, "[", i, "] has no entries");
  }
}

// A packed keep-mask for a tensor of n entries: 1-D uint8 of ceil(n/8) bytes.
inline void check_bits(const at::Tensor& bits, int64_t n, const at::Device& device,
                       const char* what, size_t i) {
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.dim() == 1, "worm: keep_bits[", i,
              "] must be a 1-D uint8 packed mask, got ", bits.scalar_type(), " with ",
              bits.dim(), " dims");
  TORCH_CHECK(bits.numel() == packed_nbytes(n), "worm: keep_bits[", i, "] has ", bits.numel(),
              " bytes but ", what, "[", i, "] has ", n, " entries and needs ", packed_nbytes(n));
  TORCH_CHECK(bits.device() == device, "worm: keep_bits[", i, "] is on ", bits.device(),
              " but ", what, "[", i, "] is on ", device);
  TORCH_CHECK(bits.is_contiguous(), "worm: keep_bits[", i, "] is not contiguous");
}

inline void check_window(const at::Tensor& window, int64_t head, int64_t nbytes,
                         const at::Device& device) {
  TORCH_CHECK(window.scalar_type() == at::kByte, "worm: window must be uint8, got ",
              window.scalar_type());
  TORCH_CHECK(window.dim() == 2, "worm: window must be 2-D [l, B], got ", window.dim(), " dims");
  TORCH_CHECK(window.size(1) == nbytes, "worm: window rows hold ", window.size(1),
              " bytes but the tensors' packed mask needs ", nbytes);
  TORCH_CHECK(window.size(0) >= 1, "worm: window has no rows");
  TORCH_CHECK(head >= 0 && head < window.size(0), "worm: head ", head,
              " is outside the window's ", window.size(0), " rows");
  TORCH_CHECK(window.device() == device, "worm: window is on ", window.device(),
              " but the tensors are on ", device);
  TORCH_CHECK(window.is_contiguous(), "worm: window is not contiguous");
}

inline void check_thr(const at::Tensor& thr, int64_t T, const at::Device& device) {
  TORCH_CHECK(thr.scalar_type() == at::kFloat && thr.dim() == 1 && thr.numel() == T,
              "worm: thr must be float32 [", T, "], got ", thr.scalar_type(), " ", thr.sizes());
  TORCH_CHECK(thr.device() == device, "worm: thr is on ", thr.device(), " but the tensors are on ",
              device);
}

// ks against the set: one k for "global", one per tensor for "layer"; 0 <= k <= n.
inline bool check_ks(const std::vector<at::Tensor>& ts, at::IntArrayRef ks,
                     const std::string& scope) {
  TORCH_CHECK(scope == "global" || scope == "layer",
              "worm: scope must be 'global' or 'layer', got '", scope, "'");
  bool global = scope == "global";
  if (global) {
    TORCH_CHECK(ks.size() == 1, "worm: scope 'global' takes one k, got ", ks.size());
    int64_t n = 0;
    for (const auto& t : ts) n += t.numel();
    TORCH_CHECK(ks[0] >= 0 && ks[0] <= n, "worm: k=", ks[0], " outside [0, ", n, "]");
  } else {
    TORCH_CHECK(ks.size() == ts.size(), "worm: scope 'layer' takes one k per tensor: ",
                ts.size(), " tensors, ", ks.size(), " ks");
    for (size_t i = 0; i < ts.size(); ++i)
      TORCH_CHECK(ks[i] >= 0 && ks[i] <= ts[i].numel(), "worm: ks[", i, "]=", ks[i],
                  " outside [0, ", ts[i].numel(), "]");
  }
  return global;
}

inline void check_sgd_lists(const std::vector<at::Tensor>& params,
                            const std::vector<at::Tensor>& grads,
                            const std::vector<at::Tensor>& bufs,
                            at::IntArrayRef fresh,
                            const std::vector<std::optional<at::Tensor>>& bits,
                            double momentum) {
  TORCH_CHECK(!params.empty(), "worm: sgd_step_ got no params");
  auto dev = params[0].device();
  TORCH_CHECK(grads.size() == params.size(), "worm: ", params.size(), " params but ",
              grads.size(), " grads");
  TORCH_CHECK(bits.size() == params.size(), "worm: ", params.size(), " params but ", bits.size(),
              " keep_bits");
  if (momentum != 0.0) {
    TORCH_CHECK(bufs.size() == params.size() && fresh.size() == params.size(), "worm: ",
                params.size(), " params but ", bufs.size(), " momentum buffers and ",
                fresh.size(), " fresh flags");
  }
  check_list(params, "params", dev);
  check_list(grads, "grads", dev);
  check_list(bufs, "momentum_buffers", dev);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type() &&
                    grads[i].numel() == params[i].numel(),
                "worm: grads[", i, "] (", grads[i].scalar_type(), ", ", grads[i].numel(),
                " entries) does not match params[", i, "] (", params[i].scalar_type(), ", ",
                params[i].numel(), " entries)");
    if (momentum != 0.0)
      TORCH_CHECK(bufs[i].scalar_type() == params[i].scalar_type() &&
                      bufs[i].numel() == params[i].numel(),
                  "worm: momentum_buffers[", i, "] does not match params[", i, "]");
    if (bits[i].has_value()) check_bits(*bits[i], params[i].numel(), dev, "params", i);
  }
}

// The sgd_step_ op's list arguments, copied out of the dispatcher's views and checked.
struct SgdLists {
  std::vector<at::Tensor> params, grads, bufs;
  std::vector<std::optional<at::Tensor>> bits;
};
inline SgdLists sgd_lists(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                          at::IntArrayRef fresh,
                          const c10::List<std::optional<at::Tensor>>& bits, double momentum) {
  SgdLists l{{params.begin(), params.end()}, {grads.begin(), grads.end()},
             {bufs.begin(), bufs.end()}, {}};
  for (const auto& b : bits) l.bits.push_back(b);
  check_sgd_lists(l.params, l.grads, l.bufs, fresh, l.bits, momentum);
  return l;
}

// The most window rows the fused CPU sample_mask_ takes: each window entry carries its
// bit of every row in one 64-bit word. Exported as worm._C.sample_max_rows; longer
// windows run select_thresholds + mask_update_, which have no limit.
constexpr int64_t kSampleMaxRows = 64;

// Below this many entries a call runs on the calling thread: waking the thread pool
// costs more than the work (and far more when the machine is busy).
constexpr int64_t kMinParallelEntries = int64_t(1) << 18;

}  // namespace worm
