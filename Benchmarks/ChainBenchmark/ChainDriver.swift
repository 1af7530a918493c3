import Choreo
import ChoreoAMQP
import Foundation
import Synchronization

/// Runs both chains and prints throughput and latency figures.
struct ChainDriver {
    let url: String
    let count: Int
    let rate: Double
    let seconds: Double
    let rounds: Int
    /// A PostgreSQL URL: the Choreo chain runs a second time with its hops' ledgers there.
    let postgres: String?
    /// Events sent through each chain before anything is timed.
    let warmup = 2000

    struct Result {
        var throughput: Double
        var p50: Double
        var p99: Double
    }

    func run() async throws {
        defer { Scratch.removeAll() }
        let config = try AMQPConfiguration(url: url)
        print(
            "chain-benchmark: producer -> A -> B -> sink, \(count) events for throughput, \(Int(rate))/s for \(Int(seconds)) s for latency, \(rounds) rounds"
        )
        print(
            "broker \(config), \(ProcessInfo.processInfo.activeProcessorCount) cores; persistent messages, confirms, a SQLite ledger per hop, \(chainInFlight) deliveries in flight per hop"
        )
        var chains: [(label: String, run: () async throws -> Result)] = [
            ("Choreo", { try await runChoreo(config) }),
            ("rabbitmq-c, one transaction per batch", { try await runBaseline(config, mode: "batch") }),
            ("rabbitmq-c, one transaction per event", { try await runBaseline(config, mode: "per-event") }),
        ]
        if let postgres {
            print("and the Choreo chain with its ledgers on PostgreSQL, \(LedgerURL.redacted(postgres))")
            chains.append(("Choreo, PostgreSQL ledgers", { try await runChoreo(config, postgres: postgres) }))
        }
        // Each round runs the three chains, starting with a different one each time: the machine drifts over
        // minutes, and a chain always run first or last would carry that drift into the ratios.
        var results = [[Result]](repeating: [], count: chains.count)
        for round in 0..<rounds {
            for k in 0..<chains.count {
                let i = (round + k) % chains.count
                let r = try await chains[i].run()
                results[i].append(r)
                print(
                    "round \(round + 1): \(chains[i].label): "
                        + String(format: "%.0f events/s, p50 %.2f ms, p99 %.2f ms", r.throughput, r.p50, r.p99))
            }
        }
        print("medians of \(rounds) rounds:")
        for (i, chain) in chains.enumerated() {
            print(
                "\(chain.label): "
                    + String(
                        format: "%.0f events/s; latency at %.0f/s p50 %.2f ms, p99 %.2f ms",
                        median(results[i].map(\.throughput)), rate, median(results[i].map(\.p50)),
                        median(results[i].map(\.p99))))
        }
        // Ratios within each round, where the chains ran under the same conditions, then their median.
        let ratios = (1..<chains.count).map { i in
            median(zip(results[0], results[i]).map { $0.throughput / $1.throughput })
        }
        print(
            String(
                format: "throughput ratio Choreo / rabbitmq-c: %.2f (per batch), %.2f (per event)", ratios[0], ratios[1]
            ))
    }

    // MARK: Choreo

    /// `postgres`: the hops' ledgers on that database instead of a SQLite file each.
    private func runChoreo(_ config: AMQPConfiguration, postgres: String? = nil) async throws -> Result {
        let dir = try scratch("choreo")
        let latency = dir.appendingPathComponent("latency.txt")
        _ = FileManager.default.createFile(atPath: latency.path, contents: nil)
        var hops: [Process] = []
        defer { for p in hops { p.terminate(); p.waitUntilExit() } }
        for role in ["sink", "b", "a"] {
            hops.append(
                try startChoreoHop(
                    role, url: url, exchange: "bench.choreo",
                    ledger: postgres ?? dir.appendingPathComponent("\(role).sqlite").path,
                    environment: ["CHAIN_LATENCY_FILE": latency.path]))
        }
        let connection = try await AMQPConnection.connect(to: config)
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        for q in ["choreo.bench-a.hop", "choreo.bench-b.hop", "choreo.bench-sink.hop"] {
            try await waitForConsumer(q, channel)
        }
        try await channel.enableConfirms()

        return try await measure(channel: channel, latency: latency) { try startEvent($0, exchange: "bench.choreo") }
    }

    // MARK: rabbitmq-c

    /// `mode`: `batch` commits the SQLite inserts of the deliveries that arrived together in one transaction;
    /// `per-event` commits each insert on its own.
    private func runBaseline(_ config: AMQPConfiguration, mode: String) async throws -> Result {
        let dir = try scratch("c-\(mode)")
        let latency = dir.appendingPathComponent("latency.txt")
        _ = FileManager.default.createFile(atPath: latency.path, contents: nil)
        let connection = try await AMQPConnection.connect(to: config)
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        try await channel.declareExchange("bench.c", type: .topic, durable: true)
        let stages = [
            ("bench.c.a", "bench.start", "bench.a"), ("bench.c.b", "bench.a", "bench.b"),
            ("bench.c.sink", "bench.b", "-"),
        ]
        for (queue, key, _) in stages {
            try await declareAsHandlerQueue(queue, on: channel)
            try await channel.purgeQueue(queue)
            try await channel.bindQueue(queue, exchange: "bench.c", routingKey: key)
        }
        let total = warmup + count + Int(rate) + Int(rate * seconds)
        var hops: [Process] = []
        defer { for p in hops where p.isRunning { p.terminate(); p.waitUntilExit() } }
        for (queue, _, next) in stages {
            hops.append(
                try startCHop(
                    config, queue: queue, next: next, exchange: "bench.c",
                    ledger: dir.appendingPathComponent("\(queue).sqlite"), latency: next == "-" ? latency : nil,
                    count: total, mode: mode))
        }
        for (queue, _, _) in stages { try await waitForConsumer(queue, channel) }
        try await channel.enableConfirms()
        return try await measure(channel: channel, latency: latency) { try startEvent($0, exchange: "bench.c") }
    }

    // MARK: Shared

    /// Throughput: `count` events published as fast as confirms allow, timed until the sink saw them all.
    /// Latency: events published one by one at `rate` per second, after one uncounted second, for `seconds`;
    /// percentiles of the sink's figures.
    private func measure(channel: AMQPChannel, latency: URL, message: (Int) throws -> AMQPOutgoingMessage) async throws
        -> Result
    {
        // What the previous chain left for the kernel to write back (its ledgers, the broker's queue logs) is
        // written first, so that this chain does not pay for it: whichever chain came after the per-event C
        // chain ran slower than in its other rounds.
        sync()
        // Warm-up: the broker's fresh quorum queues and each hop's first events are not what is measured.
        for r in await channel.publish(contentsOf: try (0..<warmup).map { try message(-1 - $0) }) { try r.get() }
        try await waitForLines(latency, warmup, timeout: .seconds(120))

        let started = ContinuousClock.now
        try await publishEvents(count, on: channel, message)
        try await waitForLines(latency, warmup + count, timeout: .seconds(600))
        let elapsed = ContinuousClock.now - started
        let throughput =
            Double(count) / (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)

        // Latency at a steady rate: the burst's writes flushed and a pause (checkpoints, the broker's own
        // clean-up), then one second of paced events that is not counted, then `seconds` counted.
        sync()
        try await Task.sleep(for: .seconds(2))
        let settling = Int(rate)
        let paced = Int(rate * seconds)
        let interval = Duration.seconds(1 / rate)
        let begin = ContinuousClock.now
        for i in 0..<(settling + paced) {
            let due = begin + interval * i
            let now = ContinuousClock.now
            if due > now { try await Task.sleep(until: due, clock: .continuous) }
            try await channel.publish(try message(count + i))
        }
        try await waitForLines(latency, warmup + count + settling + paced, timeout: .seconds(120))
        let lines = try String(contentsOf: latency, encoding: .utf8).split(separator: "\n").suffix(paced)
        let micros = lines.compactMap { Double($0) }.sorted()
        func pct(_ p: Double) -> Double { percentile(micros, p) / 1000 }
        // For a closer look (a spike every few seconds, say): each event's latency, in the order the sink saw them.
        if let dir = ProcessInfo.processInfo.environment["CHAIN_LATENCY_DIR"] {
            let file = URL(fileURLWithPath: dir).appendingPathComponent(
                latency.deletingLastPathComponent().lastPathComponent + ".txt")
            do {
                try (lines.joined(separator: "\n") + "\n").write(to: file, atomically: true, encoding: .utf8)
            } catch {
                print("could not write \(file.path): \(error)")
            }
        }
        return Result(throughput: throughput, p50: pct(0.5), p99: pct(0.99))
    }

    private func waitForLines(_ file: URL, _ n: Int, timeout: Duration) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let data = (try? Data(contentsOf: file)) ?? Data()
            if data.reduce(0, { $0 + ($1 == 0x0A ? 1 : 0) }) >= n { return }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw ConfigurationError("the sink did not see \(n) events within \(timeout)")
    }

    /// A fresh directory for a chain's ledgers and latency file; removed when the driver exits.
    private func scratch(_ name: String) throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "chain-bench-\(name)-\(UUID().uuidString.prefix(6))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        Scratch.directories.withLock { $0.append(dir) }
        return dir
    }
}

// MARK: Shared by the chain and the hop cost

/// Deliveries in flight per hop, for every kind of hop: each Choreo hop's `--concurrency`, each C hop's
/// prefetch and largest batch (`CHAIN_IN_FLIGHT`, default 256).
var chainInFlight: Int { Int(ProcessInfo.processInfo.environment["CHAIN_IN_FLIGHT"] ?? "") ?? 256 }

/// The value below which a fraction `p` of `sorted` (ascending) lies; NaN when it is empty.
func percentile(_ sorted: [Double], _ p: Double) -> Double {
    sorted.isEmpty ? .nan : sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// Event `n` for a chain's first hop, stamped with the time it is sent. Every kind of hop gets the same
/// CloudEvents message, headers and all: what the broker stores and routes costs it alike on all sides.
/// Its id ends in random characters, made as a Choreo producer makes an id (`EventID`).
func startEvent(_ n: Int, exchange: String) throws -> AMQPOutgoingMessage {
    let e = try EventEnvelope(
        Start(n: n, sentAt: Date().timeIntervalSince1970), source: "bench",
        id: "\(exchange)-\(n)-\(EventID.random().prefix(6))")
    return EnvelopeCodec.encode(e, exchange: exchange, routingKey: Start.eventType)
}

/// Publishes messages 0..<count as fast as confirms allow, 500 at a time.
func publishEvents(_ count: Int, on channel: AMQPChannel, _ message: (Int) throws -> AMQPOutgoingMessage)
    async throws
{
    var n = 0
    while n < count {
        let batch = try (n..<min(n + 500, count)).map(message)
        for r in await channel.publish(contentsOf: batch) { try r.get() }
        n += batch.count
    }
}

/// A C hop's queue, declared as a Choreo handler's queue is (delivery limit, at-least-once dead-lettering):
/// the same queues, so the broker does the same work for both kinds of hop.
func declareAsHandlerQueue(_ queue: String, on channel: AMQPChannel) async throws {
    try await channel.declareQueue("\(queue).dlq", options: .quorum())
    try await channel.declareQueue(
        queue,
        options: Topology.mainQueue(
            deadLetterQueue: "\(queue).dlq", deliveryLimit: RunnerConfiguration(service: "bench").deliveryLimit))
}

/// Starts this executable as a Choreo hop (`a`, `b` or `sink`) with `chainInFlight` invocations.
func startChoreoHop(
    _ role: String, url: String, exchange: String, ledger: String, environment: [String: String] = [:]
) throws -> Process {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: CommandLine.arguments[0])
    p.arguments = [
        "hop", role, "--url", url, "--exchange", exchange, "--ledger", ledger,
        "--concurrency", String(chainInFlight),
    ]
    // For comparing ack delays (RunnerConfiguration.ackDelay): CHAIN_ACK_DELAY=MS.
    if let ms = ProcessInfo.processInfo.environment["CHAIN_ACK_DELAY"] { p.arguments! += ["--ack-delay", ms] }
    var env = ProcessInfo.processInfo.environment.merging(environment) { $1 }
    env["CHOREO_LOG_LEVEL"] = "warning"
    // For trying another allocator in the Choreo hops only (the C hops keep glibc's):
    // CHAIN_HOP_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2.
    if let preload = env["CHAIN_HOP_PRELOAD"], !preload.isEmpty { env["LD_PRELOAD"] = preload }
    p.environment = env
    try p.run()
    return p
}

/// Starts a C hop (`chain-baseline-c`, beside this executable; it reads `CHAIN_IN_FLIGHT` itself) that consumes
/// `queue` and forwards to routing key `next` (`-` for the sink), exits after `count` events, and writes the
/// sink's latency lines to `latency`.
func startCHop(
    _ config: AMQPConfiguration, queue: String, next: String, exchange: String, ledger: URL, latency: URL?,
    count: Int, mode: String
) throws -> Process {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        .appendingPathComponent("chain-baseline-c")
    p.arguments = [
        config.host, String(config.port), queue, next, exchange, ledger.path, latency?.path ?? "-", String(count), mode,
    ]
    try p.run()
    return p
}

func waitForConsumer(_ queue: String, _ channel: AMQPChannel) async throws {
    let deadline = ContinuousClock.now + .seconds(60)
    while ContinuousClock.now < deadline {
        if let info = try? await channel.declareQueuePassive(queue), info.consumerCount > 0 { return }
        try await Task.sleep(for: .milliseconds(100))
    }
    throw ConfigurationError("no consumer on \(queue)")
}

/// Scratch directories of this run, removed at the end of `ChainDriver.run()`.
enum Scratch {
    static let directories = Mutex<[URL]>([])

    static func removeAll() {
        for dir in directories.withLock({ $0 }) { try? FileManager.default.removeItem(at: dir) }
    }
}
