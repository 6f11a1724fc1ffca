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
