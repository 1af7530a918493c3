import ChoreoAMQP
import Foundation
import MetricsTestKit
import Synchronization
import TestEvents
import Testing

@testable import Choreo

/// A ledger whose group writes fail on demand, around a real SQLite ledger.
final class FailingLedger: IdempotencyLedger {
    let inner: SQLiteLedger
    /// Calls of each kind still to fail.
    let failClaims = Atomic<Int>(0)
    let failCompletes = Atomic<Int>(0)
    let failMarks = Atomic<Int>(0)

    init(path: String) throws { inner = try SQLiteLedger(path: path) }

    struct Unavailable: Error, CustomStringConvertible {
        var description: String { "ledger unavailable (injected)" }
    }

    private func fail(_ counter: borrowing Atomic<Int>) throws {
        if counter.wrappingSubtract(1, ordering: .relaxed).oldValue > 0 { throw Unavailable() }
        counter.store(0, ordering: .relaxed)
    }

    func claim(_ requests: [ClaimRequest], lease: Duration) async throws -> [LedgerClaim] {
        try fail(failClaims)
        return try await inner.claim(requests, lease: lease)
    }
    func complete(_ requests: [CompletionRequest]) async throws -> [LedgerCompletion] {
        try fail(failCompletes)
        return try await inner.complete(requests)
    }
    func markPublished(_ entries: [PublishedEntries]) async throws {
        try fail(failMarks)
        try await inner.markPublished(entries)
    }
    func claim(handler: String, key: String, owner: String, lease: Duration) async throws -> LedgerClaim {
        try await claim([ClaimRequest(handler: handler, key: key, owner: owner)], lease: lease)[0]
    }
    func complete(handler: String, key: String, owner: String, outbox: [OutboxMessage]) async throws
        -> LedgerCompletion
    {
        try await complete([CompletionRequest(handler: handler, key: key, owner: owner, outbox: outbox)])[0]
    }
    func markPublished(handler: String, key: String, indexes: [Int]) async throws {
        try await markPublished([PublishedEntries(handler: handler, key: key, indexes: indexes)])
    }
    func renew(handler: String, key: String, owner: String, lease: Duration) async throws -> Bool {
        try await inner.renew(handler: handler, key: key, owner: owner, lease: lease)
    }
    func release(handler: String, key: String, owner: String) async throws {
        try await inner.release(handler: handler, key: key, owner: owner)
    }
    func releaseAllLeases(handler: String) async throws { try await inner.releaseAllLeases(handler: handler) }
    var isExclusiveToOneProcess: Bool { true }
    func prune(completedBefore date: Date) async throws -> Int { try await inner.prune(completedBefore: date) }
    func check() async throws { try await inner.check() }
    func unpublished(handler: String, limit: Int) async throws -> [PendingOutbox] {
        try await inner.unpublished(handler: handler, limit: limit)
    }
}

/// How many times each ping ran.
final class RunCounts: Sendable {
    private let counts = Mutex<[Int: Int]>([:])
    func record(_ n: Int) { counts.withLock { $0[n, default: 0] += 1 } }
    var snapshot: [Int: Int] { counts.withLock { $0 } }
}

/// Counts invocations and emits a pong per ping; the retry policy of the fixture's ping handler. With `work`, it
/// works that long first and counts an invocation only once the work is done (its effect).
struct RecordingPing: EventHandler {
    let name = "ping"
    let runs: RunCounts
    var work: Duration?
    var emits: [any Event.Type] { [Pong.self] }
    var retryPolicy: RetryPolicy { PingTestHandler().retryPolicy }

    func handle(_ ping: Ping, context: HandlerContext) async throws {
        if let work { try await Task.sleep(for: work) }
        runs.record(ping.n)
        try context.emit(Pong(n: ping.n))
    }
}

@Suite("Ledger failures in a running handler", .serialized, .timeLimit(.minutes(3)))
struct LedgerFailureTests {
    @Test(
        "claims and commits that fail are tried again with the events held; a failed publish record is left to the sweep"
    )
    func ledgerFailures() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        // Pongs go to a queue of the test's own, to count what the handler published.
        let pongs = try await mesh.pongQueue(on: channel)

        let ledgerPath = mesh.directory.appendingPathComponent("failing.ledger.sqlite").path
        let ledger = try FailingLedger(path: ledgerPath)
        ledger.failClaims.store(2, ordering: .relaxed)
        ledger.failCompletes.store(2, ordering: .relaxed)
        ledger.failMarks.store(1, ordering: .relaxed)
        let runs = RunCounts()
        var config = mesh.pingConfiguration()
        config.concurrency = 4
        let metrics = TestMetrics()
        let runtime = try ChoreoRuntime(
            configuration: config, handlers: [RecordingPing(runs: runs)], ledger: ledger, metrics: metrics)
        let running = await started(runtime)

        let n = 30
        let ids = try await mesh.publishPings((0..<n).map { Ping(n: $0) }, on: channel)
        let handled = await eventually(
            within: 60,
            {
                await withTaskGroup(of: Bool.self) { group in
                    for id in ids {
                        group.addTask {
                            (try? await ledger.inner.status(handler: "ping", key: id))?.state == "completed"
                        }
                    }
                    return await group.reduce(0) { $0 + ($1 ? 1 : 0) }
                }
            }, until: { $0 == n })
        #expect(handled == n, "every event completed in the ledger despite the failures")
        #expect(ledger.failClaims.load(ordering: .relaxed) == 0 && ledger.failCompletes.load(ordering: .relaxed) == 0)
        #expect(ledger.failMarks.load(ordering: .relaxed) == 0, "a publish record failed on the way")
        // Failed claims and commits were tried again with their deliveries held: no handler ran twice.
        let counts = runs.snapshot
        #expect(Set(counts.keys) == Set(0..<n))
        #expect(counts.values.allSatisfy { $0 == 1 }, "a failed commit is retried, not the handler: \(counts)")
        let queue = try await channel.declareQueuePassive(mesh.pingQueues.main)
        #expect(queue.messageCount == 0)
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount == 0)
        // What an operator sees meanwhile: each failed call counted by step, the held events rising and back to 0.
        func errors(_ step: String) -> Int64 {
            metrics.counterTotal(
                label: "choreo_ledger_errors_total",
                dimensions: [("service", mesh.pingService), ("handler", "ping"), ("step", step)])
        }
        #expect([errors("claim"), errors("commit"), errors("record")] == [2, 2, 1])
        let held = try metrics.expectMeter(
            "choreo_ledger_held_events", [("service", mesh.pingService), ("handler", "ping")])
        #expect(held.values.contains { $0 > 0 } && held.lastValue == 0, "held: \(held.values)")
        #expect(MetricsTests.outcomes(metrics, service: mesh.pingService)["handled"] == Int64(n))
        #expect(MetricsTests.outcomes(metrics, service: mesh.pingService)["returned"] == 0)

        // One publish record was lost: the entries stay unrecorded until the next start's sweep, which
        // publishes them again (same ids) and records them.
        let unrecorded = try await ledger.inner.unpublished(handler: "ping", limit: 1000)
        #expect(!unrecorded.isEmpty, "the failed record leaves its entries for the sweep")
        runtime.beginShutdown()
        try await running.value
        let restarted = try ChoreoRuntime(configuration: config, handlers: [RecordingPing(runs: runs)], ledger: ledger)
        let again = await started(restarted)
        #expect(try await ledger.inner.unpublished(handler: "ping", limit: 1000).isEmpty)
        restarted.beginShutdown()
        try await again.value

        // Every pong was published, those of the unrecorded entries twice, with the same ids.
        let total = Int(try await channel.declareQueuePassive(pongs).messageCount)
        #expect(total == n + unrecorded.flatMap(\.messages).count)
        let published = try await peek(queue: pongs, expecting: total, connection: connection)
        let expected = Set(ids.map { HandlerContext.derivedID(input: $0, handler: "ping", index: 0) })
        #expect(Set(published.compactMap(\.properties.messageID)) == expected)
        try await channel.deleteQueue(pongs)
    }
}
