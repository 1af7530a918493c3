import CoreMetrics
import Logging
import ServiceLifecycle

/// A metrics backend that a handler executable serves for scraping at `--metrics [HOST]:PORT` (`CHOREO_METRICS`):
/// pass its type to ``Choreo/run(service:handlers:ledgers:metrics:arguments:)``, as in
/// `metrics: PrometheusEndpoint.self` (module `ChoreoPrometheus`).
///
/// `Choreo.run` binds it before the handlers start, so that a port already taken stops the executable at once,
/// then bootstraps swift-metrics with its ``factory`` (the executable's choice, made by passing the type: the
/// handlers' own metrics are served too; an executable that bootstrapped a backend itself keeps it, and the
/// runtime reports to both), and runs it beside the handlers. At shutdown it stops after them, so the last
/// figures can still be scraped while in-flight events finish.
public protocol MetricsEndpoint: Service {
    /// Starts listening on `host:port` (port 0: one the system picks) and returns the endpoint, ready to `run()`.
    static func bind(host: String, port: Int, logger: Logger) async throws -> Self
    /// The factory whose metrics it serves.
    var factory: any MetricsFactory { get }
    /// The port it listens on: the one it got when 0 was asked.
    var port: Int { get }
}

/// What `--metrics` gives: `HOST:PORT`, `[IPv6]:PORT`, or `:PORT` and `PORT` for every interface.
struct MetricsAddress: Equatable, Sendable, CustomStringConvertible {
    var host: String
    var port: Int

    /// `host:port`, an IPv6 host in brackets.
    var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// Every IPv4 interface, for `:PORT` and `PORT` (a container's port is reached through its own interface).
    static let anyHost = "0.0.0.0"

    init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    init(parsing text: String) throws {
        func refuse(_ why: String) -> ConfigurationError {
            ConfigurationError("--metrics '\(text)': \(why); give HOST:PORT, [IPv6]:PORT or :PORT (every interface)")
        }
        let hostPart: Substring
        let portPart: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                throw refuse("an IPv6 address in brackets needs a port after it")
            }
            hostPart = text[text.index(after: text.startIndex)..<close]
            portPart = text[text.index(close, offsetBy: 2)...]
        } else if let colon = text.lastIndex(of: ":") {
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
            guard !hostPart.contains(":") else { throw refuse("an IPv6 address goes in brackets") }
        } else {
            hostPart = ""
            portPart = text[...]
        }
        guard !portPart.isEmpty, portPart.allSatisfy(\.isASCII), let port = Int(portPart), (0...65_535).contains(port)
        else { throw refuse("the port must be a number from 0 to 65535") }
        guard hostPart.allSatisfy({ !$0.isWhitespace && $0 != "/" && $0 != "@" }) else {
            throw refuse("'\(hostPart)' is not a host name or address")
        }
        self.init(host: hostPart.isEmpty ? Self.anyHost : String(hostPart), port: port)
    }
}
