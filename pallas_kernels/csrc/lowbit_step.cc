// Fused low-bit optimizer step for CPUs, as an XLA FFI custom call.
//
// The CPU counterpart of pallas_kernels/optim_update.py's Pallas kernel (Pallas only interprets
// on CPU). One pass per block of `block_size` elements:
//
//   m = codebook_m[codes_m] * absmax_m (and v)                     dequantize
//   (u, m', v') = rule(g, p, m, v)                                 adam | lion | sgd
//   absmax'_b = max |m'_i|, codes'_i = nearest(m'_i * (1 / absmax'_b))   requantize
//
// with the jnp reference's float32 expressions in the same order (compiled with
// -ffp-contract=off: every product and sum rounds as written), and the reference's nearest-code
// search (effjax.quant's bucket table): the float's exponent and top mantissa bits pick a
// bucket holding at most one decision threshold T of the sorted codebook, and the sorted index
// is the bucket's `lo` below T, lo + 1 from T up. One 32-bit table entry per bucket holds both
// (native_cpu._search_tables): T's low bits relative to the bucket's first float, so the
// comparison is on the integer bits of |y|, one gather per element. Bucket 0 also holds every
// |y| below its first float (down to 0), so its thresholds are compared as floats. Codebooks of
// at most 16 values (4-bit) skip the table: the sorted index is the count of the (at most 15)
// thresholds <= y, computed here from the values as effjax.quant does. Non-finite values
// (effjax.optim.quantize_state's rule): an element whose gradient, update or any new moment is
// not finite (a finite gradient whose square overflows included) gets update 0 and all its new
// moments 0.
//
// Blocks are independent, so ranges of blocks run on XLA's intra-op thread pool. Codes and
// scales may be written in place (the Python side aliases them): a block is decoded into
// scratch before its codes are overwritten. 4-bit codes are packed two per byte, element 2j in
// the high nibble. Loops are written so that GCC vectorizes them (no calls, no early exits).

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Algo : int64_t { kAdam = 0, kLion = 1, kSgd = 2 };
// kBf16Scale: scales are stored as bfloat16 (effjax.quant.round_scale): each block's absmax
// is rounded up to the next bfloat16 (capped at the largest finite one) before the search.
enum Flag : int64_t { kWeightDecay = 1, kNesterov = 2, kApply = 4, kBf16Scale = 8 };
// Slots of the float32 `scalars` input, computed in Python with the reference's expressions.
enum Slot { kC1, kB1, kC2, kB2, kBc1, kBc2, kBc1Next, kEpsRoot, kEps, kWd, kLr, kNumSlots };

// A uint64 that may alias floats: the 4-bit decode writes two floats per store.
typedef uint64_t __attribute__((may_alias)) u64_alias;

struct Book {  // a codebook: decode table and the nearest-code bucket table
  const float* dec;        // value of each code (256 entries)
  const uint64_t* pairs;   // 4-bit: per byte, the values of its high and low nibble
  const int32_t* table;    // per bucket: t << 8 | lo (see encode_block)
  const int32_t* order;    // sorted index -> code (256 entries)
  bool sorted;             // order is the identity
  bool direct;             // <= 16 values: search by counting thresholds (thr16)
  float thr16[15];         // the sorted values' decision thresholds, +inf padded
  int32_t edge_pos, edge_neg;  // bucket 0's thresholds (float bits; +inf if none)
  int32_t shift, q0, buckets, half;  // buckets per sign; negative side starts at `half`
};

struct Moment {
  const uint8_t* codes;
  const float* absmax;
  uint8_t* out_codes;
  float* out_absmax;
  Book book;
  bool bf16_scale;
};

inline int32_t bits_of(float x) {
  int32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

inline float float_of(int32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// Finite test without a library call (vectorizes): x - x is 0 for finite x, NaN otherwise.
inline bool finite(float x) { return x - x == 0.0f; }

void decode_block(const Moment& m, int64_t b, int64_t bs, int bits, float* __restrict out) {
  const float* __restrict dec = m.book.dec;
  const float a = m.absmax[b];
  if (bits == 8) {
    const uint8_t* __restrict c = m.codes + b * bs;
    for (int64_t i = 0; i < bs; i++) out[i] = dec[c[i]] * a;
  } else {  // one 8-byte load per byte: both values, in memory order (little-endian)
    const uint8_t* __restrict c = m.codes + b * (bs / 2);
    const uint64_t* __restrict pairs = m.book.pairs;
    u64_alias* __restrict out2 = reinterpret_cast<u64_alias*>(out);
    for (int64_t j = 0; j < bs / 2; j++) out2[j] = pairs[c[j]];
    for (int64_t i = 0; i < bs; i++) out[i] = out[i] * a;
  }
}

// The sorted index of the nearest value to each scaled value y = x * (1 / absmax), |y| <= 1.
// Bucket q = clamp((|y| bits >> shift) - q0, 0, buckets - 1), of sign side s; its entry is
// t << 8 | lo. From bucket 1 up, |y| bits lie in [base, base + 2**shift) with base =
// (q + q0) << shift, and so does |T|: y >= T <=> key = |y| bits - base >= t (positive side),
// <= t (negative side). A bucket without a threshold has t = 2**shift + 1 (positive; key is
// capped at 2**shift) or -2 (negative). Written without branches or bool selects so that GCC
// vectorizes it (one gather per element).
void table_search(const Book& k, int64_t bs, const float* __restrict x, float pre, float inv,
                  int32_t* __restrict idx) {
  const int32_t shift = k.shift, q0 = k.q0, nb = k.buckets, half = k.half, top = 1 << shift;
  const int32_t edge_pos = k.edge_pos, edge_neg = k.edge_neg;
  const int32_t* __restrict table = k.table;
  for (int64_t i = 0; i < bs; i++) {
    const float y = (x[i] * pre) * inv;
    const int32_t yb = bits_of(y);
    const int32_t a = yb & 0x7fffffff;
    const int32_t sign = yb >> 31;  // 0 or -1
    const int32_t q = std::min(std::max((a >> shift) - q0, 0), nb - 1);
    const int32_t key = std::min(a - ((q + q0) << shift), top);
    const int32_t e = table[q + (sign & half)];
    const int32_t d = key - (e >> 8);
    const int32_t hit = static_cast<int32_t>(static_cast<uint32_t>(~((d ^ sign) - sign)) >> 31);
    const int32_t hit0 = y >= float_of((edge_pos & ~sign) | (edge_neg & sign));
    const int32_t in0 = -static_cast<int32_t>(q == 0);
    idx[i] = (e & 255) + ((hit0 & in0) | (hit & ~in0));
  }
}

// The sorted index of the nearest value, then the code (`order`) if the codebook is unsorted.
void search_block(const Book& k, int64_t bs, const float* __restrict x, float pre, float inv,
                  int32_t* __restrict idx) {
  if (k.direct) {  // <= 16 values: the sorted index is the count of thresholds <= y
    const float* __restrict thr = k.thr16;
    for (int64_t i = 0; i < bs; i++) {
      const float y = (x[i] * pre) * inv;
      int32_t count = 0;
      for (int t = 0; t < 15; t++) count += y >= thr[t];
      idx[i] = count;
    }
  } else {
    table_search(k, bs, x, pre, inv, idx);
  }
  if (!k.sorted) {
    const int32_t* __restrict order = k.order;
    for (int64_t i = 0; i < bs; i++) idx[i] = order[idx[i] & 255];
  }
}

// effjax.quant.quantize_blockwise on one block of finite values (absmax, pre-scale, search).
void encode_block(const Moment& m, int64_t b, int64_t bs, int bits, const float* __restrict x,
                  int32_t* __restrict idx) {
  int32_t mx = 0;  // max |x| on the bit patterns: non-negative finite floats order as ints
  for (int64_t i = 0; i < bs; i++) mx = std::max(mx, bits_of(x[i]) & 0x7fffffff);
  if (m.bf16_scale) mx = std::min((mx + 0xffff) & ~0xffff, 0x7f7f0000);  // finite: no overflow
  const float absmax = float_of(mx);
  m.out_absmax[b] = absmax;
  // 1/absmax is subnormal above 2**126: such blocks are pre-scaled by 2**-4 (as the reference).
  const float pre = absmax >= 0x1p125f ? 0x1p-4f : 1.0f;
  const float inv = absmax > 0.0f ? 1.0f / (absmax * pre) : 0.0f;
  search_block(m.book, bs, x, pre, inv, idx);
  if (bits == 8) {
    uint8_t* __restrict out = m.out_codes + b * bs;
    for (int64_t i = 0; i < bs; i++) out[i] = static_cast<uint8_t>(idx[i]);
  } else {
    uint8_t* __restrict out = m.out_codes + b * (bs / 2);
    for (int64_t j = 0; j < bs / 2; j++)
      out[j] = static_cast<uint8_t>((idx[2 * j] << 4) | idx[2 * j + 1]);
  }
}

struct Step;
// One block's rule: x0/x1 hold the old moments on entry and the new moments on exit (those of
// a bad element 0).
using Rule = void (*)(const Step&, int64_t b, float* __restrict x0, float* __restrict x1);

struct Step {
  int64_t algo, flags, bs;
  int bits, n_moments;
  const float* g;
  const float* p;  // nullptr when the rule does not read it
  float* out;      // the update, or the new parameter with kApply
  const float* s;  // scalars
  Moment mom[2];
  Rule rule;
};

// The rules of pallas_kernels/optim_update.py (adam_rule, lion_rule, sgd_rule) on one element:
// the update before the common tail, and the new moments (x0, x1) in place. A rule with one
// moment leaves x1 alone (scratch holding zeros).
struct AdamRule {
  float c1, b1, c2, b2, bc1, bc2, bc1n, eps_root, eps;
  explicit AdamRule(const float* s)
      : c1(s[kC1]), b1(s[kB1]), c2(s[kC2]), b2(s[kB2]), bc1(s[kBc1]), bc2(s[kBc2]),
        bc1n(s[kBc1Next]), eps_root(s[kEpsRoot]), eps(s[kEps]) {}
  template <bool kNest>
  float step(float gi, float& x0, float& x1) const {
    const float mu = c1 * gi + b1 * x0;
    const float nu = c2 * (gi * gi) + b2 * x1;
    const float mu_hat = kNest ? b1 * (mu / bc1n) + c1 * (gi / bc1) : mu / bc1;
    x0 = mu;
    x1 = nu;
    return mu_hat / (__builtin_sqrtf(nu / bc2 + eps_root) + eps);
  }
};

struct LionRule {
  float c1, b1, c2, b2;
  explicit LionRule(const float* s) : c1(s[kC1]), b1(s[kB1]), c2(s[kC2]), b2(s[kB2]) {}
  template <bool>
  float step(float gi, float& x0, float&) const {
    const float z = c1 * gi + b1 * x0;
    const float u = z > 0.0f ? 1.0f : (z < 0.0f ? -1.0f : z);  // jnp.sign (0, -0, NaN kept)
    const float mu = c2 * gi + b2 * x0;
    x0 = mu;
    return u;
  }
};

struct SgdRule {  // t = g + decay t_old; u = t (nesterov: g + decay t); decay in slot kB1
  float decay;
  explicit SgdRule(const float* s) : decay(s[kB1]) {}
  template <bool kNest>
  float step(float gi, float& x0, float&) const {
    const float t = gi + decay * x0;
    x0 = t;
    return kNest ? gi + decay * t : t;
  }
};

// A rule on one block, with optim_update._tail (decayed weights, learning rate), the
// non-finite rule (optim_update.reset_bad), and the parameter added with kApplyP. The flags are
// template parameters: each instance is a straight loop that GCC vectorizes (a runtime flag
// guarding the read of a possibly-null `p` kept the Adam loop scalar, 14x slower).
template <class R, bool kDecay, bool kApplyP, bool kNest>
void rule_block(const Step& st, int64_t b, float* __restrict x0, float* __restrict x1) {
  const int64_t bs = st.bs, o = b * bs;
  const float* __restrict g = st.g + o;
  const float* __restrict p = kDecay || kApplyP ? st.p + o : nullptr;
  float* __restrict out = st.out + o;
  const R rule(st.s);
  const float wd = st.s[kWd], lr = st.s[kLr];
  for (int64_t i = 0; i < bs; i++) {
    const float gi = g[i];
    float u = rule.template step<kNest>(gi, x0[i], x1[i]);
    if (kDecay) u = u + wd * p[i];
    u = lr * u;
    const bool ok = finite(gi) & finite(u) & finite(x0[i]) & finite(x1[i]);
    u = ok ? u : 0.0f;
    x0[i] = ok ? x0[i] : 0.0f;
    x1[i] = ok ? x1[i] : 0.0f;
    if (kApplyP) u = p[i] + u;
    out[i] = u;
  }
}

template <class R>
Rule pick(int64_t flags) {
  static constexpr Rule table[8] = {
      rule_block<R, 0, 0, 0>, rule_block<R, 1, 0, 0>, rule_block<R, 0, 0, 1>,
      rule_block<R, 1, 0, 1>, rule_block<R, 0, 1, 0>, rule_block<R, 1, 1, 0>,
      rule_block<R, 0, 1, 1>, rule_block<R, 1, 1, 1>};
  return table[(flags & kWeightDecay ? 1 : 0) | (flags & kNesterov ? 2 : 0) |
               (flags & kApply ? 4 : 0)];
}

Rule pick_rule(int64_t algo, int64_t flags) {
  if (algo == kAdam) return pick<AdamRule>(flags);
  if (algo == kLion) return pick<LionRule>(flags);
  return pick<SgdRule>(flags);
}

void run_blocks(const Step& st, int64_t lo, int64_t hi) {
  std::vector<float> buf(2 * st.bs);
  std::vector<int32_t> idx(st.bs);
  float* x0 = buf.data();
  float* x1 = buf.data() + st.bs;
  for (int64_t b = lo; b < hi; b++) {
    for (int k = 0; k < st.n_moments; k++) decode_block(st.mom[k], b, st.bs, st.bits, k ? x1 : x0);
    st.rule(st, b, x0, x1);
    for (int k = 0; k < st.n_moments; k++)
      encode_block(st.mom[k], b, st.bs, st.bits, k ? x1 : x0, idx.data());
  }
}

// Runs f(lo, hi) over [0, n) in chunks of `grain`, on the calling thread and on up to
// num_threads - 1 pool tasks. The caller waits only for chunks to finish, never for a task to
// start (so it cannot deadlock on a busy pool); a late task finds no chunk left and returns
// without touching anything but the shared counters it co-owns.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t grain, const F& f) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t tasks = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  if (tasks <= 0) {
    f(0, n);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto sh = std::make_shared<Shared>();
  auto work = [sh, chunks, grain, n, &f] {
    for (int64_t c; (c = sh->next.fetch_add(1)) < chunks;) {
      f(c * grain, std::min(n, (c + 1) * grain));
      sh->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < tasks; t++) pool.Schedule(decltype(work)(work));
  work();
  while (sh->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// effjax.quant.search._thresholds for a codebook of <= 16 values: the float32 midpoint of
// each pair of neighbouring sorted values, rounded up where rounding fell below it, so
// y >= T_k <=> the nearest sorted index exceeds k (ties to the larger value).
void set_thresholds(Book& b, int64_t n) {
  for (int t = 0; t < 15; t++) b.thr16[t] = std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t + 1 < n; t++) {
    const double mid = (static_cast<double>(b.dec[b.order[t] & 255]) +
                        static_cast<double>(b.dec[b.order[t + 1] & 255])) / 2.0;
    float f = static_cast<float>(mid);
    if (static_cast<double>(f) < mid) f = std::nextafter(f, std::numeric_limits<float>::infinity());
    b.thr16[t] = f;
  }
  b.direct = true;
}

// Table sizes only: a table entry only ever indexes the 256-entry order table (masked), and
// decoding reads a 256-entry copy of the decode table (see LowbitStep), so no table content
// can make the kernel read or write out of bounds.
ffi::Error check_book(const Book& b, int64_t dec_n, int64_t edge_n, int64_t table_n,
                      int64_t order_n) {
  if (dec_n < 2 || dec_n > 256 || edge_n != 2 || table_n != 2 * b.half || order_n != 256 ||
      b.buckets < 1 || b.buckets > b.half || b.shift < 0 || b.shift > 23 || b.q0 < 0)
    return ffi::Error::InvalidArgument("lowbit_step: inconsistent codebook tables");
  return ffi::Error::Success();
}

ffi::Error LowbitStep(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> p,
                      ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::U8> codes0,
                      ffi::Buffer<ffi::F32> absmax0, ffi::Buffer<ffi::F32> dec0,
                      ffi::Buffer<ffi::F32> edge0, ffi::Buffer<ffi::S32> table0,
                      ffi::Buffer<ffi::S32> order0, ffi::Buffer<ffi::U8> codes1,
                      ffi::Buffer<ffi::F32> absmax1, ffi::Buffer<ffi::F32> dec1,
                      ffi::Buffer<ffi::F32> edge1, ffi::Buffer<ffi::S32> table1,
                      ffi::Buffer<ffi::S32> order1, ffi::ResultBuffer<ffi::F32> out,
                      ffi::ResultBuffer<ffi::U8> out_codes0,
                      ffi::ResultBuffer<ffi::F32> out_absmax0,
                      ffi::ResultBuffer<ffi::U8> out_codes1,
                      ffi::ResultBuffer<ffi::F32> out_absmax1, int64_t algo, int64_t flags,
                      int64_t block_size, int64_t bits, int64_t shift0, int64_t q00,
                      int64_t buckets0, int64_t half0, int64_t shift1, int64_t q01,
                      int64_t buckets1, int64_t half1) {
  const int64_t n = g.element_count();
  const int n_moments = algo == kAdam ? 2 : 1;
  if (algo < kAdam || algo > kSgd) return ffi::Error::InvalidArgument("lowbit_step: bad algo");
  if (bits != 8 && bits != 4) return ffi::Error::InvalidArgument("lowbit_step: bits not 4/8");
  if (block_size < 2 || n % block_size || (bits == 4 && block_size % 2))
    return ffi::Error::InvalidArgument("lowbit_step: elements not whole blocks");
  if (scalars.element_count() != kNumSlots)
    return ffi::Error::InvalidArgument("lowbit_step: wrong number of scalars");
  const bool needs_p = (flags & (kWeightDecay | kApply)) != 0;
  if (needs_p && static_cast<int64_t>(p.element_count()) != n)
    return ffi::Error::InvalidArgument("lowbit_step: parameter size differs from gradient");
  if (static_cast<int64_t>(out->element_count()) != n)
    return ffi::Error::InvalidArgument("lowbit_step: output size differs from gradient");

  Step st{algo, flags, block_size, static_cast<int>(bits), n_moments, g.typed_data(),
          needs_p ? p.typed_data() : nullptr, out->typed_data(), scalars.typed_data(), {},
          pick_rule(algo, flags)};
  const int64_t nblocks = n / block_size, code_bytes = bits == 8 ? n : n / 2;
  ffi::Buffer<ffi::U8>* codes[2] = {&codes0, &codes1};
  ffi::Buffer<ffi::F32>* absmax[2] = {&absmax0, &absmax1};
  ffi::Buffer<ffi::F32>* dec[2] = {&dec0, &dec1};
  ffi::Buffer<ffi::F32>* edge[2] = {&edge0, &edge1};
  ffi::Buffer<ffi::S32>* table[2] = {&table0, &table1};
  ffi::Buffer<ffi::S32>* order[2] = {&order0, &order1};
  ffi::ResultBuffer<ffi::U8>* ocodes[2] = {&out_codes0, &out_codes1};
  ffi::ResultBuffer<ffi::F32>* oabs[2] = {&out_absmax0, &out_absmax1};
  float dec_pad[2][256];
  uint64_t pairs[2][256];
  const int64_t shift[2] = {shift0, shift1}, q0[2] = {q00, q01}, nbk[2] = {buckets0, buckets1},
                half[2] = {half0, half1};
  for (int k = 0; k < n_moments; k++) {
    if (static_cast<int64_t>(codes[k]->element_count()) != code_bytes ||
        static_cast<int64_t>((*ocodes[k])->element_count()) != code_bytes ||
        static_cast<int64_t>(absmax[k]->element_count()) != nblocks ||
        static_cast<int64_t>((*oabs[k])->element_count()) != nblocks)
      return ffi::Error::InvalidArgument("lowbit_step: codes or absmax size does not match");
    // Any byte indexes this copy: a code past a short codebook (a corrupted state) decodes
    // to NaN (loud: a NaN update, the moment stored as 0) instead of reading past the table.
    std::fill(dec_pad[k], dec_pad[k] + 256, std::numeric_limits<float>::quiet_NaN());
    std::copy(dec[k]->typed_data(), dec[k]->typed_data() + std::min<int64_t>(
        256, static_cast<int64_t>(dec[k]->element_count())), dec_pad[k]);
    const int64_t order_n = order[k]->element_count();
    const int32_t* ord = order[k]->typed_data();
    bool sorted = order_n == 256;
    for (int64_t i = 0; sorted && i < 256; i++) sorted = ord[i] == i;
    const float* ed = edge[k]->typed_data();
    for (int c = 0; c < 256; c++) {  // element 2j (high nibble) first in memory
      uint32_t hi, lo;
      std::memcpy(&hi, &dec_pad[k][c >> 4], 4);
      std::memcpy(&lo, &dec_pad[k][c & 15], 4);
      pairs[k][c] = static_cast<uint64_t>(hi) | static_cast<uint64_t>(lo) << 32;
    }
    Book b{dec_pad[k], pairs[k], table[k]->typed_data(), ord, sorted, false, {},
           edge[k]->element_count() == 2 ? bits_of(ed[0]) : 0,
           edge[k]->element_count() == 2 ? bits_of(ed[1]) : 0,
           static_cast<int32_t>(shift[k]), static_cast<int32_t>(q0[k]),
           static_cast<int32_t>(nbk[k]), static_cast<int32_t>(half[k])};
    ffi::Error e = check_book(b, dec[k]->element_count(), edge[k]->element_count(),
                              table[k]->element_count(), order_n);
    if (e.failure()) return e;
    if (bits == 4 && dec[k]->element_count() > 16)
      return ffi::Error::InvalidArgument("lowbit_step: 4-bit codes need <= 16 values");
    if (dec[k]->element_count() <= 16) set_thresholds(b, dec[k]->element_count());
    st.mom[k] = Moment{codes[k]->typed_data(), absmax[k]->typed_data(),
                       (*ocodes[k])->typed_data(), (*oabs[k])->typed_data(), b,
                       (flags & kBf16Scale) != 0};
  }
  // Chunks of at most 64K elements, and at least 4 per thread when the leaf allows chunks of
  // 4K elements or more: leaves run one after another, so each must use every thread.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t min_grain = std::max<int64_t>(1, 4096 / block_size);
  const int64_t grain = std::max(min_grain, std::min(std::max<int64_t>(1, 65536 / block_size),
                                                     nblocks / (4 * threads)));
  parallel_for(pool, nblocks, grain, [&st](int64_t lo, int64_t hi) { run_blocks(st, lo, hi); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffjaxLowbitStep, LowbitStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // p (empty if unused)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scalars
                                  .Arg<ffi::Buffer<ffi::U8>>()   // moment 0: codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  //   absmax
                                  .Arg<ffi::Buffer<ffi::F32>>()  //   decode table
                                  .Arg<ffi::Buffer<ffi::F32>>()  //   bucket 0's thresholds
                                  .Arg<ffi::Buffer<ffi::S32>>()  //   bucket table t<<8|lo
                                  .Arg<ffi::Buffer<ffi::S32>>()  //   order: sorted -> code
                                  .Arg<ffi::Buffer<ffi::U8>>()   // moment 1 (empty: none)
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // update or new parameter
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("algo")
                                  .Attr<int64_t>("flags")
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("shift0")
                                  .Attr<int64_t>("q00")
                                  .Attr<int64_t>("buckets0")
                                  .Attr<int64_t>("half0")
                                  .Attr<int64_t>("shift1")
                                  .Attr<int64_t>("q01")
                                  .Attr<int64_t>("buckets1")
                                  .Attr<int64_t>("half1"));
