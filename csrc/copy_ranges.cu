// Byte-range copy for paged KV: one launch moves every range of a hand-off (all layers, all
// blocks), from vLLM's paged cache into pool pages, from pages back into paged blocks, or
// straight into a peer process's pool through a CUDA IPC mapping (the addresses are absolute).
//
// Every kernel takes the plan itself: per range its source and destination address, plus the
// prefix sums of the lengths. The kernel cuts the concatenated bytes into equal chunks, one
// warp per chunk (a persistent grid strides over chunks), and finds a chunk's first range by
// binary search; so the host never splits ranges (that cost more than the copy at 16 MiB) and a
// single long range still spreads over every multiprocessor.
//
// Two ways in (lmcache_pd/ops.py picks): a plan of up to INLINE_ROWS ranges travels inside the
// launch's own parameters (copy_inline_*: CUDA 12.1+ allows 32 KiB of them; the driver copies
// them at launch, so there is no upload, no host buffer to keep alive and no event: this is
// the per-hand-off host cost that dominated 16 MiB copies); a larger plan is uploaded to the
// device first (copy_table_*). Built at run time with NVRTC; KV bytes are copied as bytes, so
// every dtype (bf16, fp16, fp32, fp8) takes the same path.

typedef long long i64;

// Index of the range holding byte `pos` of the concatenation: prefix[r] <= pos < prefix[r + 1].
__device__ __forceinline__ int range_of(const i64* __restrict__ prefix, int n, i64 pos) {
    int lo = 0, hi = n;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (prefix[mid] <= pos) lo = mid; else hi = mid;
    }
    return lo;
}

// Walks this warp's chunks of the concatenated ranges and hands each piece (the part of one
// range inside one chunk) to `copy(src, dst, bytes, lane)`.
template <typename Copy>
__device__ __forceinline__ void for_each_piece(const i64* __restrict__ src, const i64* __restrict__ dst,
                                               const i64* __restrict__ prefix, int n, i64 chunk, Copy copy) {
    const int lane = threadIdx.x & 31;
    const i64 warps = (gridDim.x * blockDim.x) >> 5;
    const i64 total = prefix[n];
    for (i64 start = ((blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5) * chunk; start < total;
         start += warps * chunk) {
        const i64 end = min(start + chunk, total);
        int r = range_of(prefix, n, start);
        for (i64 pos = start; pos < end; ++r) {
            const i64 upto = min(end, prefix[r + 1]);
            const i64 off = pos - prefix[r];
            copy(reinterpret_cast<const unsigned char*>(src[r]) + off,
                 reinterpret_cast<unsigned char*>(dst[r]) + off, upto - pos, lane);
            pos = upto;
        }
    }
}

// Every address and length a multiple of 16; chunk a multiple of 16. Each lane keeps UNROLL
// independent 16-byte loads in flight (read-only path) before its stores.
struct CopyV16 {
    __device__ __forceinline__ void operator()(const unsigned char* s, unsigned char* d, i64 bytes, int lane) const {
        constexpr int UNROLL = 8;
        const uint4* __restrict__ src = reinterpret_cast<const uint4*>(s);
        uint4* __restrict__ dst = reinterpret_cast<uint4*>(d);
        const i64 m = bytes >> 4;
        i64 i = lane;
        for (; i + (UNROLL - 1) * 32 < m; i += UNROLL * 32) {
            uint4 v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) v[u] = __ldg(src + i + u * 32);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) dst[i + u * 32] = v[u];
        }
        for (; i < m; i += 32) dst[i] = __ldg(src + i);
    }
};

// Any alignment: one byte per lane step.
struct CopyBytes {
    __device__ __forceinline__ void operator()(const unsigned char* s, unsigned char* d, i64 bytes, int lane) const {
        for (i64 i = lane; i < bytes; i += 32) d[i] = s[i];
    }
};

// A plan uploaded to the device: src[n], dst[n], prefix[n + 1] (one int64 buffer).
struct TablePlan {
    const i64* src;
    const i64* dst;
    const i64* prefix;
    i64 n;
    i64 chunk;
};

extern "C" __global__ void __launch_bounds__(512) copy_table_v16(const TablePlan p) {
    for_each_piece(p.src, p.dst, p.prefix, (int)p.n, p.chunk, CopyV16{});
}

extern "C" __global__ void __launch_bounds__(512) copy_table_bytes(const TablePlan p) {
    for_each_piece(p.src, p.dst, p.prefix, (int)p.n, p.chunk, CopyBytes{});
}

#ifndef PD_NO_INLINE
// A plan inside the launch parameters (__grid_constant__: read in place from the constant bank,
// never copied per thread). The host fills the same int64 layout: n, chunk, src[ROWS],
// dst[ROWS], prefix[ROWS + 1]; 24 * ROWS + 24 bytes must stay under the 32764-byte limit.
template <int ROWS>
struct InlinePlan {
    i64 n;
    i64 chunk;
    i64 src[ROWS];
    i64 dst[ROWS];
    i64 prefix[ROWS + 1];
};

#define PD_INLINE_KERNELS(ROWS)                                                                                  \
    extern "C" __global__ void __launch_bounds__(512) copy_inline_v16_##ROWS(const __grid_constant__ InlinePlan<ROWS> p) { \
        for_each_piece(p.src, p.dst, p.prefix, (int)p.n, p.chunk, CopyV16{});                                  \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(512) copy_inline_bytes_##ROWS(const __grid_constant__ InlinePlan<ROWS> p) { \
        for_each_piece(p.src, p.dst, p.prefix, (int)p.n, p.chunk, CopyBytes{});                                \
    }

PD_INLINE_KERNELS(64)
PD_INLINE_KERNELS(320)
PD_INLINE_KERNELS(1300)
#endif
