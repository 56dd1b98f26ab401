// CPU: exact threshold selection and the fused sampling step (sample_mask_), on the
// plan of docs/ops.md ("Sampling in one pass"), about 1.2 reads of the scores:
//
//   level one  a window of keys [lo, hi) that holds the k-th key: from a sample of
//              16 KiB runs (1/16 to 1/4 of the data) for sets of 2^19+ entries, else
//              from a histogram of every key's top 10-16 bits (u32 counters, two
//              interleaved copies so runs of one bin do not stall on store-to-load
//              forwarding);
//   level two  one read of every entry: above the window kept, below pruned and
//              counted, inside collected (key, bit position, its bit in every window
//              row); sample_mask_ writes the provisional mask (window entries pruned)
//              and XOR-popcounts it against every row on the way;
//   finish     the exact rank inside the collected keys (radix passes), then the
//              collected entries above the threshold get their bit set and every
//              row's count moves by one for each: no further read of the scores.
//
// Exactness never rests on the sample: a window that misses the k-th key, overflows
// (ties) or met a NaN/Inf the sample did not see restores the head row and reruns on
// the exact level one. An exact window of more than max(4096, n/64) entries (massive
// ties, e.g. most weights exactly zero) is finished by the radix select over its bits
// (one or two more reads). Masks, thresholds, ties and the NaN/Inf rule are the reference's
// (python/worm/ops/) exactly; tests/ops/test_sample_plan.py drives every path.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "cpu_keys.h"

#if defined(__x86_64__) || defined(__SSE2__)
#include <immintrin.h>
#endif

namespace worm {
namespace {

// How often each path of the plan ran in this process (tests assert that the inputs
// built to drive a path did; read through torch.ops.worm_native.plan_counters).
enum PlanCounter {
  kSampledHit, kSampledMiss, kOverflow, kUnreadNonfinite, kRadixFinish, kOneKeyBin, kNumCounters
};
std::atomic<int64_t> plan_counters[kNumCounters];
inline void count(PlanCounter c) { plan_counters[c].fetch_add(1, std::memory_order_relaxed); }

constexpr int64_t kUnit = int64_t(1) << 16;  // entries per work unit (a multiple of 64)
constexpr size_t kKeepScratch = size_t(64) << 20;

// Bits of the level-one histogram for a segment of n entries: about 64 entries per
// bin, at most 64 Ki bins (two u32 copies per task stay in a 1 MiB L2).
int level_bits(int64_t n) {
  int len = 64 - __builtin_clzll(uint64_t(std::max<int64_t>(n, 1)));
  return std::clamp(len - 6, 10, 16);
}

int64_t bucket_cap(int64_t n) { return std::max<int64_t>(4096, n / 64); }

// One selection: the whole set (global) or one tensor (layer).
struct Seg {
  std::vector<int32_t> members;  // tensor indices
  int64_t n = 0, k = 0;
  bool known = false;      // thr_key is exact (or k == 0: nothing pruned)
  uint32_t thr_key = 0;
  bool sampled = false;    // [lo, hi) came from a sample; its rank is known after level two
  uint32_t lo = 0, hi = 0; // !known: the k-th key lies in [lo, hi) (sampled: very likely)
  int64_t rank = 0;        // !known: k among the keys in [lo, hi)
  int64_t expect = 0;      // !known: entries expected in [lo, hi) (exact unless sampled)

  // Level one did not see every entry (a sample, or k == 0: nothing to select), so a
  // NaN/Inf can only show up in level two.
  bool unread() const { return sampled || k == 0; }
};

// A tensor's cut in its own comparison domain (fp32: the 31-bit key; fp16/bf16:
// |h| as 15 bits): keep iff a > keep_m1; window entry iff cand_m1 < a <= keep_m1;
// NaN/Inf iff a > bad_m1.
struct Cut {
  int32_t keep_m1, cand_m1, bad_m1;
};

template <int DT>
Cut cut_of(const Seg& sg) {
  const int32_t bad = domain_from<DT>(kInfKey) - 1;
  if (sg.known) {
    // keep iff key > thr_key; k == 0 keeps every (finite) entry
    const int32_t from = sg.k == 0 ? 0 : domain_from<DT>(sg.thr_key + 1);
    return {from - 1, from - 1, bad};
  }
  return {domain_from<DT>(sg.hi) - 1, domain_from<DT>(sg.lo) - 1, bad};
}

template <int DT>
inline int32_t domain_at(const void* p, int64_t i) {
  if constexpr (DT == kF32) return int32_t(key_at<kF32>(p, i));
  return int32_t(static_cast<const uint16_t*>(p)[i] & 0x7fffu);
}

// A window entry: its bit in a window row and its key. (Its bits in the older rows
// are read back at the fix-up: level two leaves those rows as they were, and the head
// row's old content is kept.)
struct Cand {
  int64_t pos;
  uint32_t key;
  int32_t seg;
};

struct Window {
  uint8_t* p = nullptr;  // nullptr: collect window entries only (select_thresholds)
  int64_t L = 0, B = 0, head = 0;
};

// What one task of level two found.
struct TaskOut {
  std::vector<int64_t> counts;  // [L] provisional XOR counts
  std::vector<int64_t> below;   // [segments] entries below the window
  std::vector<Cand> cands;
  // All tasks together collect at most `limit` entries: each claims room from one
  // shared count in blocks (a contended atomic per entry would cost more than the
  // entry), so the total may pass it by less than a block per task.
  int64_t limit = 0, allowance = 0;
  std::atomic<int64_t>* claimed = nullptr;
  bool overflow = false, bad = false;

  bool claim(int64_t need) {
    if (overflow) return false;
    const int64_t block = std::max<int64_t>(need, 4096);
    if (claimed->fetch_add(block, std::memory_order_relaxed) > limit) {
      overflow = true;  // the caller falls back to the exact plan
      return false;
    }
    allowance += block;
    cands.reserve(cands.size() + allowance);
    return true;
  }
};

namespace base {
#define WORM_AVX2 0
#include "level_two.inc"
#undef WORM_AVX2
}  // namespace base

#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
#define WORM_HAVE_AVX2_PATH 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,popcnt")
#endif
namespace avx2 {
#define WORM_AVX2 1
#include "level_two.inc"
#undef WORM_AVX2
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

// AVX2 + POPCNT where the CPU has them (x86-64 CPUs since about 2013): level two is
// 15-25% faster with 8-lane compares and one-instruction popcounts.
bool use_avx2() {
#if defined(WORM_HAVE_AVX2_PATH)
  // WORM_CPU_BASELINE=1 forces the baseline path (tests run both on AVX2 machines)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") &&
                         !(std::getenv("WORM_CPU_BASELINE") && std::getenv("WORM_CPU_BASELINE")[0] == '1');
  return ok;
#else
  return false;
#endif
}

template <int DT>
void level_two(const void* p, int64_t b, int64_t e, Cut c, int32_t seg, int64_t bit0,
               const Window& w, TaskOut& out) {
#if defined(WORM_HAVE_AVX2_PATH)
  if (use_avx2()) return avx2::level_two<DT>(p, b, e, c, seg, bit0, w, out);
#endif
  base::level_two<DT>(p, b, e, c, seg, bit0, w, out);
}

// Adds the keys of entries [i, e) to two interleaved histograms of key >> shift.
template <int DT>
inline void add_keys(const void* p, int64_t i, int64_t e, int shift, uint32_t* h0, uint32_t* h1) {
  for (; i + 2 <= e; i += 2) {
    h0[key_at<DT>(p, i) >> shift]++;
    h1[key_at<DT>(p, i + 1) >> shift]++;
  }
  if (i < e) h0[key_at<DT>(p, i) >> shift]++;
}

// u32 histogram of `bits` bits over the keys fn visits, two interleaved copies per
// task (runs of one bin do not stall on store-to-load forwarding), merged to int64.
// fn(chunk, h0, h1) adds a chunk's keys; a counter is flushed to int64 before it
// could wrap.
// Returns this thread's reused buffer: valid until its next call.
template <class F>
const std::vector<int64_t>& histogram(const std::vector<Chunk>& chunks, int bits, bool parallel,
                                      F&& fn) {
  const int64_t nb = int64_t(1) << bits, nchunks = chunks.size();
  const int64_t tasks = parallel ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nchunks)) : 1;
  // reused (fresh pages fault); 2 x 64 Ki counters per task, grown only with the threads
  static thread_local std::vector<uint32_t> scratch;
  if (scratch.size() < size_t(tasks) * 2 * nb) scratch.resize(size_t(tasks) * 2 * nb);
  uint32_t* const hp = scratch.data();  // not `scratch` in the tasks: another thread's
  std::fill(hp, hp + size_t(tasks) * 2 * nb, 0u);
  std::vector<std::vector<int64_t>> spill(tasks);
  run_tasks(nchunks, tasks, parallel, [&](int64_t t, int64_t cb, int64_t ce) {
    uint32_t* h0 = hp + t * 2 * nb;
    uint32_t* h1 = h0 + nb;
    int64_t since = 0;
    for (int64_t c = cb; c < ce; ++c) {
      if (since + (chunks[c].end - chunks[c].begin) >= (int64_t(1) << 31)) {
        auto& s = spill[t];
        if (s.empty()) s.assign(nb, 0);
        for (int64_t q = 0; q < nb; ++q) s[q] += int64_t(h0[q]) + h1[q], h0[q] = h1[q] = 0;
        since = 0;
      }
      since += chunks[c].end - chunks[c].begin;
      fn(chunks[c], h0, h1);
    }
  });
  static thread_local std::vector<int64_t> merged;  // reused, like the counters
  merged.assign(nb, 0);
  int64_t* const hist_p = merged.data();
  auto merge = [&](int64_t qb, int64_t qe) {
    for (int64_t t = 0; t < tasks; ++t) {
      const uint32_t* h0 = hp + t * 2 * nb;
      const int64_t* s = spill[t].empty() ? nullptr : spill[t].data();
      for (int64_t q = qb; q < qe; ++q) hist_p[q] += int64_t(h0[q]) + h0[nb + q] + (s ? s[q] : 0);
    }
  };
  if (parallel && tasks > 1) at::parallel_for(0, nb, 4096, merge); else merge(0, nb);
  return merged;
}

std::vector<Src> members_of(const Seg& sg, const std::vector<Src>& srcs, bool* all_bf16) {
  std::vector<Src> mine;
  *all_bf16 = true;
  for (int32_t m : sg.members) {
    mine.push_back(srcs[m]);
    *all_bf16 &= srcs[m].dt == kBF16;
  }
  return mine;
}

// Exact level one: a histogram of every key; the window is the bin holding the k-th
// key (or the threshold is exact: a bf16 bin holds one key; a bin too large to
// collect is finished by the radix select). Returns the segment's NaN/Inf count
// (the segment is left undecided when it is not 0). Needs k > 0.
int64_t exact_level_one(Seg& sg, const std::vector<Src>& srcs, bool parallel) {
  sg.known = sg.sampled = false;
  const int D = level_bits(sg.n), shift = 31 - D;
  bool all_bf16;
  const auto mine = members_of(sg, srcs, &all_bf16);
  const auto chunks = make_chunks(mine, kUnit);
  parallel = parallel && sg.n >= kMinParallelEntries;
  const auto& hist = histogram(chunks, D, parallel, [&](const Chunk& ch, uint32_t* h0, uint32_t* h1) {
    const Src& s = mine[ch.src];
    dispatch_dt(s.dt, [&](auto dtc) {
      add_keys<decltype(dtc)::value>(s.p, ch.begin, ch.end, shift, h0, h1);
    });
  });
  const int64_t nb = hist.size();
  int64_t bad = 0;
  for (int64_t q = int64_t(kInfKey >> shift); q < nb; ++q) bad += hist[q];
  if (bad) return bad;
  int64_t q = 0, k = sg.k;
  while (hist[q] < k) k -= hist[q++];
  sg.lo = uint32_t(q) << shift;
  sg.hi = uint32_t(q + 1) << shift;
  sg.rank = k;
  sg.expect = hist[q];
  if (all_bf16 && shift <= 16) {  // bf16 keys have 16 zero low bits: the bin is one key
    sg.known = true;
    sg.thr_key = sg.lo;
    count(kOneKeyBin);
  } else if (hist[q] > bucket_cap(sg.n)) {
    sg.known = true;
    sg.thr_key = radix_select(mine, k, parallel, uint32_t(q), shift);
    count(kRadixFinish);
  }
  return 0;
}

constexpr int64_t kSampleMin = int64_t(1) << 19;  // smaller segments: exact level one
constexpr int64_t kSampleBytes = 16384;           // sampled entries lie in whole 16 KiB runs
constexpr int64_t kSampleChunk = int64_t(1) << 18;  // a multiple of every run's stratum

int64_t sampled_cap(int64_t n) { return std::max<int64_t>(4096, n / 32); }

// Sampled level one: a histogram of one 16 KiB run (four pages: long enough for the
// hardware prefetchers to stream it, while the pages between runs are not read) out
// of every 16 (8 under 8 Mi entries, 4 under 4 Mi), at a hashed position within its
// stratum so no period of a tensor aliases with it. The window [lo, hi) is the
// sample's ranks k/n * s +- 5 standard errors (+ 16), widened to whole bins; the
// standard error is the larger of the i.i.d. one and the one measured across the
// sampled runs (weights correlate within a row), so structured tensors get wider
// windows instead of misses. Level two counts the
// entries below the window exactly, so the result stays exact; a window that misses
// the k-th key costs a rerun with the exact plan. Returns false (segment untouched)
// where a sample cannot help: NaN/Inf in it, or a window expected to hold more
// entries than level two may collect (massive ties). Needs k > 0.
bool sampled_level_one(Seg& sg, const std::vector<Src>& srcs, bool parallel) {
  if (sg.n < kSampleMin) return false;
  const int log_stride = sg.n >= (int64_t(1) << 23) ? 4 : (sg.n >= (int64_t(1) << 22) ? 3 : 2);
  const int D = std::clamp(64 - __builtin_clzll(uint64_t(sg.n >> log_stride)) - 4, 10, 16);
  const int shift = 31 - D;
  bool all_bf16;
  const auto mine = members_of(sg, srcs, &all_bf16);
  const auto chunks = make_chunks(mine, kSampleChunk);
  parallel = parallel && sg.n >= kMinParallelEntries;
  // fn(first, last, stratum) over the sampled run of every stratum of a chunk
  auto runs = [&](const Chunk& ch, auto&& fn) {
    const Src& s = mine[ch.src];
    const int esz = s.dt == kF32 ? 4 : 2;
    const int64_t run = kSampleBytes / esz, span = run << log_stride;
    auto start = [&](int64_t base) {
      const uint32_t stratum = uint32_t(base / span);
      return base + run * ((stratum * 0x9E3779B1u) >> (32 - log_stride));
    };
    for (int64_t base = ch.begin; base < ch.end; base += span) {  // span divides the chunk
      const int64_t i0 = start(base);
      if (i0 < ch.end) fn(s, i0, std::min(i0 + run, ch.end), uint32_t(base / span));
    }
  };
  const auto& hist = histogram(chunks, D, parallel, [&](const Chunk& ch, uint32_t* h0, uint32_t* h1) {
    runs(ch, [&](const Src& s, int64_t i0, int64_t i1, uint32_t) {
      dispatch_dt(s.dt, [&](auto dtc) {
        add_keys<decltype(dtc)::value>(s.p, i0, i1, shift, h0, h1);
      });
    });
  });
  const int64_t finite_bins = int64_t(kInfKey >> shift), nb = hist.size();
  int64_t size = 0, bad = 0;
  for (int64_t q = 0; q < nb; ++q) (q < finite_bins ? size : bad) += hist[q];
  if (bad || size < 4096) return false;
  const double p = double(sg.k) / double(sg.n);
  // the bin of sample rank r (1-indexed, clamped to the sample)
  auto bin_of = [&](int64_t r) {
    int64_t cum = 0, q = 0;
    for (; q < finite_bins - 1; ++q)
      if ((cum += hist[q]) >= r) break;
    return q;
  };
  // Standard error of the fraction below the estimate, from the spread of that
  // fraction across the sampled runs (every m-th run: ~256 of them estimate it well).
  const uint32_t center = uint32_t(bin_of(std::max<int64_t>(1, int64_t(p * double(size))))) << shift;
  const int64_t tasks = parallel ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), int64_t(chunks.size()))) : 1;
  const int64_t all_runs = std::max<int64_t>(1, size * 4 / kSampleBytes);  // fp32 runs; fewer if 16-bit
  const uint32_t every = uint32_t(std::max<int64_t>(1, all_runs / 256));
  std::vector<double> sums(3 * tasks, 0.0);  // runs, sum f, sum f^2
  run_tasks(chunks.size(), tasks, parallel, [&](int64_t t, int64_t cb, int64_t ce) {
    double nr = 0, sf = 0, sf2 = 0;
    for (int64_t c = cb; c < ce; ++c)
      runs(chunks[c], [&](const Src& s, int64_t i0, int64_t i1, uint32_t stratum) {
        if (stratum % every) return;
        dispatch_dt(s.dt, [&](auto dtc) {
          constexpr int DT = decltype(dtc)::value;
          int64_t below = 0;
          for (int64_t i = i0; i < i1; ++i) below += key_at<DT>(s.p, i) < center;
          const double f = double(below) / double(i1 - i0);
          nr += 1, sf += f, sf2 += f * f;
        });
      });
    sums[3 * t] = nr, sums[3 * t + 1] = sf, sums[3 * t + 2] = sf2;
  });
  double nr = 0, sf = 0, sf2 = 0;
  for (int64_t t = 0; t < tasks; ++t) nr += sums[3 * t], sf += sums[3 * t + 1], sf2 += sums[3 * t + 2];
  // variance of one run's fraction over the number of runs the whole sample has
  const double runs_in_sample = nr * double(every);
  const double var_runs =
      nr > 1 ? std::max(0.0, (sf2 - sf * sf / nr) / (nr - 1)) / runs_in_sample : 1.0;
  const double se = std::max(std::sqrt(var_runs), std::sqrt(p * (1.0 - p) / double(size)));
  const double margin = (5.0 * se + 16.0 / double(size)) * double(size);
  const int64_t r_lo = int64_t(std::floor(p * double(size) - margin));
  const int64_t r_hi = int64_t(std::ceil(p * double(size) + margin));
  const int64_t q_lo = r_lo < 1 ? 0 : bin_of(r_lo);
  const int64_t q_hi = r_hi > size ? finite_bins - 1 : bin_of(r_hi);
  int64_t inside = 0;
  for (int64_t q = q_lo; q <= q_hi; ++q) inside += hist[q];
  if (double(inside) * double(sg.n) / double(size) > double(sampled_cap(sg.n))) return false;
  sg.known = false;
  sg.sampled = true;
  sg.expect = int64_t(double(inside) * double(sg.n) / double(size));
  sg.lo = r_lo < 1 ? 0u : uint32_t(q_lo) << shift;
  sg.hi = r_hi > size ? kInfKey : uint32_t(q_hi + 1) << shift;
  return true;
}

// The rank-th smallest (1-indexed) of keys[0, n), which it reorders: passes of up to
// 11 bits below the highest bit in which the keys differ, each keeping only the
// keys of the chosen bin (a window's keys share their top bits; this is ~3x faster
// than nth_element on them).
uint32_t kth_key(uint32_t* keys, int64_t n, int64_t rank) {
  int64_t hist[2048];
  while (n > 64) {
    uint32_t lo = keys[0], hi = keys[0];
    for (int64_t i = 1; i < n; ++i) lo = std::min(lo, keys[i]), hi = std::max(hi, keys[i]);
    if (lo == hi) return lo;
    const int top = 31 - __builtin_clz(lo ^ hi);
    const int digit = std::min(top + 1, 11), shift = top + 1 - digit;
    const uint32_t mask = (1u << digit) - 1;
    std::fill(hist, hist + (1 << digit), 0);
    for (int64_t i = 0; i < n; ++i) hist[(keys[i] >> shift) & mask]++;
    uint32_t b = 0;
    while (hist[b] < rank) rank -= hist[b++];
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i)
      if (((keys[i] >> shift) & mask) == b) keys[m++] = keys[i];
    n = m;
  }
  std::nth_element(keys, keys + rank - 1, keys + n);
  return keys[rank - 1];
}

// Level one of every segment: big ones one at a time (parallel inside), the others
// in parallel. Returns false if a segment holds NaN/Inf.
bool level_one(std::vector<Seg>& segs, const std::vector<Src>& srcs, bool allow_sampling) {
  std::vector<int64_t> bad(segs.size(), 0);
  auto one = [&](size_t s, bool parallel) {
    if (segs[s].k == 0) {  // nothing pruned: no threshold to find
      segs[s].known = true;
      segs[s].sampled = false;
      return;
    }
    if (allow_sampling && sampled_level_one(segs[s], srcs, parallel)) return;
    bad[s] = exact_level_one(segs[s], srcs, parallel);
  };
  std::vector<int64_t> small;
  int64_t small_total = 0;
  for (size_t s = 0; s < segs.size(); ++s) {
    if (segs.size() > 1 && segs[s].n < (int64_t(1) << 21)) {
      small.push_back(s);
      small_total += segs[s].n;
    } else {
      one(s, true);
    }
  }
  const int64_t grain = small_total >= kMinParallelEntries ? 1 : int64_t(small.size()) + 1;
  at::parallel_for(0, small.size(), grain, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) one(small[j], false);
  });
  for (int64_t v : bad)
    if (v) return false;
  return true;
}

void count_nonfinite(const std::vector<Src>& srcs, int64_t* nonfinite) {
  at::parallel_for(0, srcs.size(), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      dispatch_dt(srcs[i].dt, [&](auto dtc) {
        constexpr int DT = decltype(dtc)::value;
        int64_t c = 0;
        for (int64_t j = 0; j < srcs[i].n; ++j) c += key_at<DT>(srcs[i].p, j) >= kInfKey;
        nonfinite[i] = c;
      });
  });
}

// The whole step. win.p == nullptr: select only. Returns false when the set holds
// NaN/Inf (nonfinite then holds the counts; the window is as it was).
bool two_level(const std::vector<Src>& srcs, std::vector<Seg>& segs, const Window& win,
               int64_t* nonfinite, int64_t* counts) {
  const int64_t T = srcs.size(), S = segs.size(), L = win.L;
  std::vector<int32_t> seg_of(T, 0);
  for (int64_t s = 0; s < S; ++s)
    for (int32_t m : segs[s].members) seg_of[m] = int32_t(s);
  std::vector<int64_t> bit0(T + 1, 0);
  for (int64_t i = 0; i < T; ++i) bit0[i + 1] = bit0[i] + 8 * packed_nbytes(srcs[i].n);
  uint8_t* head = win.p ? win.p + win.head * win.B : nullptr;
  // Reused across calls: page faults on fresh buffers cost more than filling them
  // (tasks reach them through pointers: a thread_local named in a task is the task
  // thread's own). Kept only up to kKeepScratch bytes each.
  static thread_local std::vector<TaskOut> pool;
  static thread_local std::vector<uint8_t> saved;
  static thread_local std::vector<uint32_t> keybuf;
  struct Trim {
    ~Trim() {
      size_t held = 0;
      for (auto& o : pool) held += o.cands.capacity() * sizeof(Cand);
      if (held > kKeepScratch)
        for (auto& o : pool) std::vector<Cand>().swap(o.cands);
      if (saved.capacity() > kKeepScratch) std::vector<uint8_t>().swap(saved);
      if (keybuf.capacity() * 4 > kKeepScratch) std::vector<uint32_t>().swap(keybuf);
    }
  } trim;

  for (int attempt = 0;; ++attempt) {
    if (!level_one(segs, srcs, /*allow_sampling=*/attempt == 0)) {
      count_nonfinite(srcs, nonfinite);
      return false;
    }
    int64_t limit = 0;   // window entries level two may collect, over all segments
    int64_t expect = 0;  // and how many it will find (reserved up front: no regrowth)
    for (const Seg& sg : segs) {
      if (sg.known) continue;
      limit += sg.sampled ? sampled_cap(sg.n) : bucket_cap(sg.n);
      expect += sg.expect;
    }
    // The head row as it was: a sampled window can miss, an unread entry can be NaN, an
    // allocation can fail; each puts it back (~1/32 of a read of fp32 scores).
    if (head) saved.assign(head, head + win.B);
    struct Restore {
      uint8_t* head;
      bool armed = true;
      ~Restore() {
        if (armed && head) std::copy(saved.begin(), saved.end(), head);
      }
    } restore{head};

    // ---- level two over every tensor with bits to write or window entries to find
    std::vector<Cut> cuts(T);
    for (int64_t i = 0; i < T; ++i)
      dispatch_dt(srcs[i].dt, [&](auto dtc) { cuts[i] = cut_of<decltype(dtc)::value>(segs[seg_of[i]]); });
    std::vector<Chunk> units;
    int64_t total = 0;
    for (int64_t i = 0; i < T; ++i) {
      if (!win.p && segs[seg_of[i]].known && !segs[seg_of[i]].unread()) continue;
      total += srcs[i].n;
      for (int64_t b = 0; b < srcs[i].n; b += kUnit)
        units.push_back({int32_t(i), b, std::min(srcs[i].n, b + kUnit)});
    }
    const int64_t nunits = units.size();
    const bool parallel = total >= kMinParallelEntries;
    const int64_t tasks = parallel ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nunits)) : 1;
    if (pool.size() < size_t(tasks)) pool.resize(tasks);
    TaskOut* const outs_p = pool.data();
    const c10::ArrayRef<TaskOut> outs(outs_p, tasks);
    std::atomic<int64_t> claimed{0};
    for (int64_t t = 0; t < tasks; ++t) {
      TaskOut& o = outs_p[t];
      o.cands.clear();
      o.overflow = o.bad = false;
      o.counts.assign(L, 0);
      o.below.assign(S, 0);
      o.limit = limit;
      o.allowance = 0;
      o.claimed = &claimed;
      o.cands.reserve(std::min(limit, expect / tasks + expect / (4 * tasks) + 1024));
    }
    run_tasks(nunits, tasks, parallel, [&](int64_t t, int64_t ub, int64_t ue) {
      for (int64_t u = ub; u < ue; ++u) {
        const Chunk& un = units[u];
        dispatch_dt(srcs[un.src].dt, [&](auto dtc) {
          level_two<decltype(dtc)::value>(srcs[un.src].p, un.begin, un.end, cuts[un.src],
                                          seg_of[un.src], bit0[un.src], win, outs_p[t]);
        });
      }
    });
    bool bad = false, overflow = false;
    std::vector<int64_t> below(S, 0), ncand(S, 0);
    for (const auto& o : outs) {
      bad |= o.bad;
      overflow |= o.overflow;
      for (int64_t s = 0; s < S; ++s) below[s] += o.below[s];
      for (const Cand& c : o.cands) ncand[c.seg]++;
    }
    if (bad) {  // only an unread segment can get here
      count(kUnreadNonfinite);
      count_nonfinite(srcs, nonfinite);
      return false;  // restore puts the head row back
    }
    bool miss = overflow;
    if (overflow) count(kOverflow);
    for (int64_t s = 0; s < S && !miss; ++s) {
      Seg& sg = segs[s];
      if (!sg.sampled) continue;
      const bool hit = below[s] < sg.k && sg.k <= below[s] + ncand[s];
      count(hit ? kSampledHit : kSampledMiss);
      if (hit) sg.rank = sg.k - below[s];
      else miss = true;
    }
    if (miss) {
      TORCH_CHECK(attempt == 0, "worm: internal error: the exact plan missed its window");
      continue;  // restore puts the head row back
    }
    for (int64_t l = 0; l < L; ++l) {
      int64_t c = 0;
      for (const auto& o : outs) c += o.counts[l];
      counts[l] = c;
    }

    // ---- finish: the exact rank among each window's entries, then the corrections
    int64_t found = 0;
    for (int64_t s = 0; s < S; ++s) found += ncand[s];
    if (found == 0) {
      restore.armed = false;
      return true;
    }
    // each segment's keys side by side in one reused buffer (no page faults), in parallel
    std::vector<int64_t> start(S + 1, 0);
    for (int64_t s = 0; s < S; ++s) start[s + 1] = start[s] + ncand[s];
    if (keybuf.size() < size_t(found)) keybuf.resize(found);
    uint32_t* const keys = keybuf.data();
    {
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (const auto& o : outs)
        for (const Cand& c : o.cands) keys[fill[c.seg]++] = c.key;
    }
    at::parallel_for(0, S, 1, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) {
        Seg& sg = segs[s];
        if (sg.known) continue;
        sg.thr_key = kth_key(keys + start[s], start[s + 1] - start[s], sg.rank);
        sg.known = true;
      }
    });
    if (head) {
      // Tasks own disjoint bytes (units start a tensor's mask or 8 KiB into it), so
      // each sets its own kept entries; every row's count moves by one per entry.
      std::vector<int64_t> fix(tasks * L, 0);
      const uint8_t* const old_head = saved.data();  // not `saved` in the tasks
      run_tasks(tasks, tasks, parallel, [&](int64_t t, int64_t, int64_t) {
        int64_t kept = 0, ones[64] = {0};
        for (const Cand& c : outs[t].cands) {
          if (c.key <= segs[c.seg].thr_key) continue;  // pruned, as provisionally written
          const int64_t byte = c.pos >> 3;
          const int bit = int(c.pos & 7);
          for (int64_t l = 0; l < L; ++l)  // the entry's bit in each row before this step
            ones[l] += ((l == win.head ? old_head[byte] : win.p[l * win.B + byte]) >> bit) & 1;
          head[byte] |= uint8_t(1u << bit);
          ++kept;
        }
        for (int64_t l = 0; l < L; ++l) fix[t * L + l] = kept - 2 * ones[l];
      });
      for (int64_t t = 0; t < tasks; ++t)
        for (int64_t l = 0; l < L; ++l) counts[l] += fix[t * L + l];
    }
    restore.armed = false;
    return true;
  }
}

std::vector<Seg> make_segs(const std::vector<Src>& srcs, at::IntArrayRef ks, bool global) {
  std::vector<Seg> segs;
  if (global) {
    Seg s;
    for (size_t i = 0; i < srcs.size(); ++i) s.members.push_back(int32_t(i)), s.n += srcs[i].n;
    s.k = ks[0];
    segs.push_back(std::move(s));
  } else {
    for (size_t i = 0; i < srcs.size(); ++i) {
      Seg s;
      s.members = {int32_t(i)};
      s.n = srcs[i].n;
      s.k = ks[i];
      segs.push_back(std::move(s));
    }
  }
  return segs;
}

std::vector<Src> make_srcs(const std::vector<at::Tensor>& tensors) {
  std::vector<Src> srcs;
  for (size_t i = 0; i < tensors.size(); ++i)
    srcs.push_back({tensors[i].data_ptr(), tensors[i].numel(), dtype_code(tensors[i], "tensors", i)});
  return srcs;
}

void write_thresholds(const std::vector<Seg>& segs, bool ok, at::Tensor& thr) {
  if (!ok) {  // any NaN/Inf: no threshold means anything (the caller names the tensor)
    thr.fill_(std::numeric_limits<float>::quiet_NaN());
    return;
  }
  float* t = thr.data_ptr<float>();
  const float ninf = -std::numeric_limits<float>::infinity();
  for (const Seg& s : segs)
    for (int32_t m : s.members) t[m] = s.k == 0 ? ninf : bits_f32(s.thr_key);
}

std::tuple<at::Tensor, at::Tensor> select_thresholds_cpu(at::TensorList tensors_,
                                                         at::IntArrayRef ks,
                                                         c10::string_view scope) {
  const auto tensors = cpu_tensor_list(tensors_, "select_thresholds");
  const bool global = check_ks(tensors, ks, std::string(scope));
  const auto srcs = make_srcs(tensors);
  auto segs = make_segs(srcs, ks, global);
  const int64_t T = tensors.size();
  at::Tensor thr = at::empty({T}, at::kFloat);
  at::Tensor nonfinite = at::zeros({T}, at::kLong);
  const bool ok = two_level(srcs, segs, Window{}, nonfinite.data_ptr<int64_t>(), nullptr);
  write_thresholds(segs, ok, thr);
  return {thr, nonfinite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_mask_cpu(at::TensorList tensors_,
                                                               at::IntArrayRef ks,
                                                               c10::string_view scope,
                                                               const at::Tensor& window,
                                                               int64_t head) {
  const auto tensors = cpu_tensor_list(tensors_, "sample_mask_");
  const auto dev = tensors[0].device();
  const bool global = check_ks(tensors, ks, std::string(scope));
  int64_t nbytes = 0;
  for (const auto& t : tensors) nbytes += packed_nbytes(t.numel());
  check_window(window, head, nbytes, dev);
  TORCH_CHECK(window.size(0) <= kSampleMaxRows, "worm: the fused sample_mask_ takes at most ",
              kSampleMaxRows, " window rows, got ", window.size(0));
  const auto srcs = make_srcs(tensors);
  auto segs = make_segs(srcs, ks, global);
  const int64_t T = tensors.size(), L = window.size(0);
  at::Tensor thr = at::empty({T}, at::kFloat);
  at::Tensor nonfinite = at::zeros({T}, at::kLong);
  at::Tensor counts = at::zeros({L}, at::kLong);
  Window w{window.data_ptr<uint8_t>(), L, nbytes, head};
  const bool ok = two_level(srcs, segs, w, nonfinite.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
  write_thresholds(segs, ok, thr);
  return {thr, nonfinite, counts};
}

std::vector<int64_t> read_plan_counters() {
  std::vector<int64_t> out;
  for (auto& c : plan_counters) out.push_back(c.load(std::memory_order_relaxed));
  out.push_back(use_avx2() ? 1 : 0);
  return out;
}

}  // namespace

// Declared in cpu_keys.h. Each pass takes one digit of the bits below the resolved
// prefix and counts only keys that share the prefix.
uint32_t radix_select(const std::vector<Src>& srcs, int64_t k, bool parallel,
                      uint32_t start_prefix, int below) {
  int64_t total = 0;
  bool all_bf16 = true, all_f16 = true;
  for (const auto& s : srcs) {
    total += s.n;
    all_bf16 &= s.dt == kBF16;
    all_f16 &= s.dt == kF16;
  }
  // bf16 and fp16 keys have zero low bits: fewer digits to resolve.
  const int low = std::min(below, all_bf16 ? 16 : (all_f16 ? 13 : 0));
  // small sets: small histograms; large ones: two passes (the first with 64 Ki bins)
  const int max_digit = total < 4096 ? 8 : (total >= (int64_t(1) << 22) ? 16 : 11);
  const int nbits = below - low;
  const int npass = (nbits + max_digit - 1) / max_digit;
  if (npass == 0) return start_prefix << below;

  const int64_t chunk = 1 << 16;
  auto chunks = make_chunks(srcs, chunk);
  const int64_t nchunks = chunks.size();
  parallel = parallel && total >= kMinParallelEntries;
  const int64_t tasks = parallel ? std::min<int64_t>(at::get_num_threads(), nchunks) : 1;

  uint32_t prefix = start_prefix;  // the digits chosen so far
  int pshift = below;              // keys match when (key >> pshift) == prefix
  int hi = below;
  for (int pass = 0; pass < npass; ++pass) {
    const int digit = (hi - low + (npass - pass) - 1) / (npass - pass);  // <= max_digit
    const int shift = hi - digit;
    const int64_t nbins = int64_t(1) << digit;
    const uint32_t mask = uint32_t(nbins - 1);
    std::vector<int64_t> hist(tasks * nbins, 0);
    run_tasks(nchunks, tasks, parallel, [&](int64_t t, int64_t cb, int64_t ce) {
      int64_t* h = hist.data() + t * nbins;
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        const Src& s = srcs[ch.src];
        dispatch_dt(s.dt, [&](auto dtc) {
          constexpr int DT = decltype(dtc)::value;
          for (int64_t i = ch.begin; i < ch.end; ++i) {
            uint32_t key = key_at<DT>(s.p, i);
            if ((key >> pshift) == prefix) h[(key >> shift) & mask]++;
          }
        });
      }
    });
    for (int64_t t = 1; t < tasks; ++t)
      for (int64_t b = 0; b < nbins; ++b) hist[b] += hist[t * nbins + b];
    int64_t b = 0;
    while (b < nbins - 1 && hist[b] < k) k -= hist[b++];
    prefix = (prefix << digit) | uint32_t(b);
    pshift = shift;
    hi = shift;
  }
  return prefix << low;
}

TORCH_LIBRARY_FRAGMENT(worm_native, m) {
  // [sampled windows that held the k-th key, that missed it, level-two overflows,
  //  NaN/Inf found outside a sample, exact windows finished by the radix select,
  //  exact bf16 windows of a single key, and 1 if level two runs its AVX2 path]
  m.def("plan_counters() -> int[]", &read_plan_counters);
}

TORCH_LIBRARY_IMPL(worm_native, CPU, m) {
  m.impl("select_thresholds", &select_thresholds_cpu);
  m.impl("sample_mask_", &sample_mask_cpu);
}

}  // namespace worm
