import Foundation

/// A task executor for work that a connection's deliveries wake up: a task woken on the connection's I/O
/// thread (a consumer receiving a delivery, say) runs its next stretch on that thread, when the thread has
/// nothing else queued; everything else runs on Swift's global concurrent executor, as without a preference.
///
/// A lone delivery is then decoded, handled and answered on the thread that read it, with no hand-over to
/// another thread on the way (a wake-up costs tens of microseconds); a burst still spreads over the pool,
/// since only one job at a time waits for the I/O thread. While a job runs there, the connection reads
/// nothing: after a job that used more than 2 ms of the thread's CPU time (a handler computing, a large
/// group commit) or lasted more than 50 ms however spent (a handler that blocks), jobs go to the pool for
/// the next 200 ms, so slow synchronous work does not keep the connection from its frames. A job that is
/// long only because another process had the CPU does not count: on a small, busy machine that happens
/// every few seconds, and counting it sent a quarter of a hop's events at 200 events/s to the pool, each
/// with a thread wake-up more. Nor do several short jobs in a row: a job's own CPU time counts. One event's
/// decoding, commit and publish take about 0.3 ms of CPU, and up to 1.8 ms on a slow moment of a small VM;
/// and a pause that is taken all the same costs the fast path of only the events of the next 200 ms.
///
/// ```swift
/// try await withTaskExecutorPreference(connection.executor) { try await handle(consumer) }
/// // Publishing on a second connection: what its confirms wake up runs on its thread, likewise.
/// try await withTaskExecutorPreference(consuming.executor.including(publishing)) { ... }
/// ```
public final class ConnectionExecutor: TaskExecutor, Sendable {
    private let loops: [IOLoop]
    static let longStretch = Duration.milliseconds(2)
    static let longWait = Duration.milliseconds(50)
    static let pause = Duration.milliseconds(200)

    init(loops: [IOLoop]) {
        self.loops = loops
    }

    /// This executor, also running on `other`'s I/O thread what that thread wakes up. A consumer that publishes
    /// on a second connection uses it so that a confirm, read by that connection's thread, goes on to record
    /// and acknowledge there, instead of waking a pool thread to do it.
    public func including(_ other: AMQPConnection) -> ConnectionExecutor {
        ConnectionExecutor(loops: loops + [other.loop])
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        for loop in loops where loop.isCurrentThread {
            if ContinuousClock.now >= loop.executorPausedUntil,
                loop.submitHereIfIdle({ [self] _ in run(job, on: loop) })
            {
                return
            }
            break
        }
        globalConcurrentExecutor.enqueue(job)
    }

    /// On `loop`'s I/O thread.
    private func run(_ job: UnownedJob, on loop: IOLoop) {
        let start = ContinuousClock.now
        let cpu = IOLoop.threadCPUTime()
        job.runSynchronously(on: asUnownedTaskExecutor())
        let end = ContinuousClock.now
        let elapsed = end - start
        // Long on the clock but short in CPU time: the thread was preempted, which says nothing of the job.
        // The job's own CPU time, not the thread's since it last slept: events that come close together
        // keep the thread awake through several short jobs, and their sum must not pause it.
        if elapsed > Self.longStretch, elapsed > Self.longWait || IOLoop.threadCPUTime() - cpu > Self.longStretch {
            loop.executorPausedUntil = end + Self.pause
        }
    }
}
