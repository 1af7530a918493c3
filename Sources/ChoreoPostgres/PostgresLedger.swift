import Choreo
import Crypto
import Foundation
import Logging
import NIOSSL
import PostgresNIO
import Synchronization

/// The idempotency-key ledger on PostgreSQL, shared by several replicas of a handler (DESIGN.md, "Scale beyond
/// one machine"): the SQLite ledger is for one process per file, this one for any number of processes on any
/// number of machines.
///
/// ```swift
/// import Choreo
/// import ChoreoPostgres
///
/// await Choreo.run(service: "inventory", handlers: [ReserveStock()], ledgers: [PostgresLedger.self])
/// // inventory --ledger postgres://inventory@db.internal:5432/choreo   (password in PGPASSWORD)
/// ```
///
/// The URL is `postgres://user[:password]@host[:port]/database[?sslmode=...]`; without a password in it,
/// `PGPASSWORD` gives it. `sslmode` is read as libpq reads it: `prefer` (the default) and `require` encrypt
/// without checking the server's certificate, `verify-full` checks it and the host name against the system's
/// trust store, `disable` sends plain text.
///
/// Leases live in the database with the database's clock, so a lease outlives the process that took it: a
/// replica that dies holding a key makes that key's redelivered copy wait until the lease expires (the
/// runtime's lease, 60 s by default), whichever replica gets it. Keys are scoped by service and handler, so
/// several services may share one database. Two tables, `choreo_ledger` (a row per key) and `choreo_outbox`
/// (a row per emitted event until pruned), created at the first start; a `choreo_ledger_meta` row records the
/// schema version.
public final class PostgresLedger: URLOpenableLedger, Sendable {
    public static let urlSchemes = ["postgres", "postgresql"]
    /// Leases are shared: the runtime waits for a dead replica's leases to expire instead of voiding them.
    public var isExclusiveToOneProcess: Bool { false }

    static let schemaVersion = 1

    private let settings: Settings
    private let connections: LedgerConnections
    /// Prefix of every stored handler name: the service's keys are its own.
    private let scope: String
    /// The URL with its password masked, for messages.
    public let location: String
    private let logger: Logger

    /// Connects, creates or checks the tables, and returns the ledger; fails with the reason within 15 s
    /// when the database cannot be reached or used.
    public static func open(url: String, service: String, logger: Logger) async throws -> PostgresLedger {
        let ledger = try PostgresLedger(url: url, service: service, logger: logger)
        do {
            // Connecting first, so that a wrong password or a refused connection fails with its own reason.
            try await ledger.run("connect", within: .seconds(15)) { _ in }
            try await ledger.run("prepare its tables", within: .seconds(15)) { try await ledger.prepare(on: $0) }
        } catch {
            ledger.close()
            throw error
        }
        return ledger
    }

    /// A ledger on the database `url` names, not yet connected: ``open(url:service:logger:)`` also prepares
    /// the tables.
    public init(url: String, service: String, logger: Logger) throws {
        settings = try Settings(url: url)
        location = settings.display
        scope = service + "/"
        var quiet = logger
        quiet.logLevel = max(logger.logLevel, .notice)  // PostgresNIO logs each query at debug
        self.logger = quiet
        connections = LedgerConnections(maximum: 8, logger: quiet) { [settings] in
            try settings.connectionConfiguration()
        }
    }

    deinit { connections.close() }

    /// Closes the connections; the ledger cannot be used afterwards.
    public func close() { connections.close() }

    // MARK: IdempotencyLedger

    public func claim(handler: String, key rawKey: String, owner: String, lease: Duration) async throws -> LedgerClaim {
        let h = scope + handler
        let key = Self.stored(rawKey)
        let seconds = lease.seconds
        return try await run("claim a key") { [self] connection in
            // The claim is one statement: a new key is inserted, a key free again (released, or its lease
            // expired) taken over; the row lock makes concurrent claims of one key take turns.
            for _ in 0..<10 {
                let claimed = try await connection.execute(
                    LedgerStatements.ClaimKey(handler: h, key: key, owner: owner, seconds: seconds), logger: logger)
                for try await attempts in claimed { return .claimed(attempts: attempts) }
                let state = try await connection.query(
                    """
                    SELECT completed, lease_expires, coalesce(lease_expires > now(), false)
                    FROM choreo_ledger WHERE handler = \(h) AND key = \(key)
                    """, logger: logger)
                for try await (completed, expires, live) in state.decode((Bool, Date?, Bool).self) {
                    if completed {
                        return .completed(unpublished: try await unpublished(handler: h, key: key, on: connection))
                    }
                    if live, let expires { return .heldElsewhere(until: expires) }
                }
                // Released, expired or pruned between the two statements: claim again.
            }
            throw PostgresLedgerError("the key \(key) changed hands ten times in a row; giving up this claim")
        }
    }

    public func renew(handler: String, key rawKey: String, owner: String, lease: Duration) async throws -> Bool {
        let h = scope + handler
        let key = Self.stored(rawKey)
        let seconds = lease.seconds
        return try await run("renew a lease") { [self] connection in
            try await exists(
                connection.query(
                    """
                    UPDATE choreo_ledger SET lease_expires = now() + make_interval(secs => \(seconds))
                    WHERE handler = \(h) AND key = \(key) AND owner = \(owner) AND NOT completed RETURNING 1
                    """, logger: logger))
        }
    }

    /// One key: the group's statement with one request (see ``complete(_:)``).
    public func complete(handler: String, key: String, owner: String, outbox: [OutboxMessage]) async throws
        -> LedgerCompletion
    {
        try await complete([CompletionRequest(handler: handler, key: key, owner: owner, outbox: outbox)])[0]
    }

    public func markPublished(handler: String, key: String, indexes: [Int]) async throws {
        try await markPublished([PublishedEntries(handler: handler, key: key, indexes: indexes)])
    }

    public func release(handler: String, key rawKey: String, owner: String) async throws {
        let h = scope + handler
        let key = Self.stored(rawKey)
        try await run("release a lease") { [self] connection in
            _ = try await connection.query(
                """
                UPDATE choreo_ledger SET owner = NULL, lease_expires = NULL
                WHERE handler = \(h) AND key = \(key) AND owner = \(owner) AND NOT completed
                """, logger: logger)
        }
    }

    /// Drops every lease of the handler. The runtime never calls it for this ledger (other replicas may hold
    /// those leases); it is for an operator who knows that no replica runs.
    public func releaseAllLeases(handler: String) async throws {
        let h = scope + handler
        try await run("release the handler's leases") { [self] connection in
            _ = try await connection.query(
                """
                UPDATE choreo_ledger SET owner = NULL, lease_expires = NULL
                WHERE handler = \(h) AND NOT completed AND owner IS NOT NULL
                """, logger: logger)
        }
    }

    /// Deletes this service's keys completed before `date` whose outbox is all published (with their outbox
    /// rows), and keys claimed before `date` that were never completed and are not held (released after a
    /// dead letter, or abandoned), a thousand per transaction.
    public func prune(completedBefore date: Date) async throws -> Int {
        let prefix = Self.likePattern(scope)
        var removed = 0
        while !Task.isCancelled {
            let n = try await run("prune old keys") { [self] connection in
                let rows = try await connection.query(
                    """
                    DELETE FROM choreo_ledger WHERE ctid IN (
                        SELECT l.ctid FROM choreo_ledger l
                        WHERE l.handler LIKE \(prefix)
                          AND ((l.completed AND l.completed_at < \(date)
                                AND NOT EXISTS (
                                    SELECT 1 FROM choreo_outbox o
                                    WHERE o.handler = l.handler AND o.key = l.key AND NOT o.published))
                            OR (NOT l.completed AND l.claimed_at < \(date)
                                AND (l.owner IS NULL OR l.lease_expires <= now())))
                        LIMIT 1000)
                    RETURNING 1
                    """, logger: logger)
                var n = 0
                for try await _ in rows.decode(Int.self) { n += 1 }
                return n
            }
            removed += n
            if n < 1000 { break }
        }
        return removed
    }

    public func check() async throws {
        try await run("check it", within: .seconds(10)) { [self] in try await checkTables(on: $0) }
    }

    private func checkTables(on connection: PostgresConnection) async throws {
        let rows = try await connection.query(
            """
            SELECT pg_is_in_recovery(),
                has_table_privilege('choreo_ledger', 'INSERT, UPDATE, DELETE')
                AND has_table_privilege('choreo_outbox', 'INSERT, UPDATE, DELETE')
            """, logger: logger)
        var state: (Bool, Bool)?
        for try await row in rows.decode((Bool, Bool).self) where state == nil { state = row }
        guard let (standby, writable) = state else { throw PostgresLedgerError("no answer to the check") }
        if standby { throw PostgresLedgerError("the server is a read-only standby") }
        if !writable { throw PostgresLedgerError("the user may not write the ledger's tables") }
    }

    public func unpublished(handler: String, limit: Int) async throws -> [PendingOutbox] {
        let h = scope + handler
        return try await run("read unpublished outbox entries") { [self] connection in
            let rows = try await connection.query(
                """
                SELECT key, idx, exchange, routing_key, attributes, data FROM choreo_outbox
                WHERE handler = \(h) AND NOT published AND key IN (
                    SELECT DISTINCT key FROM choreo_outbox WHERE handler = \(h) AND NOT published LIMIT \(limit))
                ORDER BY key, idx
                """, logger: logger)
            var pending: [PendingOutbox] = []
            for try await row in rows.decode((String, Int, String, String, String, ByteBuffer).self) {
                let message = try Self.message(index: row.1, exchange: row.2, routingKey: row.3, row.4, row.5)
                let key = Self.original(row.0)
                if pending.last?.key == key {
                    pending[pending.count - 1].messages.append(message)
                } else {
                    pending.append(PendingOutbox(key: key, messages: [message]))
                }
            }
            return pending
        }
    }

    // MARK: Groups

    /// One (handler, key) as stored.
    private struct StoredKey: Hashable, Comparable {
        var handler: String
        var key: String
        static func < (a: Self, b: Self) -> Bool { (a.handler, a.key) < (b.handler, b.key) }
    }

    /// A handler's key as stored: the handler in this service's scope, the key escaped or hashed.
    private func storedKey(_ handler: String, _ key: String) -> StoredKey {
        StoredKey(handler: scope + handler, key: Self.stored(key))
    }

    /// Claims a group of keys with one statement (the runner claims every delivery that arrived together):
    /// rows locked in key order, so that two replicas claiming overlapping groups never deadlock. A key that
    /// appears twice is claimed by its first request and found held by the later ones.
    public func claim(_ requests: [ClaimRequest], lease: Duration) async throws -> [LedgerClaim] {
        if requests.count == 1, let r = requests.first {
            return [try await claim(handler: r.handler, key: r.key, owner: r.owner, lease: lease)]
        }
        var first: [StoredKey: Int] = [:]
        for (i, r) in requests.enumerated() {
            let k = storedKey(r.handler, r.key)
            if first[k] == nil { first[k] = i }
        }
        let order = first.sorted { $0.key < $1.key }
        let handlers = order.map(\.key.handler)
        let keys = order.map(\.key.key)
        let owners = order.map { requests[$0.value].owner }
        let seconds = lease.seconds
        let statement = LedgerStatements.ClaimKeys(handlers: handlers, keys: keys, owners: owners, seconds: seconds)
        let claimed: [StoredKey: (attempts: Int, until: Date)] = try await run("claim keys") { [self] connection in
            let rows = try await connection.execute(statement, logger: logger)
            var claimed: [StoredKey: (Int, Date)] = [:]
            for try await (h, k, attempts, until) in rows {
                claimed[StoredKey(handler: h, key: k)] = (attempts, until)
            }
            return claimed
        }
        var results = [LedgerClaim?](repeating: nil, count: requests.count)
        var others: [StoredKey: Int] = [:]
        for (k, i) in first {
            if let c = claimed[k] { results[i] = .claimed(attempts: c.attempts) } else { others[k] = i }
        }
        // Keys completed or held: what each one is, then the outbox entries of the completed ones.
        if !others.isEmpty {
            let states = try await states(of: Array(others.keys))
            for (k, i) in others {
                let r = requests[i]
                switch states[k] {
                case .completed(let unpublished)?: results[i] = .completed(unpublished: unpublished)
                case .held(let until)?: results[i] = .heldElsewhere(until: until)
                case nil:  // released, expired or pruned in between
                    results[i] = try await claim(handler: r.handler, key: r.key, owner: r.owner, lease: lease)
                }
            }
        }
        // Later requests for a key already requested in this group.
        for (i, r) in requests.enumerated() where results[i] == nil {
            let k = storedKey(r.handler, r.key)
            switch results[first[k]!] {
            case .claimed?: results[i] = .heldElsewhere(until: claimed[k]?.until ?? Date().addingTimeInterval(seconds))
            case let other?: results[i] = other
            case nil: break
            }
        }
        return results.map { $0! }
    }

    private enum KeyState: Sendable {
        case completed([OutboxMessage])
        case held(until: Date)
    }

    /// The keys that are completed (with their unpublished outbox entries) or held by a live lease; a key
    /// that is neither is missing from the result.
    private func states(of keys: [StoredKey]) async throws -> [StoredKey: KeyState] {
        let handlers = keys.map(\.handler)
        let names = keys.map(\.key)
        return try await run("read keys") { [self] connection in
            var states: [StoredKey: KeyState] = [:]
            let rows = try await connection.query(
                """
                SELECT l.handler, l.key, l.completed, l.lease_expires
                FROM choreo_ledger l JOIN unnest(\(handlers)::text[], \(names)::text[]) AS t(h, k)
                    ON l.handler = t.h AND l.key = t.k
                WHERE l.completed OR l.lease_expires > now()
                """, logger: logger)
            var completed: [StoredKey] = []
            for try await (h, k, done, until) in rows.decode((String, String, Bool, Date?).self) {
                let key = StoredKey(handler: h, key: k)
                if done {
                    states[key] = .completed([])
                    completed.append(key)
                } else if let until {
                    states[key] = .held(until: until)
                }
            }
            guard !completed.isEmpty else { return states }
            let entries = try await connection.query(
                """
                SELECT o.handler, o.key, o.idx, o.exchange, o.routing_key, o.attributes, o.data
                FROM choreo_outbox o
                JOIN unnest(\(completed.map(\.handler))::text[], \(completed.map(\.key))::text[]) AS t(h, k)
                    ON o.handler = t.h AND o.key = t.k
                WHERE NOT o.published ORDER BY o.handler, o.key, o.idx
                """, logger: logger)
            var pending: [StoredKey: [OutboxMessage]] = [:]
            for try await row in entries.decode((String, String, Int, String, String, String, ByteBuffer).self) {
                pending[StoredKey(handler: row.0, key: row.1), default: []].append(
                    try Self.message(index: row.2, exchange: row.3, routingKey: row.4, row.5, row.6))
            }
            for (key, messages) in pending { states[key] = .completed(messages) }
            return states
        }
    }

    /// Completes a group of keys with one statement, one round trip and one commit (the disk sync the group
    /// shares), rows locked in key order so that replicas never deadlock: each key only by its lease's owner,
    /// together with its outbox. A key not completed so (rare: its lease expired and passed on, or another
    /// invocation completed it) is looked up afterwards: completed before, it gives its unpublished entries back;
    /// otherwise its lease was lost and it is left alone.
    public func complete(_ requests: [CompletionRequest]) async throws -> [LedgerCompletion] {
        var index: [StoredKey: Int] = [:]
        var statement = LedgerStatements.CompleteKeys()
        for (i, r) in requests.enumerated() {
            let key = storedKey(r.handler, r.key)
            index[key] = i
            statement.handlers.append(key.handler)
            statement.keys.append(key.key)
            statement.owners.append(r.owner)
            for m in r.outbox {
                statement.entryHandlers.append(key.handler)
                statement.entryKeys.append(key.key)
                statement.entryIndexes.append(m.index)
                statement.exchanges.append(m.exchange)
                statement.routingKeys.append(m.routingKey)
                statement.attributes.append(SQLiteLedger.encodeAttributes(m.envelope))
                statement.data.append(ByteBuffer(bytes: m.envelope.data))
            }
        }
        let done: Set<StoredKey> = try await run("complete keys") { [self, statement] connection in
            var done = Set<StoredKey>()
            for try await (h, k) in try await connection.execute(statement, logger: logger) {
                done.insert(StoredKey(handler: h, key: k))
            }
            return done
        }
        var results = [LedgerCompletion](repeating: .leaseLost, count: requests.count)
        var others: [StoredKey] = []
        for (key, i) in index {
            if done.contains(key) { results[i] = .committed } else { others.append(key) }
        }
        if !others.isEmpty {
            let states = try await states(of: others)
            for key in others {
                if case .completed(let unpublished)? = states[key] {
                    results[index[key]!] = .alreadyCompleted(unpublished: unpublished)
                }
            }
        }
        return results
    }

    /// Records a group's confirmed outbox entries with one statement.
    public func markPublished(_ entries: [PublishedEntries]) async throws {
        var handlers: [String] = []
        var keys: [String] = []
        var indexes: [Int] = []
        for e in entries {
            for i in e.indexes {
                handlers.append(scope + e.handler)
                keys.append(Self.stored(e.key))
                indexes.append(i)
            }
        }
        guard !handlers.isEmpty else { return }
        let statement = LedgerStatements.RecordPublished(handlers: handlers, keys: keys, indexes: indexes)
        try await run("record published outbox entries") { [self] connection in
            _ = try await connection.execute(statement, logger: logger)
        }
    }

    // MARK: Storage

    /// Creates the tables, or checks the version of those found; one replica at a time (an advisory lock),
    /// since concurrent `CREATE TABLE IF NOT EXISTS` can collide.
    private func prepare(on connection: PostgresConnection) async throws {
        // Keys and event attributes are any Unicode text, sent as UTF-8 under the database's own client encoding
        // (PostgresNIO sets none). A database in another encoding refuses, one event at a time, the keys that are
        // not valid in it (EUC_JP: "invalid byte sequence"), and the runner would hold those events for minutes
        // before giving them back; LATIN1 takes any bytes but shows other clients garbled keys. So the database
        // is refused at start instead. SQL_ASCII stores the bytes as they come, which keeps UTF-8 intact.
        let encoding = try await first(connection.query("SHOW server_encoding", logger: logger), as: String.self)
        if let encoding, !Self.acceptedEncodings.contains(encoding) {
            throw PostgresLedgerError(
                "the database's encoding is \(encoding); the ledger needs UTF8 (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
            )
        }
        try await transaction(on: connection) {
            try await connection.query("SELECT pg_advisory_xact_lock(\(Self.advisoryLock))", logger: logger)
            for statement in Self.schema {
                try await connection.query(PostgresQuery(unsafeSQL: statement), logger: logger)
            }
            let version = try await first(
                connection.query(
                    "SELECT value FROM choreo_ledger_meta WHERE name = 'schema_version'", logger: logger),
                as: String.self)
            guard let version, let number = Int(version) else {
                throw PostgresLedgerError("choreo_ledger_meta has no schema version")
            }
            if number > Self.schemaVersion {
                throw PostgresLedgerError(
                    "the tables are of schema version \(number), made by a newer Choreo (this one knows \(Self.schemaVersion))"
                )
            }
        }
    }

    /// Server encodings that hold every key: UTF8, and SQL_ASCII, which stores the client's bytes unchanged.
    static let acceptedEncodings: Set<String> = ["UTF8", "SQL_ASCII"]

    /// "choreo" in ASCII: the advisory lock that serializes preparing the tables.
    static let advisoryLock: Int = 0x63_686F_7265_6F

    static let schema = [
        """
        CREATE TABLE IF NOT EXISTS choreo_ledger (
            handler text NOT NULL,
            key text NOT NULL,
            completed boolean NOT NULL DEFAULT false,
            owner text,
            lease_expires timestamptz,
            attempts integer NOT NULL DEFAULT 0,
            claimed_at timestamptz NOT NULL DEFAULT now(),
            completed_at timestamptz,
            PRIMARY KEY (handler, key))
        """,
        "CREATE INDEX IF NOT EXISTS choreo_ledger_completed_at ON choreo_ledger (completed_at) WHERE completed",
        "CREATE INDEX IF NOT EXISTS choreo_ledger_claimed_at ON choreo_ledger (claimed_at) WHERE NOT completed",
        """
        CREATE TABLE IF NOT EXISTS choreo_outbox (
            handler text NOT NULL,
            key text NOT NULL,
            idx bigint NOT NULL,
            exchange text NOT NULL,
            routing_key text NOT NULL,
            attributes text NOT NULL,
            data bytea NOT NULL,
            published boolean NOT NULL DEFAULT false,
            PRIMARY KEY (handler, key, idx),
            FOREIGN KEY (handler, key) REFERENCES choreo_ledger (handler, key) ON DELETE CASCADE)
        """,
        "CREATE INDEX IF NOT EXISTS choreo_outbox_unpublished ON choreo_outbox (handler, key) WHERE NOT published",
        "CREATE TABLE IF NOT EXISTS choreo_ledger_meta (name text PRIMARY KEY, value text NOT NULL)",
        "INSERT INTO choreo_ledger_meta VALUES ('schema_version', '\(schemaVersion)') ON CONFLICT DO NOTHING",
    ]

    /// The key's outbox entries not recorded as published, in emit order.
    private func unpublished(handler h: String, key: String, on connection: PostgresConnection) async throws
        -> [OutboxMessage]
    {
        let query: PostgresQuery = """
            SELECT idx, exchange, routing_key, attributes, data FROM choreo_outbox
            WHERE handler = \(h) AND key = \(key) AND NOT published ORDER BY idx
            """
        let rows = try await connection.query(query, logger: logger)
        var messages: [OutboxMessage] = []
        for try await row in rows.decode((Int, String, String, String, ByteBuffer).self) {
            messages.append(try Self.message(index: row.0, exchange: row.1, routingKey: row.2, row.3, row.4))
        }
        return messages
    }

    private static func message(
        index: Int, exchange: String, routingKey: String, _ attributes: String, _ data: ByteBuffer
    )
        throws -> OutboxMessage
    {
        var envelope = try SQLiteLedger.decodeAttributes(attributes)
        envelope.data = Data(data.readableBytesView)
        return OutboxMessage(index: index, envelope: envelope, exchange: exchange, routingKey: routingKey)
    }

    /// A key as stored. PostgreSQL's text holds no NUL character, which an `idempotencykey` header may carry,
    /// so a key with a NUL or a backslash is escaped (a backslash doubled, a NUL as backslash-0); others are as
    /// given. A key longer than 1,024 bytes is stored as backslash-h and its SHA-256 in hex: the primary key's
    /// index takes about 2.6 KB at most, and a longer key would fail every claim.
    static func stored(_ key: String) -> String {
        if key.utf8.count > 1024 {
            return "\\h" + SHA256.hash(data: Data(key.utf8)).map { String(format: "%02x", $0) }.joined()
        }
        if isHashed(key) { return key }  // as ``original(_:)`` gives a hashed key back
        guard key.utf8.contains(where: { $0 == 0 || $0 == UInt8(ascii: "\\") }) else { return key }
        var out = ""
        for c in key.unicodeScalars {
            switch c {
            case "\0": out += "\\0"
            case "\\": out += "\\\\"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }

    /// The key ``stored(_:)`` wrote; a hashed key as stored (it cannot be undone, and ``stored(_:)`` keeps it).
    static func original(_ stored: String) -> String {
        guard stored.utf8.contains(UInt8(ascii: "\\")), !isHashed(stored) else { return stored }
        var out = ""
        var escaped = false
        for c in stored.unicodeScalars {
            if escaped {
                out.unicodeScalars.append(c == "0" ? "\0" : c)
                escaped = false
            } else if c == "\\" {
                escaped = true
            } else {
                out.unicodeScalars.append(c)
            }
        }
        return out
    }

    /// Backslash-h and 64 hex digits: what escaping never makes (it doubles a backslash, or follows it with 0).
    static func isHashed(_ key: String) -> Bool {
        let u = Array(key.utf8)
        return u.count == 66 && u[0] == UInt8(ascii: "\\") && u[1] == UInt8(ascii: "h")
            && u[2...].allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }

    /// `text` as a LIKE pattern matching itself followed by anything.
    static func likePattern(_ text: String) -> String {
        var out = ""
        for c in text {
            if c == "%" || c == "_" || c == "\\" { out.append("\\") }
            out.append(c)
        }
        return out + "%"
    }

    // MARK: Errors

    /// Runs `body` on a connection of its own, at most `limit`, turning PostgresNIO's errors (whose descriptions
    /// say nothing, on purpose) into ones that say what failed, without the password.
    ///
    /// A call whose time is up fails at once, and its connection is closed, which fails the query it waits
    /// for. The caller does not wait for the call to end: PostgresNIO can leave a query unanswered for good
    /// (one written just as its connection closed), so the call is left to end on its own, or never.
    @discardableResult
    private func run<T: Sendable>(
        _ operation: String, within limit: Duration = .seconds(30),
        _ body: @escaping @Sendable (PostgresConnection) async throws -> T
    ) async throws -> T {
        let outcome = await withCheckedContinuation {
            (continuation: CheckedContinuation<Result<T, any Error>, Never>) in
            let done = Mutex(false)
            let finish: @Sendable (Result<T, any Error>) -> Bool = { result in
                guard
                    done.withLock({ d in
                        defer { d = true }; return !d
                    })
                else { return false }
                continuation.resume(returning: result)
                return true
            }
            let work = Task {
                do {
                    _ = finish(.success(try await self.connections.with(body)))
                } catch {
                    _ = finish(.failure(error))
                }
            }
            // The time is up: cancelling the call closes its connection (see `LedgerConnections.with`).
            let timer = Task {
                try await Task.sleep(for: limit)
                if finish(.failure(PostgresLedgerError("no answer within \(Int(limit.seconds)) s"))) { work.cancel() }
            }
            Task {
                await work.value
                timer.cancel()
            }
        }
        switch outcome {
        case .success(let value):
            return value
        case .failure(let error as PostgresLedgerError):
            throw PostgresLedgerError("PostgreSQL ledger \(location): cannot \(operation): \(error.description)")
        case .failure(let error):
            throw PostgresLedgerError("PostgreSQL ledger \(location): cannot \(operation): \(Self.reason(error))")
        }
    }

    /// `body` in a transaction on `connection`. Unlike PostgresNIO's `withTransaction`, no `ROLLBACK` is sent on
    /// a connection that has closed (a query written to a closed connection may never be answered); the server
    /// rolls an interrupted transaction back by itself.
    private func transaction<T>(on connection: PostgresConnection, _ body: () async throws -> T) async throws -> T {
        try await connection.query("BEGIN", logger: logger)
        do {
            let value = try await body()
            try await connection.query("COMMIT", logger: logger)
            return value
        } catch {
            if !connection.isClosed { _ = try? await connection.query("ROLLBACK", logger: logger) }
            throw error
        }
    }

    static func reason(_ error: any Error) -> String {
        guard let e = error as? PSQLError else { return String(describing: error) }
        if let info = e.serverInfo, let message = info[.message] {
            let state = info[.sqlState].map { " (SQLSTATE \($0))" } ?? ""
            return message + state
        }
        if let underlying = e.underlying {
            let text = String(describing: underlying)
            // NIO's words for it: "Connection errors: SingleConnectionFailure(target: ..., error: connection reset
            // (error set): Connection refused (errno: 111))".
            return text.contains("Connection refused") ? "connection refused" : text
        }
        switch e.code {
        case .serverClosedConnection: return "the server closed the connection"
        case .clientClosedConnection:
            return "the connection was closed (the call took too long, or the ledger was closed)"
        case .authMechanismRequiresPassword: return "the server asks for a password and none was given (PGPASSWORD)"
        case .sslUnsupported: return "the server does not offer TLS (sslmode=require)"
        default: return "\(e.code)"
        }
    }
}

/// A PostgreSQL ledger failure, with what failed and why; never the password.
public struct PostgresLedgerError: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}

/// Whether a statement returned a row.
private func exists(_ rows: PostgresRowSequence) async throws -> Bool {
    var found = false
    for try await _ in rows { found = true }
    return found
}

/// The first row's column, decoded; nil when there is no row.
private func first<T: PostgresDecodable & Sendable>(_ rows: PostgresRowSequence, as type: T.Type) async throws -> T? {
    var result: T?
    for try await value in rows.decode(T.self) where result == nil { result = value }
    return result
}

/// A ledger URL's parts.
struct Settings: Sendable {
    /// `sslmode` as libpq reads it: `prefer` and `require` encrypt without checking the certificate,
    /// `verify-full` checks it and the host name against the system's trust store.
    enum TLSMode: String, Sendable {
        case disable, prefer, require
        case verifyFull = "verify-full"
    }

    var host: String
    var port: Int
    var user: String
    var password: String?
    var database: String?
    var tls: TLSMode
    /// The URL with the password masked.
    var display: String

    init(url: String, environment: [String: String] = ProcessInfo.processInfo.environment) throws {
        let display = LedgerURL.redacted(url)
        // A usage error (the executable exits 2), as any other wrong option value.
        func bad(_ why: String) -> ConfigurationError { ConfigurationError("--ledger \(display): \(why)") }
        guard let c = URLComponents(string: url), let scheme = c.scheme?.lowercased(),
            PostgresLedger.urlSchemes.contains(scheme)
        else {
            throw bad("expected postgres://user[:password]@host[:port]/database")
        }
        guard var host = c.host, !host.isEmpty else { throw bad("no host") }
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard let user = c.user, !user.isEmpty else { throw bad("no user") }
        let port = c.port ?? 5432
        guard (1...65_535).contains(port) else { throw bad("port \(port) is out of range") }
        let path = c.path.hasPrefix("/") ? String(c.path.dropFirst()) : c.path
        guard !path.contains("/") else { throw bad("the path must be a database name") }
        var tls = TLSMode.prefer
        for item in c.queryItems ?? [] {
            guard item.name == "sslmode" else {
                throw bad("unknown parameter '\(item.name)' (only sslmode is understood)")
            }
            guard let mode = item.value.flatMap(TLSMode.init(rawValue:)) else {
                throw bad("sslmode must be disable, prefer, require or verify-full, not '\(item.value ?? "")'")
            }
            tls = mode
        }
        self.host = host
        self.port = port
        self.user = user
        self.password = c.password ?? environment["PGPASSWORD"]
        self.database = path.isEmpty ? nil : path
        self.tls = tls
        self.display = display
    }

    private var tlsConfiguration: TLSConfiguration {
        var configuration = TLSConfiguration.makeClientConfiguration()
        if tls != .verifyFull { configuration.certificateVerification = .none }
        return configuration
    }

    func connectionConfiguration() throws -> PostgresConnection.Configuration {
        let mode: PostgresConnection.Configuration.TLS =
            switch tls {
            case .disable: .disable
            case .prefer: .prefer(try NIOSSLContext(configuration: tlsConfiguration))
            case .require, .verifyFull: .require(try NIOSSLContext(configuration: tlsConfiguration))
            }
        var configuration = PostgresConnection.Configuration(
            host: host, port: port, username: user, password: password, database: database, tls: mode)
        configuration.options.connectTimeout = .seconds(5)
        // The ledger's statements are prepared (`LedgerStatements`), but planned at each call: a generic plan made
        // while the tables were nearly empty stays until the statistics catch up, and in the chain benchmark it
        // doubled the latency of a fresh database's first 20 s (median 43-51 ms against 24-28 ms). PostgreSQL 12+.
        configuration.options.additionalStartupParameters = [("plan_cache_mode", "force_custom_plan")]
        return configuration
    }
}
