import Synchronization

/// The deliveries of one consumer between the I/O thread and the code consuming them.
///
/// The I/O thread appends and wakes a waiting reader only when one waits, so a burst of deliveries
/// costs one wake-up; a reader takes everything available at once with ``next(max:)``. Holds at most
/// the channel's prefetch count, because the broker sends no more unacknowledged deliveries than that.
final class DeliveryBuffer: Sendable {
    private struct State: Sendable {
        var items: [AMQPDelivery] = []
        var head = 0
        /// Set once the consumer ended: nil error for a normal end (cancel), else the reason.
        var ended: (any Error & Sendable)?? = nil

        var readable: Bool { head < items.count || ended != nil }
    }

    private let state = WaitableState(State())

    /// Called by the I/O thread for each delivery.
    func yield(_ delivery: AMQPDelivery) {
        state.update { s in
            if s.ended == nil { s.items.append(delivery) }
        }
    }

    /// Ends the sequence once the buffered deliveries are taken: normally, or with `error`.
    func finish(throwing error: (any Error & Sendable)? = nil) {
        state.update { s in
            if s.ended == nil { s.ended = .some(error) }
        }
    }

    /// Waits for at least one delivery and returns up to `max` of those buffered, oldest first;
    /// nil when the consumer ended normally or the calling task was cancelled; throws the reason it ended otherwise.
    func next(max: Int) async throws -> [AMQPDelivery]? {
        while true {
            if Task.isCancelled { return nil }
            switch take(max: max) {
            case .items(let items): return items
            case .ended(nil): return nil
            case .ended(let error?): throw error
            case .empty: break
            }
            await state.wait(until: \.readable)
        }
    }

    private enum Taken {
        case items([AMQPDelivery])
        case ended((any Error)?)
        case empty
    }

    private func take(max: Int) -> Taken {
        state.withLock { s -> Taken in
            let available = s.items.count - s.head
            if available > 0 {
                let n = Swift.min(Swift.max(max, 1), available)
                if s.head == 0 && n == s.items.count {
                    // The usual case: everything buffered is taken. Hand the array over instead of copying it.
                    let out = s.items
                    s.items = []
                    return .items(out)
                }
                let out = Array(s.items[s.head..<(s.head + n)])
                s.head += n
                if s.head == s.items.count {
                    s.items.removeAll(keepingCapacity: true)
                    s.head = 0
                } else if s.head >= 4096 {
                    s.items.removeFirst(s.head)
                    s.head = 0
                }
                return .items(out)
            }
            if let ended = s.ended { return .ended(ended) }
            return .empty
        }
    }
}
