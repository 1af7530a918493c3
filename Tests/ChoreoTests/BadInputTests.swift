import ChoreoAMQP
import Foundation
import TestEvents
import Testing

@testable import Choreo

@Suite("Bad input against a real broker and handler process", .serialized, .timeLimit(.minutes(3)))
struct BadInputTests {
    struct Case {
        var name: String
        var body: Data
        var headers: AMQPTable
        var contentType: String? = "application/json"
        var messageID: String? = nil
        var errorType: String
        var reason: String
    }

    static func ce(_ id: String, type: String = "test.ping", version: String? = nil) -> AMQPTable {
        var h: AMQPTable = [
            "cloudEvents_id": .string(id), "cloudEvents_type": .string(type), "cloudEvents_source": "test",
            "cloudEvents_specversion": "1.0",
        ]
        if let version { h["cloudEvents_dataversion"] = .string(version) }
        return h
    }

    static let cases: [Case] = [
        Case(
            name: "not-json", body: Data("hello, world".utf8), headers: ce("b1"), errorType: "DecodingError",
            reason: "body is not valid JSON (or not UTF-8): The given data was not valid JSON."),
        Case(
            name: "wrong-shape", body: Data(#"{"m": 1}"#.utf8), headers: ce("b2"), errorType: "DecodingError",
            reason: "JSON does not match 'test.ping': missing key 'n'"),
        Case(
            name: "missing-id", body: Data(#"{"n": 1}"#.utf8),
            headers: ["cloudEvents_type": "test.ping", "cloudEvents_source": "test", "cloudEvents_specversion": "1.0"],
            errorType: "EnvelopeDecodingError", reason: "missing required CloudEvents attribute 'id'"),
        Case(
            name: "missing-type", body: Data(#"{"n": 1}"#.utf8),
            headers: ["cloudEvents_id": "b4", "cloudEvents_source": "test", "cloudEvents_specversion": "1.0"],
            errorType: "EnvelopeDecodingError", reason: "missing required CloudEvents attribute 'type'"),
        Case(
            name: "unknown-type", body: Data(#"{"n": 1}"#.utf8), headers: ce("b5", type: "test.unheard-of"),
            errorType: "UnknownEventType",
            reason: "event type 'test.unheard-of' is not handled by ping (it handles 'test.ping')"),
        Case(
            name: "unsupported-version", body: Data(#"{"n": 1}"#.utf8), headers: ce("b6", version: "2"),
            errorType: "UnsupportedVersion", reason: "unsupported version 2 of 'test.ping' (this handler accepts 1)"),
        Case(
            name: "wrong-content-type", body: Data("n=1".utf8), headers: ce("b7"), contentType: "text/plain",
            errorType: "UnsupportedContentType",
            reason: "content type 'text/plain' is not JSON; ping decodes application/json"),
        Case(
            name: "invalid-utf8", body: Data([0x7B, 0x22, 0xFF, 0xFE, 0x22, 0x7D]), headers: ce("b8"),
            errorType: "DecodingError",
            reason: "body is not valid JSON (or not UTF-8): The given data was not valid JSON."),
        Case(
            name: "empty-body", body: Data(), headers: ce("b9"), errorType: "DecodingError",
            reason: "empty body: expected a JSON 'test.ping' event"),
        Case(
            name: "ten-mib",
            body: Data(#"{"n": 1, "pad": ""#.utf8) + Data(repeating: 0x61, count: 10 * 1024 * 1024) + Data(#""}"#.utf8),
            headers: ce("b10"), errorType: "BodyTooLarge",
            reason: "body of 10485779 bytes exceeds the limit of 4194304 bytes (--max-body-bytes)"),
        Case(
            name: "header-types", body: Data(#"{"n": 1}"#.utf8),
            headers: ["cloudEvents_id": .int32(11), "cloudEvents_type": "test.ping", "cloudEvents_source": "test"],
            errorType: "EnvelopeDecodingError",
            reason: "header 'cloudEvents_id' has AMQP type integer, expected a string"),
        Case(
            name: "bad-time", body: Data(#"{"n": 1}"#.utf8),
            headers: ce("b12").merging(["cloudEvents_time": "yesterday"]) { $1 },
            errorType: "EnvelopeDecodingError", reason: "attribute 'time' is not an RFC 3339 timestamp: 'yesterday'"),
        Case(
            name: "wrong-field-type", body: Data(#"{"n": "one"}"#.utf8), headers: ce("b13"), errorType: "DecodingError",
            reason: "JSON does not match 'test.ping': expected an integer at n, found a string"),
        // Under an empty key every such event would be dropped as a duplicate of the first.
        Case(
            name: "empty-idempotency-key", body: Data(#"{"n": 1}"#.utf8),
            headers: ce("b14").merging(["cloudEvents_idempotencykey": ""]) { $1 }, errorType: "EmptyIdempotencyKey",
            reason:
                "attribute 'idempotencykey' is empty: give a key that names the effect, or leave the attribute out to "
                + "deduplicate by event id"),
    ]

    @Test("each kind of bad input is dead-lettered with its reason and the handler goes on")
    func badInputIsDeadLettered() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        for c in Self.cases {
            var headers = c.headers
            headers["test-case"] = .string(c.name)
            try await channel.publish(
                AMQPOutgoingMessage(
                    exchange: mesh.exchange, routingKey: "test.ping", body: c.body,
                    properties: AMQPProperties(
                        contentType: c.contentType, headers: headers, deliveryMode: 2, messageID: c.messageID)))
        }
        // A good event after all the bad ones: the handler must still be running to take it.
        let good = try await mesh.publishPings([Ping(n: 42)], on: channel)
        let ping = try mesh.start("ping")
        defer { ping.terminate() }

        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("ping") }, until: { $0 >= 1 })
        #expect(gateway.effectKeys("ping") == Set(good))
        #expect(ping.isRunning, "the handler must survive bad input: \(ping.output)")
        let letters = try await peek(
            queue: mesh.pingQueues.deadLetter, expecting: Self.cases.count, connection: connection)
        var byCase: [String: AMQPDelivery] = [:]
        for l in letters { if let name = l.properties.headers?["test-case"]?.stringValue { byCase[name] = l } }
        #expect(letters.count == Self.cases.count)
        for c in Self.cases {
            let h = byCase[c.name]?.properties.headers
            #expect(h?[WireNames.Headers.deadLetterErrorType]?.stringValue == c.errorType, "\(c.name)")
            #expect(h?[WireNames.Headers.deadLetterErrorMessage]?.stringValue == c.reason, "\(c.name)")
            #expect(byCase[c.name]?.body == c.body, "\(c.name): the dead letter keeps the body byte for byte")
        }
        // Nothing is left unhandled in the handler's own queue.
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.main).messageCount == 0)
    }
}
