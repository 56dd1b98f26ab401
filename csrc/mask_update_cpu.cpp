// CPU: mask_update_, fused in one pass (compare, pack, write window[head],
// XOR-popcount every row). Semantics: python/worm/ops/mask_update.py.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu_keys.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace worm {

// ------------------------------------------------------------------- mask update
namespace {

// 16-bit types compare in their own bit domain: keep iff T < |h| <= inf, where T is
// the largest |h| pattern whose value is <= thr (-1: all finite kept; NaN thr: none).
template <int DT>
int32_t half_cut(float thr) {
  if (std::isnan(thr)) return 0x7fff;
  if (thr < 0) return -1;  // -inf (k == 0)
  return domain_from<DT>((f32_bits(thr) & 0x7fffffffu) + 1) - 1;
}

// Keep bits of 64 consecutive entries starting at p (entry j -> bit j).
template <int DT>
inline uint64_t keep_word(const void* p, float thr, int32_t cut) {
  uint64_t w = 0;
  if constexpr (DT == kF32) {
    const float* f = static_cast<const float*>(p);
#if defined(__SSE2__)
    const __m128 t = _mm_set1_ps(thr);
    const __m128 absm = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    for (int q = 0; q < 16; ++q) {
      __m128 v = _mm_and_ps(_mm_loadu_ps(f + 4 * q), absm);
      w |= uint64_t(_mm_movemask_ps(_mm_cmpgt_ps(v, t))) << (4 * q);
    }
#else
    for (int j = 0; j < 64; ++j) w |= uint64_t(std::fabs(f[j]) > thr) << j;
#endif
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p);
    const int32_t inf = DT == kBF16 ? 0x7f80 : 0x7c00;
#if defined(__SSE2__)
    const __m128i c = _mm_set1_epi16(int16_t(cut)), i16 = _mm_set1_epi16(int16_t(inf));
    const __m128i absm = _mm_set1_epi16(0x7fff), z = _mm_setzero_si128();
    for (int q = 0; q < 8; ++q) {
      __m128i a = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 8 * q)), absm);
      __m128i m = _mm_andnot_si128(_mm_cmpgt_epi16(a, i16), _mm_cmpgt_epi16(a, c));
      w |= uint64_t(_mm_movemask_epi8(_mm_packs_epi16(m, z)) & 0xff) << (8 * q);
    }
#else
    for (int j = 0; j < 64; ++j) {
      int32_t a = h[j] & 0x7fff;
      w |= uint64_t(a > cut && a <= inf) << j;
    }
#endif
  }
  return w;
}

template <int DT>
inline bool keep_one(const void* p, int64_t i, float thr, int32_t cut) {
  if constexpr (DT == kF32) return std::fabs(static_cast<const float*>(p)[i]) > thr;
  const int32_t inf = DT == kBF16 ? 0x7f80 : 0x7c00;
  int32_t a = static_cast<const uint16_t*>(p)[i] & 0x7fff;
  return a > cut && a <= inf;
}

at::Tensor mask_update_cpu(at::TensorList tensors_, const at::Tensor& thr_, const at::Tensor& window,
                           int64_t head) {
  const auto tensors = cpu_tensor_list(tensors_, "mask_update_");
  const auto dev = tensors[0].device();
  const int64_t T = tensors.size();
  check_thr(thr_, T, dev);
  std::vector<int64_t> off(T + 1, 0);
  for (int64_t i = 0; i < T; ++i) off[i + 1] = off[i] + packed_nbytes(tensors[i].numel());
  check_window(window, head, off[T], dev);

  const at::Tensor thr = thr_.contiguous();
  const float* thr_p = thr.data_ptr<float>();
  const int64_t L = window.size(0), B = off[T];
  uint8_t* win = window.data_ptr<uint8_t>();

  // Work units of up to 64 Ki entries (8 KiB of mask), word-aligned within a tensor.
  struct Unit { int32_t t; int64_t begin, end; };
  std::vector<Unit> units;
  std::vector<int32_t> cuts(T), dts(T);
  for (int64_t i = 0; i < T; ++i) {
    dts[i] = dtype_code(tensors[i], "tensors", i);
    dispatch_dt(dts[i], [&](auto dtc) {
      constexpr int DT = decltype(dtc)::value;
      if constexpr (DT != kF32) cuts[i] = half_cut<DT>(thr_p[i]);
    });
    for (int64_t b = 0; b < tensors[i].numel(); b += 1 << 16)
      units.push_back({int32_t(i), b, std::min<int64_t>(tensors[i].numel(), b + (1 << 16))});
  }
  const int64_t nunits = units.size();
  int64_t total = 0;
  for (int64_t i = 0; i < T; ++i) total += tensors[i].numel();
  const int64_t tasks =
      total >= kMinParallelEntries ? std::min<int64_t>(at::get_num_threads(), nunits) : 1;
  std::vector<int64_t> part(tasks * L, 0);
  run_tasks(nunits, tasks, true, [&](int64_t task, int64_t ub, int64_t ue) {
    int64_t* cnt = part.data() + task * L;
    for (int64_t u = ub; u < ue; ++u) {
      const Unit& un = units[u];
      const void* p = tensors[un.t].data_ptr();
      const float tv = thr_p[un.t];
      const int32_t cut = cuts[un.t];
      const int64_t base = off[un.t];
      dispatch_dt(dts[un.t], [&](auto dtc) {
        constexpr int DT = decltype(dtc)::value;
        constexpr int esz = DT == kF32 ? 4 : 2;
        int64_t e = un.begin;
        for (; e + 64 <= un.end; e += 64) {
          uint64_t w = keep_word<DT>(static_cast<const char*>(p) + esz * e, tv, cut);
          const int64_t byte = base + e / 8;
          for (int64_t j = 0; j < L; ++j) cnt[j] += popcount64(w ^ load8(win + j * B + byte));
          std::memcpy(win + head * B + byte, &w, 8);
        }
        for (; e < un.end; e += 8) {  // tail: byte by byte, padding bits 0
          uint32_t byte_v = 0;
          for (int64_t q = e; q < std::min(e + 8, un.end); ++q)
            byte_v |= uint32_t(keep_one<DT>(p, q, tv, cut)) << (q - e);
          const int64_t byte = base + e / 8;
          for (int64_t j = 0; j < L; ++j) cnt[j] += popcount64(byte_v ^ win[j * B + byte]);
          win[head * B + byte] = uint8_t(byte_v);
        }
      });
    }
  });
  at::Tensor counts = at::zeros({L}, at::kLong);
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t j = 0; j < L; ++j) c[j] += part[t * L + j];
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(worm_native, CPU, m) {
  m.impl("mask_update_", &mask_update_cpu);
}

}  // namespace worm
