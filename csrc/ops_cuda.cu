// CUDA: the four worm ops, device-side with no host sync. Every op is a few
// multi-tensor launches over a list of (tensor, chunk) work items; per-tensor
// metadata travels in one small pinned-host -> device copy per call.
// Semantics: python/worm/reference.py. Rounding in sgd_step_ follows ATen's CUDA
// kernels (fp32 opmath with fused multiply-add, alpha kept in fp32).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <limits>

#include "common.h"

namespace worm {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // entries per block (a multiple of 32)

__device__ __forceinline__ float load_f(const void* p, int64_t i, int dt) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (dt == kBF16) return __uint_as_float(uint32_t(h) << 16);
  return __half2float(__ushort_as_half(h));
}
__device__ __forceinline__ float round_to(float x, int dt) {
  if (dt == kF32) return x;
  if (dt == kBF16) return __bfloat162float(__float2bfloat16_rn(x));
  return __half2float(__float2half_rn(x));
}
__device__ __forceinline__ void store_f(void* p, int64_t i, int dt, float x) {
  if (dt == kF32) static_cast<float*>(p)[i] = x;
  else if (dt == kBF16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
  else static_cast<__half*>(p)[i] = __float2half_rn(x);
}
__device__ __forceinline__ uint32_t key_of(const void* p, int64_t i, int dt) {
  return __float_as_uint(load_f(p, i, dt)) & 0x7fffffffu;
}

// Host side: a pinned int64 table copied to the device without blocking the host.
at::Tensor to_device(const std::vector<int64_t>& v, const at::Device& dev) {
  auto host = at::empty({int64_t(v.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), v.data(), v.size() * sizeof(int64_t));
  return host.to(dev, /*non_blocking=*/true);
}

// ------------------------------------------------------------------ select
// seg table: [ptr, n, dtype, group] per tensor; chunk table: [seg, begin] per block.
__global__ void hist_kernel(const int64_t* seg, const int64_t* chunks, const int64_t* ks,
                            const int64_t* state, unsigned long long* hist,
                            unsigned long long* nonfinite, int shift, int digit, int pshift,
                            bool first) {
  extern __shared__ unsigned int sh[];
  const int nbins = 1 << digit;
  const int64_t s = chunks[2 * blockIdx.x], begin = chunks[2 * blockIdx.x + 1];
  const void* p = reinterpret_cast<const void*>(seg[4 * s]);
  const int64_t n = seg[4 * s + 1];
  const int dt = int(seg[4 * s + 2]);
  const int64_t grp = seg[4 * s + 3];
  const int64_t end = min(n, begin + kChunk);
  const bool active = ks[grp] > 0;
  if (!first && !active) return;
  for (int b = threadIdx.x; b < nbins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  const uint32_t prefix = uint32_t(state[2 * grp]);
  unsigned int bad = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    uint32_t key = key_of(p, i, dt);
    bad += key >= 0x7f800000u;
    if (active && (key >> pshift) == prefix) atomicAdd(&sh[(key >> shift) & (nbins - 1)], 1u);
  }
  if (first) {
    for (int o = 16; o > 0; o >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, o);
    if ((threadIdx.x & 31) == 0 && bad) atomicAdd(&nonfinite[s], (unsigned long long)bad);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < nbins; b += blockDim.x)
    if (sh[b]) atomicAdd(&hist[grp * nbins + b], (unsigned long long)sh[b]);
}

// One block per group: pick the bin holding the k-th key, narrow the prefix.
__global__ void scan_kernel(const unsigned long long* hist, int64_t* state, const int64_t* ks,
                            int digit) {
  const int64_t grp = blockIdx.x;
  if (threadIdx.x != 0 || ks[grp] == 0) return;
  const int nbins = 1 << digit;
  int64_t k = state[2 * grp + 1];
  int b = 0;
  while (b < nbins - 1 && int64_t(hist[grp * nbins + b]) < k) k -= hist[grp * nbins + b++];
  state[2 * grp] = (state[2 * grp] << digit) | b;
  state[2 * grp + 1] = k;
}

__global__ void finish_kernel(const int64_t* seg, const int64_t* ks, const int64_t* state,
                              const unsigned long long* nonfinite, float* thr, int64_t T) {
  __shared__ unsigned long long bad;
  if (threadIdx.x == 0) {
    bad = 0;
    for (int64_t i = 0; i < T; ++i) bad += nonfinite[i];
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < T; i += blockDim.x) {
    const int64_t grp = seg[4 * i + 3];
    float t = ks[grp] == 0 ? -INFINITY : __uint_as_float(uint32_t(state[2 * grp]));
    thr[i] = bad ? NAN : t;
  }
}

std::tuple<at::Tensor, at::Tensor> select_thresholds_cuda(at::TensorList tensors_,
                                                          at::IntArrayRef ks,
                                                          c10::string_view scope) {
  std::vector<at::Tensor> tensors(tensors_.begin(), tensors_.end());
  TORCH_CHECK(!tensors.empty(), "worm: select_thresholds got no tensors");
  const auto dev = tensors[0].device();
  TORCH_CHECK(dev.is_cuda(), "worm: the CUDA select_thresholds takes CUDA tensors");
  check_list(tensors, "tensors", dev);
  const bool global = check_ks(tensors, ks, std::string(scope));
  c10::cuda::CUDAGuard guard(dev);
  const int64_t T = tensors.size(), G = global ? 1 : T;
  std::vector<int64_t> seg, chunks, state;
  for (int64_t i = 0; i < T; ++i) {
    const int64_t n = tensors[i].numel();
    seg.insert(seg.end(), {int64_t(reinterpret_cast<intptr_t>(tensors[i].data_ptr())), n,
                           dtype_code(tensors[i], "tensors", i), global ? 0 : i});
    for (int64_t b = 0; b < n; b += kChunk) chunks.insert(chunks.end(), {i, b});
  }
  for (int64_t g = 0; g < G; ++g) state.insert(state.end(), {0, ks[g]});
  at::Tensor seg_d = to_device(seg, dev), chunks_d = to_device(chunks, dev);
  at::Tensor state_d = to_device(state, dev), ks_d = to_device(std::vector<int64_t>(ks.begin(), ks.end()), dev);
  auto opts = at::TensorOptions().device(dev);
  at::Tensor nonfinite = at::zeros({T}, opts.dtype(at::kLong));
  at::Tensor thr = at::empty({T}, opts.dtype(at::kFloat));
  const int digits[3] = {11, 10, 10};
  at::Tensor hist = at::empty({G << 11}, opts.dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int nblocks = int(chunks.size() / 2);
  int hi = 31, pshift = 31;
  for (int pass = 0; pass < 3; ++pass) {
    const int digit = digits[pass], shift = hi - digit;
    hist.zero_();
    hist_kernel<<<nblocks, kThreads, sizeof(unsigned int) << digit, stream>>>(
        seg_d.data_ptr<int64_t>(), chunks_d.data_ptr<int64_t>(), ks_d.data_ptr<int64_t>(),
        state_d.data_ptr<int64_t>(), reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
        reinterpret_cast<unsigned long long*>(nonfinite.data_ptr<int64_t>()), shift, digit, pshift,
        pass == 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scan_kernel<<<G, 32, 0, stream>>>(reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
                                      state_d.data_ptr<int64_t>(), ks_d.data_ptr<int64_t>(), digit);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pshift = shift;
    hi = shift;
  }
  finish_kernel<<<1, 256, 0, stream>>>(seg_d.data_ptr<int64_t>(), ks_d.data_ptr<int64_t>(),
                                       state_d.data_ptr<int64_t>(),
                                       reinterpret_cast<unsigned long long*>(nonfinite.data_ptr<int64_t>()),
                                       thr.data_ptr<float>(), T);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {thr, nonfinite};
}

// -------------------------------------------------------------- mask update
// seg table: [ptr, n, dtype, byte_offset] per tensor; chunk table: [seg, begin].
__global__ void mask_kernel(const int64_t* seg, const int64_t* chunks, const float* thr,
                            uint8_t* win, int64_t L, int64_t B, int64_t head,
                            unsigned long long* counts) {
  extern __shared__ unsigned int cnt[];
  for (int j = threadIdx.x; j < L; j += blockDim.x) cnt[j] = 0;
  __syncthreads();
  const int64_t s = chunks[2 * blockIdx.x], begin = chunks[2 * blockIdx.x + 1];
  const void* p = reinterpret_cast<const void*>(seg[4 * s]);
  const int64_t n = seg[4 * s + 1], off = seg[4 * s + 3];
  const int dt = int(seg[4 * s + 2]);
  const float t = thr[s];
  const int64_t end = min(n, begin + kChunk);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t w = begin + int64_t(warp) * 32; w < end; w += int64_t(nwarps) * 32) {
    const int64_t e = w + lane;
    const bool keep = e < end && fabsf(load_f(p, e, dt)) > t;
    const unsigned int bits = __ballot_sync(0xffffffffu, keep);
    const int64_t byte = w / 8 + lane;  // lanes 0..3 own the word's 4 bytes
    if (lane < 4 && w + 8 * lane < end) {
      const unsigned int v = (bits >> (8 * lane)) & 0xffu;
      for (int64_t j = 0; j < L; ++j) {
        const unsigned int d = __popc(v ^ win[j * B + off + byte]);
        if (d) atomicAdd(&cnt[j], d);
      }
      win[head * B + off + byte] = uint8_t(v);
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < L; j += blockDim.x)
    if (cnt[j]) atomicAdd(&counts[j], (unsigned long long)cnt[j]);
}

at::Tensor mask_update_cuda(at::TensorList tensors_, const at::Tensor& thr, const at::Tensor& window,
                            int64_t head) {
  std::vector<at::Tensor> tensors(tensors_.begin(), tensors_.end());
  TORCH_CHECK(!tensors.empty(), "worm: mask_update_ got no tensors");
  const auto dev = tensors[0].device();
  TORCH_CHECK(dev.is_cuda(), "worm: the CUDA mask_update_ takes CUDA tensors");
  check_list(tensors, "tensors", dev);
  const int64_t T = tensors.size();
  check_thr(thr, T, dev);
  c10::cuda::CUDAGuard guard(dev);
  std::vector<int64_t> seg, chunks;
  int64_t off = 0;
  for (int64_t i = 0; i < T; ++i) {
    const int64_t n = tensors[i].numel();
    seg.insert(seg.end(), {int64_t(reinterpret_cast<intptr_t>(tensors[i].data_ptr())), n,
                           dtype_code(tensors[i], "tensors", i), off});
    for (int64_t b = 0; b < n; b += kChunk) chunks.insert(chunks.end(), {i, b});
    off += packed_nbytes(n);
  }
  check_window(window, head, off, dev);
  const at::Tensor thr_c = thr.contiguous();
  const int64_t L = window.size(0);
  at::Tensor counts = at::zeros({L}, at::TensorOptions().device(dev).dtype(at::kLong));
  at::Tensor seg_d = to_device(seg, dev), chunks_d = to_device(chunks, dev);
  mask_kernel<<<int(chunks.size() / 2), kThreads, sizeof(unsigned int) * L,
                c10::cuda::getCurrentCUDAStream()>>>(
      seg_d.data_ptr<int64_t>(), chunks_d.data_ptr<int64_t>(), thr_c.data_ptr<float>(),
      window.data_ptr<uint8_t>(), L, off, head,
      reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

// ------------------------------------------------------- truncation and SGD
// seg table: [p, g, buf, bits, n, dtype, fresh] per param; chunk table: [seg, begin].
struct SgdScalars {
  float r, nlr, wd, mom, d1;
  bool truncate_only, has_wd, has_mom, nesterov, maximize;
};

__global__ void sgd_kernel(const int64_t* seg, const int64_t* chunks, SgdScalars a) {
  const int64_t s = chunks[2 * blockIdx.x], begin = chunks[2 * blockIdx.x + 1];
  const int64_t* m = seg + 7 * s;
  void* p = reinterpret_cast<void*>(m[0]);
  const void* g = reinterpret_cast<const void*>(m[1]);
  void* buf = reinterpret_cast<void*>(m[2]);
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(m[3]);
  const int64_t n = m[4], end = min(n, begin + kChunk);
  const int dt = int(m[5]);
  const bool fresh = m[6] != 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const bool keep = bits == nullptr || ((bits[i >> 3] >> (i & 7)) & 1);
    if (a.truncate_only) {  // p is the gradient, scaled in place
      if (!keep) store_f(p, i, dt, load_f(p, i, dt) * a.r);
      continue;
    }
    float gi = load_f(g, i, dt);
    if (!keep) gi = round_to(gi * a.r, dt);
    if (a.maximize) gi = -gi;
    const float pi = load_f(p, i, dt);
    if (a.has_wd) gi = round_to(__fmaf_rn(a.wd, pi, gi), dt);
    if (a.has_mom) {
      float bi = fresh ? gi : round_to(load_f(buf, i, dt) * a.mom, dt);
      if (!fresh) bi = round_to(__fmaf_rn(a.d1, gi, bi), dt);
      store_f(buf, i, dt, bi);
      gi = a.nesterov ? round_to(__fmaf_rn(a.mom, bi, gi), dt) : bi;
    }
    store_f(p, i, dt, __fmaf_rn(a.nlr, gi, pi));
  }
}

void launch_sgd(const std::vector<int64_t>& seg, const std::vector<int64_t>& sizes,
                const at::Device& dev, const SgdScalars& a) {
  std::vector<int64_t> chunks;
  for (size_t i = 0; i < sizes.size(); ++i)
    for (int64_t b = 0; b < sizes[i]; b += kChunk) chunks.insert(chunks.end(), {int64_t(i), b});
  if (chunks.empty()) return;
  at::Tensor seg_d = to_device(seg, dev), chunks_d = to_device(chunks, dev);
  sgd_kernel<<<int(chunks.size() / 2), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      seg_d.data_ptr<int64_t>(), chunks_d.data_ptr<int64_t>(), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void truncate_cuda(at::TensorList grads_, at::TensorList bits, double r) {
  std::vector<at::Tensor> grads(grads_.begin(), grads_.end());
  if (grads.empty()) return;
  const auto dev = grads[0].device();
  TORCH_CHECK(dev.is_cuda(), "worm: the CUDA truncate_ takes CUDA tensors");
  check_list(grads, "grads", dev);
  TORCH_CHECK(bits.size() == grads.size(), "worm: ", grads.size(), " grads but ", bits.size(),
              " keep_bits");
  c10::cuda::CUDAGuard guard(dev);
  std::vector<int64_t> seg, sizes;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_bits(bits[i], grads[i].numel(), dev, "grads", i);
    seg.insert(seg.end(), {int64_t(reinterpret_cast<intptr_t>(grads[i].data_ptr())), 0, 0,
                           int64_t(reinterpret_cast<intptr_t>(bits[i].data_ptr())),
                           grads[i].numel(), dtype_code(grads[i], "grads", i), 0});
    sizes.push_back(grads[i].numel());
  }
  SgdScalars a{float(r), 0.f, 0.f, 0.f, 0.f, true, false, false, false, false};
  launch_sgd(seg, sizes, dev, a);
}

void sgd_step_cuda(at::TensorList params_, at::TensorList grads_, at::TensorList bufs_,
                   at::IntArrayRef fresh, const c10::List<std::optional<at::Tensor>>& bits_,
                   double r, double lr, double weight_decay, double momentum, double dampening,
                   bool nesterov, bool maximize) {
  auto [params, grads, bufs, bits] = sgd_lists(params_, grads_, bufs_, fresh, bits_, momentum);
  const auto dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "worm: the CUDA sgd_step_ takes CUDA tensors");
  c10::cuda::CUDAGuard guard(dev);
  const bool mom = momentum != 0.0, truncating = r != 1.0;
  std::vector<int64_t> seg, sizes;
  for (size_t i = 0; i < params.size(); ++i) {
    const bool tb = truncating && bits[i].has_value();
    seg.insert(seg.end(),
               {int64_t(reinterpret_cast<intptr_t>(params[i].data_ptr())),
                int64_t(reinterpret_cast<intptr_t>(grads[i].data_ptr())),
                mom ? int64_t(reinterpret_cast<intptr_t>(bufs[i].data_ptr())) : 0,
                tb ? int64_t(reinterpret_cast<intptr_t>(bits[i]->data_ptr())) : 0,
                params[i].numel(), dtype_code(params[i], "params", i),
                mom && fresh[i] != 0 ? 1 : 0});
    sizes.push_back(params[i].numel());
  }
  SgdScalars a{float(r), float(-lr), float(weight_decay), float(momentum), float(1.0 - dampening),
               false, weight_decay != 0.0, mom, nesterov, maximize};
  launch_sgd(seg, sizes, dev, a);
}

}  // namespace

TORCH_LIBRARY_IMPL(worm_native, CUDA, m) {
  m.impl("select_thresholds", &select_thresholds_cuda);
  m.impl("mask_update_", &mask_update_cuda);
  m.impl("truncate_", &truncate_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
}

}  // namespace worm
