import CRabbitMQ
import Foundation

/// A channel on an ``AMQPConnection``: declarations, publishing with confirms, consuming.
///
/// `Sendable`: any number of tasks may publish on one channel at once; each call is one job on the
/// connection's thread, so frames never interleave. When the broker closes the channel (a 406 on a
/// redeclare, a 404 on a missing queue) the failing call throws an ``AMQPError`` with code
/// `channelClosed`, pending confirms and consumers on it fail, and the next call reopens it with
/// its confirm mode and prefetch restored.
public final class AMQPChannel: Sendable {
    /// The channel number on the connection.
    public let number: UInt16
    public let connection: AMQPConnection
    let status: ChannelStatus

    init(number: UInt16, connection: AMQPConnection, status: ChannelStatus) {
        self.number = number
        self.connection = connection
        self.status = status
    }

    private var loop: IOLoop { connection.loop }

    // MARK: Exchanges

    /// Declares an exchange (idempotent when the settings match; 406 PRECONDITION_FAILED otherwise).
    public func declareExchange(
        _ name: String, type: ExchangeType = .topic, durable: Bool = true, autoDelete: Bool = false,
        internal: Bool = false, arguments: AMQPTable = [:]
    ) async throws(AMQPError) {
        let id = number
        try await loop.perform { core throws(AMQPError) in
            let arena = CArena()
            let n = try arena.convert { try arena.shortString(name, "exchange name") }
            let t = try arena.convert { try arena.bytes(type.rawValue) }
            let args = try arena.convert { try arena.table(arguments) }
            _ = try core.request("exchange.declare '\(name)'", channel: id) { state in
                amqp_exchange_declare(state, id, n, t, 0, durable ? 1 : 0, autoDelete ? 1 : 0, `internal` ? 1 : 0, args)
            }
        }
    }

    /// Checks that an exchange exists (404 NOT_FOUND otherwise, which closes the channel; it reopens on next use).
    public func declareExchangePassive(_ name: String) async throws(AMQPError) {
        let id = number
        try await loop.perform { core throws(AMQPError) in
            let arena = CArena()
            let n = try arena.convert { try arena.shortString(name, "exchange name") }
            let t = try arena.convert { try arena.bytes("topic") }
            _ = try core.request("exchange.declare passive '\(name)'", channel: id) { state in
                amqp_exchange_declare(state, id, n, t, 1, 0, 0, 0, amqp_empty_table)
            }
        }
    }

    public func deleteExchange(_ name: String, ifUnused: Bool = false) async throws(AMQPError) {
        let id = number
        try await loop.perform { core throws(AMQPError) in
            let arena = CArena()
            let n = try arena.convert { try arena.shortString(name, "exchange name") }
            _ = try core.request("exchange.delete '\(name)'", channel: id) { state in
                amqp_exchange_delete(state, id, n, ifUnused ? 1 : 0)
            }
        }
    }

    // MARK: Queues

    /// Declares a queue; an empty name asks the broker to generate one (returned in ``QueueInfo/name``).
    @discardableResult
    public func declareQueue(_ name: String, options: QueueOptions = QueueOptions()) async throws(AMQPError)
        -> QueueInfo
    {
        try await queueDeclare(name, passive: false, options: options)
    }

    /// Returns a queue's message and consumer counts without changing it; 404 NOT_FOUND when it does not exist.
    public func declareQueuePassive(_ name: String) async throws(AMQPError) -> QueueInfo {
        try await queueDeclare(name, passive: true, options: QueueOptions())
    }

    private func queueDeclare(_ name: String, passive: Bool, options: QueueOptions) async throws(AMQPError) -> QueueInfo
    {
        let id = number
        return try await loop.perform { core throws(AMQPError) in
            let arena = CArena()
            let n = try arena.convert { try arena.shortString(name, "queue name") }
            let args = try arena.convert { try arena.table(passive ? nil : options.table) }
            let what = passive ? "queue.declare passive '\(name)'" : "queue.declare '\(name)'"
            let info = try core.request(what, channel: id) { state -> QueueInfo? in
                let ok = amqp_queue_declare(
                    state, id, n, passive ? 1 : 0, options.durable ? 1 : 0,
                    options.exclusive ? 1 : 0, options.autoDelete ? 1 : 0, args)
                guard let ok else { return nil }
                return QueueInfo(
                    name: CDecode.string(ok.pointee.queue), messageCount: ok.pointee.message_count,
                    consumerCount: ok.pointee.consumer_count)
            }
            guard let info else { throw AMQPError(.protocolFailure, message: "no declare-ok", operation: what) }
            return info
        }
    }

    /// Deletes a queue and returns how many messages it held.
    @discardableResult
    public func deleteQueue(_ name: String, ifUnused: Bool = false, ifEmpty: Bool = false) async throws(AMQPError)
        -> UInt32
    {
        let id = number
        return try await loop.perform { core throws(AMQPError) in
            let arena = CArena()
            let n = try arena.convert { try arena.shortString(name, "queue name") }
            return try core.request("queue.delete '\(name)'", channel: id) { state in
                amqp_queue_delete(state, id, n, ifUnused ? 1 : 0, ifEmpty ? 1 : 0)?.pointee.message_count ?? 0
            }
        }
    }

    /// Removes every ready message from a queue and returns how many there were.
    @discardableResult
    public func purgeQueue(_ name: String) async throws(AMQPError) -> UInt32 {
        let id = number
        return try await loop.perform { core throws(AMQPError) in
            let arena = CArena()
            let n = try arena.convert { try arena.shortString(name, "queue name") }
            return try core.request("queue.purge '\(name)'", channel: id) { state in
                amqp_queue_purge(state, id, n)?.pointee.message_count ?? 0
            }
        }
    }

    public func bindQueue(_ queue: String, exchange: String, routingKey: String, arguments: AMQPTable = [:])
        async throws(AMQPError)
    {
        try await binding(bind: true, queue: queue, exchange: exchange, routingKey: routingKey, arguments: arguments)
    }

    public func unbindQueue(_ queue: String, exchange: String, routingKey: String, arguments: AMQPTable = [:])
        async throws(AMQPError)
    {
        try await binding(bind: false, queue: queue, exchange: exchange, routingKey: routingKey, arguments: arguments)
    }

    private func binding(bind: Bool, queue: String, exchange: String, routingKey: String, arguments: AMQPTable)
        async throws(AMQPError)
    {
        let id = number
        try await loop.perform { core throws(AMQPError) in
            let arena = CArena()
            let q = try arena.convert { try arena.shortString(queue, "queue name") }
            let e = try arena.convert { try arena.shortString(exchange, "exchange name") }
            let k = try arena.convert { try arena.shortString(routingKey, "routing key") }
            let args = try arena.convert { try arena.table(arguments) }
            let what = "\(bind ? "queue.bind" : "queue.unbind") '\(queue)' to '\(exchange)' with '\(routingKey)'"
            _ = try core.request(what, channel: id) { state -> Bool in
                bind
                    ? amqp_queue_bind(state, id, q, e, k, args) != nil
                    : amqp_queue_unbind(state, id, q, e, k, args) != nil
            }
        }
    }

    // MARK: Publishing

    /// Turns on publisher confirms: every later ``publish(_:)`` returns only once the broker has the message.
    public func enableConfirms() async throws(AMQPError) {
        let id = number
        try await loop.perform { core throws(AMQPError) in try core.enableConfirms(id) }
    }

    /// Publishes one message and, with confirms on, waits for the broker's ack.
    ///
    /// Many tasks may call this at once: their publishes are pipelined on the connection, never one round
    /// trip at a time. - Throws: ``AMQPError`` `publishNacked`, `unroutable` (mandatory and no queue bound),
    /// `channelClosed`, `connectionLost`.
    public func publish(_ message: AMQPOutgoingMessage) async throws(AMQPError) {
        let id = number
        try await loop.performPublish {
            (core: ConnectionCore, done: @escaping @Sendable (Result<Void, AMQPError>) -> Void) in
            core.publish(message, channel: id, arena: CArena(), completion: done)
        }
    }

    /// Publishes messages back to back and waits until the broker settled all of them.
    ///
    /// The result has one entry per message, in order. Messages are written in chunks, with the
    /// connection reading confirms between chunks, so any number may be passed.
    public func publish(contentsOf messages: [AMQPOutgoingMessage]) async -> [Result<Void, AMQPError>] {
        if messages.isEmpty { return [] }
        let id = number
        let collected = try? await loop.performPublish {
            (core: ConnectionCore, done: @escaping @Sendable (Result<[Result<Void, AMQPError>], AMQPError>) -> Void) in
            let batch = PublishBatch(count: messages.count) { done(.success($0)) }
            batch.publish(messages, from: 0, channel: id, core: core)
        }
        return collected
            ?? messages.map { _ in
                .failure(AMQPError(.closed, message: "connection closed", operation: "basic.publish"))
            }
    }

    // MARK: Consuming

    /// Limits unacknowledged deliveries on this channel (basic.qos); kept across channel reopens.
    public func setPrefetch(_ count: UInt16) async throws(AMQPError) {
        let id = number
        try await loop.perform { core throws(AMQPError) in try core.setPrefetch(id, count: count) }
    }

    /// Lets this channel's acks wait to go out together: until the oldest has waited `maxDelay` (less a
    /// random part of up to half, so that consumers fed at a steady rate do not ack in step), or until
    /// `maxCount` wait, or a nack or reject comes, whichever is first. Closing the channel or the
    /// connection sends them first; if the connection is lost they are lost with it, and the broker
    /// redelivers those messages (as it would any unacknowledged one). A delay of `.zero` or a count of 1
    /// (the default) sends each ack on the connection thread's next turn. Kept across channel reopens.
    ///
    /// On a quorum queue each ack frame is a write to the broker's Raft log, and a disk sync that other
    /// queues' writes wait behind: a handler that acks each event as it finishes syncs the disk just when
    /// the next handler in a chain publishes. Held acks still count against the prefetch: keep `maxCount`
    /// well under it.
    public func holdAcks(for maxDelay: Duration, upTo maxCount: Int) async throws(AMQPError) {
        let id = number
        let hold = maxDelay > .zero && maxCount > 1 ? AckCoalescer.Hold(delay: maxDelay, count: maxCount) : nil
        try await loop.perform { core throws(AMQPError) in try core.holdAcks(id, hold) }
    }

    /// Starts a consumer with manual acknowledgement.
    public func consume(
        queue: String, consumerTag: String = "", exclusive: Bool = false,
        arguments: AMQPTable = [:]
    ) async throws(AMQPError) -> AMQPConsumer {
        let id = number
        let buffer = DeliveryBuffer()
        let tag = try await loop.perform { core throws(AMQPError) -> String in
            let arena = CArena()
            let q = try arena.convert { try arena.shortString(queue, "queue name") }
            let t = try arena.convert { try arena.shortString(consumerTag, "consumer tag") }
            let args = try arena.convert { try arena.table(arguments) }
            let tag = try core.request("basic.consume '\(queue)'", channel: id) { state -> String in
                guard let ok = amqp_basic_consume(state, id, q, t, 0, 0, exclusive ? 1 : 0, args) else { return "" }
                return CDecode.string(ok.pointee.consumer_tag)
            }
            core.addConsumer(tag: tag, channel: id, sink: .init(buffer: buffer, channel: self))
            return tag
        }
        return AMQPConsumer(consumerTag: tag, buffer: buffer, channel: self)
    }

    /// Consumes a stream queue from an offset. Sets the prefetch, which streams require.
    public func consumeStream(
        queue: String, from offset: StreamOffset, prefetch: UInt16 = 100,
        consumerTag: String = ""
    ) async throws(AMQPError) -> AMQPConsumer {
        try await setPrefetch(prefetch)
        return try await consume(
            queue: queue, consumerTag: consumerTag, arguments: ["x-stream-offset": offset.argument])
    }

    /// Cancels a consumer; its sequence ends after the deliveries already buffered.
    public func cancel(consumerTag: String) async throws(AMQPError) {
        let id = number
        try await loop.perform { core throws(AMQPError) in
            let arena = CArena()
            let t = try arena.convert { try arena.shortString(consumerTag, "consumer tag") }
            _ = try core.request("basic.cancel '\(consumerTag)'", channel: id) { state in
                amqp_basic_cancel(state, id, t)
            }
            core.removeConsumer(tag: consumerTag, channel: id)?.buffer.finish()
        }
    }

    // MARK: Settling deliveries

    /// Acknowledges by delivery tag. Does not wait for the I/O thread; throws when the tag is stale.
    public func ack(deliveryTag: UInt64, multiple: Bool = false) throws(AMQPError) {
        try ack(deliveryTag: deliveryTag, generation: nil, multiple: multiple)
    }

    public func nack(deliveryTag: UInt64, multiple: Bool = false, requeue: Bool) throws(AMQPError) {
        try nack(deliveryTag: deliveryTag, generation: nil, multiple: multiple, requeue: requeue)
    }

    public func reject(deliveryTag: UInt64, requeue: Bool) throws(AMQPError) {
        try reject(deliveryTag: deliveryTag, generation: nil, requeue: requeue)
    }

    func ack(deliveryTag: UInt64, generation: UInt64?, multiple: Bool) throws(AMQPError) {
        try settle(.init(deliveryTag: deliveryTag, multiple: multiple, kind: .ack), generation, "basic.ack")
    }

    func nack(deliveryTag: UInt64, generation: UInt64?, multiple: Bool, requeue: Bool) throws(AMQPError) {
        try settle(
            .init(deliveryTag: deliveryTag, multiple: multiple, kind: .nack(requeue: requeue)), generation, "basic.nack"
        )
    }

    func reject(deliveryTag: UInt64, generation: UInt64?, requeue: Bool) throws(AMQPError) {
        try settle(
            .init(deliveryTag: deliveryTag, multiple: false, kind: .reject(requeue: requeue)), generation,
            "basic.reject")
    }

    private func settle(_ settlement: AckCoalescer.Settlement, _ generation: UInt64?, _ operation: String)
        throws(AMQPError)
    {
        if let generation, !status.isCurrent(generation) {
            throw AMQPError(
                .staleDelivery, message: "the delivery's channel was closed since; the broker redelivers the message",
                operation: operation)
        }
        if generation == nil, !status.isOpen {
            throw AMQPError(
                .closed, message: "channel \(number) is closed; its deliveries went back to the queue",
                operation: operation)
        }
        if let ended = loop.submit(
            IOLoop.PendingSettlement(channel: number, generation: generation, settlement: settlement))
        {
            throw ended
        }
    }

    /// Closes the channel; its consumers end and unconfirmed publishes fail with ``AMQPError/Code/closed``.
    public func close() async {
        let id = number
        _ = try? await loop.perform { core throws(AMQPError) in try core.closeChannel(id) }
    }
}

/// The settle-all bookkeeping of one ``AMQPChannel/publish(contentsOf:)``; lives on the I/O thread.
private final class PublishBatch: @unchecked Sendable {
    static let chunk = 256
    private var results: [Result<Void, AMQPError>?]
    private var remaining: Int
    private let done: ([Result<Void, AMQPError>]) -> Void

    init(count: Int, done: @escaping ([Result<Void, AMQPError>]) -> Void) {
        results = Array(repeating: nil, count: count)
        remaining = count
        self.done = done
    }

    func publish(_ messages: [AMQPOutgoingMessage], from start: Int, channel: UInt16, core: ConnectionCore) {
        let end = min(start + Self.chunk, messages.count)
        let arena = CArena(pageSize: 16_384)
        let write = {
            for i in start..<end {
                core.publish(messages[i], channel: channel, arena: arena) { [self] result in self.settled(i, result) }
            }
        }
        if end - start > 1 { core.publishingTogether(write) } else { write() }
        guard end < messages.count else { return }
        // Let the loop read confirms (and serve other jobs) before the next chunk.
        let ended = core.loop.submit { [self] core in self.publish(messages, from: end, channel: channel, core: core) }
        if let ended {
            for i in end..<messages.count { settled(i, .failure(ended)) }
        }
    }

    private func settled(_ index: Int, _ result: Result<Void, AMQPError>) {
        guard results[index] == nil else { return }
        results[index] = result
        remaining -= 1
        if remaining == 0 { done(results.map { $0! }) }
    }
}

extension CArena {
    /// Runs an encoding step, mapping its untyped error to ``AMQPError``.
    func convert<T>(_ body: () throws -> T) throws(AMQPError) -> T {
        do { return try body() } catch let error as AMQPError { throw error } catch {
            throw AMQPError(.invalidArgument, message: "\(error)", operation: "encode")
        }
    }
}
