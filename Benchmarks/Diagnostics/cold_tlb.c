// Whether a hop's cold start at each event is address translation: one cache line read from each of
// PAGES pages after a 5 ms sleep, in a buffer on 2 MiB transparent huge pages (one TLB entry) and in one
// on 4 KiB pages (one entry per page), interleaved. Needs THP "madvise" or "always"; it prints how much
// of the heap the kernel did put on huge pages.
//   cc -O2 -o /tmp/cold_tlb Benchmarks/Diagnostics/cold_tlb.c && /tmp/cold_tlb 64 && /tmp/cold_tlb 256
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "probe.h"

#define HUGE (2UL << 20)
#define SIZE (8UL << 20)
#define ROUNDS 1500

static char *buffer(int huge) {
    char *raw = mmap(NULL, SIZE + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    char *aligned = (char *)(((unsigned long)raw + HUGE - 1) & ~(HUGE - 1));
    madvise(aligned, SIZE, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    memset(aligned, 1, SIZE);
    return aligned;
}

int main(int argc, char **argv) {
    int pages = argc > 1 ? atoi(argv[1]) : 64;
    if (pages < 1 || (unsigned long)pages * 4096 > SIZE) {
        fprintf(stderr, "usage: cold_tlb [PAGES, 1 to %lu]\n", SIZE / 4096);
        return 2;
    }
    char *buffers[2] = {buffer(1), buffer(0)};
    FILE *smaps = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    while (smaps && fgets(line, sizeof line, smaps))
        if (strstr(line, "AnonHugePages")) fputs(line, stdout);
    if (smaps) fclose(smaps);
    static double took[2][ROUNDS];
    volatile long sink = 0;
    for (int i = 0; i < ROUNDS; i++) {
        for (int k = 0; k < 2; k++) {
            usleep(5000);
            double start = now_ns();
            long sum = 0;
            for (int p = 0; p < pages; p++) sum += buffers[k][p * 4096 + (p * 64) % 4096];
            took[k][i] = now_ns() - start;
            sink += sum;
        }
    }
    for (int k = 0; k < 2; k++) {
        qsort(took[k], ROUNDS, sizeof(double), by_value);
        printf("%-15s %4d pages: p50 %6.2f us   p90 %6.2f us\n", k ? "4 KiB pages" : "2 MiB pages", pages,
               took[k][ROUNDS / 2] / 1000, took[k][ROUNDS * 9 / 10] / 1000);
    }
    return 0;
}
