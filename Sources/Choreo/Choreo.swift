import ArgumentParser
import ChoreoAMQP
import CoreMetrics
import Foundation
import Logging
import ServiceLifecycle

#if canImport(Glibc)
    import CRabbitMQ  // the package's C shim, which also brings in <malloc.h>
#endif

/// Entry point of a handler executable.
///
/// ```swift
/// @main struct Inventory {
///     static func main() async {
///         await Choreo.run(service: "inventory", handlers: [ReserveStock(), ReleaseStock()])
///     }
/// }
/// ```
///
/// The executable gets a standard command line: `--url` (`CHOREO_URL`), `--ledger` (`CHOREO_LEDGER`),
/// `--concurrency`, `--prefetch`, `--ack-delay`, `--exchange`, `--delivery-limit`, `--max-body-bytes`, `--lease`,
/// `--log-level`, `--metrics` (`CHOREO_METRICS`, when the executable passes a ``MetricsEndpoint``), `--manifest`
/// (print the handler manifest as JSON and exit), `--check` (test that the broker and the ledger are reachable, that
/// the exchange and queues already on the broker agree with these settings and the metrics port is free, and exit)
/// and `--help`.
/// It runs until SIGTERM or SIGINT, then shuts down gracefully and exits 0. It exits 1 when it cannot run
/// (the broker or the ledger unreachable, a fatal error) and 2 for a wrong option or environment value.
public enum Choreo {
    /// Runs the service's handlers with the standard command line (above) until SIGTERM or SIGINT, then exits.
    /// `ledgers` names the ledger types that `--ledger` may give as a URL besides a SQLite file, such as
    /// `[PostgresLedger.self]` (module `ChoreoPostgres`) for a ledger shared by several replicas. `metrics` names
    /// the endpoint that `--metrics` serves, such as `PrometheusEndpoint.self` (module `ChoreoPrometheus`).
    public static func run(
        service: String, handlers: [any EventHandler], ledgers: [any URLOpenableLedger.Type] = [],
        metrics: (any MetricsEndpoint.Type)? = nil, arguments: [String] = Array(CommandLine.arguments.dropFirst())
    ) async {
        let options: RunnerOptions
        do {
            options = try RunnerOptions.parse(arguments)
        } catch {
            RunnerOptions.exit(refusedCommandLine: error)
        }
        keepFreedMemory()
        let code = await options.run(service: service, handlers: handlers, ledgerKinds: ledgers, metricsKind: metrics)
        exit(code)
    }

    /// glibc gives the free memory at the top of a thread's heap back to the kernel once it exceeds 128 KiB,
    /// and the next allocations fault it in again. A handler process frees and allocates about the same
    /// amount for every group of events (deliveries, SQLite's page buffers), so on a busy hop that cycle
    /// came and went between runs and cost up to 8 % of its CPU (perf: `madvise` and `sysmalloc`). The process
    /// keeps up to 64 MiB of free memory per heap instead, which it would have allocated again anyway; the
    /// glibc environment variables (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`) still decide if set.
    private static func keepFreedMemory() {
        #if canImport(Glibc)
            let env = ProcessInfo.processInfo.environment
            guard env["MALLOC_TRIM_THRESHOLD_"] == nil, env["MALLOC_MMAP_THRESHOLD_"] == nil else { return }
            // Fixing the trim threshold also fixes the mmap threshold (glibc stops adapting it): raise that too,
            // so that buffers of a few hundred KiB come from the heap rather than a fresh mapping each time.
            _ = mallopt(M_MMAP_THRESHOLD, 4 << 20)
            _ = mallopt(M_TRIM_THRESHOLD, 64 << 20)
        #endif
    }
}

extension ParsableArguments {
    /// Ends a process whose command line the parser refused: `--help` is not a failure (printed, exit 0);
    /// anything else is a usage error (the parser's message on standard error, exit 2). Handler executables
    /// and the `choreo` CLI end this way alike.
    package static func exit(refusedCommandLine error: any Error) -> Never {
        if exitCode(for: error) == .success {
            print(fullMessage(for: error))
            Foundation.exit(0)
        }
        FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
        Foundation.exit(RunnerOptions.usageError)
    }
}

/// The standard command line of a handler executable. A command (not bare arguments) so that its help and
/// usage lines carry the executable's name and the abstract; ``Choreo/run(service:handlers:arguments:)``
/// parses it and runs the service itself.
struct RunnerOptions: ParsableCommand {
    static var configuration: CommandConfiguration {
        CommandConfiguration(
            commandName: URL(fileURLWithPath: CommandLine.arguments.first ?? "handler").lastPathComponent,
            abstract: "A Choreo handler service: consumes its events from RabbitMQ and emits new ones.")
    }

    @Option(help: "Broker URL, amqp://user:password@host:port/vhost (env CHOREO_URL).")
    var url: String?
    @Option(
        help:
            "SQLite ledger file, or a ledger URL the executable supports such as postgres://user@host/db (env CHOREO_LEDGER; default ./<service>.ledger.sqlite)."
    )
    var ledger: String?
    @Option(parsing: .unconditional, help: "Concurrent invocations per handler (default 16).")
    var concurrency: Int?
    @Option(parsing: .unconditional, help: "Unacknowledged deliveries per handler (default 2 x concurrency).")
    var prefetch: Int?
    @Option(
        parsing: .unconditional,
        help: "Milliseconds a handled delivery's ack may wait to go out with others; 0 acks at once (default 20).")
    var ackDelay: Int?
    @Option(help: "The mesh's topic exchange (default choreo.events).")
    var exchange: String?
    @Option(
        parsing: .unconditional,
        help: "Deliveries after which the broker dead-letters a message that keeps crashing the process (default 10).")
    var deliveryLimit: Int?
    @Option(parsing: .unconditional, help: "Larger bodies are dead-lettered unread (default 4194304).")
    var maxBodyBytes: Int?
    @Option(
        parsing: .unconditional,
        help:
            "Seconds a claimed key stays held without renewal; with a shared ledger, how long a replica that died holds its keys (default 60)."
    )
    var lease: Int?
    @Option(help: "trace, debug, info, notice, warning, error or critical (env CHOREO_LOG_LEVEL; default info).")
    var logLevel: String?
    @Option(
        help:
            "Serve metrics for scraping at [HOST]:PORT, path /metrics; :PORT listens on every interface (env CHOREO_METRICS; default off)."
    )
    var metrics: String?
    @Flag(help: "Print the handler manifest as JSON and exit.")
    var manifest = false
    @Flag(
        help:
            "Check that the broker and the ledger are reachable, that the exchange and queues already on the broker agree with these settings (and the --metrics port is free), then exit."
    )
    var check = false

    func configuration(service: String) throws -> RunnerConfiguration {
        var c = RunnerConfiguration(service: service)
        if let u = url ?? environmentValue("CHOREO_URL") { c.url = u }
        c.ledgerPath = ledger ?? environmentValue("CHOREO_LEDGER")
        if let concurrency { c.concurrency = concurrency }
        c.prefetch = prefetch
        if let ackDelay { c.ackDelay = .milliseconds(ackDelay) }
        if let exchange { c.exchange = exchange }
        if let deliveryLimit { c.deliveryLimit = deliveryLimit }
        if let maxBodyBytes { c.maxBodyBytes = maxBodyBytes }
        if let lease {
            guard (1...86_400).contains(lease) else { throw ConfigurationError("--lease must be 1 to 86400 seconds") }
            c.leaseDuration = .seconds(lease)
        }
        try c.validate()
        return c
    }

    /// Exit codes as the `choreo` CLI's: 1 when the service cannot run, 2 for an option or environment value
    /// that is wrong (0: done).
    static let failed: Int32 = 1
    static let usageError: Int32 = 2

    /// Writes `error: <message>` to standard error and returns `code`, the exit code.
    private static func fail(_ message: String, _ code: Int32) -> Int32 {
        FileHandle.standardError.write(Data("error: \(message)\n".utf8))
        return code
    }

    /// Where `--metrics` (`CHOREO_METRICS`) asks the metrics to be served; nil when it is not given.
    func metricsAddress() throws -> MetricsAddress? {
        guard let text = metrics ?? environmentValue("CHOREO_METRICS"), !text.isEmpty else { return nil }
        return try MetricsAddress(parsing: text)
    }

    func run(
        service: String, handlers: [any EventHandler], ledgerKinds: [any URLOpenableLedger.Type],
        metricsKind: (any MetricsEndpoint.Type)?
    ) async -> Int32 {
        let levelText = logLevel ?? environmentValue("CHOREO_LOG_LEVEL") ?? "info"
        guard let level = Logger.Level(rawValue: levelText) else {
            return Self.fail("unknown --log-level '\(levelText)'", Self.usageError)
        }
        var logger = Logger(label: "choreo.\(service)") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = level
        let config: RunnerConfiguration
        let metricsAddress: MetricsAddress?
        do {
            config = try configuration(service: service)
            metricsAddress = try self.metricsAddress()
            if metricsAddress != nil && metricsKind == nil {
                throw ConfigurationError(
                    "--metrics: this executable serves no metrics (`import ChoreoPrometheus` and pass "
                        + "`metrics: PrometheusEndpoint.self` to Choreo.run)")
            }
        } catch {
            return Self.fail("\(error)", Self.usageError)
        }
        let runtime: ChoreoRuntime
        // The metrics endpoint first: the group shuts its services down in reverse order, so it is scraped to the end.
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = []
        var runtimeMetrics: (any MetricsFactory)?
        do {
            if manifest {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                encoder.dateEncodingStrategy = .iso8601
                let manifests = try ChoreoRuntime.manifests(
                    configuration: config, handlers: handlers.map { HandlerDescriptor($0) })
                print(String(decoding: try encoder.encode(manifests), as: UTF8.self))
                return 0
            }
            // Bound before anything else starts (with --check too), so that a port already taken stops it at once.
            var endpoint: (any MetricsEndpoint)?
            // Where it listens, with the port it got when 0 was asked.
            var served: MetricsAddress?
            if let metricsAddress, let metricsKind {
                do {
                    let bound = try await metricsKind.bind(
                        host: metricsAddress.host, port: metricsAddress.port, logger: logger)
                    endpoint = bound
                    served = MetricsAddress(host: metricsAddress.host, port: bound.port)
                } catch {
                    return Self.fail("--metrics \(metricsAddress): \(error)", Self.failed)
                }
            }
            if let endpoint, let served, !check {
                if MetricsSystem.factory is NOOPMetricsHandler {
                    MetricsSystem.bootstrap(endpoint.factory)
                } else {
                    // The executable bootstrapped a backend of its own (a second bootstrap would stop the
                    // process): the runtime reports to both, the handlers' own metrics to that backend only.
                    runtimeMetrics = MultiplexMetricsHandler(factories: [MetricsSystem.factory, endpoint.factory])
                    logger.notice(
                        "swift-metrics was bootstrapped before Choreo.run: --metrics serves the runtime's metrics only")
                }
                logger.info("metrics at http://\(served)/metrics")
                services.append(.init(service: endpoint))
            }
            let ledger: (any IdempotencyLedger)?
            do {
                ledger = try await LedgerLocation.open(
                    config.ledgerPath, service: service, kinds: ledgerKinds, logger: logger)
            } catch let error as ConfigurationError {
                return Self.fail("\(error)", Self.usageError)
            }
            runtime = try ChoreoRuntime(
                configuration: config, handlers: handlers, ledger: ledger, logger: logger,
                metrics: runtimeMetrics ?? MetricsSystem.factory)
            if check {
                let amqp = try AMQPConfiguration(url: config.url)
                let connection = try await AMQPConnection.connect(to: amqp)
                do { try await runtime.checkTopology(on: connection) } catch {
                    await connection.close()
                    throw error
                }
                await connection.close()
                try await runtime.ledger.check()
                print(
                    "ok: broker \(amqp) reachable, ledger \(LedgerURL.redacted(config.resolvedLedgerPath)) writable"
                        + (served.map { ", metrics port \($0) free" } ?? ""))
                return 0
            }
        } catch {
            return Self.fail("\(error)", Self.failed)
        }
        let group = ServiceGroup(
            configuration: .init(
                services: services + [.init(service: runtime)], gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        do {
            try await group.run()
            return 0
        } catch {
            return Self.fail("\(error)", Self.failed)
        }
    }
}

/// An environment variable's value; one set to the empty string counts as unset, since a deployment template
/// often passes a variable empty rather than leaving it out.
package func environmentValue(_ name: String) -> String? {
    guard let value = ProcessInfo.processInfo.environment[name], !value.isEmpty else { return nil }
    return value
}
