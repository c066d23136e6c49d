// Read bandwidth of the packed decode kernel's access pattern at one thread: the same bytes
// read in order, by the kernel's 4-row walk (rows of COLS 2-bit weights, 32 bytes per 128
// weights, four rows advanced together), with the walk's old prefetch (8 KiB ahead in each
// row's own stream) and with the prefetch ahead of the row block in the order it lies (what
// src/kernels/ternary_matmul.rs does since session 20). No computation: only the loads.
//   gcc -O2 -mavx2 scripts/walk_bw.c -o walk_bw && ./walk_bw [COLS...]   (default 1024 3072)
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

enum { ROWS = 4, PREFETCH = 8192 };

// mode 0: in order; 1: 4-row walk; 2: walk + per-row prefetch; 3: walk + block-order prefetch
static __m256i pass(const unsigned char *c, size_t n, size_t cb, int mode) {
  __m256i acc = _mm256_setzero_si256();
  if (mode == 0) {
    for (size_t i = 0; i < n; i += 32) acc = _mm256_add_epi8(acc, _mm256_load_si256((const void *)(c + i)));
    return acc;
  }
  for (size_t r = 0; r + ROWS <= n / cb; r += ROWS) {
    const unsigned char *block = c + r * cb;
    for (size_t sb = 0; sb < cb / 32; sb++)
      for (int j = 0; j < ROWS; j++) {
        const unsigned char *at = block + j * cb + sb * 32;
        if (mode == 2) _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
        if (mode == 3) _mm_prefetch((const char *)block + (sb * ROWS + j) * 32 + PREFETCH, _MM_HINT_T0);
        acc = _mm256_add_epi8(acc, _mm256_loadu_si256((const void *)at));
      }
  }
  return acc;
}

int main(int argc, char **argv) {
  size_t n = 192ul << 20;  // larger than any last-level cache here
  unsigned char *c = aligned_alloc(64, n);
  memset(c, 1, n);
  const char *names[] = {"in order", "4-row walk", "walk + per-row prefetch", "walk + block-order prefetch"};
  int defaults[] = {1024, 3072};
  int ncols = argc > 1 ? argc - 1 : 2;
  for (int k = 0; k < ncols; k++) {
    size_t cols = argc > 1 ? (size_t)atoi(argv[k + 1]) : (size_t)defaults[k];
    size_t cb = cols / 128 * 32;
    if (cb == 0) { fprintf(stderr, "error: COLS must be at least 128\n"); return 1; }
    printf("cols %zu:", cols);
    for (int mode = 0; mode < 4; mode++) {
      double best = 0;
      for (int rep = 0; rep < 3; rep++) {
        double t0 = now();
        volatile int sink = _mm256_extract_epi32(pass(c, n, cb, mode), 0);
        (void)sink;
        double gbs = n / (now() - t0) / 1e9;
        if (gbs > best) best = gbs;
      }
      printf("  %s %.1f GB/s%s", names[mode], best, mode < 3 ? "," : "\n");
    }
  }
  free(c);
  return 0;
}
