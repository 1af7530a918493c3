/// Publisher-confirm bookkeeping for one channel: a pure state machine, no I/O.
///
/// The I/O thread tells it what was published, returned, acked and nacked; it answers which publishes
/// are now settled and how. Sequence numbers start at 1 and restart when the channel is reopened
/// (create a new tracker then). A `basic.return` always precedes the ack of the same message, so a
/// return is held until the ack of a matching mandatory publish settles it as unroutable.
struct ConfirmTracker {
    enum Outcome: Equatable {
        case confirmed
        case nacked
        case returned(replyCode: UInt16, replyText: String)
    }

    struct Settled: Equatable {
        var token: UInt64
        var outcome: Outcome
    }

    private struct Pending {
        var token: UInt64
        var mandatory: Bool
        var exchange: String
        var routingKey: String
    }

    private struct Return {
        var exchange: String
        var routingKey: String
        var replyCode: UInt16
        var replyText: String
    }

    private(set) var nextSequence: UInt64 = 1
    private var lowestUnsettled: UInt64 = 1
    private var pending: [UInt64: Pending] = [:]
    private var returns: [Return] = []

    var unsettledCount: Int { pending.count }

    /// Records a publish; returns its sequence number (the delivery tag the broker will confirm).
    mutating func published(token: UInt64, mandatory: Bool, exchange: String, routingKey: String) -> UInt64 {
        let seq = nextSequence
        nextSequence += 1
        pending[seq] = Pending(token: token, mandatory: mandatory, exchange: exchange, routingKey: routingKey)
        return seq
    }

    /// Records a `basic.return`; it settles a publish when that publish's ack arrives.
    mutating func returned(exchange: String, routingKey: String, replyCode: UInt16, replyText: String) {
        returns.append(Return(exchange: exchange, routingKey: routingKey, replyCode: replyCode, replyText: replyText))
    }

    mutating func acked(deliveryTag: UInt64, multiple: Bool) -> [Settled] {
        settle(deliveryTag: deliveryTag, multiple: multiple, positive: true)
    }

    mutating func nacked(deliveryTag: UInt64, multiple: Bool) -> [Settled] {
        settle(deliveryTag: deliveryTag, multiple: multiple, positive: false)
    }

    /// Settles nothing and forgets everything: every unsettled token, for failing them on channel loss.
    mutating func abandonAll() -> [UInt64] {
        let tokens = pending.keys.sorted().compactMap { pending[$0]?.token }
        pending.removeAll()
        returns.removeAll()
        lowestUnsettled = nextSequence
        return tokens
    }

    private mutating func settle(deliveryTag: UInt64, multiple: Bool, positive: Bool) -> [Settled] {
        var settled: [Settled] = []
        // A tag of 0 with multiple=true means "everything so far" (AMQP 0-9-1 confirms extension).
        let upper = (multiple && deliveryTag == 0) ? nextSequence - 1 : deliveryTag
        let range: ClosedRange<UInt64> =
            multiple ? lowestUnsettled...max(lowestUnsettled, upper) : deliveryTag...deliveryTag
        if multiple && upper < lowestUnsettled { return [] }
        for seq in range {
            guard let p = pending.removeValue(forKey: seq) else { continue }
            settled.append(Settled(token: p.token, outcome: outcome(for: p, positive: positive)))
        }
        while lowestUnsettled < nextSequence && pending[lowestUnsettled] == nil { lowestUnsettled += 1 }
        return settled
    }

    private mutating func outcome(for p: Pending, positive: Bool) -> Outcome {
        guard positive else { return .nacked }
        if p.mandatory,
            let i = returns.firstIndex(where: { $0.exchange == p.exchange && $0.routingKey == p.routingKey })
        {
            let r = returns.remove(at: i)
            return .returned(replyCode: r.replyCode, replyText: r.replyText)
        }
        return .confirmed
    }
}
