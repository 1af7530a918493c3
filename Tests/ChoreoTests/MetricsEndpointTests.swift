import ChoreoAMQP
import ChoreoPrometheus
import CoreMetrics
import Foundation
import Logging
import Prometheus
import ServiceLifecycle
import TestEvents
import Testing

@testable import Choreo

/// A plain HTTP/1.1 client over one TCP connection, written against the socket so that a test decides when a
/// connection opens, stays open and closes.
final class HTTPProbe {
    struct Response {
        var status: Int
        var headers: [String: String]
        var body: String
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    private let fd: Int32
    private var buffered: [UInt8] = []

    /// Connects to `127.0.0.1:port`; throws when nothing listens there.
    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: errno \(errno)") }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard connected == 0 else {
            let code = errno
            close(fd)
            throw Failure(description: "connect to port \(port): errno \(code)")
        }
    }

    deinit { close(fd) }

    /// Sends one request and reads its response (the body by its Content-Length; none for HEAD).
    func request(_ method: String, _ path: String, close closing: Bool = false) throws -> Response {
        try exchange(
            "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\n\(closing ? "Connection: close\r\n" : "")\r\n",
            method: method)
    }

    /// Sends `text` as it is and reads the response.
    func exchange(_ text: String, method: String = "GET") throws -> Response {
        let sent = text.utf8.withContiguousStorageIfAvailable { send(fd, $0.baseAddress, $0.count, 0) } ?? -1
        guard sent == text.utf8.count else { throw Failure(description: "send: errno \(errno)") }
        let headerEnd = Array("\r\n\r\n".utf8)
        while buffered.firstRange(of: headerEnd) == nil { try fill() }
        let end = buffered.firstRange(of: headerEnd)!
        let lines = String(decoding: buffered[..<end.lowerBound], as: UTF8.self).components(separatedBy: "\r\n")
        buffered.removeSubrange(..<end.upperBound)
        let statusParts = lines[0].split(separator: " ")
        guard statusParts.count >= 2, let status = Int(statusParts[1]) else {
            throw Failure(description: "not an HTTP status line: \(lines[0])")
        }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(
                in: .whitespaces)
        }
        let length = method == "HEAD" ? 0 : Int(headers["content-length"] ?? "") ?? 0
        while buffered.count < length { try fill() }
        let body = String(decoding: buffered.prefix(length), as: UTF8.self)
        buffered.removeFirst(length)
        return Response(status: status, headers: headers, body: body)
    }

    /// Whether the server has closed the connection: a read returns end of file (waits up to the read timeout).
    func closedByServer() -> Bool {
        var byte: UInt8 = 0
        return recv(fd, &byte, 1, 0) == 0
    }

    private func fill() throws {
        var chunk = [UInt8](repeating: 0, count: 65_536)
        let n = recv(fd, &chunk, chunk.count, 0)
        guard n > 0 else { throw Failure(description: n == 0 ? "connection closed" : "recv: errno \(errno)") }
        buffered += chunk[..<n]
    }
}

/// False until set, from any task.
final class Flag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}

@Suite("Metrics endpoint", .serialized, .timeLimit(.minutes(2)))
struct MetricsEndpointTests {
    static let logger = Logger(label: "test.metrics-endpoint") { _ in SwiftLogNoOpLogHandler() }

    @Test("--metrics takes HOST:PORT, [IPv6]:PORT, :PORT and PORT, and refuses anything else with the forms it takes")
    func addresses() throws {
        #expect(try MetricsAddress(parsing: "127.0.0.1:9464") == MetricsAddress(host: "127.0.0.1", port: 9464))
        #expect(try MetricsAddress(parsing: "metrics.local:0") == MetricsAddress(host: "metrics.local", port: 0))
        #expect(try MetricsAddress(parsing: "[::1]:9464") == MetricsAddress(host: "::1", port: 9464))
        #expect("\(MetricsAddress(host: "::1", port: 9464))" == "[::1]:9464")
        #expect(try MetricsAddress(parsing: ":9464") == MetricsAddress(host: "0.0.0.0", port: 9464))
        #expect(try MetricsAddress(parsing: "9464") == MetricsAddress(host: "0.0.0.0", port: 9464))
        for bad in [
            "", "localhost", "localhost:", "127.0.0.1:65536", "127.0.0.1:-1", "::1:9464", "[::1]9464", "[::1]",
            "a b:80", "host:８０", "user@host:80", "http://host:80",
        ] {
            #expect(throws: ConfigurationError.self, "\(bad)") { try MetricsAddress(parsing: bad) }
        }
        let error = try #require(throws: ConfigurationError.self) { try MetricsAddress(parsing: "localhost:http") }
        #expect("\(error)".contains("--metrics 'localhost:http'") && "\(error)".contains("HOST:PORT"), "\(error)")
    }

    @Test("GET /metrics serves the registry in Prometheus' text format; other paths 404, other methods 405")
    func serves() async throws {
        let registry = PrometheusCollectorRegistry()
        let endpoint = try await PrometheusEndpoint.bind(
            host: "127.0.0.1", port: 0, registry: registry, logger: Self.logger)
        let port = endpoint.port
        #expect(port > 0)
        let group = ServiceGroup(services: [endpoint], logger: Self.logger)
        let finished = Flag()
        let running = Task {
            defer { finished.set() }
            try await group.run()
        }

        CoreMetrics.Counter(label: "probe_total", dimensions: [("kind", "a")], factory: endpoint.factory).increment(
            by: 3)
        CoreMetrics.Timer(
            label: "choreo_handler_duration_seconds", dimensions: [("handler", "h")], factory: endpoint.factory
        )
        .recordNanoseconds(700_000)

        let client = try HTTPProbe(port: port)
        let metrics = try client.request("GET", "/metrics")
        #expect(metrics.status == 200)
        #expect(metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8")
        #expect(metrics.body.contains("# TYPE probe_total counter\nprobe_total{kind=\"a\"} 3\n"), "\(metrics.body)")
        // A 0.7 ms invocation falls in the handler buckets' 1 ms bucket, not in the 0.5 ms one.
        #expect(metrics.body.contains("choreo_handler_duration_seconds_bucket{handler=\"h\",le=\"0.0005\"} 0\n"))
        #expect(metrics.body.contains("choreo_handler_duration_seconds_bucket{handler=\"h\",le=\"0.001\"} 1\n"))

        // The same connection, kept alive: the next scrape sees the counter as it is now.
        CoreMetrics.Counter(label: "probe_total", dimensions: [("kind", "a")], factory: endpoint.factory).increment()
        #expect(try client.request("GET", "/metrics?x=1").body.contains("probe_total{kind=\"a\"} 4\n"))
        let head = try client.request("HEAD", "/metrics")
        #expect(head.status == 200 && head.body.isEmpty && Int(head.headers["content-length"] ?? "") ?? 0 > 0)
        let missing = try client.request("GET", "/")
        #expect(missing.status == 404 && missing.body.contains("/metrics"))
        let post = try client.request("POST", "/metrics")
        #expect(post.status == 405 && post.headers["allow"] == "GET, HEAD")
        let last = try client.request("GET", "/metrics", close: true)
        #expect(last.status == 200 && last.headers["connection"] == "close")
        #expect(client.closedByServer())

        // Bytes that are not HTTP get a 400 and the connection closed; the endpoint serves the next one.
        let garbage = try HTTPProbe(port: port)
        #expect(try garbage.exchange("\u{1}\u{2} NOT HTTP\r\n\r\n").status == 400)
        #expect(garbage.closedByServer())
        #expect(try HTTPProbe(port: port).request("GET", "/metrics").status == 200)

        // A scraper's connection left open does not hold the shutdown up; then nothing listens.
        let idle = try HTTPProbe(port: port)
        _ = try idle.request("GET", "/metrics")
        await group.triggerGracefulShutdown()
        // Well inside the endpoint's 60 s idle timeout, which would otherwise be what ends that connection.
        let ended = await eventually(within: 15, { finished.isSet }, until: { $0 })
        #expect(ended, "the endpoint still runs 15 s after the shutdown began")
        try await running.value
        #expect(idle.closedByServer())
        #expect(throws: HTTPProbe.Failure.self) { try HTTPProbe(port: port) }
    }

    @Test("a port already taken is refused at bind, naming the address")
    func portTaken() async throws {
        let first = try await PrometheusEndpoint.bind(host: "127.0.0.1", port: 0, logger: Self.logger)
        let port = first.port
        await #expect(throws: (any Error).self) {
            _ = try await PrometheusEndpoint.bind(host: "127.0.0.1", port: port, logger: Self.logger)
        }
        let group = ServiceGroup(services: [first], logger: Self.logger)
        let running = Task { try await group.run() }
        await group.triggerGracefulShutdown()
        try await running.value
    }

    @Test(
        "a handler executable serves its runtime's figures at --metrics, beside a backend of its own or not",
        arguments: [false, true])
    func executable(ownBackend: Bool) async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        var environment = ["CHOREO_LOG_LEVEL": "info"]
        if ownBackend { environment["FIXTURE_OWN_METRICS"] = "1" }
        let service = try mesh.start("ping", arguments: ["--metrics", "127.0.0.1:0"], environment: environment)
        defer { service.kill9() }

        let output = await eventually({ service.output }, until: { $0.contains("metrics at http://127.0.0.1:") })
        let address = try #require(
            output.split(separator: "\n").first { $0.contains("metrics at http://") }?
                .split(separator: "http://").last?.split(separator: "/").first)
        let port = try #require(Int(address.split(separator: ":").last ?? ""))
        // A second bootstrap would have stopped the process; instead the runtime reports to both backends.
        #expect(output.contains("swift-metrics was bootstrapped before Choreo.run") == ownBackend, "\(output)")

        let ids = try await mesh.publishPings((0..<3).map { Ping(n: $0) }, on: channel)
        try await mesh.publishPings([Ping(n: 0)], on: channel, ids: [ids[0]])
        let labels = "service=\"\(mesh.pingService)\",handler=\"ping\""
        func count(_ outcome: String, in body: String) -> Int? {
            let prefix = "choreo_events_total{\(labels),outcome=\"\(outcome)\"} "
            guard let line = body.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }) else { return nil }
            return Int(line.dropFirst(prefix.count))
        }
        let body = try await eventually(
            { try HTTPProbe(port: port).request("GET", "/metrics").body },
            until: { count("handled", in: $0) == 3 && count("duplicate", in: $0) == 1 })
        #expect(count("handled", in: body) == 3, "\(body)")
        #expect(count("duplicate", in: body) == 1)
        #expect(count("dead_lettered", in: body) == 0 && count("retried", in: body) == 0)
        #expect(body.contains("choreo_handler_duration_seconds_count{\(labels)} 3\n"))
        #expect(body.contains("choreo_in_flight_events{\(labels)} 0"))
        // The executable's own metric goes to its own backend only.
        #expect(!body.contains("fixture_started_total"))
        #expect(gatewayEffects(mesh) == 3)

        service.terminate()
        #expect(await service.waitForExit(seconds: 30))
        #expect(service.exitStatus == 0, "\(service.output)")
        #expect(throws: HTTPProbe.Failure.self) { try HTTPProbe(port: port) }
    }

    private func gatewayEffects(_ mesh: Mesh) -> Int { (try? mesh.gateway().effects("ping")) ?? -1 }

    @Test(
        "--metrics that is malformed, not served by the executable, or on a taken port stops it with the reason; --check binds it"
    )
    func commandLine() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "metrics-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let env = [
            "FIXTURE_SERVICE": "metrics-cmd", "FIXTURE_GATEWAY": dir.appendingPathComponent("gateway.sqlite").path,
            "CHOREO_LEDGER": dir.appendingPathComponent("ledger.sqlite").path,
        ]

        let malformed = try await Broker.runProduct("ChoreoTestService", ["--metrics", "localhost"], environment: env)
        #expect(malformed.code == 2)
        #expect(malformed.err.contains("--metrics 'localhost'"), "\(malformed.err)")
        let fromEnv = try await Broker.runProduct(
            "ChoreoTestService", [], environment: env.merging(["CHOREO_METRICS": "127.0.0.1:99999"]) { $1 })
        #expect(fromEnv.code == 2 && fromEnv.err.contains("--metrics '127.0.0.1:99999'"), "\(fromEnv.err)")

        let taken = try await PrometheusEndpoint.bind(host: "127.0.0.1", port: 0, logger: Self.logger)
        let group = ServiceGroup(services: [taken], logger: Self.logger)
        let running = Task { try await group.run() }
        let takenAddress = "127.0.0.1:\(taken.port)"
        let busy = try await Broker.runProduct("ChoreoTestService", ["--metrics", takenAddress], environment: env)
        // --check binds it too: a deployment's pre-flight finds the port taken.
        let checked = try await Broker.runProduct(
            "ChoreoTestService", ["--check", "--metrics", takenAddress], environment: env)
        let free = try await Broker.runProduct(
            "ChoreoTestService", ["--check", "--metrics", "127.0.0.1:0"], environment: env)
        await group.triggerGracefulShutdown()
        try await running.value
        #expect(busy.code == 1)
        #expect(busy.err == "error: --metrics \(takenAddress): cannot listen: Address already in use\n", "\(busy.err)")
        #expect(checked.code == 1 && checked.err == busy.err, "\(checked.err)")
        #expect(free.code == 0, "\(free.err)")
        #expect(free.out.hasPrefix("ok: broker ") && free.out.contains(", metrics port 127.0.0.1:"), "\(free.out)")
        // An address that is not this machine's (TEST-NET-1).
        let foreign = try await Broker.runProduct(
            "ChoreoTestService", ["--metrics", "192.0.2.1:9464"], environment: env)
        #expect(foreign.code == 1)
        #expect(
            foreign.err == "error: --metrics 192.0.2.1:9464: cannot listen: Cannot assign requested address\n",
            "\(foreign.err)")

        // An executable that passes no endpoint type says how to add one, without starting.
        let options = try RunnerOptions.parse(["--metrics", ":0", "--url", "amqp://guest:pw@127.0.0.1:1/"])
        let code = await options.run(
            service: "no-metrics", handlers: [PingTestHandler()], ledgerKinds: [], metricsKind: nil)
        #expect(code == RunnerOptions.usageError)
    }
}
