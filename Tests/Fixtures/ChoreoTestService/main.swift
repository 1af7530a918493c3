import Choreo
import ChoreoPostgres
import ChoreoPrometheus
import CoreMetrics
import Foundation
import GRDB
import Prometheus
import TestEvents

// A handler service for the integration tests, run as a real subprocess.
//   FIXTURE_ROLE=ping  consumes test.ping, "charges" the fake gateway with the idempotency key, emits test.pong
//   FIXTURE_ROLE=sink  consumes test.pong and records each one it handles
// FIXTURE_GATEWAY is the SQLite file both record into; FIXTURE_RETRY_MS the retry delay.
// FIXTURE_OWN_METRICS=1 bootstraps swift-metrics before Choreo.run, as an executable with its own backend would.

struct GatewayError: Error, CustomStringConvertible {
    var description: String
}

/// A fake external API that dedupes by idempotency key, like a payment gateway: `requests` counts calls,
/// `effects` holds one row per key actually applied.
final class Gateway: Sendable {
    let queue: DatabaseQueue
    init(path: String) throws {
        var config = Configuration()
        config.busyMode = .timeout(10)
        queue = try DatabaseQueue(path: path, configuration: config)
        try queue.write { db in
            try db.execute(
                sql: """
                    CREATE TABLE IF NOT EXISTS requests (handler TEXT, key TEXT, attempt INTEGER);
                    CREATE TABLE IF NOT EXISTS effects (handler TEXT, key TEXT, PRIMARY KEY (handler, key));
                    """)
        }
    }

    func apply(handler: String, key: String, attempt: Int) throws {
        try queue.write { db in
            try db.execute(sql: "INSERT INTO requests VALUES (?, ?, ?)", arguments: [handler, key, attempt])
            try db.execute(sql: "INSERT OR IGNORE INTO effects VALUES (?, ?)", arguments: [handler, key])
        }
    }
}

let env = ProcessInfo.processInfo.environment
let gateway = try Gateway(path: env["FIXTURE_GATEWAY"] ?? "/tmp/choreo-fixture-gateway.sqlite")
let retryDelay = Duration.milliseconds(Int(env["FIXTURE_RETRY_MS"] ?? "200") ?? 200)

struct PingHandler: EventHandler {
    let name = "ping"
    var emits: [any Event.Type] { [Pong.self] }
    var retryPolicy: RetryPolicy { RetryPolicy(maxAttempts: 3, delays: [retryDelay]) }

    func handle(_ ping: Ping, context: HandlerContext) async throws {
        if let ms = ping.workMilliseconds { try await Task.sleep(for: .milliseconds(ms)) }
        if ping.crash == true { kill(getpid(), SIGKILL) }
        if ping.poison == true { throw NonRetryable(GatewayError(description: "poison ping \(ping.n)")) }
        if let failTimes = ping.failTimes, context.attempt <= failTimes, env["FIXTURE_FIXED"] != "1" {
            throw GatewayError(description: "gateway unavailable (attempt \(context.attempt))")
        }
        try gateway.apply(handler: name, key: context.idempotencyKey, attempt: context.attempt)
        try context.emit(Pong(n: ping.n))
    }
}

/// Another subscriber of test.ping, in its own service: a replay aimed at `ping` must not reach it.
struct AuditHandler: EventHandler {
    let name = "audit"
    func handle(_ ping: Ping, context: HandlerContext) async throws {
        try gateway.apply(handler: name, key: context.idempotencyKey, attempt: context.attempt)
    }
}

struct SinkHandler: EventHandler {
    let name = "sink"
    func handle(_ pong: Pong, context: HandlerContext) async throws {
        try gateway.apply(handler: name, key: context.idempotencyKey, attempt: context.attempt)
    }
}

if env["FIXTURE_OWN_METRICS"] == "1" {
    MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: PrometheusCollectorRegistry()))
    CoreMetrics.Counter(label: "fixture_started_total").increment()
}

switch env["FIXTURE_ROLE"] ?? "ping" {
case "sink":
    await Choreo.run(
        service: env["FIXTURE_SERVICE"] ?? "fixture-sink", handlers: [SinkHandler()], ledgers: [PostgresLedger.self],
        metrics: PrometheusEndpoint.self)
case "audit":
    await Choreo.run(
        service: env["FIXTURE_SERVICE"] ?? "fixture-audit", handlers: [AuditHandler()], ledgers: [PostgresLedger.self],
        metrics: PrometheusEndpoint.self)
default:
    await Choreo.run(
        service: env["FIXTURE_SERVICE"] ?? "fixture", handlers: [PingHandler()], ledgers: [PostgresLedger.self],
        metrics: PrometheusEndpoint.self)
}
