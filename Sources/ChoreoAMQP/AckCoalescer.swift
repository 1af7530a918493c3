/// Turns the acks, nacks and rejects of one channel into as few frames as possible: a pure state
/// machine, no I/O.
///
/// The I/O thread records each delivery tag it hands out and, every time it wakes, passes the
/// settlements that arrived since. Acks that cover every outstanding delivery up to some tag go out as
/// one `multiple` ack; the rest go out one by one. Order is kept: a nack or reject first flushes the
/// acks settled before it. A tag the broker would not know (settled twice, never delivered) is dropped
/// here instead of costing the channel a 406.
///
/// With a ``Hold``, acks wait to go out together: until the oldest has waited the hold's delay (less a
/// random part of up to half of it), or until `count` are waiting, or a nack or reject comes, whichever
/// is first. On a quorum queue every ack frame is a write to the broker's Raft log and a disk sync;
/// held acks make fewer of them, and keep them from landing just when a downstream consumer publishes.
struct AckCoalescer {
    enum Kind: Equatable {
        case ack
        case nack(requeue: Bool)
        case reject(requeue: Bool)
    }

    struct Settlement: Equatable {
        var deliveryTag: UInt64
        var multiple: Bool
        var kind: Kind
    }

    enum Frame: Equatable {
        case ack(deliveryTag: UInt64, multiple: Bool)
        case nack(deliveryTag: UInt64, multiple: Bool, requeue: Bool)
        case reject(deliveryTag: UInt64, requeue: Bool)
    }

    /// How long, and how many, acks may wait to go out together.
    struct Hold: Equatable {
        var delay: Duration
        var count: Int
    }

    /// No hold: every ack goes out on the I/O thread's next turn.
    var hold: Hold? {
        didSet { if hold == nil { deadline = nil } }
    }

    /// Delivered and not yet settled, ascending (the broker numbers deliveries in order).
    private(set) var outstanding: [UInt64] = []
    /// Acked by the application, not yet sent to the broker (a subset of `outstanding`).
    private var acked = Set<UInt64>()
    /// When the acks waiting must go out; nil when none wait.
    private(set) var deadline: ContinuousClock.Instant?

    /// Acks waiting to go out.
    var heldCount: Int { acked.count }

    mutating func delivered(_ deliveryTag: UInt64) {
        outstanding.append(deliveryTag)
    }

    /// Forgets everything (the channel was reopened; its old tags mean nothing now).
    mutating func reset() {
        outstanding.removeAll()
        acked.removeAll()
        deadline = nil
    }

    /// The frames for `settlements`; acks may be held (see ``Hold``). `now` starts a hold's delay.
    mutating func settle(_ settlements: [Settlement], now: ContinuousClock.Instant = .now) -> [Frame] {
        var frames: [Frame] = []
        for s in settlements {
            let covered: [UInt64]
            if s.multiple {
                covered = outstanding.prefix { $0 <= s.deliveryTag }.filter { !acked.contains($0) }
            } else {
                covered = contains(s.deliveryTag) && !acked.contains(s.deliveryTag) ? [s.deliveryTag] : []
            }
            if covered.isEmpty { continue }
            switch s.kind {
            case .ack:
                acked.formUnion(covered)
            case .nack(let requeue):
                flush(into: &frames)
                for tag in covered { remove(tag) }
                frames.append(.nack(deliveryTag: s.deliveryTag, multiple: s.multiple, requeue: requeue))
            case .reject(let requeue):
                flush(into: &frames)
                remove(s.deliveryTag)
                frames.append(.reject(deliveryTag: s.deliveryTag, requeue: requeue))
            }
        }
        guard let hold, !acked.isEmpty else {
            flush(into: &frames)
            return frames
        }
        if acked.count >= hold.count || hold.delay <= .zero || deadline.map({ now >= $0 }) == true {
            flush(into: &frames)
        } else if deadline == nil {
            // A random part, so that consumers fed at a steady rate do not send their acks in step with it.
            deadline = now + hold.delay * Double.random(in: 0.5...1)
        }
        return frames
    }

    /// The held acks, when their deadline has come (or `force`: the channel or connection is closing).
    mutating func flushHeld(now: ContinuousClock.Instant = .now, force: Bool = false) -> [Frame] {
        guard let deadline, force || now >= deadline else { return [] }
        var frames: [Frame] = []
        flush(into: &frames)
        return frames
    }

    private mutating func flush(into frames: inout [Frame]) {
        deadline = nil
        guard !acked.isEmpty else { return }
        var prefix = 0
        while prefix < outstanding.count && acked.contains(outstanding[prefix]) { prefix += 1 }
        if prefix > 0 {
            frames.append(.ack(deliveryTag: outstanding[prefix - 1], multiple: prefix > 1))
            for tag in outstanding[..<prefix] { acked.remove(tag) }
            outstanding.removeFirst(prefix)
        }
        for tag in acked.sorted() {
            remove(tag)
            frames.append(.ack(deliveryTag: tag, multiple: false))
        }
        acked.removeAll()
    }

    private func index(of tag: UInt64) -> Int? {
        var lo = 0, hi = outstanding.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if outstanding[mid] < tag { lo = mid + 1 } else { hi = mid }
        }
        return lo < outstanding.count && outstanding[lo] == tag ? lo : nil
    }

    private func contains(_ tag: UInt64) -> Bool { index(of: tag) != nil }

    private mutating func remove(_ tag: UInt64) {
        if let i = index(of: tag) { outstanding.remove(at: i) }
    }
}
