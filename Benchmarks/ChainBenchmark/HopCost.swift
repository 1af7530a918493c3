import Choreo
import ChoreoAMQP
import Foundation

/// What one hop costs in CPU per event: the chain's first hop alone, Choreo and the two C variants in turn,
/// each draining a backlog of `count` events while its process's CPU time is read from `/proc`. Its
/// outputs go to one queue that nothing consumes. A figure per hop that does not depend on
/// how the two cores were shared with the rest of a chain, for comparing changes to the hop's own code.
struct HopCost {
    let url: String
    let count: Int
    let rounds: Int
    /// Each kind of hop has an exchange of its own (so events go only to the hop being measured) and its
    /// outputs go to one queue bound to both.
    let exchange = "bench.cost"
    let cExchange = "bench.cost.c"
    let cQueue = "bench.cost.c"
    let output = "bench.cost.out"

    func run() async throws {
        let config = try AMQPConfiguration(url: url)
        say("hop cost: one hop alone, \(count) events per measure, \(rounds) rounds, \(chainInFlight) in flight")
        let connection = try await AMQPConnection.connect(to: config)
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        try await channel.declareQueue(output, options: .quorum())
        for x in [exchange, cExchange] {
            try await channel.declareExchange(x, type: .topic, durable: true)
            try await channel.bindQueue(output, exchange: x, routingKey: AtA.eventType)
        }
        try await declareAsHandlerQueue(cQueue, on: channel)
        try await channel.bindQueue(cQueue, exchange: cExchange, routingKey: Start.eventType)
        try await channel.enableConfirms()

        let hops: [(label: String, start: (URL) throws -> (Process, String, String))] = [
            ("Choreo", choreoHop),
            ("rabbitmq-c, one transaction per batch", { try cHop($0, config: config, mode: "batch") }),
            ("rabbitmq-c, one transaction per event", { try cHop($0, config: config, mode: "per-event") }),
        ]
        var results = [[Double]](repeating: [], count: hops.count)
        for round in 0..<rounds {
            for k in 0..<hops.count {
                let i = (round + k) % hops.count
                let micros = try await measure(hops[i].start, channel: channel)
                results[i].append(micros)
                say("round \(round + 1): \(hops[i].label): " + String(format: "%.1f µs of CPU per event", micros))
            }
        }
        say("medians of \(rounds) rounds:")
        for (i, hop) in hops.enumerated() {
            say("\(hop.label): " + String(format: "%.1f µs of CPU per event", median(results[i])))
        }
    }

    /// Fills the hop's queue with `count` events, then starts the hop and waits until all its outputs are queued;
    /// returns its CPU time per event, less what the same hop spends starting with an empty queue. Always a
    /// backlog: fed while it runs, a hop that keeps up takes smaller batches and looks costlier per event.
    private func measure(_ start: (URL) throws -> (Process, String, String), channel: AMQPChannel) async throws
        -> Double
    {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "hop-cost-\(UUID().uuidString.prefix(6))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        _ = try await channel.purgeQueue(output)

        // Start-up alone (a Choreo hop also declares its queue here); consuming starts at once after it.
        let (idle, queue, exchange) = try start(dir)
        try await waitForConsumer(queue, channel)
        try await Task.sleep(for: .seconds(1))
        let startup = try cpuTicks(idle.processIdentifier)
        stop(idle, queue: queue)

        try await publishEvents(count, on: channel) { try startEvent($0, exchange: exchange) }
        let (process, _, _) = try start(dir)
        defer { stop(process, queue: queue) }
        let deadline = ContinuousClock.now + .seconds(600)
        while try await channel.declareQueuePassive(output).messageCount < count {
            guard ContinuousClock.now < deadline else {
                throw ConfigurationError("the hop did not forward \(count) events")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        try await Task.sleep(for: .milliseconds(300))  // the last group's record and ack
        let used = try cpuTicks(process.processIdentifier) - startup
        return Double(used) * 1e6 / Double(sysconf(Int32(_SC_CLK_TCK))) / Double(count)
    }

    /// The Choreo hop stops on SIGTERM; the C hop only ever ends by itself (after its count) or killed.
    private func stop(_ process: Process, queue: String) {
        kill(process.processIdentifier, queue == cQueue ? SIGKILL : SIGTERM)
        process.waitUntilExit()
    }

    /// The process, the queue it consumes and the exchange its events go to.
    private func choreoHop(_ dir: URL) throws -> (Process, String, String) {
        let p = try startChoreoHop(
            "a", url: url, exchange: exchange, ledger: dir.appendingPathComponent("a.sqlite").path)
        return (p, "choreo.bench-a.hop", exchange)
    }

    /// Never exits by itself (one event more than it is sent).
    private func cHop(_ dir: URL, config: AMQPConfiguration, mode: String) throws -> (Process, String, String) {
        let p = try startCHop(
            config, queue: cQueue, next: AtA.eventType, exchange: cExchange,
            ledger: dir.appendingPathComponent("a.sqlite"), latency: nil, count: count + 1, mode: mode)
        return (p, cQueue, cExchange)
    }

    /// User and system time of a process so far, in clock ticks (fields 14 and 15 of `/proc/<pid>/stat`).
    private func cpuTicks(_ pid: Int32) throws -> Int {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        // The command name (field 2) is in parentheses and may hold spaces: count fields after it.
        guard let close = stat.lastIndex(of: ")") else { throw ConfigurationError("unreadable /proc/\(pid)/stat") }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = Int(fields[11]), let system = Int(fields[12]) else {
            throw ConfigurationError("unreadable /proc/\(pid)/stat")
        }
        return user + system
    }
}

/// Prints a line at once, also when the output is a pipe.
private func say(_ line: String) {
    print(line)
    fflush(nil)
}
