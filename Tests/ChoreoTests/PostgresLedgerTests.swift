import ChoreoAMQP
import Foundation
import Logging
import PostgresNIO
import TestEvents
import Testing

@testable import Choreo
@testable import ChoreoPostgres

/// The PostgreSQL server the shared ledger's tests use (started by scripts/test.sh, scripts/postgres.sh).
enum Postgres {
    static func url() throws -> String {
        try #require(
            ProcessInfo.processInfo.environment["CHOREO_TEST_POSTGRES_URL"],
            "CHOREO_TEST_POSTGRES_URL is not set: run the tests through scripts/test.sh, which starts PostgreSQL")
    }

    /// A ledger of a service of its own, so that tests never see each other's keys.
    static func ledger(service: String = "svc-\(UUID().uuidString.prefix(8).lowercased())") async throws
        -> PostgresLedger
    {
        try await PostgresLedger.open(url: try url(), service: service, logger: Logger(label: "test"))
    }

    /// Runs `scripts/postgres.sh COMMAND <the tests' server>` (pause, resume).
    static func script(_ command: String) throws {
        _ = try runScript(
            "postgres.sh", [command, try #require(ProcessInfo.processInfo.environment["CHOREO_TEST_POSTGRES_NAME"])])
    }

    /// Runs one statement as the tests' role, on `database` (by default the URL's); a failure says the server's
    /// message.
    static func execute(_ sql: String, database: String? = nil) async throws {
        let c = try #require(URLComponents(string: try url()))
        let configuration = PostgresConnection.Configuration(
            host: c.host ?? "127.0.0.1", port: c.port ?? 5432, username: c.user ?? "", password: c.password,
            database: database ?? String(c.path.dropFirst()), tls: .disable)
        let connection = try await PostgresConnection.connect(
            configuration: configuration, id: 1, logger: Logger(label: "test"))
        let outcome: Result<Void, any Error>
        do {
            try await connection.query(PostgresQuery(unsafeSQL: sql), logger: Logger(label: "test"))
            outcome = .success(())
        } catch {
            outcome = .failure(PostgresLedgerError(PostgresLedger.reason(error)))
        }
        try await connection.close()
        try outcome.get()
    }

    /// The server's URL with another password.
    static func url(password: String) throws -> String {
        var c = try #require(URLComponents(string: try url()))
        c.password = password
        return try #require(c.string)
    }
}

@Suite("PostgreSQL ledger", .serialized, .timeLimit(.minutes(3)))
struct PostgresLedgerTests {

    @Test("claim, a live lease, completion with the outbox, duplicates and confirms, as with the SQLite ledger")
    func protocolSteps() async throws {
        let l = try await Postgres.ledger()
        defer { l.close() }
        #expect(!l.isExclusiveToOneProcess)
        #expect(try await l.claim(handler: "h", key: "k", owner: "a", lease: .seconds(60)) == .claimed(attempts: 1))
        guard
            case .heldElsewhere(let until) = try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60))
        else {
            Issue.record("a live lease must hold the key for its owner"); return
        }
        #expect(until > Date().addingTimeInterval(50))
        #expect(try await l.renew(handler: "h", key: "k", owner: "a", lease: .seconds(60)))
        #expect(try await !l.renew(handler: "h", key: "k", owner: "b", lease: .seconds(60)))
        #expect(
            try await l.complete(handler: "h", key: "k", owner: "b", outbox: []) == .leaseLost,
            "only the lease's owner completes the key")
        let out = try sampleOutbox(2)
        #expect(try await l.complete(handler: "h", key: "k", owner: "a", outbox: out) == .committed)
        #expect(
            try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60)) == .completed(unpublished: out))
        #expect(try await l.unpublished(handler: "h", limit: 10) == [PendingOutbox(key: "k", messages: out)])
        try await l.markPublished(handler: "h", key: "k", indexes: [0])
        #expect(
            try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60))
                == .completed(unpublished: [out[1]]))
        try await l.markPublished([PublishedEntries(handler: "h", key: "k", indexes: [1])])
        #expect(
            try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60)) == .completed(unpublished: []))
        #expect(try await l.unpublished(handler: "h", limit: 10).isEmpty)
        #expect(
            try await l.complete(handler: "h", key: "k", owner: "a", outbox: out) == .alreadyCompleted(unpublished: []),
            "a second completion writes nothing")
        try await l.check()
    }

    @Test("a released key is claimed again at once; an expired lease passes on, and its first owner cannot complete")
    func releaseAndExpiry() async throws {
        let l = try await Postgres.ledger()
        defer { l.close() }
        #expect(try await l.claim(handler: "h", key: "r", owner: "a", lease: .seconds(60)) == .claimed(attempts: 1))
        try await l.release(handler: "h", key: "r", owner: "a")
        #expect(try await l.claim(handler: "h", key: "r", owner: "b", lease: .seconds(60)) == .claimed(attempts: 2))

        #expect(try await l.claim(handler: "h", key: "e", owner: "a", lease: .seconds(1)) == .claimed(attempts: 1))
        let taken = await eventually(within: 10) {
            try? await l.claim(handler: "h", key: "e", owner: "b", lease: .seconds(60))
        } until: {
            $0 == .claimed(attempts: 2)
        }
        #expect(taken == .claimed(attempts: 2), "the lease expired after 1 s")
        #expect(try await l.complete(handler: "h", key: "e", owner: "a", outbox: []) == .leaseLost)
        #expect(try await !l.renew(handler: "h", key: "e", owner: "a", lease: .seconds(60)))
        #expect(try await l.complete(handler: "h", key: "e", owner: "b", outbox: []) == .committed)
    }

    @Test("two replicas racing for the same 200 keys: each key is claimed and completed by exactly one")
    func replicasRace() async throws {
        let service = "race-\(UUID().uuidString.prefix(8).lowercased())"
        let first = try await Postgres.ledger(service: service)
        let second = try await Postgres.ledger(service: service)
        defer {
            first.close()
            second.close()
        }
        let keys = (0..<200).map { "key-\($0)" }
        /// The keys this replica claimed, and those it completed.
        func work(_ ledger: PostgresLedger, owner: String) async throws -> (claimed: [String], won: [String]) {
            var claimed: [String] = []
            var won: [String] = []
            for key in keys {
                guard case .claimed = try await ledger.claim(handler: "h", key: key, owner: owner, lease: .seconds(60))
                else { continue }
                claimed.append(key)
                if try await ledger.complete(handler: "h", key: key, owner: owner, outbox: try sampleOutbox(1))
                    == .committed
                {
                    won.append(key)
                }
            }
            return (claimed, won)
        }
        async let a = work(first, owner: "replica-a")
        async let b = work(second, owner: "replica-b")
        let ((claimedA, wonA), (claimedB, wonB)) = try await (a, b)
        #expect(Set(claimedA).isDisjoint(with: claimedB), "a key held by one replica is never claimed by the other")
        #expect(wonA == claimedA && wonB == claimedB, "every claim completes")
        #expect(wonA.count + wonB.count == keys.count)
        #expect(Set(wonA).isDisjoint(with: wonB))
        #expect(Set(wonA).union(wonB) == Set(keys))
        #expect(try await first.unpublished(handler: "h", limit: 1000).count == keys.count)
    }

    @Test("groups: one claim for many keys (new, repeated, completed, held), one transaction completing many")
    func groups() async throws {
        let l = try await Postgres.ledger()
        defer { l.close() }
        let out = try sampleOutbox(2)
        _ = try await l.claim(handler: "h", key: "done", owner: "x", lease: .seconds(60))
        #expect(try await l.complete(handler: "h", key: "done", owner: "x", outbox: out) == .committed)
        try await l.markPublished(handler: "h", key: "done", indexes: [0])
        _ = try await l.claim(handler: "h", key: "held", owner: "x", lease: .seconds(60))

        let claims = try await l.claim(
            ["new-1", "done", "held", "new-2", "new-1"].map { ClaimRequest(handler: "h", key: $0, owner: "o-\($0)") },
            lease: .seconds(60))
        #expect(claims.count == 5)
        #expect(claims[0] == .claimed(attempts: 1))
        #expect(claims[1] == .completed(unpublished: [out[1]]))
        guard case .heldElsewhere = claims[2], case .heldElsewhere = claims[4] else {
            Issue.record("a held key, and a key's second request in the group, are held: \(claims)"); return
        }
        #expect(claims[3] == .claimed(attempts: 1))

        // Completed: both new keys; lease lost: "held" (owner x holds it); already completed: "done".
        let completions = try await l.complete([
            CompletionRequest(handler: "h", key: "new-2", owner: "o-new-2", outbox: out),
            CompletionRequest(handler: "h", key: "held", owner: "o-held", outbox: []),
            CompletionRequest(handler: "h", key: "new-1", owner: "o-new-1", outbox: [out[0]]),
            CompletionRequest(handler: "h", key: "done", owner: "o-done", outbox: []),
        ])
        #expect(completions == [.committed, .leaseLost, .committed, .alreadyCompleted(unpublished: [out[1]])])
        #expect(
            Set(try await l.unpublished(handler: "h", limit: 10)) == [
                PendingOutbox(key: "done", messages: [out[1]]), PendingOutbox(key: "new-1", messages: [out[0]]),
                PendingOutbox(key: "new-2", messages: out),
            ])
        try await l.markPublished([
            PublishedEntries(handler: "h", key: "new-2", indexes: [0, 1]),
            PublishedEntries(handler: "h", key: "done", indexes: [1]),
        ])
        #expect(try await l.unpublished(handler: "h", limit: 10) == [PendingOutbox(key: "new-1", messages: [out[0]])])
    }

    @Test("two replicas claiming overlapping groups in opposite orders neither deadlock nor share a key")
    func groupsRace() async throws {
        let service = "groups-\(UUID().uuidString.prefix(8).lowercased())"
        let first = try await Postgres.ledger(service: service)
        let second = try await Postgres.ledger(service: service)
        defer {
            first.close()
            second.close()
        }
        let keys = (0..<300).map { "key-\($0)" }
        func work(_ ledger: PostgresLedger, owner: String, keys: [String]) async throws -> [String] {
            var claimed: [String] = []
            for start in stride(from: 0, to: keys.count, by: 20) {
                let group = Array(keys[start..<min(start + 20, keys.count)])
                let results = try await ledger.claim(
                    group.map { ClaimRequest(handler: "h", key: $0, owner: owner) }, lease: .seconds(60))
                let mine = zip(group, results).compactMap { k, r -> String? in
                    if case .claimed = r { return k } else { return nil }
                }
                claimed += mine
                let done = try await ledger.complete(
                    mine.map { CompletionRequest(handler: "h", key: $0, owner: owner, outbox: []) })
                #expect(done.allSatisfy { $0 == .committed })
            }
            return claimed
        }
        async let a = work(first, owner: "a", keys: keys)
        async let b = work(second, owner: "b", keys: keys.reversed())
        let (claimedA, claimedB) = try await (a, b)
        #expect(Set(claimedA).isDisjoint(with: claimedB))
        #expect(Set(claimedA).union(claimedB) == Set(keys))
    }

    @Test("services sharing the database keep their keys apart; keys with NUL, backslashes or 8,000 bytes work")
    func scopesAndOddKeys() async throws {
        let one = try await Postgres.ledger()
        let two = try await Postgres.ledger()
        defer {
            one.close()
            two.close()
        }
        let odd = ["a\u{0}b", "back\\slash", "\\0", "\\", "\u{0}", "日本 🎉 100% _x_"]
        for key in odd {
            #expect(
                try await one.claim(handler: "h", key: key, owner: "o", lease: .seconds(60)) == .claimed(attempts: 1))
            #expect(
                try await one.complete(handler: "h", key: key, owner: "o", outbox: try sampleOutbox(1)) == .committed)
            #expect(
                try await two.claim(handler: "h", key: key, owner: "o", lease: .seconds(60)) == .claimed(attempts: 1),
                "another service's key of the same name is its own")
        }
        #expect(Set(try await one.unpublished(handler: "h", limit: 100).map(\.key)) == Set(odd))
        #expect(try await two.unpublished(handler: "h", limit: 100).isEmpty)
        #expect(PostgresLedger.original(PostgresLedger.stored("x\\0y")) == "x\\0y")
        // A key too long for the index is stored hashed; a completed one is found again, and the form the sweep
        // gets back records its confirms.
        // Random letters: PostgreSQL compresses index entries, so a repetitive key would fit.
        let letters = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        let long = String((0..<8000).map { _ in letters.randomElement()! })
        #expect(try await one.claim(handler: "h", key: long, owner: "o", lease: .seconds(60)) == .claimed(attempts: 1))
        let out = try sampleOutbox(1)
        #expect(try await one.complete(handler: "h", key: long, owner: "o", outbox: out) == .committed)
        #expect(
            try await one.claim(handler: "h", key: long, owner: "p", lease: .seconds(60))
                == .completed(unpublished: out))
        let hashed = try #require(
            try await one.unpublished(handler: "h", limit: 100).first { PostgresLedger.isHashed($0.key) })
        try await one.markPublished(handler: "h", key: hashed.key, indexes: [0])
        #expect(
            try await one.claim(handler: "h", key: long, owner: "p", lease: .seconds(60)) == .completed(unpublished: [])
        )
    }

    @Test("the outbox keeps every attribute of an emitted event, byte for byte")
    func attributesRoundTrip() async throws {
        let l = try await Postgres.ledger()
        defer { l.close() }
        var e = try trickyEnvelope()
        e.data = Data([0, 1, 2, 255, 0])
        let message = OutboxMessage(index: 0, envelope: e, exchange: "x", routingKey: "test.pong")
        _ = try await l.claim(handler: "h", key: "k", owner: "a", lease: .seconds(60))
        #expect(try await l.complete(handler: "h", key: "k", owner: "a", outbox: [message]) == .committed)
        #expect(
            try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60))
                == .completed(unpublished: [message]))
    }

    @Test("pruning removes old keys whose outbox is published and released keys, and keeps the rest")
    func pruning() async throws {
        let l = try await Postgres.ledger()
        let other = try await Postgres.ledger()
        defer {
            l.close()
            other.close()
        }
        let out = try sampleOutbox(1)
        for key in ["published", "unpublished"] {
            _ = try await l.claim(handler: "h", key: key, owner: "o", lease: .seconds(60))
            #expect(try await l.complete(handler: "h", key: key, owner: "o", outbox: out) == .committed)
        }
        try await l.markPublished(handler: "h", key: "published", indexes: [0])
        _ = try await l.claim(handler: "h", key: "released", owner: "o", lease: .seconds(60))
        try await l.release(handler: "h", key: "released", owner: "o")
        _ = try await l.claim(handler: "h", key: "held", owner: "o", lease: .seconds(60))
        _ = try await other.claim(handler: "h", key: "published", owner: "o", lease: .seconds(60))
        #expect(try await other.complete(handler: "h", key: "published", owner: "o", outbox: []) == .committed)

        #expect(try await l.prune(completedBefore: Date().addingTimeInterval(-3600)) == 0, "nothing is that old")
        #expect(try await l.prune(completedBefore: Date().addingTimeInterval(60)) == 2)
        // Gone: the claim starts over. Kept: the unpublished outbox and the live lease.
        #expect(
            try await l.claim(handler: "h", key: "published", owner: "p", lease: .seconds(60)) == .claimed(attempts: 1))
        #expect(
            try await l.claim(handler: "h", key: "released", owner: "p", lease: .seconds(60)) == .claimed(attempts: 1))
        #expect(
            try await l.claim(handler: "h", key: "unpublished", owner: "p", lease: .seconds(60))
                == .completed(unpublished: out))
        guard case .heldElsewhere = try await l.claim(handler: "h", key: "held", owner: "p", lease: .seconds(60)) else {
            Issue.record("a live lease is never pruned"); return
        }
        #expect(
            try await other.claim(handler: "h", key: "published", owner: "q", lease: .seconds(60))
                == .completed(unpublished: []),
            "another service's keys are not pruned")
    }

    @Test("a database whose encoding cannot hold every key (EUC_JP) is refused at start, saying what to do")
    func encodingRefused() async throws {
        let name = "choreo_eucjp_\(UUID().uuidString.prefix(8).lowercased())"
        try await Postgres.execute(
            "CREATE DATABASE \(name) ENCODING 'EUC_JP' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        var url = try #require(URLComponents(string: try Postgres.url()))
        url.path = "/\(name)"
        do {
            _ = try await PostgresLedger.open(
                url: try #require(url.string), service: "s", logger: Logger(label: "test"))
            Issue.record("an EUC_JP database must be refused")
        } catch {
            #expect(
                "\(error)".hasSuffix(
                    "/\(name): cannot prepare its tables: the database's encoding is EUC_JP; the ledger needs UTF8 (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
                ), "\(error)")
        }
        // What it would do otherwise: refuse, one event at a time, keys that are not valid EUC-JP.
        do {
            try await Postgres.execute("SELECT 'café-注文'::text", database: name)
            Issue.record("EUC_JP took a key that is not EUC-JP")
        } catch {
            #expect("\(error)".contains("invalid byte sequence for encoding \"EUC_JP\""), "\(error)")
        }
        try await Postgres.execute("DROP DATABASE \(name)")
    }

    @Test("a wrong password, an unreachable server and bad URLs give one clear error each, never the password")
    func failures() async throws {
        let secret = "not-the-password-7f3a9"
        do {
            _ = try await PostgresLedger.open(
                url: try Postgres.url(password: secret), service: "s", logger: Logger(label: "test"))
            Issue.record("a wrong password must be refused")
        } catch {
            let message = "\(error)"
            #expect(message.contains("password authentication failed for user \"choreo\""), "\(message)")
            #expect(message.contains("postgres://choreo:***@127.0.0.1:"), "\(message)")
            #expect(!message.contains(secret))
        }
        let started = ContinuousClock.now
        do {
            _ = try await PostgresLedger.open(
                url: "postgres://choreo:\(secret)@127.0.0.1:1/choreo", service: "s", logger: Logger(label: "test"))
            Issue.record("nothing listens on port 1")
        } catch {
            let message = "\(error)"
            #expect(message.hasSuffix("@127.0.0.1:1/choreo: cannot connect: connection refused"), "\(message)")
            #expect(!message.contains(secret))
        }
        #expect(ContinuousClock.now - started < .seconds(20))
        for (url, why) in [
            ("postgres://127.0.0.1/choreo", "no user"),
            ("postgres://u:\(secret)@127.0.0.1/choreo?sslmode=sometimes", "sslmode must be"),
            ("postgres://u:\(secret)@127.0.0.1/choreo?search_path=x", "unknown parameter 'search_path'"),
            ("postgres://u:\(secret)@127.0.0.1:99999/choreo", "--ledger postgres://u:***@127.0.0.1:99999/choreo"),
            ("postgres://u:\(secret)@/choreo", "no host"),
        ] {
            #expect {
                _ = try PostgresLedger(url: url, service: "s", logger: Logger(label: "test"))
            } throws: { error in
                "\(error)".contains(why) && !"\(error)".contains(secret)
            }
        }
    }
}

@Suite("Replicas sharing a PostgreSQL ledger", .serialized, .timeLimit(.minutes(5)))
struct PostgresReplicaTests {
    @Test("two replicas of a handler on one queue handle each event once, duplicates and a kill -9 included")
    func replicas() async throws {
        let url = try Postgres.url()
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let sink = try mesh.start("sink")
        defer { sink.terminate() }
        let sinkQueue = "choreo.\(mesh.sinkService).sink"
        let sinkInfo = await eventually({ try? await channel.declareQueuePassive(sinkQueue) }) {
            ($0?.consumerCount ?? 0) > 0
        }
        try #require((sinkInfo?.consumerCount ?? 0) > 0, "the sink did not start: \(sink.output)")

        let n = 400
        let ids = try await mesh.publishPings((0..<n).map { Ping(n: $0, workMilliseconds: 10) }, on: channel)
        // The first 100 again, same ids: duplicates that either replica may get, at the same time as the original.
        try await mesh.publishPings(
            (0..<100).map { Ping(n: $0, workMilliseconds: 10) }, on: channel, ids: Array(ids.prefix(100)))
        // A 2 s lease: the keys the killed replica held wait that long for the other one.
        let arguments = ["--lease", "2"]
        let first = try mesh.start("ping", arguments: arguments, ledger: url, instance: "replica-1")
        let second = try mesh.start("ping", arguments: arguments, ledger: url, instance: "replica-2")
        defer {
            first.terminate()
            second.terminate()
        }
        let both = await eventually({ try? await channel.declareQueuePassive(mesh.pingQueues.main) }) {
            ($0?.consumerCount ?? 0) == 2
        }
        #expect(both?.consumerCount == 2, "\(first.output)\n\(second.output)")
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("ping") }, until: { $0 >= n / 4 })
        first.kill9()

        await eventually(within: 90, { gateway.effects("ping") }, until: { $0 >= n })
        await eventually(within: 30, { gateway.effects("sink") }, until: { $0 >= n })
        // Every copy settled: none ready, none delivered and unacknowledged (the survivor acks the copies last).
        let left = await eventually {
            try? Broker.messages(in: mesh.pingQueues.main)
        } until: {
            $0 == 0
        }
        #expect(left == 0, "every copy was acked")
        #expect(gateway.effectKeys("ping") == Set(ids), "every event took effect once")
        // Only what the killed replica was running can have run twice: at most its 8 invocations in flight.
        #expect((n...(n + 8)).contains(gateway.requests("ping")), "\(gateway.requests("ping")) handler runs")
        let pongs = Set(ids.map { HandlerContext.derivedID(input: $0, handler: "ping", index: 0) })
        #expect(gateway.effectKeys("sink") == pongs, "each output delivered downstream once after deduplication")
        #expect(gateway.requests("sink") == n)

        second.terminate()
        #expect(await second.waitForExit(seconds: 30))
        #expect(second.exitStatus == 0, "\(second.output)")
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount == 0)
    }

    @Test("the database stopped for 3 s mid-stream: nothing lost, each effect once, the handler goes on")
    func databaseOutage() async throws {
        let url = try Postgres.url()
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let n = 200
        let ids = try await mesh.publishPings((0..<n).map { Ping(n: $0, workMilliseconds: 10) }, on: channel)
        let ping = try mesh.start("ping", arguments: ["--lease", "2"], ledger: url)
        defer { ping.terminate() }
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("ping") }, until: { $0 >= 40 })
        try Postgres.script("pause")
        defer { try? Postgres.script("resume") }  // when the test stops before resuming it
        // The outage: invocations in flight fail to complete and are given back; claims wait for the server.
        try await Task.sleep(for: .seconds(3))
        try Postgres.script("resume")

        await eventually(within: 120, { gateway.effects("ping") }, until: { $0 >= n })
        let left = await eventually(within: 60) {
            try? Broker.messages(in: mesh.pingQueues.main)
        } until: {
            $0 == 0
        }
        #expect(left == 0, "every event was acked in the end: \(ping.output)")
        #expect(gateway.effectKeys("ping") == Set(ids), "every event took effect once")
        // Only the invocations in flight when the server went away (8 at most) could run again, and only if a
        // lease ran out; held and retried, none should.
        #expect((n...(n + 8)).contains(gateway.requests("ping")), "\(gateway.requests("ping")) handler runs")
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount == 0)
        #expect(ping.isRunning, "the handler survived the outage: \(ping.output)")
        // The outage reached the handler: its ledger calls failed with the reason and were tried again, the
        // events held meanwhile (given back, each would count toward the queue's delivery limit).
        #expect(ping.output.contains("ledger unavailable; holding"), "\(ping.output)")
        #expect(ping.output.contains("PostgreSQL ledger postgres://choreo:***@127.0.0.1:"), "\(ping.output)")
        let password = try #require(URLComponents(string: url)?.password)
        #expect(!ping.output.contains(password))
    }
}
