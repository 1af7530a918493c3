#!/usr/bin/env python3
"""Where an event's time goes in the chain benchmark, from the wire.

Reads a loopback capture of the benchmark's broker port (tcpdump -i lo -w FILE tcp port 5675) and
follows each producer id (bench.choreo-N-xxxxxx, bench.c-N-xxxxxx), which every message of the
event's chain carries in its headers (as the correlation id). Its six appearances, in time order,
are: the producer's publish, the delivery to hop A, A's publish, the delivery to B, B's publish,
the delivery to the sink. The differences are the broker's three hops and the time each hop held
the event (delivery on the wire to its publish on the wire). Only events numbered from FIRST on
are counted (the benchmark numbers its paced events from --count; warm-up ids are negative).

    python3 Benchmarks/WireLatency/wire_latency.py capture.pcap [PORT=5675] [FIRST=0]
"""
import re
import statistics
import struct
import sys
from collections import defaultdict


def packets(path):
    """(timestamp, source port, destination port, TCP payload) of each IPv4 packet in a pcap file."""
    with open(path, "rb") as f:
        header = f.read(24)
        magic = struct.unpack("<I", header[:4])[0]
        if magic not in (0xA1B2C3D4, 0xA1B23C4D):
            sys.exit(f"{path}: not a little-endian pcap file (tcpdump -w writes one)")
        scale = 1e9 if magic == 0xA1B23C4D else 1e6
        link = struct.unpack("<I", header[20:24])[0]
        offset = {1: 14, 113: 16}.get(link, 0)  # Ethernet (lo), Linux cooked (any)
        while True:
            record = f.read(16)
            if len(record) < 16:
                return
            seconds, fraction, length, _ = struct.unpack("<IIII", record)
            data = f.read(length)
            ip = data[offset:]
            if len(ip) < 20 or ip[0] >> 4 != 4:
                continue
            tcp = ip[(ip[0] & 15) * 4:]
            source, destination = struct.unpack(">HH", tcp[:4])
            payload = tcp[(tcp[12] >> 4) * 4:]
            if payload:
                yield seconds + fraction / scale, source, destination, payload


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 5675
    first = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    producer_id = re.compile(rb"bench\.(?:choreo|c)-(\d+)-[0-9A-Za-z]{6}")
    seen = defaultdict(list)
    for t, source, destination, payload in packets(path):
        direction = "to" if destination == port else "from" if source == port else None
        if direction:
            for match in set(m.group(0) for m in producer_id.finditer(payload)):
                seen[match].append((t, direction))
    stages = ["broker to A", "A", "broker to B", "B", "broker to sink"]
    chains = defaultdict(lambda: defaultdict(list))
    skipped = 0
    for event, appearances in seen.items():
        if int(event.split(b"-")[1]) < first:
            continue
        appearances.sort()
        if [d for _, d in appearances] != ["to", "from"] * 3:
            skipped += 1  # split across packets, or still in flight when the capture ended
            continue
        chain = event.split(b"-")[0].decode()
        for k, stage in enumerate(stages):
            chains[chain][stage].append((appearances[k + 1][0] - appearances[k][0]) * 1e6)
        chains[chain]["wire, producer to sink"].append((appearances[5][0] - appearances[0][0]) * 1e6)
    for chain, by_stage in sorted(chains.items()):
        print(chain)
        for stage, xs in by_stage.items():
            xs.sort()
            print(
                f"  {stage:24s} n={len(xs):6d}  p50 {xs[len(xs) // 2]:7.0f} us  "
                f"p90 {xs[int(len(xs) * 0.9)]:7.0f} us  mean {statistics.mean(xs):7.0f} us"
            )
    if skipped:
        print(f"({skipped} events not seen six times, left out)")


main()
