/* Register-blocked GEMM microkernels (fp32 6 x 16, integer 4 x 16: as many rows as the
 * 16 ymm registers hold without spilling; operands in L1) for the three ways an AVX2 CPU can
 * multiply-accumulate: what bounds any CPU GEMM built on each, whatever the library. Run by cpu_mac_peak.py.
 *
 *   fp32   vfmadd231ps                      8 MACs / instruction            (what fp32 sgemm runs)
 *   int16  vpmaddwd + vpaddd               16 MACs / 2 instructions         (exact for int8 x int8 codes)
 *   u8s8   vpmaddubsw + vpmaddwd + vpaddd  32 MACs / 3 instructions         (oneDNN's AVX2 int8 kernel; its int16
 *                                                                            pair sums saturate for 8-bit x 8-bit)
 * Prints one line per kernel: name, seconds of the best of TRIALS runs, multiply-accumulates done. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define KC 256
#define REPEATS 200000
#define TRIALS 5
#define ROWS6(M) M(0) M(1) M(2) M(3) M(4) M(5)
#define ROWS4(M) M(0) M(1) M(2) M(3)  /* the integer kernels need a temporary per product: 4 rows fit the 16 registers */

static float a_f32[6 * KC] __attribute__((aligned(64))), b_f32[KC * 16] __attribute__((aligned(64)));
static int16_t a_i16[6 * KC] __attribute__((aligned(64))), b_i16[KC * 16] __attribute__((aligned(64)));
static uint8_t a_u8[6 * KC] __attribute__((aligned(64)));
static int8_t b_s8[KC * 16] __attribute__((aligned(64)));
static volatile int64_t sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void fp32_kernel(void) {
#define ACC_F(i) __m256 c##i##a = _mm256_setzero_ps(), c##i##b = _mm256_setzero_ps();
    ROWS6(ACC_F)
    const float *a = a_f32, *b = b_f32;
    for (int k = 0; k < KC; k++, a += 6, b += 16) {
        __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#define FMA(i) { __m256 x = _mm256_broadcast_ss(a + i); \
        c##i##a = _mm256_fmadd_ps(x, b0, c##i##a); c##i##b = _mm256_fmadd_ps(x, b1, c##i##b); }
        ROWS6(FMA)
    }
#define SINK_F(i) sink += (int64_t)(c##i##a[0] + c##i##b[7]);
    ROWS6(SINK_F)
}

static void int16_kernel(void) {  /* K in pairs: B packed [K/2][16][2], A rows as int16 pairs */
#define ACC_I(i) __m256i d##i##a = _mm256_setzero_si256(), d##i##b = _mm256_setzero_si256();
    ROWS4(ACC_I)
    const int16_t *a = a_i16, *b = b_i16;
    for (int k = 0; k < KC; k += 2, a += 8, b += 32) {
        __m256i b0 = _mm256_load_si256((const __m256i *)b), b1 = _mm256_load_si256((const __m256i *)(b + 16));
#define MADD(i) { __m256i x = _mm256_set1_epi32(*(const int32_t *)(a + 2 * i)); \
        d##i##a = _mm256_add_epi32(d##i##a, _mm256_madd_epi16(x, b0)); \
        d##i##b = _mm256_add_epi32(d##i##b, _mm256_madd_epi16(x, b1)); }
        ROWS4(MADD)
    }
#define SINK_I(i) sink += _mm256_extract_epi32(d##i##a, 0) + _mm256_extract_epi32(d##i##b, 7);
    ROWS4(SINK_I)
}

static void u8s8_kernel(void) {  /* K in quads: B packed [K/4][16][4], A rows as u8 quads */
    const __m256i ones = _mm256_set1_epi16(1);
    ROWS4(ACC_I)
    const uint8_t *a = a_u8;
    const int8_t *b = b_s8;
    for (int k = 0; k < KC; k += 4, a += 16, b += 64) {
        __m256i b0 = _mm256_load_si256((const __m256i *)b), b1 = _mm256_load_si256((const __m256i *)(b + 32));
#define MADDUBS(i) { __m256i x = _mm256_set1_epi32(*(const int32_t *)(a + 4 * i)); \
        d##i##a = _mm256_add_epi32(d##i##a, _mm256_madd_epi16(_mm256_maddubs_epi16(x, b0), ones)); \
        d##i##b = _mm256_add_epi32(d##i##b, _mm256_madd_epi16(_mm256_maddubs_epi16(x, b1), ones)); }
        ROWS4(MADDUBS)
    }
    ROWS4(SINK_I)
}

static void run(const char *name, void (*kernel)(void), int rows) {
    double best = 1e30;
    for (int t = 0; t < TRIALS; t++) {
        double t0 = now();
        for (int r = 0; r < REPEATS; r++) kernel();
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    printf("%s %.6f %.0f\n", name, best, (double)REPEATS * KC * rows * 16);
}

int main(void) {
    for (int i = 0; i < 6 * KC; i++) { a_f32[i] = i % 7; a_i16[i] = i % 7; a_u8[i] = i % 7; }
    for (int i = 0; i < KC * 16; i++) { b_f32[i] = i % 5; b_i16[i] = i % 5; b_s8[i] = i % 5; }
    run("fp32", fp32_kernel, 6);
    run("int16", int16_kernel, 4);
    run("u8s8", u8s8_kernel, 4);
    return 0;
}
