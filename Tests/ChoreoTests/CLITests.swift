import ChoreoAMQP
import Foundation
import TestEvents
import Testing

@testable import Choreo

@Suite("The choreo CLI, run as a binary against a real broker", .serialized, .timeLimit(.minutes(5)))
struct CLITests {
    /// Fails one event into the ping handler's dead-letter queue (three failed attempts) and returns its id.
    private func deadLetterOne(_ mesh: Mesh, channel: AMQPChannel, ping: Ping = Ping(n: 1, failTimes: 99)) async throws
        -> String
    {
        let ids = try await mesh.publishPings([ping], on: channel)
        let n = await eventually(
            { try? await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount }, until: { $0 == 1 })
        try #require(n == 1, "the event did not reach the dead-letter queue")
        return ids[0]
    }

    /// Runs the ping handler until it consumes, then stops it: its manifest is in the registry, its queues exist.
    private func register(_ mesh: Mesh, channel: AMQPChannel) async throws {
        let ping = try mesh.start("ping")
        let info = await eventually(
            { try? await channel.declareQueuePassive(mesh.pingQueues.main) }, until: { ($0?.consumerCount ?? 0) > 0 })
        try #require((info?.consumerCount ?? 0) > 0, "the ping handler did not start: \(ping.output)")
        ping.terminate()
        _ = await ping.waitForExit(seconds: 30)
    }

    @Test("a publish held by a resource alarm says that it waits, and which id avoids a duplicate; then it goes out")
    func publishWhileBlocked() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        try Broker.raiseDiskAlarm()
        defer { try? Broker.clearDiskAlarm() }
        let publish = Task {
            try await Broker.choreo(["publish", Ping.eventType, "--data", #"{"n": 1}"#, "--exchange", mesh.exchange])
        }
        // The broker marks the CLI's connection blocked once it has published.
        let state = await eventually(
            { (try? Broker.connections(named: "choreo cli", column: "state")) ?? [] }, until: { $0 == ["blocked"] })
        #expect(state == ["blocked"])
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.main).messageCount == 0)

        try Broker.clearDiskAlarm()
        let run = try await publish.value
        #expect(run.code == 0, "\(run.err)")
        let id = run.out.trimmingCharacters(in: .newlines)
        #expect(run.err.contains("the broker blocks publishing on this connection: low on disk;"))
        #expect(
            run.err.hasSuffix(
                "waiting for the broker to accept event \(id); stopped now, it may still be published when the alarm "
                    + "clears: to try again without a duplicate, publish again with the same arguments --id \(id)\n"))
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.main).messageCount == 1)
    }

    @Test("list is non-destructive, show explains, replay reaches only the failed handler, exactly once")
    func listShowReplay() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let audit = try mesh.start("audit")
        defer { audit.terminate() }
        var ping = try mesh.start("ping")
        defer { ping.terminate() }
        let info = await eventually(
            { try? await channel.declareQueuePassive("choreo.audit-\(mesh.id).audit") },
            until: { ($0?.consumerCount ?? 0) > 0 })
        try #require((info?.consumerCount ?? 0) > 0)
        let id = try await deadLetterOne(mesh, channel: channel)
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("audit") }, until: { $0 >= 1 })
        #expect(gateway.effects("audit") == 1)

        let handler = "\(mesh.pingService).ping"
        let first = try await Broker.choreo(["dlq", "list", "--handler", handler, "--json"])
        let second = try await Broker.choreo(["dlq", "list", "--handler", handler, "--json"])
        #expect(first.code == 0 && second.code == 0, "\(first.err)")
        #expect(first.out == second.out, "listing twice shows the same letters")
        let byService = try await Broker.choreo(["dlq", "list", "--service", mesh.pingService, "--json"])
        #expect(byService.out == first.out, "the ping service's letters are the ping handler's")
        let otherService = try await Broker.choreo(["dlq", "list", "--service", "audit-\(mesh.id)", "--json"])
        #expect(otherService.code == 0 && otherService.out.isEmpty, "\(otherService.err)")
        let rows = first.out.split(separator: "\n")
        #expect(rows.count == 1)
        #expect(rows.first?.contains("\"id\":\"\(id)\"") == true)
        #expect(rows.first?.contains("\"error\":\"gateway unavailable (attempt 3)\"") == true)

        let show = try await Broker.choreo(["dlq", "show", id])
        #expect(show.code == 0)
        #expect(show.out.contains("error type:    GatewayError"))
        #expect(show.out.contains("error:         gateway unavailable (attempt 3)"))
        #expect(show.out.contains("attempts:      3"))
        #expect(show.out.contains("\"failTimes\" : 99"))

        // Fix the handler, then replay.
        ping.terminate()
        _ = await ping.waitForExit(seconds: 30)
        ping = try mesh.start("ping", environment: ["FIXTURE_FIXED": "1"])
        let dryRun = try await Broker.choreo(["dlq", "replay", "--id", id, "--dry-run"])
        #expect(dryRun.code == 0, "\(dryRun.err)")
        #expect(dryRun.out == "would replay 1, skipped 0, failed 0\n")
        #expect(dryRun.err == "checked 1/1\n")
        #expect(try await Broker.choreo(["dlq", "list", "--handler", handler, "--json"]).out == first.out)
        let replay = try await Broker.choreo(["dlq", "replay", "--id", id])
        #expect(replay.code == 0, "\(replay.err)")
        #expect(replay.out == "replayed 1, skipped 0, failed 0\n")
        #expect(replay.err == "replayed 1/1\n")
        await eventually({ gateway.effects("ping") }, until: { $0 >= 1 })
        #expect(gateway.effectKeys("ping") == [id])
        #expect(gateway.requests("ping") == 1)
        #expect(
            gateway.effects("audit") == 1 && gateway.requests("audit") == 1, "other subscribers do not see it again")
        let after = try await Broker.choreo(["dlq", "list", "--handler", handler])
        #expect(after.out == "no dead letters\n")
    }

    @Test(
        "killing the CLI between the replayed publish and the removal loses nothing; a second replay gives no second effect"
    )
    func killedMidReplay() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        var ping = try mesh.start("ping", concurrency: 1)
        defer { ping.terminate() }
        let id = try await deadLetterOne(mesh, channel: channel)
        ping.terminate()
        _ = await ping.waitForExit(seconds: 30)
        ping = try mesh.start("ping", concurrency: 1, environment: ["FIXTURE_FIXED": "1"])

        let marker = mesh.directory.appendingPathComponent("cli-crashed").path
        let killed = try await Broker.choreo(
            ["dlq", "replay", "--all", "--handler", "\(mesh.pingService).ping"],
            environment: ["CHOREO_FAULT_POINT": "replay-after-publish", "CHOREO_FAULT_MARKER": marker])
        #expect(killed.code == -SIGKILL, "the CLI was killed after the broker confirmed the copy")
        let gateway = try mesh.gateway()
        await eventually({ gateway.effects("ping") }, until: { $0 >= 1 })
        // The letter is still there: it was never acknowledged.
        let still = await eventually(
            { try? await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount }, until: { $0 == 1 })
        #expect(still == 1)

        let again = try await Broker.choreo(["dlq", "replay", "--all", "--handler", "\(mesh.pingService).ping"])
        #expect(again.out == "replayed 1, skipped 0, failed 0\n", "\(again.err)")
        // A marker event queued behind the second copy: once it is handled, so is the copy.
        let markerID = try await mesh.publishPings([Ping(n: 999)], on: channel)[0]
        await eventually({ gateway.effectKeys("ping") }, until: { $0.contains(markerID) })
        #expect(gateway.effectKeys("ping") == [id, markerID])
        #expect(gateway.requests("ping") == 2, "the ledger dropped the second replayed copy: one effect for \(id)")
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount == 0)
    }

    @Test("a replayed event that fails again is dead-lettered anew: the replay neither loops on it nor loses it")
    func replayOfAnEventThatFailsAgain() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        // A poison event fails at once, every time, and goes straight to the dead-letter queue.
        let ping = try mesh.start("ping")
        defer { ping.terminate() }
        let id = try await deadLetterOne(mesh, channel: channel, ping: Ping(n: 7, poison: true))

        let replay = try await Broker.choreo(
            ["dlq", "replay", "--all", "--handler", "\(mesh.pingService).ping"], timeout: 60)
        #expect(replay.code == 0, "the replay ended: \(replay.err)")
        #expect(replay.out == "replayed 1, skipped 0, failed 0\n", "\(replay.out)")

        // The handler failed the replayed copy again: one new letter, the copy the replay sent (it carries the
        // replay's stamp), not the old one sent round and round.
        let depth = await eventually(
            { try? await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount }, until: { $0 == 1 })
        #expect(depth == 1)
        let letters = try await peek(queue: mesh.pingQueues.deadLetter, expecting: 1, connection: connection)
        #expect(letters.count == 1)
        #expect(letters.first?.properties.messageID == id)
        #expect(letters.first?.properties.headers?["choreo-replayed-at"] != nil, "the letter is the replayed copy")
        #expect(letters.first?.properties.headers?[WireNames.Headers.deadLetterErrorType] == .string("GatewayError"))
    }

    @Test("what a publisher wrote cannot drive the operator's terminal: control characters are shown escaped")
    func controlCharactersEscaped() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let ping = try mesh.start("ping")
        defer { ping.terminate() }
        // Not JSON, so dead-lettered at once; its body and a header carry a screen clear and a bidi override.
        var headers: AMQPTable = [
            "cloudEvents_id": "esc-1", "cloudEvents_type": "test.ping", "cloudEvents_source": "test",
            "cloudEvents_specversion": "1.0", "note": "red\u{1B}[31m\r\nnext",
        ]
        headers["cloudEvents_subject"] = "evil\u{202E}txt.exe"
        try await channel.publish(
            AMQPOutgoingMessage(
                exchange: mesh.exchange, routingKey: "test.ping", body: Data("\u{1B}[2Jline one\nline two\u{7}".utf8),
                properties: AMQPProperties(contentType: "text/plain", headers: headers, deliveryMode: 2)))
        let n = await eventually(
            { try? await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount }, until: { $0 == 1 })
        try #require(n == 1, "the event did not reach the dead-letter queue")

        let show = try await Broker.choreo(["dlq", "show", "esc-1"])
        #expect(show.code == 0, "\(show.err)")
        for raw in ["\u{1B}", "\u{7}", "\u{202E}", "\r"] { #expect(!show.out.contains(raw), "\(raw.debugDescription)") }
        #expect(show.out.contains("  note: red\\u{1B}[31m\\r\\nnext\n"))
        #expect(show.out.contains("  cloudEvents_subject: evil\\u{202E}txt.exe\n"))
        #expect(show.out.hasSuffix("body (22 bytes):\n\\u{1B}[2Jline one\nline two\\u{7}\n"), "\(show.out)")
        let list = try await Broker.choreo(["dlq", "list", "--handler", "\(mesh.pingService).ping"])
        #expect(list.code == 0 && !list.out.contains("\u{1B}"), "\(list.out)")
    }

    @Test("purge refuses without --yes off a terminal")
    func purgeRefuses() async throws {
        let purge = try await Broker.choreo(["dlq", "purge", "--all"])
        #expect(purge.code == 2)
        #expect(purge.err.hasPrefix("Error: refusing to purge without --yes when standard input is not a terminal"))
    }

    @Test("export, purge and import round-trip bodies byte for byte and headers exactly")
    func exportPurgeImport() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let ping = try mesh.start("ping")
        defer { ping.terminate() }
        _ = try await mesh.publishPings(
            [Ping(n: 1, poison: true), Ping(n: 2, poison: true), Ping(n: 3, poison: true)], on: channel)
        await eventually(
            { try? await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount }, until: { $0 == 3 })
        let before = try await peek(queue: mesh.pingQueues.deadLetter, expecting: 3, connection: connection)
        #expect(before.count == 3)

        let file = mesh.directory.appendingPathComponent("letters.jsonl").path
        let handler = "\(mesh.pingService).ping"
        let export = try await Broker.choreo(["dlq", "export", "--out", file, "--handler", handler])
        #expect(export.code == 0 && export.out == "exported 3 to \(file)\n", "\(export.out) \(export.err)")
        let purge = try await Broker.choreo(["dlq", "purge", "--all", "--yes", "--handler", handler])
        #expect(purge.out == "purged 3\n")
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount == 0)
        let restore = try await Broker.choreo(["dlq", "import", file])
        #expect(restore.out == "imported 3\n", "\(restore.err)")

        let after = try await peek(queue: mesh.pingQueues.deadLetter, expecting: 3, connection: connection)
        func byID(_ ds: [AMQPDelivery]) -> [String: AMQPDelivery] {
            Dictionary(uniqueKeysWithValues: ds.map { ($0.properties.messageID ?? "", $0) })
        }
        let a = byID(before), b = byID(after)
        #expect(Set(a.keys) == Set(b.keys))
        // The broker numbers redeliveries in x-delivery-count; everything else must match exactly.
        func content(_ p: AMQPProperties?) -> AMQPProperties? {
            var p = p
            p?.headers?["x-delivery-count"] = nil
            return p
        }
        for (id, d) in a {
            #expect(b[id]?.body == d.body)
            #expect(
                content(b[id]?.properties) == content(d.properties), "headers and properties restored exactly for \(id)"
            )
        }
    }

    @Test("a bulk replay of 10,000 dead letters shows progress and each is processed once")
    func bulkReplay() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        // Register the handler (its manifest and queues), then build 10,000 dead letters as the runtime writes them.
        try await register(mesh, channel: channel)
        let n = 10_000
        var letters: [AMQPOutgoingMessage] = []
        var ids: [String] = []
        for i in 0..<n {
            let e = try EventEnvelope(Ping(n: i), source: "test")
            ids.append(e.id)
            letters.append(
                EnvelopeCodec.encode(
                    e, exchange: "", routingKey: mesh.pingQueues.deadLetter,
                    extraHeaders: [
                        WireNames.Headers.deadLetterHandler: "ping",
                        WireNames.Headers.deadLetterService: mesh.pingService,
                        WireNames.Headers.deadLetterErrorType: "GatewayError",
                        WireNames.Headers.deadLetterErrorMessage: "down",
                        WireNames.Headers.deadLetterAttempts: "3",
                        WireNames.Headers.deadLetterOriginalExchange: mesh.exchange,
                        WireNames.Headers.deadLetterOriginalRoutingKey: "test.ping",
                    ]))
        }
        for r in await channel.publish(contentsOf: letters) { try r.get() }
        let replay = try await Broker.choreo(
            ["dlq", "replay", "--all", "--handler", "\(mesh.pingService).ping"], timeout: 240)
        #expect(replay.code == 0, "\(replay.err)")
        // The broker may give back letters acked just before a round's channel closed (about half the runs on
        // RabbitMQ 3.10): the next round recognises them, removes them again and does not send them twice.
        #expect(replay.out == "replayed \(n), skipped 0, failed 0\n", "\(replay.out)")
        let progress = replay.err.split(separator: "\n").filter { $0.hasPrefix("replayed ") }
        #expect(progress.count >= 10, "progress is shown along the way: \(progress.prefix(3))")
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.deadLetter).messageCount == 0)
        // Nothing doubled on the wire: with no consumer yet, the handler's queue holds exactly one copy of each.
        #expect(try await channel.declareQueuePassive(mesh.pingQueues.main).messageCount == UInt32(n))
        let ping = try mesh.start("ping", concurrency: 32)
        defer { ping.terminate() }
        let gateway = try mesh.gateway()
        await eventually(within: 180, { gateway.effects("ping") }, until: { $0 >= n })
        let keys = gateway.effectKeys("ping")
        #expect(keys.count == n && keys == Set(ids), "each of the \(n) letters took effect (\(keys.count) did)")
        #expect(gateway.requests("ping") == n)
    }

    @Test("every error path is one clear line with its exit code, and the password never shows")
    func errorPaths() async throws {
        // An unknown id is told from an empty registry only once some handler has registered.
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        try await register(mesh, channel: channel)
        let unreachable = try await Broker.choreo(
            ["status"], environment: ["CHOREO_URL": "amqp://guest:s3cret@127.0.0.1:1/"])
        #expect(unreachable.code == 1)
        #expect(unreachable.err == "error: cannot reach the broker at amqp://guest@127.0.0.1:1/: connection refused\n")
        let base = try AMQPConfiguration(url: Broker.url)
        let badLogin = try await Broker.choreo(
            ["dlq", "list"], environment: ["CHOREO_URL": "amqp://guest:s3cret@\(base.address)/"])
        #expect(badLogin.code == 1)
        #expect(
            badLogin.err
                == "error: cannot log in to amqp://guest@\(base.address)/: the broker refused user 'guest' (check the user name and password)\n"
        )
        let tlsPort = ProcessInfo.processInfo.environment["CHOREO_TEST_TLS_PORT"] ?? "6673"
        let plainToTLS = try await Broker.choreo(
            ["status"], environment: ["CHOREO_URL": "amqp://guest:guest@127.0.0.1:\(tlsPort)/"])
        #expect(plainToTLS.code == 1)
        #expect(
            plainToTLS.err
                == "error: cannot reach the broker at amqp://guest@127.0.0.1:\(tlsPort)/: the server at 127.0.0.1:\(tlsPort) speaks TLS: connect with amqps://\n"
        )
        let emptyURL = try await Broker.choreo(["status", "--url", ""])
        #expect(emptyURL.code == 2)
        #expect(emptyURL.err == "error: --url is empty: give amqp://user:password@host:port/vhost\n")
        // A negative number is a value out of range, not a missing value followed by an option '-1'.
        let negativeLimit = try await Broker.choreo(["dlq", "list", "--limit", "-1"])
        #expect(negativeLimit.code == 2)
        #expect(negativeLimit.err == "error: --limit must be at least 1\n")
        let unknownHandler = try await Broker.choreo(["dlq", "list", "--handler", "no-such-handler"])
        #expect(unknownHandler.code == 1)
        #expect(unknownHandler.err.hasPrefix("error: no handler named 'no-such-handler' in the registry (known: "))
        let unknownService = try await Broker.choreo(["dlq", "list", "--service", "no-such-service"])
        #expect(unknownService.code == 1)
        #expect(unknownService.err.hasPrefix("error: no service named 'no-such-service' in the registry (known: "))
        let unknownID = try await Broker.choreo(["dlq", "show", "no-such-id"])
        #expect(unknownID.code == 1)
        #expect(unknownID.err == "error: no dead letter with id 'no-such-id'\n")
        let unknownReplay = try await Broker.choreo(["dlq", "replay", "--id", "no-such-id"])
        #expect(unknownReplay.code == 1)
        #expect(unknownReplay.err == "error: no dead letter with id 'no-such-id'\n")
        let usage = try await Broker.choreo(["dlq", "replay"])
        #expect(usage.code == 2)
        #expect(usage.err.hasPrefix("Error: give either --id ID (repeatable) or --all"))
        let emptyID = try await Broker.choreo(["publish", "test.ping", "--data", "{}", "--id", ""])
        #expect(emptyID.code == 2)
        #expect(emptyID.err.hasPrefix("Error: --id must not be empty\n"))
        let typo = "choreo.evnets-\(mesh.id)"
        let wrongExchange = try await Broker.choreo(["publish", "test.ping", "--data", "{}", "--exchange", typo])
        #expect(wrongExchange.code == 1)
        #expect(
            wrongExchange.err
                == "error: exchange '\(typo)' does not exist on this broker: no handler service has declared it (is --exchange right?)\n"
        )
        let probe = try await connection.openChannel()
        let created = await #expect(throws: AMQPError.self) { try await probe.declareExchangePassive(typo) }
        #expect(created?.replyCode == AMQPError.ReplyCode.notFound, "publish must not create the mistyped exchange")
        // Files: checked before the broker is asked (nothing listens on port 1).
        let nowhere = ["CHOREO_URL": "amqp://guest:s3cret@127.0.0.1:1/"]
        let noDirectory = try await Broker.choreo(["dlq", "export", "--out", "/nonexistent-dir/x.jsonl"])
        #expect(noDirectory.code == 2)
        #expect(noDirectory.err.hasPrefix("Error: --out /nonexistent-dir/x.jsonl: no directory /nonexistent-dir\n"))
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("choreo-cli-\(UUID())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let intoDirectory = try await Broker.choreo(["dlq", "export", "--out", directory.path], environment: nowhere)
        #expect(intoDirectory.code == 2)
        #expect(intoDirectory.err.hasPrefix("Error: --out \(directory.path) is a directory: name the file to write\n"))
        let notExported = directory.appendingPathComponent("letters.jsonl")
        try Data("\n\n{\"queue\": 1}\n".utf8).write(to: notExported)
        let badImport = try await Broker.choreo(["dlq", "import", notExported.path], environment: nowhere)
        #expect(badImport.code == 1)
        #expect(
            badImport.err
                == "error: \(notExported.path):3: not an exported dead letter: JSON does not match 'choreo dlq export': expected a string at queue, found a number\n"
        )
        // A line AMQP could not carry (a message id over 255 bytes), after a good one: nothing is sent.
        let longID = String(repeating: "i", count: 300)
        let good =
            #"{"queue":"q.dlq","id":"a","handler":"h","errorType":"E","errorMessage":"m","properties":{},"body":""}"#
        try Data((good + "\n" + good.replacingOccurrences(of: "{}", with: "{\"messageID\":\"\(longID)\"}")).utf8)
            .write(to: notExported)
        let tooLong = try await Broker.choreo(["dlq", "import", notExported.path], environment: nowhere)
        #expect(tooLong.code == 1)
        #expect(
            tooLong.err
                == "error: \(notExported.path):2: not an exported dead letter: encode failed: the message id "
                + "'\(longID.prefix(32))...' is 300 bytes long; AMQP 0-9-1 allows at most 255\n")
        let help = try await Broker.choreo(["--help"], environment: ["CHOREO_URL": "amqp://guest:s3cret@127.0.0.1:1/"])
        #expect(help.code == 0 && help.out.contains("USAGE: choreo <subcommand>") && !help.out.contains("s3cret"))
        for r in [unreachable, badLogin] { #expect(!r.err.contains("s3cret") && !r.out.contains("s3cret")) }
    }
}
