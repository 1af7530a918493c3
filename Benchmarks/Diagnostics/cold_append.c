// What a write-ahead log's frames cost when they come alone, as an event's commit does at 200/s: four
// frames of 4,120 bytes (SQLite's 24-byte frame header and a 4 KiB page) written with pwrite after a 5 ms
// sleep, appended past the end of a growing file against written over a 4 MB region written before (the
// pages the system caches), interleaved so that the machine's drift touches both alike. A log that keeps
// growing pays the first: the kernel allocates, zeroes and charges a page-cache page and reserves a block
// for each page written past the end. A log started over pays the second.
//   cc -O2 -o /tmp/cold_append Benchmarks/Diagnostics/cold_append.c && /tmp/cold_append [DIR]
// DIR (default: the current directory) should be on the file system the ledgers use.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "probe.h"

#define FRAME 4120
#define FRAMES_PER_COMMIT 4
#define REUSED_FRAMES 1000L
#define ROUNDS 1500

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : ".";
    char appendPath[512], reusePath[512];
    snprintf(appendPath, sizeof appendPath, "%s/cold_append.grow", dir);
    snprintf(reusePath, sizeof reusePath, "%s/cold_append.reuse", dir);
    int grow = open(appendPath, O_RDWR | O_CREAT | O_TRUNC, 0644);
    int reuse = open(reusePath, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (grow < 0 || reuse < 0) {
        perror("open");
        return 1;
    }
    char frame[FRAME];
    memset(frame, 7, sizeof frame);
    for (long i = 0; i < REUSED_FRAMES; i++) {
        if (pwrite(reuse, frame, FRAME, i * FRAME) != FRAME) {
            perror("pwrite");
            return 1;
        }
    }
    fdatasync(reuse);

    static double appended[ROUNDS], rewritten[ROUNDS];
    off_t end = 0, at = 0;
    int failed = 0;
    for (int r = 0; r < ROUNDS; r++) {
        usleep(5000);
        double t0 = now_ns();
        for (int k = 0; k < FRAMES_PER_COMMIT; k++, end += FRAME) failed |= pwrite(grow, frame, FRAME, end) != FRAME;
        appended[r] = now_ns() - t0;
        usleep(5000);
        t0 = now_ns();
        for (int k = 0; k < FRAMES_PER_COMMIT; k++, at = (at + FRAME) % (REUSED_FRAMES * FRAME))
            failed |= pwrite(reuse, frame, FRAME, at) != FRAME;
        rewritten[r] = now_ns() - t0;
    }
    unlink(appendPath);
    unlink(reusePath);
    if (failed) {
        fprintf(stderr, "a write failed\n");
        return 1;
    }
    qsort(appended, ROUNDS, sizeof(double), by_value);
    qsort(rewritten, ROUNDS, sizeof(double), by_value);
    printf("%d frames after 5 ms asleep, medians of %d (p90): appended %.1f us (%.1f), rewritten %.1f us (%.1f)\n",
           FRAMES_PER_COMMIT, ROUNDS, appended[ROUNDS / 2] / 1000, appended[ROUNDS * 9 / 10] / 1000,
           rewritten[ROUNDS / 2] / 1000, rewritten[ROUNDS * 9 / 10] / 1000);
    return 0;
}
