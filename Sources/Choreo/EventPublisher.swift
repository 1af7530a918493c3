import ChoreoAMQP
import Foundation
import Logging
import Tracing

/// Publishes events into the mesh with publisher confirms: for code that starts a flow (an HTTP
/// endpoint placing an order, a scheduler, a test).
///
/// `publish` returns once the broker has the event on disk. Safe to call from many tasks at once;
/// their publishes are pipelined on one connection. With a tracer, each publish is a producer span, a child of
/// the caller's current span (or of the envelope's own `traceparent`), and the event carries that span.
///
/// ```swift
/// let publisher = try await EventPublisher.connect(url: "amqp://127.0.0.1", source: "checkout")
/// let id = try await publisher.publish(OrderPlaced(orderID: "A-1", items: ["sku-1": 2]))
/// ```
public final class EventPublisher: Sendable {
    public let exchange: String
    public let source: String
    private let connection: AMQPConnection
    private let channel: AMQPChannel
    private let tracing: EventTracing?

    private init(
        connection: AMQPConnection, channel: AMQPChannel, exchange: String, source: String, tracing: EventTracing?
    ) {
        self.connection = connection
        self.channel = channel
        self.exchange = exchange
        self.source = source
        self.tracing = tracing
    }

    /// Connects and declares the mesh's exchange (idempotent).
    ///
    /// - Parameter tracer: where publishes are traced; by default swift-distributed-tracing's bootstrapped tracer.
    public static func connect(
        url: String, exchange: String = WireNames.defaultExchange, source: String,
        logger: Logger = Logger(label: "choreo.publisher"), tracer: (any Tracer)? = nil
    ) async throws -> EventPublisher {
        var config = try AMQPConfiguration(url: url)
        config.connectionName = config.connectionName ?? "\(source) publisher"
        let connection = try await AMQPConnection.connect(to: config, logger: logger)
        do {
            let channel = try await connection.openChannel()
            try await channel.enableConfirms()
            try await channel.declareExchange(exchange, type: .topic, durable: true)
            return EventPublisher(
                connection: connection, channel: channel, exchange: exchange, source: source,
                tracing: EventTracing(tracer))
        } catch {
            await connection.close()
            throw error
        }
    }

    /// Publishes a typed event and returns its id once the broker confirmed it.
    ///
    /// - Parameters:
    ///   - id: the event id; a new UUID by default. Publishing the same id twice is deduplicated by handlers.
    ///   - idempotencyKey: a key handlers deduplicate by instead of the id.
    @discardableResult
    public func publish<E: Event>(
        _ event: E, id: String = EventID.random(), correlationID: String? = nil,
        idempotencyKey: String? = nil, subject: String? = nil
    ) async throws -> String {
        let envelope = try EventEnvelope(
            event, source: source, id: id, correlationID: correlationID,
            idempotencyKey: idempotencyKey, subject: subject)
        try await publish(envelope)
        return envelope.id
    }

    /// Publishes a prepared envelope (routing key = its type).
    public func publish(_ envelope: EventEnvelope) async throws {
        guard tracing != nil else {
            return try await channel.publish(EnvelopeCodec.encode(envelope, exchange: exchange))
        }
        try await publish(contentsOf: [envelope])
    }

    /// Publishes envelopes back to back and waits for all confirms; throws the first failure.
    public func publish(contentsOf envelopes: [EventEnvelope]) async throws {
        guard let tracing else {
            let messages = envelopes.map { EnvelopeCodec.encode($0, exchange: exchange) }
            for r in await channel.publish(contentsOf: messages) { try r.get() }
            return
        }
        var spans: [any Span] = []
        var traced = envelopes
        for i in traced.indices {
            let parent =
                traced[i].traceparent == nil ? ServiceContext.current ?? .topLevel : tracing.context(of: traced[i])
            let span = tracing.tracer.startSpan("publish \(traced[i].type)", context: parent, ofKind: .producer)
            EventTracing.describe(traced[i], in: span)
            span.attributes["messaging.operation.type"] = "send"
            span.attributes["messaging.destination.name"] = exchange
            tracing.traceContext(for: span.context)?.apply(to: &traced[i])
            spans.append(span)
        }
        let results = await channel.publish(contentsOf: traced.map { EnvelopeCodec.encode($0, exchange: exchange) })
        for (span, result) in zip(spans, results) {
            if case .failure(let error) = result {
                span.recordError(error)
                span.setStatus(SpanStatus(code: .error))
            }
            span.end()
        }
        for r in results { try r.get() }
    }

    public func close() async {
        await connection.close()
    }
}
