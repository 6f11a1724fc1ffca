// Signatures of the kernels in csrc/ (loaded at run time by lmcache_pd/ops.py with NVRTC).
//
// table: device array of `rows` rows of three int64: (source address, destination address,
// bytes), each row at most ops.CHUNK_BYTES. Grid: one block per row up to the device's limit;
// 256 threads per block.
extern "C" __global__ void copy_ranges_v16(const long long* table, int rows);    // all 16-byte aligned
extern "C" __global__ void copy_ranges_bytes(const long long* table, int rows);  // any alignment
