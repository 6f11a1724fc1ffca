/* The decode loader's watch over landing words (lmcache_pd/transport/landing.py; built at first
 * use by lmcache_pd/host_build.py with the system C compiler).
 *
 * Once a hand-off's writer has marked its word "launched" (its last copy is being queued:
 * pd_mark_word, below), the GPU's write of the word lands within microseconds of the
 * copy's last byte, but the semaphore post
 * that wakes a sleeping loader comes from CUDA's host-function thread, 50-150 us later (measured
 * on one H100: docs/benchmarks.md). So the loader watches the words here, in C, for a bounded
 * time: ctypes releases the GIL for the call, and vLLM's threads run meanwhile.
 *
 * Returns the index of the first watched word that holds its value; -1 when the semaphore was
 * posted (something else for the loader to look at: the caller takes the posts); -2 when the
 * budget ran out. */
#include <semaphore.h>
#include <stdint.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PD_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define PD_PAUSE() __asm__ __volatile__("yield")
#else
#define PD_PAUSE() ((void)0)
#endif

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int landed(const volatile uint32_t *words, const int64_t *slots, const uint32_t *values, int n) {
    for (int i = 0; i < n; i++)
        if (words[slots[i]] == values[i])
            return i;
    return -1;
}

int pd_spin_words(const volatile uint32_t *words, const int64_t *slots, const uint32_t *values, int n,
                  sem_t *sem, int64_t budget_ns) {
    const int64_t end = now_ns() + budget_ns;
    for (uint32_t k = 0;; k++) {
        int i = landed(words, slots, values, n);
        if (i >= 0)
            return i;
        if ((k & 31) == 0) { /* the clock and the semaphore every 32 looks: a look is nanoseconds */
            int posted = 0;
            if (sem != 0 && sem_getvalue(sem, &posted) == 0 && posted > 0) {
                /* A writer stores its word before it posts: once the post shows, so does a word
                 * stored before it (the fence orders our reads), and the word is the answer. */
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
                i = landed(words, slots, values, n);
                return i >= 0 ? i : -1;
            }
            if (now_ns() >= end)
                return -2;
        }
        PD_PAUSE();
    }
}

/* A writer's launched mark, set as it queues the copy (before or after the word's write): the word becomes
 * value | launched unless it holds value already (the GPU's write came first; the compare-and-swap
 * is atomic against it, so a mark never hides a landed value). 1: marked. */
int pd_mark_word(uint32_t *word, uint32_t value, uint32_t launched) {
    uint32_t seen = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    if (seen == value)
        return 0;
    return __atomic_compare_exchange_n(word, &seen, value | launched, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
