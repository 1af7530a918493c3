import Testing

@testable import ChoreoAMQP

@Suite("Ack coalescing state machine")
struct AckCoalescerTests {
    private func delivered(_ tags: ClosedRange<UInt64>) -> AckCoalescer {
        var c = AckCoalescer()
        for t in tags { c.delivered(t) }
        return c
    }

    @Test("acks covering a prefix of outstanding deliveries become one multiple ack")
    func prefixBecomesMultiple() {
        var c = delivered(1...5)
        let frames = c.settle([3, 1, 2].map { .init(deliveryTag: $0, multiple: false, kind: .ack) })
        #expect(frames == [.ack(deliveryTag: 3, multiple: true)])
        #expect(c.outstanding == [4, 5])
    }

    @Test("acks past a gap go out singly and are never repeated by a later multiple ack")
    func gapsAreSentSingly() {
        var c = delivered(1...5)
        #expect(
            c.settle([
                .init(deliveryTag: 2, multiple: false, kind: .ack), .init(deliveryTag: 4, multiple: false, kind: .ack),
            ])
                == [.ack(deliveryTag: 2, multiple: false), .ack(deliveryTag: 4, multiple: false)])
        #expect(c.outstanding == [1, 3, 5])
        #expect(
            c.settle([
                .init(deliveryTag: 1, multiple: false, kind: .ack), .init(deliveryTag: 3, multiple: false, kind: .ack),
            ])
                == [.ack(deliveryTag: 3, multiple: true)])
        #expect(c.outstanding == [5])
    }

    @Test("a nack flushes the acks before it, keeping order")
    func nackKeepsOrder() {
        var c = delivered(1...3)
        let frames = c.settle([
            .init(deliveryTag: 1, multiple: false, kind: .ack),
            .init(deliveryTag: 2, multiple: false, kind: .nack(requeue: false)),
            .init(deliveryTag: 3, multiple: false, kind: .reject(requeue: true)),
        ])
        #expect(
            frames == [
                .ack(deliveryTag: 1, multiple: false), .nack(deliveryTag: 2, multiple: false, requeue: false),
                .reject(deliveryTag: 3, requeue: true),
            ])
        #expect(c.outstanding.isEmpty)
    }

    @Test("double settlement and unknown tags are dropped instead of costing the channel a 406")
    func unknownTagsDropped() {
        var c = delivered(1...2)
        #expect(
            c.settle([
                .init(deliveryTag: 1, multiple: false, kind: .ack), .init(deliveryTag: 1, multiple: false, kind: .ack),
                .init(deliveryTag: 9, multiple: false, kind: .ack),
            ]) == [.ack(deliveryTag: 1, multiple: false)])
        #expect(c.settle([.init(deliveryTag: 1, multiple: false, kind: .reject(requeue: false))]).isEmpty)
        #expect(c.outstanding == [2])
    }

    @Test("a multiple ack from the caller covers everything up to its tag")
    func callerMultiple() {
        var c = delivered(1...4)
        #expect(c.settle([.init(deliveryTag: 3, multiple: true, kind: .ack)]) == [.ack(deliveryTag: 3, multiple: true)])
        #expect(c.outstanding == [4])
    }

    // MARK: Held acks

    private func ack(_ tag: UInt64) -> AckCoalescer.Settlement { .init(deliveryTag: tag, multiple: false, kind: .ack) }

    private func holding(_ tags: ClosedRange<UInt64>, delay: Duration, count: Int) -> AckCoalescer {
        var c = delivered(tags)
        c.hold = .init(delay: delay, count: count)
        return c
    }

    @Test("held acks wait for their deadline, between half and all of the delay, then go out as one frame")
    func heldUntilDeadline() throws {
        var c = holding(1...5, delay: .milliseconds(100), count: 10)
        let t0 = ContinuousClock.now
        #expect(c.settle([ack(2), ack(1)], now: t0).isEmpty)
        let deadline = try #require(c.deadline)
        #expect(deadline >= t0 + .milliseconds(50) && deadline <= t0 + .milliseconds(100))
        // A later ack joins them without moving the deadline.
        #expect(c.settle([ack(3)], now: t0 + .milliseconds(10)).isEmpty)
        #expect(c.deadline == deadline)
        #expect(c.heldCount == 3)
        #expect(c.flushHeld(now: deadline - .milliseconds(1)).isEmpty)
        #expect(c.flushHeld(now: deadline) == [.ack(deliveryTag: 3, multiple: true)])
        #expect(c.deadline == nil && c.heldCount == 0)
        #expect(c.outstanding == [4, 5])
    }

    @Test("held acks go out as soon as the hold's count of them wait")
    func heldUntilCount() {
        var c = holding(1...5, delay: .seconds(60), count: 3)
        let t0 = ContinuousClock.now
        #expect(c.settle([ack(1), ack(2)], now: t0).isEmpty)
        #expect(
            c.settle([ack(4)], now: t0) == [
                .ack(deliveryTag: 2, multiple: true), .ack(deliveryTag: 4, multiple: false),
            ])
        #expect(c.deadline == nil)
        #expect(c.outstanding == [3, 5])
    }

    @Test("a nack or reject sends the held acks before it, and nothing waits after it")
    func nackFlushesHeld() {
        var c = holding(1...4, delay: .seconds(60), count: 10)
        #expect(c.settle([ack(1), ack(3)]).isEmpty)
        #expect(
            c.settle([.init(deliveryTag: 2, multiple: false, kind: .nack(requeue: true))])
                == [
                    .ack(deliveryTag: 1, multiple: false), .ack(deliveryTag: 3, multiple: false),
                    .nack(deliveryTag: 2, multiple: false, requeue: true),
                ])
        #expect(c.deadline == nil && c.heldCount == 0)
        #expect(c.outstanding == [4])
    }

    @Test("a close sends the held acks at once; a reopened channel forgets them; no hold sends every ack")
    func forceResetAndNoHold() {
        var c = holding(1...3, delay: .seconds(60), count: 10)
        #expect(c.settle([ack(1)]).isEmpty)
        #expect(c.flushHeld().isEmpty)
        #expect(c.flushHeld(force: true) == [.ack(deliveryTag: 1, multiple: false)])
        #expect(c.settle([ack(2)]).isEmpty)
        c.reset()
        #expect(c.deadline == nil && c.heldCount == 0 && c.outstanding.isEmpty)
        c.delivered(7)
        c.hold = nil
        #expect(c.settle([ack(7)]) == [.ack(deliveryTag: 7, multiple: false)])
    }
}
