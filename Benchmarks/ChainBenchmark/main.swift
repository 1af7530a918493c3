import Choreo
import ChoreoAMQP
import ChoreoPostgres
import Foundation
import Synchronization

// The chain benchmark: producer -> A -> B -> sink, each hop its own process, persistent messages, publisher
// confirms and a SQLite ledger per hop; then the same chain written directly against rabbitmq-c in C
// (chain-baseline-c: same broker, the same CloudEvents messages, one SQLite insert per event per hop).
//
//   chain-benchmark [--url URL] [--count 20000] [--rate 200] [--seconds 10] [--rounds 3]   the driver (release mode)
//       [--postgres URL]   also the Choreo chain with its hops' ledgers on that PostgreSQL database
//   chain-benchmark --hop-cost [--count 40000] [--rounds 3]                                  CPU per event of one hop alone
//   chain-benchmark hop ROLE [runner options]                                              one Choreo hop (a, b or sink)

struct Start: Event { static let eventType = "bench.start"; var n: Int; var sentAt: Double }
struct AtA: Event { static let eventType = "bench.a"; var n: Int; var sentAt: Double }
struct AtB: Event { static let eventType = "bench.b"; var n: Int; var sentAt: Double }

struct HopA: EventHandler {
    let name = "hop"
    var emits: [any Event.Type] { [AtA.self] }
    func handle(_ e: Start, context: HandlerContext) async throws { try context.emit(AtA(n: e.n, sentAt: e.sentAt)) }
}

struct HopB: EventHandler {
    let name = "hop"
    var emits: [any Event.Type] { [AtB.self] }
    func handle(_ e: AtA, context: HandlerContext) async throws { try context.emit(AtB(n: e.n, sentAt: e.sentAt)) }
}

/// Appends each event's end-to-end latency (microseconds since the producer stamped it) to a file.
/// Written as the C sink writes its lines: by the handler itself, after it read the clock, with one write
/// for the lines of handlers that finished meanwhile (a lone event at 200/s: one write of its line; a burst:
/// few writes). No thread of its own: one that woke to look every few milliseconds would be a wake-up in
/// the Choreo sink, 200 a second, that the C sink does not have.
final class LatencyLog: Sendable {
    private let handle: FileHandle
    /// Lines not yet written, and whether a handler is writing (it takes what comes meanwhile along).
    private let pending = Mutex<(lines: [UInt8], writing: Bool)>(([], false))

    init(path: String) throws {
        if !FileManager.default.fileExists(atPath: path) {
            _ = FileManager.default.createFile(atPath: path, contents: nil)
        }
        handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        handle.seekToEndOfFile()
    }

    func record(sentAt: Double) {
        let micros = (Date().timeIntervalSince1970 - sentAt) * 1e6
        let writes = pending.withLock { p -> Bool in
            p.lines.append(contentsOf: "\(Int(micros))\n".utf8)
            if p.writing { return false }
            p.writing = true
            return true
        }
        guard writes else { return }
        while true {
            let lines = pending.withLock { p -> [UInt8] in
                defer { p.lines.removeAll(keepingCapacity: true) }
                if p.lines.isEmpty { p.writing = false }
                return p.lines
            }
            if lines.isEmpty { return }
            handle.write(Data(lines))
        }
    }
}

struct Sink: EventHandler {
    let name = "hop"
    let log: LatencyLog
    func handle(_ e: AtB, context: HandlerContext) async throws { log.record(sentAt: e.sentAt) }
}

func option(_ name: String, _ args: [String]) -> String? {
    guard let i = args.firstIndex(of: name), i + 1 < args.count else { return nil }
    return args[i + 1]
}

let args = Array(CommandLine.arguments.dropFirst())
if args.first == "hop" {
    let role = args.count > 1 ? args[1] : "a"
    let rest = Array(args.dropFirst(2))
    switch role {
    case "a": await Choreo.run(service: "bench-a", handlers: [HopA()], ledgers: [PostgresLedger.self], arguments: rest)
    case "b": await Choreo.run(service: "bench-b", handlers: [HopB()], ledgers: [PostgresLedger.self], arguments: rest)
    default:
        let log = try LatencyLog(path: ProcessInfo.processInfo.environment["CHAIN_LATENCY_FILE"] ?? "latency.txt")
        await Choreo.run(
            service: "bench-sink", handlers: [Sink(log: log)], ledgers: [PostgresLedger.self], arguments: rest)
    }
    exit(0)
}

if args.first == "ledger-probe" {
    // chain-benchmark ledger-probe LEDGER [--count N] [--pause-ms MS]: one event's ledger calls (claim, complete with
    // one outbox entry, record the confirm) one after another, timed; LEDGER a SQLite file or a PostgreSQL URL.
    let location = args.count > 1 ? args[1] : "probe.sqlite"
    let n = Int(option("--count", args) ?? "") ?? 2000
    let pause = Int(option("--pause-ms", args) ?? "") ?? 0
    do {
        try await LedgerProbe(location: location, count: n, pause: .milliseconds(pause)).run()
    } catch {
        FileHandle.standardError.write(Data("chain-benchmark ledger-probe: \(error)\n".utf8))
        exit(1)
    }
    exit(0)
}

let url =
    option("--url", args) ?? ProcessInfo.processInfo.environment["CHOREO_URL"] ?? "amqp://guest:guest@127.0.0.1:5675/"
let count = Int(option("--count", args) ?? "") ?? 20_000
let rate = Double(option("--rate", args) ?? "") ?? 200
let seconds = Double(option("--seconds", args) ?? "") ?? 10
let rounds = max(1, Int(option("--rounds", args) ?? "") ?? 3)
do {
    if args.contains("--hop-cost") {
        try await HopCost(url: url, count: Int(option("--count", args) ?? "") ?? 40_000, rounds: rounds).run()
    } else {
        try await ChainDriver(
            url: url, count: count, rate: rate, seconds: seconds, rounds: rounds, postgres: option("--postgres", args)
        ).run()
    }
} catch {
    // A line saying what failed (AMQP errors never carry the password), not a crash report.
    FileHandle.standardError.write(
        Data("chain-benchmark: \(error)\n(scripts/bench.sh chain starts the broker it needs)\n".utf8))
    exit(1)
}
