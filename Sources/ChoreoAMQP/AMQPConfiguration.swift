import Foundation

/// How to reach a broker: address, credentials, TLS and timing.
///
/// Built from a URL (`amqp://user:pass@host:port/vhost`, RabbitMQ's URI spec) or field by field.
/// ``description`` never shows the password.
///
/// ```swift
/// var config = try AMQPConfiguration(url: "amqp://guest:guest@127.0.0.1:5672/%2f")
/// config.heartbeat = .seconds(10)
/// ```
public struct AMQPConfiguration: Sendable, CustomStringConvertible {
    /// TLS settings for `amqps://`. Peer and host-name verification are on by default.
    public struct TLS: Sendable, Hashable {
        /// PEM file of the certificate authorities to trust; `nil` uses none (verification then fails).
        public var caFile: String?
        /// PEM client certificate, for brokers that require one.
        public var certificateFile: String?
        /// PEM private key of the client certificate.
        public var keyFile: String?
        public var verifyPeer: Bool
        public var verifyHostname: Bool

        public init(
            caFile: String? = nil,
            certificateFile: String? = nil,
            keyFile: String? = nil,
            verifyPeer: Bool = true,
            verifyHostname: Bool = true
        ) {
            self.caFile = caFile
            self.certificateFile = certificateFile
            self.keyFile = keyFile
            self.verifyPeer = verifyPeer
            self.verifyHostname = verifyHostname
        }
    }

    public var host: String = "127.0.0.1"
    public var port: Int = 5672
    public var username: String = "guest"
    public var password: String = "guest"
    public var virtualHost: String = "/"
    /// `nil` for plain TCP.
    public var tls: TLS?
    /// Heartbeat interval proposed to the broker; the smaller non-zero of both sides wins. Default 30 s.
    public var heartbeat: Duration = .seconds(30)
    /// Bound on TCP connect plus the AMQP handshake. Default 10 s.
    public var connectTimeout: Duration = .seconds(10)
    /// Bound on each synchronous request (declare, bind, consume...). Default 30 s.
    public var requestTimeout: Duration = .seconds(30)
    /// Largest frame proposed to the broker. Default 128 KiB (RabbitMQ's own default).
    public var frameMax: Int = 131_072
    /// Shown in the broker's connection list.
    public var connectionName: String?

    public init() {}

    /// Parses an AMQP URL: `amqp[s]://[user[:password]@]host[:port][/vhost][?query]`.
    ///
    /// User, password and vhost are percent-decoded; an empty path means vhost `/`, and `%2f` spells `/`.
    /// Query keys `heartbeat` (seconds), `connection_timeout` (ms), `cacertfile`, `certfile`, `keyfile`,
    /// `verify` (`verify_peer` or `verify_none`), `server_name_indication` (`disable` turns off host-name
    /// checks), `frame_max` and `name` are understood. Throws ``AMQPError/Code/invalidArgument`` with the
    /// URL's password masked.
    public init(url: String) throws {
        self.init()
        let masked = AMQPConfiguration.redact(url: url)
        func invalid(_ why: String) -> AMQPError {
            AMQPError(.invalidArgument, message: why, operation: "parse URL \(masked)")
        }
        guard let schemeEnd = url.range(of: "://") else {
            throw invalid("expected amqp://user:password@host:port/vhost")
        }
        let scheme = url[..<schemeEnd.lowerBound].lowercased()
        switch scheme {
        case "amqp": tls = nil; port = 5672
        case "amqps": tls = TLS(); port = 5671
        default: throw invalid("unsupported scheme '\(scheme)', expected amqp or amqps")
        }
        var rest = String(url[schemeEnd.upperBound...])
        var query = ""
        if let q = rest.firstIndex(of: "?") {
            query = String(rest[rest.index(after: q)...])
            rest = String(rest[..<q])
        }
        var path: String?
        if let slash = rest.firstIndex(of: "/") {
            path = String(rest[rest.index(after: slash)...])
            rest = String(rest[..<slash])
        }
        if let at = rest.lastIndex(of: "@") {
            let userInfo = rest[..<at]
            rest = String(rest[rest.index(after: at)...])
            let parts = userInfo.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            guard let user = String(parts[0]).removingPercentEncoding else {
                throw invalid("bad percent-encoding in user name")
            }
            username = user
            if parts.count == 2 {
                guard let pass = String(parts[1]).removingPercentEncoding else {
                    throw invalid("bad percent-encoding in password")
                }
                password = pass
            }
        }
        // Host, possibly an IPv6 literal in brackets, then an optional port.
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw invalid("unterminated IPv6 address") }
            host = String(rest[rest.index(after: rest.startIndex)..<close])
            let after = rest[rest.index(after: close)...]
            if after.hasPrefix(":") {
                try parsePort(String(after.dropFirst()), invalid)
            } else if !after.isEmpty {
                throw invalid("unexpected '\(after)' after the host")
            }
        } else if let colon = rest.lastIndex(of: ":") {
            host = String(rest[..<colon])
            try parsePort(String(rest[rest.index(after: colon)...]), invalid)
        } else if !rest.isEmpty {
            host = rest
        }
        if host.isEmpty { host = "127.0.0.1" }
        if let path {
            if path.isEmpty {
                virtualHost = "/"
            } else {
                guard !path.contains("/") else { throw invalid("the vhost must be one path segment; write '/' as %2f") }
                guard let vhost = path.removingPercentEncoding else { throw invalid("bad percent-encoding in vhost") }
                virtualHost = vhost
            }
        }
        for pair in query.split(separator: "&") where !pair.isEmpty {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(kv[0])
            let value = kv.count > 1 ? (String(kv[1]).removingPercentEncoding ?? String(kv[1])) : ""
            switch key {
            case "heartbeat":
                guard let s = Int(value), s >= 0 else { throw invalid("heartbeat must be a whole number of seconds") }
                heartbeat = .seconds(s)
            case "connection_timeout":
                guard let ms = Int(value), ms > 0 else { throw invalid("connection_timeout must be milliseconds > 0") }
                connectTimeout = .milliseconds(ms)
            case "frame_max":
                guard let f = Int(value), f >= 4096 else { throw invalid("frame_max must be at least 4096") }
                frameMax = f
            case "name":
                connectionName = value
            case "cacertfile", "certfile", "keyfile", "verify", "server_name_indication":
                guard tls != nil else { throw invalid("'\(key)' needs an amqps:// URL") }
                switch key {
                case "cacertfile": tls?.caFile = value
                case "certfile": tls?.certificateFile = value
                case "keyfile": tls?.keyFile = value
                case "verify":
                    guard value == "verify_peer" || value == "verify_none" else {
                        throw invalid("verify must be verify_peer or verify_none")
                    }
                    tls?.verifyPeer = value == "verify_peer"
                    if value == "verify_none" { tls?.verifyHostname = false }
                default:
                    tls?.verifyHostname = value != "disable"
                }
            default:
                throw invalid("unknown URL parameter '\(key)'")
            }
        }
    }

    private mutating func parsePort(_ text: String, _ invalid: (String) -> AMQPError) throws {
        guard let p = Int(text), (1...65535).contains(p) else { throw invalid("port must be 1 to 65535") }
        port = p
    }

    /// Checks the settings before any connection attempt.
    public func validate() throws(AMQPError) {
        func invalid(_ why: String) -> AMQPError {
            AMQPError(.invalidArgument, message: why, operation: "configure \(self)")
        }
        if host.isEmpty { throw invalid("host is empty") }
        if !(1...65535).contains(port) { throw invalid("port must be 1 to 65535") }
        if heartbeat < .zero || heartbeat > .seconds(65535) { throw invalid("heartbeat must be 0 to 65535 seconds") }
        if connectTimeout <= .zero { throw invalid("connect timeout must be positive") }
        if frameMax < 4096 { throw invalid("frame_max must be at least 4096") }
        if let tls {
            for (what, path) in [("CA file", tls.caFile), ("certificate", tls.certificateFile), ("key", tls.keyFile)] {
                if let path, !FileManager.default.isReadableFile(atPath: path) {
                    throw invalid("\(what) \(path) is not readable")
                }
            }
            if (tls.certificateFile == nil) != (tls.keyFile == nil) {
                throw invalid("a client certificate needs both certfile and keyfile")
            }
        }
    }

    /// The broker address as `scheme://user@host:port/vhost`, password never included.
    public var description: String {
        let scheme = tls == nil ? "amqp" : "amqps"
        let vhost =
            virtualHost == "/"
            ? ""
            : (virtualHost.addingPercentEncoding(
                withAllowedCharacters: .urlPathAllowed.subtracting(CharacterSet(charactersIn: "/"))) ?? virtualHost)
        let hostPart = host.contains(":") ? "[\(host)]" : host
        return "\(scheme)://\(username)@\(hostPart):\(port)/\(vhost)"
    }

    /// `host:port`, as used in connection error messages.
    public var address: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// A URL with any password replaced by `***`, for logs and error messages.
    public static func redact(url: String) -> String {
        guard let schemeEnd = url.range(of: "://") else { return url }
        let afterScheme = url[schemeEnd.upperBound...]
        let authorityEnd = afterScheme.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? afterScheme.endIndex
        let authority = afterScheme[..<authorityEnd]
        guard let at = authority.lastIndex(of: "@") else { return url }
        let userInfo = authority[..<at]
        guard let colon = userInfo.firstIndex(of: ":") else { return url }
        return String(url[..<colon]) + ":***" + String(url[at...])
    }
}
