import Foundation

#if canImport(Glibc)
    import Glibc
#endif

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
    /// Until when (monotonic nanoseconds) jobs go to the pool. Read and written only on the I/O thread.
    private var pausedUntil: UInt64 = 0
    static let longStretch: UInt64 = 1_000_000
    static let pause: UInt64 = 1_000_000_000

    init(loop: IOLoop) {
        self.loop = loop
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        if loop.isCurrentThread, Self.now() >= pausedUntil,
            loop.submitHereIfIdle({ [self] _ in run(job) })
        {
            return
        }
        globalConcurrentExecutor.enqueue(job)
    }

    /// On the I/O thread.
    private func run(_ job: UnownedJob) {
        let start = Self.now()
        job.runSynchronously(on: asUnownedTaskExecutor())
        let end = Self.now()
        if end - start > Self.longStretch { pausedUntil = end + Self.pause }
    }

    private static func now() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
    }
}
