import ChoreoAMQP
import Foundation
import Logging

/// A ledger that a handler executable opens from `--ledger URL` (`CHOREO_LEDGER`), for stores other than the
/// default SQLite file: pass its type to ``Choreo/run(service:handlers:ledgers:arguments:)``, as in
/// `ledgers: [PostgresLedger.self]` (module `ChoreoPostgres`).
public protocol URLOpenableLedger: IdempotencyLedger {
    /// The URL schemes it opens, in lower case (`postgres`, `postgresql`).
    static var urlSchemes: [String] { get }
    /// Connects, prepares the store (tables, migrations) and returns the ledger; `service` scopes its keys, so
    /// that services sharing one store never see each other's keys. Errors never carry the URL's password.
    static func open(url: String, service: String, logger: Logger) async throws -> Self
}

/// Ledger URLs as they may be printed.
public enum LedgerURL {
    /// `url` with any password replaced by `***` (`postgres://app:***@db/choreo`), for logs and errors.
    public static func redacted(_ url: String) -> String { AMQPConfiguration.redact(url: url) }
}

/// What `--ledger` names: a SQLite file, or a URL whose scheme a ``URLOpenableLedger`` opens.
enum LedgerLocation {
    /// The scheme of `location` in lower case when it is a URL (`scheme://...`), nil for a file path.
    static func scheme(of location: String) -> String? {
        guard let end = location.range(of: "://") else { return nil }
        let scheme = location[..<end.lowerBound]
        guard let first = scheme.first, first.isLetter,
            scheme.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "+" || $0 == "-" || $0 == "." })
        else { return nil }
        return scheme.lowercased()
    }

    /// Opens the ledger a URL names with the first of `kinds` that takes its scheme; nil for a file path (the
    /// SQLite default). A scheme none of them takes is a usage error.
    static func open(
        _ location: String?, service: String, kinds: [any URLOpenableLedger.Type], logger: Logger
    ) async throws -> (any IdempotencyLedger)? {
        guard let location, let scheme = scheme(of: location) else { return nil }
        guard let kind = kinds.first(where: { $0.urlSchemes.contains(scheme) }) else {
            throw ConfigurationError(unsupportedScheme: scheme, location: location)
        }
        return try await kind.open(url: location, service: service, logger: logger)
    }
}

extension ConfigurationError {
    init(unsupportedScheme scheme: String, location: String) {
        let hint =
            scheme.hasPrefix("postgres")
            ? " (a PostgreSQL ledger: `import ChoreoPostgres` and pass `ledgers: [PostgresLedger.self]` to Choreo.run)"
            : ""
        self.init(
            "--ledger \(LedgerURL.redacted(location)): this executable opens no '\(scheme)://' ledger; "
                + "give a SQLite file path\(hint)")
    }
}
