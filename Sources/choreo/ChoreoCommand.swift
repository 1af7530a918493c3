import ArgumentParser
import Choreo
import ChoreoAMQP
import ChoreoOps
import Foundation
import Logging
import Synchronization

/// `choreo`: the operator CLI. Everything goes over AMQP 0-9-1; no management plugin, no server.
struct ChoreoCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "choreo",
        abstract: "Operate a Choreo event mesh: handler status, dead letters, publishing, the flow graph.",
        discussion: """
            Exit codes: 0 done, 1 the operation failed, 2 a usage error.
            The broker URL comes from --url or CHOREO_URL; its password is never printed.
            """,
        subcommands: [Status.self, DLQ.self, Publish.self, Graph.self])
}

/// Options every command that talks to the broker shares.
struct ConnectionOptions: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "Broker URL, amqp://user:password@host:port/vhost (default: CHOREO_URL, else amqp://guest:guest@127.0.0.1:5672/).",
            valueName: "url"))
    var url: String?

    var resolvedURL: String {
        url ?? environmentValue("CHOREO_URL") ?? "amqp://guest:guest@127.0.0.1:5672/"
    }

    func connect() async throws -> AMQPConnection {
        let config: AMQPConfiguration
        guard !resolvedURL.isEmpty else {
            throw ValidationError("--url is empty: give amqp://user:password@host:port/vhost")
        }
        do { config = try AMQPConfiguration(url: resolvedURL) } catch {
            throw ValidationError("--url: \((error as? AMQPError)?.message ?? "\(error)")")
        }
        var named = config
        named.connectionName = "choreo cli"
        named.connectTimeout = .seconds(5)
        do {
            var logger = Logger(label: "choreo.cli") { StreamLogHandler.standardError(label: $0) }
            logger.logLevel = ProcessInfo.processInfo.environment["CHOREO_DEBUG"] == "1" ? .debug : .warning
            let connection = try await AMQPConnection.connect(to: named, logger: logger)
            OpenConnections.shared.add(connection)
            return connection
        } catch {
            if error.code == .authenticationFailed {
                throw OperationError(
                    "cannot log in to \(config): the broker refused user '\(config.username)' (check the user name and password)"
                )
            }
            throw OperationError("cannot reach the broker at \(config): \(error.message)")
        }
    }
}

/// Filters shared by the dead-letter commands.
struct FilterOptions: ParsableArguments {
    @Option(help: "Only this handler (name, or service.handler).")
    var handler: String?
    @Option(help: "Only the handlers of this service.")
    var service: String?
    @Option(help: "Only events of this type.")
    var type: String?
    @Option(help: "Only letters whose error type or message contains this text.")
    var error: String?
    @Option(help: "Only letters that failed since this time: RFC 3339, or an age such as 30m, 6h, 2d.")
    var since: String?
    @Option(parsing: .unconditional, help: "At most this many letters.")
    var limit: Int?

    func filter(ids: [String] = []) throws -> DeadLetterFilter {
        var since: Date?
        if let text = self.since {
            guard let d = Self.parseSince(text) else {
                throw ValidationError("--since '\(text)' is neither an RFC 3339 time nor an age like 30m, 6h or 2d")
            }
            since = d
        }
        if let limit, limit < 1 { throw ValidationError("--limit must be at least 1") }
        return DeadLetterFilter(
            handler: handler, ids: Set(ids), type: type, errorText: error, since: since, limit: limit,
            service: service)
    }

    static func parseSince(_ text: String, now: Date = Date()) -> Date? {
        if let d = Timestamps.parse(text) { return d }
        guard let unit = text.last, let n = Double(text.dropLast()), n >= 0 else { return nil }
        let seconds: Double
        switch unit {
        case "s": seconds = n
        case "m": seconds = n * 60
        case "h": seconds = n * 3600
        case "d": seconds = n * 86400
        default: return nil
        }
        return now.addingTimeInterval(-seconds)
    }
}

/// Connections the running command opened; `CLIMain` closes them cleanly before the process exits,
/// so acks and closes reach the broker instead of dying with the process.
final class OpenConnections: Sendable {
    static let shared = OpenConnections()
    private let list = Mutex<[AMQPConnection]>([])
    func add(_ c: AMQPConnection) { list.withLock { $0.append(c) } }
    func closeAll() async {
        for c in list.withLock({ l in
            defer { l = [] }; return l
        }) { await c.close() }
    }
}

/// Writes to standard error.
func printError(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
}

/// A plain text table, columns padded to their widest cell.
func table(_ header: [String], _ rows: [[String]]) -> String {
    let rows = rows.map { $0.map { visible($0, keepingLines: false) } }
    let widths = header.indices.map { i in ([header[i]] + rows.map { $0[i] }).map(\.count).max() ?? 0 }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in
            i == cells.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0)
        }
        .joined(separator: "  ")
    }
    return ([line(header)] + rows.map(line)).joined(separator: "\n")
}

func isTerminal(_ fd: Int32) -> Bool { isatty(fd) == 1 }

/// `text` with control characters written as escapes (`\u{1B}`, `\r`): a dead letter's headers and body come
/// from whoever published the event, and an escape sequence printed raw would drive the operator's terminal.
/// Line breaks and tabs stay when `keepingLines`; a table cell keeps none, so a row stays one line.
func visible(_ text: String, keepingLines: Bool) -> String {
    var out = ""
    out.reserveCapacity(text.utf8.count)
    for scalar in text.unicodeScalars {
        let v = scalar.value
        if keepingLines && (v == 0x0A || v == 0x09) {
            out.unicodeScalars.append(scalar)
            continue
        }
        switch v {
        case 0x0A: out += "\\n"
        case 0x09: out += "\\t"
        case 0x0D: out += "\\r"
        // C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal shows.
        case 0x00...0x1F, 0x7F...0x9F, 0x202A...0x202E, 0x2066...0x2069:
            out += "\\u{" + String(v, radix: 16, uppercase: true) + "}"
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out
}

func jsonLine<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    encoder.dateEncodingStrategy = .iso8601
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}
