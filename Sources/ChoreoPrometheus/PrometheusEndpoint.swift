import Choreo
import CoreMetrics
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import ServiceLifecycle

/// Serves the process's metrics in Prometheus' text format at `GET /metrics`, from a swift-prometheus
/// registry. A handler executable turns it on with `--metrics [HOST]:PORT` (`CHOREO_METRICS`) once it passes
/// `metrics: PrometheusEndpoint.self` to `Choreo.run`:
///
/// ```swift
/// import ChoreoPrometheus
/// await Choreo.run(service: "inventory", handlers: [ReserveStock()], metrics: PrometheusEndpoint.self)
/// ```
///
/// Other paths answer 404 and other methods 405. Connections may be kept alive between scrapes; one idle for
/// ``idleTimeout`` is closed. At graceful shutdown it stops listening and closes the connections it has.
public struct PrometheusEndpoint: MetricsEndpoint {
    /// The registry it serves.
    public let registry: PrometheusCollectorRegistry
    public let factory: any MetricsFactory
    public let port: Int
    private let server: NIOAsyncChannel<Connection, Never>
    private let logger: Logger

    /// How long a connection may stay open with no request.
    public static let idleTimeout = TimeAmount.seconds(60)
    /// The buckets of `choreo_handler_duration_seconds`: swift-prometheus' default starts at 5 ms, where many
    /// handlers end.
    public static let handlerDurationBuckets: [Duration] = [
        .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
        .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
        .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10), .seconds(30),
    ]

    typealias Connection = NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>

    public static func bind(host: String, port: Int, logger: Logger) async throws -> PrometheusEndpoint {
        try await bind(host: host, port: port, registry: PrometheusCollectorRegistry(), logger: logger)
    }

    /// Listens on `host:port` (0: a port the system picks) and serves `registry`; ``factory`` makes its metrics.
    public static func bind(
        host: String, port: Int, registry: PrometheusCollectorRegistry, logger: Logger
    ) async throws -> PrometheusEndpoint {
        let server: NIOAsyncChannel<Connection, Never>
        do {
            server = try await listen(host: host, port: port)
        } catch let error as IOError {
            // NIO's words name its own function ("bind(descriptor:ptr:bytes:): ..."); the system's are enough.
            throw PrometheusEndpointError("cannot listen: \(String(cString: strerror(error.errnoCode)))")
        } catch is SocketAddressError {
            throw PrometheusEndpointError("cannot listen: no address found for '\(host)'")
        }
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.durationHistogramBuckets["choreo_handler_duration_seconds"] = handlerDurationBuckets
        return PrometheusEndpoint(
            registry: registry, factory: factory, port: server.channel.localAddress?.port ?? port, server: server,
            logger: logger)
    }

    private static func listen(host: String, port: Int) async throws -> NIOAsyncChannel<Connection, Never> {
        try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .bind(host: host, port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandlers([
                        IdleStateHandler(allTimeout: idleTimeout), CloseWhenIdle(),
                    ])
                    return try Connection(wrappingChannelSynchronously: channel)
                }
            }
    }

    public func run() async throws {
        try await withGracefulShutdownHandler {
            try await withThrowingDiscardingTaskGroup { group in
                try await server.executeThenClose { connections in
                    for try await connection in connections {
                        group.addTask { await serve(connection) }
                    }
                }
                // Stopped listening: connections kept alive between scrapes end too.
                group.cancelAll()
            }
        } onGracefulShutdown: {
            server.channel.close(promise: nil)
        }
    }

    /// Answers the requests of one connection, in order, until the client closes it or asks to.
    private func serve(_ connection: Connection) async {
        do {
            try await connection.executeThenClose { inbound, outbound in
                var head: HTTPRequestHead?
                for try await part in inbound {
                    switch part {
                    case .head(let h): head = h
                    case .body: continue
                    case .end:
                        guard let request = head else { return }
                        head = nil
                        try await respond(to: request, on: outbound)
                        if !request.isKeepAlive { return }
                    }
                }
            }
        } catch {
            logger.debug("metrics connection ended", metadata: ["error": "\(error)"])
        }
    }

    private func respond(
        to request: HTTPRequestHead, on outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>
    ) async throws {
        let status: HTTPResponseStatus
        var headers = HTTPHeaders()
        var body = ByteBuffer()
        let path = request.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        if path != "/metrics" {
            status = .notFound
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
            body.writeString("not found: the metrics are at /metrics\n")
        } else if request.method != .GET && request.method != .HEAD {
            status = .methodNotAllowed
            headers.add(name: "Allow", value: "GET, HEAD")
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
            body.writeString("\(request.method) is not allowed: GET /metrics\n")
        } else {
            status = .ok
            headers.add(name: "Content-Type", value: "text/plain; version=0.0.4; charset=utf-8")
            body.writeBytes(registry.emitToBuffer())
        }
        headers.add(name: "Content-Length", value: String(body.readableBytes))
        headers.add(name: "Cache-Control", value: "no-store")
        if !request.isKeepAlive { headers.add(name: "Connection", value: "close") }
        try await outbound.write(.head(HTTPResponseHead(version: request.version, status: status, headers: headers)))
        if request.method != .HEAD { try await outbound.write(.body(.byteBuffer(body))) }
        try await outbound.write(.end(nil))
    }
}

/// Why the endpoint cannot serve, in a person's words.
public struct PrometheusEndpointError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// Closes a connection once `IdleStateHandler` finds it idle.
private final class CloseWhenIdle: ChannelInboundHandler, Sendable {
    typealias InboundIn = HTTPServerRequestPart

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }
}
