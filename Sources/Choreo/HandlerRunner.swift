import ChoreoAMQP
import Foundation
import Logging
import Synchronization

/// Runs DESIGN.md's delivery protocol for one handler, one delivery at a time per call.
///
/// Every path ends in exactly one of: the delivery acked after its effect committed and its outputs
/// were confirmed; acked after a confirmed copy went to a retry tier or the dead-letter queue; or left
/// unacked (connection lost, ledger unavailable) so the broker delivers it again.
struct HandlerRunner: Sendable {
    let service: String
    let handler: HandlerDescriptor
    let queues: WireNames.HandlerQueues
    let exchange: String
    let ledger: any IdempotencyLedger
    let publisher: AMQPChannel
    let owner: String
    let leaseDuration: Duration
    let maxBodyBytes: Int
    let leases: LeaseKeeper
    let logger: Logger

    func process(_ delivery: AMQPDelivery) async {
        var logger = self.logger
        logger[metadataKey: "handler"] = "\(handler.name)"
        let attempt = Int(delivery.properties.headers?[WireNames.Headers.attempt]?.stringValue ?? "") ?? 1

        // 1. Decode: anything unusable is dead-lettered at once, with the reason.
        if delivery.body.count > maxBodyBytes {
            await deadLetter(
                delivery, errorType: "BodyTooLarge",
                message:
                    "body of \(delivery.body.count) bytes exceeds the limit of \(maxBodyBytes) bytes (--max-body-bytes)",
                attempts: attempt, logger: logger)
            return
        }
        let envelope: EventEnvelope
        let prepared: HandlerDescriptor.Prepared
        do throws(EnvelopeDecodingError) {
            envelope = try EnvelopeCodec.decode(delivery)
        } catch {
            await deadLetter(
                delivery, errorType: "EnvelopeDecodingError", message: error.reason, attempts: attempt, logger: logger)
            return
        }
        logger[metadataKey: "event.id"] = "\(envelope.id)"
        logger[metadataKey: "event.type"] = "\(envelope.type)"
        do throws(EventRejection) {
            prepared = try handler.prepare(envelope)
        } catch {
            await deadLetter(
                delivery, errorType: error.errorType, message: error.message, attempts: attempt, logger: logger)
            return
        }

        // 2. Claim the key.
        let key = prepared.key ?? envelope.idempotencyKey ?? envelope.id
        let owner = "\(self.owner)/\(delivery.deliveryTag)"
        do {
            claiming: while true {
                switch try await ledger.claim(handler: handler.name, key: key, owner: owner, lease: leaseDuration) {
                case .claimed:
                    break claiming
                case .completed(let unpublished):
                    logger.debug("duplicate: already handled, not running the handler again")
                    try await publishOutbox(unpublished, key: key)
                    ack(delivery, logger: logger)
                    return
                case .heldElsewhere(let until):
                    // Another invocation holds the key (a concurrent duplicate); keep this copy until it settles.
                    let wait = min(max(until.timeIntervalSinceNow, 0.05), 0.5)
                    try await Task.sleep(for: .seconds(wait))
                }
            }
        } catch {
            await giveBack(delivery, because: "ledger or broker unavailable: \(error)", logger: logger)
            return
        }
        FaultInjection.reached("after-claim")

        // 3. Run the handler, emits buffered in its context.
        let context = HandlerContext(
            envelope: envelope, attempt: attempt, idempotencyKey: key, logger: logger, handlerName: handler.name,
            source: "choreo://\(service)/\(handler.name)", exchange: exchange, allowedTypes: Set(handler.emitTypes))
        do {
            try await withLeaseRenewal(key: key, owner: owner) { try await prepared.run(context) }
        } catch {
            await failed(
                delivery, envelope: envelope, error: error, attempt: attempt, key: key, owner: owner, logger: logger)
            return
        }
        FaultInjection.reached("after-handler")

        // 4. Commit: key completed and outbox recorded, atomically.  5. Publish, mark, ack.
        do {
            let outbox: [OutboxMessage]
            switch try await ledger.complete(handler: handler.name, key: key, owner: owner, outbox: context.emitted) {
            case .committed:
                outbox = context.emitted
            case .alreadyCompleted(let unpublished):
                logger.info("another invocation completed this key first; its outputs stand")
                outbox = unpublished
            case .leaseLost:
                logger.info("the lease on this key passed to another invocation; leaving it to that one")
                ack(delivery, logger: logger)
                return
            }
            FaultInjection.reached("after-commit")
            try await publishOutbox(outbox, key: key)
        } catch {
            await giveBack(delivery, because: "commit or outbox publish failed: \(error)", logger: logger)
            return
        }
        FaultInjection.reached("before-ack")
        ack(delivery, logger: logger)
    }

    /// Publishes outbox entries with confirms, then records them as published.
    private func publishOutbox(_ outbox: [OutboxMessage], key: String) async throws {
        guard !outbox.isEmpty else { return }
        let messages = outbox.map {
            EnvelopeCodec.encode($0.envelope, exchange: $0.exchange, routingKey: $0.routingKey)
        }
        for result in await publisher.publish(contentsOf: messages) { try result.get() }
        FaultInjection.reached("after-publish")
        try await ledger.markPublished(handler: handler.name, key: key, indexes: outbox.map(\.index))
    }

    private func failed(
        _ delivery: AMQPDelivery, envelope: EventEnvelope, error: any Error, attempt: Int, key: String,
        owner: String, logger: Logger
    ) async {
        let retryable = !(error is NonRetryable) && !(error is EventRejection)
        let errorType = Self.typeName(of: error)
        let message = String(describing: error)
        if retryable, let delay = handler.retryPolicy.delay(afterAttempt: attempt) {
            var headers = flatHeaders(delivery)
            headers[WireNames.Headers.attempt] = String(attempt + 1)
            headers[WireNames.Headers.firstFailure] =
                headers[WireNames.Headers.firstFailure] ?? Timestamps.format(Date())
            headers[WireNames.Headers.originExchange] = headers[WireNames.Headers.originExchange] ?? delivery.exchange
            headers[WireNames.Headers.originRoutingKey] =
                headers[WireNames.Headers.originRoutingKey] ?? delivery.routingKey
            var properties = delivery.properties
            properties.headers = headers.mapValues { .string($0) }
            properties.deliveryMode = 2
            let copy = AMQPOutgoingMessage(
                exchange: "", routingKey: queues.retry(delay: delay), body: delivery.body,
                properties: properties)
            do {
                try await publisher.publish(copy)
                try await ledger.release(handler: handler.name, key: key, owner: owner)
            } catch {
                await giveBack(delivery, because: "could not schedule the retry: \(error)", logger: logger)
                return
            }
            logger.info("attempt \(attempt) failed, retrying in \(delay)", metadata: ["error": "\(message)"])
            ack(delivery, logger: logger)
        } else {
            do { try await ledger.release(handler: handler.name, key: key, owner: owner) } catch {
                await giveBack(delivery, because: "ledger unavailable: \(error)", logger: logger)
                return
            }
            await deadLetter(delivery, errorType: errorType, message: message, attempts: attempt, logger: logger)
        }
    }

    /// Publishes the delivery to the handler's dead-letter queue with flat failure metadata, then acks it.
    func deadLetter(_ delivery: AMQPDelivery, errorType: String, message: String, attempts: Int, logger: Logger) async {
        typealias H = WireNames.Headers
        var headers = flatHeaders(delivery)
        let now = Timestamps.format(Date())
        headers[H.deadLetterService] = service
        headers[H.deadLetterHandler] = handler.name
        headers[H.deadLetterQueue] = queues.main
        headers[H.deadLetterErrorType] = errorType
        headers[H.deadLetterErrorMessage] = String(message.prefix(4096))
        headers[H.deadLetterAttempts] = String(attempts)
        headers[H.deadLetterFirstFailure] = headers[H.firstFailure] ?? now
        headers[H.deadLetterLastFailure] = now
        headers[H.deadLetterOriginalExchange] = headers[H.originExchange] ?? delivery.exchange
        headers[H.deadLetterOriginalRoutingKey] = headers[H.originRoutingKey] ?? delivery.routingKey
        var properties = delivery.properties
        properties.headers = headers.mapValues { .string($0) }
        properties.deliveryMode = 2
        let letter = AMQPOutgoingMessage(
            exchange: "", routingKey: queues.deadLetter, body: delivery.body, properties: properties)
        do {
            try await publisher.publish(letter)
        } catch {
            await giveBack(delivery, because: "could not dead-letter: \(error)", logger: logger)
            return
        }
        logger.info("dead-lettered", metadata: ["error.type": "\(errorType)", "error": "\(message)"])
        ack(delivery, logger: logger)
    }

    /// Headers of the delivery as flat strings, keeping every string header and dropping broker tables (x-death).
    private func flatHeaders(_ delivery: AMQPDelivery) -> [String: String] {
        var out: [String: String] = [:]
        for (k, v) in delivery.properties.headers ?? [:] where !k.hasPrefix("x-") {
            switch v {
            case .string(let s): out[k] = s
            case .table, .array, .void: continue
            default:
                if let i = v.intValue { out[k] = String(i) } else { out[k] = "\(v)" }
            }
        }
        return out
    }

    private func ack(_ delivery: AMQPDelivery, logger: Logger) {
        do { try delivery.ack() } catch {
            logger.info(
                "ack failed; the broker will redeliver and the ledger drops the copy", metadata: ["error": "\(error)"])
        }
    }

    /// Leaves the delivery to be redelivered: after a pause, requeued (or, if the connection is gone, by the broker).
    private func giveBack(_ delivery: AMQPDelivery, because reason: String, logger: Logger) async {
        logger.warning("leaving the event for redelivery: \(reason)")
        try? await Task.sleep(for: .seconds(1))
        try? delivery.nack(requeue: true)
    }

    private func withLeaseRenewal(key: String, owner: String, _ body: @Sendable () async throws -> Void) async throws {
        leases.hold(handler: handler.name, key: key, owner: owner)
        defer { leases.drop(owner: owner) }
        try await body()
    }

    static func typeName(of error: any Error) -> String {
        if let n = error as? NonRetryable { return typeName(of: n.underlying) }
        return String(describing: type(of: error))
    }
}

/// Keeps the leases of running invocations alive: one loop renews all of them every third of the lease,
/// instead of a timer task per invocation.
final class LeaseKeeper: Sendable {
    private struct Held: Sendable {
        var handler: String
        var key: String
    }

    private let held = Mutex<[String: Held]>([:])

    func hold(handler: String, key: String, owner: String) {
        held.withLock { $0[owner] = Held(handler: handler, key: key) }
    }

    func drop(owner: String) {
        _ = held.withLock { $0.removeValue(forKey: owner) }
    }

    /// Renews until cancelled.
    func run(ledger: any IdempotencyLedger, lease: Duration, logger: Logger) async {
        while !Task.isCancelled {
            try? await Task.sleep(for: lease / 3)
            for (owner, h) in held.withLock({ $0 }) {
                do {
                    if try await !ledger.renew(handler: h.handler, key: h.key, owner: owner, lease: lease) {
                        logger.warning(
                            "lost the lease on a running invocation; another one may run the same event",
                            metadata: ["handler": "\(h.handler)", "key": "\(h.key)"])
                    }
                } catch {
                    logger.warning("could not renew a lease", metadata: ["error": "\(error)"])
                }
            }
        }
    }
}
