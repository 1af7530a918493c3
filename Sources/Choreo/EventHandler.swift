import Foundation
import Logging

/// A handler: consumes one event type, may emit others. Runs as part of a service executable.
///
/// ```swift
/// struct ReserveStock: EventHandler {
///     let name = "reserve-stock"
///     var emits: [any Event.Type] { [StockReserved.self, StockRejected.self] }
///     func handle(_ order: OrderPlaced, context: HandlerContext) async throws {
///         try context.emit(StockReserved(orderID: order.orderID))
///     }
/// }
/// ```
///
/// Errors thrown from ``handle(_:context:)`` are retried per ``retryPolicy``; wrap one in
/// ``NonRetryable`` to dead-letter at once.
public protocol EventHandler: Sendable {
    associatedtype Input: Event

    /// Stable name, part of the queue names and ledger keys: lowercase letters, digits and dashes.
    var name: String { get }
    /// Schema versions of `Input` this handler accepts (after ``upcast(_:from:)``). Default: the current one.
    var acceptedVersions: Set<Int> { get }
    /// Event types this handler may emit; emitting another is an error. Used for the manifest and the flow graph.
    var emits: [any Event.Type] { get }
    var retryPolicy: RetryPolicy { get }
    /// Concurrent invocations of this handler; `nil` takes the service's `--concurrency`.
    var concurrency: Int? { get }
    /// The idempotency key of an event; `nil` falls back to the event's `idempotencykey`, then its id.
    func idempotencyKey(for event: Input, envelope: EventEnvelope) -> String?
    /// Turns `data` of an older schema version into the current one. Default: unsupported.
    func upcast(_ data: Data, from version: Int) throws -> Data
    func handle(_ event: Input, context: HandlerContext) async throws
}

extension EventHandler {
    public var acceptedVersions: Set<Int> { [Input.schemaVersion] }
    public var emits: [any Event.Type] { [] }
    public var retryPolicy: RetryPolicy { RetryPolicy() }
    public var concurrency: Int? { nil }
    public func idempotencyKey(for event: Input, envelope: EventEnvelope) -> String? { nil }
    public func upcast(_ data: Data, from version: Int) throws -> Data {
        throw NonRetryable(UnsupportedVersion(type: Input.eventType, version: version, accepted: acceptedVersions))
    }
}

/// How often and how late a failing event is tried again.
public struct RetryPolicy: Sendable, Hashable {
    /// Attempts in all, the first included. 1 means no retries.
    public var maxAttempts: Int
    /// Delay before retry n is `delays[min(n-1, delays.count-1)]`; each distinct delay is a retry queue.
    public var delays: [Duration]

    public init(maxAttempts: Int = 4, delays: [Duration] = [.seconds(1), .seconds(10), .seconds(60)]) {
        self.maxAttempts = maxAttempts
        self.delays = delays
    }

    public static let none = RetryPolicy(maxAttempts: 1, delays: [])

    /// The delay before the attempt after `failedAttempt`, or `nil` when attempts are exhausted.
    public func delay(afterAttempt failedAttempt: Int) -> Duration? {
        guard failedAttempt < maxAttempts, !delays.isEmpty else { return nil }
        return delays[min(failedAttempt - 1, delays.count - 1)]
    }

    /// The distinct delay tiers, each backed by one TTL queue.
    public var tiers: [Duration] {
        var seen: [Duration] = []
        for d in delays where !seen.contains(d) { seen.append(d) }
        return seen
    }

    func validate(handler: String) throws {
        guard maxAttempts >= 1 else { throw ConfigurationError("handler \(handler): maxAttempts must be at least 1") }
        guard maxAttempts == 1 || !delays.isEmpty else {
            throw ConfigurationError("handler \(handler): retries need at least one delay")
        }
        guard delays.allSatisfy({ $0 >= .milliseconds(1) }) else {
            throw ConfigurationError("handler \(handler): delays must be at least 1 ms")
        }
    }
}

/// Wrap an error to dead-letter the event at once instead of retrying it.
public struct NonRetryable: Error, CustomStringConvertible {
    public let underlying: any Error
    public init(_ underlying: any Error) { self.underlying = underlying }
    public var description: String { String(describing: underlying) }
}

/// An event's schema version that the handler does not accept and cannot upcast.
public struct UnsupportedVersion: Error, CustomStringConvertible {
    public var type: String
    public var version: Int
    public var accepted: Set<Int>
    public init(type: String, version: Int, accepted: Set<Int>) {
        self.type = type
        self.version = version
        self.accepted = accepted
    }
    public var description: String {
        "unsupported version \(version) of '\(type)' (this handler accepts \(accepted.sorted().map(String.init).joined(separator: ", ")))"
    }
}

/// A setting that makes no sense, found before anything starts.
public struct ConfigurationError: Error, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
