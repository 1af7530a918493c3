import Foundation
import Logging
import PostgresNIO
import Synchronization

/// The PostgreSQL ledger's connections: at most `maximum`, opened when a call needs one, used by one call at a
/// time, and dropped at the first sign of trouble, so that the next call connects afresh.
///
/// Not PostgresNIO's `PostgresClient` pool: while it cannot connect it keeps queries waiting, retrying in the
/// background (postgres-nio issues 489 and 602), and in a test that stopped the server for 3 s, calls waited
/// past its return for good. A ledger call must fail instead, so that the runner gives the event back, and a
/// call that is abandoned (its time is up) must not hold a connection: its connection is closed, which ends
/// whatever it was waiting for.
final class LedgerConnections: Sendable {
    private struct State {
        var idle: [PostgresConnection] = []
        /// Connections open or being opened, idle ones included.
        var open = 0
        var waiters: [(id: Int, continuation: CheckedContinuation<Void, Never>)] = []
        var closed = false
    }

    private let state = Mutex(State())
    private let nextID = Atomic<Int>(0)
    private let configuration: @Sendable () throws -> PostgresConnection.Configuration
    private let logger: Logger
    private let maximum: Int

    init(
        maximum: Int, logger: Logger, configuration: @escaping @Sendable () throws -> PostgresConnection.Configuration
    ) {
        self.maximum = maximum
        self.logger = logger
        self.configuration = configuration
    }

    /// Runs `body` on a connection of its own. Cancelling the calling task closes that connection, which fails
    /// the query it waits for, so that `body` ends.
    func with<T: Sendable>(_ body: @Sendable (PostgresConnection) async throws -> T) async throws -> T {
        let connection = try await acquire()
        defer { release(connection) }
        return try await withTaskCancellationHandler {
            try await body(connection)
        } onCancel: {
            Task { try? await connection.close() }
        }
    }

    /// Closes the idle connections, and each busy one when its call ends.
    func close() {
        let (idle, waiters) = state.withLock { s in
            s.closed = true
            defer {
                s.idle = []
                s.waiters = []
            }
            return (s.idle, s.waiters)
        }
        for c in idle { Task { try? await c.close() } }
        for w in waiters { w.continuation.resume() }
    }

    private enum Next {
        case use(PostgresConnection)
        case connect
        case wait
        case closed
    }

    private func acquire() async throws -> PostgresConnection {
        while true {
            let next = state.withLock { s -> Next in
                if s.closed { return .closed }
                while let c = s.idle.popLast() {
                    if !c.isClosed { return .use(c) }
                    s.open -= 1
                }
                if s.open < maximum {
                    s.open += 1
                    return .connect
                }
                return .wait
            }
            switch next {
            case .use(let c):
                return c
            case .closed:
                throw PostgresLedgerError("the ledger was closed")
            case .connect:
                do {
                    return try await PostgresConnection.connect(
                        configuration: try configuration(), id: nextID.add(1, ordering: .relaxed).newValue,
                        logger: logger)
                } catch {
                    freeSlot()
                    throw error
                }
            case .wait:
                try await waitForSlot()
            }
        }
    }

    /// Waits until a connection is returned or a slot frees; throws when the task is cancelled meanwhile.
    private func waitForSlot() async throws {
        let id = nextID.add(1, ordering: .relaxed).newValue
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let now = state.withLock { s -> Bool in
                    if s.closed || !s.idle.isEmpty || s.open < maximum || Task.isCancelled { return true }
                    s.waiters.append((id, continuation))
                    return false
                }
                if now { continuation.resume() }
            }
        } onCancel: {
            let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
                guard let i = s.waiters.firstIndex(where: { $0.id == id }) else { return nil }
                return s.waiters.remove(at: i).continuation
            }
            waiter?.resume()
        }
        try Task.checkCancellation()
    }

    private func release(_ connection: PostgresConnection) {
        let (waiter, close) = state.withLock { s -> (CheckedContinuation<Void, Never>?, Bool) in
            let keep = !connection.isClosed && !s.closed
            if keep { s.idle.append(connection) } else { s.open -= 1 }
            return (s.waiters.isEmpty ? nil : s.waiters.removeFirst().continuation, !keep && !connection.isClosed)
        }
        if close { Task { try? await connection.close() } }
        waiter?.resume()
    }

    private func freeSlot() {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            s.open -= 1
            return s.waiters.isEmpty ? nil : s.waiters.removeFirst().continuation
        }
        waiter?.resume()
    }
}
