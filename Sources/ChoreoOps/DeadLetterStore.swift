import Choreo
import ChoreoAMQP
import Foundation
import Synchronization

/// Dead-letter operations over AMQP alone: list, show, replay, purge, export, import.
///
/// Reading a dead-letter queue is non-destructive: the store consumes a snapshot of it without
/// acknowledging, and closing the channel gives every message back. Removing a letter is an ack, done
/// only after whatever replaces it (a replayed copy) was confirmed by the broker: a crash at any point
/// leaves the letter in place, and the idempotency ledger drops a second replayed copy.
public struct DeadLetterStore: Sendable {
    public struct ReplaySummary: Sendable, Equatable {
        /// Distinct letters sent back to their handler and removed.
        public var replayed = 0
        public var skipped = 0
        public var failed = 0
        public var failures: [String] = []
        /// Letters the broker gave back after their removal (see ``replay``): recognised as replayed already
        /// in this run and removed again, without being sent a second time.
        public var givenBack = 0
        /// Events replayed in this run that failed again and were dead-lettered anew while it ran: left in the
        /// dead-letter queue for the next look, not replayed a second time.
        public var failedAgain = 0
    }

    public let connection: AMQPConnection
    public let manifests: [HandlerManifest]

    public init(connection: AMQPConnection, manifests: [HandlerManifest]) {
        self.connection = connection
        self.manifests = manifests
    }

    /// The handlers a filter names; an unknown handler is an error that lists the known ones.
    public func handlers(for filter: DeadLetterFilter) throws -> [HandlerManifest] {
        let selected = manifests.filter { filter.matches($0) }
        if selected.isEmpty {
            if let service = filter.service, !manifests.contains(where: { $0.service == service }) {
                let known = Set(manifests.map(\.service)).sorted()
                throw OperationError(
                    "no service named '\(service)' in the registry (known: \(known.isEmpty ? "none" : known.joined(separator: ", ")))"
                )
            }
            if let h = filter.handler {
                let known = manifests.map { "\($0.service).\($0.handler)" }
                throw OperationError(
                    "no handler named '\(h)' in the registry (known: \(known.isEmpty ? "none" : known.joined(separator: ", ")))"
                )
            }
            throw OperationError("no handlers in the registry: has any handler service started on this broker?")
        }
        return selected
    }

    /// Dead letters matching the filter; nothing is removed.
    public func list(_ filter: DeadLetterFilter) async throws -> [DeadLetter] {
        var out: [DeadLetter] = []
        for m in try handlers(for: filter) {
            try await withSnapshot(of: m) { letters, _ in
                out += letters.map(\.1).filter { filter.matches($0) }
            }
        }
        out.sort { ($0.lastFailure ?? .distantPast) < ($1.lastFailure ?? .distantPast) }
        if let limit = filter.limit { out = Array(out.prefix(limit)) }
        return out
    }

    /// The dead letter with this event id.
    public func show(id: String, handler: String? = nil) async throws -> DeadLetter {
        let found = try await list(DeadLetterFilter(handler: handler, ids: [id]))
        guard let letter = found.first else { throw OperationError.noDeadLetter([id]) }
        return letter
    }

    /// Sends matching dead letters back to the handler that failed them, through its own queue, and
    /// removes each only after the broker confirmed its copy.
    ///
    /// - Parameters:
    ///   - rate: at most this many letters per second (nil: as fast as confirms allow).
    ///   - progress: called after each step with (done, total).
    public func replay(
        _ filter: DeadLetterFilter, dryRun: Bool = false, rate: Double? = nil,
        progress: @Sendable (Int, Int) -> Void = { _, _ in }
    ) async throws -> ReplaySummary {
        var summary = ReplaySummary()
        var remaining = filter.limit ?? Int.max
        // A run replays each event at most once per handler. Later rounds can meet an event again in two ways:
        // - RabbitMQ 3.10's quorum queues can give back letters acked just before a channel closes (their
        //   removal had not been applied yet). Such a letter is the very one replayed (see LetterIdentity):
        //   it is removed again, not sent twice.
        // - Its replay failed again and the handler (or the broker) dead-lettered it anew. That letter differs
        //   from the one replayed; it stays in the queue for the operator, and the run does not loop on it.
        for m in try handlers(for: filter) {
            var replayedIDs = Set<String>()
            var replayedLetters = Set<LetterIdentity>()
            var failedAgainIDs = Set<String>()
            // A broker hands one consumer at most a few thousand unacknowledged messages (quorum queues: 2,000),
            // so a large queue is worked through in rounds; each round removes what it replayed.
            var round = 0
            while true {
                round += 1
                var progressed = 0
                let expected = try await depth(of: m)
                try await withSnapshot(of: m) { letters, _ in
                    let matching = letters.filter { filter.matches($0.1) }
                    var givenBack: [(AMQPDelivery, DeadLetter)] = []
                    var fresh: [(AMQPDelivery, DeadLetter)] = []
                    for letter in matching {
                        if replayedLetters.contains(LetterIdentity(letter.1)) {
                            givenBack.append(letter)
                        } else if replayedIDs.contains(letter.1.id) {
                            failedAgainIDs.insert(letter.1.id)
                        } else {
                            fresh.append(letter)
                        }
                    }
                    let selected = Array(fresh.prefix(max(remaining, 0)))
                    if round == 1 || dryRun { summary.skipped += matching.count - selected.count }
                    if dryRun {
                        summary.replayed += selected.count
                        progress(summary.replayed, summary.replayed)
                        return
                    }
                    for (delivery, _) in givenBack {
                        try delivery.ack()
                        progressed += 1
                        summary.givenBack += 1
                    }
                    let publisher = try await connection.openChannel()
                    defer { Task { await publisher.close() } }
                    try await publisher.enableConfirms()
                    let chunk = rate == nil ? 500 : 1
                    for start in stride(from: 0, to: selected.count, by: chunk) {
                        let started = ContinuousClock.now
                        let part = selected[start..<min(start + chunk, selected.count)]
                        let results = await publisher.publish(contentsOf: part.map { $0.1.replayMessage })
                        for ((delivery, letter), result) in zip(part, results) {
                            switch result {
                            case .success:
                                FaultInjection.reached("replay-after-publish")
                                try delivery.ack()
                                progressed += 1
                                replayedLetters.insert(LetterIdentity(letter))
                                // Two letters of one event in the same snapshot (imported twice) count once.
                                if replayedIDs.insert(letter.id).inserted {
                                    summary.replayed += 1
                                    remaining -= 1
                                }
                            case .failure(let error):
                                summary.failed += 1
                                summary.failures.append("\(letter.id): \(error)")
                            }
                        }
                        progress(
                            summary.replayed, summary.replayed + max(0, min(remaining, Int(expected) - progressed)))
                        if let rate, rate > 0 {
                            let wait = Duration.seconds(Double(part.count) / rate) - (ContinuousClock.now - started)
                            if wait > .zero { try await Task.sleep(for: wait) }
                        }
                    }
                }
                // A snapshot that looked complete may still have missed letters that the previous round's
                // channel close was returning to the queue while it was counted: stop only after a round
                // that found nothing to replay.
                if dryRun || progressed == 0 || remaining <= 0 { break }
            }
            summary.failedAgain += failedAgainIDs.count
        }
        return summary
    }

    /// Removes matching dead letters; returns how many.
    public func purge(_ filter: DeadLetterFilter) async throws -> Int {
        var removed = 0
        var remaining = filter.limit ?? Int.max
        var removedIDs = Set<String>()
        for m in try handlers(for: filter) {
            while remaining > 0 {
                var progressed = 0
                try await withSnapshot(of: m) { letters, _ in
                    for (delivery, letter) in letters.filter({ filter.matches($0.1) }).prefix(remaining) {
                        try delivery.ack()
                        progressed += 1
                        if removedIDs.insert(letter.id).inserted {  // see replay: a letter may come back once more
                            removed += 1
                            remaining -= 1
                        }
                    }
                }
                if progressed == 0 { break }  // see replay: only a round that found nothing ends the work
            }
        }
        return removed
    }

    /// Writes matching dead letters as JSON lines; nothing is removed.
    public func export(_ filter: DeadLetterFilter, to output: URL) async throws -> Int {
        let letters = try await list(filter)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var text = Data()
        for letter in letters {
            text.append(try encoder.encode(ExportedLetter(letter)))
            text.append(0x0A)
        }
        do { try text.write(to: output, options: .atomic) } catch {
            throw OperationError("cannot write \(output.path): \(Self.reason(error))")
        }
        return letters.count
    }

    /// The operating system's words for a file error from Foundation ("No such file or directory").
    private static func reason(_ error: any Error) -> String {
        let ns = error as NSError
        if let posix = ns.userInfo[NSUnderlyingErrorKey] as? NSError, posix.domain == NSPOSIXErrorDomain {
            return String(cString: strerror(Int32(posix.code)))
        }
        switch (error as? CocoaError)?.code {
        case .fileWriteNoPermission?: return String(cString: strerror(EACCES))
        case .fileWriteOutOfSpace?: return String(cString: strerror(ENOSPC))
        case .fileWriteVolumeReadOnly?: return String(cString: strerror(EROFS))
        default: return ns.localizedDescription
        }
    }

    /// Restores exported dead letters into their dead-letter queues, body bytes and headers intact.
    public func importLetters(from input: URL) async throws -> Int {
        try await importLetters(Self.readExport(from: input))
    }

    /// The letters of a file `export` wrote, as messages to their dead-letter queues; a line that is not one
    /// fails the whole file, naming the line.
    public static func readExport(from input: URL) throws -> [AMQPOutgoingMessage] {
        let data: Data
        do { data = try Data(contentsOf: input) } catch {
            throw OperationError("cannot read \(input.path): \(reason(error))")
        }
        let decoder = JSONDecoder()
        var messages: [AMQPOutgoingMessage] = []
        let lines = data.split(separator: 0x0A, omittingEmptySubsequences: false)
        for (n, line) in lines.enumerated() where !line.allSatisfy({ $0 == 0x20 || $0 == 0x0D }) {
            do {
                messages.append(try decoder.decode(ExportedLetter.self, from: Data(line)).message())
            } catch {
                let reason =
                    (error as? DecodingError).map {
                        HandlerDescriptor.describe($0, type: "choreo dlq export", whole: "the line")
                    } ?? "\(error)"
                throw OperationError("\(input.path):\(n + 1): not an exported dead letter: \(reason)")
            }
        }
        return messages
    }

    /// Publishes letters read by ``readExport(from:)`` to their dead-letter queues, each confirmed.
    public func importLetters(_ messages: [AMQPOutgoingMessage]) async throws -> Int {
        let channel = try await connection.openChannel()
        defer { Task { await channel.close() } }
        for queue in Set(messages.map(\.routingKey)) {
            do { _ = try await channel.declareQueuePassive(queue) } catch {
                if error.replyCode == AMQPError.ReplyCode.notFound {
                    throw OperationError(
                        "dead-letter queue '\(queue)' does not exist on this broker (start its handler once to declare it)"
                    )
                }
                throw error
            }
        }
        try await channel.enableConfirms()
        for result in await channel.publish(contentsOf: messages) { try result.get() }
        return messages.count
    }

    private func depth(of manifest: HandlerManifest) async throws -> UInt32 {
        let channel = try await connection.openChannel()
        defer { Task { await channel.close() } }
        return (try? await channel.declareQueuePassive(manifest.deadLetterQueue).messageCount) ?? 0
    }

    /// Consumes a snapshot of a dead-letter queue without acknowledging; closing the channel gives back
    /// whatever `body` did not ack. `body` learns whether the snapshot holds the whole queue: the broker
    /// caps one consumer's unacknowledged messages (2,000 for quorum queues), so it may not.
    private func withSnapshot(
        of manifest: HandlerManifest,
        _ body: ([(AMQPDelivery, DeadLetter)], Bool) async throws -> Void
    ) async throws {
        let channel = try await connection.openChannel()
        defer { Task { await channel.close() } }
        let expected: UInt32
        do {
            expected = try await channel.declareQueuePassive(manifest.deadLetterQueue).messageCount
        } catch {
            if error.replyCode == AMQPError.ReplyCode.notFound {
                throw OperationError("dead-letter queue '\(manifest.deadLetterQueue)' does not exist")
            }
            throw error
        }
        try await channel.setPrefetch(0)  // no limit: the whole snapshot is held unacknowledged
        let consumer = try await channel.consume(queue: manifest.deadLetterQueue)
        let collected = SnapshotCollector()
        let reader = Task {
            for try await d in consumer { collected.append(d) }
        }
        // The queue said how many it held; stop when all arrived, or when none arrived for 1 s (the broker's
        // per-consumer cap was reached, or another client took some).
        var last = 0
        var lastProgress = ContinuousClock.now
        while true {
            let count = collected.count
            if expected > 0 && count >= Int(expected) { break }
            if count != last { last = count; lastProgress = .now }
            // An empty count may be a snapshot taken while another client's messages were being returned.
            if ContinuousClock.now - lastProgress > (expected == 0 && count == 0 ? .milliseconds(250) : .seconds(1)) {
                break
            }
            try await Task.sleep(for: .milliseconds(5))
        }
        // The consumer stays until the channel closes: settling deliveries of a cancelled quorum-queue
        // consumer is not something to rely on. Whatever arrives from now on goes back at the close.
        reader.cancel()
        let deliveries = collected.items
        try await body(
            deliveries.map { ($0, DeadLetter(delivery: $0, manifest: manifest)) }, deliveries.count >= Int(expected))
        await channel.close()
    }
}

/// Tells one dead-lettering of an event from another: the event's id and its headers, leaving out the
/// broker's own (`x-…`, which change on redelivery). A letter the broker gives back is the very one that
/// was replayed; a copy that failed again after this run replayed it carries the `choreo-replayed-at`
/// the replay set on it (and new failure headers), so it differs even when the broker dead-lettered it.
struct LetterIdentity: Hashable {
    let id: String
    let headers: AMQPTable
    init(_ letter: DeadLetter) {
        id = letter.id
        headers = (letter.properties.headers ?? [:]).filter { !$0.key.hasPrefix("x-") }
    }
}

/// Deliveries collected by a reader task, read by the task that started it.
final class SnapshotCollector: Sendable {
    private let storage = Mutex<[AMQPDelivery]>([])
    func append(_ d: AMQPDelivery) { storage.withLock { $0.append(d) } }
    var count: Int { storage.withLock { $0.count } }
    var items: [AMQPDelivery] { storage.withLock { $0 } }
}
