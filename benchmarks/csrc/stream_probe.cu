// Streaming probe for the paged decode kernels (benchmarks/stream_probe.py): how fast can warps read
// the fp8 paged layout [N, BS=16, Hkv, D=128] tile by tile (16 tokens of one KV head: 16 key rows and
// 16 value rows of 128 bytes, 1 KB apart), with `work` dependent FMAs per tile standing in for the
// decode arithmetic? Two ways to load a tile, work items (row, KV head, split) as in paged_decode.cu:
//   mode 0: each lane loads its 128 bytes of the tile into registers one tile ahead (the direct kernel);
//   mode 2: mode 0 plus per-token scales [N, 16, Hkv] fp16 as the kernel loads them (4 per lane);
//   mode 3: mode 0 plus the scales loaded once per tile (lanes 0-15 keys', 16-31 values') and shuffled;
//   mode 1: lane 0 copies the tile by TMA (two 4-D boxes [128 B, 1 head, 16 tokens, 1 block]) into a
//           ring of STAGES shared-memory stages per warp, completion on an mbarrier; lanes read their
//           128 bytes back from the stage.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <stdint.h>

#ifndef STAGES
#define STAGES 4
#endif

struct Probe {
  const uint8_t* k;
  const uint8_t* v;
  const int32_t* bt;  // [B, M]
  const uint16_t* ks;  // scales [N, 16, Hkv] (modes 2, 3)
  const uint16_t* vs;
  uint32_t* out;      // one word per warp
  int hkv, m, splits, tiles_per_split, items, work;
  int hnd;  // 1: codes [N, Hkv, 16, D] (a head's tokens contiguous in a block), else [N, 16, Hkv, D]
  int sector;  // 1: each key load instruction covers whole 32-byte sectors (probe_direct's load)
};

struct Maps {
  CUtensorMap k, v;
};

namespace {

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" : : "r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" : : "r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n .reg .pred P;\n WAIT:\n mbarrier.try_wait.parity.shared.b64 P, [%0], %1;\n @!P bra WAIT;\n}"
      : : "r"(smem_addr(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void tma_load4(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];"
      : : "r"(smem_addr(dst)), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ uint32_t fold(uint4 x) { return x.x ^ x.y ^ x.z ^ x.w; }

__device__ __forceinline__ float spin(float acc, int work) {
  for (int i = 0; i < work; ++i) acc = fmaf(acc, 0.999f, 1e-3f);
  return acc;
}

struct Item {  // one warp's (row, KV head, split)
  int b, h, split, lo, n;
  const int32_t* bt_row;
  __device__ Item(const Probe& p, int w) {
    split = w % p.splits;
    const int bh = w / p.splits;
    b = bh / p.hkv;
    h = bh - b * p.hkv;
    lo = split * p.tiles_per_split;
    n = min(p.tiles_per_split, p.m - lo);
    bt_row = p.bt + int64_t(b) * p.m;
  }
};

// Lane (g, t): 32 bytes of key rows g and g + 8 (the kernel's [32 t, 32 t + 32) unless Probe::sector), value
// rows 2t, 2t+1, 2t+8, 2t+9 bytes [16 g, +16); scales as the mode takes them.
struct Regs {
  uint4 k[4], v[4];
  uint16_t s[4];
};

template <int SCALES> __global__ void __launch_bounds__(128, 3) probe_direct(const Probe p) {
  const int w = blockIdx.x * 4 + (threadIdx.x >> 5);
  if (w >= p.items) return;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const Item it(p, w);
  const int64_t tok = p.hnd ? 128 : int64_t(p.hkv) * 128;  // bytes between tokens
  const int64_t head = p.hnd ? 16 * 128 : 128;
  auto load = [&](Regs& r, int blk) {
    const uint8_t* kb = p.k + int64_t(blk) * 16 * 128 * p.hkv + it.h * head;
    const uint8_t* vb = p.v + int64_t(blk) * 16 * 128 * p.hkv + it.h * head;
    // a lane's 32 key bytes of a row: [32 t, 32 t + 32) (each load touches half of 16 sectors), or
    // (p.sector) [16 t, 16 t + 16) and [64 + 16 t, ...) (each load covers 8 whole sectors)
    const int o0 = p.sector ? 16 * t : 32 * t, o1 = p.sector ? 64 + 16 * t : 32 * t + 16;
    r.k[0] = __ldg(reinterpret_cast<const uint4*>(kb + g * tok + o0));
    r.k[1] = __ldg(reinterpret_cast<const uint4*>(kb + g * tok + o1));
    r.k[2] = __ldg(reinterpret_cast<const uint4*>(kb + (g + 8) * tok + o0));
    r.k[3] = __ldg(reinterpret_cast<const uint4*>(kb + (g + 8) * tok + o1));
    const int rows[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
#pragma unroll
    for (int j = 0; j < 4; ++j) r.v[j] = __ldg(reinterpret_cast<const uint4*>(vb + rows[j] * tok + 16 * g));
    const int64_t so = int64_t(blk) * 16 * p.hkv + it.h;
    if (SCALES == 1) {
      r.s[0] = p.ks[so + g * p.hkv];
      r.s[1] = p.ks[so + (g + 8) * p.hkv];
      r.s[2] = p.vs[so + g * p.hkv];
      r.s[3] = p.vs[so + (g + 8) * p.hkv];
    } else if (SCALES == 2) {
      r.s[0] = (lane < 16 ? p.ks : p.vs)[so + (lane & 15) * p.hkv];
    }
  };
  uint32_t acc = 0;
  float f = 0.f;
  Regs a, b;
  if (it.n > 0) load(a, it.bt_row[it.lo]);
  for (int i = 0; i < it.n; ++i) {
    if (i + 1 < it.n) load(b, it.bt_row[it.lo + i + 1]);
#pragma unroll
    for (int j = 0; j < 4; ++j) acc ^= fold(a.k[j]) ^ fold(a.v[j]);
    if (SCALES == 1) acc ^= a.s[0] ^ a.s[1] ^ a.s[2] ^ a.s[3];
    if (SCALES == 2) {
      const uint32_t x = a.s[0];
      acc ^= __shfl_sync(0xffffffffu, x, g) ^ __shfl_sync(0xffffffffu, x, g + 8) ^ __shfl_sync(0xffffffffu, x, 16 + g)
             ^ __shfl_sync(0xffffffffu, x, 24 + g);
    }
    f = spin(f + float(acc & 1), p.work);
    a = b;
  }
  p.out[w * 32 + lane] = acc ^ __float_as_uint(f);
}

// 128-byte swizzle of a TMA box: 16-byte chunk c of row r lands at chunk c ^ (r % 8).
__device__ __forceinline__ int swz(int row, int byte) { return row * 128 + (((byte >> 4) ^ (row & 7)) << 4); }

__global__ void __launch_bounds__(128, 3) probe_tma(const Probe p, const __grid_constant__ Maps maps) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const int wib = threadIdx.x >> 5;
  const int w = blockIdx.x * 4 + wib;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint8_t* ring = smem + wib * (STAGES * 4096);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + 4 * STAGES * 4096) + wib * STAGES;
  if (w >= p.items) return;
  const Item it(p, w);
  if (lane == 0) {
    for (int s = 0; s < STAGES; ++s) mbar_init(bars + s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" : : : "memory");
  }
  __syncwarp();
  auto issue = [&](int i) {  // lane 0
    const int blk = it.bt_row[it.lo + i];
    uint8_t* st = ring + (i % STAGES) * 4096;
    mbar_expect_tx(bars + i % STAGES, 4096);
    tma_load4(st, &maps.k, 0, it.h, 0, blk, bars + i % STAGES);
    tma_load4(st + 2048, &maps.v, 0, it.h, 0, blk, bars + i % STAGES);
  };
  if (lane == 0) {
    for (int i = 0; i < min(STAGES, it.n); ++i) issue(i);
  }
  uint32_t acc = 0;
  float f = 0.f;
  for (int i = 0; i < it.n; ++i) {
    mbar_wait(bars + i % STAGES, (i / STAGES) & 1);
    const uint8_t* st = ring + (i % STAGES) * 4096;
    Regs a;
    a.k[0] = *reinterpret_cast<const uint4*>(st + swz(g, 32 * t));
    a.k[1] = *reinterpret_cast<const uint4*>(st + swz(g, 32 * t + 16));
    a.k[2] = *reinterpret_cast<const uint4*>(st + swz(g + 8, 32 * t));
    a.k[3] = *reinterpret_cast<const uint4*>(st + swz(g + 8, 32 * t + 16));
    const int rows[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
#pragma unroll
    for (int j = 0; j < 4; ++j) a.v[j] = *reinterpret_cast<const uint4*>(st + 2048 + swz(rows[j], 16 * g));
#pragma unroll
    for (int j = 0; j < 4; ++j) acc ^= fold(a.k[j]) ^ fold(a.v[j]);
    f = spin(f + float(acc & 1), p.work);
    __syncwarp();
    if (lane == 0 && i + STAGES < it.n) issue(i + STAGES);
  }
  p.out[w * 32 + lane] = acc ^ __float_as_uint(f);
}

// The 4-D map [D = 128 bytes, Hkv, 16 tokens, N blocks] of fp8 codes, boxes of one head's tile; false on failure.
bool make_map(CUtensorMap& m, const uint8_t* base, int hkv, int n_blocks) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (!encode) {
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&encode), 12000,
                                         cudaEnableDefault, &q) != cudaSuccess || !encode) {
      return false;
    }
  }
  cuuint64_t dims[4] = {128, cuuint64_t(hkv), 16, cuuint64_t(n_blocks)};
  cuuint64_t strides[3] = {128, cuuint64_t(hkv) * 128, cuuint64_t(hkv) * 128 * 16};
  cuuint32_t box[4] = {128, 1, 16, 1};
  cuuint32_t estr[4] = {1, 1, 1, 1};
  return encode(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 4, const_cast<uint8_t*>(base), dims, strides, box, estr,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// int4 in chunks (probe4_*): each block's bytes of one KV head in one contiguous chunk of C4 bytes (D = 128,
// groups of 64, 16 tokens: 1 KB key codes, 1 KB value codes, 4 x 64 B of scales and zero points; chunk
// (blk, h) at (blk Hkv + h) C4, Probe::k), two tiles (a step of the paired int4 loop) per step:
//   probe4_direct: each lane loads its 72 bytes of each chunk into registers one step ahead (four 16-byte
//                  loads, one 8-byte; each instruction covers 512 or 256 contiguous bytes);
//   probe4_bulk:   lane 0 copies the step's two chunks by cp.async.bulk (one instruction per chunk, no
//                  tensor map) into a ring of STAGES steps per warp, completion on an mbarrier; lanes read
//                  their 72 bytes of each chunk back from shared memory.
constexpr int C4 = 2304;

struct Regs4 {
  uint4 a[4];
  uint2 s;
};

__device__ __forceinline__ void load4(Regs4& r, const uint8_t* c, int lane) {
#pragma unroll
  for (int j = 0; j < 4; ++j) r.a[j] = __ldg(reinterpret_cast<const uint4*>(c + 512 * j + 16 * lane));
  r.s = __ldg(reinterpret_cast<const uint2*>(c + 2048 + 8 * lane));
}

__device__ __forceinline__ void read4(Regs4& r, const uint8_t* c, int lane) {  // from shared memory
#pragma unroll
  for (int j = 0; j < 4; ++j) r.a[j] = *reinterpret_cast<const uint4*>(c + 512 * j + 16 * lane);
  r.s = *reinterpret_cast<const uint2*>(c + 2048 + 8 * lane);
}

__device__ __forceinline__ uint32_t fold4(const Regs4& r) {
  return fold(r.a[0]) ^ fold(r.a[1]) ^ fold(r.a[2]) ^ fold(r.a[3]) ^ r.s.x ^ r.s.y;
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               : : "r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

__global__ void __launch_bounds__(128) probe4_direct(const Probe p) {
  const int w = blockIdx.x * 4 + (threadIdx.x >> 5);
  if (w >= p.items) return;
  const int lane = threadIdx.x & 31;
  const Item it(p, w);
  const uint8_t* base = p.k + int64_t(it.h) * C4;
  auto chunk = [&](int i) { return base + int64_t(it.bt_row[it.lo + min(i, it.n - 1)]) * p.hkv * C4; };
  const int steps = (it.n + 1) / 2;
  uint32_t acc = 0;
  float f = 0.f;
  Regs4 a[2], b[2];
  if (steps > 0) {
    load4(a[0], chunk(0), lane);
    load4(a[1], chunk(1), lane);
  }
  for (int k = 0; k < steps; ++k) {
    if (k + 1 < steps) {
      load4(b[0], chunk(2 * k + 2), lane);
      load4(b[1], chunk(2 * k + 3), lane);
    }
    acc ^= fold4(a[0]) ^ fold4(a[1]);
    f = spin(f + float(acc & 1), p.work);
    a[0] = b[0];
    a[1] = b[1];
  }
  p.out[w * 32 + lane] = acc ^ __float_as_uint(f);
}

__global__ void __launch_bounds__(128) probe4_bulk(const Probe p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int wib = threadIdx.x >> 5;
  const int w = blockIdx.x * 4 + wib;
  const int lane = threadIdx.x & 31;
  uint8_t* ring = smem + wib * (STAGES * 2 * C4);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + 4 * STAGES * 2 * C4) + wib * STAGES;
  if (w >= p.items) return;
  const Item it(p, w);
  const uint8_t* base = p.k + int64_t(it.h) * C4;
  auto chunk = [&](int i) { return base + int64_t(it.bt_row[it.lo + min(i, it.n - 1)]) * p.hkv * C4; };
  const int steps = (it.n + 1) / 2;
  if (lane == 0) {
    for (int s = 0; s < STAGES; ++s) mbar_init(bars + s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" : : : "memory");
  }
  __syncwarp();
  auto issue = [&](int k) {  // lane 0
    uint8_t* st = ring + (k % STAGES) * 2 * C4;
    mbar_expect_tx(bars + k % STAGES, 2 * C4);
    bulk_copy(st, chunk(2 * k), C4, bars + k % STAGES);
    bulk_copy(st + C4, chunk(2 * k + 1), C4, bars + k % STAGES);
  };
  if (lane == 0) {
    for (int k = 0; k < min(STAGES, steps); ++k) issue(k);
  }
  uint32_t acc = 0;
  float f = 0.f;
  for (int k = 0; k < steps; ++k) {
    mbar_wait(bars + k % STAGES, (k / STAGES) & 1);
    const uint8_t* st = ring + (k % STAGES) * 2 * C4;
    Regs4 a[2];
    read4(a[0], st, lane);
    read4(a[1], st + C4, lane);
    acc ^= fold4(a[0]) ^ fold4(a[1]);
    f = spin(f + float(acc & 1), p.work);
    __syncwarp();
    if (lane == 0 && k + STAGES < steps) issue(k + STAGES);
  }
  p.out[w * 32 + lane] = acc ^ __float_as_uint(f);
}

}  // namespace

extern "C" int probe_launch(const Probe* p, int mode, int n_blocks, void* stream) {
  const int grid = (p->items + 3) / 4;
  if (mode == 0 || mode >= 2) {
    auto k = mode == 0 ? probe_direct<0> : mode == 2 ? probe_direct<1> : probe_direct<2>;
    k<<<grid, 128, 0, static_cast<cudaStream_t>(stream)>>>(*p);
  } else {
    Maps maps;
    if (!make_map(maps.k, p->k, p->hkv, n_blocks) || !make_map(maps.v, p->v, p->hkv, n_blocks)) {
      return int(cudaErrorInvalidValue);
    }
    const int smem = 4 * STAGES * 4096 + 4 * STAGES * 8;
    cudaFuncSetAttribute(probe_tma, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    probe_tma<<<grid, 128, smem, static_cast<cudaStream_t>(stream)>>>(*p, maps);
  }
  return int(cudaGetLastError());
}

// int4 chunks (probe4_direct / probe4_bulk): mode 0 direct, 1 bulk ring; `smem` bytes of dynamic shared
// memory per block for the direct loads (0: none; > 0 caps the blocks per SM, as the bulk ring's does).
extern "C" int probe4_launch(const Probe* p, int mode, int smem, void* stream) {
  const int grid = (p->items + 3) / 4;
  auto s = static_cast<cudaStream_t>(stream);
  if (mode == 0) {
    cudaFuncSetAttribute(probe4_direct, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    probe4_direct<<<grid, 128, smem, s>>>(*p);
  } else {
    smem = 4 * STAGES * 2 * C4 + 4 * STAGES * 8;
    cudaFuncSetAttribute(probe4_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    probe4_bulk<<<grid, 128, smem, s>>>(*p);
  }
  return int(cudaGetLastError());
}
