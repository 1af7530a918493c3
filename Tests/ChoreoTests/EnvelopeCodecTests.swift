import ChoreoAMQP
import Foundation
import TestEvents
import Testing

@testable import Choreo

@Suite("CloudEvents envelope over AMQP")
struct EnvelopeCodecTests {
    @Test("binary mode: attributes as cloudEvents_ headers, id in message_id, type in type, persistent")
    func binaryRoundTrip() throws {
        var e = try EventEnvelope(
            Ping(n: 3), source: "choreo://svc/h", id: "id-1", correlationID: "corr", causationID: "cause",
            idempotencyKey: "k-1", subject: "order-9")
        e.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        e.time = Date(timeIntervalSince1970: 1_764_000_000.5)
        let message = EnvelopeCodec.encode(e, exchange: "choreo.events")
        #expect(message.routingKey == "test.ping")
        #expect(message.properties.messageID == "id-1" && message.properties.type == "test.ping")
        #expect(message.properties.deliveryMode == 2 && message.properties.contentType == "application/json")
        #expect(message.properties.headers?["cloudEvents_specversion"] == "1.0")
        #expect(message.properties.headers?["cloudEvents_time"] == .string("2025-11-24T16:00:00.500Z"))
        #expect(
            message.properties.headers?.values.allSatisfy { $0.stringValue != nil } == true, "flat string headers only")
        let decoded = try EnvelopeCodec.decode(body: message.body, properties: message.properties)
        #expect(decoded == e)
    }

    @Test("the older cloudEvents: prefix is accepted on input")
    func legacyPrefix() throws {
        let props = AMQPProperties(
            contentType: "application/json",
            headers: [
                "cloudEvents:id": "x1", "cloudEvents:type": "test.ping", "cloudEvents:source": "other",
                "cloudEvents:specversion": "1.0",
            ])
        let e = try EnvelopeCodec.decode(body: Data(#"{"n":1}"#.utf8), properties: props)
        #expect(e.id == "x1" && e.type == "test.ping" && e.source == "other")
    }

    @Test("structured mode (application/cloudevents+json) is accepted on input")
    func structured() throws {
        let body = Data(
            #"{"specversion":"1.0","id":"s1","type":"test.ping","source":"py","correlationid":"c9","data":{"n":5}}"#
                .utf8)
        let e = try EnvelopeCodec.decode(
            body: body, properties: AMQPProperties(contentType: "application/cloudevents+json; charset=utf-8"))
        #expect(e.id == "s1" && e.correlationID == "c9" && e.source == "py")
        #expect(try JSONCoding.decoder.decode(Ping.self, from: e.data).n == 5)
    }

    @Test("bad envelopes give reasons a person can act on")
    func reasons() {
        let e1 = #expect(throws: EnvelopeDecodingError.self) {
            try EnvelopeCodec.decode(
                body: Data(),
                properties: AMQPProperties(headers: [
                    "cloudEvents_id": "a", "cloudEvents_type": "t", "cloudEvents_specversion": "0.3",
                ]))
        }
        #expect(e1?.reason == "unsupported CloudEvents specversion '0.3', expected 1.0")
        let e2 = #expect(throws: EnvelopeDecodingError.self) {
            try EnvelopeCodec.decode(
                body: Data("[1]".utf8), properties: AMQPProperties(contentType: "application/cloudevents+json"))
        }
        #expect(e2?.reason == "structured CloudEvent is not a JSON object")
        let e3 = #expect(throws: EnvelopeDecodingError.self) {
            try EnvelopeCodec.decode(
                body: Data(),
                properties: AMQPProperties(headers: [
                    "cloudEvents_id": "a", "cloudEvents_type": "t", "cloudEvents_dataversion": "two",
                ]))
        }
        #expect(e3?.reason == "attribute 'dataversion' is not a positive integer: 'two'")
    }

    @Test("emitted ids are deterministic per input, handler and index")
    func derivedIDs() {
        let a = HandlerContext.derivedID(input: "in-1", handler: "h", index: 0)
        #expect(a == HandlerContext.derivedID(input: "in-1", handler: "h", index: 0))
        #expect(a != HandlerContext.derivedID(input: "in-1", handler: "h", index: 1))
        #expect(a != HandlerContext.derivedID(input: "in-1", handler: "g", index: 0))
        #expect(a.count == 36 && a.split(separator: "-").map(\.count) == [8, 4, 4, 4, 12])
    }

    @Test("retry policy: delays by attempt, then exhaustion")
    func retryPolicy() {
        let p = RetryPolicy(maxAttempts: 4, delays: [.seconds(1), .seconds(10)])
        #expect(p.delay(afterAttempt: 1) == .seconds(1))
        #expect(p.delay(afterAttempt: 2) == .seconds(10))
        #expect(p.delay(afterAttempt: 3) == .seconds(10))
        #expect(p.delay(afterAttempt: 4) == nil)
        #expect(p.tiers == [.seconds(1), .seconds(10)])
        #expect(RetryPolicy.none.delay(afterAttempt: 1) == nil)
    }
}

@Suite("SQLite ledger")
struct SQLiteLedgerTests {
    private func ledger() throws -> SQLiteLedger {
        try SQLiteLedger(
            path: FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID().uuidString).sqlite")
                .path)
    }

    private func outbox(_ n: Int) throws -> [OutboxMessage] {
        try (0..<n).map {
            OutboxMessage(
                index: $0, envelope: try EventEnvelope(Pong(n: $0), source: "s", id: "out-\($0)"),
                exchange: "x", routingKey: "test.pong")
        }
    }

    @Test("claim, complete with outbox, then a duplicate sees the completed key and its unpublished outbox")
    func claimCompleteDuplicate() async throws {
        let l = try ledger()
        #expect(try await l.claim(handler: "h", key: "k", owner: "a", lease: .seconds(60)) == .claimed(attempts: 1))
        guard
            case .heldElsewhere(let until) = try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60))
        else {
            Issue.record("a live lease must hold the key for its owner"); return
        }
        #expect(until > Date())
        let out = try outbox(2)
        #expect(try await l.complete(handler: "h", key: "k", owner: "a", outbox: out) == .committed)
        guard case .completed(let pending) = try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60))
        else {
            Issue.record("expected completed"); return
        }
        #expect(pending.map(\.envelope.id) == ["out-0", "out-1"])
        #expect(pending[1].envelope.data == out[1].envelope.data)
        try await l.markPublished(handler: "h", key: "k", indexes: [0])
        #expect(
            try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60))
                == .completed(unpublished: [pending[1]]))
        // Keys are scoped by handler.
        #expect(try await l.claim(handler: "other", key: "k", owner: "a", lease: .seconds(60)) == .claimed(attempts: 1))
    }

    @Test("an expired or released lease can be claimed again, and the old owner can no longer complete")
    func leases() async throws {
        let l = try ledger()
        _ = try await l.claim(handler: "h", key: "k", owner: "a", lease: .milliseconds(1))
        try await Task.sleep(for: .milliseconds(20))
        #expect(try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60)) == .claimed(attempts: 2))
        #expect(try await l.complete(handler: "h", key: "k", owner: "a", outbox: []) == .leaseLost)
        try await l.release(handler: "h", key: "k", owner: "b")
        #expect(try await l.claim(handler: "h", key: "k", owner: "c", lease: .seconds(60)) == .claimed(attempts: 3))
        try await l.releaseAllLeases(handler: "h")
        #expect(try await l.claim(handler: "h", key: "k", owner: "d", lease: .seconds(60)) == .claimed(attempts: 4))
    }

    @Test("pruning removes old completed keys whose outbox is published, and keeps the rest")
    func pruning() async throws {
        let l = try ledger()
        for key in ["done", "unpublished"] {
            _ = try await l.claim(handler: "h", key: key, owner: "a", lease: .seconds(60))
            _ = try await l.complete(handler: "h", key: key, owner: "a", outbox: try outbox(1))
        }
        try await l.markPublished(handler: "h", key: "done", indexes: [0])
        _ = try await l.claim(handler: "h", key: "running", owner: "a", lease: .seconds(60))
        #expect(try await l.prune(completedBefore: Date().addingTimeInterval(-60)) == 0)
        #expect(try await l.prune(completedBefore: Date().addingTimeInterval(1)) == 1)
        #expect(try await l.status(handler: "h", key: "done") == nil)
        #expect(try await l.status(handler: "h", key: "unpublished")?.state == "completed")
        #expect(try await l.status(handler: "h", key: "running")?.state == "claimed")
    }
}
