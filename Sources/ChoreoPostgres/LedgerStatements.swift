import Foundation
import PostgresNIO

/// The statements on an event's path, prepared once per connection (PostgresNIO names them after their types), so
/// that the server parses each one once, not at every call; each call is planned afresh (`plan_cache_mode`, see
/// `Settings.connectionConfiguration`).
enum LedgerStatements {
    /// How a claim takes over a key that exists: only one not completed, whose lease this owner holds, was
    /// released, or has expired; the row lock makes concurrent claims of one key take turns.
    static let takeOver = """
        ON CONFLICT (handler, key) DO UPDATE
        SET owner = excluded.owner, lease_expires = excluded.lease_expires, attempts = l.attempts + 1,
            claimed_at = now()
        WHERE NOT l.completed AND (l.owner IS NULL OR l.owner = excluded.owner OR l.lease_expires <= now())
        """

    /// Claims one key: inserts it, or takes it over when it is free again (released, or its lease expired).
    struct ClaimKey: PostgresPreparedStatement {
        static let sql = """
            INSERT INTO choreo_ledger AS l (handler, key, owner, lease_expires, attempts, claimed_at)
            VALUES ($1, $2, $3, now() + make_interval(secs => $4), 1, now())
            \(takeOver)
            RETURNING l.attempts
            """
        typealias Row = Int
        var handler: String
        var key: String
        var owner: String
        var seconds: Double

        func makeBindings() -> PostgresBindings {
            var bindings = PostgresBindings(capacity: 4)
            bindings.append(handler)
            bindings.append(key)
            bindings.append(owner)
            bindings.append(seconds)
            return bindings
        }

        func decodeRow(_ row: PostgresRow) throws -> Row { try row.decode(Int.self) }
    }

    /// Claims a group of distinct keys, in key order (so that replicas claiming overlapping groups take the rows'
    /// locks in the same order); returns the keys claimed.
    struct ClaimKeys: PostgresPreparedStatement {
        static let sql = """
            INSERT INTO choreo_ledger AS l (handler, key, owner, lease_expires, attempts, claimed_at)
            SELECT h, k, o, now() + make_interval(secs => $4), 1, now()
            FROM unnest($1::text[], $2::text[], $3::text[]) AS t(h, k, o) ORDER BY h, k
            \(takeOver)
            RETURNING l.handler, l.key, l.attempts, l.lease_expires
            """
        typealias Row = (String, String, Int, Date)
        var handlers: [String]
        var keys: [String]
        var owners: [String]
        var seconds: Double

        func makeBindings() -> PostgresBindings {
            var bindings = PostgresBindings(capacity: 4)
            bindings.append(handlers)
            bindings.append(keys)
            bindings.append(owners)
            bindings.append(seconds)
            return bindings
        }

        func decodeRow(_ row: PostgresRow) throws -> Row { try row.decode(Row.self) }
    }

    /// Completes the group's keys that each owner still holds, with their outbox entries, in one statement
    /// (data-modifying CTEs run atomically; `mine` locks the rows in key order first); returns the keys completed.
    struct CompleteKeys: PostgresPreparedStatement {
        static let sql = """
            WITH mine AS (
                SELECT l.handler, l.key FROM choreo_ledger l
                JOIN unnest($1::text[], $2::text[], $3::text[]) AS t(h, k, o)
                    ON l.handler = t.h AND l.key = t.k AND l.owner = t.o
                WHERE NOT l.completed ORDER BY l.handler, l.key FOR UPDATE OF l
            ), done AS (
                UPDATE choreo_ledger l SET completed = true, owner = NULL, lease_expires = NULL, completed_at = now()
                FROM mine WHERE l.handler = mine.handler AND l.key = mine.key
                RETURNING l.handler, l.key
            ), added AS (
                INSERT INTO choreo_outbox (handler, key, idx, exchange, routing_key, attributes, data)
                SELECT o.h, o.k, o.i, o.x, o.r, o.a, o.d
                FROM unnest($4::text[], $5::text[], $6::bigint[], $7::text[], $8::text[], $9::text[], $10::bytea[])
                    AS o(h, k, i, x, r, a, d)
                JOIN done ON done.handler = o.h AND done.key = o.k
            )
            SELECT handler, key FROM done
            """
        typealias Row = (String, String)
        var handlers: [String] = []
        var keys: [String] = []
        var owners: [String] = []
        /// The outbox entries, column by column: handler, key, index, exchange, routing key, attributes, data.
        var entryHandlers: [String] = []
        var entryKeys: [String] = []
        var entryIndexes: [Int] = []
        var exchanges: [String] = []
        var routingKeys: [String] = []
        var attributes: [String] = []
        var data: [ByteBuffer] = []

        func makeBindings() -> PostgresBindings {
            var bindings = PostgresBindings(capacity: 10)
            bindings.append(handlers)
            bindings.append(keys)
            bindings.append(owners)
            bindings.append(entryHandlers)
            bindings.append(entryKeys)
            bindings.append(entryIndexes)
            bindings.append(exchanges)
            bindings.append(routingKeys)
            bindings.append(attributes)
            bindings.append(data)
            return bindings
        }

        func decodeRow(_ row: PostgresRow) throws -> Row { try row.decode(Row.self) }
    }

    /// Records confirmed outbox entries without waiting for the disk (`synchronous_commit` off for this statement's
    /// transaction only): a record lost in a crash of the server costs copies, not events.
    struct RecordPublished: PostgresPreparedStatement {
        static let sql = """
            WITH quick AS (SELECT set_config('synchronous_commit', 'off', true))
            UPDATE choreo_outbox o SET published = true
            FROM quick, unnest($1::text[], $2::text[], $3::bigint[]) AS t(h, k, i)
            WHERE o.handler = t.h AND o.key = t.k AND o.idx = t.i AND NOT o.published
            """
        typealias Row = ()
        var handlers: [String]
        var keys: [String]
        var indexes: [Int]

        func makeBindings() -> PostgresBindings {
            var bindings = PostgresBindings(capacity: 3)
            bindings.append(handlers)
            bindings.append(keys)
            bindings.append(indexes)
            return bindings
        }

        func decodeRow(_ row: PostgresRow) throws -> Row {}
    }
}
