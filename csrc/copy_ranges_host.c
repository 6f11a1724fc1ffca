/* Host memory: copy every byte range of a plan in one call (lmcache_pd/host_copy.py builds this
 * with the system C compiler at first use). The caller checked the bounds.
 *
 * One copy per range: the loop costs nanoseconds per range where a Python loop of
 * ctypes.memmove costs microseconds. With `stream` set (a large plan between two buffers), the
 * ranges are written with non-temporal stores, as glibc's memcpy does for one large copy: the
 * destination lines are not read first and do not evict the cache (measured on the 2-vCPU
 * machine, 64 MiB in 16 KiB ranges: 15 ms against 19 ms with memmove; docs/benchmarks.md). */
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static void copy_streaming(uint8_t *d, const uint8_t *s, size_t n) {
#if defined(__SSE2__)
    while (n && ((uintptr_t)d & 15)) { /* to a 16-byte aligned destination */
        *d++ = *s++;
        n--;
    }
    size_t lines = n / 64;
    for (size_t i = 0; i < lines; i++, s += 64, d += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + 0)), b = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + 32)), e = _mm_loadu_si128((const __m128i *)(s + 48));
        _mm_stream_si128((__m128i *)(d + 0), a);
        _mm_stream_si128((__m128i *)(d + 16), b);
        _mm_stream_si128((__m128i *)(d + 32), c);
        _mm_stream_si128((__m128i *)(d + 48), e);
    }
    n -= lines * 64;
#endif
    memcpy(d, s, n);
}

void pd_copy_ranges(const uint8_t *src, uint8_t *dst, const int64_t *src_offsets, const int64_t *dst_offsets,
                    const int64_t *lengths, int64_t n, int64_t stream) {
    for (int64_t i = 0; i < n; i++) {
        if (stream)
            copy_streaming(dst + dst_offsets[i], src + src_offsets[i], (size_t)lengths[i]);
        else
            memmove(dst + dst_offsets[i], src + src_offsets[i], (size_t)lengths[i]);
    }
#if defined(__SSE2__)
    if (stream)
        _mm_sfence(); /* the streamed stores are visible before the caller reports the copy done */
#endif
}

/* The digest of digests._digest (the GPU's: csrc/digest.cu), over units of `unit_bytes` (a block):
 * per unit, the sum of its 8-byte words times odd weights by their index in the unit, times an
 * odd multiplier drawn from the unit's place; summed mod 2**64. `place` is the unit's offset on
 * the side that is a chunk (the node cache daemon's slot). Additive over units: a load that
 * copies some pages adds the sum of the others. */
#define PD_GOLDEN 0x9E3779B97F4A7C15ull

static uint64_t unit_sum(const uint8_t *p, int64_t words) {
    /* Four independent chains (word i in chain i % 4): the multiplies overlap. */
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    uint64_t w0 = PD_GOLDEN, w1 = 2 * PD_GOLDEN, w2 = 3 * PD_GOLDEN, w3 = 4 * PD_GOLDEN; /* (i + 1) * golden */
    const uint64_t step = 4 * PD_GOLDEN;
    int64_t i = 0;
    for (; i + 4 <= words; i += 4, w0 += step, w1 += step, w2 += step, w3 += step) {
        uint64_t x[4];
        memcpy(x, p + 8 * i, 32);
        a0 += x[0] * (w0 | 1);
        a1 += x[1] * (w1 | 1);
        a2 += x[2] * (w2 | 1);
        a3 += x[3] * (w3 | 1);
    }
    for (; i < words; i++, w0 += PD_GOLDEN) {
        uint64_t x;
        memcpy(&x, p + 8 * i, 8);
        a0 += x * (w0 | 1);
    }
    return a0 + a1 + a2 + a3;
}

/* Copy the ranges (unless `copy` is 0) and return the digest of the bytes copied, each unit at
 * its place on the chunk side (`places_on_dst`: the destination's offsets, else the source's).
 * Each unit is summed right before it is copied, while its bytes are in the cache. Every range
 * is whole units; the caller checked that and the bounds. */
uint64_t pd_copy_ranges_sum(const uint8_t *src, uint8_t *dst, const int64_t *src_offsets, const int64_t *dst_offsets,
                            const int64_t *lengths, int64_t n, int64_t stream, int64_t places_on_dst,
                            int64_t unit_bytes, int64_t copy) {
    uint64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t off = 0; off < lengths[i]; off += unit_bytes) {
            const uint8_t *s = src + src_offsets[i] + off;
            uint64_t place = (uint64_t)((places_on_dst ? dst_offsets[i] : src_offsets[i]) + off);
            total += unit_sum(s, unit_bytes / 8) * ((place * PD_GOLDEN) | 1);
            if (!copy)
                continue;
            if (stream)
                copy_streaming(dst + dst_offsets[i] + off, s, (size_t)unit_bytes);
            else
                memmove(dst + dst_offsets[i] + off, s, (size_t)unit_bytes);
        }
    }
#if defined(__SSE2__)
    if (copy && stream)
        _mm_sfence();
#endif
    return total;
}
