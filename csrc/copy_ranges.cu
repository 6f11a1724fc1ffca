// Byte-range copy for paged KV: one launch moves every range of a hand-off (all layers, all
// blocks), from vLLM's paged cache into pool pages, from pages back into paged blocks, or
// straight into a peer process's pool through a CUDA IPC mapping (the addresses are absolute).
//
// The host splits ranges into chunks of at most CHUNK bytes and passes a table of
// (src address, dst address, bytes) rows; block b copies rows b, b + gridDim.x, ...
// Built at run time with NVRTC (lmcache_pd/ops.py); KV bytes are copied as bytes, so every
// dtype (bf16, fp16, fp32, fp8) takes the same path.

typedef long long i64;

// 16-byte path: every address and length in the table is a multiple of 16.
// Each thread keeps UNROLL independent 16-byte loads in flight before its stores.
extern "C" __global__ void __launch_bounds__(256) copy_ranges_v16(const i64* __restrict__ table, int rows) {
    constexpr int UNROLL = 4;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const uint4* __restrict__ src = reinterpret_cast<const uint4*>(table[3 * r]);
        uint4* __restrict__ dst = reinterpret_cast<uint4*>(table[3 * r + 1]);
        const i64 n = table[3 * r + 2] >> 4;
        i64 i = threadIdx.x;
        for (; i + (UNROLL - 1) * blockDim.x < n; i += UNROLL * blockDim.x) {
            uint4 v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) v[u] = src[i + u * blockDim.x];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) dst[i + u * blockDim.x] = v[u];
        }
        for (; i < n; i += blockDim.x) dst[i] = src[i];
    }
}

// Any alignment: one byte per thread step (used only when some address or length is odd).
extern "C" __global__ void __launch_bounds__(256) copy_ranges_bytes(const i64* __restrict__ table, int rows) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const unsigned char* __restrict__ src = reinterpret_cast<const unsigned char*>(table[3 * r]);
        unsigned char* __restrict__ dst = reinterpret_cast<unsigned char*>(table[3 * r + 1]);
        const i64 n = table[3 * r + 2];
        for (i64 i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    }
}
