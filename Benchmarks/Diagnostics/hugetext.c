// An experiment, not kept: a process's code on transparent huge pages. Loaded with LD_PRELOAD, before
// main it moves the 2 MiB-aligned part of each r-x mapping of the main executable and of libswiftCore
// onto huge pages: it copies the code into an anonymous region advised MADV_HUGEPAGE and mremaps that
// over the original (this library's own code, which runs it, stays where it is). It needs THP "madvise"
// or "always"; /proc/PID/smaps then shows AnonHugePages on those mappings. With HUGETEXT_VERBOSE set
// it says what it moved. In the chain benchmark, for the Choreo hops only:
//   cc -O2 -shared -fPIC -o /tmp/libhugetext.so Benchmarks/Diagnostics/hugetext.c
//   CHAIN_HOP_PRELOAD=/tmp/libhugetext.so .build/release/chain-benchmark --count 2000 --rounds 1
// (Benchmarks/NOTES.md has what it measured: the hops held an event longer, not shorter.)
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HUGE (2UL << 20)
#define MAX_MAPPINGS 16

static void move_to_huge_pages(unsigned long start, unsigned long end, const char *name) {
    unsigned long from = (start + HUGE - 1) & ~(HUGE - 1), to = end & ~(HUGE - 1);
    if (to <= from) return;
    unsigned long length = to - from;
    char *raw = mmap(NULL, length + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return;
    char *aligned = (char *)(((unsigned long)raw + HUGE - 1) & ~(HUGE - 1));
    // The scratch mapping's unaligned ends are not needed.
    if (aligned > raw) munmap(raw, aligned - raw);
    if (aligned + length < raw + length + HUGE) munmap(aligned + length, raw + length + HUGE - (aligned + length));
    int moved = madvise(aligned, length, MADV_HUGEPAGE) == 0;
    if (moved) {
        memcpy(aligned, (void *)from, length);
        moved = mprotect(aligned, length, PROT_READ | PROT_EXEC) == 0
            && mremap(aligned, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)from) == (void *)from;
    }
    if (!moved) munmap(aligned, length);
    if (getenv("HUGETEXT_VERBOSE"))
        fprintf(stderr, "hugetext: %s %lx-%lx (%lu MiB) %s\n", name, from, to, length >> 20, moved ? "moved" : "left");
}

__attribute__((constructor)) static void hugetext(void) {
    char self[256];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    self[n > 0 ? n : 0] = 0;
    FILE *maps = fopen("/proc/self/maps", "r");
    if (!maps) return;
    unsigned long starts[MAX_MAPPINGS], ends[MAX_MAPPINGS];
    char names[MAX_MAPPINGS][256];
    int count = 0;
    char line[512];
    while (count < MAX_MAPPINGS && fgets(line, sizeof line, maps)) {
        unsigned long start, end;
        char permissions[8], path[256] = "";
        if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %255s", &start, &end, permissions, path) < 3) continue;
        if (strcmp(permissions, "r-xp") != 0) continue;
        if (strcmp(path, self) != 0 && !strstr(path, "libswiftCore.so")) continue;
        starts[count] = start;
        ends[count] = end;
        snprintf(names[count], sizeof names[count], "%s", path);
        count++;
    }
    fclose(maps);
    // Moved after reading: /proc/self/maps changes as mappings move.
    for (int i = 0; i < count; i++) move_to_huge_pages(starts[i], ends[i], names[i]);
}
