/// Declaration settings of a queue; the named properties fill the RabbitMQ `x-` arguments.
///
/// ```swift
/// var options = QueueOptions.quorum(deliveryLimit: 5)
/// options.deadLetterExchange = ""
/// options.deadLetterRoutingKey = "orders.dlq"
/// try await channel.declareQueue("orders", options: options)
/// ```
public struct QueueOptions: Sendable, Hashable {
    public enum QueueType: String, Sendable { case classic, quorum, stream }
    public enum Overflow: String, Sendable {
        case dropHead = "drop-head", rejectPublish = "reject-publish", rejectPublishDLX = "reject-publish-dlx"
    }
    public enum DeadLetterStrategy: String, Sendable { case atMostOnce = "at-most-once", atLeastOnce = "at-least-once" }

    public var durable = true
    public var exclusive = false
    public var autoDelete = false
    public var type: QueueType?
    /// Quorum queues: deliveries after which the broker dead-letters (or drops) the message.
    public var deliveryLimit: Int?
    public var deadLetterExchange: String?
    public var deadLetterRoutingKey: String?
    public var messageTTL: Duration?
    public var maxLength: Int?
    public var overflow: Overflow?
    public var deadLetterStrategy: DeadLetterStrategy?
    /// Stream queues: retention by age, RabbitMQ syntax (`7D`, `12h`).
    public var maxAge: String?
    /// Any other arguments, merged last.
    public var arguments: AMQPTable = [:]

    public init(durable: Bool = true, exclusive: Bool = false, autoDelete: Bool = false, type: QueueType? = nil) {
        self.durable = durable
        self.exclusive = exclusive
        self.autoDelete = autoDelete
        self.type = type
    }

    public static func quorum(deliveryLimit: Int? = nil) -> QueueOptions {
        var o = QueueOptions(type: .quorum)
        o.deliveryLimit = deliveryLimit
        return o
    }

    public static var stream: QueueOptions { QueueOptions(type: .stream) }

    /// The declaration's argument table.
    public var table: AMQPTable {
        var t = AMQPTable()
        if let type { t["x-queue-type"] = .string(type.rawValue) }
        if let deliveryLimit { t["x-delivery-limit"] = .int64(Int64(deliveryLimit)) }
        if let deadLetterExchange { t["x-dead-letter-exchange"] = .string(deadLetterExchange) }
        if let deadLetterRoutingKey { t["x-dead-letter-routing-key"] = .string(deadLetterRoutingKey) }
        if let messageTTL {
            let ms = messageTTL.components.seconds * 1000 + messageTTL.components.attoseconds / 1_000_000_000_000_000
            t["x-message-ttl"] = .int64(ms)
        }
        if let maxLength { t["x-max-length"] = .int64(Int64(maxLength)) }
        if let overflow { t["x-overflow"] = .string(overflow.rawValue) }
        if let deadLetterStrategy { t["x-dead-letter-strategy"] = .string(deadLetterStrategy.rawValue) }
        if let maxAge { t["x-max-age"] = .string(maxAge) }
        t.merge(arguments) { _, new in new }
        return t
    }
}

/// Exchange kinds.
public enum ExchangeType: String, Sendable {
    case direct, fanout, topic, headers
}

/// What a queue declaration reports.
public struct QueueInfo: Sendable, Hashable {
    public var name: String
    public var messageCount: UInt32
    public var consumerCount: UInt32
}
