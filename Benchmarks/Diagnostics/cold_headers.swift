// A probe: what reading a CloudEvent's attributes from its AMQP headers costs after a 5 ms sleep (caches
// cold, as at every event at 200/s), done three ways, interleaved, medians of 600 each:
//   current  - the headers into a [String: value] table (names and unchanged values reused by position,
//              as ChoreoAMQP's RecentStrings does), then EnvelopeCodec's loop over it: prefix, lower-case
//              check, a switch on the attribute's name;
//   bytes    - the same table, the attribute found by comparing bytes, no String made for the name;
//   fields   - no table: the headers in wire order as (name, value) pairs, the attribute found by
//              comparing bytes;
//   ordered  - no table: the headers in wire order, each position's attribute remembered from the
//              previous message when its name's bytes are the same.
// Twelve headers as Choreo writes them, six of their values new at every message.
//   swiftc -O -o /tmp/cold_headers Benchmarks/Diagnostics/cold_headers.swift && /tmp/cold_headers
// (Benchmarks/NOTES.md has what it measured.)
import Foundation

enum Value: Hashable {
    case string(String)
    case bytes([UInt8])
}

struct Header {
    var name: [UInt8]
    var value: [UInt8]
}

func message(_ n: Int) -> [Header] {
    func id() -> String { UUID().uuidString.lowercased() }
    let pairs = [
        ("cloudEvents_specversion", "1.0"), ("cloudEvents_id", id()), ("cloudEvents_source", "/bench/producer"),
        ("cloudEvents_type", "bench.step.a"), ("cloudEvents_time", "2026-11-27T03:12:44.\(n % 1000)Z"),
        ("cloudEvents_datacontenttype", "application/json"), ("cloudEvents_dataversion", "1"),
        ("cloudEvents_correlationid", id()), ("cloudEvents_causationid", id()),
        ("cloudEvents_idempotencykey", "k-\(n)"), ("cloudEvents_traceparent", "00-\(n)-01"), ("choreo-attempt", "1"),
    ]
    return pairs.map { Header(name: Array($0.0.utf8), value: Array($0.1.utf8)) }
}

let attributeNames = [
    "id", "source", "specversion", "type", "time", "subject", "datacontenttype", "dataschema", "dataversion",
    "correlationid", "causationid", "traceparent", "idempotencykey",
]
let attributeBytes = attributeNames.map { Array($0.utf8) }

/// The attributes read, by their index in `attributeNames`.
struct Attributes {
    var values = [String?](repeating: nil, count: 13)
    var extensions: [String: String] = [:]
}

// Strings of the previous message, by position.
var recentNames = [String?](repeating: nil, count: 32)
var recentValues = [String?](repeating: nil, count: 32)
func same(_ s: String, _ b: [UInt8]) -> Bool {
    var s = s
    return s.withUTF8 { u in
        u.count == b.count && b.withUnsafeBytes { memcmp(u.baseAddress!, $0.baseAddress!, u.count) == 0 }
    }
}
@inline(never) func name(_ i: Int, _ b: [UInt8]) -> String {
    if let last = recentNames[i], same(last, b) { return last }
    let s = String(decoding: b, as: UTF8.self)
    recentNames[i] = s
    return s
}
@inline(never) func value(_ i: Int, _ b: [UInt8]) -> String {
    if let last = recentValues[i], same(last, b) { return last }
    let s = String(validating: b, as: UTF8.self)!
    recentValues[i] = s
    return s
}

@inline(never) func table(_ headers: [Header]) -> [String: Value] {
    var t = [String: Value](minimumCapacity: headers.count)
    for (i, h) in headers.enumerated() { t[name(i, h.name)] = .string(value(i, h.value)) }
    return t
}

@inline(never) func current(_ headers: [Header]) -> Attributes {
    var a = Attributes()
    for (n, v) in table(headers) {
        guard n.hasPrefix("cloudEvents_") || n.hasPrefix("cloudEvents:"), case .string(let s) = v else { continue }
        var attribute = String(Substring(n.utf8.dropFirst(12)))
        if attribute.utf8.contains(where: { $0 >= 0x41 && $0 <= 0x5A }) { attribute = attribute.lowercased() }
        if let k = attributeNames.firstIndex(of: attribute) { a.values[k] = s } else { a.extensions[attribute] = s }
    }
    return a
}

/// The attribute's index for a header name, -1 for a header that is no attribute, 99 for an extension.
func attributeIndex(_ name: UnsafeBufferPointer<UInt8>) -> Int {
    guard name.count > 12, memcmp(name.baseAddress!, "cloudEvents", 11) == 0,
        name[11] == UInt8(ascii: "_") || name[11] == UInt8(ascii: ":")
    else { return -1 }
    let rest = UnsafeBufferPointer(rebasing: name[12...])
    for (k, a) in attributeBytes.enumerated() where a.count == rest.count {
        if a.withUnsafeBufferPointer({ memcmp($0.baseAddress!, rest.baseAddress!, rest.count) == 0 }) { return k }
    }
    return 99
}

@inline(never) func bytes(_ headers: [Header]) -> Attributes {
    var a = Attributes()
    for (n, v) in table(headers) {
        var n = n
        let k = n.withUTF8(attributeIndex)
        guard k >= 0, case .string(let s) = v else { continue }
        if k < 99 { a.values[k] = s } else { a.extensions[String(Substring(n.utf8.dropFirst(12)))] = s }
    }
    return a
}

@inline(never) func fields(_ headers: [Header]) -> Attributes {
    var list: [(String, Value)] = []
    list.reserveCapacity(headers.count)
    for (i, h) in headers.enumerated() { list.append((name(i, h.name), .string(value(i, h.value)))) }
    var a = Attributes()
    for (n, v) in list {
        var n = n
        let k = n.withUTF8(attributeIndex)
        guard k >= 0, case .string(let s) = v else { continue }
        if k < 99 { a.values[k] = s } else { a.extensions[String(Substring(n.utf8.dropFirst(12)))] = s }
    }
    return a
}

var recentIndexes = [(name: [UInt8], index: Int)?](repeating: nil, count: 32)
@inline(never) func ordered(_ headers: [Header]) -> Attributes {
    var a = Attributes()
    for (i, h) in headers.enumerated() {
        let k: Int
        if let last = recentIndexes[i], last.name == h.name {
            k = last.index
        } else {
            k = h.name.withUnsafeBufferPointer(attributeIndex)
            recentIndexes[i] = (h.name, k)
        }
        guard k >= 0 else { continue }
        let s = value(i, h.value)
        if k < 99 { a.values[k] = s } else { a.extensions[String(decoding: h.name.dropFirst(12), as: UTF8.self)] = s }
    }
    return a
}

func nanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

let ways: [(String, ([Header]) -> Attributes)] = [("current", current), ("bytes", bytes), ("fields", fields), ("ordered", ordered)]
var times = [[Double]](repeating: [], count: ways.count)
var check = 0
for n in 0..<2_430 {
    let headers = message(n)
    usleep(5_000)
    let w = n % ways.count
    let start = nanoseconds()
    let a = ways[w].1(headers)
    let took = Double(nanoseconds() - start) / 1_000
    check &+= a.values[0]!.utf8.count
    if n >= 30 { times[w].append(took) }
}
for (w, way) in ways.enumerated() {
    print("\(way.0): \(times[w].sorted()[times[w].count / 2]) µs")
}
print("(\(check))")
