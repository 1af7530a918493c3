import Testing

@testable import ChoreoAMQP

@Suite("Publisher-confirm state machine")
struct ConfirmTrackerTests {
    @Test("a multiple ack settles every earlier publish, in order")
    func multipleAck() {
        var t = ConfirmTracker()
        for token in 10..<15 { _ = t.published(token: UInt64(token), mandatory: false, exchange: "", routingKey: "q") }
        #expect(t.acked(deliveryTag: 3, multiple: true).map(\.token) == [10, 11, 12])
        #expect(t.acked(deliveryTag: 3, multiple: true).isEmpty)
        #expect(t.unsettledCount == 2)
        #expect(t.nacked(deliveryTag: 5, multiple: false) == [.init(token: 14, outcome: .nacked)])
        #expect(t.acked(deliveryTag: 4, multiple: true) == [.init(token: 13, outcome: .confirmed)])
        #expect(t.unsettledCount == 0)
    }

    @Test("a return settles the matching mandatory publish when its ack arrives")
    func returnThenAck() {
        var t = ConfirmTracker()
        _ = t.published(token: 1, mandatory: false, exchange: "x", routingKey: "a")
        _ = t.published(token: 2, mandatory: true, exchange: "x", routingKey: "b")
        t.returned(exchange: "x", routingKey: "b", replyCode: 312, replyText: "NO_ROUTE")
        #expect(
            t.acked(deliveryTag: 2, multiple: false) == [
                .init(token: 2, outcome: .returned(replyCode: 312, replyText: "NO_ROUTE"))
            ])
        #expect(t.acked(deliveryTag: 1, multiple: false) == [.init(token: 1, outcome: .confirmed)])
    }

    @Test("abandoning returns every unsettled token and later acks settle nothing")
    func abandon() {
        var t = ConfirmTracker()
        for token in 1...3 { _ = t.published(token: UInt64(token), mandatory: false, exchange: "", routingKey: "q") }
        _ = t.acked(deliveryTag: 2, multiple: false)
        #expect(t.abandonAll() == [1, 3])
        #expect(t.acked(deliveryTag: 3, multiple: true).isEmpty)
    }
}
