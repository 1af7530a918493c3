import Foundation
import GRDB
import GRDBSQLite
import Synchronization

/// The embedded ledger: one SQLite file in WAL mode, for a handler that runs as a single replica.
///
/// Thread-safe; all writes go through GRDB's serialized writer, grouped (see `GroupCommit`). Several
/// handlers of one service may share a file (keys are scoped by handler), but only one process, through
/// one `SQLiteLedger`, may use it: leases and the filter of completed keys live in memory. A claim is a
/// read (none for a key the filter has never seen); a completion, with its outbox, is one write.
/// Retention: ``prune(completedBefore:)``, which the runner calls on start and hourly with its retention
/// setting.
///
/// ```swift
/// let ledger = try SQLiteLedger(path: "/var/lib/inventory/ledger.sqlite")
/// ```
public final class SQLiteLedger: IdempotencyLedger {
    private struct LeaseID: Hashable {
        var handler: String
        var key: String
    }

    private struct Lease {
        var owner: String?
        var expires: Double = 0
        /// Claims of the key so far (by this process).
        var attempts = 0
    }

    private let pool: DatabasePool
    private let writes: GroupCommit
    /// Leases of keys being handled. In memory: only this process uses the file, and a restarted process
    /// voids every lease anyway (their deliveries are redelivered), so a lease on disk would protect
    /// nothing and cost a write per event. Completions are what the file keeps.
    private let leases = Mutex<[LeaseID: Lease]>([:])
    /// Every key completed in the file, as a Bloom filter: a claim of a key it has never seen (nearly every
    /// claim) needs no read. A key is added before its completion is decided (see `complete`), so a claim
    /// that finds it absent took its lease before the completing invocation checked that it still held
    /// the key, and that invocation then does not commit.
    private let completedKeys: Mutex<CompletedKeys>
    private let filterMinimumBits: Int
    /// No outbox entry waiting to be published has a lower rowid, so ``unpublished(handler:limit:)`` reads
    /// from there instead of the whole file. Rows are added past the last one; a prune that removes the last
    /// rows lowers this to where the next row will go.
    private let firstUnpublishedRow: Mutex<Int64>
    /// An exclusive `flock` on `<path>.lock`, held for the ledger's life (the kernel drops it when the
    /// process dies, however it dies): a second user of the file is refused instead of silently running
    /// handlers again for keys it does not know were completed.
    private let fileLock: Int32
    /// The ledger's files as they were when opened, for ``verifyUsable()``.
    private let files: [WatchedFile]
    public let path: String

    /// Opens (creating if needed) the ledger file and migrates its schema.
    public convenience init(path: String) throws {
        try self.init(path: path, filterMinimumBits: 1 << 20)
    }

    /// `filterMinimumBits`: the smallest size of the completed-key filter (tests make it small, to see it grow);
    /// `checkpointLimits`: when the log is copied back to the file (tests make them small).
    init(path: String, filterMinimumBits: Int, checkpointLimits: WALCheckpointer.Limits = .standard) throws {
        self.path = path
        self.filterMinimumBits = filterMinimumBits
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty {
            var isDirectory: ObjCBool = false
            if FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), !isDirectory.boolValue {
                throw ConfigurationError("cannot create the ledger \(path): \(directory) is a file, not a directory")
            }
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            } catch {
                throw ConfigurationError("cannot create the ledger's directory \(directory): \(Self.reason(error))")
            }
        }
        fileLock = try Self.lock(path + ".lock", ledger: path)
        do {
            let (pool, checkpointer, keys, firstUnpublished) = try Self.openFile(
                path, filterMinimumBits: filterMinimumBits, checkpointLimits: checkpointLimits)
            self.pool = pool
            writes = GroupCommit(pool: pool, checkpointer: checkpointer)
            completedKeys = Mutex(keys)
            firstUnpublishedRow = Mutex(firstUnpublished)
        } catch {
            close(fileLock)
            var message = "cannot open the ledger \(path): \(Self.reason(error))"
            if let e = error as? DatabaseError, e.resultCode == .SQLITE_CORRUPT || e.resultCode == .SQLITE_NOTADB {
                message +=
                    "; restore the file from a backup, or move it aside to begin an empty ledger (an event handled "
                    + "before would then run again if it were delivered again)"
            }
            throw ConfigurationError(message)
        }
        var files: [WatchedFile] = []
        // The log and its index exist while a connection is open (the pool keeps its writer's).
        for file in [path, path + "-wal", path + "-shm"] {
            var status = stat()
            if stat(file, &status) == 0 { files.append(WatchedFile(path: file, status: status)) }
        }
        var lockStatus = stat()
        if fstat(fileLock, &lockStatus) == 0 { files.append(WatchedFile(path: path + ".lock", status: lockStatus)) }
        self.files = files
    }

    /// One of the ledger's files and the identity (device and inode) it had when the ledger opened it.
    private struct WatchedFile {
        var path: String
        var device: UInt64
        var inode: UInt64

        init(path: String, status: stat) {
            self.path = path
            device = UInt64(status.st_dev)
            inode = UInt64(status.st_ino)
        }
    }

    /// Throws ``LedgerUnusable`` when one of the ledger's files (the database, its log, the log's index, the
    /// lock) is no longer at its path, or another file is: SQLite goes on writing to what it opened, so
    /// without this check a process whose ledger was deleted would run on, completing keys into a file that
    /// vanishes at exit, and a second process could open the path meanwhile. Four `stat` calls.
    public func verifyUsable() throws {
        for file in files {
            var status = stat()
            let found = stat(file.path, &status) == 0
            if !found && errno != ENOENT && errno != ENOTDIR { continue }  // cannot tell (a permission): not evidence
            if found && UInt64(status.st_dev) == file.device && UInt64(status.st_ino) == file.inode { continue }
            let what = found ? "was replaced by another file" : "was deleted or moved away"
            if file.path == path + ".lock" {
                throw LedgerUnusable(
                    "the ledger \(path): its lock file \(what) while in use, so a second process could open the "
                        + "ledger and run handlers again for keys this one completed; stopping")
            }
            let subject = file.path == path ? "the ledger file \(path)" : "the ledger \(path): its file \(file.path)"
            throw LedgerUnusable(
                "\(subject) \(what) while in use; stopping, since what this process writes would be lost at exit. "
                    + "Put the file back, or restore the ledger from a backup, to keep the keys completed so far; "
                    + "started without it, the service begins an empty ledger, and an event handled before would "
                    + "run again if it were delivered again")
        }
    }

    /// What went wrong, in words: SQLite's own message and code (not the statement it ran), or the
    /// system's reason for a file that could not be made.
    private static func reason(_ error: any Error) -> String {
        if let e = error as? DatabaseError {
            return "\(e.message ?? "SQLite error") (SQLite error \(e.extendedResultCode.rawValue))"
        }
        if let e = error as? CocoaError, let posix = e.underlying as? POSIXError {
            return String(cString: strerror(posix.code.rawValue))
        }
        return "\(error)"
    }

    deinit { close(fileLock) }

    /// Copies the log back to the file (see ``WALCheckpointer``).
    var checkpointer: WALCheckpointer { writes.checkpointer }

    private static func lock(_ lockPath: String, ledger path: String) throws -> Int32 {
        let fd = Glibc.open(lockPath, O_CREAT | O_RDWR | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw ConfigurationError(
                "cannot open the ledger's lock file \(lockPath): \(String(cString: strerror(errno)))")
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let code = errno
            close(fd)
            if code == EWOULDBLOCK {
                throw ConfigurationError(
                    "the ledger \(path) is in use by another process (or another SQLiteLedger in this one); "
                        + "a ledger file serves one process: give each its own --ledger")
            }
            throw ConfigurationError("cannot lock \(lockPath): \(String(cString: strerror(code)))")
        }
        return fd
    }

    /// Waits for a lock that the ledger's checkpointer holds (its restart, a millisecond or two) in steps of
    /// 0.1 ms, for about 10 s in all. SQLite's own timeout sleeps 1, 2, 5 ms and longer between tries: a
    /// commit that met a restart waited 8 ms. (The checkpointer's own connection waits 20 ms at most.)
    private static let retryBriefly: Database.BusyCallback = { tries in
        usleep(100)
        return tries < 100_000
    }

    /// Opens the file with the connection settings below, migrates it and reads its completed keys.
    private static func openFile(_ path: String, filterMinimumBits: Int, checkpointLimits: WALCheckpointer.Limits)
        throws -> (DatabasePool, WALCheckpointer, CompletedKeys, firstUnpublished: Int64)
    {
        var config = Configuration()
        config.busyMode = .callback(retryBriefly)
        config.prepareDatabase { db in
            // WAL with NORMAL sync: a commit survives a crash of the process (what the protocol is built on);
            // a power loss can roll back the last commits before a checkpoint, and a duplicate of one of
            // those events arriving later would then run its handler again.
            try db.execute(sql: "PRAGMA synchronous = NORMAL")
            // Keys are mostly random (derived UUIDs), so every commit touches pages all over the trees:
            // keep them in memory (up to 64 MiB per connection, used only as the file grows). Checkpoints
            // run on a thread of their own (`WALCheckpointer`), every few thousand pages, so a hot page is
            // written back once for many commits and no commit waits for one.
            try db.execute(sql: "PRAGMA cache_size = -65536")
            try db.execute(sql: "PRAGMA journal_size_limit = 67108864")
        }
        let pool = try DatabasePool(path: path, configuration: config)
        let checkpointer = try WALCheckpointer(path: path, configuration: config, limits: checkpointLimits)
        pool.writeWithoutTransaction { db in checkpointer.attach(to: db) }
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
        // v2: outbox rows in commit order (rowid) instead of clustered by key. Keys are mostly random ids,
        // so the old layout put every commit's rows on as many pages as it had rows; now they share the
        // last pages. Lookups go through an index of the entries still to publish, which stays small.
        migrator.registerMigration("v2") { db in
            try db.execute(
                sql: """
                    CREATE TABLE outbox_v2 (
                        handler TEXT NOT NULL,
                        key TEXT NOT NULL,
                        idx INTEGER NOT NULL,
                        exchange TEXT NOT NULL,
                        routing_key TEXT NOT NULL,
                        attributes TEXT NOT NULL,
                        data BLOB NOT NULL,
                        published INTEGER NOT NULL DEFAULT 0,
                        committed_at REAL NOT NULL
                    );
                    INSERT INTO outbox_v2 (handler, key, idx, exchange, routing_key, attributes, data, published, committed_at)
                        SELECT o.handler, o.key, o.idx, o.exchange, o.routing_key, o.attributes, o.data, o.published,
                            coalesce(c.completed_at, 0)
                        FROM outbox o LEFT JOIN claim c ON c.handler = o.handler AND c.key = o.key
                        ORDER BY c.completed_at, o.handler, o.key, o.idx;
                    DROP TABLE outbox;
                    ALTER TABLE outbox_v2 RENAME TO outbox;
                    CREATE INDEX outbox_unpublished ON outbox(handler, key, idx) WHERE published = 0;
                    CREATE INDEX outbox_committed_at ON outbox(committed_at);
                    """)
        }
        // v3: no index on the outbox's commit time. Rows are in commit order already (rowid), so pruning
        // finds its end by reading from the oldest row; the index cost a page written on every commit.
        migrator.registerMigration("v3") { db in
            try db.execute(sql: "DROP INDEX IF EXISTS outbox_committed_at")
        }
        // v4: one table, in commit order (rowid), and one index. A completed key is a row with idx = -1 (its
        // attempts), followed by one row per outbox entry (idx 0, 1, ...; published once confirmed). A
        // completion writes two pages where it wrote four (the key's rows share the table's last page, its
        // index entries one leaf), and recording a confirm one where it wrote two: each checkpoint has half
        // as much to flush, half as often. Leases the first version kept in the file are dropped: they are
        // void at start anyway. So are published entries whose key was pruned without them (v3 pruned the
        // two tables separately): left in, they would collide with a new completion of that key.
        migrator.registerMigration("v4") { db in
            try db.execute(
                sql: """
                    CREATE TABLE completion (
                        handler TEXT NOT NULL,
                        key TEXT NOT NULL,
                        idx INTEGER NOT NULL,
                        completed_at REAL NOT NULL,
                        published INTEGER NOT NULL,
                        attempts INTEGER,
                        exchange TEXT,
                        routing_key TEXT,
                        attributes TEXT,
                        data BLOB
                    );
                    INSERT INTO completion
                        (handler, key, idx, completed_at, published, attempts, exchange, routing_key, attributes, data)
                    SELECT * FROM (
                        SELECT handler, key, -1 AS idx, coalesce(completed_at, 0) AS at, 1, attempts, NULL, NULL, NULL,
                            NULL
                            FROM claim WHERE state = 'completed'
                        UNION ALL
                        SELECT handler, key, idx, committed_at AS at, published, NULL, exchange, routing_key,
                            attributes, data
                            FROM outbox o
                            WHERE published = 0 OR EXISTS (
                                SELECT 1 FROM claim c
                                WHERE c.handler = o.handler AND c.key = o.key AND c.state = 'completed'))
                    ORDER BY at, handler, key, idx;
                    DROP TABLE claim;
                    DROP TABLE outbox;
                    CREATE UNIQUE INDEX completion_key ON completion(handler, key, idx);
                    """)
        }
        try migrator.migrate(pool)
        // Built at start from the file (under two seconds per million keys kept).
        let (keys, firstUnpublished) = try pool.read { db in
            (try loadCompletedKeys(db, minimumBits: filterMinimumBits), try readFirstUnpublishedRow(db))
        }
        return (pool, checkpointer, keys, firstUnpublished)
    }

    private static func loadCompletedKeys(_ db: Database, minimumBits: Int) throws -> CompletedKeys {
        let count = try Int.fetchOne(db, sql: "SELECT count(*) FROM completion WHERE idx = -1") ?? 0
        var keys = CompletedKeys(expected: count, minimumBits: minimumBits)
        let rows = try Row.fetchCursor(db, sql: "SELECT handler, key FROM completion WHERE idx = -1")
        while let row = try rows.next() { keys.insert(row[0], row[1]) }
        return keys
    }

    /// The lowest rowid an unpublished outbox entry can have: the oldest one in the file, or past the last row.
    private static func readFirstUnpublishedRow(_ db: Database) throws -> Int64 {
        try Int64.fetchOne(
            db, sql: "SELECT coalesce(min(rowid), (\(nextRowid))) FROM completion WHERE published = 0") ?? 1
    }

    /// The rowid the next row added gets (the table has no AUTOINCREMENT: one past the last row).
    private static let nextRowid = "SELECT coalesce(max(rowid), 0) + 1 FROM completion"

    public func claim(handler: String, key: String, owner: String, lease: Duration) async throws -> LedgerClaim {
        try await claim([ClaimRequest(handler: handler, key: key, owner: owner)], lease: lease)[0]
    }

    /// Takes the leases in memory, then reads which of the keys were completed before (and their unpublished
    /// outbox): no write. Taking the lease first makes the read conclusive: only a lease holder completes a
    /// key, and it commits before it lets the lease go.
    public func claim(_ requests: [ClaimRequest], lease: Duration) async throws -> [LedgerClaim] {
        let now = Date().timeIntervalSince1970
        let expires = now + lease.seconds
        var results: [LedgerClaim] = leases.withLock { leases in
            requests.map { r in
                let id = LeaseID(handler: r.handler, key: r.key)
                var l = leases[id] ?? Lease()
                if let holder = l.owner, holder != r.owner, l.expires > now {
                    return .heldElsewhere(until: Date(timeIntervalSince1970: l.expires))
                }
                l.owner = r.owner
                l.expires = expires
                l.attempts += 1
                leases[id] = l
                return .claimed(attempts: l.attempts)
            }
        }
        // After the leases are taken (see `completedKeys`): only keys the filter may hold are read.
        let leased = completedKeys.withLock { keys in
            results.indices.filter {
                guard case .claimed = results[$0] else { return false }
                return keys.mightContain(requests[$0].handler, requests[$0].key)
            }
        }
        guard !leased.isEmpty else { return results }
        do {
            let completed = try await readCompleted(leased.map { requests[$0] })
            for (i, unpublished) in zip(leased, completed) {
                guard let unpublished else { continue }
                results[i] = .completed(unpublished: unpublished)
                dropLease(requests[i].handler, requests[i].key, owner: requests[i].owner)
            }
        } catch {
            for i in leased { dropLease(requests[i].handler, requests[i].key, owner: requests[i].owner) }
            throw error
        }
        return results
    }

    /// For each key, its unpublished outbox when it is completed, else nil. Read on the writer's connection,
    /// along with the group's writes: its page cache is current, where a reader connection would have to
    /// reload the pages the writer just changed (several times slower on this hot path).
    private func readCompleted(_ requests: [ClaimRequest]) async throws -> [[OutboxMessage]?] {
        try await writes.run { db in
            try requests.map { r in
                guard try Self.isCompleted(db, handler: r.handler, key: r.key) else { return nil }
                return try Self.unpublishedOutbox(db, handler: r.handler, key: r.key)
            }
        }
    }

    private func dropLease(_ handler: String, _ key: String, owner: String) {
        leases.withLock { leases in
            let id = LeaseID(handler: handler, key: key)
            if leases[id]?.owner == owner { leases[id] = nil }
        }
    }

    public func renew(handler: String, key: String, owner: String, lease: Duration) async throws -> Bool {
        let expires = Date().timeIntervalSince1970 + lease.seconds
        return leases.withLock { leases in
            let id = LeaseID(handler: handler, key: key)
            guard leases[id]?.owner == owner else { return false }
            leases[id]?.expires = expires
            return true
        }
    }

    public func complete(handler: String, key: String, owner: String, outbox: [OutboxMessage]) async throws
        -> LedgerCompletion
    {
        try await complete([CompletionRequest(handler: handler, key: key, owner: owner, outbox: outbox)])[0]
    }

    public func complete(_ requests: [CompletionRequest]) async throws -> [LedgerCompletion] {
        let now = Date().timeIntervalSince1970
        let encoded = requests.map { r in r.outbox.map { Self.encodeAttributes($0.envelope) } }
        let results = try await writes.run { db in
            let results = try zip(requests, encoded).map { r, attributes in
                // Into the filter before the lease check (see `completedKeys`); a key that is then not
                // committed stays in it, which only costs its claims a read.
                self.completedKeys.withLock { $0.insert(r.handler, r.key) }
                let attempts = self.leases.withLock { $0[LeaseID(handler: r.handler, key: r.key)] }
                    .flatMap { $0.owner == r.owner ? $0.attempts : nil }
                return try Self.complete(r, holding: attempts, attributes: attributes, now: now, db)
            }
            // A fuller filter answers "maybe" more often: rebuilt twice as large from the file, which this
            // transaction's completions are already in. Nothing else writes meanwhile (one writer).
            if self.completedKeys.withLock({ $0.isCrowded }) {
                let rebuilt = try Self.loadCompletedKeys(db, minimumBits: self.filterMinimumBits)
                self.completedKeys.withLock { $0 = rebuilt }
            }
            return results
        }
        for (r, result) in zip(requests, results) where result != .leaseLost {
            dropLease(r.handler, r.key, owner: r.owner)
        }
        return results
    }

    /// `holding`: the claim count when `r.owner` holds the lease, else nil.
    private static func complete(
        _ r: CompletionRequest, holding attempts: Int?, attributes: [String], now: Double, _ db: Database
    ) throws -> LedgerCompletion {
        if let attempts {
            // The key's row, then its outbox entries: consecutive rows, so they share the table's last page.
            try Raw.run(
                db,
                """
                INSERT INTO completion (handler, key, idx, completed_at, published, attempts) VALUES (?, ?, -1, ?, 1, ?)
                ON CONFLICT DO NOTHING
                """, [.text(r.handler), .text(r.key), .real(now), .int(attempts)])
            if db.changesCount == 1 {
                for (message, attributes) in zip(r.outbox, attributes) {
                    try Raw.run(
                        db,
                        """
                        INSERT INTO completion
                            (handler, key, idx, completed_at, published, exchange, routing_key, attributes, data)
                        VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)
                        """,
                        [
                            .text(r.handler), .text(r.key), .int(message.index), .real(now), .text(message.exchange),
                            .text(message.routingKey), .text(attributes), .blob(message.envelope.data),
                        ])
                }
                return .committed
            }
        }
        if try isCompleted(db, handler: r.handler, key: r.key) {
            return .alreadyCompleted(unpublished: try unpublishedOutbox(db, handler: r.handler, key: r.key))
        }
        return .leaseLost
    }

    private static func isCompleted(_ db: Database, handler: String, key: String) throws -> Bool {
        try Raw.text(
            db, "SELECT 'yes' FROM completion WHERE handler = ? AND key = ? AND idx = -1", [.text(handler), .text(key)]
        ) != nil
    }

    public func markPublished(handler: String, key: String, indexes: [Int]) async throws {
        try await markPublished([PublishedEntries(handler: handler, key: key, indexes: indexes)])
    }

    public func markPublished(_ entries: [PublishedEntries]) async throws {
        guard entries.contains(where: { !$0.indexes.isEmpty }) else { return }
        try await writes.run { db in
            for e in entries {
                for index in e.indexes {
                    try Raw.run(
                        db,
                        """
                        UPDATE completion SET published = 1
                        WHERE handler = ? AND key = ? AND idx = ? AND published = 0
                        """,
                        [.text(e.handler), .text(e.key), .int(index)])
                }
            }
        }
    }

    public func release(handler: String, key: String, owner: String) async throws {
        leases.withLock { leases in
            let id = LeaseID(handler: handler, key: key)
            if leases[id]?.owner == owner { leases[id]?.owner = nil }
        }
    }

    public var isExclusiveToOneProcess: Bool { true }

    public func releaseAllLeases(handler: String) async throws {
        leases.withLock { leases in
            for id in leases.keys where id.handler == handler { leases[id]?.owner = nil }
        }
    }

    public func prune(completedBefore date: Date) async throws -> Int {
        let cutoff = date.timeIntervalSince1970
        // Claim counts of keys released and never completed (dead-lettered): nothing holds them any more.
        leases.withLock { leases in leases = leases.filter { $0.value.owner != nil } }
        // Rows are in commit order (rowid): the old ones are those before the first row committed since the
        // cutoff, found by reading from the oldest row (no index needed; the rows read are the ones deleted).
        // A clock that stepped back only keeps a row longer.
        let (first, end) = try await pool.read { db in
            (
                try Int64.fetchOne(db, sql: "SELECT coalesce(min(rowid), 1) FROM completion") ?? 1,
                try Int64.fetchOne(
                    db,
                    sql: """
                        SELECT coalesce(
                            (SELECT rowid FROM completion WHERE completed_at >= ? ORDER BY rowid LIMIT 1),
                            (\(Self.nextRowid)))
                        """, arguments: [cutoff]) ?? 1
            )
        }
        // In chunks, so that commits wait for one chunk at most (about 15 ms); a cancelled task stops between two.
        var pruned = 0
        var next = first
        while next < end, !Task.isCancelled {
            let low = next
            let (keys, following) = try await pool.write { db -> (Int, Int64) in
                // To a key's first row, so that no key is split between two chunks.
                let high =
                    try Int64.fetchOne(
                        db,
                        sql: """
                            SELECT min(coalesce(
                                (SELECT rowid FROM completion WHERE rowid >= ? AND idx = -1 ORDER BY rowid LIMIT 1),
                                ?), ?)
                            """, arguments: [low + Self.pruneChunk, end, end]) ?? end
                // A key goes once all its outbox entries are published; then its entries, left without it.
                try db.execute(
                    sql: """
                        DELETE FROM completion WHERE rowid >= ? AND rowid < ? AND idx = -1
                            AND NOT EXISTS (
                                SELECT 1 FROM completion e
                                WHERE e.handler = completion.handler AND e.key = completion.key AND e.idx >= 0
                                    AND e.published = 0)
                        """, arguments: [low, high])
                let keys = db.changesCount
                try db.execute(
                    sql: """
                        DELETE FROM completion WHERE rowid >= ? AND rowid < ? AND idx >= 0 AND published = 1
                            AND NOT EXISTS (
                                SELECT 1 FROM completion c
                                WHERE c.handler = completion.handler AND c.key = completion.key AND c.idx = -1)
                        """, arguments: [low, high])
                // The next row added gets the rowid after the last one left: an entry added then is still read.
                let added = try Int64.fetchOne(db, sql: Self.nextRowid) ?? 1
                self.firstUnpublishedRow.withLock { $0 = min($0, added) }
                // Past rows kept (entries still to publish), to the next row there is.
                let following = try Int64.fetchOne(
                    db, sql: "SELECT coalesce(min(rowid), ?) FROM completion WHERE rowid >= ?", arguments: [end, high])
                return (keys, following ?? end)
            }
            pruned += keys
            next = following
        }
        return pruned
    }

    /// Rows removed per transaction by ``prune(completedBefore:)``.
    static let pruneChunk: Int64 = 1000

    public func unpublished(handler: String, limit: Int) async throws -> [PendingOutbox] {
        let from = firstUnpublishedRow.withLock { $0 }
        return try await pool.read { db in
            // NOT INDEXED: read the rows from `from` on, not every row of the handler through the index.
            let keys = try String.fetchAll(
                db,
                sql: """
                    SELECT key FROM completion NOT INDEXED
                    WHERE rowid >= ? AND handler = ? AND idx >= 0 AND published = 0
                    GROUP BY key ORDER BY min(rowid) LIMIT ?
                    """, arguments: [from, handler, limit])
            return try keys.map {
                PendingOutbox(key: $0, messages: try Self.unpublishedOutbox(db, handler: handler, key: $0))
            }
        }
    }

    public func check() async throws {
        try await pool.write { db in try db.execute(sql: "SELECT 1") }
    }

    /// Whether a key is completed or claimed, and how many times it was claimed; for tests.
    public func status(handler: String, key: String) async throws -> (state: String, attempts: Int)? {
        let completed = try await pool.read { db in
            try Int.fetchOne(
                db, sql: "SELECT attempts FROM completion WHERE handler = ? AND key = ? AND idx = -1",
                arguments: [handler, key])
        }
        if let completed { return ("completed", completed) }
        let lease = leases.withLock { $0[LeaseID(handler: handler, key: key)] }
        return lease.map { ("claimed", $0.attempts) }
    }

    /// A completed key's outbox entries not yet recorded as published, in emit order.
    private static func unpublishedOutbox(_ db: Database, handler: String, key: String) throws -> [OutboxMessage] {
        let rows = try Row.fetchAll(
            db.cachedStatement(
                sql: """
                    SELECT idx, exchange, routing_key, attributes, data FROM completion
                    WHERE handler = ? AND key = ? AND idx >= 0 AND published = 0 ORDER BY idx
                    """), arguments: [handler, key])
        return try rows.map { row in
            var envelope = try decodeAttributes(row["attributes"])
            envelope.data = row["data"] ?? Data()
            return OutboxMessage(
                index: row["idx"], envelope: envelope, exchange: row["exchange"], routingKey: row["routing_key"])
        }
    }

    private struct StoredAttributes: Decodable {
        var id, source, type: String
        /// Seconds since 1970 (files written before `timeReference` existed).
        var time: Date?
        /// Seconds since 2001, Date's own representation: reads back the exact same Date.
        var timeReference: Double?
        var subject, dataContentType, dataSchema: String?
        var dataVersion: Int
        var correlationID, causationID, traceparent, idempotencyKey: String?
        var extensions: [String: String]
    }

    /// The attributes as the JSON object ``StoredAttributes`` decodes, written directly into bytes: this runs
    /// for every emitted event, and a JSONEncoder (or appending to a String piece by piece) costs several
    /// times more than the rest of the row.
    package static func encodeAttributes(_ e: EventEnvelope) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(512)
        out.append(UInt8(ascii: "{"))
        func key(_ name: StaticString) {
            if out.count > 1 { out.append(UInt8(ascii: ",")) }
            out.append(UInt8(ascii: "\""))
            out.append(contentsOf: UnsafeBufferPointer(start: name.utf8Start, count: name.utf8CodeUnitCount))
            out.append(contentsOf: [UInt8(ascii: "\""), UInt8(ascii: ":")])
        }
        func string(_ name: StaticString, _ value: String?) {
            guard let value else { return }
            key(name)
            PayloadJSON.appendString(value, to: &out)
        }
        string("id", e.id)
        string("source", e.source)
        string("type", e.type)
        if let time = e.time {
            key("timeReference")
            out.append(contentsOf: String(time.timeIntervalSinceReferenceDate).utf8)
        }
        string("subject", e.subject)
        string("dataContentType", e.dataContentType)
        string("dataSchema", e.dataSchema)
        key("dataVersion")
        out.append(contentsOf: String(e.dataVersion).utf8)
        string("correlationID", e.correlationID)
        string("causationID", e.causationID)
        string("traceparent", e.traceparent)
        string("idempotencyKey", e.idempotencyKey)
        key("extensions")
        out.append(UInt8(ascii: "{"))
        for (i, (k, v)) in e.extensions.sorted(by: { $0.key < $1.key }).enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            PayloadJSON.appendString(k, to: &out)
            out.append(UInt8(ascii: ":"))
            PayloadJSON.appendString(v, to: &out)
        }
        out.append(contentsOf: [UInt8(ascii: "}"), UInt8(ascii: "}")])
        return String(decoding: out, as: UTF8.self)
    }

    package static func decodeAttributes(_ text: String) throws -> EventEnvelope {
        let s = try attributeDecoder.decode(StoredAttributes.self, from: Data(text.utf8))
        return EventEnvelope(
            id: s.id, source: s.source, type: s.type,
            time: s.timeReference.map(Date.init(timeIntervalSinceReferenceDate:)) ?? s.time, subject: s.subject,
            dataContentType: s.dataContentType,
            dataSchema: s.dataSchema, dataVersion: s.dataVersion, correlationID: s.correlationID,
            causationID: s.causationID,
            traceparent: s.traceparent, idempotencyKey: s.idempotencyKey, extensions: s.extensions, data: Data())
    }
}

private let attributeDecoder: JSONDecoder = {
    let d = JSONDecoder()
    d.dateDecodingStrategy = .secondsSince1970
    return d
}()

/// The per-event statements through the SQLite C API, on statements GRDB prepared and caches: GRDB's own
/// argument and execution bookkeeping cost more than SQLite's work for these one-row statements.
private enum Raw {
    enum Value {
        case text(String)
        case int(Int)
        case real(Double)
        case blob(Data)
    }

    /// Runs a statement that returns no rows.
    static func run(_ db: Database, _ sql: String, _ values: [Value]) throws {
        let statement = try db.cachedStatement(sql: sql)
        try withBound(db, statement, values) { s in
            let rc = sqlite3_step(s)
            guard rc == SQLITE_DONE else { throw error(db, rc, sql) }
        }
    }

    /// The first column of the first row as text, or nil when there is no row (or it is NULL).
    static func text(_ db: Database, _ sql: String, _ values: [Value]) throws -> String? {
        let statement = try db.cachedStatement(sql: sql)
        return try withBound(db, statement, values) { s -> String? in
            let rc = sqlite3_step(s)
            if rc == SQLITE_DONE { return nil }
            guard rc == SQLITE_ROW else { throw error(db, rc, sql) }
            guard let text = sqlite3_column_text(s, 0) else { return nil }
            return String(cString: text)
        }
    }

    /// Binds `values` and runs `body` on the statement. Texts and blobs are copied once into one buffer on
    /// the stack (the heap above 16 KiB) and bound as they lie there (a nil destructor, `SQLITE_STATIC`), so
    /// SQLite does not copy them again: with `SQLITE_TRANSIENT` each was a `malloc` and `free` of SQLite's,
    /// about twenty per event in a hop. The bindings are cleared before the buffer goes away.
    private static func withBound<T>(
        _ db: Database, _ statement: Statement, _ values: [Value], _ body: (OpaquePointer) throws -> T
    ) throws -> T {
        let s = statement.sqliteStatement
        var bytes = 1  // never an empty buffer: a nil pointer would bind NULL instead of an empty value
        for value in values {
            switch value {
            case .text(let text): bytes += text.utf8.count
            case .blob(let data): bytes += data.count
            case .int, .real: break
            }
        }
        func bound(_ buffer: UnsafeMutableRawBufferPointer) throws -> T {
            sqlite3_reset(s)
            defer {
                sqlite3_reset(s)
                sqlite3_clear_bindings(s)
            }
            let base = buffer.baseAddress!
            var offset = 0
            for (i, value) in values.enumerated() {
                let index = Int32(i + 1)
                let rc: Int32
                switch value {
                case .text(let text):
                    let start = base + offset
                    var text = text
                    let count = text.withUTF8 { utf8 in
                        UnsafeMutableRawBufferPointer(rebasing: buffer[offset...]).copyMemory(
                            from: UnsafeRawBufferPointer(utf8))
                        return utf8.count
                    }
                    offset += count
                    rc = sqlite3_bind_text(s, index, start.assumingMemoryBound(to: CChar.self), Int32(count), nil)
                case .int(let n): rc = sqlite3_bind_int64(s, index, Int64(n))
                case .real(let x): rc = sqlite3_bind_double(s, index, x)
                case .blob(let data):
                    let start = base + offset
                    // Through the bytes themselves: `Data.copyBytes(to:)` runs DataProtocol's generic code.
                    data.withUnsafeBytes {
                        UnsafeMutableRawBufferPointer(rebasing: buffer[offset...]).copyMemory(from: $0)
                    }
                    offset += data.count
                    rc = sqlite3_bind_blob(s, index, start, Int32(data.count), nil)
                }
                guard rc == SQLITE_OK else { throw error(db, rc, statement.sql) }
            }
            return try body(s)
        }
        // Large payloads on the heap, whatever room the thread's stack has.
        if bytes > 16_384 {
            let heap = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 8)
            defer { heap.deallocate() }
            return try bound(heap)
        }
        return try withUnsafeTemporaryAllocation(byteCount: bytes, alignment: 8, bound)
    }

    private static func error(_ db: Database, _ rc: Int32, _ sql: String) -> DatabaseError {
        let message = db.sqliteConnection.flatMap { sqlite3_errmsg($0) }.map { String(cString: $0) }
        return DatabaseError(resultCode: ResultCode(rawValue: rc), message: message, sql: sql)
    }
}

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
    /// Kept as long as anything may commit: the writer's WAL hook points to it.
    let checkpointer: WALCheckpointer
    private let state = Mutex<(queue: [Pending], running: Bool)>(([], false))
    /// Where batches are written: one thread at a time, outside Swift's cooperative pool (SQLite blocks).
    private let writer = DispatchQueue(label: "choreo.ledger.group-commit")

    init(pool: DatabasePool, checkpointer: WALCheckpointer) {
        self.pool = pool
        self.checkpointer = checkpointer
    }

    func run<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws -> T {
        // Uncontended (a lone event, or the first of a burst): write on the calling thread, with no hand-over
        // to the writer queue and back. SQLite holds it for the length of one small transaction.
        let lead = state.withLock { s -> Bool in
            if s.running { return false }
            s.running = true
            return true
        }
        if lead {
            defer { handOver() }
            return try inTransaction(body)
        }
        return try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, Error>) in
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

    /// After an inline write: what queued meanwhile goes to the writer queue, or nobody is writing any more.
    private func handOver() {
        let more = state.withLock { s -> Bool in
            if s.queue.isEmpty {
                s.running = false
                return false
            }
            return true
        }
        if more { writer.async { self.drain() } }
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
            write(batch)
        }
    }

    /// Runs `body` in a transaction on the writer: committed when it returns, rolled back when it or the
    /// commit throws, and that error thrown. A lone write calls it directly, without the boxes and closures
    /// a batch's outcomes travel in.
    private func inTransaction<T>(_ body: (Database) throws -> T) throws -> T {
        try pool.writeWithoutTransaction { db in
            try Raw.run(db, "BEGIN DEFERRED TRANSACTION", [])
            do {
                let value = try body(db)
                try Raw.run(db, "COMMIT TRANSACTION", [])
                return value
            } catch {
                // After some errors SQLite has rolled back already; then this one fails, harmlessly.
                try? Raw.run(db, "ROLLBACK TRANSACTION", [])
                throw error
            }
        }
    }

    /// Runs the operations in one transaction, each in its own savepoint, and reports each outcome.
    ///
    /// The transaction statements go through the C API on cached statements: GRDB's own transaction
    /// methods prepare them anew each time, which costs more than a one-row commit itself.
    private func write(_ batch: [Pending]) {
        do {
            try inTransaction { db in
                if batch.count == 1 {
                    // No savepoint needed: the transaction is the operation's alone, and its error rolls it back.
                    try batch[0].work(db)
                    return
                }
                for op in batch {
                    try Raw.run(db, "SAVEPOINT op", [])
                    do {
                        try op.work(db)
                        try Raw.run(db, "RELEASE SAVEPOINT op", [])
                        op.outcome = .success(())
                    } catch {
                        op.outcome = .failure(error)
                        try Raw.run(db, "ROLLBACK TRANSACTION TO SAVEPOINT op", [])
                        try Raw.run(db, "RELEASE SAVEPOINT op", [])
                    }
                }
            }
        } catch {
            for op in batch { op.outcome = .failure(error) }
        }
        for op in batch { op.finish(op.outcome) }
    }
}

extension Duration {
    /// The duration in seconds, as a Double.
    package var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

/// A Bloom filter of (handler, key) pairs: no false negatives, about 0.25 % false positives at its
/// designed load of 16 bits per key (four probes). Hashes are seeded per process; it is built anew at
/// every start.
struct CompletedKeys {
    private var words: [UInt64]
    private let bitMask: UInt64
    private(set) var count = 0

    init(expected: Int, minimumBits: Int) {
        var bits = 64
        while bits < max(minimumBits, expected * 2 * 16) { bits *= 2 }
        words = Array(repeating: 0, count: bits / 64)
        bitMask = UInt64(bits - 1)
    }

    /// Past the designed load (its size leaves room for twice the keys it was built with).
    var isCrowded: Bool { UInt64(count) * 16 > bitMask + 1 }

    mutating func insert(_ handler: String, _ key: String) {
        let (a, b) = Self.hashes(handler, key)
        for i in 0..<4 {
            let bit = (a &+ UInt64(i) &* b) & bitMask
            words[Int(bit >> 6)] |= 1 << (bit & 63)
        }
        count += 1
    }

    func mightContain(_ handler: String, _ key: String) -> Bool {
        let (a, b) = Self.hashes(handler, key)
        for i in 0..<4 {
            let bit = (a &+ UInt64(i) &* b) & bitMask
            if words[Int(bit >> 6)] & (1 << (bit & 63)) == 0 { return false }
        }
        return true
    }

    /// Two hashes for double hashing; the second odd, so the probes differ.
    private static func hashes(_ handler: String, _ key: String) -> (UInt64, UInt64) {
        var h = Hasher()
        h.combine(handler)
        h.combine(key)
        let v = UInt64(bitPattern: Int64(h.finalize()))
        return (v, (v >> 32 | v << 32) | 1)
    }
}
