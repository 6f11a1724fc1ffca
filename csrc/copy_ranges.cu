// Byte-range copy for paged KV: one launch moves every range of a hand-off (all layers, all
// blocks), from vLLM's paged cache into pool pages, from pages back into paged blocks, or
// straight into a peer process's pool through a CUDA IPC mapping (the addresses are absolute).
//
// The host splits ranges into rows of at most a chunk (<= 64 KiB, smaller for small transfers
// so that every multiprocessor gets work) and passes a table of (src address, dst address,
// bytes) rows. One warp copies one row; a persistent grid strides over the rows.
// Built at run time with NVRTC (lmcache_pd/ops.py); KV bytes are copied as bytes, so every
// dtype (bf16, fp16, fp32, fp8) takes the same path.

typedef long long i64;

// 16-byte path: every address and length in the table is a multiple of 16. Each lane keeps
// UNROLL independent 16-byte loads in flight (read-only path) before its stores.
extern "C" __global__ void __launch_bounds__(512) copy_ranges_v16(const i64* __restrict__ table, int rows) {
    constexpr int UNROLL = 8;
    const int lane = threadIdx.x & 31;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    for (int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
        const uint4* __restrict__ src = reinterpret_cast<const uint4*>(table[3 * r]);
        uint4* __restrict__ dst = reinterpret_cast<uint4*>(table[3 * r + 1]);
        const i64 n = table[3 * r + 2] >> 4;
        i64 i = lane;
        for (; i + (UNROLL - 1) * 32 < n; i += UNROLL * 32) {
            uint4 v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) v[u] = __ldg(src + i + u * 32);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) dst[i + u * 32] = v[u];
        }
        for (; i < n; i += 32) dst[i] = __ldg(src + i);
    }
}

// Any alignment: one byte per lane step (used only when some address or length is not a
// multiple of 16, which KV blocks never are).
extern "C" __global__ void __launch_bounds__(512) copy_ranges_bytes(const i64* __restrict__ table, int rows) {
    const int lane = threadIdx.x & 31;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    for (int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
        const unsigned char* __restrict__ src = reinterpret_cast<const unsigned char*>(table[3 * r]);
        unsigned char* __restrict__ dst = reinterpret_cast<unsigned char*>(table[3 * r + 1]);
        const i64 n = table[3 * r + 2];
        for (i64 i = lane; i < n; i += 32) dst[i] = src[i];
    }
}

// Variant kept for comparison in benchmarks/kernels.py: one 512-thread block per row.
extern "C" __global__ void __launch_bounds__(512) copy_ranges_v16_rowblock(const i64* __restrict__ table, int rows) {
    constexpr int UNROLL = 4;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const uint4* __restrict__ src = reinterpret_cast<const uint4*>(table[3 * r]);
        uint4* __restrict__ dst = reinterpret_cast<uint4*>(table[3 * r + 1]);
        const i64 n = table[3 * r + 2] >> 4;
        i64 i = threadIdx.x;
        for (; i + (UNROLL - 1) * blockDim.x < n; i += UNROLL * blockDim.x) {
            uint4 v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) v[u] = __ldg(src + i + u * blockDim.x);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) dst[i + u * blockDim.x] = v[u];
        }
        for (; i < n; i += blockDim.x) dst[i] = __ldg(src + i);
    }
}
