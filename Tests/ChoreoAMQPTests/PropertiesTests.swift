import ChoreoAMQP
import Testing

@Suite("Message properties and their headers")
struct PropertiesTests {
    let fields = [
        AMQPHeaderField(name: "b", value: .string("first")), AMQPHeaderField(name: "a", value: .int32(1)),
        AMQPHeaderField(name: "b", value: .string("second")),
    ]

    @Test("received headers keep their order, and read by name as the table would")
    func receivedHeaders() {
        let received = AMQPProperties(receivedHeaders: fields)
        #expect(received.headerFields == fields)
        // A name given twice (AMQP does not allow it; other clients may send it): the last counts, both ways.
        #expect(received.header("b") == .string("second"))
        #expect(received.headers == ["a": .int32(1), "b": .string("second")])
        #expect(received.header("c") == nil)
    }

    @Test("properties compare and hash by their headers' table, however they hold them")
    func equality() {
        var received = AMQPProperties(receivedHeaders: fields)
        received.contentType = "application/json"
        let set = AMQPProperties(contentType: "application/json", headers: ["b": .string("second"), "a": .int32(1)])
        #expect(received == set)
        #expect(Set([received, set]).count == 1)
        #expect(AMQPProperties(receivedHeaders: []) != AMQPProperties(), "no headers is not an empty table")
        #expect(AMQPProperties(receivedHeaders: []).headers == [:])
        var other = set
        other.headers?["a"] = .int32(2)
        #expect(received != other)
    }

    @Test("headers set as a table replace the received ones, and are read back in the table's order")
    func setting() {
        var p = AMQPProperties(receivedHeaders: fields)
        p.headers?["c"] = .bool(true)
        #expect(p.headers == ["a": .int32(1), "b": .string("second"), "c": .bool(true)])
        #expect(p.headerFields?.map(\.name) == p.headers.map { Array($0.keys) })
        #expect(p.header("c") == .bool(true))
        p.headers = nil
        #expect(p.headerFields == nil && p.header("a") == nil)
    }

    @Test("headers set as a list are kept in the order given, and read by name as the table would")
    func settingFields() {
        var p = AMQPProperties(headers: ["old": .bool(false)])
        let list = [AMQPHeaderField(name: "z", value: .string("1")), AMQPHeaderField(name: "a", value: .int32(2))]
        p.headerFields = list
        #expect(p.headerFields == list)
        #expect(p.headers == ["z": .string("1"), "a": .int32(2)])
        #expect(p.header("a") == .int32(2) && p.header("old") == nil)
        #expect(p == AMQPProperties(headers: ["a": .int32(2), "z": .string("1")]))
        p.headerFields = nil
        #expect(p.headers == nil && p.headerFields == nil)
        p.headerFields = []
        #expect(p.headers == [:], "an empty list is an empty table, not no headers")
    }
}
