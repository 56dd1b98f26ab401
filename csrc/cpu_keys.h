// CPU kernels' shared pieces: the sort key of an entry, dtype dispatch, bit tricks,
// static work splitting, and the radix select that finishes an exact window of
// massive ties. Semantics: docs/ops.md; oracle: python/worm/reference.py.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace worm {

constexpr uint32_t kInfKey = 0x7f800000u;  // |w| keys at or above this are Inf/NaN

// A run of entries of one tensor.
struct Src {
  const void* p;
  int64_t n;
  int32_t dt;
};
struct Chunk {
  int32_t src;
  int64_t begin, end;
};

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Key of an entry: the fp32 bit pattern of |w|. For non-negative floats (and the
// NaN patterns above +inf) unsigned order of keys is numeric order.
template <int DT>
inline uint32_t key_at(const void* p, int64_t i) {
  if constexpr (DT == kF32) {
    uint32_t u;
    std::memcpy(&u, static_cast<const char*>(p) + 4 * i, 4);
    return u & 0x7fffffffu;
  } else {
    uint16_t h = static_cast<const uint16_t*>(p)[i] & 0x7fffu;
    if constexpr (DT == kBF16) return uint32_t(h) << 16;
    else return f32_bits(c10::detail::fp16_ieee_to_fp32_value(h));
  }
}

// The 16-bit cut, shared by the select plan and the mask update: the smallest a of
// the tensor's comparison domain (fp32: the 31-bit key; fp16/bf16: |h| as 15 bits)
// whose key is >= key32 (key32 <= kInfKey + 1; past +inf it is the first NaN pattern).
template <int DT>
int32_t domain_from(uint32_t key32) {
  if constexpr (DT == kF32) return int32_t(key32);
  if constexpr (DT == kBF16) return int32_t((key32 + 0xffffu) >> 16);
  int32_t lo = 0, hi = 0x7c01;  // key(0x7c01), a NaN, is >= kInfKey + 1 >= key32
  while (lo < hi) {
    int32_t mid = (lo + hi) / 2;
    const uint16_t h = uint16_t(mid);
    if (key_at<kF16>(&h, 0) >= key32) hi = mid; else lo = mid + 1;
  }
  return lo;
}

template <class F>
inline void dispatch_dt(int32_t dt, F&& f) {
  if (dt == kF32) f(std::integral_constant<int, kF32>{});
  else if (dt == kBF16) f(std::integral_constant<int, kBF16>{});
  else f(std::integral_constant<int, kF16>{});
}

inline std::vector<Chunk> make_chunks(const std::vector<Src>& srcs, int64_t chunk) {
  std::vector<Chunk> out;
  for (size_t s = 0; s < srcs.size(); ++s)
    for (int64_t b = 0; b < srcs[s].n; b += chunk)
      out.push_back({int32_t(s), b, std::min(srcs[s].n, b + chunk)});
  return out;
}

// Runs fn(task, chunk_begin, chunk_end) over `tasks` static slices of nchunks.
template <class F>
void run_tasks(int64_t nchunks, int64_t tasks, bool parallel, F&& fn) {
  if (!parallel || tasks <= 1) {
    for (int64_t t = 0; t < tasks; ++t) fn(t, nchunks * t / tasks, nchunks * (t + 1) / tasks);
    return;
  }
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) fn(t, nchunks * t / tasks, nchunks * (t + 1) / tasks);
  });
}

inline uint64_t load8(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline int popcount64(uint64_t x) {  // portable: no popcnt instruction assumed
  x = x - ((x >> 1) & 0x5555555555555555ull);
  x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
  x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0full;
  return int((x * 0x0101010101010101ull) >> 56);
}

// An op's tensor list, checked: not empty, on the CPU, dense, contiguous, supported dtypes.
inline std::vector<at::Tensor> cpu_tensor_list(at::TensorList ts, const char* op) {
  std::vector<at::Tensor> out(ts.begin(), ts.end());
  TORCH_CHECK(!out.empty(), "worm: ", op, " got no tensors");
  TORCH_CHECK(out[0].is_cpu(), "worm: the C++ ", op, " takes CPU tensors");
  check_list(out, "tensors", out[0].device());
  return out;
}

// The key of the k-th smallest entry of srcs among the keys whose bits from `below`
// up equal `prefix` (below = 31, prefix = 0: all keys); 1 <= k <= their count. One
// histogram pass per digit of at most 16 bits (11 under 4 Mi entries).
uint32_t radix_select(const std::vector<Src>& srcs, int64_t k, bool parallel, uint32_t prefix,
                      int below);

}  // namespace worm
