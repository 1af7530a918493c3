import ChoreoAMQP
import Foundation
import Synchronization
import Testing

@Suite("AMQP layer against a real broker", .serialized, .timeLimit(.minutes(2)))
struct BrokerIntegrationTests {
    @Test("a body and every header type survive a round trip")
    func roundTripOfEveryHeaderType() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let (channel, queue) = try await TestBroker.confirmingChannel(on: connection, queue: "roundtrip")

        let headers: AMQPTable = [
            "bool": .bool(true), "i8": .int8(-8), "u8": .uint8(200), "i16": .int16(-16_000), "u16": .uint16(60_000),
            "i32": .int32(-2_000_000_000), "u32": .uint32(4_000_000_000), "i64": .int64(-9_000_000_000_000),
            "float": .float(1.5), "double": .double(-2.25), "decimal": .decimal(scale: 2, value: 12345),
            "string": .string("grüße ✓"), "bytes": .bytes([0, 255, 1, 254]), "timestamp": .timestamp(1_764_000_000),
            "table": .table(["inner": .string("x"), "deeper": .table(["n": .int32(7)])]),
            "array": .array([.int32(1), .string("two"), .bool(false), .array([.int64(3)])]),
            "void": .void,
        ]
        var body = Data((0..<4096).map { UInt8($0 % 256) })
        body.append(contentsOf: [0xFF, 0xFE, 0x00])
        let properties = AMQPProperties(
            contentType: "application/octet-stream", contentEncoding: "identity", headers: headers, deliveryMode: 2,
            priority: 3, correlationID: "corr-1", replyTo: "nowhere", expiration: "60000", messageID: "msg-1",
            timestamp: 1_764_000_001, type: "test.type", appID: "choreo-tests")
        try await channel.publish(
            AMQPOutgoingMessage(exchange: "", routingKey: queue, body: body, properties: properties))

        let consumer = try await channel.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        let delivery = try await nextDelivery(&iterator)
        #expect(delivery.body == body)
        #expect(delivery.properties == properties)
        #expect(delivery.properties.headers == headers)
        // A table goes out with its names in byte order; received headers keep the order they came in.
        #expect(
            delivery.properties.headerFields?.map(\.name)
                == headers.keys.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) })
        #expect(delivery.properties.header("u32") == .uint32(4_000_000_000) && delivery.properties.header("no") == nil)
        #expect(delivery.routingKey == queue)
        #expect(delivery.redelivered == false)
        try delivery.ack()

        // Headers set as a list go out in the order given, not sorted.
        var listed = AMQPProperties(deliveryMode: 2)
        let fields = [
            AMQPHeaderField(name: "zeta", value: .string("last name first")),
            AMQPHeaderField(name: "alpha", value: .int64(-1)),
            AMQPHeaderField(name: "mid", value: .table(["k": .bool(true)])),
        ]
        listed.headerFields = fields
        try await channel.publish(AMQPOutgoingMessage(exchange: "", routingKey: queue, body: body, properties: listed))
        let second = try await nextDelivery(&iterator)
        #expect(second.properties.headerFields == fields)
        #expect(second.properties == listed)
        try second.ack()
    }

    @Test("bodies around and across the frame size, and headers that change from message to message, arrive intact")
    func bodiesAcrossFramesAndChangingHeaders() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let (channel, queue) = try await TestBroker.confirmingChannel(on: connection, queue: "frames")

        // The negotiated frame size is 131,072 bytes; a body frame carries 8 bytes less.
        let sizes = [0, 1, 131_063, 131_064, 131_065, 131_072, 3 * 131_064 + 5, 1 << 20]
        // Same names with new values, a name replaced at the same position, names added and dropped.
        let headerSets: [AMQPTable] = [
            ["a": .string("one"), "b": .string("same")],
            ["a": .string("two"), "b": .string("same")],
            ["a": .string("two"), "c": .string("same")],
            ["a": .int32(2), "b": .string("same"), "d": .string("fourth")],
            [:],
            ["b": .string("")],
        ]
        let messages = sizes.enumerated().map { i, size in
            let body = Data((0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) })
            let properties = AMQPProperties(
                contentType: i % 2 == 0 ? "application/json" : "text/plain", headers: headerSets[i % headerSets.count])
            return AMQPOutgoingMessage(exchange: "", routingKey: queue, body: body, properties: properties)
        }
        // As one batch (one write), then one by one.
        let results = await channel.publish(contentsOf: messages)
        #expect(results.allSatisfy { if case .success = $0 { return true } else { return false } })
        for message in messages { try await channel.publish(message) }

        let consumer = try await channel.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        for (n, message) in (messages + messages).enumerated() {
            let delivery = try await nextDelivery(&iterator)
            #expect(delivery.body == message.body, "message \(n): \(delivery.body.count) bytes")
            #expect(delivery.properties.headers ?? [:] == message.properties.headers ?? [:], "message \(n)")
            #expect(delivery.properties.contentType == message.properties.contentType, "message \(n)")
            try delivery.ack()
        }
    }

    @Test("10,000 pipelined publishes are all confirmed")
    func tenThousandPipelinedPublishes() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName("pipelined")
        try await channel.declareQueue(queue, options: .quorum())
        defer { Task { _ = try? await channel.deleteQueue(queue) } }

        let messages = (0..<10_000).map { AMQPOutgoingMessage.toQueue(queue, "message \($0)") }
        let results = await channel.publish(contentsOf: messages)
        #expect(results.count == 10_000)
        let failures = results.filter { if case .failure = $0 { return true } else { return false } }
        #expect(failures.isEmpty, "\(failures.prefix(3))")
        let info = try await channel.declareQueuePassive(queue)
        #expect(info.messageCount == 10_000)
    }

    @Test("names, routing keys and properties over 255 bytes are refused saying so, and the channel goes on")
    func shortStringsTooLong() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName("short")
        try await channel.declareQueue(queue, options: QueueOptions(durable: false, exclusive: true))
        // 128 two-byte characters: 128 characters, 256 bytes.
        let long = String(repeating: "é", count: 128)
        func refusal(_ what: String) -> String {
            "encode failed: the \(what) '\(long.prefix(32))...' is 256 bytes long; AMQP 0-9-1 allows at most 255"
        }
        func expectRefused(_ what: String, _ operation: () async throws(AMQPError) -> Void) async {
            let error = await #expect(throws: AMQPError.self) { try await operation() }
            #expect(error?.code == .invalidArgument)
            #expect(error?.description == refusal(what))
        }
        await expectRefused("exchange name") { () throws(AMQPError) in try await channel.declareExchange(long) }
        await expectRefused("queue name") { () throws(AMQPError) in _ = try await channel.declareQueue(long) }
        await expectRefused("routing key") { () throws(AMQPError) in
            try await channel.bindQueue(queue, exchange: "amq.topic", routingKey: long)
        }
        await expectRefused("routing key") { () throws(AMQPError) in
            try await channel.publish(AMQPOutgoingMessage(exchange: "", routingKey: long, body: Data("x".utf8)))
        }
        await expectRefused("message id") { () throws(AMQPError) in
            try await channel.publish(
                AMQPOutgoingMessage(
                    exchange: "", routingKey: queue, body: Data("x".utf8), properties: AMQPProperties(messageID: long)))
        }
        await expectRefused("header name") { () throws(AMQPError) in
            try await channel.publish(
                AMQPOutgoingMessage(
                    exchange: "", routingKey: queue, body: Data("x".utf8),
                    properties: AMQPProperties(headers: [long: .string("v")])))
        }

        // 255 bytes pass, and the same channel and connection carry them.
        let most = String(repeating: "a", count: 255)
        try await channel.publish(
            AMQPOutgoingMessage(
                exchange: "", routingKey: queue, body: Data("x".utf8),
                properties: AMQPProperties(headers: [most: .string("v")], messageID: most)))
        let consumer = try await channel.consume(queue: queue)
        var deliveries = consumer.makeAsyncIterator()
        let delivery = try await nextDelivery(&deliveries)
        #expect(delivery.properties.messageID == most)
        #expect(delivery.properties.headers?[most] == .string("v"))
    }

    @Test("a resource alarm blocks publishing: the connection tells why, the publish waits and is confirmed after it")
    func blockedByResourceAlarm() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName("alarm")
        try await channel.declareQueue(queue, options: QueueOptions(durable: false))
        defer { Task { _ = try? await channel.deleteQueue(queue) } }
        let changes = Mutex<[String?]>([])
        connection.onBlockedChange { reason in changes.withLock { $0.append(reason) } }
        #expect(connection.blockedReason == nil)

        // Free disk below 1,000 times the RAM: the broker raises its disk alarm (the tests run one at a time).
        try TestBroker.ctl("set_disk_free_limit", "mem_relative", "1000")
        var cleared = false
        defer { if !cleared { try? TestBroker.ctl("set_disk_free_limit", "50MB") } }
        let publish = Task {
            try await channel.publish(AMQPOutgoingMessage(exchange: "", routingKey: queue, body: Data("x".utf8)))
        }
        let deadline = ContinuousClock.now + .seconds(20)
        while connection.blockedReason == nil, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(connection.blockedReason == "low on disk")
        #expect(changes.withLock { $0 } == ["low on disk"])
        // Blocked, the message has not reached the queue.
        let other = try await TestBroker.connect()
        defer { Task { await other.close() } }
        #expect(try await other.openChannel().declareQueuePassive(queue).messageCount == 0)

        try TestBroker.ctl("set_disk_free_limit", "50MB")
        cleared = true
        try await publish.value
        #expect(try await channel.declareQueuePassive(queue).messageCount == 1)
        #expect(connection.blockedReason == nil)
        #expect(changes.withLock { $0 } == ["low on disk", nil])
    }

    @Test("a mandatory publish to an unbound routing key is reported as returned")
    func mandatoryPublishIsReturned() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let exchange = TestBroker.uniqueName("mandatory")
        try await channel.declareExchange(exchange, type: .topic, durable: false, autoDelete: false)
        defer { Task { try? await channel.deleteExchange(exchange) } }

        let message = AMQPOutgoingMessage(
            exchange: exchange, routingKey: "nobody.listens", body: Data("x".utf8),
            mandatory: true)
        let error = await #expect(throws: AMQPError.self) { try await channel.publish(message) }
        #expect(error?.code == .unroutable)
        #expect(error?.replyCode == AMQPError.ReplyCode.noRoute)
        #expect(
            error?.description
                == "basic.publish to exchange '\(exchange)' with routing key 'nobody.listens' failed: 312 NO_ROUTE: no queue is bound for it"
        )

        // The same channel goes on: a routable mandatory publish is confirmed.
        let queue = TestBroker.uniqueName("bound")
        try await channel.declareQueue(queue, options: QueueOptions(durable: false, exclusive: true))
        try await channel.bindQueue(queue, exchange: exchange, routingKey: "somebody.listens")
        try await channel.publish(
            AMQPOutgoingMessage(
                exchange: exchange, routingKey: "somebody.listens",
                body: Data("y".utf8), mandatory: true))
    }

    @Test("nack without requeue and reject reach the dead-letter exchange")
    func nackAndRejectAreDeadLettered() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let dlx = TestBroker.uniqueName("dlx")
        let dlq = TestBroker.uniqueName("dlq")
        let queue = TestBroker.uniqueName("work")
        try await channel.declareExchange(dlx, type: .fanout, durable: false)
        defer { Task { try? await channel.deleteExchange(dlx) } }
        try await channel.declareQueue(dlq, options: QueueOptions(durable: false, exclusive: true))
        try await channel.bindQueue(dlq, exchange: dlx, routingKey: "")
        var options = QueueOptions(durable: false, exclusive: true)
        options.deadLetterExchange = dlx
        try await channel.declareQueue(queue, options: options)

        _ = await channel.publish(contentsOf: [.toQueue(queue, "nacked"), .toQueue(queue, "rejected")])
        let consumer = try await channel.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        let first = try await nextDelivery(&iterator)
        try first.nack(requeue: false)
        let second = try await nextDelivery(&iterator)
        try second.reject(requeue: false)

        let dead = try await channel.consume(queue: dlq)
        var deadIterator = dead.makeAsyncIterator()
        var bodies: [String] = []
        for _ in 0..<2 {
            let d = try await nextDelivery(&deadIterator)
            bodies.append(String(decoding: d.body, as: UTF8.self))
            #expect(d.properties.headers?["x-death"] != nil)
            try d.ack()
        }
        #expect(bodies.sorted() == ["nacked", "rejected"])
    }

    /// A new queue holding messages `m0` to `m19`, and the confirming channel that filled it.
    private func queueOfTwenty(_ prefix: String, on connection: AMQPConnection) async throws -> (
        publisher: AMQPChannel, queue: String
    ) {
        let publisher = try await connection.openChannel()
        try await publisher.enableConfirms()
        let queue = TestBroker.uniqueName(prefix)
        try await publisher.declareQueue(queue, options: QueueOptions(durable: false, autoDelete: false))
        for r in await publisher.publish(contentsOf: (0..<20).map { .toQueue(queue, "m\($0)") }) { try r.get() }
        return (publisher, queue)
    }

    @Test("the prefetch count bounds unacknowledged deliveries")
    func prefetchIsHonoured() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let (publisher, queue) = try await queueOfTwenty("prefetch", on: connection)
        defer { Task { _ = try? await publisher.deleteQueue(queue) } }

        let channel = try await connection.openChannel()
        try await channel.setPrefetch(5)
        let consumer = try await channel.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        var held: [AMQPDelivery] = []
        for _ in 0..<5 { held.append(try await nextDelivery(&iterator)) }
        // The broker sent five and holds the rest: a sixth in flight would make this 14.
        #expect(try await publisher.declareQueuePassive(queue).messageCount == 15)
        try held[0].ack()
        let sixth = try await nextDelivery(&iterator)
        #expect(String(decoding: sixth.body, as: UTF8.self) == "m5")
        #expect(try await publisher.declareQueuePassive(queue).messageCount == 14)
    }

    @Test("held acks go out by their deadline or their count, and closing the channel sends them first")
    func heldAcks() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let (publisher, queue) = try await queueOfTwenty("held-acks", on: connection)
        defer { Task { _ = try? await publisher.deleteQueue(queue) } }

        // The prefetch makes the acks visible: the broker sends a sixth message only once acks reached it.
        let channel = try await connection.openChannel()
        try await channel.setPrefetch(5)
        try await channel.holdAcks(for: .milliseconds(600), upTo: 100)
        let consumer = try await channel.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        var unacked: [AMQPDelivery] = []
        for _ in 0..<5 { unacked.append(try await nextDelivery(&iterator)) }
        let ackedAt = ContinuousClock.now
        for d in unacked { try d.ack() }
        unacked = [try await nextDelivery(&iterator)]
        #expect(ContinuousClock.now - ackedAt >= .milliseconds(300), "the acks waited at least half the delay")
        #expect(String(decoding: unacked[0].body, as: UTF8.self) == "m5")
        for _ in 0..<4 { unacked.append(try await nextDelivery(&iterator)) }

        // A count of three: the third ack sends all three, long before the 60 s delay.
        try await channel.holdAcks(for: .seconds(60), upTo: 3)
        for d in unacked.prefix(3) { try d.ack() }
        unacked.removeFirst(3)
        for _ in 0..<3 { unacked.append(try await nextDelivery(&iterator, within: 20)) }
        #expect(unacked.map { String(decoding: $0.body, as: UTF8.self) } == ["m8", "m9", "m10", "m11", "m12"])

        // Held at the close: sent before it, so none of m8-m12 goes back to the queue. (The consumer is
        // cancelled first, or the broker would send m13 on once the acks reached it, and the close return it.)
        try await channel.holdAcks(for: .seconds(60), upTo: 100)
        for d in unacked { try d.ack() }
        try await consumer.cancel()
        await channel.close()
        let again = try await connection.openChannel()
        let rest = try await again.consume(queue: queue)
        var restIterator = rest.makeAsyncIterator()
        let next = try await nextDelivery(&restIterator)
        #expect(String(decoding: next.body, as: UTF8.self) == "m13")
        #expect(!next.redelivered)
        try next.ack()
    }

    @Test("redeclaring a queue with other arguments surfaces 406 and the connection stays usable")
    func redeclareMismatchIs406() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName("redeclare")
        try await channel.declareQueue(queue, options: .quorum(deliveryLimit: 5))
        defer { Task { _ = try? await channel.deleteQueue(queue) } }

        let error = await #expect(throws: AMQPError.self) {
            try await channel.declareQueue(queue, options: .quorum(deliveryLimit: 9))
        }
        #expect(error?.code == .channelClosed)
        #expect(error?.replyCode == AMQPError.ReplyCode.preconditionFailed)
        #expect(
            error?.description.hasPrefix(
                "queue.declare '\(queue)' failed: 406 PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit'")
                == true)
        #expect(connection.isOpen)
        // The same channel object reopens on its next use.
        let info = try await channel.declareQueue(queue, options: .quorum(deliveryLimit: 5))
        #expect(info.name == queue)
        let missing = await #expect(throws: AMQPError.self) {
            try await channel.declareQueuePassive(queue + ".missing")
        }
        #expect(missing?.replyCode == AMQPError.ReplyCode.notFound)
        #expect(try await channel.declareQueuePassive(queue).messageCount == 0)
    }

    @Test("a wrong password is an authentication error that does not show the password")
    func wrongPassword() async throws {
        var config = try TestBroker.configuration
        config.password = "not-the-password"
        let error = await #expect(throws: AMQPError.self) { try await AMQPConnection.connect(to: config) }
        #expect(error?.code == .authenticationFailed)
        #expect(
            error?.description
                == "log in to amqp://\(config.username)@\(config.address)/ failed: 403 ACCESS_REFUSED: the broker refused user '\(config.username)' (wrong user name or password)"
        )
        #expect(error?.description.contains("not-the-password") == false)
    }

    @Test("a closed port gives a connection error within a bounded time")
    func closedPort() async throws {
        var config = try TestBroker.configuration
        config.port = 1  // nothing listens on port 1 here
        config.connectTimeout = .seconds(3)
        let started = ContinuousClock.now
        let error = await #expect(throws: AMQPError.self) { try await AMQPConnection.connect(to: config) }
        #expect(ContinuousClock.now - started < .seconds(6))
        #expect(error?.code == .connectionFailed)
        #expect(error?.description == "connect \(config.host):1 failed: connection refused")
    }

    @Test("a stream is read from the first offset")
    func streamFromFirst() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let stream = TestBroker.uniqueName("stream")
        try await channel.declareQueue(stream, options: .stream)
        defer { Task { _ = try? await channel.deleteQueue(stream) } }
        _ = await channel.publish(contentsOf: (0..<3).map { .toQueue(stream, "entry \($0)") })

        let reader = try await connection.openChannel()
        let consumer = try await reader.consumeStream(queue: stream, from: .first, prefetch: 10)
        var iterator = consumer.makeAsyncIterator()
        var seen: [String] = []
        var offsets: [Int64] = []
        for _ in 0..<3 {
            let d = try await nextDelivery(&iterator)
            seen.append(String(decoding: d.body, as: UTF8.self))
            offsets.append(d.streamOffset ?? -1)
            try d.ack()
        }
        #expect(seen == ["entry 0", "entry 1", "entry 2"])
        #expect(offsets == [0, 1, 2])
        try await consumer.cancel()
    }

    @Test("a consumer whose code blocks for more than three heartbeat intervals keeps its connection")
    func heartbeatsFlowWhileApplicationBlocks() async throws {
        let connection = try await TestBroker.connect(heartbeat: .seconds(1))
        defer { Task { await connection.close() } }
        let (channel, queue) = try await TestBroker.confirmingChannel(on: connection, queue: "heartbeat")
        _ = await channel.publish(contentsOf: [.toQueue(queue, "slow"), .toQueue(queue, "after")])

        let consumer = try await channel.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        let first = try await nextDelivery(&iterator)
        // Application code that blocks its thread outright for 4.5 heartbeat intervals.
        blockThisThread(seconds: 4.5)
        #expect(connection.isOpen)
        try first.ack()
        let second = try await nextDelivery(&iterator)
        try second.ack()
        try await channel.publish(.toQueue(queue, "still alive"))
        #expect(connection.isOpen)
    }

    @Test("many tasks publishing on one channel at once neither crash nor interleave frames")
    func concurrentPublishers() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = TestBroker.uniqueName("concurrent")
        try await channel.declareQueue(queue, options: QueueOptions(durable: false, autoDelete: false))
        defer { Task { _ = try? await channel.deleteQueue(queue) } }

        let tasks = 40, perTask = 100
        try await withThrowingTaskGroup(of: Void.self) { group in
            for t in 0..<tasks {
                group.addTask {
                    for i in 0..<perTask {
                        // Bodies of different sizes, some spanning several frames, so interleaving would corrupt them.
                        let size = (t * 7919 + i * 104_729) % 300_000
                        let body = Data(repeating: UInt8(t), count: size) + Data("|\(t)/\(i)".utf8)
                        try await channel.publish(
                            AMQPOutgoingMessage(
                                exchange: "", routingKey: queue, body: body,
                                properties: AMQPProperties(headers: ["task": .int32(Int32(t)), "i": .int32(Int32(i))])))
                    }
                }
            }
            try await group.waitForAll()
        }
        let reader = try await connection.openChannel()
        try await reader.setPrefetch(500)
        let consumer = try await reader.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        var seen = Set<String>()
        for _ in 0..<(tasks * perTask) {
            let d = try await nextDelivery(&iterator)
            let t = Int(d.properties.headers?["task"]?.intValue ?? -1)
            let i = Int(d.properties.headers?["i"]?.intValue ?? -1)
            let size = (t * 7919 + i * 104_729) % 300_000
            #expect(d.body == Data(repeating: UInt8(t), count: size) + Data("|\(t)/\(i)".utf8))
            seen.insert("\(t)/\(i)")
            try d.ack()
        }
        #expect(seen.count == tasks * perTask)
    }

    @Test("an unknown vhost is a clear connection error")
    func unknownVirtualHost() async throws {
        var config = try TestBroker.configuration
        config.virtualHost = "no-such-vhost"
        let error = await #expect(throws: AMQPError.self) { try await AMQPConnection.connect(to: config) }
        #expect(error?.replyCode == AMQPError.ReplyCode.notAllowed)
        #expect(error?.description.contains("does vhost 'no-such-vhost' exist") == true)
    }

    @Test("closing a channel gives its unacknowledged deliveries back to the queue")
    func channelCloseRequeues() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let publisher = try await connection.openChannel()
        try await publisher.enableConfirms()
        let queue = TestBroker.uniqueName("requeue")
        try await publisher.declareQueue(queue, options: QueueOptions(durable: false))
        defer { Task { _ = try? await publisher.deleteQueue(queue) } }
        _ = await publisher.publish(contentsOf: [.toQueue(queue, "a"), .toQueue(queue, "b")])
        let channel = try await connection.openChannel()
        let consumer = try await channel.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        _ = try await nextDelivery(&iterator)
        _ = try await nextDelivery(&iterator)
        #expect(try await publisher.declareQueuePassive(queue).messageCount == 0)
        await channel.close()
        #expect(try await publisher.declareQueuePassive(queue).messageCount == 2)
        #expect(throws: AMQPError.self) { try channel.ack(deliveryTag: 1) }
    }

    @Test("a consumer ends with consumerCancelled when its queue is deleted")
    func brokerCancelsConsumer() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName("cancelled")
        try await channel.declareQueue(queue, options: QueueOptions(durable: false))
        let consumer = try await channel.consume(queue: queue)
        let other = try await connection.openChannel()
        try await other.deleteQueue(queue)
        var iterator = consumer.makeAsyncIterator()
        let error = await #expect(throws: AMQPError.self) { _ = try await nextDelivery(&iterator) }
        #expect(error?.code == .consumerCancelled)
    }

    @Test(
        "a broker-side connection.close (320 CONNECTION_FORCED) ends the connection and its consumers with the reason")
    func connectionForced() async throws {
        let connection = try await TestBroker.connect()
        var config = try TestBroker.configuration
        config.connectionName = "forced-\(UUID().uuidString.prefix(6))"
        let victim = try await AMQPConnection.connect(to: config)
        let channel = try await victim.openChannel()
        let queue = TestBroker.uniqueName("forced")
        try await channel.declareQueue(queue, options: QueueOptions(durable: false))
        let consumer = try await channel.consume(queue: queue)
        try TestBroker.ctl("close_all_connections", "closed by the test")
        var iterator = consumer.makeAsyncIterator()
        let error = await #expect(throws: AMQPError.self) { _ = try await nextDelivery(&iterator) }
        #expect(error?.code == .connectionClosed)
        #expect(error?.replyCode == AMQPError.ReplyCode.connectionForced)
        let reason = await victim.closed()
        #expect(reason.description == "connection failed: 320 CONNECTION_FORCED - closed by the test")
        #expect(!victim.isOpen)
        let late = await #expect(throws: AMQPError.self) { _ = try await victim.openChannel() }
        #expect(late?.replyCode == AMQPError.ReplyCode.connectionForced)
        _ = connection
        let fresh = try await TestBroker.connect()
        let cleanup = try await fresh.openChannel()
        try await cleanup.deleteQueue(queue)
        await fresh.close()
    }
}

/// Blocks the calling thread outright, as badly written application code would.
private func blockThisThread(seconds: Double) {
    usleep(UInt32(seconds * 1_000_000))
}
