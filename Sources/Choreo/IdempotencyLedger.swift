import Foundation

/// An output event recorded in the ledger's outbox, published after the commit.
public struct OutboxMessage: Sendable, Hashable {
    /// Position among the handler invocation's emits (0, 1, ...).
    public var index: Int
    public var envelope: EventEnvelope
    public var exchange: String
    public var routingKey: String

    public init(index: Int, envelope: EventEnvelope, exchange: String, routingKey: String) {
        self.index = index
        self.envelope = envelope
        self.exchange = exchange
        self.routingKey = routingKey
    }
}

/// What claiming an idempotency key found.
public enum LedgerClaim: Sendable, Hashable {
    /// This owner now holds the key's lease: run the handler. `attempts` counts claims so far, this one included.
    case claimed(attempts: Int)
    /// The key was completed before: publish the outbox entries not yet published, then ack.
    case completed(unpublished: [OutboxMessage])
    /// Another owner holds a live lease until the given time.
    case heldElsewhere(until: Date)
}

/// What completing a claimed key did.
public enum LedgerCompletion: Sendable, Hashable {
    /// Committed: the key is completed and the outbox recorded, atomically.
    case committed
    /// The key had been completed by another owner meanwhile; nothing was written.
    case alreadyCompleted(unpublished: [OutboxMessage])
    /// The lease passed to another owner (it expired); nothing was written.
    case leaseLost
}

/// One key to claim in ``IdempotencyLedger/claim(_:lease:)``.
public struct ClaimRequest: Sendable, Hashable {
    public var handler: String
    public var key: String
    public var owner: String

    public init(handler: String, key: String, owner: String) {
        self.handler = handler
        self.key = key
        self.owner = owner
    }
}

/// One claimed key to complete in ``IdempotencyLedger/complete(_:)``, with the outbox of its invocation.
public struct CompletionRequest: Sendable, Hashable {
    public var handler: String
    public var key: String
    public var owner: String
    public var outbox: [OutboxMessage]

    public init(handler: String, key: String, owner: String, outbox: [OutboxMessage]) {
        self.handler = handler
        self.key = key
        self.owner = owner
        self.outbox = outbox
    }
}

/// Outbox entries of one key that the broker confirmed, for ``IdempotencyLedger/markPublished(_:)``.
public struct PublishedEntries: Sendable, Hashable {
    public var handler: String
    public var key: String
    public var indexes: [Int]

    public init(handler: String, key: String, indexes: [Int]) {
        self.handler = handler
        self.key = key
        self.indexes = indexes
    }
}

/// A completed key's outbox entries not recorded as published, from ``IdempotencyLedger/unpublished(handler:limit:)``.
public struct PendingOutbox: Sendable, Hashable {
    public var key: String
    public var messages: [OutboxMessage]

    public init(key: String, messages: [OutboxMessage]) {
        self.key = key
        self.messages = messages
    }
}

/// The store that turns at-least-once delivery into exactly-once effects.
///
/// Keys are scoped by handler. Implementations must make ``complete(handler:key:owner:outbox:)``
/// atomic: the key becomes completed and the outbox is recorded together, or neither happens.
/// ``SQLiteLedger`` is the embedded default for one replica per handler.
public protocol IdempotencyLedger: Sendable {
    func claim(handler: String, key: String, owner: String, lease: Duration) async throws -> LedgerClaim
    /// Extends a held lease; returns false when the lease is no longer this owner's.
    func renew(handler: String, key: String, owner: String, lease: Duration) async throws -> Bool
    func complete(handler: String, key: String, owner: String, outbox: [OutboxMessage]) async throws -> LedgerCompletion
    /// Records that the broker confirmed these outbox entries.
    func markPublished(handler: String, key: String, indexes: [Int]) async throws
    /// Gives a lease back after a failed attempt so that a retry can claim the key.
    func release(handler: String, key: String, owner: String) async throws
    /// Drops every lease of the handler not completed: for a single replica starting up, whose earlier
    /// incarnation died holding them (their deliveries are redelivered).
    func releaseAllLeases(handler: String) async throws
    /// True when only one process uses this ledger (SQLite): the runtime then voids leases left by an
    /// earlier incarnation or connection instead of waiting for them to expire.
    var isExclusiveToOneProcess: Bool { get }
    /// Deletes completed keys whose outbox is fully published and that completed before `date`.
    func prune(completedBefore date: Date) async throws -> Int
    /// Checks that the store is reachable and writable.
    func check() async throws
    /// Completed keys of the handler with outbox entries not recorded as published, at most `limit` keys:
    /// the runner publishes them again at start (their record may have been lost: a crash after the publish).
    func unpublished(handler: String, limit: Int) async throws -> [PendingOutbox]

    /// Claims several keys, in order, as one write where the store can: the runner claims every
    /// delivery that arrived together at once. The results are in the order of `requests`; a key that
    /// appears twice is claimed by the first request and found held by the second.
    func claim(_ requests: [ClaimRequest], lease: Duration) async throws -> [LedgerClaim]
    /// Completes several keys as one write where the store can; each one atomically with its outbox,
    /// exactly as ``complete(handler:key:owner:outbox:)``. Results in the order of `requests`.
    func complete(_ requests: [CompletionRequest]) async throws -> [LedgerCompletion]
    /// Records several keys' confirmed outbox entries as one write where the store can.
    func markPublished(_ entries: [PublishedEntries]) async throws

    /// Throws ``LedgerUnusable`` once the store can no longer keep what it promised to this process, such
    /// as a SQLite file deleted or replaced while in use; the runtime asks every second and stops the
    /// service when it throws. Must be cheap and must not wait on the store (no query, no round trip).
    func verifyUsable() throws
}

/// The ledger cannot serve this process any more (its file was deleted or replaced while in use): no retry
/// brings it back, so the runtime stops taking events, finishes those in flight and stops the service with
/// this reason, instead of running on without the completed keys.
public struct LedgerUnusable: Error, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

extension IdempotencyLedger {
    /// One call per key; stores that can batch writes override it.
    public func claim(_ requests: [ClaimRequest], lease: Duration) async throws -> [LedgerClaim] {
        var results: [LedgerClaim] = []
        results.reserveCapacity(requests.count)
        for r in requests {
            results.append(try await claim(handler: r.handler, key: r.key, owner: r.owner, lease: lease))
        }
        return results
    }

    /// One call per key; stores that can batch writes override it.
    public func complete(_ requests: [CompletionRequest]) async throws -> [LedgerCompletion] {
        var results: [LedgerCompletion] = []
        results.reserveCapacity(requests.count)
        for r in requests {
            results.append(try await complete(handler: r.handler, key: r.key, owner: r.owner, outbox: r.outbox))
        }
        return results
    }

    /// Nothing to check: a store that can become unusable for good overrides it.
    public func verifyUsable() throws {}

    /// One call per key; stores that can batch writes override it.
    public func markPublished(_ entries: [PublishedEntries]) async throws {
        for e in entries where !e.indexes.isEmpty {
            try await markPublished(handler: e.handler, key: e.key, indexes: e.indexes)
        }
    }
}
