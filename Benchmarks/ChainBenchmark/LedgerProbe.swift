import Choreo
import ChoreoPostgres
import Foundation
import Logging

/// Times the ledger calls of one event at a time (claim, complete with one outbox entry, record the confirm),
/// for a SQLite file or a PostgreSQL URL: what a hop's ledger adds to each event's latency.
struct LedgerProbe {
    let location: String
    let count: Int
    /// Between events: at 200 events/s a hop waits about 5 ms for the next one.
    let pause: Duration

    func run() async throws {
        let ledger: any IdempotencyLedger =
            location.contains("://")
            ? try await PostgresLedger.open(url: location, service: "probe", logger: Logger(label: "probe"))
            : try SQLiteLedger(path: location)
        let run = UUID().uuidString.prefix(8)
        var claim: [Double] = []
        var complete: [Double] = []
        var record: [Double] = []
        let clock = ContinuousClock()
        func micros(_ d: Duration) -> Double { d.seconds * 1e6 }
        for i in 0..<count {
            let key = "\(run)-\(i)"
            let envelope = try EventEnvelope(ProbeEvent(n: i), source: "probe", id: key)
            let outbox = [OutboxMessage(index: 0, envelope: envelope, exchange: "x", routingKey: "probe")]
            var t = clock.now
            _ = try await ledger.claim([ClaimRequest(handler: "h", key: key, owner: "o")], lease: .seconds(60))
            claim.append(micros(clock.now - t))
            t = clock.now
            _ = try await ledger.complete([CompletionRequest(handler: "h", key: key, owner: "o", outbox: outbox)])
            complete.append(micros(clock.now - t))
            t = clock.now
            try await ledger.markPublished([PublishedEntries(handler: "h", key: key, indexes: [0])])
            record.append(micros(clock.now - t))
            if pause > .zero { try await Task.sleep(for: pause) }
        }
        func p(_ xs: [Double], _ q: Double) -> Double { percentile(xs.sorted(), q) }
        print("ledger \(LedgerURL.redacted(location)), \(count) events one at a time, \(pause) between them")
        for (name, xs) in [("claim", claim), ("complete", complete), ("record", record)] {
            print(
                String(format: "%@: p50 %.0f µs, p90 %.0f µs, p99 %.0f µs", name, p(xs, 0.5), p(xs, 0.9), p(xs, 0.99)))
        }
    }
}

struct ProbeEvent: Event {
    static let eventType = "probe.event"
    var n: Int
}
