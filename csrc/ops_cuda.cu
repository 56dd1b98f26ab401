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

// ---- small plan: ONE block does every group's three passes in shared memory
// (sets of <= kSmallLimit entries, e.g. ResNet-18's 4.8k BN gammas: launches, not
// bytes, cost time there). gb: group g owns tensors [gb[g], gb[g+1]).
constexpr int64_t kSmallLimit = 1 << 16;
constexpr int kSmallThreads = 1024;

// Block-wide: the bin holding the kk-th key (1-based) of h[0..nbins), and kk's rank in it.
// Every thread returns the same pair. Needs nbins % blockDim.x == 0.
__device__ void block_find(const unsigned int* h, int nbins, int64_t kk, int* bin_out,
                           int64_t* rank_out, unsigned long long* scratch) {
  const int per = nbins / blockDim.x;
  const int b0 = threadIdx.x * per;
  unsigned long long mine = 0;
  for (int b = 0; b < per; ++b) mine += h[b0 + b];
  // inclusive scan of per-thread sums through shared scratch (blockDim.x entries)
  scratch[threadIdx.x] = mine;
  __syncthreads();
  for (int o = 1; o < blockDim.x; o <<= 1) {
    unsigned long long v = threadIdx.x >= o ? scratch[threadIdx.x - o] : 0;
    __syncthreads();
    scratch[threadIdx.x] += v;
    __syncthreads();
  }
  const unsigned long long incl = scratch[threadIdx.x], excl = incl - mine;
  __shared__ int found_bin;
  __shared__ long long found_rank;
  if (threadIdx.x == 0) { found_bin = nbins - 1; found_rank = kk; }
  __syncthreads();
  if (excl < (unsigned long long)kk && (unsigned long long)kk <= incl) {
    long long r = kk - (long long)excl;
    int b = b0;
    while (b < b0 + per - 1 && (long long)h[b] < r) r -= h[b++];
    found_bin = b;
    found_rank = r;
  }
  __syncthreads();
  *bin_out = found_bin;
  *rank_out = found_rank;
  __syncthreads();
}

__global__ void select_small_kernel(const int64_t* seg, const int64_t* gb, const int64_t* ks,
                                    int64_t G, float* thr, unsigned long long* nonfinite) {
  __shared__ unsigned int h[2048];
  __shared__ unsigned long long scratch[kSmallThreads];
  __shared__ unsigned int bad_total;
  if (threadIdx.x == 0) bad_total = 0;
  const int digits[3] = {11, 10, 10}, shifts[3] = {20, 10, 0}, pshifts[3] = {31, 20, 10};
  for (int64_t g = 0; g < G; ++g) {
    const int64_t t0 = gb[g], t1 = gb[g + 1], k = ks[g];
    uint32_t prefix = 0;
    int64_t kk = k;
    for (int pass = 0; pass < 3; ++pass) {
      const int nb = 1 << digits[pass];
      for (int b = threadIdx.x; b < nb; b += blockDim.x) h[b] = 0;
      __syncthreads();
      for (int64_t t = t0; t < t1; ++t) {
        const void* p = reinterpret_cast<const void*>(seg[4 * t]);
        const int64_t n = seg[4 * t + 1];
        const int dt = int(seg[4 * t + 2]);
        unsigned int bad = 0;
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
          const uint32_t key = key_of(p, i, dt);
          bad += key >= 0x7f800000u;
          if (k > 0 && (pass == 0 || (key >> pshifts[pass]) == prefix))
            atomicAdd(&h[(key >> shifts[pass]) & (nb - 1)], 1u);
        }
        if (pass == 0) {
          for (int o = 16; o > 0; o >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, o);
          if ((threadIdx.x & 31) == 0 && bad) {
            atomicAdd(&nonfinite[t], (unsigned long long)bad);
            atomicAdd(&bad_total, bad);
          }
        }
      }
      __syncthreads();
      if (k > 0) {
        int b;
        int64_t r;
        block_find(h, nb, kk, &b, &r, scratch);
        prefix = (prefix << digits[pass]) | uint32_t(b);
        kk = r;
      }
      __syncthreads();
    }
    for (int64_t t = t0 + threadIdx.x; t < t1; t += blockDim.x)
      thr[t] = k == 0 ? -INFINITY : __uint_as_float(prefix);
  }
  __syncthreads();
  if (bad_total)  // any NaN/Inf anywhere: every threshold is NaN (the caller raises)
    for (int64_t t = threadIdx.x; t < gb[G]; t += blockDim.x) thr[t] = NAN;
}

// ---- two-pass plan for large sets: a 15-bit histogram (the top bits of |w|'s
// 31-bit key) in shared memory, then a 16-bit histogram of the one bucket's keys.
// Two reads of the scores instead of three. Each block walks a contiguous run of
// chunks and flushes its shared histogram when the run crosses into a new group.
constexpr int kHiBits = 15, kLoBits = 16;
constexpr int kHiBins = 1 << kHiBits, kLoBins = 1 << kLoBits;
constexpr int kBigThreads = 1024;

__global__ void hist_hi_kernel(const int64_t* seg, const int64_t* chunks, int64_t nchunks,
                               const int64_t* ks, unsigned long long* hist,
                               unsigned long long* nonfinite) {
  extern __shared__ unsigned int sh[];
  const int64_t per = (nchunks + gridDim.x - 1) / gridDim.x;
  const int64_t c0 = blockIdx.x * per, c1 = min(nchunks, c0 + per);
  for (int b = threadIdx.x; b < kHiBins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  int64_t cur = -1;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t s = chunks[2 * c], begin = chunks[2 * c + 1];
    const int64_t grp = seg[4 * s + 3];
    if (grp != cur) {
      if (cur >= 0) {
        __syncthreads();
        for (int b = threadIdx.x; b < kHiBins; b += blockDim.x)
          if (sh[b]) { atomicAdd(&hist[cur * kHiBins + b], (unsigned long long)sh[b]); sh[b] = 0; }
        __syncthreads();
      }
      cur = grp;
    }
    const void* p = reinterpret_cast<const void*>(seg[4 * s]);
    const int64_t n = seg[4 * s + 1];
    const int dt = int(seg[4 * s + 2]);
    const int64_t end = min(n, begin + kChunk);
    const bool active = ks[grp] > 0;
    unsigned int bad = 0;
    if (dt == kF32 && (begin & 3) == 0 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
      const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + begin);
      const int64_t nv = (end - begin) / 4;
      for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
        const float4 v = q[i];
        const uint32_t k4[4] = {__float_as_uint(v.x) & 0x7fffffffu, __float_as_uint(v.y) & 0x7fffffffu,
                                __float_as_uint(v.z) & 0x7fffffffu, __float_as_uint(v.w) & 0x7fffffffu};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          bad += k4[j] >= 0x7f800000u;
          if (active) atomicAdd(&sh[k4[j] >> kLoBits], 1u);
        }
      }
      for (int64_t i = begin + nv * 4 + threadIdx.x; i < end; i += blockDim.x) {
        const uint32_t key = key_of(p, i, dt);
        bad += key >= 0x7f800000u;
        if (active) atomicAdd(&sh[key >> kLoBits], 1u);
      }
    } else {
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const uint32_t key = key_of(p, i, dt);
        bad += key >= 0x7f800000u;
        if (active) atomicAdd(&sh[key >> kLoBits], 1u);
      }
    }
    for (int o = 16; o > 0; o >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, o);
    if ((threadIdx.x & 31) == 0 && bad) atomicAdd(&nonfinite[s], (unsigned long long)bad);
  }
  __syncthreads();
  if (cur >= 0)
    for (int b = threadIdx.x; b < kHiBins; b += blockDim.x)
      if (sh[b]) atomicAdd(&hist[cur * kHiBins + b], (unsigned long long)sh[b]);
}

// One block per group: the bucket of the k-th key in a global histogram; state[2g] is
// the prefix so far (shifted in), state[2g+1] the rank still sought.
__global__ void find_kernel(const unsigned long long* hist, int nbins, int bits, int64_t* state,
                            const int64_t* ks) {
  const int64_t g = blockIdx.x;
  if (ks[g] == 0) return;
  const unsigned long long* h = hist + g * int64_t(nbins);
  const int per = nbins / blockDim.x;
  const int b0 = threadIdx.x * per;
  unsigned long long mine = 0;
  for (int b = 0; b < per; ++b) mine += h[b0 + b];
  __shared__ unsigned long long scan[kBigThreads];
  scan[threadIdx.x] = mine;
  __syncthreads();
  for (int o = 1; o < blockDim.x; o <<= 1) {
    unsigned long long v = threadIdx.x >= o ? scan[threadIdx.x - o] : 0;
    __syncthreads();
    scan[threadIdx.x] += v;
    __syncthreads();
  }
  const unsigned long long kk = (unsigned long long)state[2 * g + 1];
  const unsigned long long incl = scan[threadIdx.x], excl = incl - mine;
  if (excl < kk && kk <= incl) {
    unsigned long long r = kk - excl;
    int b = b0;
    while (b < b0 + per - 1 && h[b] < r) r -= h[b++];
    state[2 * g] = (state[2 * g] << bits) | b;
    state[2 * g + 1] = (int64_t)r;
  }
}

__global__ void hist_lo_kernel(const int64_t* seg, const int64_t* chunks, const int64_t* ks,
                               const int64_t* state, unsigned long long* hist) {
  const int64_t s = chunks[2 * blockIdx.x], begin = chunks[2 * blockIdx.x + 1];
  const int64_t grp = seg[4 * s + 3];
  if (ks[grp] == 0) return;
  const void* p = reinterpret_cast<const void*>(seg[4 * s]);
  const int64_t n = seg[4 * s + 1];
  const int dt = int(seg[4 * s + 2]);
  const int64_t end = min(n, begin + kChunk);
  const uint32_t prefix = uint32_t(state[2 * grp]);
  unsigned long long* h = hist + grp * int64_t(kLoBins);
  // Iterate whole warps so every lane joins the match below.
  for (int64_t w = begin + (threadIdx.x & ~31); w < end; w += blockDim.x) {
    const int64_t i = w + (threadIdx.x & 31);
    bool in = false;
    uint32_t lo = 0;
    if (i < end) {
      const uint32_t key = key_of(p, i, dt);
      in = (key >> kLoBits) == prefix;
      lo = key & (kLoBins - 1);
    }
    const unsigned int want = __ballot_sync(0xffffffffu, in);
    if (!want) continue;
    // Lanes with the same bin add once (a set of tied weights must not serialise).
    const unsigned int same = __match_any_sync(0xffffffffu, in ? lo : 0xffffffffu);
    if (in && (__ffs(same) - 1) == (threadIdx.x & 31))
      atomicAdd(&h[lo], (unsigned long long)__popc(same));
  }
}

__global__ void finish_kernel(const int64_t* seg, const int64_t* ks, const int64_t* state,
                              float* thr, int64_t T) {
  for (int64_t i = threadIdx.x; i < T; i += blockDim.x) {
    const int64_t grp = seg[4 * i + 3];
    thr[i] = ks[grp] == 0 ? -INFINITY : __uint_as_float(uint32_t(state[2 * grp]));
  }
}

int sm_count(const at::Device& dev) {
  static int cached[64] = {0};
  const int d = dev.index() < 0 ? 0 : dev.index();
  if (d < 64 && cached[d]) return cached[d];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, d));
  if (d < 64) cached[d] = n;
  return n;
}

// The two-pass plan over one batch of tensors: seg rows [ptr, n, dtype, group],
// groups numbered 0..ks.size()-1; writes thr[0..T) and adds into nonfinite[0..T).
void select_large(const std::vector<int64_t>& seg, const std::vector<int64_t>& kv, float* thr,
                  unsigned long long* nf, const at::Device& dev, cudaStream_t stream) {
  const int64_t T = int64_t(seg.size() / 4), G = int64_t(kv.size());
  std::vector<int64_t> chunks, state;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t b = 0; b < seg[4 * i + 1]; b += kChunk) chunks.insert(chunks.end(), {i, b});
  for (int64_t g = 0; g < G; ++g) state.insert(state.end(), {0, kv[g]});
  const int64_t nchunks = int64_t(chunks.size() / 2);
  std::vector<int64_t> tab(seg);
  tab.insert(tab.end(), kv.begin(), kv.end());
  tab.insert(tab.end(), chunks.begin(), chunks.end());
  at::Tensor tab_d = to_device(tab, dev);
  at::Tensor state_d = to_device(state, dev);
  const int64_t* seg_d = tab_d.data_ptr<int64_t>();
  const int64_t* ks_d = seg_d + 4 * T;
  const int64_t* chunks_d = ks_d + G;
  int64_t* st = state_d.data_ptr<int64_t>();
  at::Tensor hist = at::zeros({G * (kHiBins + kLoBins)}, at::TensorOptions().device(dev).dtype(at::kLong));
  auto* hi = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  auto* lo = hi + G * kHiBins;
  const int smem = kHiBins * sizeof(unsigned int);
  static bool smem_set[64] = {false};
  const int d = dev.index() < 0 ? 0 : dev.index();
  if (d >= 64 || !smem_set[d]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(hist_hi_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    if (d < 64) smem_set[d] = true;
  }
  const int64_t grid = std::min<int64_t>(nchunks, 2 * sm_count(dev));
  hist_hi_kernel<<<int(grid), kBigThreads, smem, stream>>>(seg_d, chunks_d, nchunks, ks_d, hi, nf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  find_kernel<<<int(G), kBigThreads, 0, stream>>>(hi, kHiBins, kHiBits, st, ks_d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  hist_lo_kernel<<<int(nchunks), 256, 0, stream>>>(seg_d, chunks_d, ks_d, st, lo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  find_kernel<<<int(G), kBigThreads, 0, stream>>>(lo, kLoBins, kLoBits, st, ks_d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_kernel<<<1, 256, 0, stream>>>(seg_d, ks_d, st, thr, T);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // tab_d/state_d/hist are freed on return; the caching allocator reuses them only
  // after the work queued on this stream, so the kernels above still see them.
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
  int64_t total = 0;
  std::vector<int64_t> seg, gb;
  for (int64_t i = 0; i < T; ++i) {
    const int64_t n = tensors[i].numel();
    total += n;
    seg.insert(seg.end(), {int64_t(reinterpret_cast<intptr_t>(tensors[i].data_ptr())), n,
                           dtype_code(tensors[i], "tensors", i), global ? 0 : i});
  }
  auto opts = at::TensorOptions().device(dev);
  at::Tensor nonfinite = at::zeros({T}, opts.dtype(at::kLong));
  at::Tensor thr = at::empty({T}, opts.dtype(at::kFloat));
  auto* nf = reinterpret_cast<unsigned long long*>(nonfinite.data_ptr<int64_t>());
  auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<int64_t> kv(ks.begin(), ks.end());
  if (total <= kSmallLimit) {
    for (int64_t g = 0; g <= G; ++g) gb.push_back(global ? (g == 0 ? 0 : T) : g);
    std::vector<int64_t> tab(seg);
    tab.insert(tab.end(), gb.begin(), gb.end());
    tab.insert(tab.end(), kv.begin(), kv.end());
    at::Tensor tab_d = to_device(tab, dev);
    const int64_t* base = tab_d.data_ptr<int64_t>();
    select_small_kernel<<<1, kSmallThreads, 0, stream>>>(base, base + 4 * T, base + 4 * T + G + 1,
                                                         G, thr.data_ptr<float>(), nf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {thr, nonfinite};
  }
  // Layer scope: at most kBatch groups share one set of histograms per launch series.
  constexpr int64_t kBatch = 64;
  const int64_t step = global ? T : kBatch;
  for (int64_t a = 0; a < T; a += step) {
    const int64_t e = std::min(T, a + step);
    std::vector<int64_t> sub_seg(seg.begin() + 4 * a, seg.begin() + 4 * e);
    if (!global)
      for (int64_t i = 0; i < e - a; ++i) sub_seg[4 * i + 3] = i;
    std::vector<int64_t> sub_ks = global ? kv : std::vector<int64_t>(kv.begin() + a, kv.begin() + e);
    select_large(sub_seg, sub_ks, thr.data_ptr<float>() + a, nf + a, dev, stream);
  }
  // Any NaN/Inf anywhere: every threshold is NaN (the caller raises); no host sync.
  thr.masked_fill_(nonfinite.sum().gt(0), std::numeric_limits<float>::quiet_NaN());
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
  // Each warp takes tiles of 1024 entries: 32 coalesced ballots, after which lane i
  // holds the 32 mask bits (4 bytes) of entries [tile + 32 i, tile + 32 i + 32), so
  // every lane then reads and writes its own 4 bytes of each window row.
  for (int64_t tile = begin + int64_t(warp) * 1024; tile < end; tile += int64_t(nwarps) * 1024) {
    unsigned int word = 0;
#pragma unroll 8
    for (int it = 0; it < 32; ++it) {
      const int64_t e = tile + it * 32 + lane;
      const bool keep = e < end && fabsf(load_f(p, e, dt)) > t;
      const unsigned int bits = __ballot_sync(0xffffffffu, keep);
      if (lane == it) word = bits;
    }
    const int64_t e0 = tile + int64_t(lane) * 32;
    const int nbytes = e0 < end ? int(min(int64_t(4), (end - e0 + 7) / 8)) : 0;
    const int64_t byte0 = off + e0 / 8;
    for (int64_t j = 0; j < L; ++j) {
      const uint8_t* row = win + j * B + byte0;
      unsigned int d = 0;
      for (int b = 0; b < nbytes; ++b) d += __popc(((word >> (8 * b)) & 0xffu) ^ row[b]);
      d = __reduce_add_sync(0xffffffffu, d);
      if (lane == 0 && d) atomicAdd(&cnt[j], d);
    }
    uint8_t* out = win + head * B + byte0;
    for (int b = 0; b < nbytes; ++b) out[b] = uint8_t((word >> (8 * b)) & 0xffu);
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
