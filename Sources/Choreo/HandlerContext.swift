import Crypto
import Foundation
import Logging
import Synchronization

/// What a handler invocation knows about its event, and where it emits new ones.
///
/// Emitted events are buffered: they are recorded in the ledger together with the completion of
/// this event and published after the commit, so they go out exactly when the effect counts. Their
/// ids derive from the input's id, the handler and the emit index: a re-run emits the same ids.
public final class HandlerContext: Sendable {
    /// The input event's envelope.
    public let envelope: EventEnvelope
    /// 1 for the first attempt, 2 for the first retry, ...
    public let attempt: Int
    /// The key this invocation is deduplicated by; pass it to external APIs as their idempotency key.
    public let idempotencyKey: String
    /// Carries `event.id`, `event.type` and `handler` as metadata.
    public var logger: Logger { HandlerRunner.logger(handlerLogger, for: envelope) }
    private let handlerLogger: Logger
    let handlerName: String
    let source: String
    let exchange: String
    let allowedTypes: Set<String>
    /// The trace context of emitted events when traced (the invocation's span); nil carries on the input's.
    let trace: TraceContext?
    private let buffer = Mutex<[OutboxMessage]>([])

    /// `logger` is the handler's; the event's id and type are added when the handler logs. `trace`, when given,
    /// replaces the input's trace context on emitted events (the invocation's own span).
    package init(
        envelope: EventEnvelope, attempt: Int, idempotencyKey: String, logger: Logger, handlerName: String,
        source: String, exchange: String, allowedTypes: Set<String>, trace: TraceContext? = nil
    ) {
        self.envelope = envelope
        self.attempt = attempt
        self.idempotencyKey = idempotencyKey
        self.handlerLogger = logger
        self.handlerName = handlerName
        self.source = source
        self.exchange = exchange
        self.allowedTypes = allowedTypes
        self.trace = trace
    }

    public var eventID: String { envelope.id }
    /// The correlation id of the flow (the first event's id when nobody set one).
    public var correlationID: String { envelope.correlationID ?? envelope.id }

    /// Buffers an event to publish once this invocation commits.
    ///
    /// - Parameters:
    ///   - idempotencyKey: a key downstream handlers deduplicate by instead of the event id.
    ///   - subject: the CloudEvents `subject` (e.g. the order id).
    /// - Throws: ``ConfigurationError`` when the handler did not declare this type in `emits`, or gives an empty
    ///   idempotency key.
    public func emit<E: Event>(_ event: E, idempotencyKey: String? = nil, subject: String? = nil) throws {
        guard allowedTypes.contains(E.eventType) else {
            throw NonRetryable(
                ConfigurationError(
                    "handler \(handlerName) emitted '\(E.eventType)', which it does not declare in `emits`"))
        }
        if idempotencyKey?.isEmpty == true { throw NonRetryable(ConfigurationError.emptyIdempotencyKey) }
        let data = try PayloadJSON.encode(event)
        buffer.withLock { buffer in
            let index = buffer.count
            var e = EventEnvelope(
                id: Self.derivedID(input: envelope.id, handler: handlerName, index: index), source: source,
                type: E.eventType,
                subject: subject, dataVersion: E.schemaVersion, correlationID: correlationID, causationID: envelope.id,
                idempotencyKey: idempotencyKey, data: data)
            (trace ?? TraceContext(of: envelope)).apply(to: &e)
            e.time = Date()
            buffer.append(OutboxMessage(index: index, envelope: e, exchange: exchange, routingKey: E.eventType))
        }
    }

    package var emitted: [OutboxMessage] { buffer.withLock { $0 } }

    /// A UUID-shaped id from SHA-256 of (input id, handler, index): the same inputs give the same id.
    package static func derivedID(input: String, handler: String, index: Int) -> String {
        // The bytes of "input\0handler\0index", hashed as they are: no joined string or Data per emit.
        var sha = SHA256()
        for part in [input, handler] {
            var part = part
            part.withUTF8 { sha.update(bufferPointer: UnsafeRawBufferPointer($0)) }
            sha.update(data: [0])
        }
        var number = String(index)
        number.withUTF8 { sha.update(bufferPointer: UnsafeRawBufferPointer($0)) }
        return sha.finalize().withUnsafeBytes { UUIDText.format($0, version: 5) }
    }
}
