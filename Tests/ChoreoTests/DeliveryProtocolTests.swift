import ChoreoAMQP
import Foundation
import TestEvents
import Testing

@testable import Choreo

@Suite("Delivery protocol with real handler processes", .serialized, .timeLimit(.minutes(5)))
struct DeliveryProtocolTests {
    @Test(
        "events flow through a handler to a downstream handler, each effect once; a duplicate publish gives one effect")
    func happyPathAndDuplicate() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect(declaring: false)
        defer { Task { await connection.close() } }
        let (ping, sink) = try await startPingAndSink(mesh, channel: channel)
        defer { ping.terminate(); sink.terminate() }

        let ids = try await mesh.publishPings((0..<20).map { Ping(n: $0) }, on: channel)
        // The same event (same id) published again: a broker-level duplicate.
        try await mesh.publishPings([Ping(n: 0)], on: channel, ids: [ids[0]])
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("sink") }, until: { $0 >= 20 })
        #expect(gateway.effects("ping") == 20)
        #expect(gateway.requests("ping") == 20, "the duplicate must not run the handler again")
        #expect(gateway.effectKeys("ping") == Set(ids))
        // Downstream: each emitted pong has the deterministic id and ran the sink once.
        let expectedPongs = Set(ids.map { HandlerContext.derivedID(input: $0, handler: "ping", index: 0) })
        #expect(gateway.effectKeys("sink") == expectedPongs)
        #expect(gateway.requests("sink") == 20)
    }

    @Test("a handler that fails twice then succeeds runs three times and takes effect once")
    func failsTwiceThenSucceeds() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let ids = try await mesh.publishPings([Ping(n: 1, failTimes: 2)], on: channel)
        let ping = try mesh.start("ping")
        defer { ping.terminate() }
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("ping") }, until: { $0 >= 1 })
        #expect(gateway.attempts("ping", key: ids[0]) == [3])
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount == 0)
    }

    @Test("copies of one event that arrive together run the handler once; the others wait for it, then are acked")
    func copiesArrivingTogether() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let sink = try mesh.start("sink")
        defer { sink.terminate() }
        try await waitForConsumer("choreo.\(mesh.sinkService).sink", channel: channel)
        // Three copies with one id, queued before the handler starts, reach it together: the first claims the key
        // and works for 500 ms, the others find the key held by a live lease.
        let id = UUID().uuidString.lowercased()
        try await mesh.publishPings(
            Array(repeating: Ping(n: 1, workMilliseconds: 500), count: 3), on: channel, ids: [id, id, id])
        let ping = try mesh.start("ping", environment: ["CHOREO_LOG_LEVEL": "debug"])
        defer { ping.terminate() }
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("sink") }, until: { $0 >= 1 })

        // A graceful stop lets the waiting copies settle; a copy left unacked returns to the queue when the
        // handler's connection closes, which the broker has done once the queue has no consumer.
        ping.terminate()
        #expect(await ping.waitForExit(seconds: 30))
        #expect(ping.process.terminationReason == .exit && ping.exitStatus == 0, "\(ping.output)")
        let info = await eventually(
            { try? await channel.declareQueuePassive(mesh.pingQueues.main) }, until: { $0?.consumerCount == 0 })
        #expect(info?.consumerCount == 0)
        #expect(info?.messageCount == 0, "every copy was acked")
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount == 0)
        #expect(
            ping.output.components(separatedBy: "another invocation holds this key").count - 1 == 2,
            "both later copies found the key held: \(ping.output)")
        #expect(gateway.requests("ping") == 1, "the copies must not run the handler again")
        #expect(gateway.effectKeys("ping") == [id])
        #expect(gateway.effectKeys("sink") == [HandlerContext.derivedID(input: id, handler: "ping", index: 0)])
        #expect(gateway.requests("sink") == 1)
    }

    @Test("retries exhausted end in the dead-letter queue with the failure metadata")
    func retriesExhausted() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let ids = try await mesh.publishPings([Ping(n: 7, failTimes: 99)], on: channel)
        let ping = try mesh.start("ping")
        defer { ping.terminate() }
        await eventually(
            { try? await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount }, until: { $0 == 1 })
        let letters = try await peek(queue: mesh.pingQueues.deadLetter, expecting: 1, connection: connection)
        #expect(letters.count == 1)
        let h = letters.first?.properties.headers ?? [:]
        typealias W = WireNames.Headers
        #expect(h[W.deadLetterHandler] == .string("ping"))
        #expect(h[W.deadLetterService] == .string(mesh.pingService))
        #expect(h[W.deadLetterErrorType] == .string("GatewayError"))
        #expect(h[W.deadLetterErrorMessage] == .string("gateway unavailable (attempt 3)"))
        #expect(h[W.deadLetterAttempts] == .string("3"))
        #expect(h[W.deadLetterOriginalExchange] == .string(mesh.exchange))
        #expect(h[W.deadLetterOriginalRoutingKey] == .string("test.ping"))
        let first = h[W.deadLetterFirstFailure]?.stringValue.flatMap(Timestamps.parse)
        let last = h[W.deadLetterLastFailure]?.stringValue.flatMap(Timestamps.parse)
        #expect(first != nil && last != nil && first! <= last!)
        #expect(h["cloudEvents_id"] == .string(ids[0]))
        #expect(try mesh.gateway().effects("ping") == 0)
    }

    @Test(
        "a handler's queues deleted under its running service are declared again: what reaches them is not lost")
    func ownQueuesDeletedWhileRunning() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect(declaring: false)
        defer { Task { await connection.close() } }
        let ping = try mesh.start("ping")
        defer { ping.terminate() }
        try await waitForConsumer(mesh.pingQueues.main, channel: channel)
        // An operator deletes the handler's dead-letter queue, later its only retry tier, while it runs. The broker
        // confirms a publish to a queue that does not exist: unless the runtime notices, the dead letter and the
        // retried event are acked and gone.
        let dlq = mesh.pingQueues.deadLetter
        let tier = mesh.pingQueues.retry(delay: .milliseconds(200))
        try await channel.deleteQueue(dlq)
        #expect(try Broker.messages(in: dlq) == nil)
        let poisoned = try await mesh.publishPings([Ping(n: 1, poison: true)], on: channel)
        let first = await eventually({ try? Broker.messages(in: dlq) }, until: { $0 == 1 })
        #expect(first == 1, "the dead letter is kept: \(ping.output)")

        try await channel.deleteQueue(tier)
        #expect(try Broker.messages(in: tier) == nil)
        // Fails on every attempt: two retries through the tier, then a dead letter.
        let failing = try await mesh.publishPings([Ping(n: 2, failTimes: 99)], on: channel)
        let count = await eventually({ try? Broker.messages(in: dlq) }, until: { $0 == 2 })
        #expect(count == 2, "the retried event is kept and ends as a dead letter: \(ping.output)")
        let ids = poisoned + failing
        let letters = try await peek(queue: mesh.pingQueues.deadLetter, expecting: 2, connection: connection)
        var attempts: [String: String] = [:]
        for letter in letters {
            let h = letter.properties.headers ?? [:]
            if let id = h["cloudEvents_id"]?.stringValue {
                attempts[id] = h[WireNames.Headers.deadLetterAttempts]?.stringValue
            }
        }
        #expect(attempts == [ids[0]: "1", ids[1]: "3"], "the failing event went through both retries")
        #expect(try Broker.messages(in: tier) == 0, "the tier was declared again and is empty")
        // Acks may be held for a moment (--ack-delay): the last one settles shortly after the dead letter.
        #expect(await eventually({ try? Broker.messages(in: mesh.pingQueues.main) }, until: { $0 == 0 }) == 0)
        let warnings = ping.output.components(separatedBy: "is missing (deleted while the service runs?)").count - 1
        #expect(warnings == 2, "one warning for each queue found missing: \(ping.output)")

        // The handler's own queue deleted: the broker cancels the consumer, and the service declares its queues
        // again, binding included, and consumes what is published next.
        try await channel.deleteQueue(mesh.pingQueues.main)
        try await waitForConsumer(mesh.pingQueues.main, channel: channel)
        let later = try await mesh.publishPings([Ping(n: 3)], on: channel)
        let gateway = try mesh.gateway()
        await eventually({ gateway.effectKeys("ping") }, until: { $0.contains(later[0]) })
        #expect(gateway.effectKeys("ping") == Set(later))
        #expect(ping.output.contains("the broker cancelled a consumer (was its queue deleted?)"), "\(ping.output)")
        #expect(ping.process.isRunning, "the service goes on")
    }

    @Test(
        "the mesh's exchange deleted under running services: it and every binding come back, nothing is dead-lettered"
    )
    func exchangeDeletedWhileRunning() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect(declaring: false)
        defer { Task { await connection.close() } }
        let (ping, sink) = try await startPingAndSink(mesh, channel: channel)
        defer { ping.terminate(); sink.terminate() }
        let sinkQueue = "choreo.\(mesh.sinkService).sink"
        #expect(try Broker.exchanges(boundTo: sinkQueue) == [mesh.exchange])

        // Deleting the exchange deletes its bindings; neither service's connections notice.
        try await channel.deleteExchange(mesh.exchange)
        #expect(try Broker.exchanges(boundTo: mesh.pingQueues.main).isEmpty)
        #expect(try Broker.exchanges(boundTo: sinkQueue).isEmpty)
        // Pings sent straight to the ping handler's queue: each emits a pong to the missing exchange.
        var direct: [AMQPOutgoingMessage] = []
        var directIDs: [String] = []
        for n in 0..<5 {
            let envelope = try EventEnvelope(Ping(n: n), source: "test")
            var message = EnvelopeCodec.encode(envelope, exchange: "")
            message.routingKey = mesh.pingQueues.main
            direct.append(message)
            directIDs.append(envelope.id)
        }
        for r in await channel.publish(contentsOf: direct) { try r.get() }
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("ping") }, until: { $0 >= 5 })
        #expect(gateway.effectKeys("ping") == Set(directIDs))

        // The ping service reconnects and declares the exchange and its binding; the sink binds its queue again
        // at its next check. Then events flow end to end again.
        let bound = await eventually(
            within: 45, { try? Broker.exchanges(boundTo: sinkQueue) }, until: { $0 == [mesh.exchange] })
        #expect(bound == [mesh.exchange], "the sink's queue is bound again: \(sink.output)")
        #expect(try Broker.exchanges(boundTo: mesh.pingQueues.main) == [mesh.exchange])
        let later = try await mesh.publishPings((5..<10).map { Ping(n: $0) }, on: channel)
        let laterPongs = Set(later.map { HandlerContext.derivedID(input: $0, handler: "ping", index: 0) })
        await eventually({ gateway.effectKeys("sink") }, until: { $0.isSuperset(of: laterPongs) })
        #expect(gateway.effectKeys("sink").isSuperset(of: laterPongs))
        #expect(gateway.effectKeys("ping") == Set(directIDs + later))
        #expect(gateway.requests("ping") == 10, "no ping ran twice")
        #expect(gateway.requests("sink") == gateway.effects("sink"), "no pong ran twice")
        #expect(try Broker.messages(in: mesh.pingQueues.deadLetter) == 0, "nothing was dead-lettered: \(ping.output)")
        #expect(ping.output.contains("the exchange '\(mesh.exchange)' is missing"), "\(ping.output)")
        #expect(ping.process.isRunning && sink.process.isRunning)
    }

    /// Starts the ping and sink services and waits until each consumes from the queue it declares on start.
    private func startPingAndSink(_ mesh: Mesh, channel: AMQPChannel) async throws -> (ServiceProcess, ServiceProcess) {
        let ping = try mesh.start("ping")
        let sink: ServiceProcess
        do { sink = try mesh.start("sink") } catch {
            ping.terminate()
            throw error
        }
        do {
            try await waitForConsumer(mesh.pingQueues.main, channel: channel)
            try await waitForConsumer("choreo.\(mesh.sinkService).sink", channel: channel)
        } catch {
            ping.terminate(); sink.terminate()
            throw error
        }
        return (ping, sink)
    }

    /// Waits until a queue exists and has a consumer.
    private func waitForConsumer(_ queue: String, channel: AMQPChannel) async throws {
        let info = await eventually(
            { try? await channel.declareQueuePassive(queue) }, until: { ($0?.consumerCount ?? 0) > 0 })
        try #require((info?.consumerCount ?? 0) > 0, "no consumer on \(queue)")
    }
}
