import Foundation

/// A message delivered to a consumer, with the means to settle it.
///
/// Settle every delivery exactly once: ``ack(multiple:)``, ``nack(multiple:requeue:)`` or
/// ``reject(requeue:)``. A delivery left unsettled stays with this consumer until its channel closes,
/// when the broker redelivers it. Settling after the channel was reopened throws
/// ``AMQPError/Code/staleDelivery`` (the broker has already requeued it).
public struct AMQPDelivery: Sendable {
    public var body: Data
    public var properties: AMQPProperties
    public var deliveryTag: UInt64
    /// True when the broker delivered this message before (to this or another consumer).
    public var redelivered: Bool
    public var exchange: String
    public var routingKey: String
    public var consumerTag: String
    let channel: AMQPChannel
    let generation: UInt64

    /// Stream offset of this message when consumed from a stream queue.
    public var streamOffset: Int64? { properties.headers?["x-stream-offset"]?.intValue }

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
