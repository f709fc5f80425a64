// Top-k selection without a sort: the k largest scores of a row, ties at the k-th place broken
// by ascending index, returned in ascending index order. Torch-free and written ONCE for two
// kinds of thread team: a CUDA block (csrc/kernels/topk.cuh) and an OpenMP team on the CPU
// (csrc/ops/topk.cpp), so every CPU test of the op runs the very code the GPU block runs, with
// real concurrency (its barriers, atomics and scans), only with fewer and slower threads.
//
// Algorithm (radix select on the scores' order-preserving bit keys, then a stable compaction):
//  1. Each score maps to a 32-bit key whose unsigned order is the float order (NaN = -inf,
//     -0 = +0). Up to four passes each histogram one 8-bit digit (most significant first) of
//     the keys that still match the chosen prefix, and pick the digit holding the k-th largest
//     key. A pass stops the search early when its whole bin is taken. Scores rounded to bf16
//     (fp16) carry only their top 16 (19) key bits, so 2 (3) passes pin the k-th value exactly.
//  2. With the k-th key T and `need` = how many keys equal to T are taken (the lowest indices):
//     each rank counts, in its contiguous chunk of the row, the keys > T and == T; two team
//     scans give each rank its share of the ties and its output offset; each rank then writes
//     its chosen indices in order. No sort anywhere; the output is ascending by construction.
// Cost: `passes` + 2 reads of the row, a few barriers per pass; O(n) work, no O(n log n).
//
// A Team provides rank(), size(), sync() (a barrier of the whole team) and add(uint64_t*, v)
// (an atomic add visible to the team after the next sync). Control flow that reaches a sync()
// is uniform across the team: loop bounds and branches depend only on team-shared values.
#pragma once

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <cstring>
#endif

#if defined(__CUDACC__)
#define MPLUS_HD __host__ __device__
#else
#define MPLUS_HD
#endif

namespace mplus_fast::topk {

// Unsigned key with the float order: a < b (as floats, NaN as -inf) <=> key(a) < key(b).
MPLUS_HD inline uint32_t ordered_key(float x) {
  if (x != x) return 0x007FFFFFu;     // NaN ranks with -inf (below every number): -inf's key
  if (x == 0.0f) return 0x80000000u;  // -0 == +0
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Radix passes that pin a score exactly when its float holds `mantissa_bits` explicit mantissa
// bits (23 float32, 10 fp16, 7 bf16): the key's low bits below them are all equal.
MPLUS_HD inline int passes_for_mantissa(int mantissa_bits) {
  const int bits = 1 + 8 + mantissa_bits;  // sign, exponent, mantissa
  return (bits + 7) / 8;
}

// Team-shared workspace. hist/above: 256 entries; the others: team.size() entries each.
struct Work {
  uint64_t* hist;
  uint64_t* above;
  uint64_t* a;
  uint64_t* b;
  uint64_t* eq;
  uint64_t* eq_before;
  uint64_t* sel;
  uint64_t* offset;
  uint64_t* scalars;  // 3 entries: chosen digit, need, done
};
constexpr int kBins = 256;
// uint64_t entries a workspace needs for a team of `ranks`.
MPLUS_HD constexpr int64_t work_entries(int ranks) { return 2 * kBins + 6 * int64_t(ranks) + 3; }
MPLUS_HD inline Work carve_work(uint64_t* base, int ranks) {
  Work w;
  w.hist = base;
  w.above = w.hist + kBins;
  w.a = w.above + kBins;
  w.b = w.a + ranks;
  w.eq = w.b + ranks;
  w.eq_before = w.eq + ranks;
  w.sel = w.eq_before + ranks;
  w.offset = w.sel + ranks;
  w.scalars = w.offset + ranks;
  return w;
}

// out[i] = sum of in[0..i) (REV: sum of in[i+1..L)) for i < L, by the whole team; returns the
// total. `a`, `b`: team.size() entries of scratch. Every rank calls it (it synchronises); it
// ends with a barrier, so `in`, `out` and the scratch may be reused at once.
template <bool REV, class Team>
MPLUS_HD uint64_t team_exclusive_scan(const Team& t, const uint64_t* in, uint64_t* out, int L, uint64_t* a,
                                      uint64_t* b) {
  const int r = t.rank(), P = t.size();
  const int per = (L + P - 1) / P;
  const int lo = r * per < L ? r * per : L, hi = lo + per < L ? lo + per : L;
  uint64_t local = 0;
  for (int i = lo; i < hi; ++i) local += in[REV ? L - 1 - i : i];
  a[r] = local;
  t.sync();
  uint64_t* src = a;
  uint64_t* dst = b;
  for (int off = 1; off < P; off <<= 1) {  // Hillis-Steele inclusive scan of the ranks' sums
    dst[r] = src[r] + (r >= off ? src[r - off] : 0);
    t.sync();
    uint64_t* tmp = src;
    src = dst;
    dst = tmp;
  }
  uint64_t run = src[r] - local;
  const uint64_t total = src[P - 1];
  for (int i = lo; i < hi; ++i) {
    const int j = REV ? L - 1 - i : i;
    out[j] = run;
    run += in[j];
  }
  t.sync();
  return total;
}

// The k largest of scores[0..n) (0 <= k <= n), ties to the lower index, into out_index/out_value
// (k entries each) in ascending index order. `passes` in 1..4: see passes_for_mantissa.
template <class Team>
MPLUS_HD void select_topk(const Team& t, const float* scores, int64_t n, int64_t k, int passes, const Work& w,
                          int64_t* out_index, float* out_value) {
  if (k <= 0 || n <= 0) return;
  const int r = t.rank(), P = t.size();
  uint32_t prefix = 0, mask = 0;
  uint64_t need = uint64_t(k);  // how many of the keys matching `prefix` are still to be taken
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = r; i < kBins; i += P) w.hist[i] = 0;
    t.sync();
    // Histogram of this digit over the keys still in the race. Strided (coalesced on a GPU);
    // consecutive equal digits are counted locally first, as scores cluster (near 0.5 for
    // retrieval) and every rank would otherwise hit the same bin at once.
    int cur = -1;
    uint64_t cnt = 0;
    for (int64_t j = r; j < n; j += P) {
      const uint32_t key = ordered_key(scores[j]);
      if ((key & mask) != prefix) continue;
      const int d = int((key >> shift) & 0xFFu);
      if (d != cur) {
        if (cnt) t.add(&w.hist[cur], cnt);
        cur = d;
        cnt = 0;
      }
      ++cnt;
    }
    if (cnt) t.add(&w.hist[cur], cnt);
    t.sync();
    team_exclusive_scan<true>(t, w.hist, w.above, kBins, w.a, w.b);  // above[d] = keys with a larger digit
    for (int d = r; d < kBins; d += P) {  // exactly one bin holds the need-th largest key
      const uint64_t c = w.hist[d], ab = w.above[d];
      if (c > 0 && ab < need && need <= ab + c) {
        w.scalars[0] = uint64_t(d);
        w.scalars[1] = need - ab;
        w.scalars[2] = (need - ab == c) ? 1 : 0;
      }
    }
    t.sync();
    prefix |= uint32_t(w.scalars[0]) << shift;
    mask |= 0xFFu << shift;
    need = w.scalars[1];
    const bool done = w.scalars[2] != 0;
    t.sync();  // every rank has read the scalars before the next pass may overwrite them
    if (done) break;  // the whole bin is taken: no tie to break below it
  }
  // Stable compaction over contiguous chunks: keys > prefix all, == prefix the first `need`.
  const int64_t per = (n + P - 1) / P;
  const int64_t lo = r * per < n ? r * per : n, hi = lo + per < n ? lo + per : n;
  uint64_t gt = 0, eq = 0;
  for (int64_t j = lo; j < hi; ++j) {
    const uint32_t km = ordered_key(scores[j]) & mask;
    gt += km > prefix;
    eq += km == prefix;
  }
  w.eq[r] = eq;
  t.sync();
  team_exclusive_scan<false>(t, w.eq, w.eq_before, P, w.a, w.b);
  const uint64_t before = w.eq_before[r];
  const uint64_t take = need > before ? (need - before < eq ? need - before : eq) : 0;
  w.sel[r] = gt + take;
  t.sync();
  team_exclusive_scan<false>(t, w.sel, w.offset, P, w.a, w.b);
  int64_t pos = int64_t(w.offset[r]);
  uint64_t taken = 0;
  for (int64_t j = lo; j < hi; ++j) {
    const float v = scores[j];
    const uint32_t km = ordered_key(v) & mask;
    bool pick = km > prefix;
    if (km == prefix && taken < take) {
      ++taken;
      pick = true;
    }
    if (pick) {
      out_index[pos] = j;
      out_value[pos] = v;
      ++pos;
    }
  }
}

}  // namespace mplus_fast::topk
