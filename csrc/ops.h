// Signatures of the kernels in csrc/ (loaded at run time by lmcache_pd/ops.py with NVRTC).
//
// Each kernel takes one struct: the plan's per-range source addresses, destination addresses and
// the prefix sums of the lengths (prefix[0] = 0, prefix[r + 1] = prefix[r] + bytes of range r).
// The kernel cuts the prefix[n] bytes into chunks of `chunk` bytes, one warp per chunk, a
// persistent grid of 512-thread blocks striding over them. *_v16: addresses, lengths and chunk
// multiples of 16; *_bytes: any alignment.
struct TablePlan { const long long *src, *dst, *prefix; long long n, chunk; };  // uploaded arrays
template <int ROWS> struct InlinePlan {  // the whole plan in the launch parameters, ROWS = 64, 320, 1300
    long long n, chunk, src[ROWS], dst[ROWS], prefix[ROWS + 1];
};
extern "C" __global__ void copy_table_v16(const TablePlan p);
extern "C" __global__ void copy_table_bytes(const TablePlan p);
// copy_inline_v16_<ROWS>(const __grid_constant__ InlinePlan<ROWS> p), copy_inline_bytes_<ROWS>(...)
