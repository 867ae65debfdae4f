// Decode attention over 8-bit paged KV blocks (fp8 e4m3 / int8, one fp16 scale per token and head),
// one warp per split of the context: the warp owns its tokens, its online softmax and its output
// partial, so the main loop has no block barriers and no shared memory. Built at run time by
// cuda_decode.py (nvcc, sm_89+), launched through ctypes on torch's current stream.
//
// Per 16-token tile a warp computes, with mma.sync m16n8k16 (fp16 operands, fp32 accumulators):
//   S^T [16 tokens, 8 heads]  = K [16 tokens, D] @ Q^T [D, 8 heads]       (A = key codes, registers)
//   O^T [D, 8 heads]         += V^T [D, 16 tokens] @ P' [16 tokens, 8 heads]  (A = value codes)
// The query heads of one KV head (G <= 8) are the 8 columns. Both products read the codes as the A
// operand straight from global memory into registers: the sum over the head dim is order-free, so
// thread (g, t) of the warp owns key bytes [t D/4, (t+1) D/4) of tokens g and g+8 (k index 2t+{0,1},
// 2t+8+{0,1} of k-step kk <-> dims t D/4 + 4 kk + {0,1,2,3}), and value bytes [g D/8, (g+1) D/8) of
// tokens 2t, 2t+1, 2t+8, 2t+9 (row g / g+8 of m-tile mi <-> dim g D/8 + 2 mi + {0, 1}). The
// probabilities go from the accumulator layout of S^T to the B operand of the second product by
// two movmatrix transposes. Key scales multiply the rows of S^T, value scales fold into P' = p s_v.
// The next tile's codes, scales and (two ahead) block id are loaded before the current tile is used.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

struct Decode8Params {
  const uint16_t* q;  // [B, Hq, D] bf16 or fp16
  void* out;          // [B, Hq, D], q's dtype (one split)
  float* part;        // [B * Hq * splits, D] normalised partial outputs (several splits)
  float* ml;          // [B * Hq * splits, 2] (max in log2 units, sum)
  const uint8_t* k;   // codes [N, BS, Hkv, D] (strides in bytes below)
  const uint8_t* v;
  const __half* ks;   // scales [N, BS, Hkv, 1] (strides in elements)
  const __half* vs;
  const int32_t* bt;  // [B, M]
  const int32_t* seq; // [B]
  int64_t k_sb, k_st, k_sh;
  int64_t v_sb, v_st, v_sh;
  int64_t ks_sb, ks_st, ks_sh;
  int64_t vs_sb, vs_st, vs_sh;
  int32_t hq, hkv, g, m, bs;
  int32_t window, sinks, has_window;
  int32_t splits, chunk;  // chunk: tokens per split, a multiple of 16
  int32_t q_bf16;
  float scale_log2;
};

namespace {

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ float half_bits_to_float(uint16_t x, bool bf16) {
  return bf16 ? __uint_as_float(uint32_t(x) << 16) : __half2float(__ushort_as_half(x));
}

template <int KIND> struct Codes;

// fp8 e4m3: exact in fp16, one cvt per pair of codes.
template <> struct Codes<1> {
  static __device__ __forceinline__ uint32_t lo(uint32_t w) {
    uint32_t r;
    asm("{ .reg .b16 a, b; mov.b32 {a, b}, %1; cvt.rn.f16x2.e4m3x2 %0, a; }" : "=r"(r) : "r"(w));
    return r;
  }
  static __device__ __forceinline__ uint32_t hi(uint32_t w) {
    uint32_t r;
    asm("{ .reg .b16 a, b; mov.b32 {a, b}, %1; cvt.rn.f16x2.e4m3x2 %0, b; }" : "=r"(r) : "r"(w));
    return r;
  }
  // (byte e of wa, byte e of wb) for e = 2 half and 2 half + 1: one byte permutation, two cvt.
  static __device__ __forceinline__ void pairs(uint32_t wa, uint32_t wb, int half, uint32_t& r0, uint32_t& r1) {
    const uint32_t x = __byte_perm(wa, wb, half ? 0x7362 : 0x5140);
    r0 = lo(x);
    r1 = hi(x);
  }
};

// int8: fp16 bits 0x6400 | (c ^ 0x80) = 1152 + c (no int-to-float conversion), less 1152.
template <> struct Codes<2> {
  static __device__ __forceinline__ uint32_t unbias(uint32_t x) {
    __half2 h = *reinterpret_cast<__half2*>(&x);
    h = __hsub2(h, __float2half2_rn(1152.f));
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint32_t lo(uint32_t w) { return unbias(__byte_perm(w, 0x64, 0x4140) ^ 0x00800080u); }
  static __device__ __forceinline__ uint32_t hi(uint32_t w) { return unbias(__byte_perm(w, 0x64, 0x4342) ^ 0x00800080u); }
  static __device__ __forceinline__ uint32_t pair(uint32_t wa, uint32_t wb, int e) {
    return unbias((__byte_perm(wa, wb, ((4 + e) << 8) | e) & 0x00FF00FFu) ^ 0x64806480u);
  }
  static __device__ __forceinline__ void pairs(uint32_t wa, uint32_t wb, int half, uint32_t& r0, uint32_t& r1) {
    r0 = pair(wa, wb, 2 * half);
    r1 = pair(wa, wb, 2 * half + 1);
  }
};

template <int NW> struct Words;  // NW 32-bit words loaded as one or two vectors
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

template <int D> struct Tile {
  Words<D / 16> k0, k1;  // key bytes [t D/4, (t+1) D/4) of tokens g, g+8
  Words<D / 32> v[4];    // value bytes [g D/8, (g+1) D/8) of tokens 2t, 2t+1, 2t+8, 2t+9
  __half ks0, ks1, vs0, vs1;  // scales of tokens g, g+8
};

template <int D>
__device__ __forceinline__ void load_tile(Tile<D>& x, const Decode8Params& p, int h, int64_t blk, int tb, int g, int t) {
  const uint8_t* kb = p.k + blk * p.k_sb + h * p.k_sh + t * (D / 4);
  x.k0.load(kb + (tb + g) * p.k_st);
  x.k1.load(kb + (tb + g + 8) * p.k_st);
  const uint8_t* vb = p.v + blk * p.v_sb + h * p.v_sh + g * (D / 8);
  x.v[0].load(vb + (tb + 2 * t) * p.v_st);
  x.v[1].load(vb + (tb + 2 * t + 1) * p.v_st);
  x.v[2].load(vb + (tb + 2 * t + 8) * p.v_st);
  x.v[3].load(vb + (tb + 2 * t + 9) * p.v_st);
  const __half* ks = p.ks + blk * p.ks_sb + h * p.ks_sh;
  const __half* vs = p.vs + blk * p.vs_sb + h * p.vs_sh;
  x.ks0 = ks[(tb + g) * p.ks_st];
  x.ks1 = ks[(tb + g + 8) * p.ks_st];
  x.vs0 = vs[(tb + g) * p.vs_st];
  x.vs1 = vs[(tb + g + 8) * p.vs_st];
}

template <int D, int KIND>
__global__ void __launch_bounds__(128) decode8_kernel(const Decode8Params p) {
  using C = Codes<KIND>;
  constexpr int KW = D / 16;  // key k-steps (16 dims each) = key words per thread and token
  constexpr int VW = D / 32;  // value words per thread and token
  constexpr int MT = D / 16;  // m-tiles of O^T
  const float NEG_INF = -__int_as_float(0x7f800000);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int b = blockIdx.x / p.hkv, h = blockIdx.x - b * p.hkv;
  const int split = blockIdx.y * (blockDim.x >> 5) + warp;
  if (split >= p.splits) return;
  const int seq_len = p.seq[b];
  const int qpos = seq_len - 1;

  // Tiles of this split: [lo, a_hi) then [b_lo, hi); with a window, the first range covers the sink
  // tokens and the second starts at the window's first tile (tiles in between are fully masked).
  const int lo = split * p.chunk;
  const int hi = min(seq_len, lo + p.chunk);
  int a_hi = hi, b_lo = hi;
  if (p.has_window) {
    const int win_lo = max(0, qpos - p.window + 1) & ~15;
    a_hi = min(hi, max(lo, (p.sinks + 15) & ~15));
    b_lo = max(a_hi, max(lo, win_lo));
  }
  const int n_a = max(0, (a_hi - lo + 15) >> 4);
  const int n = n_a + max(0, (hi - b_lo + 15) >> 4);
  auto tile_start = [&](int i) { return i < n_a ? lo + 16 * i : b_lo + 16 * (i - n_a); };
  const int32_t* bt_row = p.bt + int64_t(b) * p.m;

  // Queries (B operand of S^T): head g, dims t D/4 + 4 kk + {0, 1} and {2, 3}, times scale * log2(e).
  uint32_t qf[KW][2];
  {
    const bool q_ok = g < p.g;
    const uint16_t* qr = p.q + (int64_t(b) * p.hq + h * p.g + (q_ok ? g : 0)) * D + t * (D / 4);
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
      const uint2 x = *reinterpret_cast<const uint2*>(qr + 4 * kk);
      const float s = q_ok ? p.scale_log2 : 0.f;
      qf[kk][0] = pack_half2(half_bits_to_float(x.x & 0xffff, p.q_bf16) * s, half_bits_to_float(x.x >> 16, p.q_bf16) * s);
      qf[kk][1] = pack_half2(half_bits_to_float(x.y & 0xffff, p.q_bf16) * s, half_bits_to_float(x.y >> 16, p.q_bf16) * s);
    }
  }

  float o[MT][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) o[mi][0] = o[mi][1] = o[mi][2] = o[mi][3] = 0.f;
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;  // heads 2t, 2t+1

  Tile<D> cur, nxt;
  int blk_next = 0;
  if (n > 0) {
    const int s0 = tile_start(0);
    load_tile<D>(cur, p, h, bt_row[s0 / p.bs], s0 % p.bs, g, t);
  }
  if (n > 1) blk_next = bt_row[tile_start(1) / p.bs];
  for (int i = 0; i < n; ++i) {
    const int start = tile_start(i);
    const int blk_after = i + 2 < n ? bt_row[tile_start(i + 2) / p.bs] : 0;
    if (i + 1 < n) load_tile<D>(nxt, p, h, blk_next, tile_start(i + 1) % p.bs, g, t);

    // ---- scores S^T: rows tokens g, g+8; columns heads 2t, 2t+1 ----
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < KW; ++kk)
      mma16816(s, C::lo(cur.k0.w[kk]), C::lo(cur.k1.w[kk]), C::hi(cur.k0.w[kk]), C::hi(cur.k1.w[kk]),
               qf[kk][0], qf[kk][1]);
    const int tg = start + g, tg8 = tg + 8;
    bool ok0 = tg < seq_len, ok1 = tg8 < seq_len;
    if (p.has_window) {
      ok0 = ok0 && (tg > qpos - p.window || tg < p.sinks);
      ok1 = ok1 && (tg8 > qpos - p.window || tg8 < p.sinks);
    }
    const float k0s = __half2float(cur.ks0), k1s = __half2float(cur.ks1);
    s[0] = ok0 ? s[0] * k0s : NEG_INF;
    s[1] = ok0 ? s[1] * k0s : NEG_INF;
    s[2] = ok1 ? s[2] * k1s : NEG_INF;
    s[3] = ok1 ? s[3] * k1s : NEG_INF;

    // ---- online softmax per head (column): max over the 16 rows = 8 lanes x 2 ----
    float x0 = fmaxf(s[0], s[2]), x1 = fmaxf(s[1], s[3]);
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, off));
      x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, off));
    }
    const float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
    const float z0 = n0 == NEG_INF ? 0.f : n0, z1 = n1 == NEG_INF ? 0.f : n1;
    const float a0 = fast_exp2(m0 - z0), a1 = fast_exp2(m1 - z1);
    const float p0 = fast_exp2(s[0] - z0), p1 = fast_exp2(s[1] - z1);
    const float p2 = fast_exp2(s[2] - z0), p3 = fast_exp2(s[3] - z1);
    l0 = l0 * a0 + p0 + p2;
    l1 = l1 * a1 + p1 + p3;
    m0 = n0;
    m1 = n1;
    const float v0s = ok0 ? __half2float(cur.vs0) : 0.f, v1s = ok1 ? __half2float(cur.vs1) : 0.f;
    const uint32_t pb0 = transpose8x8(pack_half2(p0 * v0s, p1 * v0s));  // tokens 2t, 2t+1; head g
    const uint32_t pb1 = transpose8x8(pack_half2(p2 * v1s, p3 * v1s));  // tokens 2t+8, 2t+9
    if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        o[mi][0] *= a0; o[mi][1] *= a1; o[mi][2] *= a0; o[mi][3] *= a1;
      }
    }

    // ---- values: O^T rows dims g D/8 + 2 mi + {0, 1} ----
#pragma unroll
    for (int j = 0; j < VW; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint32_t r0, r1, r2, r3;
        C::pairs(cur.v[0].w[j], cur.v[1].w[j], half, r0, r1);
        C::pairs(cur.v[2].w[j], cur.v[3].w[j], half, r2, r3);
        mma16816(o[2 * j + half], r0, r1, r2, r3, pb0, pb1);
      }
    }
    cur = nxt;
    blk_next = blk_after;
  }

#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  // ---- outputs: head 2t + j, dims [g D/8, (g+1) D/8): o[mi][2 hh + j] is dim g D/8 + 2 mi + hh ----
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int head = 2 * t + j;
    if (head >= p.g) continue;
    const float l = j ? l1 : l0, mx = j ? m1 : m0;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float val[D / 8];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      val[2 * mi] = o[mi][j] * inv;
      val[2 * mi + 1] = o[mi][2 + j] * inv;
    }
    const int64_t row = int64_t(b) * p.hq + h * p.g + head;
    if (p.splits == 1) {
      uint32_t packed[D / 16];
#pragma unroll
      for (int e = 0; e < D / 16; ++e) {
        if (p.q_bf16) {
          const uint32_t a = __float_as_uint(val[2 * e]), c = __float_as_uint(val[2 * e + 1]);
          // round to nearest even on the top 16 bits
          const uint32_t ra = (a + 0x7fffu + ((a >> 16) & 1u)) >> 16, rc = (c + 0x7fffu + ((c >> 16) & 1u)) >> 16;
          packed[e] = ra | (rc << 16);
        } else {
          packed[e] = pack_half2(val[2 * e], val[2 * e + 1]);
        }
      }
      uint4* dst = reinterpret_cast<uint4*>(static_cast<uint16_t*>(p.out) + row * D + g * (D / 8));
#pragma unroll
      for (int e = 0; e < D / 64; ++e) dst[e] = make_uint4(packed[4 * e], packed[4 * e + 1], packed[4 * e + 2], packed[4 * e + 3]);
    } else {
      const int64_t prow = row * p.splits + split;
      float4* dst = reinterpret_cast<float4*>(p.part + prow * D + g * (D / 8));
#pragma unroll
      for (int e = 0; e < D / 32; ++e) dst[e] = make_float4(val[4 * e], val[4 * e + 1], val[4 * e + 2], val[4 * e + 3]);
      if (g == 0) {
        p.ml[prow * 2] = mx;
        p.ml[prow * 2 + 1] = l;
      }
    }
  }
}

template <int D, int KIND>
int launch(const Decode8Params& p, int rows, int warps, cudaStream_t stream) {
  const dim3 grid(rows * p.hkv, (p.splits + warps - 1) / warps);
  decode8_kernel<D, KIND><<<grid, 32 * warps, 0, stream>>>(p);
  return int(cudaGetLastError());
}

template <int D, int KIND>
int occupancy(int warps, int* blocks) {
  return int(cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, decode8_kernel<D, KIND>, 32 * warps, 0));
}

}  // namespace

// kind: 1 fp8, 2 int8; d: 64 or 128; rows: batch. Returns a cudaError_t (0: launched).
extern "C" int cs_decode8(const Decode8Params* p, int kind, int d, int rows, int warps, int device, void* stream) {
  if (int err = int(cudaSetDevice(device))) return err;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (kind == 1 && d == 128) return launch<128, 1>(*p, rows, warps, s);
  if (kind == 1 && d == 64) return launch<64, 1>(*p, rows, warps, s);
  if (kind == 2 && d == 128) return launch<128, 2>(*p, rows, warps, s);
  if (kind == 2 && d == 64) return launch<64, 2>(*p, rows, warps, s);
  return int(cudaErrorInvalidValue);
}

// Resident blocks of `warps` warps per SM (the CUDA occupancy calculator).
extern "C" int cs_decode8_occupancy(int kind, int d, int warps, int device, int* blocks) {
  if (int err = int(cudaSetDevice(device))) return err;
  if (kind == 1 && d == 128) return occupancy<128, 1>(warps, blocks);
  if (kind == 1 && d == 64) return occupancy<64, 1>(warps, blocks);
  if (kind == 2 && d == 128) return occupancy<128, 2>(warps, blocks);
  if (kind == 2 && d == 64) return occupancy<64, 2>(warps, blocks);
  return int(cudaErrorInvalidValue);
}

extern "C" int cs_decode8_params_size() { return int(sizeof(Decode8Params)); }
