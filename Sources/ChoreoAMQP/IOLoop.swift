import CRabbitMQ
import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The thread that serves a connection's C state, and the queue of jobs other threads hand it.
///
/// Jobs run in submission order, one at a time, under the worker lock, which the I/O thread holds while
/// it runs jobs and reads frames and lets go only to sleep: so rabbitmq-c is never called by two threads
/// at once. Between jobs the thread reads frames, and when there is nothing to do it sleeps in `poll` on
/// the socket and an eventfd that ``submit(_:)`` writes to wake it.
///
/// A publish that finds the thread asleep with nothing queued is written by the publishing thread itself
/// (``runOrSubmit(_:)``): waking the I/O thread to do it would cost every lone event a thread wake-up
/// (tens of microseconds on the path from a delivery to the event it emits). Likewise an ack that the
/// thread would only hold (``AMQPChannel/holdAcks(for:upTo:)``) does not wake it while it sleeps until
/// acks already held are due: it is taken then, and goes out with them or by its own deadline.
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
        /// While the thread sleeps: per channel whose held acks it wakes up for, how many more single acks may
        /// wait for that wake-up instead of waking it (filled by ``prepareToSleep(ackRoom:)``). Every
        /// settlement queued while the thread sleeps is one of those: any other wakes it.
        var ackRoom: [UInt16: Int] = [:]
    }

    private let queue = Mutex(Queue())
    private let wakeFD: Int32
    /// Held by whoever works on the core: the I/O thread, except while it sleeps, or a thread running a job
    /// itself (``runOrSubmit(_:)``).
    private let worker = Mutex(())
    /// The core while its thread runs; read and written only under `worker`.
    nonisolated(unsafe) private var attached: ConnectionCore?
    /// True while a caller runs a job (``runOrSubmit(_:)``).
    private let callerRunning = Atomic(false)
    /// The I/O thread's `pthread_self()`, once it runs.
    private let thread = Atomic<UInt>(0)
    /// Jobs run by callers, and writes they left to the I/O thread because the socket was full (for tests).
    let jobsRunByCallers = Atomic(0)
    let writesLeftToThread = Atomic(0)
    /// Acks queued for the thread's next wake-up without waking it (for tests).
    let acksLeftForWakeUp = Atomic(0)

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
        enqueue { q in
            q.jobs.append(job)
            return true
        }
    }

    /// Hands an ack, nack or reject to the I/O thread, which coalesces them into as few frames as it can.
    func submit(_ settlement: PendingSettlement) -> AMQPError? {
        enqueue { q in
            q.settlements.append(settlement)
            // A single ack the sleeping thread would only hold: it waits for the wake-up for the held ones.
            let s = settlement.settlement
            guard q.sleeping, s.kind == .ack, !s.multiple, let room = q.ackRoom[settlement.channel], room > 0 else {
                return true
            }
            q.ackRoom[settlement.channel] = room - 1
            acksLeftForWakeUp.add(1, ordering: .relaxed)
            return false
        }
    }

    /// Runs `job` on the calling thread when the I/O thread sleeps with nothing queued (acks waiting for its
    /// wake-up aside: they need not go before a publish) and the core allows it
    /// (``ConnectionCore/runsJobsOnCallers``), else hands it over as ``submit(_:)`` does. Either way jobs
    /// keep their order: one runs here only when none is waiting.
    @discardableResult
    func runOrSubmit(_ job: @escaping Job) -> AMQPError? {
        // Only when the thread sleeps does it not hold the worker lock; and a job already running on a caller
        // (perhaps this thread) holds it: trying it then would be a recursive lock, which traps.
        if isIdle, !callerRunning.load(ordering: .acquiring) {
            let ran = worker.withLockIfAvailable { _ -> Bool in
                guard let core = attached, core.runsJobsOnCallers, isIdle else { return false }
                callerRunning.store(true, ordering: .releasing)
                core.runOnCaller(job)
                callerRunning.store(false, ordering: .releasing)
                jobsRunByCallers.add(1, ordering: .relaxed)
                // A job that ended the connection: the thread must wake up to see it and finish.
                if !core.isLive { wake() }
                return true
            }
            if ran == true { return nil }
        }
        return submit(job)
    }

    /// The I/O thread sleeps (or is about to) and nothing waits for it but acks it is to take when it wakes.
    var isIdle: Bool {
        queue.withLock { q in q.sleeping && q.finished == nil && q.jobs.isEmpty }
    }

    /// Runs `body` (a turn of the I/O thread's work, or attaching its core) under the worker lock.
    func working<T>(_ body: () -> T) -> T {
        worker.withLock { _ in body() }
    }

    /// The core that ``runOrSubmit(_:)`` may use; nil once its thread has finished. Called by the I/O thread
    /// inside ``working(_:)``.
    func attach(_ core: ConnectionCore?) {
        attached = core
        thread.store(core == nil ? 0 : UInt(pthread_self()), ordering: .releasing)
    }

    /// Whether the caller is the I/O thread.
    var isCurrentThread: Bool { thread.load(ordering: .acquiring) == UInt(pthread_self()) }

    /// Queues `job` for the I/O thread's next turn when the caller is that thread and nothing else is queued
    /// (no wake-up needed); false otherwise, and nothing is queued.
    func submitHereIfIdle(_ job: @escaping Job) -> Bool {
        guard isCurrentThread else { return false }
        return queue.withLock { q in
            guard q.finished == nil, q.jobs.isEmpty else { return false }
            q.jobs.append(job)
            return true
        }
    }

    private func wake() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    /// Adds work under the lock and wakes the thread if it sleeps, unless `add` says the work can wait for
    /// its next wake-up; the reason instead once the loop ended.
    private func enqueue(_ add: (inout Queue) -> Bool) -> AMQPError? {
        let (ended, wake) = queue.withLock { q -> (AMQPError?, Bool) in
            if let finished = q.finished { return (finished, false) }
            guard add(&q) else { return (nil, false) }
            let wake = q.sleeping
            q.sleeping = false
            return (nil, wake)
        }
        if wake { self.wake() }
        return ended
    }

    /// Runs a job on the I/O thread and returns its result.
    func perform<T: Sendable>(_ body: @escaping @Sendable (ConnectionCore) throws(AMQPError) -> T)
        async throws(AMQPError) -> T
    {
        let result: Result<T, AMQPError> = await withUnsafeContinuation { continuation in
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

    /// Runs a publish job whose completion the core signals later, when the broker confirms it; on the
    /// calling thread when the I/O thread is idle (``runOrSubmit(_:)``).
    func performPublish<T: Sendable>(
        _ body: @escaping @Sendable (ConnectionCore, @escaping @Sendable (Result<T, AMQPError>) -> Void) -> Void
    ) async throws(AMQPError) -> T {
        let result: Result<T, AMQPError> = await withUnsafeContinuation { continuation in
            let ended = runOrSubmit { core in
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
    /// `ackRoom` fills in, per channel, how many more single acks may wait for the thread's next wake-up:
    /// only for channels whose held acks are due no later than the thread's sleep ends.
    func prepareToSleep(ackRoom: (inout [UInt16: Int]) -> Void) -> Bool {
        queue.withLock { q in
            if !q.jobs.isEmpty || !q.settlements.isEmpty { return false }
            q.ackRoom.removeAll(keepingCapacity: true)
            ackRoom(&q.ackRoom)
            q.sleeping = true
            return true
        }
    }

    /// Sleeps until the socket is readable, a job is submitted, or the timeout passes.
    func sleep(socket: Int32, timeoutMilliseconds: Int32) {
        // On the stack, and the eventfd read only when it was written: this runs at every event's wake-up.
        var fds = (
            pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0),
            pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
        )
        let signalled = withUnsafeMutableBytes(of: &fds) { raw -> Bool in
            let p = raw.baseAddress!.assumingMemoryBound(to: pollfd.self)
            let ready = poll(p, socket >= 0 ? 2 : 1, timeoutMilliseconds)
            return ready != 0 && p[0].revents != 0
        }
        queue.withLock { $0.sleeping = false }
        // A write after `poll` returned stays in the eventfd and ends the next sleep at once: harmless, since the
        // next turn takes the queued work anyway.
        if signalled {
            var value: UInt64 = 0
            _ = read(wakeFD, &value, 8)
        }
    }

    /// Whether jobs wait for the thread's next turn.
    var hasQueuedJobs: Bool { queue.withLock { !$0.jobs.isEmpty } }

    /// Until when ``ConnectionExecutor`` sends jobs woken here to the pool (after a long job on this
    /// thread). Read and written only on the I/O thread.
    nonisolated(unsafe) var executorPausedUntil = ContinuousClock.now

    /// The calling thread's CPU time (a system call, about half a microsecond here).
    static func threadCPUTime() -> Duration {
        var t = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t)
        return .seconds(t.tv_sec) + .nanoseconds(t.tv_nsec)
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
