#!/usr/bin/env python3
"""Where a lone event's time goes inside a Choreo hop, from the stage marks of stage-trace.patch.

Usage: python3 Benchmarks/Diagnostics/stages.py PREFIX
reads PREFIX.<pid> (one file per hop process, lines "stage nanoseconds thread") and prints, per process,
the median time of each stage since the I/O thread woke up, and the median of each step. Only events that
arrive alone count (2 ms or more after the process's previous mark): the paced phase at 200 events/s.
The chain benchmark starts its Choreo hops in the order sink, B, A, so (pids ascending, unless they
wrapped) the files come in that order; the sink's has no "publish sent".
"""
import glob
import statistics
import sys

NAMES = {
    0: "I/O thread woke (socket)", 15: "first frame read", 16: "properties decoded", 1: "delivery built",
    2: "consume loop has it", 18: "decode() start", 17: "envelope decoded", 3: "payload decoded",
    4: "claimed", 5: "invocation started", 6: "handler done", 7: "settle start", 8: "complete() called",
    23: "ledger write starts", 9: "in the writer, BEGIN next", 14: "inserts done", 10: "COMMIT done", 11: "complete() returned", 12: "outbox encoded",
    13: "publish sent", 19: "core.publish", 20: "properties in C", 21: "frames encoded", 22: "tracked",
}
ORDER = [0, 15, 16, 1, 2, 18, 17, 3, 4, 5, 6, 7, 8, 23, 9, 14, 10, 11, 12, 19, 20, 21, 22, 13]
# Marks that come before the delivery (per wake-up, per frame) and after it (first occurrence).
BEFORE = {0, 15, 16}


def events(rows):
    """Lone events: each a dict stage -> first time (stages before the delivery: of its own wake-up)."""
    out, current, last = [], None, -(10**18)
    wake = first_frame = properties = None
    for stage, ns, thread in rows:
        if stage == 0:
            wake, first_frame = ns, None
        elif stage == 15:
            first_frame = first_frame or ns
        elif stage == 16:
            properties = ns
        elif stage == 1:
            current = None
            if ns - last > 2_000_000 and wake is not None and ns - wake < 1_000_000:
                current = {0: wake, 15: first_frame, 16: properties, 1: ns, "threads": {1: thread}}
                out.append(current)
        elif current is not None and stage not in current:
            current[stage] = ns
            current["threads"][stage] = thread
        if stage not in BEFORE:
            last = ns
    return out


def main(prefix):
    for path in sorted(glob.glob(prefix + ".*")):
        rows = sorted((tuple(map(int, line.split())) for line in open(path)), key=lambda r: r[1])
        evs = [e for e in events(rows) if all(e.get(k) is not None for k in (1, 2, 3, 4, 5, 6))]
        print(f"{path}: {len(evs)} lone events")
        if not evs:
            continue
        previous = 0
        for stage in ORDER:
            since = [e[stage] - e[0] for e in evs if e.get(stage) is not None]
            if not since:
                continue
            step = [e[stage] - e[previous] for e in evs if e.get(stage) is not None and e.get(previous) is not None]
            print(
                f"  {NAMES[stage]:26} {statistics.median(since) / 1000:7.1f} us since wake-up"
                f"   step {statistics.median(step) / 1000 if step else 0:6.1f} us")
            previous = stage
        on_io = sum(1 for e in evs if e["threads"].get(5) == e["threads"][1]) / len(evs)
        print(f"  invocations run on the I/O thread: {on_io * 100:.0f} %")


if __name__ == "__main__":
    main(sys.argv[1])
