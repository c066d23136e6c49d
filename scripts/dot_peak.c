// Peak multiply-add rate of one core for the dense GEMMs of CPU training: 512-bit f32 FMA
// (vfmadd231ps, 16 MACs) against AVX512-BF16's pair dot product (vdpbf16ps, 32 MACs), each in a
// register-only loop of 16 independent accumulators (no loads, no latency limit; -O3 unrolls the
// 16 chains into registers). Whether bf16 can beat f32 on a CPU without AMX is decided here:
// vdpbf16ps doubles the MACs per instruction, but some cores issue it at a fraction of the FMA
// rate. Prints GMAC/s of each and their ratio.
//   gcc -O3 -mavx512f -mavx512bf16 scripts/dot_peak.c -o dot_peak && taskset -c 0 ./dot_peak
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 16
#define ITERS 100000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// The accumulators are kept live through the loop and summed at the end, so the compiler can
// neither drop nor merge the chains; `x` and `y` come from memory so nothing folds.
static float fma_loop(const float *src) {
    __m512 acc[CHAINS], x = _mm512_loadu_ps(src), y = _mm512_loadu_ps(src + 16);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_setzero_ps();
    for (long i = 0; i < ITERS; i++)
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_fmadd_ps(x, y, acc[c]);
    __m512 s = _mm512_setzero_ps();
    for (int c = 0; c < CHAINS; c++) s = _mm512_add_ps(s, acc[c]);
    return _mm512_reduce_add_ps(s);
}

static float dp_loop(const float *src) {
    __m512bh x = (__m512bh)_mm512_loadu_si512(src), y = (__m512bh)_mm512_loadu_si512(src + 16);
    __m512 acc[CHAINS];
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_setzero_ps();
    for (long i = 0; i < ITERS; i++)
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbf16_ps(acc[c], x, y);
    __m512 s = _mm512_setzero_ps();
    for (int c = 0; c < CHAINS; c++) s = _mm512_add_ps(s, acc[c]);
    return _mm512_reduce_add_ps(s);
}

int main(void) {
    static float src[32];
    for (int i = 0; i < 32; i++) src[i] = 1.0f; // normal values: denormals would take microcode assists
    const double instr = (double)ITERS * CHAINS;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now();
        volatile float a = fma_loop(src);
        double t1 = now();
        volatile float b = dp_loop(src);
        double t2 = now();
        (void)a, (void)b;
        double f = instr * 16 / (t1 - t0) / 1e9, d = instr * 32 / (t2 - t1) / 1e9;
        printf("f32 fma %.1f GMAC/s   bf16 dp %.1f GMAC/s   bf16 / f32 %.2f\n", f, d, d / f);
    }
    return 0;
}
