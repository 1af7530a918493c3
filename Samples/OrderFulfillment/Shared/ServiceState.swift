import Foundation
import GRDB

/// A service's own SQLite database (never shared with another service), next to its ledger.
public enum ServiceState {
    /// Opens `<dir>/<service>.state.sqlite`, where `<dir>` is `CHOREO_STATE_DIR` or the current directory,
    /// and runs `schema` once.
    public static func open(_ service: String, schema: String) throws -> DatabaseQueue {
        let dir = ProcessInfo.processInfo.environment["CHOREO_STATE_DIR"] ?? "."
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var config = Configuration()
        config.busyMode = .timeout(10)
        let db = try DatabaseQueue(path: "\(dir)/\(service).state.sqlite", configuration: config)
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
