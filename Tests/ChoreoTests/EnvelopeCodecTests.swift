import ChoreoAMQP
import Foundation
import GRDB
import TestEvents
import Testing

@testable import Choreo

@Suite("CloudEvents envelope over AMQP")
struct EnvelopeCodecTests {
    @Test("binary mode: attributes as cloudEvents_ headers, id in message_id, type in type, persistent")
    func binaryRoundTrip() throws {
        var e = try EventEnvelope(
            Ping(n: 3), source: "choreo://svc/h", id: "id-1", correlationID: "corr", causationID: "cause",
            idempotencyKey: "k-1", subject: "order-9")
        e.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        e.time = Date(timeIntervalSince1970: 1_764_000_000.5)
        e.dataSchema = "https://example.com/schemas/ping-1.json"
        let message = EnvelopeCodec.encode(e, exchange: "choreo.events")
        #expect(message.routingKey == "test.ping")
        #expect(message.properties.messageID == "id-1" && message.properties.type == "test.ping")
        #expect(message.properties.deliveryMode == 2 && message.properties.contentType == "application/json")
        #expect(message.properties.headers?["cloudEvents_specversion"] == "1.0")
        #expect(message.properties.headers?["cloudEvents_time"] == .string("2025-11-24T16:00:00.500Z"))
        #expect(
            message.properties.headers?.values.allSatisfy { $0.stringValue != nil } == true, "flat string headers only")
        // Written as a list already in byte order, so the wire bytes are what a sorted table would give.
        let names = try #require(message.properties.headerFields).map(\.name)
        #expect(names == names.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) })
        #expect(names.count == 12 && Set(names).count == 12, "every attribute once: \(names)")
        let decoded = try EnvelopeCodec.decode(body: message.body, properties: message.properties)
        #expect(decoded == e)

        // Extensions and extra headers join them, and an extra header overrides an attribute's.
        e.extensions = ["tenant": "acme"]
        let extended = EnvelopeCodec.encode(
            e, exchange: "x", extraHeaders: ["choreo-attempt": "2", "cloudEvents_subject": "s"])
        #expect(extended.properties.headers?["cloudEvents_tenant"] == "acme")
        #expect(extended.properties.headers?["choreo-attempt"] == "2")
        #expect(extended.properties.headers?["cloudEvents_subject"] == "s")
        #expect(extended.properties.headers?.count == 14)
        #expect(
            try EnvelopeCodec.decode(body: extended.body, properties: extended.properties).extensions == e.extensions)
    }

    @Test("timestamps are written exactly as Foundation's ISO 8601 style writes them, and read back")
    func timestamps() throws {
        let style = Date.ISO8601FormatStyle(includingFractionalSeconds: true)
        var generator = SystemRandomNumberGenerator()
        // Mid-millisecond instants, so that truncating to milliseconds is unambiguous in binary floating point.
        var milliseconds: [Int64] = [0, 951_782_400_000, 1_709_164_800_999, 4_102_444_799_500, 253_402_300_799_000]
        for _ in 0..<2000 { milliseconds.append(Int64.random(in: 0..<4_200_000_000_000, using: &generator)) }
        let dates = milliseconds.map { Date(timeIntervalSince1970: (Double($0) + 0.4) / 1000) }
        for date in dates {
            let text = Timestamps.format(date)
            #expect(text == date.formatted(style), "\(date.timeIntervalSince1970)")
            let back = try #require(Timestamps.parse(text))
            #expect(abs(back.timeIntervalSince1970 - date.timeIntervalSince1970) < 0.001)
        }
        #expect(Timestamps.parse("2026-11-25T14:58:03Z") == Date(timeIntervalSince1970: 1_795_618_683))
        #expect(Timestamps.parse("2026-11-25t14:58:03.25z") == Date(timeIntervalSince1970: 1_795_618_683.25))
        #expect(Timestamps.parse("2026-11-25T15:58:03+01:00") == Date(timeIntervalSince1970: 1_795_618_683))
        for bad in ["", "yesterday", "2026-13-01T00:00:00Z", "2026-11-25T14:58:03", "2026-11-25T14:58:03.Z"] {
            #expect(Timestamps.parse(bad) == nil, "\(bad)")
        }
    }

    @Test("the older cloudEvents: prefix is accepted on input")
    func legacyPrefix() throws {
        let props = AMQPProperties(
            contentType: "application/json",
            headers: [
                "cloudEvents:id": "x1", "cloudEvents:type": "test.ping", "cloudEvents:source": "other",
                "cloudEvents:specversion": "1.0",
            ])
        let e = try EnvelopeCodec.decode(body: Data(#"{"n":1}"#.utf8), properties: props)
        #expect(e.id == "x1" && e.type == "test.ping" && e.source == "other")
    }

    @Test(
        "received headers: either prefix, any case, extensions kept, other headers ignored, the last of a name counts")
    func receivedHeaders() throws {
        let fields: [(String, AMQPFieldValue)] = [
            ("cloudEvents_id", "first"), ("x-death-count", .int32(2)), ("cloudEvents:ID", "x1"),
            ("cloudEvents_Type", "test.ping"), ("cloudEvents_source", "other"), ("cloudEvents_specversion", "1.0"),
            ("cloudEvents_dataversion", "2"), ("cloudEvents_idempotencykey", "k-9"), ("cloudEvents_tenant", "acme"),
            ("cloudEvents_Region", "eu"), ("cloudevents_subject", "wrong prefix"),
        ]
        var props = AMQPProperties(receivedHeaders: fields.map { AMQPHeaderField(name: $0.0, value: $0.1) })
        props.contentType = "application/json"
        let e = try EnvelopeCodec.decode(body: Data(#"{"n":1}"#.utf8), properties: props)
        #expect(e.id == "x1" && e.type == "test.ping" && e.source == "other")
        #expect(e.dataVersion == 2 && e.idempotencyKey == "k-9" && e.subject == nil)
        #expect(e.extensions == ["tenant": "acme", "region": "eu"])

        let wrongType = AMQPProperties(receivedHeaders: [
            AMQPHeaderField(name: "cloudEvents_id", value: "a"), AMQPHeaderField(name: "cloudEvents:type", value: 7),
        ])
        let error = #expect(throws: EnvelopeDecodingError.self) {
            try EnvelopeCodec.decode(body: Data(), properties: wrongType)
        }
        #expect(error?.reason == "header 'cloudEvents:type' has AMQP type integer, expected a string")
    }

    @Test("structured mode (application/cloudevents+json) is accepted on input")
    func structured() throws {
        let body = Data(
            #"{"specversion":"1.0","id":"s1","type":"test.ping","source":"py","correlationid":"c9","data":{"n":5}}"#
                .utf8)
        let e = try EnvelopeCodec.decode(
            body: body, properties: AMQPProperties(contentType: "application/cloudevents+json; charset=utf-8"))
        #expect(e.id == "s1" && e.correlationID == "c9" && e.source == "py")
        #expect(try JSONCoding.decoder.decode(Ping.self, from: e.data).n == 5)
    }

    @Test("bad envelopes give reasons a person can act on")
    func reasons() {
        let e1 = #expect(throws: EnvelopeDecodingError.self) {
            try EnvelopeCodec.decode(
                body: Data(),
                properties: AMQPProperties(headers: [
                    "cloudEvents_id": "a", "cloudEvents_type": "t", "cloudEvents_specversion": "0.3",
                ]))
        }
        #expect(e1?.reason == "unsupported CloudEvents specversion '0.3', expected 1.0")
        let e2 = #expect(throws: EnvelopeDecodingError.self) {
            try EnvelopeCodec.decode(
                body: Data("[1]".utf8), properties: AMQPProperties(contentType: "application/cloudevents+json"))
        }
        #expect(e2?.reason == "structured CloudEvent is not a JSON object")
        let e3 = #expect(throws: EnvelopeDecodingError.self) {
            try EnvelopeCodec.decode(
                body: Data(),
                properties: AMQPProperties(headers: [
                    "cloudEvents_id": "a", "cloudEvents_type": "t", "cloudEvents_dataversion": "two",
                ]))
        }
        #expect(e3?.reason == "attribute 'dataversion' is not a positive integer: 'two'")
    }

    @Test("emitted ids are deterministic per input, handler and index")
    func derivedIDs() {
        let a = HandlerContext.derivedID(input: "in-1", handler: "h", index: 0)
        #expect(a == HandlerContext.derivedID(input: "in-1", handler: "h", index: 0))
        #expect(a != HandlerContext.derivedID(input: "in-1", handler: "h", index: 1))
        #expect(a != HandlerContext.derivedID(input: "in-1", handler: "g", index: 0))
        #expect(a.count == 36 && a.split(separator: "-").map(\.count) == [8, 4, 4, 4, 12])
        // SHA-256 of "in-1\0h\00", as every version has computed it: a copy re-run after an upgrade must
        // get the ids its first run published, or downstream ledgers would not drop them.
        #expect(a == "dfcd1d33-e00c-5d1f-b704-4a68228c0850")
    }

    @Test("new event ids are random UUIDs (version 4), lowercase, never repeated, also when made concurrently")
    func randomIDs() async {
        // Four tasks at once, 500 ids each: a buffer of randomness serves 16 ids, so this refills it many times.
        let ids = await withTaskGroup(of: [String].self) { group in
            for _ in 0..<4 { group.addTask { (0..<500).map { _ in EventID.random() } } }
            return await group.reduce(into: [String]()) { $0 += $1 }
        }
        #expect(Set(ids).count == 2000)
        for id in ids {
            let chars = Array(id)
            #expect(id.count == 36 && id == id.lowercased() && UUID(uuidString: id) != nil, "\(id)")
            #expect(chars[14] == "4" && "89ab".contains(chars[19]), "version and variant bits of \(id)")
        }
        // Every hex digit outside the fixed bits shows up: the bytes are not, say, all zero.
        let digits = Set(ids.joined().filter { $0 != "-" })
        #expect(digits == Set("0123456789abcdef"))
        // An envelope made without an id gets one of these.
        let made = EventEnvelope(source: "test", type: "t", data: Data("{}".utf8)).id
        #expect(UUID(uuidString: made) != nil && Array(made)[14] == "4" && !ids.contains(made))
    }

    @Test("a forked child makes other ids than its parent, though both had the same random bytes buffered")
    func randomIDsAfterFork() throws {
        _ = EventID.random()  // the buffer now holds what the next ids are made of, in both processes
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        let child = fork()
        if child == 0 {
            // The child: one id, down the pipe, and out without running anything of the parent's.
            var line = Array(EventID.random().utf8)
            _ = write(fds[1], &line, line.count)
            _exit(0)
        }
        close(fds[1])
        defer { close(fds[0]) }
        try #require(child > 0, "fork failed")
        let parentID = EventID.random()
        var poller = pollfd(fd: fds[0], events: Int16(POLLIN), revents: 0)
        guard poll(&poller, 1, 10_000) == 1 else {
            kill(child, SIGKILL)
            _ = waitpid(child, nil, 0)
            Issue.record("the child wrote no id within 10 s")
            return
        }
        var bytes = [UInt8](repeating: 0, count: 64)
        let n = read(fds[0], &bytes, bytes.count)
        var status: Int32 = 0
        _ = waitpid(child, &status, 0)
        let childID = String(decoding: bytes.prefix(max(0, n)), as: UTF8.self)
        #expect(UUID(uuidString: childID) != nil, "child wrote '\(childID)'")
        #expect(childID != parentID)
    }

    @Test("retry policy: delays by attempt, then exhaustion")
    func retryPolicy() {
        let p = RetryPolicy(maxAttempts: 4, delays: [.seconds(1), .seconds(10)])
        #expect(p.delay(afterAttempt: 1) == .seconds(1))
        #expect(p.delay(afterAttempt: 2) == .seconds(10))
        #expect(p.delay(afterAttempt: 3) == .seconds(10))
        #expect(p.delay(afterAttempt: 4) == nil)
        #expect(p.tiers == [.seconds(1), .seconds(10)])
        #expect(RetryPolicy.none.delay(afterAttempt: 1) == nil)
    }
}

@Suite("SQLite ledger")
struct SQLiteLedgerTests {
    private func ledger() throws -> SQLiteLedger {
        try SQLiteLedger(
            path: FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID().uuidString).sqlite")
                .path)
    }

    @Test("the completed-key filter grows with the file, and no completed key is missed, before or after a restart")
    func completedKeyFilter() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID().uuidString).sqlite")
        do {
            // 64 bits at first: crowded after 4 keys, so it is rebuilt several times on the way to 300.
            let l = try SQLiteLedger(path: path.path, filterMinimumBits: 64)
            for i in 0..<300 {
                #expect(
                    try await l.claim(handler: "h", key: "k\(i)", owner: "a", lease: .seconds(60))
                        == .claimed(attempts: 1))
                #expect(try await l.complete(handler: "h", key: "k\(i)", owner: "a", outbox: []) == .committed)
            }
            for i in 0..<300 {
                #expect(
                    try await l.claim(handler: "h", key: "k\(i)", owner: "b", lease: .seconds(60))
                        == .completed(unpublished: []))
            }
            #expect(
                try await l.claim(handler: "other", key: "k1", owner: "b", lease: .seconds(60))
                    == .claimed(attempts: 1))
        }  // one SQLiteLedger per file: the first lets go of it here
        let reopened = try SQLiteLedger(path: path.path, filterMinimumBits: 64)
        for i in 0..<300 {
            #expect(
                try await reopened.claim(handler: "h", key: "k\(i)", owner: "c", lease: .seconds(60))
                    == .completed(unpublished: []))
        }
        #expect(
            try await reopened.claim(handler: "h", key: "new", owner: "c", lease: .seconds(60)) == .claimed(attempts: 1)
        )
    }

    @Test("a second SQLiteLedger on a file in use is refused with a reason; the file opens again once let go")
    func oneUserPerFile() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID().uuidString).sqlite")
        var first: SQLiteLedger? = try SQLiteLedger(path: path.path)
        #expect(first != nil)
        do {
            _ = try SQLiteLedger(path: path.path)
            Issue.record("a second user of the file must be refused")
        } catch let error as ConfigurationError {
            #expect(error.message.contains("is in use by another process"))
            #expect(error.message.contains(path.path))
        }
        first = nil
        #expect(throws: Never.self) { _ = try SQLiteLedger(path: path.path) }
    }

    @Test("a ledger file deleted, moved away or replaced while in use, or its lock file, makes the ledger unusable")
    func filesChangedUnderIt() async throws {
        let files = FileManager.default
        let dir = files.temporaryDirectory.appendingPathComponent("ledger-files-\(UUID().uuidString.prefix(8))")
        try files.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? files.removeItem(at: dir) }
        /// A ledger in `dir` that has completed a key and passes the check.
        func opened(_ name: String) async throws -> SQLiteLedger {
            let l = try SQLiteLedger(path: dir.appendingPathComponent(name).path)
            #expect(try await l.claim(handler: "h", key: "k", owner: "a", lease: .seconds(60)) == .claimed(attempts: 1))
            #expect(try await l.complete(handler: "h", key: "k", owner: "a", outbox: []) == .committed)
            #expect(throws: Never.self) { try l.verifyUsable() }
            return l
        }
        func reason(_ l: SQLiteLedger) -> String? {
            do { try l.verifyUsable() } catch {
                return (error as? LedgerUnusable)?.reason ?? "not LedgerUnusable: \(error)"
            }
            return nil
        }

        // Deleted, as `rm ledger.sqlite*` does: SQLite would go on writing to the files it holds open.
        let deleted = try await opened("deleted.sqlite")
        for suffix in ["", "-wal", "-shm", ".lock"] { try files.removeItem(atPath: deleted.path + suffix) }
        #expect(
            reason(deleted)?.hasPrefix(
                "the ledger file \(deleted.path) was deleted or moved away while in use; stopping, since what this "
                    + "process writes would be lost at exit. Put the file back") == true, "\(reason(deleted) ?? "")")

        let moved = try await opened("moved.sqlite")
        try files.moveItem(atPath: moved.path, toPath: moved.path + ".old")
        #expect(
            reason(moved)?.hasPrefix("the ledger file \(moved.path) was deleted or moved away while in use") == true)

        // A backup renamed over the file in use.
        let replaced = try await opened("replaced.sqlite")
        let backup = dir.appendingPathComponent("backup.sqlite").path
        try files.copyItem(atPath: replaced.path, toPath: backup)
        #expect(rename(backup, replaced.path) == 0)
        #expect(
            reason(replaced)?.hasPrefix("the ledger file \(replaced.path) was replaced by another file while in use")
                == true)

        // The log alone: its committed pages not yet copied back would be lost at exit.
        let log = try await opened("log.sqlite")
        try files.removeItem(atPath: log.path + "-wal")
        #expect(
            reason(log)?.hasPrefix("the ledger \(log.path): its file \(log.path)-wal was deleted or moved away") == true
        )

        // The lock alone: a second SQLiteLedger could open the file now, and it does.
        let unlocked = try await opened("unlocked.sqlite")
        try files.removeItem(atPath: unlocked.path + ".lock")
        #expect(
            reason(unlocked)
                == "the ledger \(unlocked.path): its lock file was deleted or moved away while in use, so a second "
                + "process could open the ledger and run handlers again for keys this one completed; stopping")
        #expect(throws: Never.self) { _ = try SQLiteLedger(path: unlocked.path) }

        // Untouched, a ledger stays usable.
        let kept = try await opened("kept.sqlite")
        #expect(reason(kept) == nil)
    }

    @Test("a file that is not a ledger, or a damaged one, is refused at open with what to do")
    func damagedFile() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID().uuidString).sqlite")
        defer {
            for suffix in ["", "-wal", "-shm", ".lock"] {
                try? FileManager.default.removeItem(atPath: path.path + suffix)
            }
        }
        let advice =
            "; restore the file from a backup, or move it aside to begin an empty ledger (an event handled before "
            + "would then run again if it were delivered again)"
        try Data(String(repeating: "not a database\n", count: 100).utf8).write(to: path)
        let notADatabase = #expect(throws: ConfigurationError.self) { _ = try SQLiteLedger(path: path.path) }
        #expect(
            notADatabase?.message
                == "cannot open the ledger \(path.path): file is not a database (SQLite error 26)\(advice)")

        // A real ledger whose pages after the first were overwritten.
        try FileManager.default.removeItem(at: path)
        do {
            let l = try SQLiteLedger(path: path.path)
            for i in 0..<200 {
                #expect(
                    try await l.claim(handler: "h", key: "k\(i)", owner: "a", lease: .seconds(60))
                        == .claimed(attempts: 1))
                #expect(try await l.complete(handler: "h", key: "k\(i)", owner: "a", outbox: []) == .committed)
            }
        }
        // Closed, the ledger copied its log into the file and removed it: the file alone holds every page.
        try #require(!FileManager.default.fileExists(atPath: path.path + "-wal"))
        let file = try FileHandle(forWritingTo: path)
        try file.seek(toOffset: 4096)
        try file.write(contentsOf: Data(repeating: 0xFF, count: 8192))
        try file.close()
        let damaged = #expect(throws: ConfigurationError.self) { _ = try SQLiteLedger(path: path.path) }
        #expect(
            damaged?.message
                == "cannot open the ledger \(path.path): database disk image is malformed (SQLite error 11)\(advice)")
    }

    @Test("claim, complete with outbox, then a duplicate sees the completed key and its unpublished outbox")
    func claimCompleteDuplicate() async throws {
        let l = try ledger()
        #expect(try await l.claim(handler: "h", key: "k", owner: "a", lease: .seconds(60)) == .claimed(attempts: 1))
        guard
            case .heldElsewhere(let until) = try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60))
        else {
            Issue.record("a live lease must hold the key for its owner"); return
        }
        #expect(until > Date())
        let out = try sampleOutbox(2)
        #expect(try await l.complete(handler: "h", key: "k", owner: "a", outbox: out) == .committed)
        guard case .completed(let pending) = try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60))
        else {
            Issue.record("expected completed"); return
        }
        #expect(pending.map(\.envelope.id) == ["out-0", "out-1"])
        #expect(pending[1].envelope.data == out[1].envelope.data)
        try await l.markPublished(handler: "h", key: "k", indexes: [0])
        #expect(
            try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60))
                == .completed(unpublished: [pending[1]]))
        // Keys are scoped by handler.
        #expect(try await l.claim(handler: "other", key: "k", owner: "a", lease: .seconds(60)) == .claimed(attempts: 1))
    }

    @Test("an expired or released lease can be claimed again, and the old owner can no longer complete")
    func leases() async throws {
        let l = try ledger()
        _ = try await l.claim(handler: "h", key: "k", owner: "a", lease: .milliseconds(1))
        try await Task.sleep(for: .milliseconds(20))
        #expect(try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60)) == .claimed(attempts: 2))
        #expect(try await l.complete(handler: "h", key: "k", owner: "a", outbox: []) == .leaseLost)
        try await l.release(handler: "h", key: "k", owner: "b")
        #expect(try await l.claim(handler: "h", key: "k", owner: "c", lease: .seconds(60)) == .claimed(attempts: 3))
        try await l.releaseAllLeases(handler: "h")
        #expect(try await l.claim(handler: "h", key: "k", owner: "d", lease: .seconds(60)) == .claimed(attempts: 4))
    }

    @Test("payloads and keys of any size survive the ledger: empty, small, and past the 16 KiB bound on the stack")
    func largeValuesRoundTrip() async throws {
        let l = try ledger()
        for size in [0, 7, 16_000, 16_385, 1 << 20] {
            var e = try EventEnvelope(Pong(n: size), source: "s", id: "big-\(size)")
            e.data = Data((0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) })
            let message = OutboxMessage(index: 0, envelope: e, exchange: "x", routingKey: "test.pong")
            let key = "k\(size)-" + String(repeating: "é", count: size / 64)
            #expect(try await l.claim(handler: "h", key: key, owner: "a", lease: .seconds(60)) == .claimed(attempts: 1))
            #expect(try await l.complete(handler: "h", key: key, owner: "a", outbox: [message]) == .committed)
            guard
                case .completed(let stored) = try await l.claim(handler: "h", key: key, owner: "b", lease: .seconds(60))
            else {
                Issue.record("expected the completed key \(size)"); continue
            }
            #expect(stored == [message], "payload of \(size) bytes")
        }
    }

    @Test("every attribute of an outbox event survives the ledger, whatever characters its strings hold")
    func outboxAttributesRoundTrip() async throws {
        let l = try ledger()
        let e = try trickyEnvelope()
        let message = OutboxMessage(index: 0, envelope: e, exchange: "x", routingKey: "test.pong")
        _ = try await l.claim(handler: "h", key: "k", owner: "a", lease: .seconds(60))
        #expect(try await l.complete(handler: "h", key: "k", owner: "a", outbox: [message]) == .committed)
        guard case .completed(let stored) = try await l.claim(handler: "h", key: "k", owner: "b", lease: .seconds(60)),
            let back = stored.first
        else {
            Issue.record("expected the completed key with its outbox"); return
        }
        #expect(back == message)
        // No optional attribute set: absent ones stay absent.
        let bare = try EventEnvelope(Pong(n: 2), source: "s", id: "bare")
        let plain = OutboxMessage(index: 0, envelope: bare, exchange: "x", routingKey: "test.pong")
        _ = try await l.claim(handler: "h", key: "bare", owner: "a", lease: .seconds(60))
        _ = try await l.complete(handler: "h", key: "bare", owner: "a", outbox: [plain])
        guard case .completed(let again) = try await l.claim(handler: "h", key: "bare", owner: "b", lease: .seconds(60))
        else {
            Issue.record("expected completed"); return
        }
        #expect(again.first?.envelope.subject == nil && again.first?.envelope.idempotencyKey == nil)
        #expect(again.first?.envelope.id == "bare" && again.first?.envelope.data == bare.data)
    }

    @Test("batch claim and complete give each key its own outcome, in order, in one write")
    func batches() async throws {
        let l = try ledger()
        let doneOutbox = try sampleOutbox(1)
        _ = try await l.claim(handler: "h", key: "done", owner: "x", lease: .seconds(60))
        _ = try await l.complete(handler: "h", key: "done", owner: "x", outbox: doneOutbox)
        let claims = try await l.claim(
            [
                ClaimRequest(handler: "h", key: "new", owner: "a"),
                ClaimRequest(handler: "h", key: "new", owner: "b"),  // the same key again in the batch
                ClaimRequest(handler: "h", key: "done", owner: "c"),
                ClaimRequest(handler: "h", key: "other", owner: "d"),
            ], lease: .seconds(60))
        #expect(claims[0] == .claimed(attempts: 1))
        guard case .heldElsewhere = claims[1] else {
            Issue.record("the second copy of a key in one batch must find it held: \(claims[1])"); return
        }
        #expect(claims[2] == .completed(unpublished: doneOutbox))
        #expect(claims[3] == .claimed(attempts: 1))
        let results = try await l.complete([
            CompletionRequest(handler: "h", key: "new", owner: "a", outbox: try sampleOutbox(2)),
            CompletionRequest(handler: "h", key: "other", owner: "not-the-holder", outbox: []),
            CompletionRequest(handler: "h", key: "done", owner: "c", outbox: []),
        ])
        #expect(results == [.committed, .leaseLost, .alreadyCompleted(unpublished: doneOutbox)])
        try await l.markPublished([
            PublishedEntries(handler: "h", key: "new", indexes: [0, 1]),
            PublishedEntries(handler: "h", key: "done", indexes: [0]),
        ])
        #expect(
            try await l.claim(handler: "h", key: "new", owner: "e", lease: .seconds(60)) == .completed(unpublished: []))
        #expect(
            try await l.claim(handler: "h", key: "done", owner: "e", lease: .seconds(60)) == .completed(unpublished: [])
        )
        #expect(try await l.status(handler: "h", key: "other")?.state == "claimed")
    }

    @Test("a ledger file of the first schema is migrated with its completed keys and unpublished outbox")
    func migratesVersionOne() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent(
            "ledger-v1-\(UUID().uuidString).sqlite")
        // As the first version wrote them (JSONEncoder, time in seconds since 1970).
        let attributes = """
            {"id":"out-7","source":"s","type":"test.pong","time":1764082683.25,"dataContentType":"application/json",\
            "dataVersion":1,"correlationID":"out-7","extensions":{"x-ext":"kept"}}
            """
        let queue = try DatabaseQueue(path: path.path)
        try await queue.write { db in
            try db.execute(
                sql: """
                    CREATE TABLE grdb_migrations (identifier TEXT NOT NULL PRIMARY KEY);
                    INSERT INTO grdb_migrations VALUES ('v1');
                    \(Self.claimTable)
                    CREATE TABLE outbox (
                        handler TEXT NOT NULL, key TEXT NOT NULL, idx INTEGER NOT NULL, exchange TEXT NOT NULL,
                        routing_key TEXT NOT NULL, attributes TEXT NOT NULL, data BLOB NOT NULL,
                        published INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (handler, key, idx)) WITHOUT ROWID;
                    INSERT INTO claim VALUES ('h', 'done', 'completed', NULL, NULL, 1, 100);
                    INSERT INTO claim VALUES ('h', 'half', 'completed', NULL, NULL, 2, 200);
                    INSERT INTO claim VALUES ('h', 'left', 'claimed', 'old-owner', 9e12, 1, NULL);
                    """)
            for (key, idx, published) in [("done", 0, 1), ("half", 0, 1), ("half", 1, 0)] {
                try db.execute(
                    sql: "INSERT INTO outbox VALUES ('h', ?, ?, 'x', 'test.pong', ?, ?, ?)",
                    arguments: [key, idx, attributes, Data("{\"n\":7}".utf8), published])
            }
        }
        try queue.close()
        let l = try SQLiteLedger(path: path.path)
        let pending = try await l.unpublished(handler: "h", limit: 10)
        #expect(pending.map(\.key) == ["half"] && pending.first?.messages.map(\.index) == [1])
        let migrated = try #require(pending.first?.messages.first?.envelope)
        #expect(migrated.id == "out-7" && migrated.type == "test.pong" && migrated.extensions == ["x-ext": "kept"])
        #expect(migrated.time == Date(timeIntervalSince1970: 1_764_082_683.25))
        guard
            case .completed(let unpublished) = try await l.claim(
                handler: "h", key: "done", owner: "a", lease: .seconds(9))
        else {
            Issue.record("a completed key of the old file must stay completed"); return
        }
        #expect(unpublished.isEmpty)
        // A lease the old file kept is voided at start, like any lease of a dead incarnation.
        try await l.releaseAllLeases(handler: "h")
        #expect(try await l.claim(handler: "h", key: "left", owner: "a", lease: .seconds(9)) == .claimed(attempts: 1))
        #expect(try await l.complete(handler: "h", key: "left", owner: "a", outbox: []) == .committed)
        #expect(try await l.prune(completedBefore: Date()) >= 1)
        #expect(try await l.status(handler: "h", key: "done") == nil)
        #expect(try await l.status(handler: "h", key: "half")?.state == "completed", "its outbox is not all published")
    }

    @Test("a ledger file of the third schema is migrated: completed keys, attempts, unpublished entries in order")
    func migratesVersionThree() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent(
            "ledger-v3-\(UUID().uuidString).sqlite")
        let attributes = try #require(
            String(
                data: try JSONEncoder().encode(["id": "out", "source": "s", "type": "test.pong"]), encoding: .utf8)
        )
        .replacingOccurrences(of: "}", with: ",\"dataVersion\":1,\"extensions\":{}}")
        let queue = try DatabaseQueue(path: path.path)
        try await queue.write { db in
            // As the third version left it; 'c' committed before 'a' by its time, after it by its rowid.
            try db.execute(
                sql: """
                    CREATE TABLE grdb_migrations (identifier TEXT NOT NULL PRIMARY KEY);
                    INSERT INTO grdb_migrations VALUES ('v1'), ('v2'), ('v3');
                    \(Self.claimTable)
                    CREATE TABLE outbox (
                        handler TEXT NOT NULL, key TEXT NOT NULL, idx INTEGER NOT NULL, exchange TEXT NOT NULL,
                        routing_key TEXT NOT NULL, attributes TEXT NOT NULL, data BLOB NOT NULL,
                        published INTEGER NOT NULL DEFAULT 0, committed_at REAL NOT NULL);
                    CREATE INDEX outbox_unpublished ON outbox(handler, key, idx) WHERE published = 0;
                    INSERT INTO claim VALUES ('h', 'a', 'completed', NULL, NULL, 2, 200);
                    INSERT INTO claim VALUES ('h', 'b', 'completed', NULL, NULL, 1, 300);
                    INSERT INTO claim VALUES ('h', 'c', 'completed', NULL, NULL, 1, 100);
                    INSERT INTO claim VALUES ('g', 'a', 'completed', NULL, NULL, 1, 100);
                    INSERT INTO claim VALUES ('h', 'x', 'claimed', 'old-owner', 9e12, 3, NULL);
                    """)
            // 'gone': pruned from `claim` while its published entry stayed (v3 pruned the two tables separately).
            for (key, idx, published, at) in [
                ("a", 0, 1, 200.0), ("a", 1, 0, 200), ("a", 2, 0, 200), ("c", 0, 0, 100), ("gone", 0, 1, 50),
            ] {
                try db.execute(
                    sql: "INSERT INTO outbox VALUES ('h', ?, ?, 'x', 'test.pong', ?, ?, ?, ?)",
                    arguments: [key, idx, attributes, Data("{\"n\":\(idx)}".utf8), published, at])
            }
        }
        try queue.close()
        let l = try SQLiteLedger(path: path.path)
        let pending = try await l.unpublished(handler: "h", limit: 10)
        #expect(pending.map(\.key) == ["c", "a"], "in commit order")
        #expect(pending.map { $0.messages.map(\.index) } == [[0], [1, 2]])
        #expect(
            pending.last?.messages.map { String(decoding: $0.envelope.data, as: UTF8.self) } == [
                "{\"n\":1}", "{\"n\":2}",
            ])
        #expect(try await l.status(handler: "h", key: "a")?.attempts == 2)
        #expect(
            try await l.claim(handler: "h", key: "b", owner: "o", lease: .seconds(9)) == .completed(unpublished: []))
        #expect(
            try await l.claim(handler: "g", key: "a", owner: "o", lease: .seconds(9)) == .completed(unpublished: []))
        #expect(try await l.claim(handler: "h", key: "x", owner: "o", lease: .seconds(9)) == .claimed(attempts: 1))
        let tables = try await DatabaseQueue(path: path.path).read { db in
            try String.fetchAll(db, sql: "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        }
        #expect(tables == ["completion", "grdb_migrations"])
        #expect(try outboxKeys(path) == ["a", "a", "a", "c"], "the entry left without its key is dropped")
        #expect(try await l.claim(handler: "h", key: "gone", owner: "o", lease: .seconds(9)) == .claimed(attempts: 1))
        #expect(try await l.complete(handler: "h", key: "gone", owner: "o", outbox: try sampleOutbox(1)) == .committed)
        try await l.markPublished(handler: "h", key: "gone", indexes: [0])
        // Before 250: 'c' and 'a' wait for their publishes; 'g'/'a' goes.
        #expect(try await l.prune(completedBefore: Date(timeIntervalSince1970: 250)) == 1)
        try await l.markPublished(handler: "h", key: "a", indexes: [1, 2])
        #expect(try await l.unpublished(handler: "h", limit: 10).map(\.key) == ["c"])
        #expect(try await l.prune(completedBefore: Date(timeIntervalSince1970: 250)) == 1)
        #expect(try await l.status(handler: "h", key: "a") == nil)
        #expect(try await l.status(handler: "h", key: "c")?.state == "completed")
        #expect(try await l.status(handler: "h", key: "b")?.state == "completed")
    }

    @Test("an outbox entry committed after a prune emptied the file is still found unpublished")
    func unpublishedAfterPruneToEmpty() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID().uuidString).sqlite")
        do {
            let l = try SQLiteLedger(path: path.path)
            for key in ["k1", "k2"] {
                _ = try await l.claim(handler: "h", key: key, owner: "a", lease: .seconds(60))
                _ = try await l.complete(handler: "h", key: key, owner: "a", outbox: try sampleOutbox(1))
                try await l.markPublished(handler: "h", key: key, indexes: [0])
            }
        }  // reopened: nothing unpublished, so reads of unpublished entries start past the last row
        let l = try SQLiteLedger(path: path.path)
        #expect(try await l.prune(completedBefore: Date().addingTimeInterval(1)) == 2)
        _ = try await l.claim(handler: "h", key: "k3", owner: "a", lease: .seconds(60))
        _ = try await l.complete(handler: "h", key: "k3", owner: "a", outbox: try sampleOutbox(2))
        let pending = try await l.unpublished(handler: "h", limit: 10)
        #expect(pending.map(\.key) == ["k3"] && pending.first?.messages.map(\.index) == [0, 1])
    }

    @Test("pruning removes old completed keys whose outbox is published, and keeps the rest")
    func pruning() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID().uuidString).sqlite")
        let l = try SQLiteLedger(path: path.path)
        for key in ["done", "unpublished"] {
            _ = try await l.claim(handler: "h", key: key, owner: "a", lease: .seconds(60))
            _ = try await l.complete(handler: "h", key: key, owner: "a", outbox: try sampleOutbox(1))
        }
        try await l.markPublished(handler: "h", key: "done", indexes: [0])
        _ = try await l.claim(handler: "h", key: "running", owner: "a", lease: .seconds(60))
        #expect(try await l.prune(completedBefore: Date().addingTimeInterval(-60)) == 0)
        #expect(try outboxKeys(path) == ["done", "unpublished"], "nothing is old enough yet")
        // Committed after the cutoff: bounds what the prune may remove, though it is published.
        try await Task.sleep(for: .milliseconds(20))
        let cutoff = Date()
        try await Task.sleep(for: .milliseconds(20))
        _ = try await l.claim(handler: "h", key: "recent", owner: "a", lease: .seconds(60))
        _ = try await l.complete(handler: "h", key: "recent", owner: "a", outbox: try sampleOutbox(1))
        try await l.markPublished(handler: "h", key: "recent", indexes: [0])
        #expect(try await l.prune(completedBefore: cutoff) == 1)
        #expect(try outboxKeys(path) == ["recent", "unpublished"])
        #expect(try await l.status(handler: "h", key: "done") == nil)
        #expect(try await l.status(handler: "h", key: "unpublished")?.state == "completed")
        #expect(try await l.status(handler: "h", key: "running")?.state == "claimed")
        #expect(try await l.status(handler: "h", key: "recent")?.state == "completed")
        #expect(try await l.prune(completedBefore: Date().addingTimeInterval(1)) == 1)
        #expect(try outboxKeys(path) == ["unpublished"])
    }

    @Test("pruning works through a large file in chunks, keeping only the keys whose outbox waits to be published")
    func pruningInChunks() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID().uuidString).sqlite")
        let l = try SQLiteLedger(path: path.path)
        let keys = (0..<2_500).map { "k\($0)" }
        _ = try await l.claim(keys.map { ClaimRequest(handler: "h", key: $0, owner: "a") }, lease: .seconds(60))
        let one = try sampleOutbox(1)
        let results = try await l.complete(
            keys.map { CompletionRequest(handler: "h", key: $0, owner: "a", outbox: $0 == "k7" ? [] : one) })
        #expect(results.allSatisfy { $0 == .committed })
        let waiting: Set = ["k1300", "k2499"]
        try await l.markPublished(
            keys.filter { !waiting.contains($0) }.map { PublishedEntries(handler: "h", key: $0, indexes: [0]) })
        #expect(2 * keys.count - 1 > Int(SQLiteLedger.pruneChunk) * 4, "rows for several chunks")
        #expect(try await l.prune(completedBefore: Date().addingTimeInterval(1)) == keys.count - waiting.count)
        #expect(Set(try outboxKeys(path)) == waiting)
        #expect(Set(try await l.unpublished(handler: "h", limit: 10).map(\.key)) == waiting)
        for key in ["k0", "k7", "k1299", "k1301", "k2498"] {
            #expect(try await l.status(handler: "h", key: key) == nil, "\(key) is pruned")
        }
    }

    @Test("the log is copied back to the file on a thread of its own, and stays short however many commits come")
    func checkpointsOffTheCommitPath() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID().uuidString).sqlite")
        // Small limits, and an inline limit that is never reached: only the checkpoint thread keeps the log short.
        let l = try SQLiteLedger(
            path: path.path, filterMinimumBits: 1 << 16,
            checkpointLimits: WALCheckpointer.Limits(pass: 40, inline: 1_000_000))
        let checkpointer = l.checkpointer
        let one = try sampleOutbox(1)
        // One commit per key, each writing at least two pages (the table's and the index's): 8,000 pages or
        // more, 32 MB, if nothing copied them back. In rounds of 100 commits, each followed by the pass it
        // started: a pass that the round's last commit asked for is already marked running (the WAL hook
        // runs in the commit), so waiting for it is not a guess.
        let keys = (0..<4_000).map { "k\($0)" }
        for round in stride(from: 0, to: keys.count, by: 100) {
            for key in keys[round..<round + 100] {
                #expect(
                    try await l.claim(handler: "h", key: key, owner: "a", lease: .seconds(60)) == .claimed(attempts: 1))
                #expect(try await l.complete(handler: "h", key: key, owner: "a", outbox: one) == .committed)
            }
            let deadline = ContinuousClock.now + .seconds(30)
            while checkpointer.isRunning, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
            try #require(!checkpointer.isRunning, "a pass still runs after 30 s")
        }
        #expect(checkpointer.passes.load(ordering: .relaxed) >= 40, "a pass at least every round")
        #expect(checkpointer.failures.load(ordering: .relaxed) == 0)
        // The log file is as long as the longest the log ever was: a pass starts it over, so at most a round's pages.
        let logBytes = try #require(
            try FileManager.default.attributesOfItem(atPath: path.path + "-wal")[.size] as? Int)
        #expect(logBytes < 1_000 * 4_096, "the log holds \(logBytes / 4_096) pages")
        // The database file alone, without its log, holds nearly every key: what the passes copied there. Only
        // the last commits, fewer than a pass's 40 pages, may be in the log alone.
        let copy = path.deletingLastPathComponent().appendingPathComponent("copy-\(UUID().uuidString).sqlite")
        try FileManager.default.copyItem(at: path, to: copy)
        let inFile = try await DatabaseQueue(path: copy.path).read { db in
            try Int.fetchOne(db, sql: "SELECT count(*) FROM completion WHERE idx = -1") ?? 0
        }
        #expect(inFile > keys.count - 40, "\(inFile) keys in the database file")
        for key in ["k0", "k1999", "k3999"] {
            #expect(
                try await l.claim(handler: "h", key: key, owner: "b", lease: .seconds(60))
                    == .completed(unpublished: one))
        }
        // Passes start the log over in place: its file, like the others, is still the one the ledger opened.
        #expect(throws: Never.self) { try l.verifyUsable() }
    }

    @Test("under a steady stream of commits every pass starts the log over, so the file stays about a pass long")
    func logStartsOverUnderLoad() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID().uuidString).sqlite")
        let pass = 200
        let l = try SQLiteLedger(
            path: path.path, filterMinimumBits: 1 << 16,
            checkpointLimits: WALCheckpointer.Limits(pass: pass, inline: 1_000_000))
        let one = try sampleOutbox(1)
        // Back to back, never waiting for a pass: passive checkpoints alone never find the log copied to its
        // end then, and it would hold nearly every page written, at least two per commit (10,000 or more;
        // 5,400 to 7,700 pages of 3,000 commits when passes did not restart it). Restarted at every pass, it
        // held 380 to 710 pages of these 5,000, also with two busy loops beside the test.
        for n in 0..<5_000 {
            let key = "k\(n)"
            #expect(try await l.claim(handler: "h", key: key, owner: "a", lease: .seconds(60)) == .claimed(attempts: 1))
            #expect(try await l.complete(handler: "h", key: key, owner: "a", outbox: one) == .committed)
        }
        #expect(l.checkpointer.passes.load(ordering: .relaxed) >= 5, "a pass every \(pass) pages or so")
        #expect(l.checkpointer.failures.load(ordering: .relaxed) == 0)
        // The file is as long as the longest the log ever was: a pass's pages and what came during one.
        let logBytes = try #require(
            try FileManager.default.attributesOfItem(atPath: path.path + "-wal")[.size] as? Int)
        #expect(logBytes < 12 * pass * 4_096, "the log held \(logBytes / 4_096) pages")
        #expect(throws: Never.self) { try l.verifyUsable() }
    }

    /// The `claim` table as schema versions 1 to 3 had it.
    private static let claimTable = """
        CREATE TABLE claim (
            handler TEXT NOT NULL, key TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('claimed', 'completed')),
            owner TEXT, lease_expires REAL, attempts INTEGER NOT NULL DEFAULT 0, completed_at REAL,
            PRIMARY KEY (handler, key)) WITHOUT ROWID;
        CREATE INDEX claim_completed_at ON claim(completed_at) WHERE state = 'completed';
        """

    private func outboxKeys(_ path: URL) throws -> [String] {
        try DatabaseQueue(path: path.path).read { db in
            try String.fetchAll(db, sql: "SELECT key FROM completion WHERE idx >= 0 ORDER BY key")
        }
    }
}

@Suite("Runtime start-up")
struct RuntimeStartupTests {
    @Test("a manifest append refused because the registry stream is still starting is told apart from other failures")
    func registryStartingClassification() {
        func error(_ code: UInt16, _ message: String) -> AMQPError {
            AMQPError(.connectionClosed, replyCode: code, message: message, operation: "basic.publish")
        }
        // What RabbitMQ 3.10 sends while a stream another client just declared has no writer yet.
        #expect(
            ChoreoRuntime.isRegistryStarting(
                error(506, "RESOURCE_ERROR - Stream not found for queue 'choreo.registry' in vhost '/'")))
        #expect(ChoreoRuntime.isRegistryStarting(error(541, "INTERNAL_ERROR")))
        // Anything else is a lost connection.
        #expect(!ChoreoRuntime.isRegistryStarting(error(506, "RESOURCE_ERROR - out of disk")))
        #expect(!ChoreoRuntime.isRegistryStarting(error(320, "CONNECTION_FORCED - broker forced connection closure")))
        #expect(
            !ChoreoRuntime.isRegistryStarting(AMQPError(.connectionLost, message: "socket closed", operation: "read")))
    }

    @Test("--ack-delay takes 0 to 10000 ms, and a handler holds at most a quarter of its prefetch of acks")
    func ackDelayOption() throws {
        func configuration(_ args: [String]) throws -> RunnerConfiguration {
            try RunnerOptions.parse(args).configuration(service: "svc")
        }
        #expect(try configuration([]).ackDelay == .milliseconds(20))
        #expect(try configuration(["--ack-delay", "0"]).ackDelay == .zero)
        #expect(try configuration(["--ack-delay", "10000"]).ackDelay == .seconds(10))
        for bad in ["--ack-delay=-1", "--ack-delay=10001"] {
            let error = #expect(throws: ConfigurationError.self) { try configuration([bad]) }
            #expect(error?.message == "--ack-delay must be 0 to 10000 ms")
        }
        #expect(throws: (any Error).self) { try configuration(["--ack-delay", "soon"]) }
        #expect(RunnerConfiguration.heldAcks(prefetch: 32) == 8)
        // A prefetch under 8 holds at most one ack, which AMQPChannel.holdAcks takes as no hold at all.
        #expect(RunnerConfiguration.heldAcks(prefetch: 7) == 1)
    }

    @Test("queue names and event types that would pass AMQP's 255 bytes are refused before anything starts")
    func queueNamesFit() throws {
        // "choreo." + service + ".ping" + ".retry.200ms" (the fixture's tier, its longest queue name): 24 + service.
        func runtime(service: String) throws -> ChoreoRuntime {
            try ChoreoRuntime(
                configuration: RunnerConfiguration(service: service), handlers: [PingTestHandler()],
                ledger: InMemoryLedger())
        }
        let fits = String(repeating: "s", count: 255 - 24)
        #expect(throws: Never.self) { _ = try runtime(service: fits) }
        let long = fits + "s"
        let error = #expect(throws: ConfigurationError.self) { _ = try runtime(service: long) }
        #expect(
            error?.message
                == "the queue name 'choreo.\(long).ping.retry.200ms' is 256 bytes long, and AMQP allows at most 255: "
                + "shorten the service name '\(long)' or the handler name 'ping'")

        // An emitted type is a routing key: one too long could never leave the outbox.
        let emitting = #expect(throws: ConfigurationError.self) {
            _ = try ChoreoRuntime(
                configuration: RunnerConfiguration(service: "svc"), handlers: [EmitsLongType()],
                ledger: InMemoryLedger())
        }
        #expect(
            emitting?.message
                == "emits-long: the event type '\(LongTypeEvent.eventType)' is 256 bytes long, and AMQP allows at most "
                + "255 in a routing key")
    }

    struct LongTypeEvent: Event {
        static let eventType = String(repeating: "t", count: 256)
    }

    struct EmitsLongType: EventHandler {
        let name = "emits-long"
        var emits: [any Event.Type] { [LongTypeEvent.self] }
        func handle(_ event: Ping, context: HandlerContext) async throws {}
    }
}
