/// Turns the acks, nacks and rejects of one channel into as few frames as possible: a pure state
/// machine, no I/O.
///
/// The I/O thread records each delivery tag it hands out and, every time it wakes, passes the
/// settlements that arrived since. Acks that cover every outstanding delivery up to some tag go out as
/// one `multiple` ack; the rest go out one by one, so no ack is ever held back waiting for a slow
/// message. Order is kept: a nack or reject first flushes the acks settled before it. A tag the
/// broker would not know (settled twice, never delivered) is dropped here instead of costing the
/// channel a 406.
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

    /// Delivered and not yet settled, ascending (the broker numbers deliveries in order).
    private(set) var outstanding: [UInt64] = []

    mutating func delivered(_ deliveryTag: UInt64) {
        outstanding.append(deliveryTag)
    }

    /// Forgets everything (the channel was reopened; its old tags mean nothing now).
    mutating func reset() {
        outstanding.removeAll()
    }

    mutating func settle(_ settlements: [Settlement]) -> [Frame] {
        var frames: [Frame] = []
        var acked = Set<UInt64>()
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
                flush(&acked, into: &frames)
                for tag in covered { remove(tag) }
                frames.append(.nack(deliveryTag: s.deliveryTag, multiple: s.multiple, requeue: requeue))
            case .reject(let requeue):
                flush(&acked, into: &frames)
                remove(s.deliveryTag)
                frames.append(.reject(deliveryTag: s.deliveryTag, requeue: requeue))
            }
        }
        flush(&acked, into: &frames)
        return frames
    }

    private mutating func flush(_ acked: inout Set<UInt64>, into frames: inout [Frame]) {
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
