import ChoreoAMQP
import Foundation
import GRDB
import TestEvents
import Testing

@testable import Choreo

/// The broker the integration tests use (started by scripts/test.sh).
enum Broker {
    static var url: String {
        ProcessInfo.processInfo.environment["CHOREO_TEST_URL"] ?? "amqp://guest:guest@127.0.0.1:5673/"
    }
    static var nodeName: String { ProcessInfo.processInfo.environment["CHOREO_TEST_BROKER_NAME"] ?? "choreo-test" }

    static func connect() async throws -> AMQPConnection {
        do { return try await AMQPConnection.connect(to: try AMQPConfiguration(url: url)) } catch {
            Issue.record("the test broker at \(url) is not reachable (scripts/test.sh starts it): \(error)")
            throw error
        }
    }

    /// Runs the `choreo` CLI binary and returns its exit code, standard output and standard error.
    static func choreo(
        _ args: [String], environment extra: [String: String] = [:], stdin: FileHandle? = nil,
        timeout: Double = 120
    ) async throws -> (code: Int32, out: String, err: String) {
        try await runProduct("choreo", args, environment: extra, stdin: stdin, timeout: timeout)
    }

    /// Runs an executable of the package's products (the `choreo` CLI, the fixture service) to its end, with
    /// `CHOREO_URL` set to the test broker's unless `extra` says otherwise; its exit code (minus the signal's
    /// number when one ended it), standard output and standard error.
    static func runProduct(
        _ name: String, _ args: [String], environment extra: [String: String] = [:], stdin: FileHandle? = nil,
        timeout: Double = 120
    ) async throws -> (code: Int32, out: String, err: String) {
        let p = Process()
        p.executableURL = ServiceProcess.productsDirectory.appendingPathComponent(name)
        p.arguments = args
        var env = ProcessInfo.processInfo.environment
        env["CHOREO_URL"] = url
        for (k, v) in extra { env[k] = v }
        p.environment = env
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("run-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let outURL = dir.appendingPathComponent("out"), errURL = dir.appendingPathComponent("err")
        _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
        _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
        p.standardOutput = try FileHandle(forWritingTo: outURL)
        p.standardError = try FileHandle(forWritingTo: errURL)
        p.standardInput = stdin ?? FileHandle.nullDevice
        try p.run()
        let deadline = ContinuousClock.now + .seconds(timeout)
        while p.isRunning && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        if p.isRunning {
            kill(p.processIdentifier, SIGKILL); Issue.record("\(name) \(args) did not finish in \(timeout) s")
        }
        p.waitUntilExit()
        let code = p.terminationReason == .uncaughtSignal ? -p.terminationStatus : p.terminationStatus
        return (
            code, (try? String(contentsOf: outURL, encoding: .utf8)) ?? "",
            (try? String(contentsOf: errURL, encoding: .utf8)) ?? ""
        )
    }

    /// Runs `scripts/broker.sh ctl <node> ARGS` (stop_app, start_app).
    static func ctl(_ args: String...) throws {
        _ = try ctlOutput(args)
    }

    /// Raises the broker's disk alarm (free disk below 1,000 times the RAM), which blocks every connection that
    /// publishes; the tests run one at a time, so no other test meets it. Pair with ``clearDiskAlarm()`` in a `defer`.
    static func raiseDiskAlarm() throws { try ctl("set_disk_free_limit", "mem_relative", "1000") }

    /// Puts the disk limit back to RabbitMQ's default (50 MB); harmless when no alarm was raised.
    static func clearDiskAlarm() throws { try ctl("set_disk_free_limit", "50MB") }

    /// Ready and unacknowledged messages of a queue, as rabbitmqctl counts them (a passive declare counts only
    /// the ready ones); nil when there is no such queue.
    static func messages(in queue: String) throws -> Int? {
        let out = try ctlOutput(["list_queues", "-q", "--no-table-headers", "name", "messages"])
        for line in out.split(separator: "\n") {
            let fields = line.split(separator: "\t")
            if fields.count == 2, fields[0] == queue { return Int(fields[1]) }
        }
        return nil
    }

    /// Closes, from the broker's side, the connections whose client named them `name`; returns how many.
    @discardableResult
    static func closeConnections(named name: String) throws -> Int {
        let pids = try connections(named: name, column: "pid")
        for pid in pids { _ = try ctlOutput(["close_connection", pid, "closed by a test"]) }
        return pids.count
    }

    /// A column of `rabbitmqctl list_connections` (`pid`, `state`, ...) for each connection its client named `name`.
    static func connections(named name: String, column: String) throws -> [String] {
        // RabbitMQ 3.10 has no `user_provided_name` column; the name is among the client properties, printed
        // as `{"connection_name","NAME"}`.
        let out = try ctlOutput(["list_connections", "-q", "--no-table-headers", column, "client_properties"])
        return out.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: "\t", maxSplits: 1)
            guard fields.count == 2, fields[1].contains("{\"connection_name\",\"\(name)\"}") else { return nil }
            return String(fields[0])
        }
    }

    /// The exchanges a queue is bound to (the default exchange, which binds every queue by name, left out).
    static func exchanges(boundTo queue: String) throws -> Set<String> {
        let out = try ctlOutput(["list_bindings", "-q", "--no-table-headers", "source_name", "destination_name"])
        return Set(
            out.split(separator: "\n").compactMap { line in
                let fields = line.split(separator: "\t", omittingEmptySubsequences: false)
                guard fields.count == 2, fields[1] == queue, !fields[0].isEmpty else { return nil }
                return String(fields[0])
            })
    }

    private static func ctlOutput(_ args: [String]) throws -> String {
        try runScript("broker.sh", ["ctl", nodeName] + args)
    }
}

/// One isolated mesh per test: its own exchange, service names and files.
struct Mesh {
    let id = UUID().uuidString.prefix(8).lowercased()
    let directory: URL
    var exchange: String { "test.mesh.\(id)" }
    var pingService: String { "ping-\(id)" }
    var sinkService: String { "sink-\(id)" }
    var gatewayPath: String { directory.appendingPathComponent("gateway.sqlite").path }

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent(
            "choreo-test-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    var pingQueues: WireNames.HandlerQueues { .init(service: pingService, handler: "ping") }

    /// Starts the fixture service as a real process.
    /// `ledger` replaces the role's own SQLite file (a PostgreSQL URL, for replicas); `instance` names the log of
    /// one of several processes of a role.
    func start(
        _ role: String, concurrency: Int = 8, arguments: [String] = [],
        environment extra: [String: String] = [:], ledger: String? = nil, instance: String? = nil
    ) throws -> ServiceProcess {
        let service = role == "sink" ? sinkService : role == "audit" ? "audit-\(id)" : pingService
        var env = ProcessInfo.processInfo.environment
        env["FIXTURE_ROLE"] = role
        env["FIXTURE_SERVICE"] = service
        env["FIXTURE_GATEWAY"] = gatewayPath
        env["FIXTURE_RETRY_MS"] = "200"
        env["CHOREO_LOG_LEVEL"] = "warning"
        for (k, v) in extra { env[k] = v }
        let log = directory.appendingPathComponent("\(instance ?? role).log")
        return try ServiceProcess(
            arguments: [
                "--url", Broker.url, "--exchange", exchange, "--ledger",
                ledger ?? directory.appendingPathComponent("\(role).ledger.sqlite").path,
                "--concurrency", String(concurrency),
            ] + arguments, environment: env, log: log)
    }

    /// Publishes test.ping events through the mesh's exchange, with confirms; returns their ids.
    @discardableResult
    func publishPings(_ pings: [Ping], on channel: AMQPChannel, ids: [String]? = nil) async throws -> [String] {
        var out: [String] = []
        var messages: [AMQPOutgoingMessage] = []
        for (i, ping) in pings.enumerated() {
            let envelope = try EventEnvelope(ping, source: "test", id: ids?[i] ?? UUID().uuidString.lowercased())
            out.append(envelope.id)
            messages.append(EnvelopeCodec.encode(envelope, exchange: exchange))
        }
        for r in await channel.publish(contentsOf: messages) { try r.get() }
        return out
    }

    /// Declares the topology the services would, so events published before they start are kept.
    func declare(on channel: AMQPChannel, deliveryLimit: Int = 10) async throws {
        let topology = Topology(exchange: exchange, deliveryLimit: deliveryLimit)
        try await topology.declare(HandlerDescriptor(PingTestHandler()), queues: pingQueues, on: channel)
    }

    func gateway() throws -> GatewayView { try GatewayView(path: gatewayPath) }

    /// A connection to the test broker and a confirming channel; with `declaring`, the ping handler's
    /// topology is declared first so events published before the service starts are kept.
    func connect(declaring: Bool = true) async throws -> (AMQPConnection, AMQPChannel) {
        let connection = try await Broker.connect()
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        if declaring { try await declare(on: channel) }
        return (connection, channel)
    }
}

extension Mesh {
    /// A queue of the test's own that receives the mesh's pongs: what the ping handler published.
    func pongQueue(on channel: AMQPChannel) async throws -> String {
        let name = "test.pongs.\(UUID().uuidString.prefix(8))"
        try await channel.declareQueue(name, options: .quorum())
        try await channel.bindQueue(name, exchange: exchange, routingKey: Pong.eventType)
        return name
    }

    /// The ping service run inside the test process: the test broker, this mesh's exchange, a ledger file of its own.
    func pingConfiguration() -> RunnerConfiguration {
        var config = RunnerConfiguration(service: pingService)
        config.url = Broker.url
        config.exchange = exchange
        config.ledgerPath = directory.appendingPathComponent("ping.ledger.sqlite").path
        return config
    }
}

/// Runs `runtime` in a task of its own and returns that task once the runtime consumes; end it with
/// `beginShutdown()`, then await the task.
func started(_ runtime: ChoreoRuntime) async -> Task<Void, any Error> {
    let running = Task { try await runtime.run() }
    await runtime.waitUntilReady()
    return running
}

/// Same name, input and retry policy as the fixture's ping handler, for declaring its topology from tests.
struct PingTestHandler: EventHandler {
    let name = "ping"
    var retryPolicy: RetryPolicy { RetryPolicy(maxAttempts: 3, delays: [.milliseconds(200)]) }
    func handle(_ event: Ping, context: HandlerContext) async throws {}
}

/// Reads what the fixture recorded in its fake gateway.
struct GatewayView {
    let path: String
    init(path: String) throws { self.path = path }

    private func read<T>(_ body: (Database) throws -> T) throws -> T {
        guard FileManager.default.fileExists(atPath: path) else { throw ConfigurationError("no gateway yet") }
        // The fixture writes this file while the test reads it: wait for its lock instead of reading nothing.
        var config = Configuration()
        config.busyMode = .timeout(10)
        return try DatabaseQueue(path: path, configuration: config).read(body)
    }

    func effects(_ handler: String) -> Int {
        (try? read {
            try Int.fetchOne($0, sql: "SELECT count(*) FROM effects WHERE handler = ?", arguments: [handler]) ?? 0
        }) ?? 0
    }

    func requests(_ handler: String) -> Int {
        (try? read {
            try Int.fetchOne($0, sql: "SELECT count(*) FROM requests WHERE handler = ?", arguments: [handler]) ?? 0
        }) ?? 0
    }

    func effectKeys(_ handler: String) -> Set<String> {
        Set(
            (try? read {
                try String.fetchAll($0, sql: "SELECT key FROM effects WHERE handler = ?", arguments: [handler])
            }) ?? [])
    }

    func attempts(_ handler: String, key: String) -> [Int] {
        (try? read {
            try Int.fetchAll(
                $0, sql: "SELECT attempt FROM requests WHERE handler = ? AND key = ? ORDER BY attempt",
                arguments: [handler, key])
        }) ?? []
    }
}

/// A fixture service running as a child process.
final class ServiceProcess: @unchecked Sendable {
    let process = Process()
    let log: URL

    init(arguments: [String], environment: [String: String], log: URL) throws {
        self.log = log
        let binary = Self.productsDirectory.appendingPathComponent("ChoreoTestService")
        process.executableURL = binary
        process.arguments = arguments
        process.environment = environment
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        let handle = try FileHandle(forWritingTo: log)
        handle.seekToEndOfFile()
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
    }

    static var productsDirectory: URL {
        // The test bundle sits in the products directory next to the fixture executable.
        for bundle in Bundle.allBundles where bundle.bundlePath.hasSuffix(".xctest") {
            return bundle.bundleURL.deletingLastPathComponent()
        }
        return URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    }

    var isRunning: Bool { process.isRunning }
    var exitStatus: Int32 { process.terminationStatus }
    var output: String { (try? String(contentsOf: log, encoding: .utf8)) ?? "" }

    func terminate() { if process.isRunning { process.terminate() } }
    func kill9() { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }

    /// Waits for the process to exit, up to `seconds`; returns whether it did.
    func waitForExit(seconds: Double) async -> Bool {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while process.isRunning && ContinuousClock.now < deadline { try? await Task.sleep(for: .milliseconds(50)) }
        return !process.isRunning
    }

    deinit { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
}

/// Polls a condition until it holds or `seconds` pass; returns the last value seen.
@discardableResult
func eventually<T>(within seconds: Double = 30, _ what: () async throws -> T, until done: (T) -> Bool) async rethrows
    -> T
{
    let deadline = ContinuousClock.now + .seconds(seconds)
    var value = try await what()
    while !done(value) && ContinuousClock.now < deadline {
        try? await Task.sleep(for: .milliseconds(100))
        value = try await what()
    }
    return value
}

/// Reads every message in a queue without removing it (consume, collect, then close the channel to requeue).
func peek(queue: String, expecting count: Int, connection: AMQPConnection, seconds: Double = 20) async throws
    -> [AMQPDelivery]
{
    let channel = try await connection.openChannel()
    try await channel.setPrefetch(UInt16(clamping: max(count, 1) + 10))
    let consumer = try await channel.consume(queue: queue)
    var collected: [AMQPDelivery] = []
    let deadline = ContinuousClock.now + .seconds(seconds)
    let box = Collected()
    let reader = Task {
        for try await d in consumer { box.append(d) }
    }
    while box.count < count && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
    collected = box.items
    reader.cancel()
    await channel.close()
    return collected
}

final class Collected: @unchecked Sendable {
    private let lock = NSLock()
    private var storage: [AMQPDelivery] = []
    func append(_ d: AMQPDelivery) { lock.lock(); storage.append(d); lock.unlock() }
    var items: [AMQPDelivery] { lock.lock(); defer { lock.unlock() }; return storage }
    var count: Int { items.count }
}

/// `n` outbox entries of pongs with the ids `out-0`, `out-1`, ..., for the ledgers' tests.
func sampleOutbox(_ n: Int) throws -> [OutboxMessage] {
    try (0..<n).map {
        OutboxMessage(
            index: $0, envelope: try EventEnvelope(Pong(n: $0), source: "s", id: "out-\($0)"),
            exchange: "x", routingKey: "test.pong")
    }
}

/// An event whose attributes hold every kind of character a ledger might mangle (quotes, backslashes,
/// control characters, NUL, non-ASCII), for the ledgers' round-trip tests.
func trickyEnvelope() throws -> EventEnvelope {
    let tricky = "quote \" backslash \\ newline \n cr \r tab \t nul \u{0} bell \u{7} us \u{1F} é 日本 🎉 </script>"
    var e = try EventEnvelope(Pong(n: 1), source: "choreo://s/\(tricky)", id: "id-\(tricky)")
    e.time = Date(timeIntervalSince1970: 1_764_082_680.123456)
    e.subject = tricky
    e.dataSchema = "https://example.com/schema"
    e.correlationID = "corr"
    e.causationID = "cause"
    e.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    e.idempotencyKey = tricky
    e.extensions = ["zeta": tricky, "alpha": "", "mid": "{\"json\": [1, 2]}", "qu\"ote": "\\"]
    return e
}

/// Runs one of the project's `scripts/` with `args`; its standard output, or an error when it fails.
func runScript(_ name: String, _ args: [String]) throws -> String {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    let p = Process()
    p.executableURL = root.appendingPathComponent("scripts/\(name)")
    p.arguments = args
    let out = Pipe()
    p.standardOutput = out
    p.standardError = FileHandle.nullDevice
    try p.run()
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    guard p.terminationStatus == 0 else {
        throw ConfigurationError("\(name) \(args.joined(separator: " ")) exited \(p.terminationStatus)")
    }
    return String(decoding: data, as: UTF8.self)
}
