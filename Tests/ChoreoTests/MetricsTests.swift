import ChoreoAMQP
import CoreMetrics
import Foundation
import MetricsTestKit
import TestEvents
import Testing

@testable import Choreo

/// A ping handler that fails as its event asks: `failTimes` attempts with a retryable error, or at once for good
/// with `poison`.
struct ScriptedPing: EventHandler {
    let name = "ping"
    let runs: RunCounts
    var emits: [any Event.Type] { [Pong.self] }
    var retryPolicy: RetryPolicy { PingTestHandler().retryPolicy }

    struct Refused: Error, CustomStringConvertible {
        var description: String { "refused (scripted)" }
    }

    func handle(_ ping: Ping, context: HandlerContext) async throws {
        runs.record(ping.n)
        if ping.poison == true { throw NonRetryable(Refused()) }
        if let times = ping.failTimes, context.attempt <= times { throw Refused() }
        try context.emit(Pong(n: ping.n))
    }
}

@Suite("Metrics", .serialized, .timeLimit(.minutes(2)))
struct MetricsTests {
    /// The runtime's figures for its ping handler, by outcome.
    static func outcomes(_ metrics: TestMetrics, service: String) -> [String: Int64] {
        var out: [String: Int64] = [:]
        for outcome in RunnerMetrics.Outcome.allCases {
            out[outcome.label] = metrics.counterTotal(
                label: "choreo_events_total",
                dimensions: [("service", service), ("handler", "ping"), ("outcome", outcome.label)])
        }
        return out
    }

    @Test("every delivery is counted once by how it left: handled, duplicate, retried, dead-lettered")
    func outcomesAreCounted() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let metrics = TestMetrics()
        let runs = RunCounts()
        let config = mesh.pingConfiguration()
        let runtime = try ChoreoRuntime(
            configuration: config, handlers: [ScriptedPing(runs: runs)], metrics: metrics)
        let running = await started(runtime)

        // Five plain events; one of them published a second time with the same id; one that fails once, then
        // succeeds; one refused for good; and a body that is not JSON.
        let plain = try await mesh.publishPings((0..<5).map { Ping(n: $0) }, on: channel)
        try await mesh.publishPings([Ping(n: 0)], on: channel, ids: [plain[0]])
        try await mesh.publishPings([Ping(n: 10, failTimes: 1), Ping(n: 11, poison: true)], on: channel)
        try await channel.publish(
            AMQPOutgoingMessage(
                exchange: mesh.exchange, routingKey: Ping.eventType, body: Data("not json".utf8),
                properties: AMQPProperties(
                    contentType: "application/json", headers: BadInputTests.ce("bad-1"), deliveryMode: 2)))

        let expected: [String: Int64] = [
            "handled": 6, "duplicate": 1, "retried": 1, "dead_lettered": 2, "returned": 0,
        ]
        let seen = await eventually(
            { Self.outcomes(metrics, service: mesh.pingService) },
            until: { (counts: [String: Int64]) -> Bool in
                counts["handled"] == 6 && counts["dead_lettered"] == 2 && counts["duplicate"] == 1
            })
        // Settled means nothing is left in the queues: then no count can still change.
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.main).messageCount == 0)
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount == 2)
        #expect(seen == expected)
        #expect(Self.outcomes(metrics, service: mesh.pingService) == expected)

        let dimensions = [("service", mesh.pingService), ("handler", "ping")]
        // Invocations: the five, the failing one twice, the refused one; not the duplicate, not the bad body.
        let timer = try metrics.expectTimer("choreo_handler_duration_seconds", dimensions)
        #expect(timer.values.count == 8)
        #expect(timer.values.allSatisfy { $0 > 0 && $0 < 10_000_000_000 })
        #expect(runs.snapshot.values.reduce(0, +) == 8)
        let inFlight = try metrics.expectMeter("choreo_in_flight_events", dimensions)
        #expect(inFlight.lastValue == 0 && inFlight.values.contains { $0 > 0 })
        #expect(metrics.counterTotal(label: "choreo_ledger_errors_total") == 0)
        #expect(metrics.counterTotal(label: "choreo_connections_lost_total") == 0)

        runtime.beginShutdown()
        try await running.value
    }

    @Test("while a resource alarm blocks publishing the meter shows it and events wait; after it, each is handled once")
    func blockedPublishingIsShown() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let n = 5
        try await mesh.publishPings((0..<n).map { Ping(n: $0) }, on: channel)
        try Broker.raiseDiskAlarm()
        defer { try? Broker.clearDiskAlarm() }
        let metrics = TestMetrics()
        let runs = RunCounts()
        let runtime = try ChoreoRuntime(
            configuration: mesh.pingConfiguration(), handlers: [ScriptedPing(runs: runs)], metrics: metrics)
        let running = Task { try await runtime.run() }
        func blocked() -> Double? {
            try? metrics.expectMeter("choreo_publishing_blocked", [("service", mesh.pingService)]).lastValue
        }
        // Its first publish (the manifest) is held: it cannot start consuming, and says why.
        #expect(await eventually({ blocked() }, until: { $0 == 1 }) == 1)
        #expect(Self.outcomes(metrics, service: mesh.pingService)["handled"] == 0)
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.main).messageCount == UInt32(n))

        try Broker.clearDiskAlarm()
        let handled = await eventually(
            { Self.outcomes(metrics, service: mesh.pingService)["handled"] ?? 0 }, until: { $0 >= n })
        #expect(handled == Int64(n))
        #expect(blocked() == 0)
        #expect(runs.snapshot == Dictionary(uniqueKeysWithValues: (0..<n).map { ($0, 1) }))

        runtime.beginShutdown()
        try await running.value
    }

    @Test("a connection the broker closes is counted; the runtime reconnects and handles what comes next")
    func connectionLossIsCounted() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let metrics = TestMetrics()
        let runtime = try ChoreoRuntime(
            configuration: mesh.pingConfiguration(), handlers: [ScriptedPing(runs: RunCounts())], metrics: metrics)
        let running = await started(runtime)

        #expect(try Broker.closeConnections(named: "\(mesh.pingService) consumer") == 1)
        let lost = await eventually(
            { metrics.counterTotal(label: "choreo_connections_lost_total") }, until: { $0 >= 1 })
        #expect(lost == 1)
        try await mesh.publishPings([Ping(n: 1)], on: channel)
        let handled = await eventually(
            { Self.outcomes(metrics, service: mesh.pingService)["handled"] ?? 0 }, until: { $0 >= 1 })
        #expect(handled == 1, "handled after the reconnect")
        #expect(metrics.counterTotal(label: "choreo_connections_lost_total") == 1)

        runtime.beginShutdown()
        try await running.value
    }
}
