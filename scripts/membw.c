// Read bandwidth of this machine: threads sum disjoint slices of a 1 GiB buffer (the access
// pattern of a matrix-vector product over weights that do not fit in cache). Prints GB/s.
//   gcc -O3 -march=native -fopenmp scripts/membw.c -o membw && ./membw THREADS
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    size_t n = (1ull << 30) / sizeof(uint64_t);
    uint64_t *a = malloc(n * sizeof(uint64_t));
    for (size_t i = 0; i < n; i++) a[i] = i;
    omp_set_num_threads(threads);
    double best = 0;
    uint64_t sink = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = omp_get_wtime();
        uint64_t s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (size_t i = 0; i < n; i++) s += a[i];
        double dt = omp_get_wtime() - t0;
        sink += s;
        double gbs = n * sizeof(uint64_t) / dt / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("%.2f\n", best);
    return sink == 42;
}
