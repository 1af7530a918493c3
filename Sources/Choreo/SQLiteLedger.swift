import Foundation
import GRDB
import Synchronization

/// The embedded ledger: one SQLite file in WAL mode, for a handler that runs as a single replica.
///
/// Thread-safe; all writes go through GRDB's serialized writer. Several handlers of one service may
/// share a file (keys are scoped by handler). Retention: ``prune(completedBefore:)``, which the
/// runner calls on start and hourly with its retention setting.
///
/// ```swift
/// let ledger = try SQLiteLedger(path: "/var/lib/inventory/ledger.sqlite")
/// ```
public final class SQLiteLedger: IdempotencyLedger {
    private let pool: DatabasePool
    private let writes: GroupCommit
    public let path: String

    /// Opens (creating if needed) the ledger file and migrates its schema.
    public init(path: String) throws {
        self.path = path
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        var config = Configuration()
        config.busyMode = .timeout(10)
        config.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = NORMAL")
        }
        pool = try DatabasePool(path: path, configuration: config)
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.execute(
                sql: """
                    CREATE TABLE claim (
                        handler TEXT NOT NULL,
                        key TEXT NOT NULL,
                        state TEXT NOT NULL CHECK (state IN ('claimed', 'completed')),
                        owner TEXT,
                        lease_expires REAL,
                        attempts INTEGER NOT NULL DEFAULT 0,
                        completed_at REAL,
                        PRIMARY KEY (handler, key)
                    ) WITHOUT ROWID;
                    CREATE INDEX claim_completed_at ON claim(completed_at) WHERE state = 'completed';
                    CREATE TABLE outbox (
                        handler TEXT NOT NULL,
                        key TEXT NOT NULL,
                        idx INTEGER NOT NULL,
                        exchange TEXT NOT NULL,
                        routing_key TEXT NOT NULL,
                        attributes TEXT NOT NULL,
                        data BLOB NOT NULL,
                        published INTEGER NOT NULL DEFAULT 0,
                        PRIMARY KEY (handler, key, idx)
                    ) WITHOUT ROWID;
                    """)
        }
        try migrator.migrate(pool)
        writes = GroupCommit(pool: pool)
    }

    public func claim(handler: String, key: String, owner: String, lease: Duration) async throws -> LedgerClaim {
        try await claim([ClaimRequest(handler: handler, key: key, owner: owner)], lease: lease)[0]
    }

    public func claim(_ requests: [ClaimRequest], lease: Duration) async throws -> [LedgerClaim] {
        let now = Date().timeIntervalSince1970
        let expires = now + lease.seconds
        return try await writes.run { db in
            try requests.map { try Self.claim($0, now: now, expires: expires, db) }
        }
    }

    private static func claim(_ r: ClaimRequest, now: Double, expires: Double, _ db: Database) throws -> LedgerClaim {
        let row = try Row.fetchOne(
            db.cachedStatement(
                sql: "SELECT state, owner, lease_expires, attempts FROM claim WHERE handler = ? AND key = ?"),
            arguments: [r.handler, r.key])
        guard let row else {
            try db.cachedStatement(
                sql:
                    "INSERT INTO claim (handler, key, state, owner, lease_expires, attempts) VALUES (?, ?, 'claimed', ?, ?, 1)"
            ).execute(arguments: [r.handler, r.key, r.owner, expires])
            return .claimed(attempts: 1)
        }
        let state: String = row["state"]
        if state == "completed" {
            return .completed(unpublished: try outbox(db, handler: r.handler, key: r.key, unpublishedOnly: true))
        }
        let holder: String? = row["owner"]
        let until: Double = row["lease_expires"] ?? 0
        if let holder, holder != r.owner, until > now {
            return .heldElsewhere(until: Date(timeIntervalSince1970: until))
        }
        let attempts: Int = (row["attempts"] ?? 0) + 1
        try db.cachedStatement(
            sql: "UPDATE claim SET owner = ?, lease_expires = ?, attempts = ? WHERE handler = ? AND key = ?"
        ).execute(arguments: [r.owner, expires, attempts, r.handler, r.key])
        return .claimed(attempts: attempts)
    }

    public func renew(handler: String, key: String, owner: String, lease: Duration) async throws -> Bool {
        let expires = Date().timeIntervalSince1970 + lease.seconds
        return try await writes.run { db in
            try db.cachedStatement(
                sql:
                    "UPDATE claim SET lease_expires = ? WHERE handler = ? AND key = ? AND owner = ? AND state = 'claimed'"
            ).execute(arguments: [expires, handler, key, owner])
            return db.changesCount == 1
        }
    }

    public func complete(handler: String, key: String, owner: String, outbox: [OutboxMessage]) async throws
        -> LedgerCompletion
    {
        try await complete([CompletionRequest(handler: handler, key: key, owner: owner, outbox: outbox)])[0]
    }

    public func complete(_ requests: [CompletionRequest]) async throws -> [LedgerCompletion] {
        let now = Date().timeIntervalSince1970
        let encoded = try requests.map { r in try r.outbox.map { try Self.encodeAttributes($0.envelope) } }
        return try await writes.run { db in
            try zip(requests, encoded).map { try Self.complete($0, attributes: $1, now: now, db) }
        }
    }

    private static func complete(_ r: CompletionRequest, attributes: [String], now: Double, _ db: Database) throws
        -> LedgerCompletion
    {
        let row = try Row.fetchOne(
            db.cachedStatement(sql: "SELECT state, owner FROM claim WHERE handler = ? AND key = ?"),
            arguments: [r.handler, r.key])
        let state: String? = row?["state"]
        if state == "completed" {
            return .alreadyCompleted(unpublished: try outbox(db, handler: r.handler, key: r.key, unpublishedOnly: true))
        }
        let holder: String? = row?["owner"]
        guard holder == r.owner else { return .leaseLost }
        try db.cachedStatement(
            sql:
                "UPDATE claim SET state = 'completed', owner = NULL, lease_expires = NULL, completed_at = ? WHERE handler = ? AND key = ?"
        ).execute(arguments: [now, r.handler, r.key])
        for (message, attributes) in zip(r.outbox, attributes) {
            try db.cachedStatement(
                sql: """
                    INSERT INTO outbox (handler, key, idx, exchange, routing_key, attributes, data) VALUES (?, ?, ?, ?, ?, ?, ?)
                    """
            ).execute(arguments: [
                r.handler, r.key, message.index, message.exchange, message.routingKey, attributes,
                message.envelope.data,
            ])
        }
        return .committed
    }

    public func markPublished(handler: String, key: String, indexes: [Int]) async throws {
        try await markPublished([PublishedEntries(handler: handler, key: key, indexes: indexes)])
    }

    public func markPublished(_ entries: [PublishedEntries]) async throws {
        guard entries.contains(where: { !$0.indexes.isEmpty }) else { return }
        try await writes.run { db in
            let update = try db.cachedStatement(
                sql: "UPDATE outbox SET published = 1 WHERE handler = ? AND key = ? AND idx = ?")
            for e in entries {
                for index in e.indexes { try update.execute(arguments: [e.handler, e.key, index]) }
            }
        }
    }

    public func release(handler: String, key: String, owner: String) async throws {
        try await writes.run { db in
            try db.cachedStatement(
                sql:
                    "UPDATE claim SET owner = NULL, lease_expires = NULL WHERE handler = ? AND key = ? AND owner = ? AND state = 'claimed'"
            ).execute(arguments: [handler, key, owner])
        }
    }

    public var isExclusiveToOneProcess: Bool { true }

    public func releaseAllLeases(handler: String) async throws {
        try await pool.write { db in
            try db.execute(
                sql: "UPDATE claim SET owner = NULL, lease_expires = NULL WHERE handler = ? AND state = 'claimed'",
                arguments: [handler])
        }
    }

    public func prune(completedBefore date: Date) async throws -> Int {
        let cutoff = date.timeIntervalSince1970
        return try await pool.write { db in
            try db.execute(
                sql: """
                    DELETE FROM outbox WHERE published = 1 AND (handler, key) IN
                        (SELECT handler, key FROM claim WHERE state = 'completed' AND completed_at < ?)
                    """, arguments: [cutoff])
            try db.execute(
                sql: """
                    DELETE FROM claim WHERE state = 'completed' AND completed_at < ?
                        AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.handler = claim.handler AND o.key = claim.key)
                    """, arguments: [cutoff])
            return db.changesCount
        }
    }

    public func check() async throws {
        try await pool.write { db in try db.execute(sql: "SELECT 1") }
    }

    /// Whether a key is completed, and how many times it was claimed; for tests and the CLI.
    public func status(handler: String, key: String) async throws -> (state: String, attempts: Int)? {
        try await pool.read { db in
            guard
                let row = try Row.fetchOne(
                    db, sql: "SELECT state, attempts FROM claim WHERE handler = ? AND key = ?",
                    arguments: [handler, key])
            else { return nil }
            return (row["state"], row["attempts"])
        }
    }

    private static func outbox(_ db: Database, handler: String, key: String, unpublishedOnly: Bool) throws
        -> [OutboxMessage]
    {
        let rows = try Row.fetchAll(
            db,
            sql: """
                SELECT idx, exchange, routing_key, attributes, data FROM outbox
                WHERE handler = ? AND key = ? \(unpublishedOnly ? "AND published = 0" : "") ORDER BY idx
                """, arguments: [handler, key])
        return try rows.map { row in
            var envelope = try decodeAttributes(row["attributes"])
            envelope.data = row["data"] ?? Data()
            return OutboxMessage(
                index: row["idx"], envelope: envelope, exchange: row["exchange"], routingKey: row["routing_key"])
        }
    }

    private struct StoredAttributes: Codable {
        var id, source, type: String
        var time: Date?
        var subject, dataContentType, dataSchema: String?
        var dataVersion: Int
        var correlationID, causationID, traceparent, idempotencyKey: String?
        var extensions: [String: String]
    }

    private static func encodeAttributes(_ e: EventEnvelope) throws -> String {
        let stored = StoredAttributes(
            id: e.id, source: e.source, type: e.type, time: e.time, subject: e.subject,
            dataContentType: e.dataContentType,
            dataSchema: e.dataSchema, dataVersion: e.dataVersion, correlationID: e.correlationID,
            causationID: e.causationID,
            traceparent: e.traceparent, idempotencyKey: e.idempotencyKey, extensions: e.extensions)
        return String(decoding: try attributeEncoder.encode(stored), as: UTF8.self)
    }

    private static func decodeAttributes(_ text: String) throws -> EventEnvelope {
        let s = try attributeDecoder.decode(StoredAttributes.self, from: Data(text.utf8))
        return EventEnvelope(
            id: s.id, source: s.source, type: s.type, time: s.time, subject: s.subject,
            dataContentType: s.dataContentType,
            dataSchema: s.dataSchema, dataVersion: s.dataVersion, correlationID: s.correlationID,
            causationID: s.causationID,
            traceparent: s.traceparent, idempotencyKey: s.idempotencyKey, extensions: s.extensions, data: Data())
    }
}

private let attributeEncoder: JSONEncoder = {
    let e = JSONEncoder()
    e.dateEncodingStrategy = .secondsSince1970
    return e
}()

private let attributeDecoder: JSONDecoder = {
    let d = JSONDecoder()
    d.dateDecodingStrategy = .secondsSince1970
    return d
}()

/// Holds a group-commit write's result until the transaction commits.
private final class ResultBox<T>: @unchecked Sendable {
    var value: T?
}

/// Group commit: ledger writes from concurrent invocations that arrive while a transaction is running
/// are run together in the next one, each in its own savepoint, so one SQLite commit serves many events.
/// A write that throws rolls back only its savepoint; callers learn their outcome only after the commit,
/// and if the commit itself fails every caller in the batch gets that error (its delivery is redelivered).
final class GroupCommit: Sendable {
    private final class Pending: @unchecked Sendable {
        let work: (Database) throws -> Void
        var outcome: Result<Void, Error> = .success(())
        let finish: (Result<Void, Error>) -> Void
        init(work: @escaping (Database) throws -> Void, finish: @escaping (Result<Void, Error>) -> Void) {
            self.work = work
            self.finish = finish
        }
    }

    private let pool: DatabasePool
    private let state = Mutex<(queue: [Pending], running: Bool)>(([], false))
    /// Where batches are written: one thread at a time, outside Swift's cooperative pool (SQLite blocks).
    private let writer = DispatchQueue(label: "choreo.ledger.group-commit")

    init(pool: DatabasePool) {
        self.pool = pool
    }

    func run<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, Error>) in
            let box = ResultBox<T>()
            let op = Pending(
                work: { db in box.value = try body(db) },
                finish: { outcome in
                    switch outcome {
                    case .success: continuation.resume(returning: box.value!)
                    case .failure(let error): continuation.resume(throwing: error)
                    }
                })
            let start = state.withLock { s -> Bool in
                s.queue.append(op)
                if s.running { return false }
                s.running = true
                return true
            }
            if start { writer.async { self.drain() } }
        }
    }

    private func drain() {
        while true {
            let batch = state.withLock { s -> [Pending] in
                let b = s.queue
                s.queue.removeAll()
                if b.isEmpty { s.running = false }
                return b
            }
            if batch.isEmpty { return }
            do {
                try pool.write { db in
                    if batch.count == 1 {
                        // No savepoint needed: the transaction is the operation's alone.
                        do { try batch[0].work(db) } catch { batch[0].outcome = .failure(error) }
                        if case .failure = batch[0].outcome { throw RollBack() }
                        return
                    }
                    for op in batch {
                        do {
                            try db.inSavepoint {
                                try op.work(db)
                                return .commit
                            }
                            op.outcome = .success(())
                        } catch {
                            op.outcome = .failure(error)
                        }
                    }
                }
                for op in batch { op.finish(op.outcome) }
            } catch is RollBack {
                for op in batch { op.finish(op.outcome) }
            } catch {
                for op in batch { op.finish(.failure(error)) }
            }
        }
    }

    /// Rolls back a single operation's transaction after it threw (its own error is reported).
    private struct RollBack: Error {}
}

extension Duration {
    /// The duration in seconds, as a Double.
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
