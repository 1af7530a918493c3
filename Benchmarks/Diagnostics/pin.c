// An experiment, not kept: every thread of a process on one CPU. Loaded with LD_PRELOAD, before main it
// restricts the process to the CPU named by PIN_CPU (a number, or "auto" for the process id modulo 2);
// the threads it starts later inherit that. The question was whether a Choreo hop pays for waking its
// other threads (ledger writer, publisher connection, the concurrency pool) on the other virtual CPU,
// which needs an interrupt between CPUs and, on this VM, the host to run the halted one, where a C hop
// runs one thread throughout. /proc/PID/task/*/status shows Cpus_allowed_list. For the Choreo hops only:
//   cc -O2 -shared -fPIC -o /tmp/libpin.so Benchmarks/Diagnostics/pin.c
//   PIN_CPU=auto CHAIN_HOP_PRELOAD=/tmp/libpin.so .build/release/chain-benchmark --count 2000 --rounds 1
// (Benchmarks/NOTES.md has what it measured: nothing beyond the noise.)
#define _GNU_SOURCE
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((constructor)) static void pin(void) {
    const char *v = getenv("PIN_CPU");
    if (!v || !*v) return;
    int cpu = strcmp(v, "auto") == 0 ? (int)(getpid() % 2) : atoi(v);
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}
