// The local halves of the sharded (FSDP2) sampling step: python/worm/shard_select.py
// runs the select across ranks, all-reducing only what these two ops return.
//
//   key_histogram(tensors, segment, lo, hi, shift, bins, stride) -> int64 [S, bins + 2]
//     per segment s: bins b < `bins` count the keys in [lo[s], hi[s]) with
//     (key - lo[s]) >> shift[s] == b; column `bins` the keys below lo[s], column
//     bins + 1 the NaN/Inf keys. stride > 1 reads a sample: one run of 4096 entries out
//     of every `stride`, at a hashed place in its stratum (the sharded step's level one).
//   window_split_(tensors, lo, hi, window, head, cap) -> (counts, tally, keys, pos)
//     writes the head row of `window`: an entry's bit is set iff its key >= hi[i];
//     counts[j] = popcount(new row XOR row j before the write); tally int64 [3, T]: the
//     keys below lo[i], in [lo[i], hi[i]) and NaN/Inf per tensor; the entries in the
//     window (at most `cap`; if more, only the tally is exact) come back as their key
//     (int32) and their bit position in the row (int64), so the caller can finish the
//     select over ranks and set their bits (the other rows hold their old bits).
//
// Keys are the fp32 bit pattern of |w| (float64 weights rounded to fp32 first, as the
// single-process search scores them); tensors may be empty (an FSDP2 shard can be).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>

#include "cpu_keys.h"

namespace worm {
namespace {

constexpr int32_t kF64 = 3;
constexpr int64_t kRun = 4096;            // entries in one sampled run
constexpr int64_t kChunk = int64_t(1) << 16;  // entries per task (a multiple of 64)

int32_t code_of(const at::Tensor& t, size_t i) {
  if (t.scalar_type() == at::kDouble) return kF64;
  return dtype_code(t, "tensors", i);
}

template <int DT>
inline uint32_t skey(const void* p, int64_t i) {
  if constexpr (DT == kF64) {
    const float f = static_cast<float>(static_cast<const double*>(p)[i]);
    return f32_bits(f) & 0x7fffffffu;
  } else {
    return key_at<DT>(p, i);
  }
}

template <class F>
inline void dispatch4(int32_t dt, F&& f) {
  if (dt == kF64) f(std::integral_constant<int, kF64>{});
  else dispatch_dt(dt, std::forward<F>(f));
}

std::vector<Src> sources(const std::vector<at::Tensor>& ts) {
  std::vector<Src> out;
  for (size_t i = 0; i < ts.size(); ++i) out.push_back({ts[i].data_ptr(), ts[i].numel(), code_of(ts[i], i)});
  return out;
}

std::vector<at::Tensor> checked(at::TensorList tensors, const char* op) {
  std::vector<at::Tensor> ts(tensors.begin(), tensors.end());
  TORCH_CHECK(!ts.empty(), "worm: ", op, " got no tensors");
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK(t.is_cpu() && t.layout() == at::kStrided && t.is_contiguous(), "worm: ", op,
                ": tensors[", i, "] must be a dense contiguous CPU tensor");
    code_of(t, i);
  }
  return ts;
}

uint32_t key_arg(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= (int64_t(1) << 31), "worm: ", what, " key ", v, " outside [0, 2^31]");
  return uint32_t(v);
}

at::Tensor key_histogram_cpu(at::TensorList tensors, at::IntArrayRef segment, at::IntArrayRef lo,
                             at::IntArrayRef hi, at::IntArrayRef shift, int64_t bins, int64_t stride) {
  const auto ts = checked(tensors, "key_histogram");
  const int64_t S = int64_t(lo.size()), T = int64_t(ts.size()), W = bins + 2;
  TORCH_CHECK(int64_t(segment.size()) == T, "worm: key_histogram: one segment per tensor");
  TORCH_CHECK(int64_t(hi.size()) == S && int64_t(shift.size()) == S && S >= 1,
              "worm: key_histogram: lo, hi and shift hold one value per segment");
  TORCH_CHECK(bins >= 1 && bins <= (int64_t(1) << 16) && stride >= 1 && stride <= 1024,
              "worm: key_histogram: 1 <= bins <= 65536 and 1 <= stride <= 1024");
  std::vector<uint32_t> L(S), H(S);
  std::vector<int> SH(S);
  for (int64_t s = 0; s < S; ++s) {
    L[s] = key_arg(lo[s], "lo"), H[s] = key_arg(hi[s], "hi");
    TORCH_CHECK(shift[s] >= 0 && shift[s] <= 31, "worm: key_histogram: shift outside [0, 31]");
    SH[s] = int(shift[s]);
    TORCH_CHECK(H[s] <= L[s] || ((uint64_t(H[s] - L[s]) - 1) >> SH[s]) < uint64_t(bins),
                "worm: key_histogram: [lo, hi) >> shift does not fit in bins");
  }
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(segment[i] >= 0 && segment[i] < S, "worm: key_histogram: segment out of range");
  const auto srcs = sources(ts);
  // Work: blocks of whole strata (stride runs each), so a sample never depends on the split.
  const int64_t span = kRun * stride;
  const int64_t per = std::max<int64_t>(1, kChunk / span) * span;
  const auto chunks = make_chunks(srcs, per);
  const int64_t threads = at::get_num_threads();
  const int64_t W1 = W + 1;  // scratch rows: + the 'above' slot
  std::vector<int64_t> hist(threads * S * W1, 0);
  auto work = [&](int64_t cb, int64_t ce) {
    int64_t* h = hist.data() + at::get_thread_num() * S * W1;
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const Src& src = srcs[ch.src];
      const int64_t s = segment[ch.src];
      int64_t* hs = h + s * W1;
      const uint32_t l = L[s], u = H[s];
      const int sh = SH[s];
      dispatch4(src.dt, [&](auto dtc) {
        constexpr int DT = decltype(dtc)::value;
        const uint32_t width = u > l ? u - l : 0;
        auto count = [&](int64_t i0, int64_t i1) {
          // one slot per entry, picked without branches: in range, below, NaN/Inf, above
          for (int64_t i = i0; i < i1; ++i) {
            const uint32_t k = skey<DT>(src.p, i);
            const uint32_t d = k - l;
            const int64_t slot = k >= kInfKey ? bins + 1 : (d < width ? int64_t(d >> sh) : (k < l ? bins : bins + 2));
            ++hs[slot];
          }
        };
        if (stride == 1) return count(ch.begin, ch.end);
        for (int64_t base = ch.begin; base < ch.end; base += span) {
          const uint64_t stratum = uint64_t(base / span) + 1;
          const int64_t pick = int64_t(((stratum * 0x9E3779B97F4A7C15ull) >> 32) % uint64_t(stride));
          const int64_t i0 = base + pick * kRun;
          if (i0 < ch.end) count(i0, std::min(i0 + kRun, ch.end));
        }
      });
    }
  };
  const int64_t total = [&] { int64_t n = 0; for (auto& s : srcs) n += s.n; return n; }();
  if (total / stride >= (int64_t(1) << 18) && threads > 1)
    at::parallel_for(0, int64_t(chunks.size()), 1, work);
  else
    work(0, int64_t(chunks.size()));
  auto out = at::zeros({S, W}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t j = 0; j < W; ++j) o[s * W + j] += hist[(t * S + s) * W1 + j];
  return out;
}

// 8 bytes of 0/1 -> 8 bits, byte i to bit i.
inline uint64_t bytes_to_bits(const uint8_t* b) {
  return (load8(b) * 0x0102040810204080ull) >> 56;
}

struct Collected {
  std::vector<int32_t> key;
  std::vector<int64_t> pos;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_split_cpu(
    at::TensorList tensors, at::IntArrayRef lo, at::IntArrayRef hi, at::Tensor window, int64_t head,
    int64_t cap) {
  const auto ts = checked(tensors, "window_split_");
  const int64_t T = int64_t(ts.size());
  TORCH_CHECK(int64_t(lo.size()) == T && int64_t(hi.size()) == T,
              "worm: window_split_: lo and hi hold one key per tensor");
  std::vector<uint32_t> L(T), H(T);
  for (int64_t i = 0; i < T; ++i) {
    L[i] = key_arg(lo[i], "lo"), H[i] = key_arg(hi[i], "hi");
    TORCH_CHECK(L[i] <= H[i], "worm: window_split_: lo > hi");
  }
  std::vector<int64_t> off(T + 1, 0);
  for (int64_t i = 0; i < T; ++i) off[i + 1] = off[i] + packed_nbytes(ts[i].numel());
  check_window(window, head, off[T], ts[0].device());
  const int64_t rows = window.size(0);
  TORCH_CHECK(rows <= 64, "worm: window_split_: at most 64 rows");
  TORCH_CHECK(cap >= 0, "worm: window_split_: cap < 0");
  const auto srcs = sources(ts);
  const auto chunks = make_chunks(srcs, kChunk);
  uint8_t* ring = window.data_ptr<uint8_t>();
  const int64_t B = off[T];
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> counts(threads * 64, 0), tally(threads * 3 * T, 0);
  std::vector<Collected> got(chunks.size());
  std::atomic<int64_t> taken{0};
  auto work = [&](int64_t cb, int64_t ce) {
    const int64_t tid = at::get_thread_num();
    int64_t* cnt = counts.data() + tid * 64;
    int64_t* tl = tally.data() + tid * 3 * T;
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const Src& src = srcs[ch.src];
      const uint32_t l = L[ch.src], u = H[ch.src];
      // signed copies for the vector compares (keys < 2^31; hi = 2^31 keeps nothing finite)
      const int32_t sl = int32_t(std::min<uint32_t>(l, 0x7fffffffu));
      const int32_t su = u >= 0x80000000u ? INT32_MAX : int32_t(u);
      Collected& mine = got[c];
      int64_t below = 0, inside = 0, bad = 0;
      dispatch4(src.dt, [&](auto dtc) {
        constexpr int DT = decltype(dtc)::value;
        for (int64_t w0 = ch.begin; w0 < ch.end; w0 += 64) {
          const int64_t m = std::min<int64_t>(64, ch.end - w0);
          uint64_t keep = 0, in = 0;
          if (m == 64) {  // branch-free compares the compiler vectorizes, then 8 bytes -> bits
            int32_t kk[64];
            uint8_t ge[64], lt[64], nf[64];
            for (int e = 0; e < 64; ++e) kk[e] = int32_t(skey<DT>(src.p, w0 + e));
            for (int e = 0; e < 64; ++e) {
              ge[e] = kk[e] >= su, lt[e] = kk[e] < sl, nf[e] = kk[e] >= int32_t(kInfKey);
            }
            uint64_t ltm = 0, nfm = 0;
            for (int j = 0; j < 8; ++j) {
              keep |= bytes_to_bits(ge + 8 * j) << (8 * j);
              ltm |= bytes_to_bits(lt + 8 * j) << (8 * j);
              nfm |= bytes_to_bits(nf + 8 * j) << (8 * j);
            }
            in = ~keep & ~ltm;
            below += __builtin_popcountll(ltm);
            bad += __builtin_popcountll(nfm);
          } else {
            for (int64_t e = 0; e < m; ++e) {
              const uint32_t k = skey<DT>(src.p, w0 + e);
              keep |= uint64_t(k >= u) << e;
              in |= uint64_t((k >= l) & (k < u)) << e;
              below += k < l;
              bad += k >= kInfKey;
            }
          }
          const int64_t byte = off[ch.src] + w0 / 8, nb = (m + 7) / 8;
          for (int64_t j = 0; j < rows; ++j) {
            uint64_t o = 0;
            if (nb == 8) o = load8(ring + j * B + byte);
            else std::memcpy(&o, ring + j * B + byte, nb);
            cnt[j] += popcount64(keep ^ o);
          }
          if (nb == 8) std::memcpy(ring + head * B + byte, &keep, 8);
          else std::memcpy(ring + head * B + byte, &keep, nb);
          if (in) {
            const int64_t here = __builtin_popcountll(in);
            inside += here;
            if (taken.fetch_add(here, std::memory_order_relaxed) + here <= cap) {
              for (uint64_t r = in; r; r &= r - 1) {
                const int e = __builtin_ctzll(r);
                mine.key.push_back(int32_t(skey<DT>(src.p, w0 + e)));
                mine.pos.push_back(byte * 8 + e);
              }
            }
          }
        }
      });
      tl[ch.src] += below, tl[T + ch.src] += inside, tl[2 * T + ch.src] += bad;
    }
  };
  int64_t total = 0;
  for (auto& s : srcs) total += s.n;
  if (total >= (int64_t(1) << 18) && threads > 1)
    at::parallel_for(0, int64_t(chunks.size()), 1, work);
  else
    work(0, int64_t(chunks.size()));
  auto out_counts = at::zeros({rows}, at::kLong);
  auto out_tally = at::zeros({3, T}, at::kLong);
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t j = 0; j < rows; ++j) out_counts.data_ptr<int64_t>()[j] += counts[t * 64 + j];
    for (int64_t j = 0; j < 3 * T; ++j) out_tally.data_ptr<int64_t>()[j] += tally[t * 3 * T + j];
  }
  int64_t m = 0;
  for (auto& g : got) m += int64_t(g.key.size());
  auto keys = at::empty({m}, at::kInt), pos = at::empty({m}, at::kLong);
  int64_t q = 0;
  for (auto& g : got) {
    std::copy(g.key.begin(), g.key.end(), keys.data_ptr<int32_t>() + q);
    std::copy(g.pos.begin(), g.pos.end(), pos.data_ptr<int64_t>() + q);
    q += int64_t(g.key.size());
  }
  return {out_counts, out_tally, keys, pos};
}

// The finish: entries collected by window_split_ (keys, bit positions; sizes[i] of them
// from tensor i, in order) whose key is above thr[i] get their bit in the head row set;
// returns int64 [l], by how much each row's XOR count moves (+1 where the row's bit is
// 0, -1 where it is 1).
at::Tensor window_fix_cpu(at::Tensor window, int64_t head, const at::Tensor& keys, const at::Tensor& pos,
                          at::IntArrayRef sizes, at::IntArrayRef thr) {
  TORCH_CHECK(window.scalar_type() == at::kByte && window.dim() == 2 && window.is_contiguous(),
              "worm: window_fix_: window must be a contiguous uint8 [l, B]");
  TORCH_CHECK(head >= 0 && head < window.size(0), "worm: window_fix_: head out of range");
  TORCH_CHECK(keys.scalar_type() == at::kInt && pos.scalar_type() == at::kLong && keys.dim() == 1 &&
                  pos.dim() == 1 && keys.numel() == pos.numel() && keys.is_contiguous() && pos.is_contiguous(),
              "worm: window_fix_: keys int32 [m] and pos int64 [m]");
  TORCH_CHECK(sizes.size() == thr.size(), "worm: window_fix_: one threshold per size");
  const int64_t rows = window.size(0), B = window.size(1);
  int64_t total = 0;
  for (auto n : sizes) total += n;
  TORCH_CHECK(total == keys.numel(), "worm: window_fix_: sizes do not add up to the entries");
  auto corr = at::zeros({rows}, at::kLong);
  int64_t* c = corr.data_ptr<int64_t>();
  uint8_t* ring = window.data_ptr<uint8_t>();
  const int32_t* k = keys.data_ptr<int32_t>();
  const int64_t* p = pos.data_ptr<int64_t>();
  int64_t q = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    for (int64_t e = 0; e < sizes[i]; ++e, ++q) {
      if (int64_t(k[q]) <= thr[i]) continue;
      const int64_t byte = p[q] >> 3;
      TORCH_CHECK(byte >= 0 && byte < B, "worm: window_fix_: position outside the row");
      const uint8_t bit = uint8_t(1u << (p[q] & 7));
      for (int64_t j = 0; j < rows; ++j) c[j] += (ring[j * B + byte] & bit) ? -1 : 1;
      ring[head * B + byte] |= bit;
    }
  }
  return corr;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(worm_native, m) {
  m.def("window_fix_(Tensor(a!) window, int head, Tensor keys, Tensor pos, int[] sizes, int[] thr) -> Tensor");
  m.def("key_histogram(Tensor[] tensors, int[] segment, int[] lo, int[] hi, int[] shift, int bins, "
        "int stride) -> Tensor");
  m.def("window_split_(Tensor[] tensors, int[] lo, int[] hi, Tensor(a!) window, int head, int cap) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(worm_native, CPU, m) {
  m.impl("key_histogram", &key_histogram_cpu);
  m.impl("window_split_", &window_split_cpu);
  m.impl("window_fix_", &window_fix_cpu);
}

}  // namespace worm
