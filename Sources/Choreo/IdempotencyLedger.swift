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
}
