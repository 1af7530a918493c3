#!/usr/bin/env python3
"""How much memory, by mapping, a process touches while it works: its pages' referenced bits are
cleared (/proc/PID/clear_refs), and 50 ms later /proc/PID/smaps says which pages were used since, per
mapping (the executable, each shared library, the heap and other anonymous memory). Every process whose
command line matches PATTERN is sampled in turn, over and over, until none is left.

At 200 events/s a window holds about ten events, and in a chain round of `--count 2000` the paced
phase is most of a hop's life, so the median window is one of it. The quietest window, between phases,
shows what a process touches with no event: on this machine nothing, its threads all blocked. The
report gives, per process and mapping, the median window, the quietest one and their difference.
Run as root, beside the chain benchmark, for example:

    python3 Benchmarks/Diagnostics/footprint.py 'chain-benchmark hop a|bench.c.a ' &
    .build/release/chain-benchmark --count 2000 --rounds 1
"""

import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict

WINDOW = 0.05
MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def ancestors():
    """This process and its parents, whose command lines may hold the pattern too."""
    chain, pid = set(), os.getpid()
    while pid > 1:
        chain.add(str(pid))
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return chain


def pids(pattern, skip):
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [p for p in found if p not in skip]


def command(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:90]
    except OSError:
        return None


def referenced(pid):
    """kB referenced per mapping name; empty or None when the process is gone."""
    per = defaultdict(int)
    name = "[anon]"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if MAPPING.match(line):
                    fields = line.split()
                    name = os.path.basename(fields[5]) if len(fields) > 5 else "[anon]"
                elif line.startswith("Referenced:"):
                    per[name] += int(line.split()[1])
    except OSError:
        return None
    return per


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: footprint.py PATTERN   (a pgrep -f pattern for the processes to sample)")
    pattern = sys.argv[1]
    skip = ancestors()
    windows = defaultdict(list)
    names = {}
    deadline = time.monotonic() + 60
    while not pids(pattern, skip):
        if time.monotonic() > deadline:
            sys.exit(f"no process matches {pattern!r} within 60 s")
        time.sleep(0.1)
    while True:
        live = pids(pattern, skip)
        if not live:
            break
        for pid in live:
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("1")
            except OSError:
                continue
            names.setdefault(pid, command(pid))
            time.sleep(WINDOW)
            sample = referenced(pid)
            # An exiting process's smaps is empty: not a window, and it would pass for the quietest one.
            if sample:
                windows[pid].append(sample)
        time.sleep(0.2)
    for pid, samples in windows.items():
        if len(samples) < 10:
            continue
        samples.sort(key=lambda s: sum(s.values()))
        quietest = samples[0]
        mappings = set().union(*samples)
        rows = []
        for m in mappings:
            median = statistics.median(s.get(m, 0) for s in samples)
            rows.append((median - quietest.get(m, 0), median, quietest.get(m, 0), m))
        rows.sort(reverse=True)
        total = statistics.median(sum(s.values()) for s in samples)
        extra = sum(r[0] for r in rows)
        print(f"{pid} {names[pid]}")
        print(f"  {len(samples)} windows of {WINDOW * 1000:.0f} ms: median {total:.0f} kB, "
              f"{extra:.0f} kB ({extra / 4:.0f} pages) above the quietest window")
        print("  median-quietest kB   median kB   quietest kB  mapping")
        for delta, median, quiet, m in rows:
            if abs(delta) >= 8:
                print(f"  {delta:18.0f} {median:11.0f} {quiet:13.0f}  {m}")

if __name__ == "__main__":
    main()
