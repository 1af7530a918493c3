import Choreo
import ChoreoAMQP
import ChoreoTesting
import Foundation
import Synchronization
import Testing

private struct OrderPlaced: Event {
    static let eventType = "order.placed"
    var orderID: String
    var quantity: Int
}

private struct StockReserved: Event {
    static let eventType = "inventory.reserved"
    var orderID: String
}

/// Version 2 renamed `qty` to `quantity`; the handler upcasts version 1.
private struct OrderPlacedV2: Event {
    static let eventType = "order.placed.v"
    static let schemaVersion = 2
    var orderID: String
    var quantity: Int
}

private struct Flaky: Error {}

private final class Counter: Sendable {
    let value = Mutex(0)
    func next() -> Int {
        value.withLock {
            $0 += 1; return $0
        }
    }
}

private struct Reserve: EventHandler {
    let name = "reserve"
    let failures: Int
    let counter = Counter()
    var emits: [any Event.Type] { [StockReserved.self] }
    func handle(_ order: OrderPlaced, context: HandlerContext) async throws {
        if counter.next() <= failures { throw Flaky() }
        if order.quantity < 0 { throw NonRetryable(Flaky()) }
        try context.emit(StockReserved(orderID: order.orderID))
    }
}

private struct Notify: EventHandler {
    let name = "notify"
    func handle(_ event: StockReserved, context: HandlerContext) async throws {}
}

private struct Upcasting: EventHandler {
    let name = "upcasting"
    var acceptedVersions: Set<Int> { [2] }
    func upcast(_ data: Data, from version: Int) throws -> Data {
        guard version == 1 else {
            throw NonRetryable(UnsupportedVersion(type: OrderPlacedV2.eventType, version: version, accepted: [2]))
        }
        var object = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        object["quantity"] = object.removeValue(forKey: "qty")
        return try JSONSerialization.data(withJSONObject: object)
    }
    func handle(_ event: OrderPlacedV2, context: HandlerContext) async throws {
        if event.quantity != 3 { throw NonRetryable(Flaky()) }
    }
}

/// Keys by customer, but a customer may be missing: its key is then empty.
private struct KeyedByCustomer: EventHandler {
    let name = "keyed"
    func idempotencyKey(for event: OrderPlaced, envelope: EventEnvelope) -> String? {
        String(event.orderID.prefix { $0 != "-" })
    }
    func handle(_ event: OrderPlaced, context: HandlerContext) async throws {}
}

private struct EmptyKeyEmitter: EventHandler {
    let name = "empty-key-emitter"
    var emits: [any Event.Type] { [StockReserved.self] }
    func handle(_ event: OrderPlaced, context: HandlerContext) async throws {
        try context.emit(StockReserved(orderID: event.orderID), idempotencyKey: "")
    }
}

@Suite("In-memory test harness")
struct TestHarnessTests {
    @Test("an empty idempotency key is a dead letter, not a duplicate of every other event under it")
    func emptyKey() async throws {
        let harness = TestHarness(handlers: [KeyedByCustomer()])
        try await harness.publish(OrderPlaced(orderID: "-1", quantity: 1))
        try await harness.publish(OrderPlaced(orderID: "-2", quantity: 1))
        try await harness.publish(OrderPlaced(orderID: "ada-3", quantity: 1))
        await harness.runUntilIdle()
        #expect(await harness.invocations(of: "keyed") == 1)
        let letters = await harness.deadLetters
        #expect(letters.map(\.errorType) == ["EmptyIdempotencyKey", "EmptyIdempotencyKey"])
        #expect(
            letters.first?.errorMessage
                == "keyed's key function gave an empty key: it must name the effect, or return nil to use the event's")
        // Where a key is set, an empty one is refused at once.
        let refused = await #expect(throws: ConfigurationError.self) {
            try await harness.publish(OrderPlaced(orderID: "ada-4", quantity: 1), idempotencyKey: "")
        }
        #expect(refused?.message.hasPrefix("an idempotency key must not be empty") == true)
        let emitting = TestHarness(handlers: [EmptyKeyEmitter()])
        try await emitting.publish(OrderPlaced(orderID: "ada-5", quantity: 1))
        await emitting.runUntilIdle()
        #expect(await emitting.emitted(StockReserved.self).isEmpty)
        #expect(await emitting.deadLetters.map(\.errorType) == ["ConfigurationError"])
    }

    @Test("emitted events are routed on to the handlers that consume them")
    func routing() async throws {
        let harness = TestHarness(handlers: [Reserve(failures: 0), Notify()])
        let id = try await harness.publish(OrderPlaced(orderID: "A-1", quantity: 1))
        await harness.runUntilIdle()
        let reserved = await harness.emitted
        #expect(reserved.count == 1)
        #expect(reserved.first?.causationID == id && reserved.first?.correlationID == id)
        #expect(await harness.invocations(of: "notify") == 1)
    }

    @Test("with every message delivered twice, each handler still runs once per event")
    func deliveredTwice() async throws {
        let harness = TestHarness(handlers: [Reserve(failures: 0), Notify()], deliverEverythingTwice: true)
        for i in 0..<5 { try await harness.publish(OrderPlaced(orderID: "A-\(i)", quantity: 1)) }
        await harness.runUntilIdle()
        #expect(await harness.invocations(of: "reserve") == 5)
        #expect(await harness.invocations(of: "notify") == 5)
        #expect(await harness.emitted(StockReserved.self).count == 5)
    }

    @Test("retries follow the delay tiers on the virtual clock")
    func retriesOnVirtualClock() async throws {
        let harness = TestHarness(handlers: [Reserve(failures: 2)])
        try await harness.publish(OrderPlaced(orderID: "A-1", quantity: 1))
        await harness.runUntilIdle()
        #expect(await harness.pendingRetries.map(\.delay) == [.seconds(1)])
        await harness.advance(by: .milliseconds(999))
        #expect(await harness.invocations(of: "reserve") == 1)
        await harness.advance(by: .milliseconds(1))
        #expect(await harness.pendingRetries.map(\.delay) == [.seconds(10)])
        await harness.advance(by: .seconds(10))
        #expect(await harness.invocations(of: "reserve") == 3)
        #expect(await harness.emitted(StockReserved.self).map(\.orderID) == ["A-1"])
        #expect(await harness.deadLetters.isEmpty)
    }

    @Test("exhausted retries and non-retryable errors become dead letters with their reason")
    func deadLetters() async throws {
        let harness = TestHarness(handlers: [Reserve(failures: 100)])
        try await harness.publish(OrderPlaced(orderID: "A-1", quantity: 1))
        await harness.advance(by: .seconds(600))
        let letters = await harness.deadLetters
        #expect(letters.count == 1)
        #expect(letters.first?.attempts == 4 && letters.first?.errorType == "Flaky")

        let second = TestHarness(handlers: [Reserve(failures: 0)])
        try await second.publish(OrderPlaced(orderID: "A-2", quantity: -1))
        await second.runUntilIdle()
        #expect(await second.deadLetters.map(\.attempts) == [1])
        #expect(await second.pendingRetries.isEmpty)
    }

    @Test("bad input is dead-lettered with a reason")
    func badInput() async throws {
        let harness = TestHarness(handlers: [Reserve(failures: 0)])
        await harness.publish(
            raw: Data("{".utf8),
            properties: AMQPProperties(
                contentType: "application/json",
                headers: [
                    "cloudEvents_id": "x", "cloudEvents_type": "order.placed", "cloudEvents_source": "t",
                    "cloudEvents_specversion": "1.0",
                ]), routingKey: "order.placed")
        await harness.runUntilIdle()
        #expect(await harness.deadLetters.map(\.errorType) == ["DecodingError"])
        #expect(await harness.deadLetters.first?.errorMessage.hasPrefix("body is not valid JSON") == true)
    }

    @Test("an upcasting hook turns an old schema version into the current one; unknown versions are rejected")
    func upcasting() async throws {
        let harness = TestHarness(handlers: [Upcasting()])
        for (id, version) in [("v1", 1), ("v3", 3)] {
            await harness.publish(
                raw: Data(#"{"orderID":"A","qty":3}"#.utf8),
                properties: AMQPProperties(
                    contentType: "application/json",
                    headers: [
                        "cloudEvents_id": .string(id), "cloudEvents_type": "order.placed.v", "cloudEvents_source": "t",
                        "cloudEvents_dataversion": .string(String(version)),
                    ]), routingKey: "order.placed.v")
        }
        await harness.runUntilIdle()
        #expect(await harness.invocations(of: "upcasting") == 1)
        let letters = await harness.deadLetters
        #expect(letters.map(\.eventID) == ["v3"])
        #expect(letters.first?.errorMessage == "unsupported version 3 of 'order.placed.v' (this handler accepts 2)")
    }
}
