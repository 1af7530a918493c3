import CoreMetrics

/// What the runtime reports through swift-metrics, one set per handler, made once when the runtime starts.
///
/// Every label starts with `choreo_` and carries the dimensions `service` and `handler`:
///
/// | label | kind | what it counts |
/// | --- | --- | --- |
/// | `choreo_events_total` | counter, dimension `outcome` | deliveries settled: `handled` (effect committed, outputs confirmed, acked), `duplicate` (the key was completed before: acked without running the handler), `retried` (sent to a delay tier), `dead_lettered`, `returned` (given back to the queue for redelivery) |
/// | `choreo_handler_duration_seconds` | timer | one invocation of the handler, successful or not |
/// | `choreo_in_flight_events` | meter | deliveries taken and not yet settled |
/// | `choreo_ledger_held_events` | meter | deliveries held while the ledger fails, waiting for it to answer again |
/// | `choreo_ledger_errors_total` | counter, dimension `step` | failed ledger calls: `claim`, `commit`, `record`, `release`, `renew` |
///
/// The runtime itself adds `choreo_connections_lost_total` (dimension `service`): connections to the broker
/// lost or refused, each followed by a reconnect; and `choreo_publishing_blocked` (a meter, dimension `service`):
/// 1 while the broker blocks the service's publishing connection for a resource alarm (low on disk or memory).
struct RunnerMetrics: Sendable {
    /// How a delivery left the runner; its raw value indexes the counters.
    enum Outcome: Int, CaseIterable, Sendable {
        case handled, duplicate, retried, deadLettered, returned

        /// The value of the `outcome` dimension.
        var label: String { ["handled", "duplicate", "retried", "dead_lettered", "returned"][rawValue] }
    }

    /// A ledger call, for `choreo_ledger_errors_total`; its raw value indexes the counters.
    enum LedgerStep: Int, CaseIterable, Sendable {
        case claim, commit, record, release, renew

        /// The value of the `step` dimension.
        var label: String { ["claim", "commit", "record", "release", "renew"][rawValue] }
    }

    /// False with swift-metrics' no-op factory (no backend bootstrapped): the per-event calls are skipped, clock
    /// reads included.
    let enabled: Bool
    private let outcomes: [Counter]
    private let ledgerErrors: [Counter]
    let handlerDuration: Timer
    let inFlight: Meter
    let held: Meter

    init(service: String, handler: String, factory: any MetricsFactory) {
        enabled = !(factory is NOOPMetricsHandler)
        let dimensions = [("service", service), ("handler", handler)]
        outcomes = Outcome.allCases.map {
            Counter(label: "choreo_events_total", dimensions: dimensions + [("outcome", $0.label)], factory: factory)
        }
        ledgerErrors = LedgerStep.allCases.map {
            Counter(
                label: "choreo_ledger_errors_total", dimensions: dimensions + [("step", $0.label)], factory: factory)
        }
        handlerDuration = Timer(
            label: "choreo_handler_duration_seconds", dimensions: dimensions, preferredDisplayUnit: .seconds,
            factory: factory)
        inFlight = Meter(label: "choreo_in_flight_events", dimensions: dimensions, factory: factory)
        held = Meter(label: "choreo_ledger_held_events", dimensions: dimensions, factory: factory)
    }

    func count(_ outcome: Outcome, _ n: Int = 1) {
        if enabled && n > 0 { outcomes[outcome.rawValue].increment(by: n) }
    }

    func ledgerFailed(_ step: LedgerStep) {
        ledgerErrors[step.rawValue].increment()
    }
}
