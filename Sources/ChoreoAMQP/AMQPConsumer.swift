/// The deliveries of one consumer, as an async sequence.
///
/// The sequence ends normally after ``cancel()``, and throws when the broker cancels the consumer
/// (``AMQPError/Code/consumerCancelled``), closes the channel, or the connection is lost. Deliveries
/// are buffered up to the channel's prefetch count, so the connection keeps servicing heartbeats
/// however long the code iterating this sequence takes.
///
/// ```swift
/// try await channel.setPrefetch(200)
/// let consumer = try await channel.consume(queue: "orders")
/// for try await delivery in consumer {
///     process(delivery.body)
///     try await delivery.ack()
/// }
/// ```
public struct AMQPConsumer: AsyncSequence, Sendable {
    public typealias Element = AMQPDelivery

    public let consumerTag: String
    let stream: AsyncThrowingStream<AMQPDelivery, Error>
    let channel: AMQPChannel

    public func makeAsyncIterator() -> AsyncThrowingStream<AMQPDelivery, Error>.AsyncIterator {
        stream.makeAsyncIterator()
    }

    /// Stops the consumer (basic.cancel). Deliveries already buffered are still yielded, then the sequence ends.
    public func cancel() async throws {
        try await channel.cancel(consumerTag: consumerTag)
    }
}

/// Where a stream consumer starts reading.
public enum StreamOffset: Sendable, Hashable {
    case first
    case last
    case next
    case offset(Int64)
    /// Seconds since the Unix epoch.
    case timestamp(UInt64)

    var argument: AMQPFieldValue {
        switch self {
        case .first: return "first"
        case .last: return "last"
        case .next: return "next"
        case .offset(let n): return .int64(n)
        case .timestamp(let t): return .timestamp(t)
        }
    }
}
