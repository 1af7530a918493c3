import Foundation
import Synchronization
import Testing

@testable import ChoreoAMQP

/// Work that is done without waking a connection's I/O thread: publishes written by the publishing task
/// while the thread sleeps, and tasks that prefer the connection's executor running on that thread.
@Suite("Work done without waking the connection's thread", .serialized, .timeLimit(.minutes(2)))
struct ThreadHandOffTests {
    @Test("a publish made while the connection's thread sleeps is written by the publishing task, and arrives")
    func publishWrittenByCaller() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let (channel, queue) = try await TestBroker.confirmingChannel(on: connection, queue: "caller-writes")

        // The thread may wake between the check and the publish (a heartbeat check, a frame): then the publish
        // is handed over as before. Some of a few attempts find it asleep.
        let loop = connection.loop
        var sent: [String] = []
        var byCaller = 0
        for n in 0..<20 where byCaller == 0 {
            try await waitUntil { loop.isIdle }
            let before = loop.jobsRunByCallers.load(ordering: .relaxed)
            try await channel.publish(.toQueue(queue, "message \(n)"))
            sent.append("message \(n)")
            byCaller += loop.jobsRunByCallers.load(ordering: .relaxed) - before
        }
        #expect(byCaller == 1)

        let consumer = try await channel.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        for text in sent {
            let delivery = try await nextDelivery(&iterator)
            #expect(String(decoding: delivery.body, as: UTF8.self) == text)
            try delivery.ack()
        }
    }

    @Test("publishes larger than the socket's buffer are finished by the connection's thread, whole and in order")
    func fullSocketLeftToThread() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let (channel, queue) = try await TestBroker.confirmingChannel(on: connection, queue: "full-socket")

        // A body larger than the socket's buffer and the broker's receive buffer together (4 + 32 MiB at
        // most here), from 1 MiB of pattern and a distinct last byte.
        let pattern = Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        func body(mebibytes: Int, last: Int) -> Data {
            var body = Data(capacity: mebibytes << 20 + 1)
            for _ in 0..<mebibytes { body.append(pattern) }
            body.append(UInt8(last))
            return body
        }
        func message(_ body: Data, _ i: Int) -> AMQPOutgoingMessage {
            AMQPOutgoingMessage(
                exchange: "", routingKey: queue, body: body,
                properties: AMQPProperties(headers: ["large": .int32(Int32(i))]))
        }
        // First alone, when the thread sleeps: the caller's send stops where the socket is full and leaves the
        // rest to the thread. (The thread may wake in between; some of a few attempts find it asleep.)
        let loop = connection.loop
        let before = loop.writesLeftToThread.load(ordering: .relaxed)
        var large: [Data] = []
        for _ in 0..<5 where loop.writesLeftToThread.load(ordering: .relaxed) == before {
            try await waitUntil { loop.isIdle }
            large.append(body(mebibytes: 64, last: large.count))
            try await channel.publish(message(large[large.count - 1], large.count - 1))
        }
        #expect(loop.writesLeftToThread.load(ordering: .relaxed) > before)
        // Then while small ones go out from other tasks: every body must arrive whole, so no write may cut
        // into another.
        let more = (0..<3).map { (large.count + $0, body(mebibytes: 6, last: large.count + $0)) }
        large += more.map(\.1)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { for (i, b) in more { try await channel.publish(message(b, i)) } }
            for t in 0..<3 {
                group.addTask {
                    for i in 0..<50 { try await channel.publish(.toQueue(queue, "small \(t)/\(i)")) }
                }
            }
            try await group.waitForAll()
        }

        let consumer = try await channel.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        var larges: [Int] = []
        var smalls = Set<String>()
        for _ in 0..<(large.count + 150) {
            let delivery = try await nextDelivery(&iterator)
            if let i = delivery.properties.headers?["large"]?.intValue {
                #expect(delivery.body == large[Int(i)], "large body \(i)")
                larges.append(Int(i))
            } else {
                smalls.insert(String(decoding: delivery.body, as: UTF8.self))
            }
            try delivery.ack()
        }
        #expect(larges == Array(0..<large.count))
        #expect(smalls.count == 150)
    }

    @Test("an ack the sleeping thread would only hold waits for its wake-up for the acks held, and goes out with them")
    func heldAckWithoutWakeUp() async throws {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let (publisher, queue) = try await TestBroker.confirmingChannel(on: connection, queue: "held-without-wake")
        for r in await publisher.publish(contentsOf: (0..<14).map { .toQueue(queue, "m\($0)") }) { try r.get() }

        // The prefetch is the witness: the broker sends the next five only once all five acks reached it.
        let channel = try await connection.openChannel()
        try await channel.setPrefetch(5)
        try await channel.holdAcks(for: .milliseconds(600), upTo: 100)
        let consumer = try await channel.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        var first: [AMQPDelivery] = []
        for _ in 0..<5 { first.append(try await nextDelivery(&iterator)) }

        let loop = connection.loop
        let ackedAt = ContinuousClock.now
        try first[0].ack()  // none held yet: wakes the thread, which starts the hold
        try await waitUntil { loop.isIdle }  // asleep until that ack is due
        let before = loop.acksLeftForWakeUp.load(ordering: .relaxed)
        for d in first.dropFirst() { try d.ack() }
        // Only a wake-up between these acks (a frame from the broker: none is expected) takes some of them early.
        #expect(loop.acksLeftForWakeUp.load(ordering: .relaxed) - before >= 1)
        var next: [AMQPDelivery] = []
        for _ in 0..<5 { next.append(try await nextDelivery(&iterator, within: 5)) }
        #expect(ContinuousClock.now - ackedAt >= .milliseconds(300), "the acks waited for the first one's deadline")
        #expect(next.map { String(decoding: $0.body, as: UTF8.self) } == ["m5", "m6", "m7", "m8", "m9"])

        // With nothing held, an ack wakes the thread: waiting for a wake-up with no deadline (the heartbeat's,
        // 7.5 s here) would hold it longer than its delay.
        try await waitUntil { loop.isIdle }
        let idle = loop.acksLeftForWakeUp.load(ordering: .relaxed)
        try next[0].ack()
        let last = try await nextDelivery(&iterator, within: 5)
        #expect(String(decoding: last.body, as: UTF8.self) == "m10")
        #expect(loop.acksLeftForWakeUp.load(ordering: .relaxed) == idle)

        // The ack that reaches the count wakes the thread too: three acks free three deliveries long before
        // the 60 s delay (and before the heartbeat's wake-up).
        try await channel.holdAcks(for: .seconds(60), upTo: 3)
        try next[1].ack()
        try await waitUntil { loop.isIdle }
        let counted = loop.acksLeftForWakeUp.load(ordering: .relaxed)
        try next[2].ack()
        try next[3].ack()
        #expect(loop.acksLeftForWakeUp.load(ordering: .relaxed) - counted <= 1)
        var freed: [String] = []
        for _ in 0..<3 {
            freed.append(String(decoding: try await nextDelivery(&iterator, within: 5).body, as: UTF8.self))
        }
        #expect(freed == ["m11", "m12", "m13"])
    }

    @Test(
        "a task preferring the connection's executor runs on its thread, and on the pool for 200 ms after a job that used over 2 ms of CPU or waited over 50 ms"
    )
    func executorRunsOnConnectionThread() async throws {
        let threads = try await stepsOnConnectionThread(queue: "executor", messages: ["one", "two"]) {
            channel, queue, consumer, record in
            // 5 ms off the CPU (as when the thread is preempted) is not a long stretch: still on the thread.
            usleep(5000)
            await Task.yield()
            record()
            // 5 ms of CPU is: what follows goes to the pool for 200 ms. The first yield was queued during
            // the stretch, the second comes after it.
            useCPU(.milliseconds(5))
            await Task.yield()
            await Task.yield()
            record()
            let second = try await consumer.next(max: 1)
            record()
            try second?.first?.ack()
            #expect(String(decoding: second?.first?.body ?? Data(), as: UTF8.self) == "two")
            // 300 ms later the pause is over: a confirm (read by the connection's thread) resumes the task there.
            try await Task.sleep(for: .milliseconds(300))
            try await channel.publish(.toQueue(queue, "three"))
            record()
            // A wait over 50 ms counts, CPU or not.
            usleep(60_000)
            await Task.yield()
            await Task.yield()
            record()
        }
        #expect(threads == [true, true, false, false, true, false])
    }

    @Test(
        "short jobs in a row keep the executor on the connection's thread, whatever CPU they use together, and so do a job of 1.5 ms of CPU and a preempted one"
    )
    func shortJobsInARowDoNotPause() async throws {
        let threads = try await stepsOnConnectionThread(queue: "executor-short-jobs", messages: ["one"]) {
            _, _, _, record in
            // Six jobs of half a millisecond of CPU, each queued while the one before runs, so the thread does
            // not sleep between them (as when events come close together): 3 ms of CPU in all.
            for _ in 0..<6 {
                useCPU(.microseconds(500))
                await Task.yield()
                record()
            }
            // One job of 1.5 ms of CPU (an event's work on a slow moment of a small VM) does not pause it either.
            useCPU(.microseconds(1500))
            await Task.yield()
            record()
            // Then a job long on the clock and short in CPU (the thread preempted): no pause either.
            usleep(5000)
            await Task.yield()
            await Task.yield()
            record()
        }
        #expect(threads == [Bool](repeating: true, count: 9))
    }

    /// Keeps the calling thread busy until it has used `amount` of CPU time.
    private func useCPU(_ amount: Duration) {
        let start = IOLoop.threadCPUTime()
        while IOLoop.threadCPUTime() - start < amount {}
    }

    /// Publishes `messages` to a fresh queue; then, preferring a new connection's executor, consumes the first
    /// (resumed by the connection's thread: the consume request's reply, then the delivery), acks it and runs
    /// `body`. Returns, for the first delivery and for each `record()` of `body`, whether the task was on the
    /// connection's thread at that point.
    private func stepsOnConnectionThread(
        queue name: String, messages: [String],
        _ body: (AMQPChannel, String, AMQPConsumer, _ record: () -> Void) async throws -> Void
    ) async throws -> [Bool] {
        let connection = try await TestBroker.connect()
        defer { Task { await connection.close() } }
        let (channel, queue) = try await TestBroker.confirmingChannel(on: connection, queue: name)
        for result in await channel.publish(contentsOf: messages.map { .toQueue(queue, $0) }) { try result.get() }
        let loop = connection.loop
        return try await withTaskExecutorPreference(connection.executor) { () async throws -> [Bool] in
            var onLoop: [Bool] = []
            let consumer = try await channel.consume(queue: queue)
            // What the consumer says of the calling thread (the runtime decides by it whether to start a lone
            // invocation inline) agrees with the loop's own answer, on the thread and on the pool.
            func record() {
                let here = loop.isCurrentThread
                #expect(consumer.isOnConnectionThread == here)
                onLoop.append(here)
            }
            let first = try await consumer.next(max: 1)
            record()
            try first?.first?.ack()
            try await body(channel, queue, consumer, record)
            return onLoop
        }
    }

    @Test("an executor including a second connection runs there what that connection's thread wakes up")
    func executorIncludesSecondConnection() async throws {
        let consuming = try await TestBroker.connect()
        let publishing = try await TestBroker.connect()
        defer {
            Task {
                await consuming.close()
                await publishing.close()
            }
        }
        let (channel, queue) = try await TestBroker.confirmingChannel(on: publishing, queue: "including")
        // Resumed by a confirm, which the publishing connection's thread reads.
        func confirmedOnPublishingThread(_ executor: ConnectionExecutor) async throws -> Bool {
            try await withTaskExecutorPreference(executor) { () async throws -> Bool in
                try await channel.publish(.toQueue(queue, "x"))
                return publishing.loop.isCurrentThread
            }
        }
        #expect(try await confirmedOnPublishingThread(consuming.executor) == false)
        #expect(try await confirmedOnPublishingThread(consuming.executor.including(publishing)) == true)
    }
}

/// Waits until `condition` holds, checking every millisecond, for at most ten seconds.
private func waitUntil(_ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + .seconds(10)
    while !condition() {
        guard ContinuousClock.now < deadline else {
            throw AMQPError(.timeout, message: "condition not met within 10 s", operation: "test wait")
        }
        try await Task.sleep(for: .milliseconds(1))
    }
}
