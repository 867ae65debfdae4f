// CPU emulation of the warp-level CUDA that paged_decode.cu uses, so that the kernels' own source runs
// without a GPU (cuda_decode.build_emulated; tests/kernels/test_cuda_decode_emulated.py). Compiled by a
// host C++20 compiler with -DCS_EMULATE; cuda_fp16.h supplies the host half-precision arithmetic.
//
// Each lane of a warp is a std::thread. A warp collective (shuffle, vote, mma.sync, movmatrix) publishes
// the lane's operands and a tag naming the collective, waits for the 32 lanes at a barrier, computes
// the lane's result from every lane's operands, and waits again before the slots are reused. Lanes in
// different collectives, or a collective after some lanes returned, are recorded as divergence (on the
// GPU that is undefined behaviour) and reported by the launcher. Fragment layouts follow the PTX ISA
// (mma.m16n8k16 .f16 A/B/C fragments, movmatrix.m8n8.trans.b16); cvt.rn.f16x2.e4m3x2 converts the low
// byte into the low half.
#pragma once

#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

using std::max;
using std::min;

#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)

struct CsEmuIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local CsEmuIndex threadIdx, blockIdx, blockDim;

namespace cs_emu {

struct Warp {
  std::barrier<> bar{32};
  uint32_t slot[32][8];
  int tag[32];
  std::atomic<int> exited{0};
  std::atomic<bool> diverged{false};
};

inline thread_local Warp* warp = nullptr;
inline thread_local int lane = 0;

// Publishes n words and a tag, waits for the warp; returns every lane's words (valid until release()).
inline const uint32_t (*publish(int tag, const uint32_t* words, int n))[8] {
  Warp& w = *warp;
  std::memcpy(w.slot[lane], words, 4 * n);
  w.tag[lane] = tag;
  w.bar.arrive_and_wait();
  if (w.exited.load() != 0) w.diverged = true;
  for (int l = 0; l < 32; ++l)
    if (w.tag[l] != tag) w.diverged = true;
  return w.slot;
}

inline void release() { warp->bar.arrive_and_wait(); }

inline uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

inline float half_bits(uint32_t x) { return __half2float(__ushort_as_half(uint16_t(x & 0xffff))); }

template <class T> T shfl(int tag, T x, int (*src)(int, int), int arg) {
  static_assert(sizeof(T) == 4);
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const auto all = publish(tag, &u, 1);
  u = all[src(lane, arg) & 31][0];
  release();
  std::memcpy(&x, &u, 4);
  return x;
}

// Element (row, k) of the m16n8k16 A operand, from the 4 registers each lane published.
inline float frag_a(const uint32_t (*all)[8], int row, int k) {
  const int l = 4 * (row & 7) + ((k & 7) >> 1);
  const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
  return half_bits(all[l][reg] >> (16 * (k & 1)));
}

// Element (k, col) of the B operand (registers 4 and 5 of each lane).
inline float frag_b(const uint32_t (*all)[8], int k, int col) {
  const int l = 4 * col + ((k & 7) >> 1);
  return half_bits(all[l][4 + (k >= 8)] >> (16 * (k & 1)));
}

inline float e4m3(uint32_t b) {  // fp8 e4m3fn: bias 7, no infinities, S.1111.111 is NaN
  const int e = (b >> 3) & 15, m = b & 7;
  const float mag = (e == 15 && m == 7) ? NAN : e == 0 ? std::ldexp(m / 8.f, -6) : std::ldexp(1.f + m / 8.f, e - 7);
  return (b & 0x80) ? -mag : mag;
}

template <class Kernel, class Params>
void launch(Kernel kernel, const Params& p, int blocks, int warps, bool& diverged) {  // a 1-D grid
  for (int bx = 0; bx < blocks; ++bx) {
    for (int wi = 0; wi < warps; ++wi) {
      auto w = std::make_unique<Warp>();
      std::vector<std::thread> lanes;
      for (int l = 0; l < 32; ++l) {
        lanes.emplace_back([&, l] {
          warp = w.get();
          lane = l;
          threadIdx = {unsigned(32 * wi + l), 0, 0};
          blockIdx = {unsigned(bx), 0, 0};
          blockDim = {unsigned(32 * warps), 1, 1};
          kernel(p);
          w->exited++;
          w->bar.arrive_and_drop();
        });
      }
      for (auto& t : lanes) t.join();
      diverged = diverged || w->diverged;
    }
  }
}

}  // namespace cs_emu

// ---- the CUDA builtins the kernels use ----

template <class T> inline T __ldg(const T* p) { return *p; }

inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t xy = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((xy >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}

inline float __int_as_float(int x) { return cs_emu::from_bits(uint32_t(x)); }
inline float __uint_as_float(uint32_t x) { return cs_emu::from_bits(x); }
inline uint32_t __float_as_uint(float x) { return cs_emu::bits(x); }

template <class T> inline T __shfl_xor_sync(unsigned, T x, int mask) {
  return cs_emu::shfl(1, x, [](int l, int m) { return l ^ m; }, mask);
}

template <class T> inline T __shfl_sync(unsigned, T x, int src) {
  return cs_emu::shfl(2, x, [](int, int s) { return s; }, src);
}

inline bool __any_sync(unsigned, bool pred) {
  const uint32_t u = pred;
  const auto all = cs_emu::publish(3, &u, 1);
  bool any = false;
  for (int l = 0; l < 32; ++l) any = any || all[l][0];
  cs_emu::release();
  return any;
}

// ---- the PTX of paged_decode.cu ----

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, accumulating into c.
inline void cs_mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  const auto all = cs_emu::publish(4, mine, 6);
  const int g = cs_emu::lane >> 2, t = cs_emu::lane & 3;
  float r[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double acc = 0.0;
    for (int k = 0; k < 16; ++k) acc += double(cs_emu::frag_a(all, row, k)) * cs_emu::frag_b(all, k, col);
    r[i] = float(double(c[i]) + acc);
  }
  cs_emu::release();
  for (int i = 0; i < 4; ++i) c[i] = r[i];
}

// movmatrix.sync.aligned.m8n8.trans.b16: lane 4 r + c/2 holds elements (r, c), (r, c + 1).
inline uint32_t cs_transpose8x8(uint32_t x) {
  const auto all = cs_emu::publish(5, &x, 1);
  const int g = cs_emu::lane >> 2, t = cs_emu::lane & 3;
  uint32_t y = 0;
  for (int h = 0; h < 2; ++h) {  // (g, 2t + h) of the transpose = (2t + h, g)
    const int r = 2 * t + h, c = g;
    y |= ((all[4 * r + (c >> 1)][0] >> (16 * (c & 1))) & 0xffffu) << (16 * h);
  }
  cs_emu::release();
  return y;
}

inline float cs_exp2(float x) { return std::exp2(x); }

inline uint32_t cs_and_xor(uint32_t a, uint32_t b, uint32_t c) { return (a & b) ^ c; }

// cp.async: copies are queued per lane and done at the cp.async.wait_group that covers their group (the
// latest moment the PTX allows), so a read of a stage before its wait sees stale bytes.
namespace cs_emu {
struct Copy {
  void* dst;
  const void* src;
  int n;
};
inline thread_local std::vector<std::vector<Copy>> cp_groups;  // committed, oldest first
inline thread_local std::vector<Copy> cp_open;
}  // namespace cs_emu

inline void cs_check(bool ok) {
  if (!ok) {
    std::fprintf(stderr, "paged_decode.cu: cs_check failed\n");
    std::abort();
  }
}

template <int N> inline void cs_cp_async(void* smem, const void* src) {
  cs_check(reinterpret_cast<uintptr_t>(smem) % N == 0 && reinterpret_cast<uintptr_t>(src) % N == 0);
  cs_emu::cp_open.push_back({smem, src, N});
}
inline void cs_cp_async_commit() {
  cs_emu::cp_groups.push_back(std::move(cs_emu::cp_open));
  cs_emu::cp_open.clear();
}
template <int N> inline void cs_cp_async_wait() {
  while (cs_emu::cp_groups.size() > size_t(N)) {
    for (const auto& c : cs_emu::cp_groups.front()) std::memcpy(c.dst, c.src, c.n);
    cs_emu::cp_groups.erase(cs_emu::cp_groups.begin());
  }
}

inline void cs_prefetch_l2(const void*) {}

// __syncwarp: a collective of its own (every lane must reach it).
inline void __syncwarp(unsigned = 0xffffffffu) {
  const uint32_t none = 0;
  cs_emu::publish(6, &none, 1);
  cs_emu::release();
}

// cp.async.bulk + mbarrier (decode4_bulk_kernel): shared memory is per lane here, so every lane is a
// leader and copies the run into its own at issue (the kernel refills a stage only after __syncwarp, when
// every lane has read it); the barrier's wait has nothing left to wait for.
inline bool cs_bulk_leader() { return true; }
inline void cs_bulk_init(uint64_t*) {}
inline void cs_bulk_init_fence() {}
inline void cs_bulk_expect(uint64_t*, uint32_t) {}
inline void cs_bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t*) {
  cs_check(reinterpret_cast<uintptr_t>(dst) % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 && bytes % 16 == 0);
  std::memcpy(dst, src, bytes);
}
inline void cs_bulk_wait(uint64_t*, int) {}
inline uint32_t cs_undefined() { return 0x7E007E00u; }  // NaN halves: a row that is read would show it

// cvt.rn.f16x2.e4m3x2 of the 16-bit x: low byte -> low half.
inline uint32_t cs_e4m3x2_to_f16x2(uint32_t x) {
  const __half2 h = __floats2half2_rn(cs_emu::e4m3(x & 0xff), cs_emu::e4m3((x >> 8) & 0xff));
  uint32_t r;
  std::memcpy(&r, &h, 4);
  return r;
}
inline uint32_t cs_e4m3x2_hi_to_f16x2(uint32_t x) { return cs_e4m3x2_to_f16x2(x >> 16); }
