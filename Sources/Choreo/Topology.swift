import ChoreoAMQP
import Foundation

/// Declares what one handler needs on the broker, idempotently and with no coordinator.
///
/// - the mesh's durable topic exchange;
/// - `choreo.<service>.<handler>`: a quorum queue bound to the input type, with a delivery limit and
///   at-least-once dead-lettering to the handler's dead-letter queue (a message that crashes the
///   process again and again ends there);
/// - `….retry.<delay>`: one quorum queue per delay tier whose TTL dead-letters back to the handler's
///   queue (head-of-line TTL is right because every message in a tier waits the same time);
/// - `….dlq`: the handler's dead letters;
/// - the registry stream.
package struct Topology {
    var exchange: String
    var deliveryLimit: Int

    func declare(_ handler: HandlerDescriptor, queues: WireNames.HandlerQueues, on channel: AMQPChannel) async throws {
        try await declareExchange(on: channel)
        try await channel.declareQueue(queues.deadLetter, options: .quorum())
        try await declareMainQueue(queues, on: channel)
        try await bind(handler, queues: queues, on: channel)
        for delay in handler.retryPolicy.tiers {
            var tier = QueueOptions.quorum()
            tier.messageTTL = delay
            tier.deadLetterExchange = ""
            tier.deadLetterRoutingKey = queues.main
            tier.deadLetterStrategy = .atLeastOnce
            tier.overflow = .rejectPublish
            try await channel.declareQueue(queues.retry(delay: delay), options: tier)
        }
    }

    /// The mesh's exchange: the one declaration whose settings (type, durability) a restart could contradict.
    func declareExchange(on channel: AMQPChannel) async throws(AMQPError) {
        try await channel.declareExchange(exchange, type: .topic, durable: true)
    }

    /// The handler's queue bound to the mesh's exchange for its input type: the one binding a handler has.
    func bind(_ handler: HandlerDescriptor, queues: WireNames.HandlerQueues, on channel: AMQPChannel)
        async throws(AMQPError)
    {
        try await channel.bindQueue(queues.main, exchange: exchange, routingKey: handler.inputType)
    }

    /// The handler's own queue: the one whose arguments (the delivery limit) a restart could contradict.
    func declareMainQueue(_ queues: WireNames.HandlerQueues, on channel: AMQPChannel) async throws(AMQPError) {
        try await channel.declareQueue(
            queues.main, options: Self.mainQueue(deadLetterQueue: queues.deadLetter, deliveryLimit: deliveryLimit))
    }

    /// A handler's queue: quorum, with a delivery limit and at-least-once dead-lettering to `deadLetterQueue`.
    package static func mainQueue(deadLetterQueue: String, deliveryLimit: Int) -> QueueOptions {
        var main = QueueOptions.quorum(deliveryLimit: deliveryLimit)
        main.deadLetterExchange = ""
        main.deadLetterRoutingKey = deadLetterQueue
        main.deadLetterStrategy = .atLeastOnce
        main.overflow = .rejectPublish
        return main
    }

    static func declareRegistry(on channel: AMQPChannel) async throws {
        var options = QueueOptions.stream
        options.maxAge = "30D"
        try await channel.declareQueue(WireNames.registryStream, options: options)
    }
}

/// What a runner appends to the registry stream on start, one per handler; the CLI reads these.
public struct HandlerManifest: Codable, Sendable, Hashable {
    public var service: String
    public var handler: String
    public var queue: String
    public var deadLetterQueue: String
    public var retryQueues: [String]
    public var exchange: String
    public var consumes: String
    public var acceptedVersions: [Int]
    public var emits: [String]
    public var maxAttempts: Int
    public var host: String
    public var pid: Int32
    public var startedAt: Date
}
