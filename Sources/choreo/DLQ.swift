import ArgumentParser
import Choreo
import ChoreoOps
import Foundation
import Synchronization

struct DLQ: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dlq",
        abstract: "Inspect and replay dead letters.",
        subcommands: [List.self, Show.self, Replay.self, Purge.self, Export.self, Import.self])

    /// Connects and reads the registry: what every dead-letter command starts with.
    static func store(_ connection: ConnectionOptions) async throws -> DeadLetterStore {
        let amqp = try await connection.connect()
        let manifests = try await RegistryReader(connection: amqp).manifests()
        return DeadLetterStore(connection: amqp, manifests: manifests)
    }

    struct Row: Encodable {
        var id, type, service, handler, errorType, error: String
        var attempts: Int
        var firstFailure, lastFailure: Date?
    }

    static func row(_ l: DeadLetter) -> Row {
        Row(
            id: l.id, type: l.type, service: l.service, handler: l.handler, errorType: l.errorType,
            error: l.errorMessage,
            attempts: l.attempts, firstFailure: l.firstFailure, lastFailure: l.lastFailure)
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List dead letters (nothing is removed).")
        @OptionGroup var connection: ConnectionOptions
        @OptionGroup var filters: FilterOptions
        @Flag(help: "JSON lines instead of a table.")
        var json = false

        func run() async throws {
            let filter = try filters.filter()
            let store = try await DLQ.store(connection)
            let letters = try await store.list(filter)
            if json {
                for l in letters { print(try jsonLine(DLQ.row(l))) }
                return
            }
            if letters.isEmpty {
                print("no dead letters")
                return
            }
            print(
                table(
                    ["ID", "TYPE", "HANDLER", "ATTEMPTS", "FAILED", "ERROR"],
                    letters.map { l in
                        let error = "\(l.errorType): \(l.errorMessage)"
                        return [
                            l.id, l.type, "\(l.service).\(l.handler)", String(l.attempts),
                            l.lastFailure.map(Timestamps.format) ?? "-",
                            error.count > 100 ? String(error.prefix(97)) + "..." : error,
                        ]
                    }))
            print("\(letters.count) dead letter\(letters.count == 1 ? "" : "s")")
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show one dead letter: envelope, headers, failure and body.")
        @OptionGroup var connection: ConnectionOptions
        @Argument(help: "The event id.")
        var id: String
        @Option(help: "Only look in this handler's dead letters.")
        var handler: String?

        func run() async throws {
            let store = try await DLQ.store(connection)
            let l = try await store.show(id: id, handler: handler)
            var lines = [
                "id:            \(l.id)",
                "type:          \(l.type)",
                "handler:       \(l.service).\(l.handler)",
                "queue:         \(l.queue) (replays go to \(l.handlerQueue))",
                "error type:    \(l.errorType)",
                "error:         \(l.errorMessage)",
                "attempts:      \(l.attempts)",
                "first failure: \(l.firstFailure.map(Timestamps.format) ?? "-")",
                "last failure:  \(l.lastFailure.map(Timestamps.format) ?? "-")",
                "published to:  exchange '\(l.originalExchange)' with routing key '\(l.originalRoutingKey)'",
                "content type:  \(l.properties.contentType ?? "-")",
                "headers:",
            ]
            for (k, v) in (l.properties.headers ?? [:]).sorted(by: { $0.key < $1.key }) {
                lines.append("  \(k): \(v.stringValue ?? String(describing: v))")
            }
            lines = lines.map { visible($0, keepingLines: false) }
            lines.append("body (\(l.body.count) bytes):")
            lines.append(visible(Show.pretty(l.body), keepingLines: true))
            print(lines.joined(separator: "\n"))
        }

        static func pretty(_ body: Data) -> String {
            if let object = try? JSONSerialization.jsonObject(with: body, options: [.fragmentsAllowed]),
                let data = try? JSONSerialization.data(
                    withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .fragmentsAllowed])
            {
                return String(decoding: data, as: UTF8.self)
            }
            if let text = String(validating: body, as: UTF8.self) { return text }
            return "(not UTF-8) base64: " + body.base64EncodedString()
        }
    }

    struct Replay: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send dead letters back to the handler that failed them (its own queue only), then remove them.",
            discussion:
                "A letter is removed only after the broker confirmed its replayed copy; an interrupted replay loses nothing, and the handler's ledger drops a copy replayed twice."
        )
        @OptionGroup var connection: ConnectionOptions
        @Option(name: .customLong("id"), help: "Replay this event id (repeatable).")
        var ids: [String] = []
        @Flag(help: "Replay every letter that matches the filters.")
        var all = false
        @OptionGroup var filters: FilterOptions
        @Flag(help: "Show what would be replayed; change nothing.")
        var dryRun = false
        @Option(help: "At most this many letters per second.")
        var rate: Double?

        func validate() throws {
            if ids.isEmpty == !all { throw ValidationError("give either --id ID (repeatable) or --all") }
            if let rate, rate <= 0 { throw ValidationError("--rate must be positive") }
        }

        func run() async throws {
            let filter = try filters.filter(ids: ids)
            let store = try await DLQ.store(connection)
            let interactive = isTerminal(2)
            // Off a terminal, a line each time another thousand is passed (and at the end); never one twice.
            let shown = Mutex((thousands: 0, line: ""))
            let verb = dryRun ? "checked" : "replayed"
            let summary = try await store.replay(filter, dryRun: dryRun, rate: rate) { done, total in
                guard total > 0 else { return }
                let show = shown.withLock { shown -> Bool in
                    let crossed = done / 1000 > shown.thousands
                    shown.thousands = max(shown.thousands, done / 1000)
                    let line = "\(done)/\(total)"
                    guard interactive || done == total || crossed, line != shown.line else { return false }
                    shown.line = line
                    return true
                }
                if show {
                    FileHandle.standardError.write(
                        Data("\(interactive ? "\r" : "")\(verb) \(done)/\(total)\(interactive ? "" : "\n")".utf8))
                }
            }
            if interactive { printError("") }
            if summary.replayed == 0 && !ids.isEmpty { throw OperationError.noDeadLetter(ids) }
            for f in summary.failures { printError("failed: \(f)") }
            if summary.givenBack > 0 {
                printError(
                    "note: the broker gave back \(summary.givenBack) letters after their removal; they had been replayed already and were removed again, not sent twice"
                )
            }
            if summary.failedAgain > 0 {
                printError(
                    "note: \(summary.failedAgain) replayed events failed again while the replay ran; their new dead letters are in the queue (choreo dlq list)"
                )
            }
            print(
                "\(dryRun ? "would replay" : "replayed") \(summary.replayed), skipped \(summary.skipped), failed \(summary.failed)"
            )
            if summary.failed > 0 { throw ExitCode(1) }
        }

    }

    struct Purge: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete dead letters for good (asks first).")
        @OptionGroup var connection: ConnectionOptions
        @Option(name: .customLong("id"), help: "Delete this event id (repeatable).")
        var ids: [String] = []
        @Flag(help: "Delete every letter that matches the filters.")
        var all = false
        @OptionGroup var filters: FilterOptions
        @Flag(help: "Do not ask for confirmation.")
        var yes = false

        func validate() throws {
            if ids.isEmpty == !all { throw ValidationError("give either --id ID (repeatable) or --all") }
            if !yes && !isTerminal(0) {
                throw ValidationError("refusing to purge without --yes when standard input is not a terminal")
            }
        }

        func run() async throws {
            let filter = try filters.filter(ids: ids)
            let store = try await DLQ.store(connection)
            if !yes {
                let count = try await store.list(filter).count
                if count == 0 { print("no dead letters match"); return }
                FileHandle.standardOutput.write(
                    Data("Delete \(count) dead letter\(count == 1 ? "" : "s") for good? [y/N] ".utf8))
                guard let answer = readLine(), ["y", "yes"].contains(answer.lowercased()) else {
                    print("nothing deleted")
                    return
                }
            }
            let removed = try await store.purge(filter)
            if removed == 0 && !ids.isEmpty { throw OperationError.noDeadLetter(ids) }
            print("purged \(removed)")
        }
    }

    struct Export: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write dead letters as JSON lines (nothing is removed).")
        @OptionGroup var connection: ConnectionOptions
        @Option(help: "The file to write.")
        var out: String
        @OptionGroup var filters: FilterOptions

        func validate() throws {
            var isDirectory: ObjCBool = false
            if FileManager.default.fileExists(atPath: out, isDirectory: &isDirectory), isDirectory.boolValue {
                throw ValidationError("--out \(out) is a directory: name the file to write")
            }
            let directory = URL(fileURLWithPath: out).deletingLastPathComponent().path
            guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue
            else { throw ValidationError("--out \(out): no directory \(directory)") }
        }

        func run() async throws {
            let filter = try filters.filter()
            let store = try await DLQ.store(connection)
            let n = try await store.export(filter, to: URL(fileURLWithPath: out))
            print("exported \(n) to \(out)")
        }
    }

    struct Import: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Restore exported dead letters into their dead-letter queues.")
        @OptionGroup var connection: ConnectionOptions
        @Argument(help: "A file written by `choreo dlq export`.")
        var file: String

        func validate() throws {
            if !FileManager.default.isReadableFile(atPath: file) { throw ValidationError("cannot read '\(file)'") }
        }

        func run() async throws {
            // The whole file is read first: a bad line stops the import before anything is sent.
            let letters = try DeadLetterStore.readExport(from: URL(fileURLWithPath: file))
            let store = try await DLQ.store(connection)
            let n = try await store.importLetters(letters)
            print("imported \(n)")
        }
    }
}
