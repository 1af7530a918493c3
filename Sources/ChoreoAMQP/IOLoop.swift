import CRabbitMQ
import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The one thread that owns a connection's C state, and the queue of jobs other threads hand it.
///
/// Jobs run in submission order on that thread and nowhere else, which is how every rabbitmq-c call
/// stays confined to one thread. Between jobs the thread reads frames, and when there is nothing to
/// do it sleeps in `poll` on the socket and an eventfd that ``submit(_:)`` writes to wake it.
final class IOLoop: Sendable {
    typealias Job = @Sendable (ConnectionCore) -> Void

    /// An ack, nack or reject for a delivery; `generation` nil means the channel's current one.
    struct PendingSettlement: Sendable {
        var channel: UInt16
        var generation: UInt64?
        var settlement: AckCoalescer.Settlement
    }

    private struct Queue {
        var jobs: [Job] = []
        var settlements: [PendingSettlement] = []
        var sleeping = false
        var finished: AMQPError?
    }

    private let queue = Mutex(Queue())
    private let wakeFD: Int32

    init() throws(AMQPError) {
        let fd = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        guard fd >= 0 else {
            throw AMQPError(.protocolFailure, message: String(cString: strerror(errno)), operation: "eventfd")
        }
        wakeFD = fd
    }

    deinit {
        close(wakeFD)
    }

    /// Hands a job to the I/O thread. Returns the reason instead when the loop has ended.
    @discardableResult
    func submit(_ job: @escaping Job) -> AMQPError? {
        enqueue { $0.jobs.append(job) }
    }

    /// Hands an ack, nack or reject to the I/O thread, which coalesces them into as few frames as it can.
    func submit(_ settlement: PendingSettlement) -> AMQPError? {
        enqueue { $0.settlements.append(settlement) }
    }

    /// Adds work under the lock and wakes the thread if it sleeps; the reason instead once the loop ended.
    private func enqueue(_ add: (inout Queue) -> Void) -> AMQPError? {
        let (ended, wake) = queue.withLock { q -> (AMQPError?, Bool) in
            if let finished = q.finished { return (finished, false) }
            add(&q)
            let wake = q.sleeping
            q.sleeping = false
            return (nil, wake)
        }
        if wake {
            var one: UInt64 = 1
            _ = write(wakeFD, &one, 8)
        }
        return ended
    }

    /// Runs a job on the I/O thread and returns its result.
    func perform<T: Sendable>(_ body: @escaping @Sendable (ConnectionCore) throws(AMQPError) -> T)
        async throws(AMQPError) -> T
    {
        let result: Result<T, AMQPError> = await withCheckedContinuation { continuation in
            let ended = submit { core in
                do throws(AMQPError) {
                    continuation.resume(returning: .success(try body(core)))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
            if let ended { continuation.resume(returning: .failure(ended)) }
        }
        return try result.get()
    }

    /// Runs a job whose completion the core signals later (a publish waiting for its confirm).
    func performDeferred<T: Sendable>(
        _ body: @escaping @Sendable (ConnectionCore, @escaping @Sendable (Result<T, AMQPError>) -> Void) -> Void
    ) async throws(AMQPError) -> T {
        let result: Result<T, AMQPError> = await withCheckedContinuation { continuation in
            let ended = submit { core in
                body(core) { continuation.resume(returning: $0) }
            }
            if let ended { continuation.resume(returning: .failure(ended)) }
        }
        return try result.get()
    }

    /// Takes every queued job and settlement; called by the I/O thread with its own emptied arrays, which
    /// it swaps in, so neither side allocates: the loop turns many times per event, usually with nothing queued.
    func takeWork(_ jobs: inout [Job], _ settlements: inout [PendingSettlement]) {
        queue.withLock { q in
            swap(&q.jobs, &jobs)
            swap(&q.settlements, &settlements)
        }
    }

    /// Marks the thread as about to sleep; returns false when jobs arrived meanwhile (do not sleep).
    func prepareToSleep() -> Bool {
        queue.withLock { q in
            if !q.jobs.isEmpty || !q.settlements.isEmpty { return false }
            q.sleeping = true
            return true
        }
    }

    func wokeUp() {
        queue.withLock { $0.sleeping = false }
        var value: UInt64 = 0
        _ = read(wakeFD, &value, 8)
    }

    /// Sleeps until the socket is readable, a job is submitted, or the timeout passes.
    func sleep(socket: Int32, timeoutMilliseconds: Int32) {
        var fds = [
            pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0),
            pollfd(fd: socket, events: Int16(POLLIN), revents: 0),
        ]
        _ = poll(&fds, socket >= 0 ? 2 : 1, timeoutMilliseconds)
        wokeUp()
    }

    /// Ends the loop for good: later submissions fail with `reason`; returns jobs still queued.
    func finish(reason: AMQPError) -> [Job] {
        queue.withLock { q in
            q.finished = q.finished ?? reason
            let jobs = q.jobs
            q.jobs.removeAll()
            q.settlements.removeAll()
            return jobs
        }
    }

    var finishedReason: AMQPError? { queue.withLock { $0.finished } }
}
