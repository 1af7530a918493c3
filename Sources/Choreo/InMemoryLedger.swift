import Foundation
import Synchronization

/// An idempotency ledger in memory: for unit tests and the in-memory test harness.
///
/// Same semantics as ``SQLiteLedger``; nothing survives the process.
public final class InMemoryLedger: IdempotencyLedger {
    private struct Entry {
        var completed = false
        var owner: String?
        var leaseExpires: Date?
        var attempts = 0
        var completedAt: Date?
        var outbox: [OutboxMessage] = []
        var published: Set<Int> = []

        var unpublished: [OutboxMessage] { outbox.filter { !published.contains($0.index) } }
    }

    private let entries = Mutex<[String: Entry]>([:])
    /// The clock leases are measured with; the test harness passes its virtual clock.
    private let now: @Sendable () -> Date

    public init(now: @escaping @Sendable () -> Date = { Date() }) {
        self.now = now
    }

    private func id(_ handler: String, _ key: String) -> String { "\(handler)\u{0}\(key)" }

    public func claim(handler: String, key: String, owner: String, lease: Duration) async throws -> LedgerClaim {
        let t = now()
        return entries.withLock { entries in
            var e = entries[id(handler, key)] ?? Entry()
            if e.completed { return .completed(unpublished: e.unpublished) }
            if let holder = e.owner, holder != owner, let until = e.leaseExpires, until > t {
                return .heldElsewhere(until: until)
            }
            e.owner = owner
            e.leaseExpires = t.addingTimeInterval(lease.seconds)
            e.attempts += 1
            entries[id(handler, key)] = e
            return .claimed(attempts: e.attempts)
        }
    }

    public func renew(handler: String, key: String, owner: String, lease: Duration) async throws -> Bool {
        let t = now()
        return entries.withLock { entries in
            guard var e = entries[id(handler, key)], !e.completed, e.owner == owner else { return false }
            e.leaseExpires = t.addingTimeInterval(lease.seconds)
            entries[id(handler, key)] = e
            return true
        }
    }

    public func complete(handler: String, key: String, owner: String, outbox: [OutboxMessage]) async throws
        -> LedgerCompletion
    {
        let t = now()
        return entries.withLock { entries in
            guard var e = entries[id(handler, key)] else { return .leaseLost }
            if e.completed {
                return .alreadyCompleted(unpublished: e.unpublished)
            }
            guard e.owner == owner else { return .leaseLost }
            e.completed = true
            e.owner = nil
            e.leaseExpires = nil
            e.completedAt = t
            e.outbox = outbox
            entries[id(handler, key)] = e
            return .committed
        }
    }

    public func markPublished(handler: String, key: String, indexes: [Int]) async throws {
        entries.withLock { entries in entries[id(handler, key)]?.published.formUnion(indexes) }
    }

    public func release(handler: String, key: String, owner: String) async throws {
        entries.withLock { entries in
            guard var e = entries[id(handler, key)], !e.completed, e.owner == owner else { return }
            e.owner = nil
            e.leaseExpires = nil
            entries[id(handler, key)] = e
        }
    }

    public func releaseAllLeases(handler: String) async throws {
        let prefix = "\(handler)\u{0}"
        entries.withLock { entries in
            for k in entries.keys where k.hasPrefix(prefix) && entries[k]?.completed == false {
                entries[k]?.owner = nil
                entries[k]?.leaseExpires = nil
            }
        }
    }

    public var isExclusiveToOneProcess: Bool { true }

    public func prune(completedBefore date: Date) async throws -> Int {
        entries.withLock { entries in
            let old = entries.filter {
                $0.value.completed && ($0.value.completedAt ?? date) < date
                    && $0.value.published.count == $0.value.outbox.count
            }
            for k in old.keys { entries[k] = nil }
            return old.count
        }
    }

    public func check() async throws {}

    public func unpublished(handler: String, limit: Int) async throws -> [PendingOutbox] {
        let prefix = "\(handler)\u{0}"
        return entries.withLock { entries in
            entries.filter { $0.key.hasPrefix(prefix) && $0.value.completed }
                .sorted { $0.key < $1.key }
                .compactMap { id, e -> PendingOutbox? in
                    let pending = e.unpublished
                    return pending.isEmpty
                        ? nil : PendingOutbox(key: String(id.dropFirst(prefix.count)), messages: pending)
                }
                .prefix(limit).map { $0 }
        }
    }

    /// How many times a key was claimed (handler invocations started), or 0.
    public func claims(handler: String, key: String) -> Int {
        entries.withLock { $0[id(handler, key)]?.attempts ?? 0 }
    }
}
