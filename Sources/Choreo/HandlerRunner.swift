import ChoreoAMQP
import CoreMetrics
import Foundation
import Logging
import Synchronization
import Tracing

/// Runs DESIGN.md's delivery protocol for one handler's consumer (see ``consume(_:concurrency:drainTimeout:shouldStop:)``).
///
/// Every path ends in exactly one of: the delivery acked after its effect committed and its outputs
/// were confirmed; acked after a confirmed copy went to a retry tier or the dead-letter queue; or left
/// unacked (connection lost, ledger unavailable) so the broker delivers it again.
struct HandlerRunner: Sendable {
    let service: String
    let handler: HandlerDescriptor
    let queues: WireNames.HandlerQueues
    let exchange: String
    /// Declares the handler's queues again when a retry or dead letter finds its queue missing.
    let topology: Topology
    let ledger: any IdempotencyLedger
    let publisher: AMQPChannel
    let owner: String
    let leaseDuration: Duration
    let maxBodyBytes: Int
    let leases: LeaseKeeper
    let logger: Logger
    let metrics: RunnerMetrics
    /// Nil when no tracer is bootstrapped.
    let tracing: EventTracing?

    /// A delivery that decoded and that the handler accepts, with everything its invocation needs.
    /// A class: it travels through several stages and arrays, and copying its fields each time costs more
    /// than the rest of the bookkeeping.
    final class Admitted: Sendable {
        let delivery: AMQPDelivery
        let envelope: EventEnvelope
        let prepared: HandlerDescriptor.Prepared
        let key: String
        let owner: String
        let attempt: Int
        private let handlerLogger: Logger

        init(
            delivery: AMQPDelivery, envelope: EventEnvelope, prepared: HandlerDescriptor.Prepared, key: String,
            owner: String, attempt: Int, handlerLogger: Logger
        ) {
            self.delivery = delivery
            self.envelope = envelope
            self.prepared = prepared
            self.key = key
            self.owner = owner
            self.attempt = attempt
            self.handlerLogger = handlerLogger
        }

        /// The handler's logger with the event's id and type; built when something is logged, not per event.
        var logger: Logger { HandlerRunner.logger(handlerLogger, for: envelope) }
    }

    static func logger(_ base: Logger, for envelope: EventEnvelope) -> Logger {
        var logger = base
        logger[metadataKey: "event.id"] = "\(envelope.id)"
        logger[metadataKey: "event.type"] = "\(envelope.type)"
        return logger
    }

    /// Consumes until the consumer ends, `shouldStop` turns true or the connection is lost, with at most
    /// `concurrency` deliveries in flight; then waits up to `drainTimeout` for those to settle.
    ///
    /// Deliveries that arrived together travel together: one ledger write claims them all, and the
    /// invocations that finish while an earlier group is being committed are committed, published and
    /// acked as the next group (see ``Completer``). Each delivery still follows DESIGN.md's protocol.
    func consume(
        _ consumer: AMQPConsumer, concurrency: Int, drainTimeout: Duration, shouldStop: @escaping @Sendable () -> Bool
    ) async throws {
        let inFlight = InFlight(limit: max(1, concurrency), meter: metrics.enabled ? metrics.inFlight : nil)
        let completer = Completer(runner: self, inFlight: inFlight, shouldStop: shouldStop)
        try await withThrowingDiscardingTaskGroup { group in
            var failure: (any Error)?
            do {
                while true {
                    let room = await inFlight.room()
                    guard let batch = try await consumer.next(max: room) else { break }
                    // Deliveries not started go back to the queue when the channel closes.
                    if shouldStop() { break }
                    inFlight.add(batch.count)
                    await admit(
                        batch, from: consumer, completer: completer, inFlight: inFlight, shouldStop: shouldStop,
                        group: &group)
                }
            } catch {
                failure = error
            }
            if await !inFlight.drained(within: drainTimeout) {
                logger.warning(
                    "shutdown timeout: \(inFlight.count) invocations did not finish; their events will be redelivered",
                    metadata: ["handler": "\(handler.name)"])
            }
            group.cancelAll()
            if let failure { throw failure }
        }
    }

    /// Decodes a batch, claims its keys in one ledger write and starts the invocations.
    private func admit(
        _ batch: [AMQPDelivery], from consumer: AMQPConsumer, completer: Completer, inFlight: InFlight,
        shouldStop: @escaping @Sendable () -> Bool, group: inout ThrowingDiscardingTaskGroup<any Error>
    ) async {
        var admitted: [Admitted] = []
        admitted.reserveCapacity(batch.count)
        for delivery in batch {
            switch decode(delivery) {
            case .success(let a): admitted.append(a)
            case .failure(let rejection):
                group.addTask {
                    await deadLetter(
                        delivery, errorType: rejection.errorType, message: rejection.message,
                        attempts: rejection.attempt, logger: rejection.logger)
                    inFlight.settled(1)
                }
            }
        }
        guard !admitted.isEmpty else { return }
        let claims: [LedgerClaim]
        do {
            let requests = admitted.map { ClaimRequest(handler: handler.name, key: $0.key, owner: $0.owner) }
            claims = try await persistently(.claim, events: admitted.count, shouldStop: shouldStop) {
                try await ledger.claim(requests, lease: leaseDuration)
            }
        } catch {
            let admitted = admitted
            group.addTask {
                await giveBack(admitted, because: "ledger unavailable: \(error)")
                inFlight.settled(admitted.count)
            }
            return
        }
        FaultInjection.reached("after-claim")
        // A delivery alone in flight, on the connection's thread, starts its invocation here and now, up to its
        // first suspension (usually the wait for its publish's confirm): no task queued for the thread's next
        // turn on its path. It would usually run on this thread next, and hold it just as long. Elsewhere (a
        // burst, or the executor paused after a long job) a task of its own, so that invocations run in
        // parallel and the consume loop goes on taking deliveries meanwhile.
        let alone = batch.count == 1 && inFlight.count == 1 && consumer.isOnConnectionThread
        for (a, claim) in zip(admitted, claims) {
            switch claim {
            case .claimed where alone:
                group.addImmediateTask { await invoke(a, completer: completer, inFlight: inFlight) }
            case .claimed:
                group.addTask { await invoke(a, completer: completer, inFlight: inFlight) }
            case .completed(let unpublished):
                if logger.logLevel <= .debug {
                    a.logger.debug("duplicate: already handled, not running the handler again")
                }
                if completer.submit(.duplicate(a, unpublished: unpublished)) {
                    group.addTask { await completer.settleAll() }
                }
            case .heldElsewhere:
                if logger.logLevel <= .debug {
                    a.logger.debug("another invocation holds this key; keeping this copy until that one settles")
                }
                group.addTask { await waitForKey(a, completer: completer, inFlight: inFlight) }
            }
        }
    }

    /// Another invocation holds the key (a concurrent duplicate): keep this copy until that one settles.
    ///
    /// DESIGN.md acks such a copy at once, counting on the holder's own copy being redelivered if the holder
    /// dies. That fails when the holder's copy is this one: a lease that outlives its process (a ledger shared
    /// by replicas, or any `IdempotencyLedger` that stores leases) can be held by a dead incarnation of this very
    /// delivery, and acking it would lose the event. Also, an invocation of a delivery from before a reconnect
    /// may commit and then fail to publish; a copy that waits finds the key completed and publishes its outbox.
    private func waitForKey(_ a: Admitted, completer: Completer, inFlight: InFlight) async {
        do {
            while true {
                switch try await ledger.claim(handler: handler.name, key: a.key, owner: a.owner, lease: leaseDuration) {
                case .claimed:
                    await invoke(a, completer: completer, inFlight: inFlight)
                    return
                case .completed(let unpublished):
                    if logger.logLevel <= .debug {
                        a.logger.debug("duplicate: already handled, not running the handler again")
                    }
                    if completer.submit(.duplicate(a, unpublished: unpublished)) { await completer.settleAll() }
                    return
                case .heldElsewhere(let until):
                    let wait = min(max(until.timeIntervalSinceNow, 0.05), 0.5)
                    try await Task.sleep(for: .seconds(wait))
                }
            }
        } catch {
            if !(error is CancellationError) { metrics.ledgerFailed(.claim) }
            await giveBack([a], because: "ledger or broker unavailable: \(error)")
            inFlight.settled(1)
        }
    }

    /// Runs the handler with its emits buffered; success goes to the completer, failure to a retry tier or the DLQ.
    private func invoke(_ a: Admitted, completer: Completer, inFlight: InFlight) async {
        // Traced, the span covers the handler's run; its retry, dead letter or commit and publish come after.
        let span = tracing.map { startSpan(for: a, with: $0) }
        let context = HandlerContext(
            envelope: a.envelope, attempt: a.attempt, idempotencyKey: a.key, logger: logger,
            handlerName: handler.name, source: source, exchange: exchange, allowedTypes: handler.emitTypeSet,
            trace: span.flatMap { tracing?.traceContext(for: $0.context) })
        let started = metrics.enabled ? DispatchTime.now().uptimeNanoseconds : 0
        do {
            defer {
                if metrics.enabled {
                    metrics.handlerDuration.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds &- started))
                }
            }
            try await withLeaseRenewal(key: a.key, owner: a.owner) {
                if let span {
                    // The handler's own spans (an HTTP call, a query) nest under the invocation's.
                    try await ServiceContext.withValue(span.context) { try await a.prepared.run(context) }
                } else {
                    try await a.prepared.run(context)
                }
            }
        } catch {
            if let span {
                span.recordError(error)
                span.setStatus(SpanStatus(code: .error, message: Self.typeName(of: error)))
                span.end()
            }
            await failed(
                a.delivery, envelope: a.envelope, error: error, attempt: a.attempt, key: a.key, owner: a.owner,
                logger: a.logger)
            inFlight.settled(1)
            return
        }
        span?.end()
        FaultInjection.reached("after-handler")
        if completer.submit(.ran(a, outbox: context.emitted)) { await completer.settleAll() }
    }

    /// The invocation's consumer span, a child of the span in the event's `traceparent`.
    private func startSpan(for a: Admitted, with tracing: EventTracing) -> any Span {
        let span = tracing.tracer.startSpan(
            "process \(queues.main)", context: tracing.context(of: a.envelope), ofKind: .consumer)
        EventTracing.describe(a.envelope, in: span)
        span.attributes["messaging.operation.type"] = "process"
        span.attributes["messaging.destination.name"] = queues.main
        span.attributes["choreo.service"] = service
        span.attributes["choreo.handler"] = handler.name
        span.attributes["choreo.attempt"] = a.attempt
        return span
    }

    /// Why a delivery was refused before its handler could run.
    struct Rejection: Error {
        var errorType: String
        var message: String
        var attempt: Int
        var logger: Logger
    }

    /// Step 1: decodes the delivery and lets the handler vet it; anything unusable comes back as a rejection.
    private func decode(_ delivery: AMQPDelivery) -> Result<Admitted, Rejection> {
        let logger = self.logger
        let attempt = Int(delivery.properties.header(WireNames.Headers.attempt)?.stringValue ?? "") ?? 1
        if delivery.body.count > maxBodyBytes {
            return .failure(
                Rejection(
                    errorType: "BodyTooLarge",
                    message:
                        "body of \(delivery.body.count) bytes exceeds the limit of \(maxBodyBytes) bytes (--max-body-bytes)",
                    attempt: attempt, logger: logger))
        }
        switch handler.admit(body: delivery.body, properties: delivery.properties) {
        case .success(let a):
            return .success(
                Admitted(
                    delivery: delivery, envelope: a.envelope, prepared: a.prepared, key: a.key,
                    owner: "\(owner)/\(delivery.deliveryTag)", attempt: attempt, handlerLogger: logger))
        case .failure(let refusal):
            return .failure(
                Rejection(
                    errorType: refusal.errorType, message: refusal.message, attempt: attempt,
                    logger: refusal.envelope.map { Self.logger(logger, for: $0) } ?? logger))
        }
    }

    /// Steps 4 and 5 for a group of finished invocations: one ledger write commits them all, their outboxes
    /// go out in one pipelined publish, one write records the confirms, then each delivery is acked.
    /// A commit that fails is tried again with the deliveries held (see ``persistently(_:events:shouldStop:_:)``);
    /// a delivery whose commit still failed, or whose publish failed, is given back for redelivery (its
    /// redelivery finds the key completed and republishes what is unconfirmed; downstream ledgers drop the
    /// copies). A record that fails is left to the outbox sweep at the next start.
    fileprivate func settle(_ group: [Completer.Finished], shouldStop: @escaping @Sendable () -> Bool) async {
        // What each delivery of the group publishes; nil while unknown (and for good when its commit failed).
        var outboxes: [[OutboxMessage]?] = group.map {
            if case .duplicate(_, let unpublished) = $0 { return unpublished }
            return nil
        }
        var lostLease = Set<Int>()
        var committed: [Int] = []

        // 4. Commit the invocations that ran: each key completed together with its outbox.
        var ran: [(index: Int, request: CompletionRequest)] = []
        for (i, f) in group.enumerated() {
            if case .ran(let a, let outbox) = f {
                ran.append((i, CompletionRequest(handler: handler.name, key: a.key, owner: a.owner, outbox: outbox)))
            }
        }
        if !ran.isEmpty {
            do {
                let requests = ran.map(\.request)
                let results = try await persistently(.commit, events: requests.count, shouldStop: shouldStop) {
                    try await ledger.complete(requests)
                }
                for ((i, request), result) in zip(ran, results) {
                    switch result {
                    case .committed:
                        outboxes[i] = request.outbox
                        if metrics.enabled { committed.append(i) }
                    case .alreadyCompleted(let unpublished):
                        group[i].admitted.logger.info("another invocation completed this key first; its outputs stand")
                        outboxes[i] = unpublished
                    case .leaseLost:
                        group[i].admitted.logger.info(
                            "the lease on this key passed to another invocation; leaving it to that one")
                        lostLease.insert(i)
                    }
                }
            } catch {
                // Nothing was completed: free the keys so that the redelivered copies can claim them at once.
                for (_, r) in ran {
                    do { try await ledger.release(handler: r.handler, key: r.key, owner: r.owner) } catch {
                        metrics.ledgerFailed(.release)
                    }
                }
                await giveBack(ran.map { group[$0.index].admitted }, because: "commit failed: \(error)")
            }
            FaultInjection.reached("after-commit")
        }

        // 5. Publish every outbox of the group with confirms, ack, then record what was confirmed.
        var messages: [AMQPOutgoingMessage] = []
        var publishedBy: [Int] = []
        for (i, outbox) in outboxes.enumerated() {
            for m in outbox ?? [] {
                messages.append(EnvelopeCodec.encode(m))
                publishedBy.append(i)
            }
        }
        var publishFailure: [Int: any Error] = [:]
        if !messages.isEmpty {
            for (n, result) in (await publisher.publish(contentsOf: messages)).enumerated() {
                if case .failure(let error) = result { publishFailure[publishedBy[n]] = error }
            }
            FaultInjection.reached("after-publish")
        }
        var toAck = lostLease
        var confirmed: [(index: Int, entries: PublishedEntries)] = []
        var unconfirmed: [Admitted] = []
        for (i, outbox) in outboxes.enumerated() {
            guard let outbox else { continue }
            let a = group[i].admitted
            if publishFailure[i] != nil {
                unconfirmed.append(a)
            } else if outbox.isEmpty {
                toAck.insert(i)
            } else {
                confirmed.append((i, PublishedEntries(handler: handler.name, key: a.key, indexes: outbox.map(\.index))))
            }
        }
        toAck.formUnion(confirmed.map(\.index))
        // Record what the broker confirmed, then ack. A record that is lost (a crash before it, or the ledger
        // failing) costs copies, not events: a redelivery finds the key completed and publishes the entries
        // again, as does the outbox sweep at the next start; downstream ledgers drop the copies by id.
        if !confirmed.isEmpty {
            do {
                try await ledger.markPublished(confirmed.map(\.entries))
            } catch {
                metrics.ledgerFailed(.record)
                logger.warning(
                    "could not record published outbox entries; the next start publishes them again",
                    metadata: ["error": "\(error)"])
            }
        }
        FaultInjection.reached("before-ack")
        for i in toAck.sorted() { ack(group[i].admitted.delivery, logger: group[i].admitted.logger) }
        FaultInjection.reached("after-ack")
        // Acked after its own commit: handled; any other ack (the key completed before, or by another): a duplicate.
        if metrics.enabled {
            let handled = committed.count(where: toAck.contains)
            metrics.count(.handled, handled)
            metrics.count(.duplicate, toAck.count - handled)
        }
        if let error = publishFailure.values.first {
            if (error as? AMQPError)?.replyCode == AMQPError.ReplyCode.notFound {
                // Only the mesh's exchange can be missing here. Publishing on would fail the same way until the
                // deliveries reached their delivery limit: reconnect instead, which declares it and the bindings.
                logger.warning(
                    "the exchange '\(exchange)' is missing (deleted while the service runs?); reconnecting to declare it again"
                )
                await publisher.connection.close()
            }
            await giveBack(unconfirmed, because: "outbox publish failed: \(error)")
        }
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
                try await publishToOwnQueue(copy, logger: logger)
                do { try await ledger.release(handler: handler.name, key: key, owner: owner) } catch {
                    metrics.ledgerFailed(.release)
                    throw error
                }
            } catch {
                await giveBack(delivery, because: "could not schedule the retry: \(error)", logger: logger)
                return
            }
            logger.info("attempt \(attempt) failed, retrying in \(delay)", metadata: ["error": "\(message)"])
            ack(delivery, logger: logger)
            metrics.count(.retried)
        } else {
            do { try await ledger.release(handler: handler.name, key: key, owner: owner) } catch {
                metrics.ledgerFailed(.release)
                await giveBack(delivery, because: "ledger unavailable: \(error)", logger: logger)
                return
            }
            await deadLetter(delivery, errorType: errorType, message: message, attempts: attempt, logger: logger)
        }
    }

    /// Calls the ledger until it answers, keeping the deliveries the call is for. A delivery given back counts
    /// toward the queue's delivery limit and comes straight back, so giving back at every failure would
    /// dead-letter whatever arrives during a database outage of ten seconds. Pauses of 0.25 s doubling to 5 s;
    /// a warning at the first failure and every 30 s. Gives up (the caller gives the deliveries back) when
    /// the runner stops, or after ``ledgerPatience`` (a failure that lasts that long is not an outage).
    private func persistently<T>(
        _ step: RunnerMetrics.LedgerStep, events: Int, shouldStop: @Sendable () -> Bool, _ call: () async throws -> T
    ) async throws -> T {
        let start = ContinuousClock.now
        var pause = Duration.milliseconds(250)
        var warned: ContinuousClock.Instant?
        var holding = false
        defer { if holding { metrics.held.decrement(by: Double(events)) } }
        while true {
            do {
                let value = try await call()
                if warned != nil { logger.notice("the ledger answers again (\(step.label))") }
                return value
            } catch {
                metrics.ledgerFailed(step)
                let now = ContinuousClock.now
                if shouldStop() || Task.isCancelled || now - start >= Self.ledgerPatience { throw error }
                if !holding {
                    holding = true
                    metrics.held.increment(by: Double(events))
                }
                if warned.map({ now - $0 >= .seconds(30) }) ?? true {
                    logger.warning(
                        "ledger unavailable; holding \(events) events and trying again",
                        metadata: ["step": "\(step.label)", "error": "\(error)"])
                    warned = now
                }
                try? await Task.sleep(for: pause)
                pause = min(pause * 2, .seconds(5))
            }
        }
    }

    /// How long a ledger call is retried before its deliveries are given back.
    static let ledgerPatience = Duration.seconds(600)

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
            try await publishToOwnQueue(letter, logger: logger)
        } catch {
            await giveBack(delivery, because: "could not dead-letter: \(error)", logger: logger)
            return
        }
        logger.info("dead-lettered", metadata: ["error.type": "\(errorType)", "error": "\(message)"])
        ack(delivery, logger: logger)
        metrics.count(.deadLettered)
    }

    /// Publishes to one of the handler's own queues (a retry tier, the dead-letter queue) through the default
    /// exchange, as mandatory. A queue deleted while the service runs would otherwise swallow the message, and the
    /// broker would still confirm it, so the delivery would be acked and lost. Returned, the message goes out once
    /// more after the handler's queues are declared again; a failure of either is thrown.
    private func publishToOwnQueue(_ message: AMQPOutgoingMessage, logger: Logger) async throws {
        var message = message
        message.mandatory = true
        let returned: AMQPError
        do throws(AMQPError) {
            try await publisher.publish(message)
            return
        } catch {
            returned = error
        }
        guard returned.code == .unroutable else { throw returned }
        logger.warning(
            "the queue '\(message.routingKey)' is missing (deleted while the service runs?); declaring it again")
        let channel = try await publisher.connection.openChannel()
        do { try await topology.declare(handler, queues: queues, on: channel) } catch {
            await channel.close()
            throw error
        }
        await channel.close()
        try await publisher.publish(message)
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

    /// `logger` is built only when the ack fails.
    private func ack(_ delivery: AMQPDelivery, logger: @autoclosure () -> Logger) {
        do { try delivery.ack() } catch {
            logger().info(
                "ack failed; the broker will redeliver and the ledger drops the copy", metadata: ["error": "\(error)"])
        }
    }

    /// Leaves the delivery to be redelivered: after a pause, requeued (or, if the connection is gone, by the broker).
    private func giveBack(_ delivery: AMQPDelivery, because reason: String, logger: Logger) async {
        logger.warning("leaving the event for redelivery: \(reason)")
        metrics.count(.returned)
        try? await Task.sleep(for: .seconds(1))
        try? delivery.nack(requeue: true)
    }

    /// ``giveBack(_:because:logger:)`` for several deliveries, with one pause for all.
    private func giveBack(_ admitted: [Admitted], because reason: String) async {
        guard !admitted.isEmpty else { return }
        for a in admitted { a.logger.warning("leaving the event for redelivery: \(reason)") }
        metrics.count(.returned, admitted.count)
        try? await Task.sleep(for: .seconds(1))
        for a in admitted { try? a.delivery.nack(requeue: true) }
    }

    private var source: String { "choreo://\(service)/\(handler.name)" }

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

/// Counts a runner's deliveries taken and not yet settled (acked, given back or dead-lettered), which
/// `--concurrency` limits, and makes the consumer wait for room.
final class InFlight: Sendable {
    private struct State: Sendable {
        var taken = 0
        let limit: Int
    }

    private let state: WaitableState<State>
    /// Nil when nothing is reported.
    private let meter: Meter?

    init(limit: Int, meter: Meter?) {
        state = WaitableState(State(limit: limit))
        self.meter = meter
    }

    var count: Int { state.withLock { $0.taken } }

    func add(_ n: Int) {
        state.withLock { $0.taken += n }
        meter?.increment(by: Double(n))
    }

    /// Deliveries settled.
    func settled(_ n: Int) {
        state.update { $0.taken -= n }
        meter?.decrement(by: Double(n))
    }

    /// Waits for room; returns how many deliveries may be taken now.
    func room() async -> Int {
        await state.wait { $0.taken < $0.limit }
        return state.withLock { max(1, $0.limit - $0.taken) }
    }

    /// Waits until every delivery settled, at most `timeout`; false when some had not.
    func drained(within timeout: Duration) async -> Bool {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.state.wait { $0.taken == 0 } }
            group.addTask { try? await Task.sleep(for: timeout) }
            await group.next()
            group.cancelAll()
        }
        return count == 0
    }
}

/// Collects finished invocations and settles them in groups: an invocation that finds fewer than
/// ``maxSettlers`` groups being settled settles everything that is waiting, and again for what arrived
/// meanwhile, until none is left. So a burst shares one commit, one publish and one ack pass, a lone
/// event goes through at once, and one group's commit overlaps another's wait for confirms.
final class Completer: Sendable {
    enum Finished: Sendable {
        /// The handler ran; its emits are to be committed and published.
        case ran(HandlerRunner.Admitted, outbox: [OutboxMessage])
        /// The key was completed before; publish what is still unpublished, then ack.
        case duplicate(HandlerRunner.Admitted, unpublished: [OutboxMessage])

        var admitted: HandlerRunner.Admitted {
            switch self {
            case .ran(let a, _), .duplicate(let a, _): return a
            }
        }
    }

    private let runner: HandlerRunner
    private let inFlight: InFlight
    private let shouldStop: @Sendable () -> Bool
    private let state = Mutex<(waiting: [Finished], settlers: Int)>(([], 0))
    static let maxSettlers = 2

    init(runner: HandlerRunner, inFlight: InFlight, shouldStop: @escaping @Sendable () -> Bool) {
        self.runner = runner
        self.inFlight = inFlight
        self.shouldStop = shouldStop
    }

    /// Hands over a finished invocation. False when another task is settling (it takes this one along);
    /// true when the caller must now run ``settleAll()``.
    func submit(_ finished: Finished) -> Bool {
        state.withLock { s -> Bool in
            s.waiting.append(finished)
            if s.settlers >= Self.maxSettlers { return false }
            s.settlers += 1
            return true
        }
    }

    /// Settles groups until nothing waits; run by the task that ``submit(_:)`` told to.
    func settleAll() async {
        while true {
            let group = state.withLock { s -> [Finished] in
                let g = s.waiting
                s.waiting.removeAll(keepingCapacity: true)
                if g.isEmpty { s.settlers -= 1 }
                return g
            }
            if group.isEmpty { return }
            await runner.settle(group, shouldStop: shouldStop)
            inFlight.settled(group.count)
        }
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

    /// Renews until cancelled; `metrics` are the handlers' (by name), for the failures.
    func run(ledger: any IdempotencyLedger, lease: Duration, metrics: [String: RunnerMetrics], logger: Logger) async {
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
                    metrics[h.handler]?.ledgerFailed(.renew)
                    logger.warning("could not renew a lease", metadata: ["error": "\(error)"])
                }
            }
        }
    }
}
