// Device helpers shared by the chunked kernels (csrc/chunk_fwd, csrc/chunk_bwd); torch-free.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gla_params.h"

namespace gla {

constexpr float kLog2e = 1.4426950408889634f;

// 2^x for x <= 0 (flushes to 0 far below; never overflows).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// 16-byte global->shared cp.async (.cg: L2 only); with valid == false the 16 bytes are
// zero-filled and nothing is read (src must still be a valid address expression).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid = true) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem_src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory"); }

// Orders this thread's generic-proxy shared-memory writes before later async-proxy accesses
// (TMA, wgmma operands) of the CTA.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// L2 prefetch of `rows` rows of `bytes` bytes (a multiple of 128) each, `stride` bytes apart.
template <int kThreads>
__device__ __forceinline__ void prefetch_rows(const void* base, int rows, int bytes, int64_t stride, int tid) {
  const int lines = bytes / 128;
  for (int i = tid; i < rows * lines; i += kThreads)
    prefetch_l2(static_cast<const char*>(base) + int64_t(i / lines) * stride + 128 * (i % lines));
}

// Copies `rows` rows of `width` elements (16-byte pieces) from global (row stride `gstride`
// elements) into shared (row stride `sstride`), zero-filling rows at or past `valid_rows`.
template <int kThreads, int kRows, int kWidth, class E>
__device__ __forceinline__ void load_tile(E* s, int sstride, const E* g, int64_t gstride, int valid_rows, int tid) {
  constexpr int P = 16 / int(sizeof(E));
  constexpr int PR = kWidth / P;
  for (int i = tid; i < kRows * PR; i += kThreads) {
    const int r = i / PR, cc = (i % PR) * P;
    const bool ok = r < valid_rows;
    cp_async16(s + r * sstride + cc, g + (ok ? int64_t(r) * gstride + cc : 0), ok);
  }
}

// Copies `rows` rows of `width` 16-bit elements from shared (row stride `sstride`) to global
// (row stride `gstride`) in 16-byte pieces, rows at or past `valid_rows` left alone.
template <int kThreads, int kRows, int kWidth, class E>
__device__ __forceinline__ void store_tile(E* g, int64_t gstride, const E* s, int sstride, int valid_rows, int tid) {
  constexpr int P = 16 / int(sizeof(E));
  constexpr int PR = kWidth / P;
  for (int i = tid; i < kRows * PR; i += kThreads) {
    const int r = i / PR, cc = (i % PR) * P;
    if (r < valid_rows)
      *reinterpret_cast<uint4*>(g + int64_t(r) * gstride + cc) = *reinterpret_cast<const uint4*>(s + r * sstride + cc);
  }
}

// Barriers over the whole CTA (CtaSync) or over a group of its warps (GroupSync: named barrier
// kId, which must not be 0, __syncthreads' own, and kThreads threads): sync(), and any(pred), a
// barrier that returns whether pred held in any thread of the group.
struct CtaSync {
  static __device__ __forceinline__ void sync() { __syncthreads(); }
  static __device__ __forceinline__ bool any(bool pred) { return __syncthreads_or(pred) != 0; }
};
template <int kId, int kThreads>
struct GroupSync {
  static_assert(kId > 0 && kId < 16 && kThreads % 32 == 0, "named barrier 1..15, whole warps");
  static __device__ __forceinline__ void sync() { asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "n"(kThreads) : "memory"); }
  static __device__ __forceinline__ bool any(bool pred) {
    uint32_t r;
    asm volatile(
        "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, %2, %3, p;\n selp.u32 %0, 1, 0, q;\n}\n"
        : "=r"(r)
        : "r"(uint32_t(pred)), "n"(kId), "n"(kThreads)
        : "memory");
    return r != 0;
  }
};

// Two floats rounded to T (16-bit) and packed into one 32-bit word.
template <class T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  T x[2] = {T(a), T(b)};
  uint32_t r;
  memcpy(&r, x, 4);
  return r;
}

// load_tile into a 16-bit tile from a source of its own type (cp.async), or from float32 rounded
// on the way (plain loads, 8 floats per 16-byte store: visible after the caller's barrier).
template <int kThreads, int kRows, int kWidth, class E, class S>
__device__ __forceinline__ void load_tile_from(E* s, int sstride, const S* g, int64_t gstride, int valid_rows, int tid) {
  if constexpr (std::is_same_v<E, S>) {
    load_tile<kThreads, kRows, kWidth>(s, sstride, g, gstride, valid_rows, tid);
  } else {
    static_assert(std::is_same_v<S, float> && sizeof(E) == 2, "float32 into a 16-bit tile");
    constexpr int PR = kWidth / 8;
#pragma unroll 1  // one piece in flight per thread: callers hold MMA accumulators across this
    for (int i = tid; i < kRows * PR; i += kThreads) {
      const int r = i / PR, cc = (i % PR) * 8;
      uint4 x = make_uint4(0, 0, 0, 0);
      if (r < valid_rows) {
        const float4 a = *reinterpret_cast<const float4*>(g + int64_t(r) * gstride + cc);
        const float4 b = *reinterpret_cast<const float4*>(g + int64_t(r) * gstride + cc + 4);
        x = make_uint4(pack2<E>(a.x, a.y), pack2<E>(a.z, a.w), pack2<E>(b.x, b.y), pack2<E>(b.z, b.w));
      }
      *reinterpret_cast<uint4*>(s + r * sstride + cc) = x;
    }
  }
}

// In-chunk cumulative sum of g for channel ch, the chunk's rows cut into parts of RPT rows, one
// thread per (channel, part): gv gets this thread's inclusive partial sums (rows at or past
// `rows` count 0); returns the sum of the parts before this one (x) and the chunk's total (y).
// g is [rows][ldg], tot a [PARTS][ldtot] float scratch. Every thread of the block (of the
// group, with a GroupSync) calls it: it holds one barrier, after which the raw g may be overwritten.
template <int RPT, int PARTS, class GT, class Sync = CtaSync>
__device__ __forceinline__ float2 chunk_cumsum(const GT* g, int ldg, int ch, int part, int rows, float* tot,
                                               int ldtot, float (&gv)[RPT], Sync = {}) {
#pragma unroll
  for (int r = 0; r < RPT; ++r) {
    const int t = part * RPT + r;
    const float x = t < rows ? float(g[t * ldg + ch]) : 0.f;
    gv[r] = r ? gv[r - 1] + x : x;
  }
  tot[part * ldtot + ch] = gv[RPT - 1];
  Sync::sync();
  float off = 0.f, total = 0.f;
#pragma unroll
  for (int s = 0; s < PARTS; ++s) {
    if (s == part) off = total;
    total += tot[s * ldtot + ch];
  }
  return make_float2(off, total);
}

// Tokens [bos, eos) of sequence n: from cu_seqlens, or batch row n of T tokens.
template <class Params>
__device__ __forceinline__ void sequence_bounds(const Params& p, int n, int64_t& bos, int64_t& eos) {
  if (p.cu_seqlens != nullptr) {
    bos = p.cu_seqlens[n];
    eos = p.cu_seqlens[n + 1];
  } else {
    bos = int64_t(n) * p.T;
    eos = bos + p.T;
  }
}

// A walk over segment `seg` of a split sequence (gla_params.h, SegmentSplit): moves bos and len
// to the segment and returns the sequence's last segment (0 without a split), or -1 if seg lies
// past its end.
__device__ __forceinline__ int clip_to_segment(const SegmentSplit& sp, int seg, int64_t& bos, int64_t& len) {
  if (sp.seg_len <= 0) return 0;
  const int last = len > 0 ? int((len - 1) / sp.seg_len) : 0;
  if (seg > last) return -1;
  const int64_t s0 = int64_t(seg) * sp.seg_len;
  bos += s0;
  len = len - s0 < sp.seg_len ? len - s0 : sp.seg_len;
  return last;
}

// Chunk slot `slot` of the kept intermediates' layout (intermediates.h; BwdParams::chunk_off,
// chunk_seq): its sequence n, first token t0 and number of tokens (0 for a surplus slot of a varlen batch).
template <class Params>
__device__ __forceinline__ int slot_rows(const Params& p, int64_t slot, int chunk, int& n, int64_t& t0) {
  const int64_t seq = p.chunk_seq[slot];
  n = int(seq < p.N ? seq : 0);
  int64_t bos, eos;
  sequence_bounds(p, n, bos, eos);
  t0 = bos + (slot - p.chunk_off[n]) * chunk;
  const int64_t rows = eos - t0;
  return seq < p.N ? int(rows < chunk ? (rows > 0 ? rows : 0) : chunk) : 0;
}

}  // namespace gla
