// Decode attention over quantized paged KV blocks, one warp per split of the context: the warp owns
// its tokens, its online softmax and its output partial, so the main loop has no block barriers and
// no shared memory. Built at run time by cuda_decode.py (nvcc, sm_89+), launched through ctypes on
// torch's current stream.
//
// Per 16-token tile a warp computes, with mma.sync m16n8k16 (fp16 operands, fp32 accumulators):
//   S^T [16 tokens, 8 heads]  = K [16 tokens, D] @ Q^T [D, 8 heads]           (A = key codes)
//   O^T [D, 8 heads]         += V^T [D, 16 tokens] @ P' [16 tokens, 8 heads]  (A = value codes)
// The query heads of one KV head (G <= 8) are the 8 columns. Both products read the codes as the A
// operand straight from global memory into registers; the order of the head dims inside a product
// is free (the queries are loaded in the same order) and so is the order of a tile's tokens (the
// probabilities take the order of the keys' rows), so each thread loads whole vectors and decodes
// them in place. The probabilities go from the accumulator layout of S^T to the B operand of the
// second product by two movmatrix transposes. Scales multiply the rows of S^T or fold into P'.
// With at most 4 query heads per KV head, int4 (groups of 64) and kivi2 run the paired loop: two
// 16-token tiles share one S^T fragment (tile A's tokens in columns 0-3, tile B's in 4-7; PairFeed,
// decode4_pair_kernel, decode2_kernel<PAIRED>), so one softmax step serves 32 tokens. Where the storage
// keeps a block's parts in one chunk (int4 in 16-token blocks, kivi2 in 32- and 64-token blocks), the paired
// loops are fed by bulk copies of whole chunks into shared memory instead (decode4_bulk_kernel,
// decode2_bulk_kernel).
// The next tile's codes and scales are loaded before the current tile is used, into the second of two
// register buffers used in turn (tile_loop; copied where the unrolled loop would spill), from block ids
// read from the block table ahead; int4 and kivi2 tiles are also prefetched into L2 a tile earlier
// (TileFeed, CS_L2_AHEAD). Inside a block the strides are constants of the storage layout (codes and
// per-token scales head-major, int4 / kivi2 value codes token-contiguous; cuda_decode.layout_error).
// Blocks of 4 warps (work items (row, KV head, split) in order), at least 3 resident per SM: 12 warps,
// at most 168 registers (kivi2 with groups of 32: 2 blocks). The staged variant (ST, fp8 / int8 /
// int4) fills a per-lane shared-memory ring by cp.async instead (TileFeed);
// kivi2's per-block channel scales come the same way, two steps ahead (KeyScales).
// `benchmarks/offline_sass.py --cuda` counts the main loops' instructions.
//
// mma.sync m16n8k16 fragments, lane = 4 g + t: A reg0 (row g, k 2t..2t+1), reg1 (row g+8, same k),
// reg2 (row g, k 2t+8..2t+9), reg3 (row g+8, k 2t+8..); B reg0 (k 2t..2t+1, col g), reg1 (k 2t+8..);
// C c0 c1 (row g, cols 2t, 2t+1), c2 c3 (row g+8, same cols).
//
// With -DCS_EMULATE a host C++ compiler builds the same kernels against warp_emulation.h (each lane a
// thread; see that file), which the CPU tests run (cuda_decode.build_emulated).
#ifdef CS_EMULATE
#include "warp_emulation.h"
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include <stdint.h>

struct DecodeParams {
  const uint16_t* q;  // [B, Hq, D] bf16 or fp16
  void* out;          // [B, Hq, D], q's dtype (one split)
  float* part;        // [B * Hq * splits, D] normalised partial outputs (several splits)
  float* ml;          // [B * Hq * splits, 2] (max in log2 units, sum)
  const uint8_t* k;   // key codes [N, BS, Hkv, D / per byte], stored head-major (strides in bytes below)
  const uint8_t* v;   // value codes, same shape (8-bit: the keys' layout; int4: tokens contiguous)
  const __half* ks;   // scales [N, BS, Hkv, groups] (strides in elements; kivi2 keys [N, Hkv, D], ks_st 0)
  const __half* vs;
  const __half* kz;   // int4 zero points (the scales' strides)
  const __half* vz;
  const int32_t* bt;  // [B, M]
  const int32_t* seq; // [B]
  const __half* rk;   // kivi2: fp16 residual keys / values [B, R, Hkv, D] (rows' newest tokens)
  const __half* rv;
  // Strides (32-bit: offsets inside one block fit; block ids times block strides are taken in 64 bits).
  // The kernels use the block (_sb) and head (_sh) strides; the token strides (_st, v_sc) are those of
  // the storage layout they are compiled for (cuda_decode.layout_error checks), passed for the record.
  int32_t k_sb, k_st, k_sh;
  int32_t v_sb, v_st, v_sh;
  int32_t ks_sb, ks_st, ks_sh;
  int32_t vs_sb, vs_st, vs_sh;
  int32_t v_sc;       // value codes: stride of a byte
  int32_t hq, hkv, g, m, bs, bs_shift;  // bs = 2^bs_shift tokens per block
  int32_t window, sinks, has_window;
  int32_t splits, chunk;  // chunk: tokens per split, a multiple of 16
  int32_t q_bf16;
  int32_t r;          // kivi2: residual window R
  int32_t items;      // warps' work items: B x Hkv x splits
  int32_t staged;     // 1: fp8 / int8 / int4 tiles staged through shared memory by cp.async (cuda_decode.STAGED)
  int32_t paired;     // 1: the paired loop (int4 with groups of 64, kivi2; g <= 4; cuda_decode.paired_for);
                      // 2: fed by bulk copies of chunks (decode4_bulk_kernel, also int4 with groups of 32;
                      // decode2_bulk_kernel; cuda_decode.bulk_for)
  float scale_log2;
};

namespace {

constexpr unsigned FULL = 0xffffffffu;

// The PTX (warp_emulation.h has the CPU twins).
#ifndef CS_EMULATE
__device__ __forceinline__ void cs_mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t cs_transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ float cs_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// (a & b) ^ c as one lop3 (written in C, the compiler splits it in two when b and c are both constants:
// a LOP3 takes one immediate).
__device__ __forceinline__ uint32_t cs_and_xor(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0x6A;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// A register with no defined value, for fragment rows whose results are not read (no copies to fill them).
__device__ __forceinline__ uint32_t cs_undefined() {
  uint32_t x;
  asm volatile("" : "=r"(x));
  return x;
}

// The 128-byte line holding ptr fetched into L2 (no registers held; each lane its own line).
__device__ __forceinline__ void cs_prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" : : "l"(ptr));
}

// cp.async of N bytes (4, 8, 16) from global to this lane's shared memory, committed in groups; wait<N>
// returns when at most N of this thread's groups are still in flight. .ca (through L1) for all sizes:
// with .cg (L2 only) the two 16-byte halves of a lane's 32-byte sector were two L2 requests (H200, fp8:
// L2 hit rate 7% -> 60%, memory pipes 92% busy, 2x slower).
template <int N> __device__ __forceinline__ void cs_cp_async(void* smem, const void* src) {
  const uint32_t dst = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" : : "r"(dst), "l"(src), "n"(N) : "memory");
}
__device__ __forceinline__ void cs_check(bool) {}  // emulated: aborts when false

// Bulk copies (decode4_bulk_kernel): one lane copies a contiguous run of global memory into shared memory
// by cp.async.bulk (the TMA engine, no tensor map, no registers or L1 held while in flight), completion
// counted in bytes on an mbarrier. cs_bulk_leader: the lane that issues them (emulated: every lane, into
// its own shared memory); the warp waits on the barrier's phase.
__device__ __forceinline__ bool cs_bulk_leader() { return (threadIdx.x & 31) == 0; }
__device__ __forceinline__ uint32_t cs_smem_addr(const void* ptr) { return uint32_t(__cvta_generic_to_shared(ptr)); }
__device__ __forceinline__ void cs_bulk_init(uint64_t* bar) {  // the leader, then a fence
  asm volatile("mbarrier.init.shared.b64 [%0], 1;" : : "r"(cs_smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void cs_bulk_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;" : : : "memory");
}
__device__ __forceinline__ void cs_bulk_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" : : "r"(cs_smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cs_bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               : : "r"(cs_smem_addr(dst)), "l"(src), "r"(bytes), "r"(cs_smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void cs_bulk_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n .reg .pred P;\n CS_BULK_WAIT:\n mbarrier.try_wait.parity.shared.b64 P, [%0], %1;\n @!P bra CS_BULK_WAIT;\n}"
      : : "r"(cs_smem_addr(bar)), "r"(parity) : "memory");
}

__device__ __forceinline__ void cs_cp_async_commit() { asm volatile("cp.async.commit_group;" : : : "memory"); }
template <int N> __device__ __forceinline__ void cs_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" : : "n"(N) : "memory");
}

// Two fp8 e4m3 codes (low 16 bits of x) to an fp16 pair, low byte to low half.
__device__ __forceinline__ uint32_t cs_e4m3x2_to_f16x2(uint32_t x) {
  uint32_t r;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(uint16_t(x)));
  return r;
}
// The same for the high 16 bits of x: the half taken by the register split inside the asm.
__device__ __forceinline__ uint32_t cs_e4m3x2_hi_to_f16x2(uint32_t x) {
  uint32_t r;
  asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.rn.f16x2.e4m3x2 %0, hi;\n}" : "=r"(r) : "r"(x));
  return r;
}
#endif

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// x * y of two fp16 pairs held as bits (copied, not cast: the emulated build's compiler may assume a
// uint32_t and a __half2 never alias).
__device__ __forceinline__ uint32_t hmul2_bits(uint32_t x, uint32_t y) {
  __half2 a, b;
  memcpy(&a, &x, 4);
  memcpy(&b, &y, 4);
  const __half2 r = __hmul2(a, b);
  uint32_t bits;
  memcpy(&bits, &r, 4);
  return bits;
}

__device__ __forceinline__ float2 unpack_half2(uint32_t x) {
  return __half22float2(*reinterpret_cast<__half2*>(&x));
}

__device__ __forceinline__ float half_bits_to_float(uint32_t x, bool bf16) {
  return bf16 ? __uint_as_float(x << 16) : __half2float(__ushort_as_half(uint16_t(x)));
}

__device__ __forceinline__ uint16_t float_to_bits(float x, bool bf16) {
  if (!bf16) return __half_as_ushort(__float2half_rn(x));
  const uint32_t a = __float_as_uint(x);
  return uint16_t((a + 0x7fffu + ((a >> 16) & 1u)) >> 16);  // round to nearest even
}

__device__ __forceinline__ float xor_max_g(float x) {  // max over the 8 lanes of one t
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) x = fmaxf(x, __shfl_xor_sync(FULL, x, off));
  return x;
}

__device__ __forceinline__ float xor_sum_g(float x) {
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) x += __shfl_xor_sync(FULL, x, off);
  return x;
}

__device__ __forceinline__ float xor_sum_t(float x) {  // sum over the 4 lanes of one g
  x += __shfl_xor_sync(FULL, x, 1);
  return x + __shfl_xor_sync(FULL, x, 2);
}

template <int NW> struct Words;  // NW 32-bit words of one load
template <> struct Words<1> {
  uint32_t w[1];
  __device__ __forceinline__ void load(const uint8_t* p) { w[0] = __ldg(reinterpret_cast<const uint32_t*>(p)); }
};
template <> struct Words<2> {
  uint32_t w[2];
  __device__ __forceinline__ void load(const uint8_t* p) {
    const uint2 x = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = x.x; w[1] = x.y;
  }
};
template <> struct Words<4> {
  uint32_t w[4];
  __device__ __forceinline__ void load(const uint8_t* p) {
    const uint4 x = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w;
  }
};
template <> struct Words<8> {
  uint32_t w[8];
  __device__ __forceinline__ void load(const uint8_t* p) {
    const uint4 x = __ldg(reinterpret_cast<const uint4*>(p));
    const uint4 y = __ldg(reinterpret_cast<const uint4*>(p) + 1);
    w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w; w[4] = y.x; w[5] = y.y; w[6] = y.z; w[7] = y.w;
  }
};

template <int N> struct Halves {  // N consecutive fp16 (N = 2, 4, 8) of one load, kept as N / 2 words
  static_assert(N == 2 || N == 4 || N == 8, "Halves: 2, 4 or 8 fp16 (one load)");
  Words<N / 2> x;
  __device__ __forceinline__ void load(const __half* p) { x.load(reinterpret_cast<const uint8_t*>(p)); }
  __device__ __forceinline__ float operator[](int i) const {  // converted from its half of the word
    const __half2 h = *reinterpret_cast<const __half2*>(&x.w[i >> 1]);
    return __half2float((i & 1) ? h.y : h.x);
  }
};

// fetch<M>(dst, src, slot): a tile's item (dst <- src). FETCH_LOAD: loaded into registers now. Staged
// variants (ST, CS_STAGES tiles in flight): FETCH_ASYNC copies it by cp.async into this lane's share of
// a shared-memory stage (dst untouched), FETCH_READ reads it from there into dst (src unused, except
// bit 1 of a 2-byte item's address). Item c of a tile (SZ bytes per lane) sits at base + 32 off_c +
// SZ lane, so a warp's accesses to one item are contiguous (no bank conflicts); each lane reads only
// what it copied, so the ring needs cp.async.wait_group and no barrier. A 2-byte item is copied as the
// aligned word that holds it and picked by its address's bit 1, which a read recomputes with block id
// 0: the scales' block strides must be even (cuda_decode.staged_for).
#ifndef CS_STAGES
#define CS_STAGES 4
#endif
static_assert(CS_STAGES >= 2, "CS_STAGES: tiles in flight through shared memory, at least 2");
enum FetchMode { FETCH_LOAD, FETCH_ASYNC, FETCH_READ };

struct Slot {  // this lane's share of one stage
  uint8_t* base = nullptr;  // the warp's stage
  int lane = 0;
  int off = 0;              // bytes per lane taken so far
  Slot() = default;
  __device__ __forceinline__ Slot(uint8_t* base_, int lane_) : base(base_), lane(lane_) {}
  template <int SZ> __device__ __forceinline__ uint8_t* take() {
    uint8_t* r = base + 32 * off + SZ * lane;
    off += SZ;
    return r;
  }
};

template <int SZ> __device__ __forceinline__ void read_words(const uint8_t* sm, uint32_t* w) {
  if constexpr (SZ == 16) {
    const uint4 x = *reinterpret_cast<const uint4*>(sm);
    w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w;
  } else if constexpr (SZ == 8) {
    const uint2 x = *reinterpret_cast<const uint2*>(sm);
    w[0] = x.x; w[1] = x.y;
  } else {
    w[0] = *reinterpret_cast<const uint32_t*>(sm);
  }
}

// CS_COMPUTE_ONLY (a diagnostic build, ab_quant_decode.py's `nomem`, with CS_L2_AHEAD 0): the direct
// loads of codes and scales return words made from their addresses instead (fp16 halves 2^-8 .. 1.25 x 2^-8:
// sane scales, varied codes), so a launch times the kernel's arithmetic without its memory traffic.
#ifdef CS_COMPUTE_ONLY
__device__ __forceinline__ uint32_t cs_fake_word(const void* src, int i) {
  return 0x1C001C00u | ((uint32_t(reinterpret_cast<uintptr_t>(src)) + 4 * i) & 0x00FF00FFu);
}
#endif

// CS_LOADS_ONLY (a diagnostic build, ab_quant_decode.py's `loads`; int4's paired loop): the loop keeps its
// loads of codes and scales, in the same order from the same addresses, but each loaded word is only xor'ed
// into one register right before its reload (no products, no softmax; output meaningless). It needs 72
// registers, so 28 warps per SM hold more loads in flight than the kernel's 12: its time is a floor for the
// kernel's load pattern. (Held to 12 warps by unused shared memory it ran slower than the kernel, 356
// against 327 us at batch 32 / 32k: the shared memory takes L1, which holds the loads in flight.)
#ifdef CS_LOADS_ONLY
constexpr bool LOADS_ONLY = true;
#else
constexpr bool LOADS_ONLY = false;
#endif
template <int NW> __device__ __forceinline__ uint32_t words_xor(const Words<NW>& x) {
  uint32_t r = 0;
#pragma unroll
  for (int i = 0; i < NW; ++i) r ^= x.w[i];
  return r;
}
template <int NW, int N> __device__ __forceinline__ uint32_t words_xor(const Words<NW> (&x)[N]) {
  uint32_t r = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) r ^= words_xor(x[i]);
  return r;
}
template <int N, int M> __device__ __forceinline__ uint32_t words_xor(const uint32_t (&x)[N][M]) {
  uint32_t r = 0;
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j) r ^= x[i][j];
  return r;
}

template <int M, int NW> __device__ __forceinline__ void fetch(Words<NW>& dst, const uint8_t* src, Slot& s) {
  if constexpr (M == FETCH_LOAD) {
#ifdef CS_COMPUTE_ONLY
#pragma unroll
    for (int i = 0; i < NW; ++i) dst.w[i] = cs_fake_word(src, i);
#else
    dst.load(src);
#endif
  } else {
    constexpr int SZ = NW * 4 >= 16 ? 16 : NW * 4;
#pragma unroll
    for (int c = 0; c < NW * 4 / SZ; ++c) {
      uint8_t* sm = s.take<SZ>();
      if constexpr (M == FETCH_ASYNC) cs_cp_async<SZ>(sm, src + c * SZ);
      else read_words<SZ>(sm, dst.w + c * (SZ / 4));
    }
  }
}

template <int M> __device__ __forceinline__ void fetch(uint32_t& dst, const uint8_t* src, Slot& s) {
  if constexpr (M == FETCH_LOAD) {
#ifdef CS_COMPUTE_ONLY
    dst = cs_fake_word(src, 0);
#else
    dst = __ldg(reinterpret_cast<const uint32_t*>(src));
#endif
  } else {
    uint8_t* sm = s.take<4>();
    if constexpr (M == FETCH_ASYNC) cs_cp_async<4>(sm, src);
    else dst = *reinterpret_cast<const uint32_t*>(sm);
  }
}

template <int M> __device__ __forceinline__ void fetch(__half& dst, const __half* src, Slot& s) {
  if constexpr (M == FETCH_LOAD) {
#ifdef CS_COMPUTE_ONLY
    dst = __ushort_as_half(uint16_t(cs_fake_word(src, 0)));
#else
    dst = src[0];
#endif
  } else {
    uint8_t* sm = s.take<4>();
    const uintptr_t a = reinterpret_cast<uintptr_t>(src);
    if constexpr (M == FETCH_ASYNC) {
      cs_cp_async<4>(sm, reinterpret_cast<const void*>(a & ~uintptr_t(3)));
    } else {
      const uint32_t x = *reinterpret_cast<const uint32_t*>(sm);
      dst = __ushort_as_half(uint16_t((a & 2) ? x >> 16 : x));
    }
  }
}

template <int M, int N> __device__ __forceinline__ void fetch(Halves<N>& dst, const __half* src, Slot& s) {
  fetch<M>(dst.x, reinterpret_cast<const uint8_t*>(src), s);
}

template <int M> struct Mode { static constexpr int value = M; };

// The steps of STEP tokens of one split: [lo, a_hi) then [b_lo, hi). With a sliding window the first
// range holds the sink tokens and the second starts at the window's first step (steps between are
// fully masked).
template <int STEP> struct SplitTiles {
  int lo, b_lo, n_a, n;
  __device__ __forceinline__ SplitTiles(const DecodeParams& p, int split, int seq_len) {
    lo = split * p.chunk;
    const int hi = min(seq_len, lo + p.chunk);
    int a_hi = hi;
    b_lo = hi;
    if (p.has_window) {
      const int win_lo = max(0, seq_len - p.window) & ~(STEP - 1);
      a_hi = min(hi, max(lo, (p.sinks + STEP - 1) & ~(STEP - 1)));
      b_lo = max(a_hi, max(lo, win_lo));
    }
    n_a = max(0, (a_hi - lo + STEP - 1) / STEP);
    n = n_a + max(0, (hi - b_lo + STEP - 1) / STEP);
  }
  __device__ __forceinline__ int start(int i) const { return i < n_a ? lo + STEP * i : b_lo + STEP * (i - n_a); }
  // How many steps start below f (a prefix of the steps).
  __device__ __forceinline__ int below(int f) const {
    const int in_a = min(n_a, max(0, (f - lo + STEP - 1) / STEP));
    return in_a < n_a ? in_a : n_a + min(n - n_a, max(0, (f - b_lo + STEP - 1) / STEP));
  }
};

// A warp's work: lane coordinates (g, t), row b, KV head h, split, and that split's steps. Warps take
// the work items (b, h, split) in order, 4 to a block whatever the split count (no idle warps: a block
// is resident as a whole, so blocks padded with idle warps would waste slots); warps past the last item
// have valid false.
__device__ __forceinline__ int warp_item() { return int(blockIdx.x) * int(blockDim.x >> 5) + int(threadIdx.x >> 5); }

// CS_TIMELINE (a diagnostic build, benchmarks/warp_timeline.py): each valid warp's lane 0 records its
// work item's start and end (%globaltimer, ns) and SM in cs_timeline, read back by cs_timeline_read.
#if defined(CS_TIMELINE) && !defined(CS_EMULATE)
constexpr int TIMELINE_ITEMS = 1 << 16;
__device__ unsigned long long cs_timeline[TIMELINE_ITEMS][3];
__device__ __forceinline__ unsigned long long cs_globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
struct Timeline {
  int item;
  bool on;
  unsigned long long t0;
  __device__ __forceinline__ Timeline(int item_, bool valid)
      : item(item_), on(valid && (threadIdx.x & 31) == 0 && item_ < TIMELINE_ITEMS), t0(cs_globaltimer()) {}
  __device__ __forceinline__ ~Timeline() {
    if (!on) return;
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    cs_timeline[item][0] = t0;
    cs_timeline[item][1] = cs_globaltimer();
    cs_timeline[item][2] = sm;
  }
};
#define CS_TIMELINE_MEMBER Timeline clock{item, valid};
#else
#define CS_TIMELINE_MEMBER
#endif

template <int STEP = 16> struct WarpWork {
  int g, t, item, split, bh, b, h;
  bool valid;
  int seq_len;
  const int32_t* bt_row;
  SplitTiles<STEP> tiles;
  CS_TIMELINE_MEMBER
  __device__ __forceinline__ explicit WarpWork(const DecodeParams& p)
      : g((threadIdx.x & 31) >> 2), t(threadIdx.x & 3), item(min(warp_item(), p.items - 1)), split(item % p.splits),
        bh(item / p.splits), b(bh / p.hkv), h(bh - b * p.hkv), valid(warp_item() < p.items), seq_len(p.seq[b]),
        bt_row(p.bt + int64_t(b) * p.m), tiles(p, split, seq_len) {}
};

// The blocks of a warp's first n tiles (one chunk each) for the loops fed by bulk copies, 32 tiles at a
// time: lane l holds tile 32 c + l's block-table entry for the current window c and the next one (loaded a
// window ahead), and the copies take theirs by a shuffle: no global load, and no wait on one, in front of
// each copy. Every lane calls get with the same tiles i .. i + C - 1 (i a multiple of C, C dividing 32),
// i non-decreasing by at most 32 between calls. H200, batch 32 / 32k (docs/benchmarks.md, eighteenth
// session): int4 310 -> 304 us, kivi2 252 -> 247 (each copy had waited on its own block-table load).
template <int STEP> struct TileBlocks {
  int cur, nxt, win = 0;
  __device__ __forceinline__ TileBlocks(const DecodeParams& p, const WarpWork<STEP>& w, int n)
      : cur(load(p, w, n, 0)), nxt(load(p, w, n, 1)) {}
  static __device__ __forceinline__ int load(const DecodeParams& p, const WarpWork<STEP>& w, int n, int c) {
    const int i = 32 * c + int(threadIdx.x & 31);
    return i < n ? w.bt_row[w.tiles.start(i) >> p.bs_shift] : 0;  // tiles past n: block 0, never read
  }
  template <int C>
  __device__ __forceinline__ void get(const DecodeParams& p, const WarpWork<STEP>& w, int n, int i, int (&blk)[C]) {
    static_assert(32 % C == 0, "a call's tiles share a window");
    cs_check((i >> 5) == win || (i >> 5) == win + 1);
    if ((i >> 5) != win) {  // warp-uniform: the next window (its entries arrived long ago)
      cur = nxt;
      nxt = load(p, w, n, ++win + 1);
    }
#pragma unroll
    for (int x = 0; x < C; ++x) blk[x] = __shfl_sync(FULL, cur, (i + x) & 31);
  }
};

// The shared memory of a staged kernel: CS_STAGES stages of LANE_BYTES x 32 per warp.
#ifdef CS_EMULATE
#define CS_DYNAMIC_SMEM(name) alignas(16) static thread_local uint8_t name[1 << 18]
#else
#define CS_DYNAMIC_SMEM(name) extern __shared__ __align__(16) uint8_t name[]
#endif

// L2 look-ahead (direct loads of the packed formats): CS_L2_AHEAD tiles before a tile's loads are
// issued, its 128-byte lines are prefetched into L2 (prefetch.global.L2, a line per lane, one or two
// instructions per tile, no registers held), so that the loads, one tile ahead of their use, find them
// there. H200, batch 32 / 32k (tenth session): int4 402 -> 382 us, int4-g32 502 -> 421; fp8 and int8,
// whose loads already keep DRAM 82% busy, got slower (534 -> 585 us), so their tiles take none
// (Tile8::L2_AHEAD), and neither does int4's paired loop (PairFeed). 0: off.
#ifndef CS_L2_AHEAD
#define CS_L2_AHEAD 1
#endif
static_assert(CS_L2_AHEAD >= 0 && CS_L2_AHEAD <= 3, "CS_L2_AHEAD: 0 to 3 tiles");

// One line of a tile's bytes, this lane's (Tile::l2_line; none: base null): its address at block 0 and
// token 0, bytes between blocks and between tokens; per_block: a line of the block's token-contiguous
// value codes, prefetched with the block's first tile only.
struct L2Line {
  const uint8_t* base = nullptr;
  int sb = 0, tst = 0;
  bool per_block = false;
  __device__ __forceinline__ L2Line() = default;
  __device__ __forceinline__ L2Line(const void* b, int64_t off, int sb_, int tst_, bool pb = false)
      : base(static_cast<const uint8_t*>(b) + off), sb(sb_), tst(tst_), per_block(pb) {}
  __device__ __forceinline__ void issue(int blk, int tb) const {
    if (base != nullptr && !(per_block && tb != 0)) cs_prefetch_l2(base + (int64_t(blk) * sb + tb * tst));
  }
};

// A split's tiles into registers: tile i + 1 is in registers while tile i is computed, loaded there
// directly (ST false) or read from a shared-memory ring of CS_STAGES stages that cp.async fills
// CS_STAGES - 1 tiles ahead (ST). load(tile, Mode<M>, block id, first token, slot) loads one tile;
// the block id of a tile is read from the block table one step before it is first used (its L2
// prefetch, else its loads or cp.async requests).
// STEP: tokens per tile (kivi2: 32-token steps, direct only); L2N: lines per tile / 32.
template <bool ST, int LANE_BYTES, int L2N = 1, int L2_AHEAD = CS_L2_AHEAD, int STEP = 16>
struct TileFeed {
  static constexpr int S = CS_STAGES;
  static constexpr int A = ST ? 0 : L2_AHEAD;  // L2 look-ahead of the direct loads (tiles)
  static constexpr int R = ST ? S : 1;         // tile i + R is requested while tile i is computed
  const SplitTiles<STEP>& tiles;
  int n;  // tiles fed: the split's first n (default all)
  const int32_t* bt_row;
  int bs_shift, bs_mask;
  int lane;
  uint8_t* ring;  // this warp's stages (ST)
  L2Line l2[2];   // this lane's lines of a tile (A > 0): lines lane and 32 + lane
  int nb[A + 2] = {};  // block ids of tiles i + R .. i + R + A + 1

  template <class Lines>
  __device__ __forceinline__ TileFeed(const DecodeParams& p, const WarpWork<STEP>& w, Lines&& lines, int count = -1)
      : tiles(w.tiles), n(count < 0 ? w.tiles.n : count), bt_row(w.bt_row), bs_shift(p.bs_shift), bs_mask(p.bs - 1),
        lane(threadIdx.x & 31) {
    if constexpr (A > 0) {
      l2[0] = lines(lane);
      l2[1] = lines(32 + lane);
    }
    CS_DYNAMIC_SMEM(smem);
    ring = smem + (threadIdx.x >> 5) * (S * 32 * LANE_BYTES);
  }

  __device__ __forceinline__ Slot slot(int i) const { return Slot(ring + (i % S) * (32 * LANE_BYTES), lane); }
  __device__ __forceinline__ int block(int i) const { return bt_row[tiles.start(i) >> bs_shift]; }
  __device__ __forceinline__ void prefetch(int blk, int i) const {
    const int tb = tiles.start(i) & bs_mask;
    l2[0].issue(blk, tb);
    if constexpr (L2N > 1) l2[1].issue(blk, tb);
  }

  template <class Tile, class Load> __device__ __forceinline__ void begin(Tile& a, Load&& load) {
#pragma unroll
    for (int j = 0; j <= A; ++j) nb[j] = R + j < n ? block(R + j) : 0;
    if constexpr (ST) {
#pragma unroll
      for (int j = 0; j < S; ++j) {
        if (j < n) load(a, Mode<FETCH_ASYNC>(), block(j), tiles.start(j), slot(j));
        cs_cp_async_commit();
      }
      cs_cp_async_wait<S - 1>();
      if (n > 0) load(a, Mode<FETCH_READ>(), 0, tiles.start(0), slot(0));
    } else {
      if (n > 0) load(a, Mode<FETCH_LOAD>(), block(0), tiles.start(0), Slot());
#pragma unroll
      for (int j = 1; j <= A; ++j) {
        if (j < n) prefetch(nb[j - 1], j);
      }
    }
  }
  // Before tile i is computed: tile i + 1 into nxt (direct: tile i + 1 + A prefetched into L2).
  template <class Tile, class Load> __device__ __forceinline__ void before(int i, Tile& nxt, Load&& load) {
    nb[A + 1] = i + R + A + 1 < n ? block(i + R + A + 1) : 0;
    if constexpr (ST) {
      cs_cp_async_wait<S - 2>();
      if (i + 1 < n) load(nxt, Mode<FETCH_READ>(), 0, tiles.start(i + 1), slot(i + 1));
    } else {
      if (A > 0 && i + A + 1 < n) prefetch(nb[A], i + A + 1);
      if (i + 1 < n) load(nxt, Mode<FETCH_LOAD>(), nb[0], tiles.start(i + 1), Slot());
    }
  }
  // After tile i is computed (its stage is free): tile i + S requested into that stage.
  template <class Tile, class Load> __device__ __forceinline__ void after(int i, Tile& nxt, Load&& load) {
    if constexpr (ST) {
      if (i + S < n) load(nxt, Mode<FETCH_ASYNC>(), nb[0], tiles.start(i + S), slot(i));
      cs_cp_async_commit();
    }
#pragma unroll
    for (int j = 0; j <= A; ++j) nb[j] = nb[j + 1];
  }
};

// Paired loops (G <= 4 query heads per KV head: the query heads fill 4 of the 8 columns of S^T, so
// two 16-token tiles share one fragment, tile A's tokens in columns 0-3 and tile B's in 4-7, and the
// scores, softmax and P' of 32 tokens cost what one tile's did). Step k computes tiles 2k (A) and
// 2k + 1 (B); each register of their codes and scales is reloaded with step k + 1's right after its
// last use in step k (no second buffer, and each load gets about a whole step of lead). PairFeed gives
// those loads their block ids (id(0), id(1): tiles 2k + 2, 2k + 3), read from the block table three
// steps ahead; tiles past the split get block 0 (loaded, never used: their rows are masked), so the
// loads need no branches. No L2 look-ahead: with a step of lead it only added L2 traffic (H200, int4 at
// batch 32 / 32k: 336 us without, 349 with).
struct PairFeed {
  const SplitTiles<16>& tiles;
  int n;  // tiles of the split
  const int32_t* bt_row;
  int bs_shift, bs_mask;
  int nb[3][2];  // block ids of the tiles of steps k + 1, k + 2, k + 3

  __device__ __forceinline__ PairFeed(const DecodeParams& p, const WarpWork<16>& w)
      : tiles(w.tiles), n(w.tiles.n), bt_row(w.bt_row), bs_shift(p.bs_shift), bs_mask(p.bs - 1) {
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      nb[j][0] = block(2 * j + 2);
      nb[j][1] = block(2 * j + 3);
    }
  }
  __device__ __forceinline__ int steps() const { return (n + 1) >> 1; }
  __device__ __forceinline__ int block(int i) const { return i < n ? bt_row[tiles.start(i) >> bs_shift] : 0; }
  // A tile's first token inside its block (tiles past the split: 0, with block 0).
  __device__ __forceinline__ int in_block(int i) const { return i < n ? tiles.start(i) & bs_mask : 0; }
  __device__ __forceinline__ int id(int x) const { return nb[0][x]; }  // tile 2k + 2 + x (step k + 1)
  __device__ __forceinline__ int own_id(int up) const { return up ? nb[0][1] : nb[0][0]; }  // a lane's tile
  // At the end of step k: ids move down, step k + 4's are read.
  __device__ __forceinline__ void next(int k) {
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      nb[0][x] = nb[1][x];
      nb[1][x] = nb[2][x];
      nb[2][x] = block(2 * k + 8 + x);
    }
  }
};

// Head g's query row, elements times scale * log2(e) (lanes past the G heads read row 0 times 0).
struct QueryRow {
  const uint16_t* row;
  float sc;
  bool bf16;
  __device__ __forceinline__ QueryRow(const DecodeParams& p, int b, int h, int g, int d)
      : row(p.q + (int64_t(b) * p.hq + h * p.g + (g < p.g ? g : 0)) * d), sc(g < p.g ? p.scale_log2 : 0.f),
        bf16(p.q_bf16) {}
  __device__ __forceinline__ float scaled(uint32_t bits) const { return half_bits_to_float(bits, bf16) * sc; }
  __device__ __forceinline__ float operator()(int dim) const { return scaled(row[dim]); }
};

__device__ __forceinline__ bool visible(const DecodeParams& p, int tok, int seq_len) {
  return tok < seq_len && (!p.has_window || tok > seq_len - 1 - p.window || tok < p.sinks);
}
// The same without branches (the loops fed by bulk copies): compares against the parameters in place.
__device__ __forceinline__ bool visible_flat(const DecodeParams& p, int tok, int seq_len) {
  return (tok < seq_len) & ((p.has_window == 0) | (tok > seq_len - 1 - p.window) | (tok < p.sinks));
}

// The output accumulators O^T, zeroed before a split's first tile.
template <int MT> __device__ __forceinline__ void zero_outputs(float (&o)[MT][4]) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) o[mi][0] = o[mi][1] = o[mi][2] = o[mi][3] = 0.f;
}

// Online softmax over NT tiles for heads 2t, 2t+1 (columns), rows = this lane's tokens r0, r1 of each
// tile: s[u][0..1] row r0, s[u][2..3] row r1. Returns p in s, alpha per head.
struct Softmax {
  float m[2], l[2];
  __device__ __forceinline__ Softmax() {
    m[0] = m[1] = -__int_as_float(0x7f800000);
    l[0] = l[1] = 0.f;
  }
  template <int NT>
  __device__ __forceinline__ void step(float (&s)[NT][4], float (&alpha)[2]) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float x = fmaxf(s[0][j], s[0][2 + j]);
#pragma unroll
      for (int u = 1; u < NT; ++u) x = fmaxf(x, fmaxf(s[u][j], s[u][2 + j]));
      const float mx = fmaxf(m[j], xor_max_g(x));
      const float z = reference(mx);
      alpha[j] = cs_exp2(m[j] - z);
      l[j] = l[j] * alpha[j] + exp2_sum(s, j, z);
      m[j] = mx;
    }
  }
  // The max as the exponent's reference: 0 while every score so far is masked (-inf), so p = 0.
  static __device__ __forceinline__ float reference(float mx) { return mx == -__int_as_float(0x7f800000) ? 0.f : mx; }
  // p = 2^(s - z) in place for head column j of NT tiles; returns their sum.
  template <int NT>
  static __device__ __forceinline__ float exp2_sum(float (&s)[NT][4], int j, float z) {
    float sum = -0.f;  // -0: x + -0 is x, so the first add folds away (0 + x does not: x may be -0)
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      s[u][j] = cs_exp2(s[u][j] - z);
      s[u][2 + j] = cs_exp2(s[u][2 + j] - z);
      sum += s[u][j] + s[u][2 + j];
    }
    return sum;
  }
  // NT tiles: masks rows r0 / r1 of tile u (ok[u][0] / ok[u][1]), steps, and rescales the output
  // accumulators o. Returns whether a max moved in the warp (alpha != 1 somewhere), i.e. whether other
  // running sums need alpha. Lazy rescaling: while every score of the tiles is at most SLACK above its
  // head's running max m (log2 units), p = 2^(s - m) <= 2^SLACK against the old m (softmax does not
  // depend on the reference, and the partial's (m, l) carry it), with no max reduction over the lanes
  // and no rescale; otherwise the full step. SLACK keeps P' = p s_v inside fp16.
  static constexpr float SLACK = 4.f;
  template <int MT, int NT>
  __device__ __forceinline__ bool tiles(float (&s)[NT][4], const bool (&ok)[NT][2], float (&o)[MT][4],
                                        float (&alpha)[2]) {
    const float neg_inf = -__int_as_float(0x7f800000);
    bool over = false;
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      s[u][0] = ok[u][0] ? s[u][0] : neg_inf;
      s[u][1] = ok[u][0] ? s[u][1] : neg_inf;
      s[u][2] = ok[u][1] ? s[u][2] : neg_inf;
      s[u][3] = ok[u][1] ? s[u][3] : neg_inf;
#pragma unroll
      for (int e = 0; e < 4; ++e) over = over || s[u][e] > m[e & 1] + SLACK;
    }
    if (!__any_sync(FULL, over)) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        l[j] += exp2_sum(s, j, reference(m[j]));
        alpha[j] = 1.f;
      }
      return false;
    }
    step(s, alpha);
    const bool moved = __any_sync(FULL, alpha[0] != 1.f || alpha[1] != 1.f);
    if (moved) {
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        o[mi][0] *= alpha[0]; o[mi][1] *= alpha[1]; o[mi][2] *= alpha[0]; o[mi][3] *= alpha[1];
      }
    }
    return moved;
  }
  // One tile.
  template <int MT>
  __device__ __forceinline__ bool tile(float (&s)[4], bool ok0, bool ok1, float (&o)[MT][4], float (&alpha)[2]) {
    const bool ok[1][2] = {{ok0, ok1}};
    return tiles(*reinterpret_cast<float(*)[1][4]>(&s), ok, o, alpha);
  }
};

// The tile loop: step(cur, nxt, i) computes tile i from `cur` and loads tile i + 1 into `nxt`. PINGPONG:
// unrolled by two with the buffers swapped (no copies; copying a tile's registers cost about 45 moves
// per tile); else nxt is copied into cur after each step (fewer live registers where the unrolled
// loop would spill).
template <bool PINGPONG, class T, class Step>
__device__ __forceinline__ void tile_loop(int n, T& a, T& b, Step&& step) {
  if constexpr (PINGPONG) {
    for (int i = 0; i < n; i += 2) {
      step(a, b, i);
      if (i + 1 < n) step(b, a, i + 1);
    }
  } else {
    for (int i = 0; i < n; ++i) {
      step(a, b, i);
      a = b;
    }
  }
}

// Writes head 2t + j's values val[e] at dims dim(e) (normalised), or its partial and (m, l).
template <int NV, class Dim>
__device__ __forceinline__ void store_head(const DecodeParams& p, int b, int h, int split, int head, const float* val,
                                           float mx, float l, int g, Dim dim) {
  const int64_t row = int64_t(b) * p.hq + h * p.g + head;
  if (p.splits == 1) {
    uint16_t* dst = static_cast<uint16_t*>(p.out) + row * (NV * 8);
#pragma unroll
    for (int e = 0; e < NV; ++e) dst[dim(e)] = float_to_bits(val[e], p.q_bf16);
  } else {
    const int64_t prow = row * p.splits + split;
    float* dst = p.part + prow * (NV * 8);
#pragma unroll
    for (int e = 0; e < NV; ++e) dst[dim(e)] = val[e];
    if (g == 0) {
      p.ml[prow * 2] = mx;
      p.ml[prow * 2 + 1] = l;
    }
  }
}

// Value groups of the packed formats (int4, kivi2), head columns 2t + j: per group gi the sum of
// p z_v,gi over this lane's rows (the zero points' share of the output).
template <int NG> struct GroupSums {
  float zacc[NG][2];
  __device__ __forceinline__ GroupSums() {
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) zacc[gi][0] = zacc[gi][1] = 0.f;
  }
  __device__ __forceinline__ void rescale(const float (&alpha)[2]) {
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
#pragma unroll
      for (int j = 0; j < 2; ++j) zacc[gi][j] *= alpha[j];
    }
  }
  // Group gi's B operand (pb0, pb1) of the value product, P' = p s_v of rows r0 / r1 (s[0..1] / s[2..3];
  // scales and zero points of masked rows 0), added to the sums.
  __device__ __forceinline__ void operand(int gi, const float (&s)[4], float v0s, float v1s, float v0z, float v1z,
                                          uint32_t& pb0, uint32_t& pb1) {
    const uint32_t top = pack_half2(s[0] * v0s, s[1] * v0s), bot = pack_half2(s[2] * v1s, s[3] * v1s);
    add_zeros(gi, s, v0z, v1z);
    pb0 = cs_transpose8x8(top);
    pb1 = cs_transpose8x8(bot);
  }
  // The same with P' formed in fp16 (kivi2's bulk loop): p01 / p23 = s[0..1] / s[2..3] as fp16 pairs, s0w /
  // s1w the value scales of rows r0 / r1 broadcast to both halves (0 for masked rows).
  __device__ __forceinline__ void operand_h(int gi, const float (&s)[4], uint32_t p01, uint32_t p23, uint32_t s0w,
                                            uint32_t s1w, float v0z, float v1z, uint32_t& pb0, uint32_t& pb1) {
    add_zeros(gi, s, v0z, v1z);
    pb0 = cs_transpose8x8(hmul2_bits(p01, s0w));
    pb1 = cs_transpose8x8(hmul2_bits(p23, s1w));
  }
  // Group gi's zero points (rows r0 / r1) times p, added to the sums.
  __device__ __forceinline__ void add_zeros(int gi, const float (&s)[4], float v0z, float v1z) {
    zacc[gi][0] = fmaf(s[2], v1z, fmaf(s[0], v0z, zacc[gi][0]));  // two FFMA (a product and two adds: 3)
    zacc[gi][1] = fmaf(s[3], v1z, fmaf(s[1], v0z, zacc[gi][1]));
  }
};

// Outputs of the packed formats (int4, kivi2), head 2t + j: rows of O^T divided by the factor their
// codes were read with (SUBNORMAL x the code's bit position), plus the zero-point term, over l. group(mi): m-tile mi's value group; factor(mi, r): the factor of its rows g (r = 0) and g + 8
// (r = 1); dim(e): the head dim of this lane's value e (store_head).
template <int D, int MT, int NG, class Group, class Factor, class Dim>
__device__ __forceinline__ void store_packed(const DecodeParams& p, int b, int h, int split, int g, int t,
                                             const Softmax& sm, const float (&o)[MT][4], const GroupSums<NG>& sums,
                                             Group group, Factor factor, Dim dim) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const float l = xor_sum_g(sm.l[j]);
    float zs[NG];
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) zs[gi] = xor_sum_g(sums.zacc[gi][j]);
    const int head = 2 * t + j;
    if (head >= p.g) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float val[2 * MT];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      const int gi = group(mi);
      val[2 * mi] = (o[mi][j] * (1.f / factor(mi, 0)) + zs[gi]) * inv;
      val[2 * mi + 1] = (o[mi][2 + j] * (1.f / factor(mi, 1)) + zs[gi]) * inv;
    }
    store_head<D / 8>(p, b, h, split, head, val, sm.m[j], l, g, dim);
  }
}

// Paired loops (PairFeed): columns c and c + 4 (lanes t and t ^ 2) hold one query head's partials over
// the A and B tiles; both lanes end with the merged partial: running max, sums l, o (column 2t + j at
// o[mi][j] and o[mi][2 + j]) and the value zero points' sums. A partial with no visible token (max -inf,
// sums 0) gets the factor 0.
template <int MT, int NG>
__device__ __forceinline__ void merge_pair_columns(Softmax& sm, float (&o)[MT][4], GroupSums<NG>& sums) {
  const float neg_inf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const float mo = __shfl_xor_sync(FULL, sm.m[j], 2), lo = __shfl_xor_sync(FULL, sm.l[j], 2);
    const float z = Softmax::reference(fmaxf(sm.m[j], mo));
    const float fa = sm.m[j] == neg_inf ? 0.f : cs_exp2(sm.m[j] - z);
    const float fb = mo == neg_inf ? 0.f : cs_exp2(mo - z);
    sm.m[j] = fmaxf(sm.m[j], mo);
    sm.l[j] = sm.l[j] * fa + lo * fb;
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      const float x = __shfl_xor_sync(FULL, sums.zacc[gi][j], 2);
      sums.zacc[gi][j] = sums.zacc[gi][j] * fa + x * fb;
    }
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float x = __shfl_xor_sync(FULL, o[mi][2 * r + j], 2);
        o[mi][2 * r + j] = o[mi][2 * r + j] * fa + x * fb;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// fp8 / int8. Thread (g, t) owns key bytes [t D/4, (t+1) D/4) of tokens g and g+8 (k 2t+{0,1} and
// 2t+8+{0,1} of k-step kk <-> dims t D/4 + 4 kk + {0,1} and {2,3}), and value bytes [g D/8, (g+1) D/8)
// of tokens 2t, 2t+1, 2t+8, 2t+9 (row g / g+8 of m-tile mi <-> dim g D/8 + 2 mi + {0, 1}).
// Key scales multiply the rows of S^T, value scales fold into P' = p s_v.

template <int KIND> struct Codes8;

template <> struct Codes8<1> {  // fp8 e4m3: exact in fp16, one cvt per pair of codes
  static constexpr float OFFSET = 0.f;
  static __device__ __forceinline__ uint32_t lo(uint32_t w) { return cs_e4m3x2_to_f16x2(w & 0xffffu); }
  static __device__ __forceinline__ uint32_t hi(uint32_t w) { return cs_e4m3x2_hi_to_f16x2(w); }  // no shift
  // Bytes 0, 1 and 2, 3 of a key word.
  static __device__ __forceinline__ void keys(uint32_t w, uint32_t& r0, uint32_t& r1) {
    r0 = lo(w);
    r1 = hi(w);
  }
  // (byte e of wa, byte e of wb) for e = 2 half and 2 half + 1: one byte permutation, two cvt
  static __device__ __forceinline__ void pairs(uint32_t wa, uint32_t wb, int half, uint32_t& r0, uint32_t& r1) {
    const uint32_t x = __byte_perm(wa, wb, half ? 0x7362 : 0x5140);
    r0 = lo(x);
    r1 = hi(x);
  }
};

// int8: fp16 bits 0x6400 | (c ^ 0x80) = 1152 + c, no conversion. The products keep the 1152 (OFFSET) and
// take it off per column: 1152 sum q from the scores, 1152 sum P' (as rounded) from the outputs.
template <> struct Codes8<2> {
  static constexpr float OFFSET = 1152.f;
  // Bytes 0, 1 and 2, 3 of a key word: the code's sign bit flipped once per word, then one byte permutation
  // per pair.
  static __device__ __forceinline__ void keys(uint32_t w, uint32_t& r0, uint32_t& r1) {
    const uint32_t u = w ^ 0x80808080u;
    r0 = __byte_perm(u, 0x64, 0x4140);
    r1 = __byte_perm(u, 0x64, 0x4342);
  }
  static __device__ __forceinline__ uint32_t pair(uint32_t wa, uint32_t wb, int e) {
    return cs_and_xor(__byte_perm(wa, wb, ((4 + e) << 8) | e), 0x00FF00FFu, 0x64806480u);
  }
  static __device__ __forceinline__ void pairs(uint32_t wa, uint32_t wb, int half, uint32_t& r0, uint32_t& r1) {
    r0 = pair(wa, wb, 2 * half);
    r1 = pair(wa, wb, 2 * half + 1);
  }
};

template <int D> struct Tile8 {
  static constexpr int ST = D;  // head-major codes: bytes between a head's tokens (scales: 1 element)
  Words<D / 16> k0, k1;  // key bytes [t D/4, (t+1) D/4) of tokens g, g+8
  Words<D / 32> v[4];    // value bytes [g D/8, (g+1) D/8) of tokens 2t, 2t+1, 2t+8, 2t+9
  __half ks0, ks1, vs0, vs1;  // scales of tokens g, g+8
  static constexpr int LANE_BYTES = D + 16;  // staged: bytes per lane (four 2-byte scales as words)

  // Per lane: offsets inside a block of its first key byte, value byte and scales (token 0 of the tile).
  struct Lane {
    int k, v, ks, vs;
    __device__ __forceinline__ Lane(const DecodeParams& p, int h, int g, int t)
        : k(h * p.k_sh + t * (D / 4) + g * ST), v(h * p.v_sh + g * (D / 8) + 2 * t * ST), ks(h * p.ks_sh + g),
          vs(h * p.vs_sh + g) {}
  };

  // Line j of a tile's bytes (TileFeed): key codes, value codes (16 ST / 128 lines each), key scales,
  // value scales (a line each: 32 bytes inside one).
  static constexpr int CODE_LINES = 16 * ST / 128;
  static constexpr int L2N = (2 * CODE_LINES + 2 + 31) / 32;
  static constexpr int L2_AHEAD = 0;  // measured slower for the 8-bit formats (CS_L2_AHEAD)
  static __device__ __forceinline__ L2Line l2_line(const DecodeParams& p, int h, int j) {
    constexpr int C = CODE_LINES;
    if (j < C) return L2Line(p.k, int64_t(h) * p.k_sh + 128 * j, p.k_sb, ST);
    if (j < 2 * C) return L2Line(p.v, int64_t(h) * p.v_sh + 128 * (j - C), p.v_sb, ST);
    if (j == 2 * C) return L2Line(p.ks, 2 * int64_t(h) * p.ks_sh, 2 * p.ks_sb, 2);
    if (j == 2 * C + 1) return L2Line(p.vs, 2 * int64_t(h) * p.vs_sh, 2 * p.vs_sb, 2);
    return L2Line();
  }

  template <int M = FETCH_LOAD>
  __device__ __forceinline__ void load(const DecodeParams& p, const Lane& ln, int blk, int tb, Slot s = Slot()) {
    // A pointer per tensor and tile (one wide multiply-add), the rest immediate offsets from it.
    const uint8_t* kp = p.k + (int64_t(blk) * p.k_sb + (ln.k + tb * ST));
    fetch<M>(k0, kp, s);
    fetch<M>(k1, kp + 8 * ST, s);
    const uint8_t* vp = p.v + (int64_t(blk) * p.v_sb + (ln.v + tb * ST));
    fetch<M>(v[0], vp, s);
    fetch<M>(v[1], vp + ST, s);
    fetch<M>(v[2], vp + 8 * ST, s);
    fetch<M>(v[3], vp + 9 * ST, s);
    const __half* ksp = p.ks + (int64_t(blk) * p.ks_sb + (ln.ks + tb));
    const __half* vsp = p.vs + (int64_t(blk) * p.vs_sb + (ln.vs + tb));
    fetch<M>(ks0, ksp, s);
    fetch<M>(ks1, ksp + 8, s);
    fetch<M>(vs0, vsp, s);
    fetch<M>(vs1, vsp + 8, s);
    cs_check(s.off <= LANE_BYTES);
  }
};

template <int D, int KIND, bool ST>
__global__ void __launch_bounds__(128, 3) decode8_kernel(const DecodeParams p) {
  using C = Codes8<KIND>;
  constexpr int KW = D / 16;  // k-steps = key words per thread and token
  constexpr int VW = D / 32;  // value words per thread and token
  constexpr int MT = D / 16;  // m-tiles of O^T
  const WarpWork<> w(p);
  if (!w.valid) return;
  const int g = w.g, t = w.t, b = w.b, h = w.h, split = w.split, seq_len = w.seq_len;
  const auto& tiles = w.tiles;

  // Queries (B operand of S^T): head g, dims t D/4 + 4 kk + {0, 1} and {2, 3}, times scale * log2(e).
  uint32_t qf[KW][2];
  {
    const QueryRow qv(p, b, h, g, D);
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
      const uint2 x = *reinterpret_cast<const uint2*>(qv.row + t * (D / 4) + 4 * kk);
      qf[kk][0] = pack_half2(qv.scaled(x.x & 0xffff), qv.scaled(x.x >> 16));
      qf[kk][1] = pack_half2(qv.scaled(x.y & 0xffff), qv.scaled(x.y >> 16));
    }
  }
  // Code offset (int8) per column (head 2t + j): OFFSET x the sum of that head's B operand.
  float koff[2] = {0.f, 0.f};
  if constexpr (C::OFFSET != 0.f) {
    float part = 0.f;
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float2 x = unpack_half2(qf[kk][r]);
        part += x.x + x.y;
      }
    }
    const float a = C::OFFSET * xor_sum_t(part);  // head g
#pragma unroll
    for (int j = 0; j < 2; ++j) koff[j] = __shfl_sync(FULL, a, 4 * (2 * t + j));
  }

  float o[MT][4];
  zero_outputs(o);
  float psum[2] = {0.f, 0.f};  // int8: sum of the rounded P' per head 2t + j, this lane's rows
  Softmax sm;

  using Tile = Tile8<D>;
  Tile tile_a, tile_b;
  TileFeed<ST, Tile::LANE_BYTES, Tile::L2N, Tile::L2_AHEAD> feed(p, w,
                                                                 [&](int j) { return Tile::l2_line(p, h, j); });
  const typename Tile::Lane lane(p, h, g, t);
  auto load = [&](Tile& x, auto mode, int blk, int start, Slot sl) {
    x.template load<decltype(mode)::value>(p, lane, blk, start & (p.bs - 1), sl);
  };
  feed.begin(tile_a, load);
  auto step = [&](Tile& cur, Tile& nxt, const int i) {
    const int start = tiles.start(i);
    feed.before(i, nxt, load);

    float s[4] = {0.f, 0.f, 0.f, 0.f};  // S^T rows tokens g, g+8; columns heads 2t, 2t+1
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
      uint32_t a0, a1, a2, a3;
      C::keys(cur.k0.w[kk], a0, a2);
      C::keys(cur.k1.w[kk], a1, a3);
      cs_mma16816(s, a0, a1, a2, a3, qf[kk][0], qf[kk][1]);
    }
    const bool ok0 = visible(p, start + g, seq_len), ok1 = visible(p, start + g + 8, seq_len);
    const float k0s = __half2float(cur.ks0), k1s = __half2float(cur.ks1);
    s[0] = (s[0] - koff[0]) * k0s;
    s[1] = (s[1] - koff[1]) * k0s;
    s[2] = (s[2] - koff[0]) * k1s;
    s[3] = (s[3] - koff[1]) * k1s;
    float alpha[2];
    if (sm.tile(s, ok0, ok1, o, alpha) && C::OFFSET != 0.f) {
      psum[0] *= alpha[0];
      psum[1] *= alpha[1];
    }
    const float v0s = ok0 ? __half2float(cur.vs0) : 0.f, v1s = ok1 ? __half2float(cur.vs1) : 0.f;
    const uint32_t top = pack_half2(s[0] * v0s, s[1] * v0s), bot = pack_half2(s[2] * v1s, s[3] * v1s);
    if constexpr (C::OFFSET != 0.f) {
      const float2 rt = unpack_half2(top), rb = unpack_half2(bot);
      psum[0] += rt.x + rb.x;
      psum[1] += rt.y + rb.y;
    }
    const uint32_t pb0 = cs_transpose8x8(top);  // tokens 2t, 2t+1; head g
    const uint32_t pb1 = cs_transpose8x8(bot);  // tokens 2t+8, 2t+9
#pragma unroll
    for (int j = 0; j < VW; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint32_t r0, r1, r2, r3;
        C::pairs(cur.v[0].w[j], cur.v[1].w[j], half, r0, r1);
        C::pairs(cur.v[2].w[j], cur.v[3].w[j], half, r2, r3);
        cs_mma16816(o[2 * j + half], r0, r1, r2, r3, pb0, pb1);
      }
    }
    feed.after(i, nxt, load);
  };
  tile_loop<true>(tiles.n, tile_a, tile_b, step);

  // Head 2t + j: o[mi][2 hh + j] is dim g D/8 + 2 mi + hh.
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const float l = xor_sum_g(sm.l[j]);
    const float ps = C::OFFSET != 0.f ? C::OFFSET * xor_sum_g(psum[j]) : 0.f;
    const int head = 2 * t + j;
    if (head >= p.g) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float val[D / 8];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      val[2 * mi] = (o[mi][j] - ps) * inv;
      val[2 * mi + 1] = (o[mi][2 + j] - ps) * inv;
    }
    store_head<D / 8>(p, b, h, split, head, val, sm.m[j], l, g, [&](int e) { return g * (D / 8) + e; });
  }
}

// ------------------------------------------------------------------------------------------------
// int4: codes c in [0, 15], x = c s + z with fp16 scale s and zero z per token and group of G dims;
// byte i holds dims lo(i) = (i / GP) G + i % GP (low nibble) and lo(i) + GP (high nibble), GP = G / 2
// (ref.pack_order). Nibbles decode without shifts as fp16 subnormals (subnormal_codes): w & 0x000F000F
// is c 2^-24 for bytes 0 and 2 of word w, mask 0x00F000F0 gives 16 c 2^-24; w >> 8 bytes 1 and 3.
//
// Token order: S^T row r < 8 is token 2 r of the tile, row r + 8 token 2 r + 1, so
// that the value operand's k pairs (2t, 2t+1) and (2t+8, 2t+9) are tokens (4t, 4t+2) and (4t+1, 4t+3):
// bytes 0 / 2 and 1 / 3 of one 32-bit word of the token-contiguous value codes (ref.token_contiguous).
//
// Keys: thread (g, t) loads bytes [gi GP + t GP/4, + GP/4) of each group gi of its two tokens; a word
// gives two k-steps (low and high nibbles), both inside group gi, which accumulate into the group's
// own S^T fragment. Per row: S = sum_gi 2^24 s_gi S_gi + z_gi QS_gi, with QS_gi the group's sum of
// (scaled) queries (high-nibble queries are / 16 in the B operand).
// Values: m-tile mi rows g / g+8 are the low / high nibble of byte 8 mi + g (group 8 mi / GP), one
// word of tokens 4t..4t+3 per m-tile; the B operand of group gi is P'_gi = p s_v,gi. O rows are
// x 2^-24, high rows x 16 2^-24.

// A lane's place in int4's paired loops (decode4_pair_kernel, decode4_bulk_kernel): its tokens in a tile
// (rows g and g + 8 are tokens r0 and r0 + 1), its own tile of a step (A 0, B 1), and whether its B-operand
// column is one of tile A's.
struct PairLane {
  int r0, up;
  bool col_a;
  __device__ __forceinline__ PairLane(int g, int t) : r0(2 * g), up(t >> 1), col_a(g < 4) {}
};

template <int D, int GP> struct Int4Shape {
  static constexpr int NG = D / (2 * GP);  // groups per token
  static constexpr int CW = GP / 16;       // key words per thread and group
  static constexpr int MT = D / 16;        // m-tiles of O^T (value words per thread)
  static constexpr bool PINGPONG = D == 64 || GP == 32;  // tile_loop (head dim 128, groups of 32: spills)
};

// Bits of w under mask (bytes 0 and 2, at most 10 low bits per half) read as fp16 subnormals: mantissa
// bits alone (exponent field 0) are the value bits x 2^-24 exactly, with no offset to take off
// afterwards; the tensor cores multiply subnormal operands exactly (the GPU tests hold the kernel to the reference at fp16 rounding). The products
// carry the factor SUBNORMAL into fp32 accumulators, far from fp32's underflow (2^-126).
constexpr float SUBNORMAL = 1.f / 16777216.f;  // 2^-24: fp16 with mantissa bits 1
__device__ __forceinline__ uint32_t subnormal_codes(uint32_t w, uint32_t mask) { return w & mask; }

template <int D, int GP, int BS> struct Tile4 {  // BS: tokens per block (value byte stride)
  using S = Int4Shape<D, GP>;
  static constexpr int KST = D / 2;   // head-major key codes: bytes between a head's tokens
  static constexpr int SST = S::NG;   // head-major scales: elements between a head's tokens
  Words<S::CW> k0[S::NG], k1[S::NG];  // key words of group gi, tokens r0 = rho(g), r0 + 1
  uint32_t v[S::MT];                  // value byte 8 mi + g, tokens 4t..4t+3
  Halves<2 * S::NG> ks, kz, vs, vz;   // groups of tokens r0 (gi) and r0 + 1 (NG + gi): adjacent rows
  static constexpr int LANE_BYTES = 8 * S::NG * S::CW + 4 * S::MT + 16 * S::NG;  // staged: bytes per lane

  // Per lane: offsets inside a block of its first key byte, value byte and scale (token 0 of the tile).
  struct Lane {
    int k, v, s, vs;
    __device__ __forceinline__ Lane(const DecodeParams& p, int h, int r0, int g, int t)
        : k(h * p.k_sh + t * (GP / 4) + r0 * KST), v(h * p.v_sh + 4 * t + g * BS), s(h * p.ks_sh + r0 * SST),
          vs(h * p.vs_sh + r0 * SST) {}
  };

  // Line j of a tile's bytes (TileFeed): key codes, the block's value codes (with its first tile), key
  // scales, zero points, value scales, zero points (32 SST bytes each, inside one line).
  static constexpr int KEY_LINES = 16 * KST / 128, VALUE_LINES = BS * KST / 128;
  static constexpr int L2N = (KEY_LINES + VALUE_LINES + 4 + 31) / 32;
  static __device__ __forceinline__ L2Line l2_line(const DecodeParams& p, int h, int j) {
    constexpr int K = KEY_LINES, V = K + VALUE_LINES;
    if (j < K) return L2Line(p.k, int64_t(h) * p.k_sh + 128 * j, p.k_sb, KST);
    if (j < V) return L2Line(p.v, int64_t(h) * p.v_sh + 128 * (j - K), p.v_sb, 0, true);
    const int64_t ko = 2 * int64_t(h) * p.ks_sh, vo = 2 * int64_t(h) * p.vs_sh;
    if (j == V) return L2Line(p.ks, ko, 2 * p.ks_sb, 2 * SST);
    if (j == V + 1) return L2Line(p.kz, ko, 2 * p.ks_sb, 2 * SST);
    if (j == V + 2) return L2Line(p.vs, vo, 2 * p.vs_sb, 2 * SST);
    if (j == V + 3) return L2Line(p.vz, vo, 2 * p.vs_sb, 2 * SST);
    return L2Line();
  }

  template <int M = FETCH_LOAD>
  __device__ __forceinline__ void load(const DecodeParams& p, const Lane& ln, int blk, int tb, Slot s = Slot()) {
    const uint8_t* k0p = p.k + (int64_t(blk) * p.k_sb + (ln.k + tb * KST));
#pragma unroll
    for (int gi = 0; gi < S::NG; ++gi) {
      fetch<M>(k0[gi], k0p + gi * GP, s);
      fetch<M>(k1[gi], k0p + KST + gi * GP, s);
    }
    const uint8_t* vp = p.v + (int64_t(blk) * p.v_sb + (ln.v + tb));  // token-contiguous
#pragma unroll
    for (int mi = 0; mi < S::MT; ++mi) fetch<M>(v[mi], vp + 8 * mi * BS, s);
    const int64_t kso = int64_t(blk) * p.ks_sb + (ln.s + tb * SST);
    const int64_t vso = int64_t(blk) * p.vs_sb + (ln.vs + tb * SST);
    fetch<M>(ks, p.ks + kso, s);
    fetch<M>(kz, p.kz + kso, s);
    fetch<M>(vs, p.vs + vso, s);
    fetch<M>(vz, p.vz + vso, s);
    cs_check(s.off <= LANE_BYTES);
  }
};

// The arithmetic of int4 decode (decode4_kernel, decode4_pair_kernel): this lane's query operands, a
// tile's key products per group, its scores, its value products, the outputs.
template <int D, int GP> struct Int4Ops {
  using S = Int4Shape<D, GP>;
  static constexpr int NG = S::NG, CW = S::CW, MT = S::MT;
  // Queries (B operand, column g = query head `head`): k-step (gi, wi, hh) pairs bytes (i, i+2) [reg0]
  // and (i+1, i+3) [reg1] of word wi of this thread's chunk of group gi, i = gi GP + t GP/4 + 4 wi;
  // hh = 1: high-nibble dims, queries / 16.
  uint32_t qf[NG][CW][2][2];
  float qs[NG][2];  // per column 2t + j: the group sums of its query (lanes 4 (2t + j) hold it)

  __device__ __forceinline__ Int4Ops(const DecodeParams& p, int b, int h, int head, int g, int t) {
    float qs_g[NG];  // this thread's share for column g
    const QueryRow qv(p, b, h, head, D);
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      qs_g[gi] = 0.f;
#pragma unroll
      for (int wi = 0; wi < CW; ++wi) {
        const int i = gi * GP + t * (GP / 4) + 4 * wi;  // byte; dims lo(i + e) = gi G + (i + e) % GP
        const int d0 = gi * 2 * GP + (i % GP);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const float f = hh ? 1.f / 16 : 1.f;
          const int d = d0 + hh * GP;
          qf[gi][wi][hh][0] = pack_half2(qv(d) * f, qv(d + 2) * f);
          qf[gi][wi][hh][1] = pack_half2(qv(d + 1) * f, qv(d + 3) * f);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float2 x = unpack_half2(qf[gi][wi][hh][r]);
            qs_g[gi] += (x.x + x.y) * (hh ? 16.f : 1.f);
          }
        }
      }
    }
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      const float c = xor_sum_t(qs_g[gi]);
#pragma unroll
      for (int j = 0; j < 2; ++j) qs[gi][j] = __shfl_sync(FULL, c, 4 * (2 * t + j));
    }
  }

  // S^T of one tile per group (x 2^-24): key words k0 / k1 of its rows r0 / r0 + 1 (Tile4's).
  __device__ __forceinline__ void keys(const Words<CW> (&k0)[NG], const Words<CW> (&k1)[NG], float (&sg)[NG][4]) const {
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      sg[gi][0] = sg[gi][1] = sg[gi][2] = sg[gi][3] = 0.f;
#pragma unroll
      for (int wi = 0; wi < CW; ++wi) {
        const uint32_t a = k0[gi].w[wi], c = k1[gi].w[wi];
        const uint32_t a8 = a >> 8, c8 = c >> 8;
        cs_mma16816(sg[gi], subnormal_codes(a, 0x000F000Fu), subnormal_codes(c, 0x000F000Fu),
                    subnormal_codes(a8, 0x000F000Fu), subnormal_codes(c8, 0x000F000Fu), qf[gi][wi][0][0],
                    qf[gi][wi][0][1]);
        cs_mma16816(sg[gi], subnormal_codes(a, 0x00F000F0u), subnormal_codes(c, 0x00F000F0u),
                    subnormal_codes(a8, 0x00F000F0u), subnormal_codes(c8, 0x00F000F0u), qf[gi][wi][1][0],
                    qf[gi][wi][1][1]);
      }
    }
  }

  // Scores of rows r0 (s[0..1]) and r0 + 1 (s[2..3]): sum_gi 2^24 s_gi S_gi + z_gi QS_gi.
  __device__ __forceinline__ void scores(const float (&sg)[NG][4], const Halves<2 * NG>& ks, const Halves<2 * NG>& kz,
                                         float (&s)[4]) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[e] = -0.f;  // -0: the first group's adds fold away (Softmax::exp2_sum)
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {  // chained FFMA (no separate product and add)
        s[j] = fmaf(ks[gi] * (1.f / SUBNORMAL), sg[gi][j], fmaf(kz[gi], qs[gi][j], s[j]));
        s[2 + j] = fmaf(ks[NG + gi] * (1.f / SUBNORMAL), sg[gi][2 + j], fmaf(kz[NG + gi], qs[gi][j], s[2 + j]));
      }
    }
  }

  // O^T += the m-tiles of group gi of value words v times its B operand (pb0, pb1).
  static __device__ __forceinline__ void values(int gi, const uint32_t (&v)[MT], uint32_t pb0, uint32_t pb1,
                                                float (&o)[MT][4]) {
#pragma unroll
    for (int mi = gi * GP / 8; mi < (gi + 1) * GP / 8; ++mi) {
      const uint32_t w = v[mi], w8 = w >> 8;
      cs_mma16816(o[mi], subnormal_codes(w, 0x000F000Fu), subnormal_codes(w, 0x00F000F0u),
                  subnormal_codes(w8, 0x000F000Fu), subnormal_codes(w8, 0x00F000F0u), pb0, pb1);
    }
  }

  // Paired loops (decode4_pair_kernel, decode4_bulk_kernel): the key products of this lane's own tile
  // (A if up == 0, else B) out of both tiles' (sg[x]), in one S^T fragment.
  static __device__ __forceinline__ void own_products(const float (&sg)[2][NG][4], int up, float (&so)[NG][4]) {
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
#pragma unroll
      for (int e = 0; e < 4; ++e) so[gi][e] = up ? sg[1][gi][e] : sg[0][gi][e];
    }
  }

  // Paired loops: O^T += both tiles' values times P' (scores s of this lane's tile, its value scales and
  // zero points folded in, masked rows 0): tile A's values take the columns 0-3 of the B operand (col_a:
  // this lane's column is one of them), tile B's the columns 4-7.
  static __device__ __forceinline__ void pair_values(GroupSums<NG>& sums, const float (&s)[4], bool ok0, bool ok1,
                                                     const Halves<2 * NG>& vs, const Halves<2 * NG>& vz,
                                                     const uint32_t (&va)[MT], const uint32_t (&vb)[MT], bool col_a,
                                                     float (&o)[MT][4]) {
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      uint32_t pb0, pb1;
      sums.operand(gi, s, ok0 ? vs[gi] : 0.f, ok1 ? vs[NG + gi] : 0.f, ok0 ? vz[gi] : 0.f,
                   ok1 ? vz[NG + gi] : 0.f, pb0, pb1);
      values(gi, va, col_a ? pb0 : 0u, col_a ? pb1 : 0u, o);
      values(gi, vb, col_a ? 0u : pb0, col_a ? 0u : pb1, o);
    }
  }

  // Head 2t + j: o[mi][j] is dim lo(8 mi + g), o[mi][2 + j] dim lo(8 mi + g) + GP (x 16).
  static __device__ __forceinline__ void store(const DecodeParams& p, int b, int h, int split, int g, int t,
                                               const Softmax& sm, const float (&o)[MT][4], const GroupSums<NG>& sums) {
    store_packed<D>(p, b, h, split, g, t, sm, o, sums, [](int mi) { return 8 * mi / GP; },
                    [](int, int r) { return (r ? 16.f : 1.f) * SUBNORMAL; }, [&](int e) {
      const int byte = 8 * (e >> 1) + g;
      return (byte / GP) * 2 * GP + byte % GP + (e & 1) * GP;
    });
  }
};

template <int D, int GP, bool ST, int BS>
__global__ void __launch_bounds__(128, 3) decode4_kernel(const DecodeParams p) {
  using S = Int4Shape<D, GP>;
  constexpr int NG = S::NG, MT = S::MT;
  const WarpWork<> w(p);
  if (!w.valid) return;
  const int g = w.g, t = w.t, b = w.b, h = w.h, split = w.split, seq_len = w.seq_len;
  const auto& tiles = w.tiles;
  const int r0 = 2 * g;  // this lane's tokens in a tile: rows g (r0) and g+8 (r0 + 1)

  Int4Ops<D, GP> ops(p, b, h, g, g, t);
  float o[MT][4];
  zero_outputs(o);
  GroupSums<NG> sums;
  Softmax sm;

  using Tile = Tile4<D, GP, BS>;
  Tile tile_a, tile_b;
  TileFeed<ST, Tile::LANE_BYTES, Tile::L2N> feed(p, w, [&](int j) { return Tile::l2_line(p, h, j); });
  const typename Tile::Lane lane(p, h, r0, g, t);
  auto load = [&](Tile& x, auto mode, int blk, int start, Slot sl) {
    // a tile's first token inside its block (tiles start at multiples of 16)
    x.template load<decltype(mode)::value>(p, lane, blk, BS == 16 ? 0 : start & (BS - 1), sl);
  };
  feed.begin(tile_a, load);
  auto step = [&](Tile& cur, Tile& nxt, const int i) {
    const int start = tiles.start(i);
    feed.before(i, nxt, load);

    float sg[NG][4];
    ops.keys(cur.k0, cur.k1, sg);
    const bool ok0 = visible(p, start + r0, seq_len), ok1 = visible(p, start + r0 + 1, seq_len);
    float s[4];
    ops.scores(sg, cur.ks, cur.kz, s);
    float alpha[2];
    if (sm.tile(s, ok0, ok1, o, alpha)) sums.rescale(alpha);
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      uint32_t pb0, pb1;
      sums.operand(gi, s, ok0 ? cur.vs[gi] : 0.f, ok1 ? cur.vs[NG + gi] : 0.f, ok0 ? cur.vz[gi] : 0.f,
                   ok1 ? cur.vz[NG + gi] : 0.f, pb0, pb1);
      ops.values(gi, cur.v, pb0, pb1, o);
    }
    feed.after(i, nxt, load);
  };
  tile_loop<S::PINGPONG>(tiles.n, tile_a, tile_b, step);

  ops.store(p, b, h, split, g, t, sm, o, sums);
}

// int4 with G <= 4 query heads per KV head: the paired loop (PairFeed). Lanes and operands as in
// decode4_kernel, with column g of the query operand holding head g % 4 and two tiles per step: the
// key products of tile A and of tile B each fill a whole S^T fragment, of which lanes t < 2 keep tile
// A's (columns 0-3) and lanes t >= 2 tile B's (4-7), so one set of scores, one softmax step and one P'
// serve 32 tokens. P' (column g: lanes g < 4 hold tile A's probabilities) times tile A's values takes
// columns 4-7 of its B operand as 0, tile B's columns 0-3. Each lane loads the scales of its own tile.
template <int D, int GP, int BS> struct Pair4 {
  using S = Int4Shape<D, GP>;
  using T = Tile4<D, GP, BS>;
  Words<S::CW> k0[2][S::NG], k1[2][S::NG];  // key words of tiles A and B (Tile4's)
  uint32_t v[2][S::MT];                     // value words of tiles A and B
  Halves<2 * S::NG> ks, kz, vs, vz;         // this lane's tile's scales and zero points

  __device__ __forceinline__ void keys(const DecodeParams& p, const typename T::Lane& ln, int x, int blk, int tb) {
    Slot sl;
    const uint8_t* k0p = p.k + (int64_t(blk) * p.k_sb + (ln.k + tb * T::KST));
#pragma unroll
    for (int gi = 0; gi < S::NG; ++gi) {
      fetch<FETCH_LOAD>(k0[x][gi], k0p + gi * GP, sl);
      fetch<FETCH_LOAD>(k1[x][gi], k0p + T::KST + gi * GP, sl);
    }
  }
  __device__ __forceinline__ void values(const DecodeParams& p, const typename T::Lane& ln, int x, int blk, int tb) {
    Slot sl;
    const uint8_t* vp = p.v + (int64_t(blk) * p.v_sb + (ln.v + tb));  // token-contiguous
#pragma unroll
    for (int mi = 0; mi < S::MT; ++mi) fetch<FETCH_LOAD>(v[x][mi], vp + 8 * mi * BS, sl);
  }
  __device__ __forceinline__ void key_scales(const DecodeParams& p, const typename T::Lane& ln, int blk, int tb) {
    Slot sl;
    const int64_t kso = int64_t(blk) * p.ks_sb + (ln.s + tb * T::SST);
    fetch<FETCH_LOAD>(ks, p.ks + kso, sl);
    fetch<FETCH_LOAD>(kz, p.kz + kso, sl);
  }
  __device__ __forceinline__ void value_scales(const DecodeParams& p, const typename T::Lane& ln, int blk, int tb) {
    Slot sl;
    const int64_t vso = int64_t(blk) * p.vs_sb + (ln.vs + tb * T::SST);
    fetch<FETCH_LOAD>(vs, p.vs + vso, sl);
    fetch<FETCH_LOAD>(vz, p.vz + vso, sl);
  }
};

template <int D, int GP, int BS>
__global__ void __launch_bounds__(128, 3) decode4_pair_kernel(const DecodeParams p) {
  using S = Int4Shape<D, GP>;
  constexpr int NG = S::NG, MT = S::MT;
  const WarpWork<> w(p);
  if (!w.valid) return;
  const int g = w.g, t = w.t, b = w.b, h = w.h, split = w.split, seq_len = w.seq_len;
  const auto& tiles = w.tiles;
  const PairLane pl(g, t);
  const int r0 = pl.r0, up = pl.up;
  const bool col_a = pl.col_a;

  Int4Ops<D, GP> ops(p, b, h, g & 3, g, t);
  float o[MT][4];
  zero_outputs(o);
  GroupSums<NG> sums;
  Softmax sm;

  using Tile = Tile4<D, GP, BS>;
  Pair4<D, GP, BS> pr = {};
  PairFeed feed(p, w);
  const typename Tile::Lane lane(p, h, r0, g, t);
  const int n = tiles.n;
  auto tb = [&](int i) { return BS == 16 ? 0 : feed.in_block(i); };  // a tile's first token in its block
  {
    const int ids[2] = {feed.block(0), feed.block(1)};
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      pr.keys(p, lane, x, ids[x], tb(x));
      pr.values(p, lane, x, ids[x], tb(x));
    }
    pr.key_scales(p, lane, up ? ids[1] : ids[0], tb(up));
    pr.value_scales(p, lane, up ? ids[1] : ids[0], tb(up));
  }
  uint32_t sink = 0;  // LOADS_ONLY: the loaded words, each xor'ed in right before its reload
  for (int k = 0; k < feed.steps(); ++k) {
    const int nx = 2 * k + 2;  // step k + 1's first tile
    float sg[2][NG][4];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      if constexpr (LOADS_ONLY) {
        sink ^= words_xor(pr.k0[x]) ^ words_xor(pr.k1[x]);
      } else {
        ops.keys(pr.k0[x], pr.k1[x], sg[x]);
      }
      pr.keys(p, lane, x, feed.id(x), tb(nx + x));
    }
    if constexpr (LOADS_ONLY) {
      sink ^= words_xor(pr.ks.x) ^ words_xor(pr.kz.x) ^ words_xor(pr.vs.x) ^ words_xor(pr.vz.x) ^ words_xor(pr.v);
      pr.key_scales(p, lane, feed.own_id(up), tb(nx + up));
      pr.value_scales(p, lane, feed.own_id(up), tb(nx + up));
#pragma unroll
      for (int x = 0; x < 2; ++x) pr.values(p, lane, x, feed.id(x), tb(nx + x));
      feed.next(k);
      continue;
    }
    const int own = 2 * k + up;
    const int start = tiles.start(own);
    const bool ok0 = own < n && visible(p, start + r0, seq_len), ok1 = own < n && visible(p, start + r0 + 1, seq_len);
    float so[NG][4];
    ops.own_products(sg, up, so);
    float s[4];
    ops.scores(so, pr.ks, pr.kz, s);
    pr.key_scales(p, lane, feed.own_id(up), tb(nx + up));
    float alpha[2];
    if (sm.tile(s, ok0, ok1, o, alpha)) sums.rescale(alpha);
    ops.pair_values(sums, s, ok0, ok1, pr.vs, pr.vz, pr.v[0], pr.v[1], col_a, o);
    pr.value_scales(p, lane, feed.own_id(up), tb(nx + up));
#pragma unroll
    for (int x = 0; x < 2; ++x) pr.values(p, lane, x, feed.id(x), tb(nx + x));
    feed.next(k);
  }
  if constexpr (LOADS_ONLY) o[0][0] = __uint_as_float(sink & 0x3fffffffu);  // kept alive through the store
  merge_pair_columns(sm, o, sums);
  ops.store(p, b, h, split, g, t, sm, o, sums);
}

// int4's paired loop fed by bulk copies (cuda_decode.bulk_for: groups of 64, and since the twentieth
// session of 32 (GP 16: 128 registers, 380 -> 323 us at batch 32 / 32k), 16-token blocks, at most 4
// query heads per KV head, and the storage's chunk layout, ref.head_chunks: a block's key codes, value
// codes, key scales, key zero points, value scales and value zero points of one KV head side by side in
// one chunk of CH bytes). Lane 0 copies a step's two chunks into a ring of CS_BULK_STAGES steps in the warp's
// shared memory with two cp.async.bulk instructions, CS_BULK_STAGES steps ahead; the lanes read their
// operands from the ring where they are used. Nothing in flight holds registers or L1, so 127 registers
// and 4 blocks (16 warps) per SM, against the register loop's 168 and 12. Arithmetic as
// decode4_pair_kernel. H200, batch 32 / 32k (docs/benchmarks.md, sixteenth session): 328 -> 310 to 312 us;
// 3 stages (16 warps, 223 KB of shared memory per SM) 317, 4 stages (12 warps) 321.
#ifndef CS_BULK_STAGES
#define CS_BULK_STAGES 2
#endif
template <int D, int GP> struct Bulk4 {
  static constexpr int NG = D / (2 * GP), BS = 16, STAGES = CS_BULK_STAGES;
  // the chunk's parts (bytes from its start), in ref.CHUNK_PARTS order
  static constexpr int VO = BS * D / 2, KSO = BS * D, KZO = KSO + 2 * BS * NG, VSO = KZO + 2 * BS * NG,
                       VZO = VSO + 2 * BS * NG, CH = VZO + 2 * BS * NG;
  static constexpr int RING = STAGES * 2 * CH;
  static constexpr int SMEM_PER_WARP = (RING + 8 * STAGES + 127) / 128 * 128;  // ring, then its barriers
};

template <int D, int GP>
__global__ void __launch_bounds__(128, 4) decode4_bulk_kernel(const DecodeParams p) {
  using S = Int4Shape<D, GP>;
  using B = Bulk4<D, GP>;
  constexpr int NG = S::NG, MT = S::MT, CW = S::CW, SS = B::STAGES;
  CS_DYNAMIC_SMEM(smem);
  const WarpWork<> w(p);
  uint8_t* ring = smem + (threadIdx.x >> 5) * B::SMEM_PER_WARP;
  uint64_t* bars = reinterpret_cast<uint64_t*>(ring + B::RING);
  if (!w.valid) return;
  const int g = w.g, t = w.t, b = w.b, h = w.h, split = w.split, seq_len = w.seq_len;
  const auto& tiles = w.tiles;
  const PairLane pl(g, t);
  const int r0 = pl.r0, up = pl.up;
  const bool col_a = pl.col_a;

  Int4Ops<D, GP> ops(p, b, h, g & 3, g, t);
  float o[MT][4];
  zero_outputs(o);
  GroupSums<NG> sums;
  Softmax sm;

  const int n = tiles.n, steps = (n + 1) >> 1;
  const uint8_t* head = p.k + int64_t(h) * p.k_sh;  // chunk (block 0, head h)
  // tile i's chunk (tiles past the split: block 0's, copied and never used: their rows are masked)
  TileBlocks<16> blocks(p, w, n);
  if (cs_bulk_leader()) {
#pragma unroll
    for (int s = 0; s < SS; ++s) cs_bulk_init(bars + s);
    cs_bulk_init_fence();
  }
  __syncwarp();
  auto issue = [&](int k) {  // step k's two chunks into stage k % SS (every lane: the blocks' shuffles)
    int blk[2];
    blocks.get(p, w, n, 2 * k, blk);
    if (!cs_bulk_leader()) return;
    uint8_t* st = ring + (k % SS) * 2 * B::CH;
    cs_bulk_expect(bars + k % SS, 2 * B::CH);
    cs_bulk_copy(st, head + int64_t(blk[0]) * p.k_sb, B::CH, bars + k % SS);
    cs_bulk_copy(st + B::CH, head + int64_t(blk[1]) * p.k_sb, B::CH, bars + k % SS);
  };
  for (int k = 0; k < min(SS, steps); ++k) issue(k);
  // this lane's operands inside a chunk: key words (Tile4's), value words, scales of rows r0, r0 + 1
  const int ko = t * (GP / 4) + r0 * (D / 2), vo = B::VO + 4 * t + g * B::BS, so = 2 * r0 * NG;
  for (int k = 0; k < steps; ++k) {
    cs_bulk_wait(bars + k % SS, (k / SS) & 1);
    const uint8_t* st = ring + (k % SS) * 2 * B::CH;
    auto word = [&](int x, int off) { return *reinterpret_cast<const uint32_t*>(st + x * B::CH + off); };
    float sg[2][NG][4];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      Words<CW> k0[NG], k1[NG];
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
#pragma unroll
        for (int wi = 0; wi < CW; ++wi) {
          k0[gi].w[wi] = word(x, ko + gi * GP + 4 * wi);
          k1[gi].w[wi] = word(x, ko + D / 2 + gi * GP + 4 * wi);
        }
      }
      ops.keys(k0, k1, sg[x]);
    }
    Halves<2 * NG> ks, kz, vs, vz;  // this lane's tile's
#pragma unroll
    for (int i = 0; i < NG; ++i) {
      ks.x.w[i] = word(up, B::KSO + so + 4 * i);
      kz.x.w[i] = word(up, B::KZO + so + 4 * i);
      vs.x.w[i] = word(up, B::VSO + so + 4 * i);
      vz.x.w[i] = word(up, B::VZO + so + 4 * i);
    }
    const int own = 2 * k + up;
    const int start = tiles.start(own);
    const bool ok0 = (own < n) & visible_flat(p, start + r0, seq_len);
    const bool ok1 = (own < n) & visible_flat(p, start + r0 + 1, seq_len);
    float so_own[NG][4];
    ops.own_products(sg, up, so_own);
    float s[4];
    ops.scores(so_own, ks, kz, s);
    float alpha[2];
    if (sm.tile(s, ok0, ok1, o, alpha)) sums.rescale(alpha);
    uint32_t v[2][MT];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) v[x][mi] = word(x, vo + 8 * mi * B::BS);
    }
    ops.pair_values(sums, s, ok0, ok1, vs, vz, v[0], v[1], col_a, o);
    __syncwarp();  // every lane is done with the stage before it is refilled
    if (k + SS < steps) issue(k + SS);
  }
  merge_pair_columns(sm, o, sums);
  ops.store(p, b, h, split, g, t, sm, o, sums);
}

// ------------------------------------------------------------------------------------------------
// kivi2: 2-bit codes c in [0, 3]; byte i of a token's head vector holds dims dim(i, s) = (i' / GP) G +
// s GP + i' % GP in slots s = 0..3 (bits 2s, 2s + 1), GP = G / 4, i' = i with bytes 1 and 2 of each
// 4-byte word swapped (ref.pack_order, ref.swap_bytes12): bytes 0, 1, 2, 3 of a word hold dims d, d + 2,
// d + 1, d + 3 of a slot, so the fp16 pairs of a word's codes (bytes 0 and 2, bytes 1 and 3) are dims
// (d, d + 1) and (d + 2, d + 3), the queries' and scales' pairs in dim order. Keys per channel over
// each block: K = c ks + kz, ks / kz [N, Hkv, D]; values per token and group of G dims: V = c vs + vz.
// A row's newest tokens [F, n), F = n - n % R, are fp16 in its residual window res_k / res_v [B, R, Hkv, D].
// Slots decode in place as fp16 subnormals (subnormal_codes): w & slot_mask(s) is 4^s c 2^-24 for slot
// s of bytes 0 and 2 (the code lands in mantissa bits 2s, 2s + 1); w >> 8 bytes 1 and 3. The factor 4^s
// goes into the queries (keys) or comes off at the end (values), the 2^-24 comes off the scores and
// the outputs.
//
// A warp step is 32 tokens: two 16-token tiles u, inside one block (blocks of a multiple of 32 tokens),
// rows as for int4 (row r < 8 is token 2 r of the tile, row r + 8 token 2 r + 1).
// Keys: thread (g, t) loads bytes [t D/16, (t+1) D/16) of its tokens; k-step (wi, s) is slot s of word
// wi, whose dims are d .. d + 3, d = dim(t D/16 + 4 wi, s): A pairs (d, d + 1) and (d + 2, d + 3). The
// block's channel scales fold into the queries, B = q ks / 4^s, recomputed per block from the queries
// and the scales in shared memory (KeyScales); the block's constant C = sum_d q_d kz_d per head comes
// from products whose A operand is the zero points (rows alike) and starts the tiles' score
// accumulators (x 2^-24, the unit of the key products).
// Values: thread (g, t) loads byte 8 mb + g of tokens 4t..4t+3 (one word) per byte block mb; m-tile
// (mb, hh) has slots 2 hh / 2 hh + 1 as rows g / g + 8 (rows x 4^slot 2^-24), in group 8 mb / GP;
// P'_gi = p vs_gi as for int4. Residual steps load fp16 keys and values into the same fragments (their
// value rows added x 4^slot 2^-24 to match).

// Index i with items 1 and 2 of each four swapped (its own inverse): kivi2's bytes in a code word
// (Kivi2Shape::dim, ref.swap_bytes12) and the query words its bulk loop keeps (Bulk2::QPERM).
__device__ __forceinline__ constexpr int swap12(int i) { return (i & ~3) | ((i & 1) << 1) | ((i >> 1) & 1); }

// kivi2 slot s of bytes 0 and 2 of a word, read in place (no shift): mask, and factor 4^s.
__device__ __forceinline__ constexpr uint32_t slot_mask(int s) { return 0x00030003u << (2 * s); }
__device__ __forceinline__ constexpr float slot_factor(int s) { return float(1 << (2 * s)); }

template <int D, int GP> struct Kivi2Shape {
  static constexpr int NG = D / (4 * GP);  // value groups per token
  static constexpr int CH = D / 16;        // key bytes per thread and token (dims per slot)
  static constexpr int KW = D / 64;        // key words per thread and token
  static constexpr int MB = D / 32;        // value byte blocks (words per thread and tile)
  static constexpr int MT = D / 16;        // m-tiles of O^T
  // Blocks per SM: head dim 128 with groups of 32 (4 value scale pairs per token) spills 316 bytes at
  // 168 registers (3 blocks), so it takes 2 blocks and up to 255 registers.
  static constexpr int MIN_BLOCKS = D == 128 && GP == 8 ? 2 : 3;
  static constexpr bool PINGPONG = D == 64 || GP == 8;  // tile_loop (spills at 168 registers otherwise)
  static __device__ __forceinline__ int dim(int i, int s) {
    const int j = swap12(i);  // bytes 1 and 2 of the word swapped
    return (j / GP) * 4 * GP + s * GP + j % GP;
  }
};

template <int D, int GP, int BS> struct Step2 {  // one 32-token step of codes and value scales; BS as Tile4
  using S = Kivi2Shape<D, GP>;
  static constexpr int KST = D / 4;   // head-major key codes: bytes between a head's tokens
  static constexpr int SST = S::NG;   // head-major value scales: elements between a head's tokens
  Words<S::KW> k[2][2];               // [tile][row g / g + 8]: key words of tokens 2g, 2g + 1
  uint32_t v[2][S::MB];               // [tile][byte block]: byte 8 mb + g of tokens 4t..4t+3
  Halves<2 * S::NG> vs[2], vz[2];     // [tile]: groups of tokens 2g (gi) and 2g + 1 (NG + gi), adjacent

  struct Lane {  // per lane: offsets inside a block (token 0 of the step)
    int k, v, s;
    __device__ __forceinline__ Lane(const DecodeParams& p, int h, int g, int t)
        : k(h * p.k_sh + t * S::CH + 2 * g * KST), v(h * p.v_sh + 4 * t + g * BS), s(h * p.vs_sh + 2 * g * SST) {}
  };

  // Line j of a step's bytes (TileFeed): key codes, the block's value codes (with its first step), value
  // scales, zero points (64 NG bytes each), the block's key channel scales and zero points (2 D bytes each).
  static constexpr int KEY_LINES = 32 * KST / 128, VALUE_LINES = BS * KST / 128;
  static constexpr int VS_LINES = (64 * S::NG + 127) / 128, KS_LINES = 2 * D / 128;
  static constexpr int L2N = (KEY_LINES + VALUE_LINES + 2 * VS_LINES + 2 * KS_LINES + 31) / 32;
  static __device__ __forceinline__ L2Line l2_line(const DecodeParams& p, int h, int j) {
    constexpr int K = KEY_LINES, V = K + VALUE_LINES, VS = V + VS_LINES, VZ = VS + VS_LINES, KS = VZ + KS_LINES;
    if (j < K) return L2Line(p.k, int64_t(h) * p.k_sh + 128 * j, p.k_sb, KST);
    if (j < V) return L2Line(p.v, int64_t(h) * p.v_sh + 128 * (j - K), p.v_sb, 0, true);
    const int64_t vo = 2 * int64_t(h) * p.vs_sh, ko = 2 * int64_t(h) * p.ks_sh;
    if (j < VS) return L2Line(p.vs, vo + 128 * (j - V), 2 * p.vs_sb, 2 * SST);
    if (j < VZ) return L2Line(p.vz, vo + 128 * (j - VS), 2 * p.vs_sb, 2 * SST);
    if (j < KS) return L2Line(p.ks, ko + 128 * (j - VZ), 2 * p.ks_sb, 0, true);
    if (j < KS + KS_LINES) return L2Line(p.kz, ko + 128 * (j - KS), 2 * p.ks_sb, 0, true);
    return L2Line();
  }

  __device__ __forceinline__ void load(const DecodeParams& p, const Lane& ln, int blk, int tb) {
    Slot none;  // direct loads
    const uint8_t* kp = p.k + (int64_t(blk) * p.k_sb + (ln.k + tb * KST));
    const uint8_t* vp = p.v + (int64_t(blk) * p.v_sb + (ln.v + tb));  // token-contiguous
    const int64_t so = int64_t(blk) * p.vs_sb + (ln.s + tb * SST);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int r = 0; r < 2; ++r) fetch<FETCH_LOAD>(k[u][r], kp + (16 * u + r) * KST, none);
      fetch<FETCH_LOAD>(vs[u], p.vs + so + 16 * u * SST, none);
      fetch<FETCH_LOAD>(vz[u], p.vz + so + 16 * u * SST, none);
#pragma unroll
      for (int mb = 0; mb < S::MB; ++mb) fetch<FETCH_LOAD>(v[u][mb], vp + (16 * u + 8 * mb * BS), none);
    }
  }
};

// A block's channel scales and zero points at this thread's dims. After the first block's (loaded
// directly), each block's are copied by cp.async into one of two per-warp shared-memory buffers two
// steps before the step that folds them (decode2_kernel), so the fold reads them at shared-memory latency.
template <int D, int GP> struct KeyScales {
  using S = Kivi2Shape<D, GP>;
  Words<S::CH / 2> sc[4], zp[4];  // slot s: fp16 pairs of dims dim(t CH, s) + 0 .. CH - 1
  static constexpr int LANE_BYTES = 8 * 2 * S::CH;  // one buffer: bytes per lane
  static constexpr int Q_BYTES = 32 * S::KW;        // the queries' B operand qh: bytes per lane
  static constexpr int SMEM_PER_WARP = 32 * (2 * LANE_BYTES + Q_BYTES);

  template <int M = FETCH_LOAD>
  __device__ __forceinline__ void fetch_all(const DecodeParams& p, int blk, int h, int t, Slot sl = Slot()) {
    const int64_t off = int64_t(blk) * p.ks_sb + h * p.ks_sh;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int d = S::dim(t * S::CH, s);
      fetch<M>(sc[s], reinterpret_cast<const uint8_t*>(p.ks + off + d), sl);
      fetch<M>(zp[s], reinterpret_cast<const uint8_t*>(p.kz + off + d), sl);
    }
    cs_check(sl.off <= LANE_BYTES);
  }

  // The block's B operands qf = q ks / 4^s (slot s) and constant per head 2t + j (x 2^-24).
  __device__ __forceinline__ void fold(const uint32_t (&qh)[S::KW][4][2], uint32_t (&qf)[S::KW][4][2],
                                       float (&cblk)[2]) const {
    float c[4] = {-0.f, -0.f, -0.f, -0.f};
#pragma unroll
    for (int wi = 0; wi < S::KW; ++wi) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint32_t s0 = sc[s].w[2 * wi], s1 = sc[s].w[2 * wi + 1];  // dims (d, d + 1), (d + 2, d + 3)
        const uint32_t z0 = zp[s].w[2 * wi], z1 = zp[s].w[2 * wi + 1];
        uint32_t f0 = hmul2_bits(qh[wi][s][0], s0), f1 = hmul2_bits(qh[wi][s][1], s1);
        if (s > 0) {  // slot s is read x 4^s (slot_mask): its queries / 4^s
          const uint32_t f = pack_half2(1.f / slot_factor(s), 1.f / slot_factor(s));
          f0 = hmul2_bits(f0, f);
          f1 = hmul2_bits(f1, f);
        }
        qf[wi][s][0] = f0;
        qf[wi][s][1] = f1;
        // Rows g + 8 of A are not read (c[2], c[3]): left undefined rather than filled by copies.
        cs_mma16816(c, z0, cs_undefined(), z1, cs_undefined(), qh[wi][s][0], qh[wi][s][1]);  // sum q kz
      }
    }
    cblk[0] = c[0] * SUBNORMAL;  // in the key products' unit
    cblk[1] = c[1] * SUBNORMAL;
  }
};

__device__ __forceinline__ uint32_t pack_bits(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// kivi2's residual steps [nq, n) of the warp's split (decode2_kernel, decode2_bulk_kernel): the fp16 keys
// and values of row b's window (tokens from f_res on), with the queries' B operand qh (pairs (d, d + 1),
// (d + 2, d + 3) of k-step (wi, s), unscaled), into the running softmax, O^T and the value sums. Rows as
// decode2_kernel's steps (row r < 8: token 2 r of a tile, row r + 8: token 2 r + 1); the value rows are
// added x 4^slot 2^-24, the unit of the quantized steps' value products.
template <int D, int GP>
__device__ __forceinline__ void kivi2_residual(const DecodeParams& p, const WarpWork<32>& w, int nq, int f_res,
                                               const uint32_t (&qh)[Kivi2Shape<D, GP>::KW][4][2], Softmax& sm,
                                               float (&o)[Kivi2Shape<D, GP>::MT][4],
                                               GroupSums<Kivi2Shape<D, GP>::NG>& sums) {
  using S = Kivi2Shape<D, GP>;
  constexpr int CH = S::CH, KW = S::KW, MB = S::MB;
  const int g = w.g, t = w.t, b = w.b, h = w.h, seq_len = w.seq_len;
  const auto& tiles = w.tiles;
  const int64_t res_tok = int64_t(p.hkv) * D;  // elements between a window's tokens
  const int64_t res_base = (int64_t(b) * p.r * p.hkv + h) * D - f_res * res_tok;  // + token * res_tok
  const uint16_t* rk = reinterpret_cast<const uint16_t*>(p.rk) + res_base;
  const uint16_t* rv = reinterpret_cast<const uint16_t*>(p.rv) + res_base;
  for (int i = nq; i < tiles.n; ++i) {
    const int start = tiles.start(i);
    float s[2][4];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      s[u][0] = s[u][1] = s[u][2] = s[u][3] = 0.f;
      const uint16_t* k0 = rk + (start + 16 * u + 2 * g) * res_tok;
#pragma unroll
      for (int wi = 0; wi < KW; ++wi) {
#pragma unroll
        for (int sl = 0; sl < 4; ++sl) {
          const int d = S::dim(t * CH + 4 * wi, sl);
          const uint2 a = __ldg(reinterpret_cast<const uint2*>(k0 + d));
          const uint2 c = __ldg(reinterpret_cast<const uint2*>(k0 + res_tok + d));
          cs_mma16816(s[u], a.x, c.x, a.y, c.y, qh[wi][sl][0], qh[wi][sl][1]);
        }
      }
    }
    bool ok[2][2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      ok[u][0] = visible(p, start + 16 * u + 2 * g, seq_len);
      ok[u][1] = visible(p, start + 16 * u + 2 * g + 1, seq_len);
    }
    float alpha[2];
    if (sm.tiles(s, ok, o, alpha)) sums.rescale(alpha);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const uint32_t pb0 = cs_transpose8x8(pack_half2(s[u][0], s[u][1]));
      const uint32_t pb1 = cs_transpose8x8(pack_half2(s[u][2], s[u][3]));
      const uint16_t* v0 = rv + (start + 16 * u + 4 * t) * res_tok;  // tokens 4t .. 4t + 3
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int da = S::dim(8 * mb + g, 2 * hh), db = da + GP;  // rows g, g + 8
          auto at = [&](int tok, int d) { return v0[tok * res_tok + d]; };
          float c[4] = {0.f, 0.f, 0.f, 0.f};
          cs_mma16816(c, pack_bits(at(0, da), at(2, da)), pack_bits(at(0, db), at(2, db)),
                      pack_bits(at(1, da), at(3, da)), pack_bits(at(1, db), at(3, db)), pb0, pb1);
          float(&acc)[4] = o[2 * mb + hh];
          const float f0 = slot_factor(2 * hh) * SUBNORMAL, f1 = slot_factor(2 * hh + 1) * SUBNORMAL;  // as codes
          acc[0] += f0 * c[0];
          acc[1] += f0 * c[1];
          acc[2] += f1 * c[2];
          acc[3] += f1 * c[3];
        }
      }
    }
  }
}

// kivi2's outputs (decode2_kernel, decode2_bulk_kernel): o[mt][j] is dim(8 mb + g, 2 hh) of head 2t + j,
// o[mt][2 + j] dim(8 mb + g, 2 hh + 1) (x 4), mt = 2 mb + hh.
template <int D, int GP, int STEP>
__device__ __forceinline__ void kivi2_store(const DecodeParams& p, const WarpWork<STEP>& w, const Softmax& sm,
                                            const float (&o)[Kivi2Shape<D, GP>::MT][4],
                                            const GroupSums<Kivi2Shape<D, GP>::NG>& sums) {
  using S = Kivi2Shape<D, GP>;
  const int g = w.g;
  store_packed<D>(p, w.b, w.h, w.split, g, w.t, sm, o, sums, [](int mt) { return 8 * (mt >> 1) / GP; },
                  [](int mt, int r) { return slot_factor(2 * (mt & 1) + r) * SUBNORMAL; },
                  [&](int e) {
                    const int mt = e >> 1;
                    return S::dim(8 * (mt >> 1) + g, 2 * (mt & 1) + (e & 1));
                  });
}

// PAIRED (G <= 4, as decode4_pair_kernel): the step's two tiles share one score fragment (lanes t < 2
// keep tile 0's scores, t >= 2 tile 1's), so one softmax step and one P' serve the 32 tokens; the
// columns' partials are merged after the quantized steps, and the residual steps then add the same
// tokens to both columns of a head (only columns 0-3 are stored).
template <int D, int GP, int BS, bool PAIRED>
__global__ void __launch_bounds__(128, Kivi2Shape<D, GP>::MIN_BLOCKS) decode2_kernel(const DecodeParams p) {
  using S = Kivi2Shape<D, GP>;
  constexpr int NG = S::NG, CH = S::CH, KW = S::KW, MB = S::MB, MT = S::MT;
  const WarpWork<32> w(p);
  if (!w.valid) return;
  const int g = w.g, t = w.t, b = w.b, h = w.h, split = w.split, seq_len = w.seq_len;
  const auto& tiles = w.tiles;
  const int f_res = seq_len - seq_len % p.r;  // tokens from here on are in the residual window
  const int nq = tiles.below(f_res);         // quantized steps first, then residual ones

  // Queries (B operand, x scale log2 e): k-step (wi, s) pairs dims (d, d + 1) [reg0] and (d + 2, d + 3).
  uint32_t qh[KW][4][2];
  const int up = t >> 1;     // PAIRED: this lane's tile of a step (its scores' columns)
  const bool col_a = g < 4;  // PAIRED: this lane's B-operand column holds tile 0's probabilities
  {
    const QueryRow qv(p, b, h, PAIRED ? g & 3 : g, D);
#pragma unroll
    for (int wi = 0; wi < KW; ++wi) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int d = S::dim(t * CH + 4 * wi, s);
        qh[wi][s][0] = pack_half2(qv(d), qv(d + 1));
        qh[wi][s][1] = pack_half2(qv(d + 2), qv(d + 3));
      }
    }
  }

  float o[MT][4];
  zero_outputs(o);
  GroupSums<NG> sums;
  Softmax sm;
  float alpha[2];

  // A step's row masks (tokens 2g, 2g + 1 of each tile) and online softmax; rescales the sums.
  auto softmax_step = [&](float (&s)[2][4], int start, bool (&ok)[2][2]) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      ok[u][0] = visible(p, start + 16 * u + 2 * g, seq_len);
      ok[u][1] = visible(p, start + 16 * u + 2 * g + 1, seq_len);
    }
    if (sm.tiles(s, ok, o, alpha)) sums.rescale(alpha);
  };

  // ---- quantized steps: codes of the next step and the next block's channel scales loaded ahead ----
  uint32_t qf[KW][4][2];
  float cblk[2] = {0.f, 0.f};
  Step2<D, GP, BS> tile_a, tile_b;
  const typename Step2<D, GP, BS>::Lane lane(p, h, g, t);
  using KS = KeyScales<D, GP>;
  KS kscale;
  using Step = Step2<D, GP, BS>;
  TileFeed<false, 0, Step::L2N, CS_L2_AHEAD, 32> feed(p, w, [&](int j) { return Step::l2_line(p, h, j); }, nq);
  auto load = [&](Step& x, auto, int blk, int start, Slot) { x.load(p, lane, blk, start & (BS - 1)); };
  // Block column of step j (its block table entry); the channel-scale buffers: the next copy and the next
  // fold alternate between the two, in the order of the blocks.
  auto column = [&](int j) { return tiles.start(j) >> p.bs_shift; };
  CS_DYNAMIC_SMEM(smem);
  uint8_t* const kbuf = smem + (threadIdx.x >> 5) * KS::SMEM_PER_WARP;
  int copy_buf = 0, fold_buf = 0;
  auto kslot = [&](int buf) { return Slot(kbuf + buf * (32 * KS::LANE_BYTES), threadIdx.x & 31); };
  // The queries' B operand waits in shared memory (this lane's share, after the two buffers) and is read
  // by each fold, so its registers are not held through the steps.
  auto q_store = [&] {
    Slot sl = kslot(2);
#pragma unroll
    for (int wi = 0; wi < KW; ++wi)
#pragma unroll
      for (int s2 = 0; s2 < 2; ++s2)
        *reinterpret_cast<uint4*>(sl.take<16>()) =
            make_uint4(qh[wi][2 * s2][0], qh[wi][2 * s2][1], qh[wi][2 * s2 + 1][0], qh[wi][2 * s2 + 1][1]);
  };
  auto q_read = [&](uint32_t (&q)[KW][4][2]) {
    Slot sl = kslot(2);
#pragma unroll
    for (int wi = 0; wi < KW; ++wi)
#pragma unroll
      for (int s2 = 0; s2 < 2; ++s2) read_words<16>(sl.take<16>(), &q[wi][2 * s2][0]);
  };
  q_store();
  int col = -1;
  if (nq > 0) {
    feed.begin(tile_a, load);
    kscale.fetch_all(p, feed.block(0), h, t);
    kscale.fold(qh, qf, cblk);
    col = column(0);
    if (nq > 1 && column(1) != col) {  // step 1's block (nb[0]: block of step 1)
      kscale.template fetch_all<FETCH_ASYNC>(p, feed.nb[0], h, t, kslot(copy_buf));
      copy_buf ^= 1;
    }
    cs_cp_async_commit();
  }
  auto step = [&](Step& cur, Step& nxt, const int i) {
    const int start = tiles.start(i);
    const int col_next = i + 1 < nq ? column(i + 1) : col;
    feed.before(i, nxt, load);
    // Step i + 2's block (nb[1] after before()) when it starts one: its channel scales copied now, folded
    // in step i + 1. One group per step (empty or not), so wait<1> below leaves only this one in flight.
    if (i + 2 < nq && column(i + 2) != col_next) {
      kscale.template fetch_all<FETCH_ASYNC>(p, feed.nb[1], h, t, kslot(copy_buf));
      copy_buf ^= 1;
    }
    cs_cp_async_commit();

    float s[2][4];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      s[u][0] = s[u][2] = cblk[0];
      s[u][1] = s[u][3] = cblk[1];
#pragma unroll
      for (int wi = 0; wi < KW; ++wi) {
#pragma unroll
        for (int sl = 0; sl < 4; ++sl) {
          const uint32_t a = cur.k[u][0].w[wi], c = cur.k[u][1].w[wi], m = slot_mask(sl);
          cs_mma16816(s[u], subnormal_codes(a, m), subnormal_codes(c, m), subnormal_codes(a >> 8, m),
                      subnormal_codes(c >> 8, m), qf[wi][sl][0], qf[wi][sl][1]);
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) s[u][e] *= 1.f / SUBNORMAL;
    }
    if (col_next != col) {  // the next step's block: its queries and constant (this step's are used)
      cs_cp_async_wait<1>();
      kscale.template fetch_all<FETCH_READ>(p, 0, h, t, kslot(fold_buf));
      fold_buf ^= 1;
      uint32_t qr[KW][4][2];
      q_read(qr);
      kscale.fold(qr, qf, cblk);
      col = col_next;
    }
    // O^T += tile u's values times the B operand (pb0, pb1) of group gi.
    auto values = [&](int u, int gi, uint32_t pb0, uint32_t pb1) {
#pragma unroll
      for (int mb = gi * GP / 8; mb < (gi + 1) * GP / 8; ++mb) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const uint32_t x = cur.v[u][mb], m0 = slot_mask(2 * hh), m1 = slot_mask(2 * hh + 1);
          cs_mma16816(o[2 * mb + hh], subnormal_codes(x, m0), subnormal_codes(x, m1), subnormal_codes(x >> 8, m0),
                      subnormal_codes(x >> 8, m1), pb0, pb1);
        }
      }
    };
    if constexpr (PAIRED) {
      float so[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) so[e] = up ? s[1][e] : s[0][e];
      const bool ok0 = visible(p, start + 16 * up + 2 * g, seq_len), ok1 = visible(p, start + 16 * up + 2 * g + 1, seq_len);
      if (sm.tile(so, ok0, ok1, o, alpha)) sums.rescale(alpha);
      Halves<2 * NG> vs, vz;  // this lane's tile's value scales and zero points
#pragma unroll
      for (int k = 0; k < NG; ++k) {
        vs.x.w[k] = up ? cur.vs[1].x.w[k] : cur.vs[0].x.w[k];
        vz.x.w[k] = up ? cur.vz[1].x.w[k] : cur.vz[0].x.w[k];
      }
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
        uint32_t pb0, pb1;
        sums.operand(gi, so, ok0 ? vs[gi] : 0.f, ok1 ? vs[NG + gi] : 0.f, ok0 ? vz[gi] : 0.f, ok1 ? vz[NG + gi] : 0.f,
                     pb0, pb1);
        values(0, gi, col_a ? pb0 : 0u, col_a ? pb1 : 0u);
        values(1, gi, col_a ? 0u : pb0, col_a ? 0u : pb1);
      }
    } else {
      bool ok[2][2];
      softmax_step(s, start, ok);
#pragma unroll
      for (int u = 0; u < 2; ++u) {
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) {
          uint32_t pb0, pb1;
          sums.operand(gi, s[u], ok[u][0] ? cur.vs[u][gi] : 0.f, ok[u][1] ? cur.vs[u][NG + gi] : 0.f,
                       ok[u][0] ? cur.vz[u][gi] : 0.f, ok[u][1] ? cur.vz[u][NG + gi] : 0.f, pb0, pb1);
          values(u, gi, pb0, pb1);
        }
      }
    }
    feed.after(i, nxt, load);
  };
  tile_loop<S::PINGPONG>(nq, tile_a, tile_b, step);
  if constexpr (PAIRED) merge_pair_columns(sm, o, sums);

  // ---- residual steps: fp16 keys and values of the row's window ----
  q_read(qh);
  kivi2_residual<D, GP>(p, w, nq, f_res, qh, sm, o, sums);
  kivi2_store<D, GP>(p, w, sm, o, sums);
}

// kivi2's paired loop fed by bulk copies (cuda_decode.bulk_for: 32- or 64-token blocks, at most 4 query heads per
// KV head, the storage's chunk layout, ref.head_chunks: a block's key codes [BS, D/4], value codes [D/4, BS]
// (token-contiguous), key channel scales and zero points [D] each, value scales and zero points [BS, NG]
// each, of one KV head side by side in one chunk of CH bytes, in ref.CHUNK_PARTS order). At 32-token
// blocks a step is one block: lane 0 copies its chunk with one cp.async.bulk into a ring of CS_BULK_STAGES chunks in the warp's
// shared memory, CS_BULK_STAGES steps ahead, and the lanes read their operands from the ring where they are
// used: no per-lane addresses, nothing in flight holding registers or L1, no cp.async of the channel
// scales two steps ahead (decode2_kernel's KeyScales), and 4 blocks (16 warps) per SM. H200, batch 32 /
// 32k (docs/benchmarks.md, seventeenth session): 332 -> 248 us; main loop 707 -> 523 instructions per step.
// A loop iteration takes CS_KIVI2_PER steps (one stage of the ring, one copy each): their scores, one
// softmax step over all of them, then their values, so the steps' independent products interleave and
// the softmax's reductions, votes and branches are paid once per iteration. Two steps need 168 registers
// (3 blocks, 12 warps per SM; 16 warps would not fit their ring in shared memory). H200, batch 32 / 32k
// (nineteenth session): 243 -> 231 us; main loop 522 instructions per 32 tokens -> 896 per 64 (887, and
// 230 to 232 us, with the value operands read before the softmax step and P' formed in fp16).
// 64-token blocks (BS 64: kivi2's key groups of 64 tokens, --kv-block-size 64): a chunk is one block
// and one iteration, its two 32-token steps sharing the block's fold and constant: 793 instructions per
// 64 tokens instead of 854, and 9% fewer bytes. H200, batch 32 / 32k (twentieth session): 224 -> 207 us.
// Tokens: tile u of a step holds tokens 8 t' + 4 u + 0..3 (t' = 0..3), so that a lane's value words of
// both tiles (byte 8 mb + g of tokens 8t .. 8t + 7) are one 8-byte read: row g of tile u is token
// 8 (g >> 1) + 4 u + 2 (g & 1), row g + 8 the token after it (the value product's k order, as decode2_kernel's
// k = 2t + j <-> the word's byte 2j).
// The fold reads the block's channel scales in dim order: the queries wait in shared memory in dim order,
// unscaled (for the block's constant sum_d q_d kz_d, products with the zero points as A rows alike) and
// divided by 4^s (for B = q ks / 4^s: multiplied in dim order, whose pairs (d, d + 1), (d + 2, d + 3) are
// the A operand's, Kivi2Shape::dim).
#ifndef CS_KIVI2_PER
#define CS_KIVI2_PER 2
#endif
static_assert(CS_KIVI2_PER == 1 || CS_KIVI2_PER == 2, "CS_KIVI2_PER: 1 or 2 steps per iteration");
template <int D, int GP, int BS> struct Bulk2 {
  using S = Kivi2Shape<D, GP>;
  static_assert(BS == 32 || BS == 64, "kivi2's bulk loop: 32- or 64-token blocks");
  static constexpr int NG = S::NG, STAGES = CS_BULK_STAGES;
  static constexpr int SUB = BS / 32;  // 32-token steps of a block (chunk): one fold and block constant
  static constexpr int PER = BS == 32 ? CS_KIVI2_PER : 1;  // chunks per loop iteration, one stage of the ring
  static constexpr int STEPS = PER * SUB;  // 32-token steps per iteration
  // the chunk's parts (bytes from its start), in ref.CHUNK_PARTS order
  static constexpr int VO = BS * D / 4, KSO = 2 * VO, KZO = KSO + 2 * D, VSO = KZO + 2 * D, VZO = VSO + 2 * BS * NG,
                       CH = VZO + 2 * BS * NG;
  static_assert(CH % 16 == 0, "bulk copies move multiples of 16 bytes");
  static constexpr int QW = 8 * S::KW;              // bytes of one slot's query words (dims dim(t CH, s) ..)
  static constexpr int RING = STAGES * PER * CH, QO = RING, QB = 2 * 4 * QW * 32;  // ring, then the queries
  static constexpr int SMEM_PER_WARP = (QO + QB + 8 * STAGES + 127) / 128 * 128;  // then the barriers
  static constexpr int MIN_BLOCKS = STEPS == 1 ? 4 : 3;
  // The unscaled query words of a slot wait in shared memory with words 1 and 2 of each four swapped,
  // so that one 16-byte read gives the B operands (q0, q2) and (q1, q3) of the block constant's products
  // (decode2_bulk_kernel). QPERM(i): where word i is kept (its own inverse).
  static constexpr bool QSWAP = (2 * S::KW) % 4 == 0;
  static __device__ __forceinline__ constexpr int QPERM(int i) { return QSWAP ? swap12(i) : i; }
};

template <int D, int GP, int BS>
__global__ void __launch_bounds__(128, Bulk2<D, GP, BS>::MIN_BLOCKS) decode2_bulk_kernel(const DecodeParams p) {
  using S = Kivi2Shape<D, GP>;
  using B = Bulk2<D, GP, BS>;
  constexpr int NG = S::NG, CH = S::CH, KW = S::KW, MB = S::MB, MT = S::MT, SS = B::STAGES, PER = B::PER,
                SUB = B::SUB, STEPS = B::STEPS;
  CS_DYNAMIC_SMEM(smem);
  const WarpWork<BS> w(p);  // steps of a block
  uint8_t* ring = smem + (threadIdx.x >> 5) * B::SMEM_PER_WARP;
  uint64_t* bars = reinterpret_cast<uint64_t*>(ring + B::QO + B::QB);
  if (!w.valid) return;
  const int g = w.g, t = w.t, h = w.h, seq_len = w.seq_len;
  const auto& tiles = w.tiles;
  const int f_res = seq_len - seq_len % p.r;  // tokens from here on are in the residual window
  const int nq = tiles.below(f_res);         // quantized blocks
  const int up = t >> 1;                     // this lane's tile of a step (its scores' columns)
  const bool col_a = g < 4;                  // this lane's B-operand column holds tile 0's probabilities

  // The queries (x scale log2 e) at dims dim(t CH, s) + 0 .. CH - 1 of each slot s, fp16 pairs in dim order:
  // slot s's words at qslot(s) (unscaled) and qslot(4 + s) (/ 4^s).
  auto qslot = [&](int i) { return ring + B::QO + (i * 32 + (threadIdx.x & 31)) * B::QW; };
  {
    const QueryRow qv(p, w.b, h, g & 3, D);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int d0 = S::dim(t * CH, s);
      uint32_t x[2 * KW], y[2 * KW];
#pragma unroll
      for (int i = 0; i < 2 * KW; ++i) {
        x[i] = pack_half2(qv(d0 + 2 * i), qv(d0 + 2 * i + 1));
        y[i] = pack_half2(qv(d0 + 2 * i) * (1.f / slot_factor(s)), qv(d0 + 2 * i + 1) * (1.f / slot_factor(s)));
      }
#pragma unroll
      for (int i = 0; i < 2 * KW; ++i) {
        reinterpret_cast<uint32_t*>(qslot(s))[B::QPERM(i)] = x[i];
        reinterpret_cast<uint32_t*>(qslot(4 + s))[i] = y[i];
      }
    }
  }

  float o[MT][4];
  zero_outputs(o);
  GroupSums<NG> sums;
  Softmax sm;

  const int iters = (nq + PER - 1) / PER;
  const uint8_t* head = p.k + int64_t(h) * p.k_sh;  // chunk (block 0, head h)
  if (cs_bulk_leader()) {
#pragma unroll
    for (int s = 0; s < SS; ++s) cs_bulk_init(bars + s);
    cs_bulk_init_fence();
  }
  __syncwarp();
  // blocks past nq: block 0's chunk, copied and never used (their rows are masked)
  TileBlocks<BS> blocks(p, w, nq);
  auto issue = [&](int k) {  // iteration k's PER chunks into stage k % SS (every lane: the blocks' shuffles)
    int blk[PER];
    blocks.get(p, w, nq, PER * k, blk);
    if (!cs_bulk_leader()) return;
    uint8_t* st = ring + (k % SS) * PER * B::CH;
    cs_bulk_expect(bars + k % SS, PER * B::CH);
#pragma unroll
    for (int x = 0; x < PER; ++x) cs_bulk_copy(st + x * B::CH, head + int64_t(blk[x]) * p.k_sb, B::CH, bars + k % SS);
  };
  for (int k = 0; k < min(SS, iters); ++k) issue(k);
  const int row0 = 8 * (g >> 1) + 2 * (g & 1);  // this lane's rows g / g + 8 of tile u: tokens row0 + 4u (+ 1)
  const int own = row0 + 4 * up;                 // ... of its own tile

  // A chunk's scores of this lane's tile (x log2 e) into so[x0 + x], x < SUB: the block's key operand
  // qf = q ks / 4^s (k-step (wi, s): pairs (d, d + 1), (d + 2, d + 3)) and constant per column 2t + j,
  // cb[j] = sum_d q_d kz_d, then the key products of both tiles of each of its SUB steps.
  auto scores = [&](const uint8_t* st, float (&so)[STEPS][4], int x0) {
    uint32_t qf[KW][4][2];
    // The block constant: rows g of cb and rows g + 8 of cb8 (the other rows are not read).
    float cb[4] = {-0.f, -0.f, -0.f, -0.f}, cb8[4] = {-0.f, -0.f, -0.f, -0.f};
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int d0 = S::dim(t * CH, s);
      uint32_t q[2 * KW], q4[2 * KW], sc[2 * KW], zp[2 * KW];
      read_words<B::QW>(qslot(s), q);  // words 1 and 2 of each four swapped (QPERM)
      read_words<B::QW>(qslot(4 + s), q4);
      read_words<B::QW>(st + B::KSO + 2 * d0, sc);
      read_words<B::QW>(st + B::KZO + 2 * d0, zp);
#pragma unroll
      for (int wi = 0; wi < KW; ++wi) {
        qf[wi][s][0] = hmul2_bits(q4[2 * wi], sc[2 * wi]);  // dims (d, d + 1)
        qf[wi][s][1] = hmul2_bits(q4[2 * wi + 1], sc[2 * wi + 1]);  // (d + 2, d + 3)
      }
      if constexpr (B::QSWAP) {
        // The zero points' words z0..z3 are A as read: rows g take z0, z2 (B = q0, q2 into cb), rows g + 8
        // take z1, z3 (B = q1, q3 into cb8): no copies into operand registers.
#pragma unroll
        for (int j = 0; j < 2 * KW; j += 4) {
          cs_mma16816(cb, zp[j], zp[j + 1], zp[j + 2], zp[j + 3], q[j], q[j + 1]);
          cs_mma16816(cb8, zp[j], zp[j + 1], zp[j + 2], zp[j + 3], q[j + 2], q[j + 3]);
        }
      } else {
#pragma unroll
        for (int wi = 0; wi < KW; ++wi)  // rows g + 8 of A are not read: left undefined
          cs_mma16816(cb, zp[2 * wi], cs_undefined(), zp[2 * wi + 1], cs_undefined(), q[2 * wi], q[2 * wi + 1]);
      }
    }
    if constexpr (B::QSWAP) {
      cb[0] += cb8[2];
      cb[1] += cb8[3];
    }
    // Key products of both tiles of step x (x 2^-24): rows g / g + 8 are tokens 32 x + row0 + 4u / + 1,
    // bytes [t CH, (t + 1) CH).
#pragma unroll
    for (int x = 0; x < SUB; ++x) {
      float s2[2][4];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        uint32_t ka[KW], kb[KW];
        read_words<CH>(st + (32 * x + row0 + 4 * u) * (D / 4) + t * CH, ka);
        read_words<CH>(st + (32 * x + row0 + 4 * u + 1) * (D / 4) + t * CH, kb);
        s2[u][0] = s2[u][1] = s2[u][2] = s2[u][3] = -0.f;
#pragma unroll
        for (int wi = 0; wi < KW; ++wi) {
#pragma unroll
          for (int sl = 0; sl < 4; ++sl) {
            const uint32_t m = slot_mask(sl);
            cs_mma16816(s2[u], subnormal_codes(ka[wi], m), subnormal_codes(kb[wi], m),
                        subnormal_codes(ka[wi] >> 8, m), subnormal_codes(kb[wi] >> 8, m), qf[wi][sl][0],
                        qf[wi][sl][1]);
          }
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) so[x0 + x][e] = fmaf(up ? s2[1][e] : s2[0][e], 1.f / SUBNORMAL, cb[e & 1]);
    }
  };

  // Step x's value operands in a chunk: this lane's tile's rows' value scales and zero points (tokens
  // 32 x + own, + 1), and byte 8 mb + g of tokens 32 x + 8t .. + 3 (tile 0) and 32 x + 8t + 4 .. + 7 (tile 1).
  struct ValueOps {
    Halves<2 * NG> vs, vz;
    uint32_t v[MB][2];
  };
  auto value_ops = [&](const uint8_t* st, int x, ValueOps& vo) {
    read_words<4 * NG>(st + B::VSO + 2 * NG * (32 * x + own), vo.vs.x.w);
    read_words<4 * NG>(st + B::VZO + 2 * NG * (32 * x + own), vo.vz.x.w);
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) read_words<8>(st + B::VO + (8 * mb + g) * BS + 32 * x + 8 * t, vo.v[mb]);
  };
  // A chunk's values times the probabilities so of this lane's tile (rows masked by ok0 / ok1).
  auto values = [&](const ValueOps& x, const float (&so)[4], bool ok0, bool ok1) {
    const auto& vs = x.vs;
    const auto& vz = x.vz;
    const auto& v = x.v;
    // P' = p vs in fp16 arithmetic: p rounded to fp16 once per chunk, each group's scale pair broadcast
    const uint32_t p01 = pack_half2(so[0], so[1]), p23 = pack_half2(so[2], so[3]);
    const uint32_t m0 = ok0 ? ~0u : 0u, m1 = ok1 ? ~0u : 0u;  // masked rows: scale 0
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      uint32_t pb0, pb1;
      sums.operand_h(gi, so, p01, p23, __byte_perm(vs.x.w[gi >> 1] & m0, 0, (gi & 1) ? 0x3232 : 0x1010),
                     __byte_perm(vs.x.w[(NG + gi) >> 1] & m1, 0, ((NG + gi) & 1) ? 0x3232 : 0x1010),
                     ok0 ? vz[gi] : 0.f, ok1 ? vz[NG + gi] : 0.f, pb0, pb1);
#pragma unroll
      for (int u = 0; u < 2; ++u) {  // tile u's values times the columns of its probabilities
        const uint32_t b0 = (u == 0) == col_a ? pb0 : 0u, b1 = (u == 0) == col_a ? pb1 : 0u;
#pragma unroll
        for (int mb = gi * GP / 8; mb < (gi + 1) * GP / 8; ++mb) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const uint32_t x = v[mb][u], m0 = slot_mask(2 * hh), m1 = slot_mask(2 * hh + 1);
            cs_mma16816(o[2 * mb + hh], subnormal_codes(x, m0), subnormal_codes(x, m1), subnormal_codes(x >> 8, m0),
                        subnormal_codes(x >> 8, m1), b0, b1);
          }
        }
      }
    }
  };

  for (int k = 0; k < iters; ++k) {
    cs_bulk_wait(bars + k % SS, (k / SS) & 1);
    const uint8_t* st = ring + (k % SS) * PER * B::CH;
    float so[STEPS][4];  // this lane's tile's scores, per 32-token step (SUB per chunk)
    bool ok[STEPS][2];
#pragma unroll
    for (int c = 0; c < PER; ++c) scores(st + c * B::CH, so, c * SUB);
#pragma unroll
    for (int x = 0; x < STEPS; ++x) {
      const int i = PER * k + x / SUB, start = tiles.start(i) + 32 * (x % SUB);
      ok[x][0] = (PER == 1 || i < nq) & visible_flat(p, start + own, seq_len);
      ok[x][1] = (PER == 1 || i < nq) & visible_flat(p, start + own + 1, seq_len);
    }
    ValueOps vx[STEPS];  // read before the softmax step: their latency overlaps it
#pragma unroll
    for (int x = 0; x < STEPS; ++x) value_ops(st + (x / SUB) * B::CH, x % SUB, vx[x]);
    float alpha[2];
    if (sm.tiles(so, ok, o, alpha)) sums.rescale(alpha);
#pragma unroll
    for (int x = 0; x < STEPS; ++x) values(vx[x], so[x], ok[x][0], ok[x][1]);
    __syncwarp();  // every lane is done with the stage before it is refilled
    if (k + SS < iters) issue(k + SS);
  }
  merge_pair_columns(sm, o, sums);

  // ---- residual steps: fp16 keys and values of the row's window, the queries paired as decode2_kernel's ----
  uint32_t qh[KW][4][2];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    uint32_t q[2 * KW];
    read_words<B::QW>(qslot(s), q);
#pragma unroll
    for (int wi = 0; wi < KW; ++wi) {
      qh[wi][s][0] = q[B::QPERM(2 * wi)];
      qh[wi][s][1] = q[B::QPERM(2 * wi + 1)];
    }
  }
  if constexpr (BS == 32) {
    kivi2_residual<D, GP>(p, w, nq, f_res, qh, sm, o, sums);
  } else {  // the residual loop's 32-token steps
    const WarpWork<32> w32(p);
    kivi2_residual<D, GP>(p, w32, w32.tiles.below(f_res), f_res, qh, sm, o, sums);
  }
  kivi2_store<D, GP>(p, w, sm, o, sums);
}

// ------------------------------------------------------------------------------------------------


using KernelFn = void (*)(DecodeParams);

// A kernel and its dynamic shared memory per warp (staged variants).
struct Variant {
  KernelFn fn = nullptr;
  int smem_per_warp = 0;
};
template <class Tile, bool ST> Variant variant(KernelFn fn) { return {fn, ST ? CS_STAGES * 32 * Tile::LANE_BYTES : 0}; }

template <int BS, bool PAIRED> Variant select_kivi2(int d, int group) {
  if (d == 128) {
    return {group == 32 ? decode2_kernel<128, 8, BS, PAIRED> : group == 64 ? decode2_kernel<128, 16, BS, PAIRED>
          : group == 128 ? decode2_kernel<128, 32, BS, PAIRED> : nullptr, KeyScales<128, 8>::SMEM_PER_WARP};
  }
  if (d == 64) {
    return {group == 32 ? decode2_kernel<64, 8, BS, PAIRED> : group == 64 ? decode2_kernel<64, 16, BS, PAIRED> : nullptr,
            KeyScales<64, 8>::SMEM_PER_WARP};
  }
  return {};
}

// int4's paired loop fed by bulk copies (16-token chunks): groups of 64 (GP 32) and of 32 (GP 16, which
// has no register paired loop: cuda_decode.BULK_PAIRED_GROUPS; 128 registers, H200, batch 32 / 32k:
// 380 -> 323 us against its one-tile loop, twentieth session).
template <int D, int GP> Variant int4_bulk() { return {decode4_bulk_kernel<D, GP>, Bulk4<D, GP>::SMEM_PER_WARP}; }
Variant select_int4_bulk(int d, int group) {
  if (d == 128) return group == 64 ? int4_bulk<128, 32>() : group == 32 ? int4_bulk<128, 16>() : Variant();
  if (d == 64) return group == 64 ? int4_bulk<64, 32>() : group == 32 ? int4_bulk<64, 16>() : Variant();
  return {};
}

template <int D, int GP, int BS> Variant kivi2_bulk() {
  return {decode2_bulk_kernel<D, GP, BS>, Bulk2<D, GP, BS>::SMEM_PER_WARP};
}
template <int BS> Variant select_kivi2_bulk(int d, int group) {
  if (d == 128) return group == 32 ? kivi2_bulk<128, 8, BS>() : group == 64 ? kivi2_bulk<128, 16, BS>()
                     : group == 128 ? kivi2_bulk<128, 32, BS>() : Variant();
  if (d == 64) return group == 32 ? kivi2_bulk<64, 8, BS>() : group == 64 ? kivi2_bulk<64, 16, BS>() : Variant();
  return {};
}

// kind: 1 fp8, 2 int8, 3 int4, 4 kivi2; d: 64 or 128; group: int4's (32, 64) or kivi2's (32 to 128);
// bs: tokens per block, a template parameter of the packed formats (their token-contiguous value codes
// are then read at constant offsets): int4 16, 32, 64; kivi2 32, 64. ST: the variant that stages tiles
// through shared memory (DecodeParams::staged; kivi2 has none and ignores it).
template <bool ST, int BS> Variant select_packed(int kind, int d, int group, int paired) {
#if !defined(CS_LOADS_ONLY) && !defined(CS_COMPUTE_ONLY)  // the diagnostics time the register loop
  if constexpr (BS == 16 && !ST) {
    if (kind == 3 && paired == 2) return select_int4_bulk(d, group);
  }
#endif
  if (kind == 3 && paired && !ST && group == 64) {  // groups of 32: the register loop spills (slower)
    if (d == 128) return {decode4_pair_kernel<128, 32, BS>, 0};
    if (d == 64) return {decode4_pair_kernel<64, 32, BS>, 0};
    return {};
  }
  if (kind == 3) {
    if (d == 128 && group == 64) return variant<Tile4<128, 32, BS>, ST>(decode4_kernel<128, 32, ST, BS>);
    if (d == 128 && group == 32) return variant<Tile4<128, 16, BS>, ST>(decode4_kernel<128, 16, ST, BS>);
    if (d == 64 && group == 64) return variant<Tile4<64, 32, BS>, ST>(decode4_kernel<64, 32, ST, BS>);
    if (d == 64 && group == 32) return variant<Tile4<64, 16, BS>, ST>(decode4_kernel<64, 16, ST, BS>);
    return {};
  }
  if constexpr (BS >= 32 && !ST) {
    if (kind != 4) return {};
#if !defined(CS_LOADS_ONLY) && !defined(CS_COMPUTE_ONLY)  // the diagnostics time the register loop
    if (paired == 2) return select_kivi2_bulk<BS>(d, group);
#endif
    if (paired) return select_kivi2<BS, true>(d, group);
    return select_kivi2<BS, false>(d, group);
  }
  if constexpr (ST) {
    if (kind == 4) return select_packed<false, BS>(kind, d, group, paired);
  }
  return {};
}

template <bool ST> Variant select_variant(int kind, int d, int group, int bs, int paired) {
  if (kind == 1 || kind == 2) {
    if (d == 128) return variant<Tile8<128>, ST>(kind == 1 ? decode8_kernel<128, 1, ST> : decode8_kernel<128, 2, ST>);
    if (d == 64) return variant<Tile8<64>, ST>(kind == 1 ? decode8_kernel<64, 1, ST> : decode8_kernel<64, 2, ST>);
    return {};
  }
  switch (bs) {
    case 16: return select_packed<ST, 16>(kind, d, group, paired);
    case 32: return select_packed<ST, 32>(kind, d, group, paired);
    case 64: return select_packed<ST, 64>(kind, d, group, paired);
    default: return {};
  }
}

// paired: the paired loop where it exists (int4 with groups of 64, or of 32 fed by bulk copies, kivi2;
// direct) and serves (G <= PAIR_MAX_G; DecodeParams::paired, cuda_decode.paired_for).
constexpr int PAIR_MAX_G = 4;
Variant select(int kind, int d, int group, int bs, int staged, int paired) {
  return staged ? select_variant<true>(kind, d, group, bs, false) : select_variant<false>(kind, d, group, bs, paired);
}

#ifdef CS_EMULATE
int launch(const Variant& k, const DecodeParams& p, int warps, void*) {
  bool diverged = false;
  cs_emu::launch(k.fn, p, (p.items + warps - 1) / warps, warps, diverged);
  return diverged ? -1 : 0;  // -1: lanes of a warp left a collective out
}
#else
// Dynamic shared memory above the default 48 KiB must be allowed per kernel (once per call: cheap, and
// not a stream operation, so CUDA-graph capture is unaffected).
int allow_smem(const Variant& k, int warps) {
  const int bytes = k.smem_per_warp * warps;
  return bytes > 48 * 1024 ? int(cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)) : 0;
}

int launch(const Variant& k, const DecodeParams& p, int warps, void* stream) {
  if (int err = allow_smem(k, warps)) return err;
  k.fn<<<(p.items + warps - 1) / warps, 32 * warps, k.smem_per_warp * warps, static_cast<cudaStream_t>(stream)>>>(p);
  return int(cudaGetLastError());
}
#endif

constexpr int kInvalidValue = 1;  // cudaErrorInvalidValue

}  // namespace

// Launches the kernel of (kind, d, group) on `stream`. Returns a cudaError_t (0: launched).
extern "C" int cs_decode(const DecodeParams* p, int kind, int d, int group, int rows, int warps, int device,
                         void* stream) {
#ifndef CS_EMULATE
  if (int err = int(cudaSetDevice(device))) return err;
#endif
  if (!p || p->items != rows * p->hkv * p->splits) return kInvalidValue;
  if (p->paired && p->g > PAIR_MAX_G) return kInvalidValue;
  const Variant k = select(kind, d, group, p->bs, p->staged, p->paired);
  if (!k.fn) return kInvalidValue;
  return launch(k, *p, warps, stream);
}

// Resident blocks of `warps` warps per SM (the CUDA occupancy calculator; emulated: 3).
extern "C" int cs_decode_occupancy(int kind, int d, int group, int bs, int staged, int paired, int warps, int device,
                                   int* blocks) {
  const Variant k = select(kind, d, group, bs, staged, paired);
  if (!k.fn) return kInvalidValue;
#ifdef CS_EMULATE
  *blocks = 3;
  return 0;
#else
  if (int err = int(cudaSetDevice(device))) return err;
  if (int err = allow_smem(k, warps)) return err;
  return int(cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, k.fn, 32 * warps, k.smem_per_warp * warps));
#endif
}

extern "C" int cs_decode_params_size() { return int(sizeof(DecodeParams)); }

#if defined(CS_TIMELINE) && !defined(CS_EMULATE)
// The first n work items' (start ns, end ns, SM) of the last launch (CS_TIMELINE builds only).
extern "C" int cs_timeline_read(void* dst, int n) {
  if (n < 0 || n > TIMELINE_ITEMS) return kInvalidValue;
  return int(cudaMemcpyFromSymbol(dst, cs_timeline, size_t(n) * sizeof(cs_timeline[0])));
}
#endif
