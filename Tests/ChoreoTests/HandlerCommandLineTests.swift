import ChoreoAMQP
import Foundation
import Testing

@testable import Choreo

/// The standard command line every handler executable gets from `Choreo.run`, run as a real process (the
/// fixture service) against the test broker: what `--help`, `--manifest` and `--check` print, the exit codes
/// (0 done, 1 cannot run, 2 used wrongly) and that the password in the URL never shows.
@Suite("Handler executable command line", .serialized)
final class HandlerCommandLineTests {
    let dir: URL
    let service = "cmdline-\(UUID().uuidString.prefix(6).lowercased())"

    init() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("cmdline-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(at: dir) }

    /// Runs the fixture service (the `ping` handler) with a ledger and gateway of its own in `dir`.
    private func handler(_ args: [String], environment extra: [String: String] = [:]) async throws -> (
        code: Int32, out: String, err: String
    ) {
        var env = [
            "FIXTURE_SERVICE": service, "FIXTURE_GATEWAY": dir.appendingPathComponent("gateway.sqlite").path,
            "CHOREO_LEDGER": dir.appendingPathComponent("ledger.sqlite").path,
        ]
        for (k, v) in extra { env[k] = v }
        return try await Broker.runProduct("ChoreoTestService", args, environment: env, timeout: 60)
    }

    private func withPassword(_ password: String) throws -> String {
        "amqp://guest:\(password)@\(try AMQPConfiguration(url: Broker.url).address)/"
    }

    @Test("--help names the executable, lists every standard option and never prints the password")
    func help() async throws {
        let r = try await handler(["--help"], environment: ["CHOREO_URL": try withPassword("s3cret-pw")])
        #expect(r.code == 0)
        #expect(r.out.contains("USAGE: ChoreoTestService <options>"), "\(r.out)")
        #expect(r.out.contains("OVERVIEW: A Choreo handler service"))
        for option in [
            "--url", "--ledger", "--concurrency", "--prefetch", "--ack-delay", "--exchange", "--delivery-limit",
            "--max-body-bytes", "--lease", "--log-level", "--metrics", "--manifest", "--check", "--help",
        ] {
            #expect(r.out.contains(option), "\(option) is in the help")
        }
        #expect(!(r.out + r.err).contains("s3cret-pw"))
    }

    @Test("--manifest prints each handler's declaration as JSON without a broker or a ledger")
    func manifest() async throws {
        // Nothing listens on port 1, and the ledger's directory cannot be made: neither is needed.
        let r = try await handler(
            ["--manifest", "--ledger", "/dev/null/ledger.sqlite"],
            environment: ["CHOREO_URL": "amqp://guest:s3cret-pw@127.0.0.1:1/"])
        #expect(r.code == 0, "\(r.err)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [[String: Any]])
        #expect(json.count == 1)
        let ping = try #require(json.first)
        #expect(ping["service"] as? String == service)
        #expect(ping["handler"] as? String == "ping")
        #expect(ping["consumes"] as? String == "test.ping")
        #expect(ping["emits"] as? [String] == ["test.pong"])
        #expect(ping["queue"] as? String == "choreo.\(service).ping")
        #expect(ping["deadLetterQueue"] as? String == "choreo.\(service).ping.dlq")
        #expect(ping["maxAttempts"] as? Int == 3)
        #expect(!(r.out + r.err).contains("s3cret-pw"))
    }

    @Test("--check says the broker is reachable and the ledger writable, and exits 0")
    func checkPasses() async throws {
        let r = try await handler(["--check"])
        let ledger = dir.appendingPathComponent("ledger.sqlite").path
        let address = try AMQPConfiguration(url: Broker.url).address
        #expect(r.code == 0, "\(r.err)")
        #expect(r.out == "ok: broker amqp://guest@\(address)/ reachable, ledger \(ledger) writable\n")
        #expect(FileManager.default.fileExists(atPath: ledger))
    }

    @Test("--check exits 1 with one line that says why, naming the broker or the ledger, never the password")
    func checkFails() async throws {
        let address = try AMQPConfiguration(url: Broker.url).address
        let badLogin = try await handler(["--check"], environment: ["CHOREO_URL": try withPassword("s3cret-pw")])
        #expect(badLogin.code == 1)
        #expect(badLogin.err.hasPrefix("error: log in to amqp://guest@\(address)/ failed: 403 ACCESS_REFUSED"))
        let nobody = try await handler(["--check", "--url", "amqp://guest:s3cret-pw@127.0.0.1:1/"])
        #expect(nobody.code == 1)
        #expect(nobody.err == "error: connect 127.0.0.1:1 failed: connection refused\n")

        let notDirectory = dir.appendingPathComponent("gateway.sqlite").path
        let underFile = try await handler(["--check", "--ledger", "\(notDirectory)/ledger.sqlite"])
        #expect(underFile.code == 1)
        #expect(
            underFile.err
                == "error: cannot create the ledger \(notDirectory)/ledger.sqlite: \(notDirectory) is a file, not a directory\n"
        )
        let garbage = dir.appendingPathComponent("garbage.sqlite").path
        try Data(String(repeating: "not a database\n", count: 400).utf8).write(to: URL(fileURLWithPath: garbage))
        let notSQLite = try await handler(["--check", "--ledger", garbage])
        #expect(notSQLite.code == 1)
        #expect(
            notSQLite.err
                == "error: cannot open the ledger \(garbage): file is not a database (SQLite error 26); restore the file "
                + "from a backup, or move it aside to begin an empty ledger (an event handled before would then run "
                + "again if it were delivered again)\n")

        // A ledger another process has open: this test process holds it.
        let held = dir.appendingPathComponent("held.sqlite").path
        let holder = try SQLiteLedger(path: held)
        let inUse = try await handler(["--check", "--ledger", held])
        withExtendedLifetime(holder) {}
        #expect(inUse.code == 1)
        #expect(inUse.err.hasPrefix("error: the ledger \(held) is in use by another process"))

        for r in [badLogin, nobody, underFile, notSQLite, inUse] {
            #expect(!(r.out + r.err).contains("s3cret-pw"))
            #expect(r.err.split(separator: "\n").count == 1, "one line: \(r.err)")
        }
    }

    @Test(
        "a PostgreSQL ledger URL: --check masks its password; a wrong one, a bad URL or an unknown scheme fail in one line"
    )
    func postgresLedger() async throws {
        let url = try Postgres.url()
        let masked = LedgerURL.redacted(url)
        let password = try #require(URLComponents(string: url)?.password)
        let ok = try await handler(["--check", "--ledger", url])
        let address = try AMQPConfiguration(url: Broker.url).address
        #expect(ok.code == 0, "\(ok.err)")
        #expect(ok.out == "ok: broker amqp://guest@\(address)/ reachable, ledger \(masked) writable\n")
        // The password from PGPASSWORD, the URL without one.
        let fromEnvironment = try await handler(
            ["--check"],
            environment: [
                "CHOREO_LEDGER": url.replacingOccurrences(of: ":\(password)@", with: "@"), "PGPASSWORD": password,
            ])
        #expect(fromEnvironment.code == 0, "\(fromEnvironment.err)")

        let wrong = try await handler(["--check", "--ledger", try Postgres.url(password: "s3cret-pw")])
        #expect(wrong.code == 1)
        #expect(
            wrong.err.hasPrefix("error: PostgreSQL ledger \(masked): cannot connect: password authentication failed"))
        let badURL = try await handler([
            "--check", "--ledger", "postgres://choreo:s3cret-pw@127.0.0.1/choreo?sslmode=no",
        ])
        #expect(badURL.code == 2)
        #expect(
            badURL.err
                == "error: --ledger postgres://choreo:***@127.0.0.1/choreo?sslmode=no: sslmode must be disable, prefer, require or verify-full, not 'no'\n"
        )
        let scheme = try await handler(["--check", "--ledger", "mysql://u:s3cret-pw@127.0.0.1/db"])
        #expect(scheme.code == 2)
        #expect(
            scheme.err
                == "error: --ledger mysql://u:***@127.0.0.1/db: this executable opens no 'mysql://' ledger; give a SQLite file path\n"
        )
        // An executable built without ChoreoPostgres refuses the URL before it starts, and says what it takes.
        let options = try RunnerOptions.parse(["--check", "--ledger", url])
        let code = await options.run(
            service: "no-postgres", handlers: [PingTestHandler()], ledgerKinds: [], metricsKind: nil)
        #expect(code == RunnerOptions.usageError)
        let refusal = "\(ConfigurationError(unsupportedScheme: "postgres", location: url))"
        #expect(refusal.contains("this executable opens no 'postgres://' ledger"), "\(refusal)")
        #expect(refusal.contains("`import ChoreoPostgres` and pass `ledgers: [PostgresLedger.self]`"))
        #expect(!refusal.contains(password))
        for r in [ok, fromEnvironment, wrong, badURL, scheme] {
            #expect(!(r.out + r.err).contains(password))
            #expect(!(r.out + r.err).contains("s3cret-pw"))
            #expect(r.err.split(separator: "\n").count <= 1, "one line: \(r.err)")
        }
    }

    @Test("a queue declared with other settings stops the service with what to do, instead of reconnecting forever")
    func topologyConflict() async throws {
        let connection = try await AMQPConnection.connect(to: try AMQPConfiguration(url: Broker.url))
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        let queues = WireNames.HandlerQueues(service: service, handler: "ping")
        defer { Task { _ = try? await channel.deleteQueue(queues.main) } }
        func lastLine(_ args: [String]) async throws -> (code: Int32, line: String?) {
            let started = ContinuousClock.now
            let run = try await handler(args)
            #expect(ContinuousClock.now - started < .seconds(30), "it stops, it does not retry")
            return (run.code, run.err.split(separator: "\n").last.map(String.init))
        }
        let declared = "error: queue.declare '\(queues.main)' failed: 406 PRECONDITION_FAILED - inequivalent arg"

        // Before any start, --check finds nothing to compare and creates nothing.
        #expect(try await handler(["--check"]).code == 0)
        let absent = await #expect(throws: AMQPError.self) { try await channel.declareQueuePassive(queues.main) }
        #expect(absent?.replyCode == AMQPError.ReplyCode.notFound, "--check must not declare a handler's queue")

        // Someone else's queue under the handler's name.
        try await channel.declareQueue(queues.main, options: .quorum(deliveryLimit: 3))
        let alien = try await lastLine([])
        #expect(alien.code == 1)
        #expect(
            alien.line
                == "\(declared) 'x-dead-letter-exchange' for queue '\(queues.main)' in vhost '/': received the value '' "
                + "of type 'longstr' but current is none; start the service with the settings the broker has, or "
                + "delete what is named (with its messages)")

        // The handler's own queue, declared with --delivery-limit 3 before.
        _ = try await channel.deleteQueue(queues.main)
        try await channel.declareQueue(
            queues.main, options: Topology.mainQueue(deadLetterQueue: queues.deadLetter, deliveryLimit: 3))
        let expected =
            "\(declared) 'x-delivery-limit' for queue '\(queues.main)' in vhost '/': received '10' but current is "
            + "'3'; the queue's delivery limit is 3 and --delivery-limit asks for 10: give --delivery-limit 3, or "
            + "delete the queue to change it (with its messages)"
        let limit = try await lastLine([])
        #expect(limit.code == 1)
        #expect(limit.line == expected)
        // --check finds it too, before a deployment starts the service; with the queue's own limit it passes.
        let check = try await lastLine(["--check"])
        #expect(check.code == 1)
        #expect(check.line == expected)
        let agreed = try await handler(["--check", "--delivery-limit", "3"])
        #expect(agreed.code == 0, "\(agreed.err)")

        // An --exchange of another type.
        let direct = "direct-\(service)"
        try await channel.declareExchange(direct, type: .direct, durable: false)
        defer { Task { try? await channel.deleteExchange(direct) } }
        let exchange = try await lastLine(["--check", "--exchange", direct, "--delivery-limit", "3"])
        #expect(exchange.code == 1)
        #expect(
            exchange.line
                == "error: exchange.declare '\(direct)' failed: 406 PRECONDITION_FAILED - inequivalent arg 'type' for "
                + "exchange '\(direct)' in vhost '/': received 'topic' but current is 'direct'; --exchange names an "
                + "exchange of another type: Choreo's mesh exchange is a topic exchange")
    }

    @Test("a wrong option or environment value exits 2 with the reason, before anything starts")
    func usageErrors() async throws {
        let unknown = try await handler(["--bogus"])
        #expect(unknown.code == 2)
        #expect(unknown.err.hasPrefix("Error: Unknown option '--bogus'\nUsage: ChoreoTestService <options>"))
        let notANumber = try await handler(["--concurrency", "many"])
        #expect(notANumber.code == 2)
        #expect(notANumber.err.hasPrefix("Error: The value 'many' is invalid for '--concurrency <concurrency>'"))
        let outOfRange = try await handler(["--concurrency", "0"])
        #expect(outOfRange.code == 2)
        #expect(outOfRange.err == "error: --concurrency must be 1 to 10000\n")
        // A negative number is a value out of range, not a missing value followed by an option '-1'.
        let negative = try await handler(["--delivery-limit", "-1"])
        #expect(negative.code == 2)
        #expect(negative.err == "error: --delivery-limit must be at least 1\n")
        let level = try await handler([], environment: ["CHOREO_LOG_LEVEL": "loud"])
        #expect(level.code == 2)
        #expect(level.err == "error: unknown --log-level 'loud'\n")
        let url = try await handler([], environment: ["CHOREO_URL": "amqp://guest:s3cret-pw@127.0.0.1:notaport/"])
        #expect(url.code == 2)
        #expect(
            url.err == "error: --url: parse URL amqp://guest:***@127.0.0.1:notaport/ failed: port must be 1 to 65535\n")
        let emptyURL = try await handler(["--url", ""])
        #expect(emptyURL.code == 2)
        #expect(emptyURL.err == "error: --url is empty: give amqp://user:password@host:port/vhost\n")
        // Set to the empty string, a variable counts as unset: the defaults apply, nothing is refused.
        let emptyVariables = try await handler(
            ["--manifest"],
            environment: ["CHOREO_URL": "", "CHOREO_LEDGER": "", "CHOREO_LOG_LEVEL": "", "CHOREO_METRICS": ""])
        #expect(emptyVariables.code == 0, "\(emptyVariables.err)")
        let emptyLedger = try await handler(["--ledger", ""])
        #expect(emptyLedger.code == 2)
        #expect(emptyLedger.err == "error: --ledger is empty: give a SQLite file path or a ledger URL\n")
        // The default exchange cannot route by topic; AMQP carries a name in at most 255 bytes.
        let emptyExchange = try await handler(["--manifest", "--exchange", ""])
        #expect(emptyExchange.code == 2)
        #expect(
            emptyExchange.err == "error: --exchange is empty: give the mesh's topic exchange (default choreo.events)\n")
        let longExchange = try await handler(["--exchange", String(repeating: "x", count: 256)])
        #expect(longExchange.code == 2)
        #expect(longExchange.err == "error: --exchange is 256 bytes long; AMQP allows at most 255\n")
        // None of them got as far as the ledger.
        #expect(!FileManager.default.fileExists(atPath: dir.appendingPathComponent("ledger.sqlite").path))
    }
}
