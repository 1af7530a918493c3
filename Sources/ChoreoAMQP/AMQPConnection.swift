import Foundation
import Logging
import Synchronization

/// A connection to a RabbitMQ broker, served by one dedicated thread.
///
/// That thread reads the socket and serves requests; no blocking rabbitmq-c call runs on Swift's
/// cooperative pool. A publish that finds the thread asleep with nothing queued is written by the
/// publishing task itself, under the same lock (see `IOLoop`). This type and its channels are `Sendable`
/// and may be used from any number of tasks at once. The thread keeps heartbeats flowing however long
/// application code takes between calls.
///
/// A connection-level failure (socket lost, heartbeat timeout, 320 CONNECTION_FORCED) ends the
/// connection: pending operations and consumers fail with the error, and ``closed()`` returns it.
/// Reconnecting is the caller's choice (the Choreo runtime does it with backoff).
///
/// ```swift
/// let connection = try await AMQPConnection.connect(to: try AMQPConfiguration(url: "amqp://127.0.0.1"))
/// let channel = try await connection.openChannel()
/// try await channel.enableConfirms()
/// try await channel.publish(AMQPOutgoingMessage(exchange: "", routingKey: "orders", body: Data("hi".utf8)))
/// await connection.close()
/// ```
public final class AMQPConnection: Sendable {
    public let configuration: AMQPConfiguration
    let loop: IOLoop
    /// Runs tasks woken by this connection on its I/O thread when that thread is otherwise idle
    /// (see ``ConnectionExecutor``); for consumers that answer each delivery quickly.
    public let executor: ConnectionExecutor
    let logger: Logger
    private let ending = Mutex<(reason: AMQPError?, waiters: [CheckedContinuation<AMQPError, Never>])>((nil, []))
    private let blocking = Mutex<(reason: String?, handlers: [@Sendable (String?) -> Void])>((nil, []))

    private init(configuration: AMQPConfiguration, loop: IOLoop, logger: Logger) {
        self.configuration = configuration
        self.loop = loop
        self.logger = logger
        executor = ConnectionExecutor(loops: [loop])
    }

    deinit {
        loop.submit { core in core.close() }
    }

    /// Connects and logs in, within ``AMQPConfiguration/connectTimeout``.
    ///
    /// - Throws: ``AMQPError`` with code `connectionFailed` ("cannot connect: connection refused"),
    ///   `authenticationFailed`, `connectionClosed` (unknown vhost) or `invalidArgument`.
    public static func connect(
        to configuration: AMQPConfiguration,
        logger: Logger = Logger(label: "choreo.amqp", factory: { _ in SwiftLogNoOpLogHandler() })
    ) async throws(AMQPError) -> AMQPConnection {
        try configuration.validate()
        let loop = try IOLoop()
        let connection = AMQPConnection(configuration: configuration, loop: loop, logger: logger)
        let core = ThreadBox(ConnectionCore(configuration: configuration, logger: logger, loop: loop))
        core.value.onClose = { [weak connection] reason in connection?.ended(reason) }
        core.value.onBlocked = { [weak connection] reason in connection?.blockChanged(reason) }
        let result: Result<Void, AMQPError> = await withCheckedContinuation { continuation in
            let thread = Thread {
                do throws(AMQPError) {
                    try core.value.connect()
                    continuation.resume(returning: .success(()))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
                core.value.run()
            }
            thread.name = "choreo-amqp \(configuration.address)"
            thread.stackSize = 1 << 20
            thread.start()
        }
        try result.get()
        return connection
    }

    /// Opens a new channel.
    public func openChannel() async throws(AMQPError) -> AMQPChannel {
        let status = ChannelStatus()
        let id = try await loop.perform { core throws(AMQPError) in try core.openChannel(status: status) }
        return AMQPChannel(number: id, connection: self, status: status)
    }

    /// Closes the connection cleanly (connection.close); pending operations fail with ``AMQPError/Code/closed``.
    public func close() async {
        _ = try? await loop.perform { core in core.close() }
        _ = await closed()
    }

    /// Waits until the connection has ended and returns why (``AMQPError/Code/closed`` after ``close()``).
    public func closed() async -> AMQPError {
        await withCheckedContinuation { continuation in
            let reason = ending.withLock { state -> AMQPError? in
                if let reason = state.reason { return reason }
                state.waiters.append(continuation)
                return nil
            }
            if let reason { continuation.resume(returning: reason) }
        }
    }

    /// True until the connection has ended.
    public var isOpen: Bool { ending.withLock { $0.reason == nil } }

    /// While the broker blocks publishing on this connection (a resource alarm: RabbitMQ stops reading from a
    /// publishing connection when its disk or memory runs low), the reason it gave, such as "low on disk";
    /// nil otherwise. Publishes and their confirms wait meanwhile; nothing fails.
    public var blockedReason: String? { blocking.withLock { $0.reason } }

    /// Calls `handler` each time the broker blocks publishing on this connection (with its reason) and lifts the
    /// block (nil), on the connection's thread: it must return quickly. Called at once if blocked already.
    public func onBlockedChange(_ handler: @escaping @Sendable (_ reason: String?) -> Void) {
        let current = blocking.withLock { state -> String? in
            state.handlers.append(handler)
            return state.reason
        }
        if let current { handler(current) }
    }

    private func blockChanged(_ reason: String?) {
        let handlers = blocking.withLock { state in
            state.reason = reason
            return state.handlers
        }
        for handler in handlers { handler(reason) }
    }

    private func ended(_ reason: AMQPError) {
        let waiters = ending.withLock { state -> [CheckedContinuation<AMQPError, Never>] in
            state.reason = state.reason ?? reason
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume(returning: reason) }
    }
}

/// Carries a value that is confined to one thread across the hop that starts that thread.
final class ThreadBox<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

/// A channel's generation and openness, readable from any thread; written by the I/O thread.
final class ChannelStatus: Sendable {
    private let state = Mutex<(generation: UInt64, open: Bool)>((0, false))

    func opened(generation: UInt64) { state.withLock { $0 = (generation, true) } }
    func closed() { state.withLock { $0.open = false } }
    func isCurrent(_ generation: UInt64) -> Bool { state.withLock { $0.open && $0.generation == generation } }
    var isOpen: Bool { state.withLock { $0.open } }
}
