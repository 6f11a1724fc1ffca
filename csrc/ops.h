// Signatures of the kernels in csrc/ (loaded at run time by lmcache_pd/ops.py with NVRTC).
//
// table: device array of `rows` rows of three int64: (source address, destination address,
// bytes), each row at most ops.CHUNK_BYTES. One warp per row; a persistent grid of 512-thread
// blocks (a few per multiprocessor) strides over the rows.
extern "C" __global__ void copy_ranges_v16(const long long* table, int rows);    // all 16-byte aligned
extern "C" __global__ void copy_ranges_bytes(const long long* table, int rows);  // any alignment
