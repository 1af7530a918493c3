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
    let buffer: DeliveryBuffer
    let channel: AMQPChannel

    /// Waits for at least one delivery and returns every one already received, up to `max`, oldest first;
    /// nil once the consumer ended normally (after ``cancel()``) or the calling task was cancelled.
    /// Throws when the broker cancelled the consumer, the channel closed or the connection was lost.
    public func next(max: Int) async throws -> [AMQPDelivery]? {
        try await buffer.next(max: max)
    }

    /// Whether the caller runs on the I/O thread of this consumer's connection: a task that prefers the
    /// connection's ``ConnectionExecutor`` does when a delivery woke it there. Work done right there, inline,
    /// costs a delivery no thread hand-over; anywhere else, a separate task keeps deliveries flowing.
    public var isOnConnectionThread: Bool { channel.connection.loop.isCurrentThread }

    public func makeAsyncIterator() -> Iterator {
        Iterator(buffer: buffer)
    }

    public struct Iterator: AsyncIteratorProtocol {
        let buffer: DeliveryBuffer
        var pending: [AMQPDelivery] = []
        var index = 0

        public mutating func next() async throws -> AMQPDelivery? {
            if index == pending.count {
                guard let more = try await buffer.next(max: 256) else { return nil }
                pending = more
                index = 0
            }
            defer { index += 1 }
            return pending[index]
        }
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
