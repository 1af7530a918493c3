import Foundation

/// A task executor for work that a connection's deliveries wake up: a task woken on the connection's I/O
/// thread (a consumer receiving a delivery, say) runs its next stretch on that thread, when the thread has
/// nothing else queued; everything else runs on Swift's global concurrent executor, as without a preference.
///
/// A lone delivery is then decoded, handled and answered on the thread that read it, with no hand-over to
/// another thread on the way (a wake-up costs tens of microseconds); a burst still spreads over the pool,
/// since only one job at a time waits for the I/O thread. While a job runs there, the connection reads
/// nothing: after a stretch longer than a millisecond (a handler computing, a large group commit), jobs go
/// to the pool for the next second, so slow synchronous work does not keep the connection from its frames.
///
/// ```swift
/// try await withTaskExecutorPreference(connection.executor) { try await handle(consumer) }
/// ```
public final class ConnectionExecutor: TaskExecutor, @unchecked Sendable {
    private let loop: IOLoop
    /// Until when jobs go to the pool. Read and written only on the I/O thread.
    private var pausedUntil = ContinuousClock.now
    static let longStretch = Duration.milliseconds(1)
    static let pause = Duration.seconds(1)

    init(loop: IOLoop) {
        self.loop = loop
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        if loop.isCurrentThread, ContinuousClock.now >= pausedUntil,
            loop.submitHereIfIdle({ [self] _ in run(job) })
        {
            return
        }
        globalConcurrentExecutor.enqueue(job)
    }

    /// On the I/O thread.
    private func run(_ job: UnownedJob) {
        let start = ContinuousClock.now
        job.runSynchronously(on: asUnownedTaskExecutor())
        let end = ContinuousClock.now
        if end - start > Self.longStretch { pausedUntil = end + Self.pause }
    }
}
