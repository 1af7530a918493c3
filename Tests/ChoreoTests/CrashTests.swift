import ChoreoAMQP
import Foundation
import GRDB
import MetricsTestKit
import Synchronization
import TestEvents
import Testing

@testable import Choreo

@Suite("Crashes, shutdowns and broker restarts lose nothing and double nothing", .serialized, .timeLimit(.minutes(5)))
struct CrashTests {
    /// Starts the sink and waits until it consumes, so no pong is published before its queue exists.
    private func startSink(_ mesh: Mesh, channel: AMQPChannel) async throws -> ServiceProcess {
        let sink = try mesh.start("sink")
        let info = await eventually(
            { try? await channel.declareQueuePassive("choreo.\(mesh.sinkService).sink") },
            until: { ($0?.consumerCount ?? 0) > 0 })
        try #require((info?.consumerCount ?? 0) > 0, "the sink did not start: \(sink.output)")
        return sink
    }

    @Test(
        "a handler process killed between two protocol steps, then restarted, applies each effect exactly once",
        arguments: FaultInjection.points)
    func crashBetweenSteps(point: String) async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect(declaring: false)
        defer { Task { await connection.close() } }
        let sink = try await startSink(mesh, channel: channel)
        defer { sink.terminate() }
        try await mesh.declare(on: channel)
        let n = 30
        let ids = try await mesh.publishPings((0..<n).map { Ping(n: $0) }, on: channel)

        let marker = mesh.directory.appendingPathComponent("crashed-\(point)").path
        let crashing = try mesh.start(
            "ping", concurrency: 1,
            environment: ["CHOREO_FAULT_POINT": point, "CHOREO_FAULT_MARKER": marker])
        #expect(await crashing.waitForExit(seconds: 60), "the handler did not reach \(point)")
        #expect(crashing.process.terminationReason == .uncaughtSignal && crashing.exitStatus == SIGKILL)
        #expect(FileManager.default.fileExists(atPath: marker))

        let restarted = try mesh.start("ping", concurrency: 1)
        defer { restarted.terminate() }
        let gateway = try mesh.gateway()
        await eventually(within: 60, { gateway.effects("sink") }, until: { $0 >= n })

        #expect(gateway.effectKeys("ping") == Set(ids), "each event's effect applied once")
        // The handler body re-runs only when the crash came after it ran and before the commit.
        #expect(gateway.requests("ping") == (point == "after-handler" ? n + 1 : n))
        let pongs = Set(ids.map { HandlerContext.derivedID(input: $0, handler: "ping", index: 0) })
        #expect(gateway.effectKeys("sink") == pongs, "each output delivered downstream once after deduplication")
        #expect(gateway.requests("sink") == n, "the downstream ledger drops republished copies")
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount == 0)
        // Every output is recorded as published in the end: after a crash between the publish and that record
        // ("after-publish"), by the redelivery that finds the key completed, or by the restarted process's sweep.
        // Read from the file itself: the restarted process holds the ledger (one SQLiteLedger per file).
        let ledger = mesh.directory.appendingPathComponent("ping.ledger.sqlite").path
        let left = await eventually(
            within: 30,
            {
                (try? DatabaseQueue(path: ledger).read { db in
                    try Int.fetchOne(
                        db, sql: "SELECT count(*) FROM completion WHERE handler = 'ping' AND idx >= 0 AND published = 0"
                    )
                }) ?? -1
            },
            until: { $0 == 0 })
        #expect(left == 0, "outbox entries never recorded as published")
    }

    @Test("graceful shutdown under load finishes in-flight work, exits 0, and loses nothing")
    func gracefulShutdownUnderLoad() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let n = 200
        let ids = try await mesh.publishPings((0..<n).map { Ping(n: $0, workMilliseconds: 20) }, on: channel)
        // Acks held for up to 10 s or until 100 wait (a quarter of the prefetch): invocations finish eight at a
        // time, so some acks are still held when it shuts down, and only its close can send them.
        let first = try mesh.start("ping", arguments: ["--ack-delay", "10000", "--prefetch", "400"])
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("ping") }, until: { $0 >= 40 })
        first.terminate()  // SIGTERM
        #expect(await first.waitForExit(seconds: 30))
        #expect(first.process.terminationReason == .exit && first.exitStatus == 0, "\(first.output)")
        // Every event it finished was acked before it closed (held acks included).
        try await expectRestHandledOnce(ids, mesh: mesh, channel: channel)
    }

    /// After a ping process stopped with work left: the queue holds exactly the events it did not handle (an
    /// ack lost at the close would have put one more back), and a new process handles those, so that each
    /// event ran once (an invocation begun before the stop was finished and committed, not run again).
    private func expectRestHandledOnce(_ ids: [String], mesh: Mesh, channel: AMQPChannel) async throws {
        let gateway = try mesh.gateway()
        let n = ids.count
        let stoppedAt = gateway.effects("ping")
        #expect(stoppedAt < n, "the stop came while work was left")
        let left = await eventually(
            { try? await channel.declareQueuePassive(mesh.pingQueues.main).messageCount },
            until: { ($0 ?? 0) >= n - stoppedAt })
        #expect(left == UInt32(n - stoppedAt))

        let second = try mesh.start("ping")
        defer { second.terminate() }
        await eventually(within: 60, { gateway.effects("ping") }, until: { $0 >= n })
        #expect(gateway.effectKeys("ping") == Set(ids))
        #expect(gateway.requests("ping") == n, "none ran twice")
    }

    @Test("a ledger deleted under a running handler stops it (exit 1, the reason); restarted, nothing lost or doubled")
    func ledgerDeletedWhileRunning() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        // Eight at a time for 0.1 s each: 2.5 s of work, and the ledger is checked every second.
        let n = 200
        let ids = try await mesh.publishPings((0..<n).map { Ping(n: $0, workMilliseconds: 100) }, on: channel)
        let first = try mesh.start("ping")
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("ping") }, until: { $0 >= 16 })
        // What an operator's `rm` does; SQLite itself would go on writing to the files it holds open.
        let ledger = mesh.directory.appendingPathComponent("ping.ledger.sqlite").path
        for suffix in ["", "-wal", "-shm", ".lock"] { try FileManager.default.removeItem(atPath: ledger + suffix) }
        #expect(await first.waitForExit(seconds: 30), "the handler runs on without its ledger")
        #expect(first.process.terminationReason == .exit && first.exitStatus == 1)
        let last = first.output.split(separator: "\n").last.map(String.init) ?? ""
        #expect(
            last.hasPrefix("error: the ledger file \(ledger) was deleted or moved away while in use; stopping"),
            "\(first.output)")
        // It finished and acked what it had begun, as at a graceful shutdown; started again, it begins an empty
        // ledger and handles the rest.
        try await expectRestHandledOnce(ids, mesh: mesh, channel: channel)
    }

    @Test("SIGTERM while a resource alarm holds the start-up ends the process at once, exit 0, and loses nothing")
    func shutdownWhileBlocked() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let ids = try await mesh.publishPings((0..<5).map { Ping(n: $0) }, on: channel)
        try Broker.raiseDiskAlarm()
        defer { try? Broker.clearDiskAlarm() }
        let first = try mesh.start("ping")
        // Its first publish (the manifest) is held, so it never begins to consume.
        let state = await eventually(
            { (try? Broker.connections(named: "\(mesh.pingService) publisher", column: "state")) ?? [] },
            until: { $0 == ["blocked"] })
        try #require(state == ["blocked"], "\(first.output)")
        first.terminate()  // SIGTERM
        // Its start-up would wait for the alarm; with the connection blocked, so would a clean close.
        #expect(await first.waitForExit(seconds: 10), "SIGTERM waits for the alarm")
        #expect(first.process.terminationReason == .exit && first.exitStatus == 0, "\(first.output)")

        try Broker.clearDiskAlarm()
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.main).messageCount == UInt32(ids.count))
        let second = try mesh.start("ping")
        defer { second.terminate() }
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("ping") }, until: { $0 >= ids.count })
        #expect(gateway.effectKeys("ping") == Set(ids))
        #expect(gateway.requests("ping") == ids.count)
    }

    @Test("a shutdown while a resource alarm holds in-flight confirms ends after its bound; nothing lost or doubled")
    func shutdownWhileConfirmsBlocked() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        // Four at a time for 0.2 s each: 10 s of work, and rabbitmqctl takes a second or two to raise the alarm.
        let ids = try await mesh.publishPings((0..<200).map { Ping(n: $0) }, on: channel)
        var config = mesh.pingConfiguration()
        config.concurrency = 4
        config.shutdownTimeout = .seconds(2)
        let runs = RunCounts()
        let metrics = TestMetrics()
        // One ledger for both incarnations of this process.
        let ledger = try SQLiteLedger(path: config.resolvedLedgerPath)
        let first = try ChoreoRuntime(
            configuration: config, handlers: [RecordingPing(runs: runs, work: .milliseconds(200))], ledger: ledger,
            metrics: metrics)
        let running = await started(first)
        try Broker.raiseDiskAlarm()
        defer { try? Broker.clearDiskAlarm() }
        let blocked = await eventually(
            { try? metrics.expectMeter("choreo_publishing_blocked", [("service", mesh.pingService)]).lastValue },
            until: { $0 == 1 })
        try #require(blocked == 1, "no pong was held by the alarm")

        let stop = ContinuousClock.now
        first.beginShutdown()
        // The drain's 2 s, then the connections are cut off; without that, until the alarm clears.
        let ended = Mutex(false)
        Task {
            _ = try? await running.value
            ended.withLock { $0 = true }
        }
        #expect(
            await eventually(within: 20, { ended.withLock { $0 } }, until: { $0 }), "the shutdown waited for the alarm")
        #expect(ContinuousClock.now - stop < .seconds(10))

        try Broker.clearDiskAlarm()
        _ = try? await running.value
        let second = try ChoreoRuntime(
            configuration: config, handlers: [RecordingPing(runs: runs, work: .milliseconds(200))], ledger: ledger)
        let again = await started(second)
        let done = await eventually({ runs.snapshot.count }, until: { $0 >= ids.count })
        #expect(done == ids.count)
        // Settled: the queue is empty, so no run can come later.
        await eventually(
            { try? await channel.declareQueuePassive(mesh.pingQueues.main).messageCount }, until: { $0 == 0 })
        #expect(runs.snapshot == Dictionary(uniqueKeysWithValues: (0..<ids.count).map { ($0, 1) }), "each ran once")
        second.beginShutdown()
        try await again.value
    }

    @Test("a broker restart mid-stream is survived and the stream completes")
    func brokerRestartMidStream() async throws {
        let mesh = try Mesh()
        var connection = try await Broker.connect()
        var channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let sink = try await startSink(mesh, channel: channel)
        defer { sink.terminate() }
        try await mesh.declare(on: channel)
        let n = 400
        let ids = try await mesh.publishPings((0..<n).map { Ping(n: $0, workMilliseconds: 25) }, on: channel)
        let ping = try mesh.start("ping", concurrency: 2)
        defer { ping.terminate() }
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("ping") }, until: { $0 >= 30 })
        #expect(gateway.effects("ping") < n - 100, "the restart comes mid-stream")
        try Broker.ctl("stop_app")
        try await Task.sleep(for: .seconds(1))
        try Broker.ctl("start_app")
        try Broker.ctl("await_startup")

        await eventually(within: 90, { gateway.effects("sink") }, until: { $0 >= n })
        #expect(ping.isRunning && sink.isRunning)
        #expect(gateway.effectKeys("ping") == Set(ids))
        #expect(gateway.effects("sink") == n)
        connection = try await Broker.connect()
        channel = try await connection.openChannel()
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount == 0)
        await connection.close()
    }

    @Test("a message that kills the process on every delivery is dead-lettered by the broker's delivery limit")
    func poisonMessageHitsDeliveryLimit() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect(declaring: false)
        defer { Task { await connection.close() } }
        try await mesh.declare(on: channel, deliveryLimit: 2)
        let ids = try await mesh.publishPings([Ping(n: 1, crash: true), Ping(n: 2)], on: channel)
        var restarts = 0
        while restarts < 8, (try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount) == 0 {
            // Prefetch 1: only the poison is in flight when the process dies, so only its delivery count grows.
            let p = try mesh.start("ping", concurrency: 1, arguments: ["--delivery-limit", "2", "--prefetch", "1"])
            _ = await p.waitForExit(seconds: 5)
            p.kill9()
            restarts += 1
        }
        #expect(restarts >= 3, "it took \(restarts) crashes")
        let letters = try await peek(queue: mesh.pingQueues.deadLetter, expecting: 1, connection: connection)
        #expect(letters.count == 1)
        #expect(letters.first?.properties.messageID == ids[0])
        #expect(letters.first?.properties.headers?["x-first-death-reason"] == .string("delivery_limit"))
        // The healthy event behind it is handled once the poison is gone.
        let survivor = try mesh.start("ping", concurrency: 1, arguments: ["--delivery-limit", "2"])
        defer { survivor.terminate() }
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("ping") }, until: { $0 >= 1 })
        #expect(gateway.effectKeys("ping") == [ids[1]])
    }
}
