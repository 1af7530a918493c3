import Foundation
import GRDB

/// A service's own SQLite database (never shared with another service), next to its ledger.
public enum ServiceState {
    /// Opens `<dir>/<service>.state.sqlite`, where `<dir>` is `CHOREO_STATE_DIR` or the current directory,
    /// and runs `schema` once. A run that only prints (`--help`, `--manifest`) gets a database in memory
    /// instead: asking a service what it is leaves no file behind.
    public static func open(
        _ service: String, schema: String, arguments: [String] = Array(CommandLine.arguments.dropFirst())
    ) throws -> DatabaseQueue {
        let db: DatabaseQueue
        if arguments.contains(where: { ["--help", "-h", "--manifest"].contains($0) }) {
            db = try DatabaseQueue()
        } else {
            let dir = ProcessInfo.processInfo.environment["CHOREO_STATE_DIR"] ?? "."
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            var config = Configuration()
            config.busyMode = .timeout(10)
            db = try DatabaseQueue(path: "\(dir)/\(service).state.sqlite", configuration: config)
        }
        try db.write { try $0.execute(sql: schema) }
        return db
    }

    /// The ledger path for a service, in the same directory, unless `--ledger` or `CHOREO_LEDGER` says otherwise.
    public static func defaultArguments(
        _ service: String, arguments: [String] = Array(CommandLine.arguments.dropFirst())
    ) -> [String] {
        var args = arguments
        let env = ProcessInfo.processInfo.environment
        if !args.contains("--ledger") && env["CHOREO_LEDGER"] == nil {
            args += ["--ledger", "\(env["CHOREO_STATE_DIR"] ?? ".")/\(service).ledger.sqlite"]
        }
        return args
    }
}
