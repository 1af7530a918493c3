import Choreo
import ChoreoAMQP
import Foundation
import Logging
import Synchronization

/// Runs handlers against an in-memory broker, for handler authors' unit tests: no RabbitMQ needed.
///
/// It models what the real runtime does: routing by event type to every subscribed handler, the
/// idempotency ledger (an ``InMemoryLedger``), buffered emits published after the commit and routed on
/// to other handlers, retries on a virtual clock with the handler's delay tiers, dead letters with
/// their reasons, and a switch that delivers every message twice (as at-least-once delivery may).
///
/// ```swift
/// let harness = TestHarness(handlers: [ReserveStock()])
/// try await harness.publish(OrderPlaced(orderID: "A-1", items: ["sku": 1]))
/// await harness.runUntilIdle()
/// #expect(harness.emitted(StockReserved.self).count == 1)
/// await harness.advance(by: .seconds(60)) // let retries come due
/// ```
public actor TestHarness {
    /// A message that ended in a handler's dead-letter queue.
    public struct DeadLetter: Sendable {
        public var handler: String
        public var eventID: String?
        public var body: Data
        public var errorType: String
        public var errorMessage: String
        public var attempts: Int
    }

    /// A retry waiting in a delay tier.
    public struct ScheduledRetry: Sendable {
        public var handler: String
        public var eventID: String
        /// The attempt number it will run as.
        public var attempt: Int
        public var delay: Duration
        public var dueAt: Duration
    }

    private struct Message {
        var handler: HandlerDescriptor
        var body: Data
        var properties: AMQPProperties
        var attempt: Int
    }

    public let service: String
    public let ledger: InMemoryLedger
    /// Deliver every message twice, as a broker may after a lost ack.
    public var deliverEverythingTwice: Bool
    /// Time since the harness started, on its virtual clock.
    public private(set) var now: Duration = .zero
    public private(set) var emitted: [EventEnvelope] = []
    public private(set) var deadLetters: [DeadLetter] = []
    public private(set) var pendingRetries: [ScheduledRetry] = []
    private var invocationCounts: [String: Int] = [:]
    private var queue: [Message] = []
    private var retryMessages: [(due: Duration, message: Message)] = []
    private let handlers: [HandlerDescriptor]
    private let clock = VirtualClock()

    public init(service: String = "test", handlers: [any EventHandler], deliverEverythingTwice: Bool = false) {
        self.service = service
        self.handlers = handlers.map { HandlerDescriptor($0) }
        self.deliverEverythingTwice = deliverEverythingTwice
        self.ledger = InMemoryLedger(now: clock.date)
    }

    public func setDeliverEverythingTwice(_ on: Bool) { deliverEverythingTwice = on }

    /// Publishes an event to every handler subscribed to its type. Returns its id.
    @discardableResult
    public func publish<E: Event>(
        _ event: E, id: String = EventID.random(), correlationID: String? = nil,
        idempotencyKey: String? = nil
    ) throws -> String {
        let envelope = try EventEnvelope(
            event, source: "test", id: id, correlationID: correlationID, idempotencyKey: idempotencyKey)
        route(envelope)
        return envelope.id
    }

    /// Publishes raw bytes with AMQP properties, as another client might: for testing bad input.
    public func publish(raw body: Data, properties: AMQPProperties, routingKey: String) {
        for h in handlers where h.inputType == routingKey {
            enqueue(Message(handler: h, body: body, properties: properties, attempt: 1))
        }
    }

    /// Handles queued messages, and what they emit, until nothing is left that is due now.
    public func runUntilIdle() async {
        while !queue.isEmpty {
            let message = queue.removeFirst()
            await process(message)
        }
    }

    /// Moves the virtual clock forward, delivering retries as they come due, then runs until idle.
    public func advance(by duration: Duration) async {
        let target = now + duration
        await runUntilIdle()
        while let next = retryMessages.map(\.due).min(), next <= target {
            setNow(next)
            let due = retryMessages.filter { $0.due <= next }
            retryMessages.removeAll { $0.due <= next }
            pendingRetries.removeAll { $0.dueAt <= next }
            for d in due { enqueue(d.message) }
            await runUntilIdle()
        }
        setNow(target)
    }

    /// Emitted events of one type, decoded.
    public func emitted<E: Event>(_ type: E.Type) -> [E] {
        emitted.filter { $0.type == E.eventType }.compactMap { try? JSONCoding.decoder.decode(E.self, from: $0.data) }
    }

    /// How many times a handler's body ran.
    public func invocations(of handler: String) -> Int { invocationCounts[handler, default: 0] }

    private func setNow(_ t: Duration) {
        now = t
        clock.set(t)
    }

    private func route(_ envelope: EventEnvelope) {
        let message = EnvelopeCodec.encode(envelope, exchange: WireNames.defaultExchange)
        for h in handlers where h.inputType == envelope.type {
            enqueue(Message(handler: h, body: message.body, properties: message.properties, attempt: 1))
        }
    }

    private func enqueue(_ m: Message) {
        queue.append(m)
        if deliverEverythingTwice { queue.append(m) }
    }

    private func process(_ m: Message) async {
        let h = m.handler
        let envelope: EventEnvelope
        let prepared: HandlerDescriptor.Prepared
        let key: String
        switch h.admit(body: m.body, properties: m.properties) {
        case .success(let a):
            (envelope, prepared, key) = (a.envelope, a.prepared, a.key)
        case .failure(let refusal):
            deadLetters.append(
                DeadLetter(
                    handler: h.name, eventID: refusal.envelope?.id ?? m.properties.messageID, body: m.body,
                    errorType: refusal.errorType, errorMessage: refusal.message, attempts: m.attempt))
            return
        }
        let owner = "harness/\(UUID().uuidString)"
        guard let claim = try? await ledger.claim(handler: h.name, key: key, owner: owner, lease: .seconds(60)) else {
            return
        }
        switch claim {
        case .completed(let unpublished):
            for o in unpublished { emitted.append(o.envelope); route(o.envelope) }
            try? await ledger.markPublished(handler: h.name, key: key, indexes: unpublished.map(\.index))
            return
        case .heldElsewhere:
            return  // cannot happen here: the harness runs one message at a time
        case .claimed:
            break
        }
        var logger = Logger(label: "choreo.testing")
        logger[metadataKey: "handler"] = "\(h.name)"
        let context = HandlerContext(
            envelope: envelope, attempt: m.attempt, idempotencyKey: key, logger: logger,
            handlerName: h.name, source: "choreo://\(service)/\(h.name)",
            exchange: WireNames.defaultExchange, allowedTypes: Set(h.emitTypes))
        invocationCounts[h.name, default: 0] += 1
        do {
            try await prepared.run(context)
        } catch {
            try? await ledger.release(handler: h.name, key: key, owner: owner)
            let retryable = !(error is NonRetryable)
            if retryable, let delay = h.retryPolicy.delay(afterAttempt: m.attempt) {
                var next = m
                next.attempt += 1
                retryMessages.append((now + delay, next))
                pendingRetries.append(
                    ScheduledRetry(
                        handler: h.name, eventID: envelope.id, attempt: next.attempt, delay: delay,
                        dueAt: now + delay))
            } else {
                let type =
                    (error as? NonRetryable).map { String(describing: Swift.type(of: $0.underlying)) }
                    ?? String(describing: Swift.type(of: error))
                deadLetters.append(
                    DeadLetter(
                        handler: h.name, eventID: envelope.id, body: m.body, errorType: type,
                        errorMessage: String(describing: error), attempts: m.attempt))
            }
            return
        }
        guard
            let completion = try? await ledger.complete(
                handler: h.name, key: key, owner: owner, outbox: context.emitted)
        else { return }
        let outbox: [OutboxMessage]
        switch completion {
        case .committed: outbox = context.emitted
        case .alreadyCompleted(let unpublished): outbox = unpublished
        case .leaseLost: return
        }
        for o in outbox { emitted.append(o.envelope); route(o.envelope) }
        try? await ledger.markPublished(handler: h.name, key: key, indexes: outbox.map(\.index))
    }
}

/// The harness's virtual time, readable from the ledger's lease checks.
final class VirtualClock: Sendable {
    private let elapsed = Mutex(Duration.zero)
    private let start = Date()

    func set(_ t: Duration) { elapsed.withLock { $0 = t } }

    @Sendable func date() -> Date {
        let t = elapsed.withLock { $0 }
        return start.addingTimeInterval(Double(t.components.seconds) + Double(t.components.attoseconds) / 1e18)
    }
}
