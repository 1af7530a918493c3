import ChoreoAMQP
import CoreMetrics
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import Tracing

/// A service's handlers running against the broker: a swift-service-lifecycle `Service`.
///
/// `run()` connects (one connection consuming, one publishing), declares each handler's topology,
/// appends the manifests to the registry stream and consumes until graceful shutdown. When the broker
/// or the network goes away it reconnects with exponential backoff and full jitter and declares
/// everything again; deliveries in flight at that moment are redelivered and the ledger drops the
/// copies. On graceful shutdown (SIGTERM/SIGINT through a `ServiceGroup`) it stops consuming, lets
/// in-flight invocations finish and publish and ack (bounded by `shutdownTimeout`), and returns.
public final class ChoreoRuntime: Service, Sendable {
    public let configuration: RunnerConfiguration
    let handlers: [HandlerDescriptor]
    let ledger: any IdempotencyLedger
    let logger: Logger
    /// Each handler's metrics, by handler name.
    private let metrics: [String: RunnerMetrics]
    private let connectionsLost: Counter
    /// 1 while the broker blocks this service's publishing connection (a resource alarm), else 0.
    private let publishingBlocked: Meter
    private let tracing: EventTracing?
    private let shuttingDown = Mutex(false)
    /// The wait before the next reconnect, if one is under way; cancelled by ``beginShutdown()``.
    private let backoffWait = Mutex<Task<Void, Never>?>(nil)
    private let consumers = Mutex<[AMQPConsumer]>([])
    /// The current incarnation's two connections, for ``beginShutdown()`` to cut off what would wait on the broker
    /// past the shutdown's bound (see there).
    private let connections = Mutex<[AMQPConnection]>([])
    /// Resumed every time the runtime has declared its topology and started consuming.
    private let readiness = Mutex<[CheckedContinuation<Void, Never>]>([])
    private let ready = Mutex(false)
    /// Set when ``IdempotencyLedger/verifyUsable()`` threw: `run()` then stops and throws it.
    private let ledgerLost = Mutex<LedgerUnusable?>(nil)

    /// - Parameters:
    ///   - configuration: the settings; validated here.
    ///   - handlers: the service's handlers, with unique names.
    ///   - ledger: the idempotency-key ledger; by default the SQLite file of `configuration.resolvedLedgerPath`.
    ///   - logger: where the runtime logs (at `.info` and below; warnings for outages).
    ///   - metrics: where the runtime reports its metrics (see the README's "Metrics"); by default swift-metrics'
    ///     global factory, a no-op unless the executable bootstrapped a backend.
    ///   - tracer: where the runtime reports a span per handler invocation (see the README's "Tracing"); by default
    ///     swift-distributed-tracing's bootstrapped one, which traces nothing unless the executable chose a backend.
    public init(
        configuration: RunnerConfiguration, handlers: [any EventHandler], ledger: (any IdempotencyLedger)? = nil,
        logger: Logger = Logger(label: "choreo"), metrics: any MetricsFactory = MetricsSystem.factory,
        tracer: (any Tracer)? = nil
    ) throws {
        try configuration.validate()
        self.configuration = configuration
        self.handlers = handlers.map { HandlerDescriptor($0) }
        for h in self.handlers { try Self.validate(h, service: configuration.service) }
        let names = self.handlers.map(\.name)
        guard Set(names).count == names.count else {
            throw ConfigurationError("handler names must be unique: \(names)")
        }
        if let ledger {
            self.ledger = ledger
        } else if let scheme = configuration.ledgerPath.flatMap(LedgerLocation.scheme(of:)) {
            // Not a file: SQLite would make one named after the URL.
            throw ConfigurationError(unsupportedScheme: scheme, location: configuration.resolvedLedgerPath)
        } else {
            self.ledger = try SQLiteLedger(path: configuration.resolvedLedgerPath)
        }
        self.logger = logger
        self.metrics = Dictionary(
            uniqueKeysWithValues: self.handlers.map {
                ($0.name, RunnerMetrics(service: configuration.service, handler: $0.name, factory: metrics))
            })
        tracing = EventTracing(tracer)
        connectionsLost = Counter(
            label: "choreo_connections_lost_total", dimensions: [("service", configuration.service)], factory: metrics)
        publishingBlocked = Meter(
            label: "choreo_publishing_blocked", dimensions: [("service", configuration.service)], factory: metrics)
    }

    /// The handler's own checks, and that its event types (routing keys) and the names of its queues fit AMQP's
    /// short strings: an emitted event that could never be published would stay in the outbox for good.
    private static func validate(_ handler: HandlerDescriptor, service: String) throws {
        try handler.validate()
        let limit = AMQPLimits.shortStringBytes
        if let long = ([handler.inputType] + handler.emitTypes).first(where: { $0.utf8.count > limit }) {
            throw ConfigurationError(
                "\(handler.name): the event type '\(long)' is \(long.utf8.count) bytes long, and AMQP allows at most "
                    + "\(limit) in a routing key")
        }
        let queues = WireNames.HandlerQueues(service: service, handler: handler.name)
        let names = [queues.main, queues.deadLetter] + handler.retryPolicy.tiers.map(queues.retry(delay:))
        if let long = names.first(where: { $0.utf8.count > limit }) {
            throw ConfigurationError(
                "the queue name '\(long)' is \(long.utf8.count) bytes long, and AMQP allows at most \(limit): shorten "
                    + "the service name '\(service)' or the handler name '\(handler.name)'")
        }
    }

    /// The manifests this runtime appends to the registry.
    public var manifests: [HandlerManifest] {
        (try? Self.manifests(configuration: configuration, handlers: handlers)) ?? []
    }

    static func manifests(configuration: RunnerConfiguration, handlers: [HandlerDescriptor]) throws -> [HandlerManifest]
    {
        for h in handlers { try validate(h, service: configuration.service) }
        return handlers.map { h in
            let q = WireNames.HandlerQueues(service: configuration.service, handler: h.name)
            return HandlerManifest(
                service: configuration.service, handler: h.name, queue: q.main, deadLetterQueue: q.deadLetter,
                retryQueues: h.retryPolicy.tiers.map { q.retry(delay: $0) }, exchange: configuration.exchange,
                consumes: h.inputType, acceptedVersions: h.acceptedVersions.sorted(), emits: h.emitTypes,
                maxAttempts: h.retryPolicy.maxAttempts, host: ProcessInfo.processInfo.hostName,
                pid: ProcessInfo.processInfo.processIdentifier, startedAt: Date())
        }
    }

    public func run() async throws {
        // Retention: prune on start, then every hour while running.
        let pruning = Task { [ledger, retention = configuration.retention, logger] in
            while !Task.isCancelled {
                do {
                    let removed = try await ledger.prune(completedBefore: Date().addingTimeInterval(-retention.seconds))
                    if removed > 0 { logger.debug("pruned completed keys", metadata: ["count": "\(removed)"]) }
                } catch {
                    logger.warning("could not prune the ledger", metadata: ["error": "\(error)"])
                }
                try? await Task.sleep(for: .seconds(3600))
            }
        }
        defer { pruning.cancel() }
        let watching = Task { await watchLedger() }
        defer { watching.cancel() }
        var backoff = configuration.reconnectBackoff.initial
        var conflict: TopologyConflict?
        await withGracefulShutdownHandler {
            while !isShuttingDown {
                do {
                    try await runConnected()
                    backoff = configuration.reconnectBackoff.initial
                } catch is CancellationError {
                    break
                } catch let error as TopologyConflict {
                    conflict = error
                    break
                } catch {
                    if isShuttingDown { break }
                    connectionsLost.increment()
                    // Full jitter: a wait drawn from zero to the backoff, so that services cut off together
                    // do not all come back at the same moment.
                    let wait = max(0.05, Double.random(in: 0...backoff.seconds))
                    let metadata: Logger.Metadata = [
                        "error": "\(error)", "retry.in": "\(String(format: "%.2f s", wait))",
                    ]
                    if error is RegistryStarting {
                        // Services started together: another one declared the stream a moment ago and its
                        // writer is not up yet, so the broker closed this connection on the manifest append.
                        logger.info("the registry stream is still starting; reconnecting", metadata: metadata)
                    } else if error is CannotConnect {
                        // Never connected, or not again yet: the broker is down, not there yet, or refuses the
                        // login (a user can be created after the services start, so this too is retried).
                        logger.warning("cannot connect to the broker; retrying", metadata: metadata)
                    } else if (error as? AMQPError)?.code == .consumerCancelled {
                        // Its queue was deleted (or its node went away): declaring the topology again brings it back.
                        logger.warning(
                            "the broker cancelled a consumer (was its queue deleted?); declaring the queues again",
                            metadata: metadata)
                    } else {
                        logger.warning("broker connection lost; reconnecting", metadata: metadata)
                    }
                    await waitBeforeReconnecting(.seconds(wait))
                    backoff = min(backoff * 2, configuration.reconnectBackoff.maximum)
                }
            }
        } onGracefulShutdown: {
            self.beginShutdown()
        }
        if let conflict { throw conflict }
        if let lost = ledgerLost.withLock({ $0 }) { throw lost }
    }

    /// Asks the ledger every second whether it can still be used; when it cannot, shuts the service down (the
    /// events in flight finish, the others stay in the queue) and leaves the reason for `run()` to throw.
    private func watchLedger() async {
        while !Task.isCancelled {
            do {
                try ledger.verifyUsable()
            } catch {
                let lost = error as? LedgerUnusable ?? LedgerUnusable("\(error)")
                ledgerLost.withLock { $0 = lost }
                logger.error(
                    "the ledger cannot be used any more; finishing the events in flight, then stopping",
                    metadata: ["error": "\(lost)"])
                beginShutdown()
                return
            }
            try? await Task.sleep(for: .seconds(1))
        }
    }

    /// How RabbitMQ 3.10 answers the manifest append to a stream that another client declared a moment ago
    /// and whose writer has not started: 506 RESOURCE_ERROR "Stream not found", or, when the stream exists
    /// but its writer is not known yet, a channel crash in the broker that reaches us as 541 INTERNAL_ERROR
    /// with no text (its log shows `osiris_writer:write(none, ...)`). Either one closes the connection.
    static func isRegistryStarting(_ error: AMQPError) -> Bool {
        switch error.replyCode {
        case AMQPError.ReplyCode.resourceError: return error.message.contains("Stream not found")
        case AMQPError.ReplyCode.internalError: return true
        default: return false
        }
    }

    /// Connecting or logging in to the broker failed.
    struct CannotConnect: Error, CustomStringConvertible {
        var cause: any Error
        var description: String { "\(cause)" }
    }

    /// A queue or exchange exists on the broker with other settings than this service declares (406
    /// PRECONDITION_FAILED): no reconnect can change that, so the service stops and says what to do.
    struct TopologyConflict: Error, CustomStringConvertible {
        var cause: AMQPError
        var deliveryLimit: Int
        var description: String {
            let text = cause.message
            var hint = "start the service with the settings the broker has, or delete what is named (with its messages)"
            if text.contains("'x-delivery-limit'"),
                let current = text.range(of: "current is '").map({ text[$0.upperBound...].prefix { $0 != "'" } })
            {
                hint =
                    "the queue's delivery limit is \(current) and --delivery-limit asks for \(deliveryLimit): give "
                    + "--delivery-limit \(current), or delete the queue to change it (with its messages)"
            } else if text.contains("inequivalent arg 'type' for exchange") {
                hint = "--exchange names an exchange of another type: Choreo's mesh exchange is a topic exchange"
            }
            return "\(cause); \(hint)"
        }
    }

    /// For `--check`: declares again, with this service's settings, the mesh's exchange and each handler's queue
    /// where the broker already has them (the two that carry settings a restart may change: the exchange's type,
    /// the queue's delivery limit), so that a conflict is found before the service runs. Creates nothing.
    package func checkTopology(on connection: AMQPConnection) async throws {
        let channel = try await connection.openChannel()
        defer { Task { await channel.close() } }
        /// Whether the broker has it; a 404 closes the channel, which opens again on its next use.
        func exists(_ probe: () async throws(AMQPError) -> Void) async throws -> Bool {
            do { try await probe() } catch {
                if error.replyCode == AMQPError.ReplyCode.notFound { return false }
                throw error
            }
            return true
        }
        do {
            if try await exists({ () throws(AMQPError) in
                try await channel.declareExchangePassive(configuration.exchange)
            }) {
                try await topology.declareExchange(on: channel)
            }
            for h in handlers {
                let queues = WireNames.HandlerQueues(service: configuration.service, handler: h.name)
                guard
                    try await exists({ () throws(AMQPError) in _ = try await channel.declareQueuePassive(queues.main) })
                else { continue }
                try await topology.declareMainQueue(queues, on: channel)
            }
        } catch let error as AMQPError where error.replyCode == AMQPError.ReplyCode.preconditionFailed {
            throw TopologyConflict(cause: error, deliveryLimit: configuration.deliveryLimit)
        }
    }

    /// The manifest append failed because the registry stream was still starting.
    struct RegistryStarting: Error, CustomStringConvertible {
        var cause: AMQPError
        var description: String { "\(cause)" }
    }

    /// Waits until the runtime consumes (after each reconnect, too). For tests and readiness probes.
    public func waitUntilReady() async {
        await withCheckedContinuation { continuation in
            let isReady = ready.withLock { $0 }
            if isReady { continuation.resume(); return }
            readiness.withLock { $0.append(continuation) }
        }
    }

    /// Stops consuming and lets in-flight work finish; `run()` then returns.
    public func beginShutdown() {
        shuttingDown.withLock { $0 = true }
        backoffWait.withLock { $0?.cancel() }
        let current = consumers.withLock { $0 }
        let open = connections.withLock { $0 }
        let consuming = ready.withLock { $0 }
        Task { [bound = configuration.shutdownTimeout] in
            for c in current { try? await c.cancel() }
            // What waits on the broker for as long as a resource alarm lasts (a start-up's publishes, confirms of
            // in-flight work) is cut off: a start-up at once, in-flight work after the drain's bound. Closing the
            // connections fails those waits; the broker requeues what was not acked, and the ledger keeps what
            // was committed, for the next start to publish.
            if consuming { try? await Task.sleep(for: bound + .seconds(1)) }
            for c in open where c.isOpen { await c.close() }
        }
    }

    private var isShuttingDown: Bool { shuttingDown.withLock { $0 } }

    /// What this service declares on the broker, with its settings.
    private var topology: Topology {
        Topology(exchange: configuration.exchange, deliveryLimit: configuration.deliveryLimit)
    }

    /// The wait between reconnects, which a shutdown ends at once: with the backoff at its 30 s maximum, a
    /// SIGTERM would otherwise wait for it, past an orchestrator's grace period.
    private func waitBeforeReconnecting(_ duration: Duration) async {
        let wait = Task { _ = try? await Task.sleep(for: duration) }
        backoffWait.withLock { $0 = wait }
        // Stored before the flag is read: a shutdown that began meanwhile either finds the task or is seen here.
        if isShuttingDown { wait.cancel() }
        await wait.value
        backoffWait.withLock { $0 = nil }
    }

    private func runConnected() async throws {
        // Every invocation of an earlier connection has ended by now (the task groups below wait for them),
        // so with a single-process ledger any lease still held belongs to a dead incarnation: void it.
        if ledger.isExclusiveToOneProcess {
            for h in handlers { try await ledger.releaseAllLeases(handler: h.name) }
        }
        var amqp = try AMQPConfiguration(url: configuration.url)
        amqp.connectionName = "\(configuration.service) consumer"
        let consumerConnection: AMQPConnection
        do { consumerConnection = try await AMQPConnection.connect(to: amqp, logger: logger) } catch {
            throw CannotConnect(cause: error)
        }
        amqp.connectionName = "\(configuration.service) publisher"
        let publisherConnection: AMQPConnection
        do { publisherConnection = try await AMQPConnection.connect(to: amqp, logger: logger) } catch {
            await consumerConnection.close()
            throw CannotConnect(cause: error)
        }
        // The connection logs the block and its reason; the meter lets an alert see it.
        publisherConnection.onBlockedChange { [publishingBlocked] reason in
            publishingBlocked.set(reason == nil ? 0 : 1)
        }
        // Stored before the flag is read: a shutdown that began meanwhile either finds them or is seen here.
        connections.withLock { $0 = [consumerConnection, publisherConnection] }
        defer {
            connections.withLock { $0 = [] }
            ready.withLock { $0 = false }
            publishingBlocked.set(0)
            Task {
                await consumerConnection.close()
                await publisherConnection.close()
            }
        }
        if isShuttingDown { throw CancellationError() }
        let publisher = try await publisherConnection.openChannel()
        try await publisher.enableConfirms()
        do {
            for h in handlers {
                try await topology.declare(
                    h, queues: .init(service: configuration.service, handler: h.name), on: publisher)
            }
            try await Topology.declareRegistry(on: publisher)
        } catch let error as AMQPError where error.replyCode == AMQPError.ReplyCode.preconditionFailed {
            throw TopologyConflict(cause: error, deliveryLimit: configuration.deliveryLimit)
        }
        do {
            try await appendManifests(publisher)
        } catch let error as AMQPError where Self.isRegistryStarting(error) {
            throw RegistryStarting(cause: error)
        }
        for h in handlers { try await publishLeftoverOutbox(of: h, on: publisher) }

        let owner =
            "\(ProcessInfo.processInfo.hostName)/\(ProcessInfo.processInfo.processIdentifier)/\(UUID().uuidString.prefix(8))"
        let leases = LeaseKeeper()
        var started: [(HandlerRunner, AMQPConsumer, Int)] = []
        for h in handlers {
            let queues = WireNames.HandlerQueues(service: configuration.service, handler: h.name)
            let channel = try await consumerConnection.openChannel()
            let concurrency = h.concurrency ?? configuration.concurrency
            let prefetch = max(configuration.resolvedPrefetch, concurrency)
            try await channel.setPrefetch(UInt16(clamping: prefetch))
            try await channel.holdAcks(
                for: configuration.ackDelay, upTo: RunnerConfiguration.heldAcks(prefetch: prefetch))
            let consumer = try await channel.consume(queue: queues.main)
            let runner = HandlerRunner(
                service: configuration.service, handler: h, queues: queues, exchange: configuration.exchange,
                topology: topology, ledger: ledger, publisher: publisher, owner: owner,
                leaseDuration: configuration.leaseDuration, maxBodyBytes: configuration.maxBodyBytes,
                leases: leases, logger: Self.logger(logger, handler: h.name), metrics: metrics[h.name]!,
                tracing: tracing)
            started.append((runner, consumer, concurrency))
        }
        consumers.withLock { $0 = started.map(\.1) }
        if isShuttingDown { for (_, c, _) in started { try? await c.cancel() } }
        ready.withLock { $0 = true }
        for waiter in readiness.withLock({ w -> [CheckedContinuation<Void, Never>] in
            defer { w = [] }; return w
        }) { waiter.resume() }
        logger.info(
            "consuming", metadata: ["service": "\(configuration.service)", "handlers": "\(handlers.map(\.name))"])

        let keeper = Task { [ledger, logger, metrics, lease = configuration.leaseDuration] in
            await leases.run(ledger: ledger, lease: lease, metrics: metrics, logger: logger)
        }
        defer { keeper.cancel() }
        let bindings = Task { await keepBindings(on: consumerConnection) }
        defer { bindings.cancel() }
        // A lone delivery is handled on the consumer connection's thread, which read it, and its confirm
        // recorded and acknowledged on the publisher connection's thread, which read that (see
        // `ConnectionExecutor`): no thread wake-up between the socket and the handler, nor for the record.
        let executor = consumerConnection.executor.including(publisherConnection)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (runner, consumer, concurrency) in started {
                group.addTask(executorPreference: executor) {
                    try await self.consume(consumer, with: runner, concurrency: concurrency)
                }
            }
            // Either connection ending ends this incarnation; the loop in run() reconnects.
            group.addTask {
                let reason = await publisherConnection.closed()
                if !self.isShuttingDown { throw reason }
            }
            group.addTask {
                let reason = await consumerConnection.closed()
                if !self.isShuttingDown { throw reason }
            }
            // Consumers end on shutdown (cancel, then in-flight work drained) or on connection loss (throw).
            // Closing the connections then also ends the two watchers above.
            do {
                for _ in started { try await group.next() }
            } catch {
                await consumerConnection.close()
                await publisherConnection.close()
                throw error
            }
            await consumerConnection.close()
            await publisherConnection.close()
            if !isShuttingDown {
                throw ConfigurationError("the broker cancelled the consumers (were the queues deleted?)")
            }
        }
    }

    /// How often a running service checks that the mesh's exchange exists and binds its queues to it again.
    static let bindingCheckInterval = Duration.seconds(10)

    /// Every ``bindingCheckInterval``, declares the mesh's exchange again if it is gone, and binds each handler's
    /// queue to it again (idempotent). Deleting the exchange deletes every binding to it, and nothing tells a
    /// consumer: a service whose connections never broke would otherwise wait, for good, for events the broker
    /// no longer routes to it. On the consumer connection, which a resource alarm never blocks.
    private func keepBindings(on connection: AMQPConnection) async {
        var channel: AMQPChannel?
        while !Task.isCancelled {
            try? await Task.sleep(for: Self.bindingCheckInterval)
            if Task.isCancelled || isShuttingDown { break }
            do throws(AMQPError) {
                let c: AMQPChannel
                if let channel { c = channel } else { c = try await connection.openChannel() }
                channel = c
                do throws(AMQPError) {
                    try await c.declareExchangePassive(configuration.exchange)
                } catch {
                    // A 404 closes the channel; its next use opens it again.
                    guard error.replyCode == AMQPError.ReplyCode.notFound else { throw error }
                    logger.warning(
                        "the exchange '\(configuration.exchange)' was missing (deleted while the service runs?); declaring it and this service's bindings again"
                    )
                    try await topology.declareExchange(on: c)
                }
                for h in handlers {
                    try await topology.bind(h, queues: .init(service: configuration.service, handler: h.name), on: c)
                }
            } catch {
                logger.debug("could not check the bindings", metadata: ["error": "\(error)"])
            }
        }
        await channel?.close()
    }

    private static func logger(_ base: Logger, handler: String) -> Logger {
        var logger = base
        logger[metadataKey: "handler"] = "\(handler)"
        return logger
    }

    private func consume(_ consumer: AMQPConsumer, with runner: HandlerRunner, concurrency: Int) async throws {
        try await runner.consume(
            consumer, concurrency: concurrency, drainTimeout: configuration.shutdownTimeout,
            shouldStop: { self.isShuttingDown })
    }

    /// Publishes outbox entries that an earlier run committed and may not have published, or published
    /// without recording it (a crash between the publish and the record, or a record that failed, after
    /// which the delivery was acked): downstream ledgers drop the copies by id. Runs before consuming,
    /// when no invocation of this process is in flight.
    private func publishLeftoverOutbox(of h: HandlerDescriptor, on channel: AMQPChannel) async throws {
        var total = 0
        while true {
            let pending = try await ledger.unpublished(handler: h.name, limit: 500)
            if pending.isEmpty { break }
            let messages = pending.flatMap { $0.messages.map(EnvelopeCodec.encode) }
            for result in await channel.publish(contentsOf: messages) { try result.get() }
            try await ledger.markPublished(
                pending.map { PublishedEntries(handler: h.name, key: $0.key, indexes: $0.messages.map(\.index)) })
            total += messages.count
        }
        if total > 0 {
            logger.info(
                "published outbox entries left unrecorded by an earlier run",
                metadata: ["handler": "\(h.name)", "count": "\(total)"])
        }
    }

    private func appendManifests(_ channel: AMQPChannel) async throws {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys]
        let messages = try manifests.map { m in
            AMQPOutgoingMessage(
                exchange: "", routingKey: WireNames.registryStream, body: try encoder.encode(m),
                properties: AMQPProperties(
                    contentType: "application/json",
                    headers: [
                        "choreo-manifest-service": .string(m.service), "choreo-manifest-handler": .string(m.handler),
                    ], deliveryMode: 2, timestamp: UInt64(Date().timeIntervalSince1970), type: "choreo.manifest"))
        }
        for result in await channel.publish(contentsOf: messages) { try result.get() }
    }
}
