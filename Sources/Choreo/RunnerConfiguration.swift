import ChoreoAMQP
import Foundation

/// Settings of a handler service, with documented defaults; filled from flags and environment by
/// ``Choreo/run(service:handlers:arguments:)`` or set in code.
public struct RunnerConfiguration: Sendable {
    /// The service name, part of queue names (`choreo.<service>.<handler>`).
    public var service: String
    /// Broker URL; default `amqp://guest:guest@127.0.0.1:5672/` (`CHOREO_URL`).
    public var url: String = "amqp://guest:guest@127.0.0.1:5672/"
    /// SQLite ledger file, or a ledger URL (`postgres://...`) for the executable's ``URLOpenableLedger`` types;
    /// default `./<service>.ledger.sqlite` (`CHOREO_LEDGER`).
    public var ledgerPath: String?
    /// Concurrent handler invocations per handler, unless the handler sets its own. Default 16.
    public var concurrency: Int = 16
    /// Unacknowledged deliveries per handler; default twice the concurrency.
    public var prefetch: Int?
    /// How long a handled delivery's ack may wait to go out with others (up to a quarter of the prefetch
    /// of them): each ack of a quorum queue costs the broker a disk sync. Default 20 ms; `.zero` acks each
    /// delivery as soon as it is settled. A crash loses the held acks: those deliveries come again and the
    /// ledger acks them without running the handler.
    public var ackDelay: Duration = .milliseconds(20)
    /// The mesh's topic exchange. Default `choreo.events`.
    public var exchange: String = WireNames.defaultExchange
    /// Broker-side delivery limit of each handler queue (process crashes included). Default 10.
    public var deliveryLimit: Int = 10
    /// Larger bodies are dead-lettered unread (a guard against runaway producers). Default 4 MiB.
    public var maxBodyBytes: Int = 4 * 1024 * 1024
    /// How long a claim stays valid without renewal. Default 60 s.
    public var leaseDuration: Duration = .seconds(60)
    /// Completed keys older than this are pruned. Default 7 days.
    public var retention: Duration = .seconds(7 * 24 * 3600)
    /// Bound on finishing in-flight work at shutdown. Default 30 s.
    public var shutdownTimeout: Duration = .seconds(30)
    /// First and largest pause between reconnect attempts (with full jitter). Default 0.5 s and 30 s.
    public var reconnectBackoff: (initial: Duration, maximum: Duration) = (.milliseconds(500), .seconds(30))

    public init(service: String) {
        self.service = service
    }

    public var resolvedLedgerPath: String { ledgerPath ?? "./\(service).ledger.sqlite" }
    public var resolvedPrefetch: Int { prefetch ?? max(1, concurrency * 2) }
    /// Acks held at most, for a prefetch of `prefetch`: a quarter of it, so most of the window stays open.
    public static func heldAcks(prefetch: Int) -> Int { prefetch / 4 }

    public func validate() throws {
        let allowed = Set("abcdefghijklmnopqrstuvwxyz0123456789-_")
        guard !service.isEmpty, service.allSatisfy({ allowed.contains($0) }) else {
            throw ConfigurationError("service name '\(service)' must be lowercase letters, digits, '-' or '_'")
        }
        guard (1...10_000).contains(concurrency) else { throw ConfigurationError("--concurrency must be 1 to 10000") }
        if let prefetch, !(1...65_535).contains(prefetch) { throw ConfigurationError("--prefetch must be 1 to 65535") }
        guard ackDelay >= .zero, ackDelay <= .seconds(10) else {
            throw ConfigurationError("--ack-delay must be 0 to 10000 ms")
        }
        guard maxBodyBytes >= 1 else { throw ConfigurationError("--max-body-bytes must be positive") }
        guard deliveryLimit >= 1 else { throw ConfigurationError("--delivery-limit must be at least 1") }
        guard leaseDuration >= .seconds(1) else { throw ConfigurationError("the lease must be at least 1 s") }
        guard !url.isEmpty else {
            throw ConfigurationError("--url is empty: give amqp://user:password@host:port/vhost")
        }
        do { try AMQPConfiguration(url: url).validate() } catch { throw ConfigurationError("--url: \(error)") }
        guard !exchange.isEmpty else {
            throw ConfigurationError("--exchange is empty: give the mesh's topic exchange (default choreo.events)")
        }
        guard exchange.utf8.count <= AMQPLimits.shortStringBytes else {
            throw ConfigurationError(
                "--exchange is \(exchange.utf8.count) bytes long; AMQP allows at most \(AMQPLimits.shortStringBytes)")
        }
        if ledgerPath?.isEmpty == true {
            throw ConfigurationError("--ledger is empty: give a SQLite file path or a ledger URL")
        }
    }
}
