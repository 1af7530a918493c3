import Foundation

/// A message delivered to a consumer, with the means to settle it.
///
/// Settle every delivery exactly once: ``ack(multiple:)``, ``nack(multiple:requeue:)`` or
/// ``reject(requeue:)``. A delivery left unsettled stays with this consumer until its channel closes,
/// when the broker redelivers it. Settling after the channel was reopened throws
/// ``AMQPError/Code/staleDelivery`` (the broker has already requeued it).
///
/// A class with immutable fields: a delivery travels through buffers, arrays and tasks, and passing it
/// on costs one reference count where a struct of a dozen strings would retain each of them.
public final class AMQPDelivery: Sendable {
    public let body: Data
    public let properties: AMQPProperties
    public let deliveryTag: UInt64
    /// True when the broker delivered this message before (to this or another consumer).
    public let redelivered: Bool
    public let exchange: String
    public let routingKey: String
    public let consumerTag: String
    let channel: AMQPChannel
    let generation: UInt64

    init(
        body: Data, properties: AMQPProperties, deliveryTag: UInt64, redelivered: Bool, exchange: String,
        routingKey: String, consumerTag: String, channel: AMQPChannel, generation: UInt64
    ) {
        self.body = body
        self.properties = properties
        self.deliveryTag = deliveryTag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routingKey = routingKey
        self.consumerTag = consumerTag
        self.channel = channel
        self.generation = generation
    }

    /// Stream offset of this message when consumed from a stream queue.
    public var streamOffset: Int64? { properties.header("x-stream-offset")?.intValue }

    /// Acknowledges the delivery (and with `multiple`, every earlier one on the channel).
    public func ack(multiple: Bool = false) throws(AMQPError) {
        try channel.ack(deliveryTag: deliveryTag, generation: generation, multiple: multiple)
    }

    /// Negatively acknowledges it: requeued, or dead-lettered when the queue has a dead-letter exchange.
    public func nack(multiple: Bool = false, requeue: Bool) throws(AMQPError) {
        try channel.nack(deliveryTag: deliveryTag, generation: generation, multiple: multiple, requeue: requeue)
    }

    /// Rejects it: requeued, or dead-lettered when the queue has a dead-letter exchange.
    public func reject(requeue: Bool) throws(AMQPError) {
        try channel.reject(deliveryTag: deliveryTag, generation: generation, requeue: requeue)
    }
}
