// Signatures of the kernels in csrc/ (loaded at run time by lmcache_pd/ops.py with NVRTC).
//
// rows: device array of n rows of three int64: (source address, destination address, bytes),
// one per range of a plan; prefix: n + 1 int64, prefix[0] = 0, prefix[r + 1] = prefix[r] + bytes
// of row r. The kernel cuts the prefix[n] bytes into chunks of `chunk` bytes, one warp per chunk,
// a persistent grid of 512-thread blocks striding over them.
extern "C" __global__ void copy_plan_v16(const long long* rows, const long long* prefix, int n,
                                         long long chunk);    // addresses, lengths and chunk % 16 == 0
extern "C" __global__ void copy_plan_bytes(const long long* rows, const long long* prefix, int n,
                                           long long chunk);  // any alignment
