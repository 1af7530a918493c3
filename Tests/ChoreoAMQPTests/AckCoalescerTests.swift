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
}
