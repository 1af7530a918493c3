// What the cold-work probes share: a monotonic clock in nanoseconds and an ordering for qsort.
#ifndef CHOREO_PROBE_H
#define CHOREO_PROBE_H
#include <time.h>

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
#endif
