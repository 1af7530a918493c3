import Foundation
import Logging
import Synchronization
import Testing

@testable import Choreo

/// A shutdown while the runtime waits to reconnect (the broker away, the backoff up to 30 s) ends that wait at
/// once: an orchestrator's grace period is often 10 to 30 s, after which it kills the process.
@Suite("Shutdown during the wait before a reconnect", .timeLimit(.minutes(1)))
struct ReconnectWaitTests {
    /// Keeps the `retry.in` of each "cannot connect" warning, in seconds.
    final class RetryWaits: Sendable {
        let waits = Mutex<[Double]>([])

        struct Handler: LogHandler {
            let sink: RetryWaits
            var metadata: Logger.Metadata = [:]
            var logLevel: Logger.Level = .info
            subscript(metadataKey key: String) -> Logger.MetadataValue? {
                get { metadata[key] }
                set { metadata[key] = newValue }
            }
            // swift-format-ignore
            func log(
                level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String,
                file: String, function: String, line: UInt
            ) {
                guard case .string(let text)? = metadata?["retry.in"],
                    let seconds = Double(text.replacingOccurrences(of: " s", with: ""))
                else { return }
                sink.waits.withLock { $0.append(seconds) }
            }
        }
    }

    @Test("beginShutdown ends a long reconnect wait at once, and run returns")
    func shutdownEndsTheWait() async throws {
        var config = RunnerConfiguration(service: "reconnect-wait")
        config.url = "amqp://guest:guest@127.0.0.1:1/"  // nothing listens on port 1: every connect fails at once
        config.reconnectBackoff = (initial: .seconds(60), maximum: .seconds(60))
        let sink = RetryWaits()
        let runtime = try ChoreoRuntime(
            configuration: config, handlers: [PingTestHandler()], ledger: InMemoryLedger(),
            logger: Logger(label: "test.reconnect-wait") { _ in RetryWaits.Handler(sink: sink) })
        let running = Task { try await runtime.run() }
        // A wait long enough that its end cannot be mistaken for the shutdown's (waits are drawn from 0 to 60 s).
        let long = await eventually(within: 50, { sink.waits.withLock { $0.last } }, until: { ($0 ?? 0) >= 10 })
        try #require((long ?? 0) >= 10)
        let asked = ContinuousClock.now
        runtime.beginShutdown()
        try await running.value
        let took = ContinuousClock.now - asked
        #expect(took < .seconds(3), "run returned \(took) after the shutdown, in a wait of \(long ?? 0) s")
    }
}
