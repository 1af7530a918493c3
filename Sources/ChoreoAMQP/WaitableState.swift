import Synchronization

/// State behind a lock, with at most one task waiting until it meets a condition.
///
/// ``update(_:)`` wakes the waiter when its condition holds after the change; a waiter whose task is
/// cancelled returns at once (and a cancel that came before it started waiting is seen under the lock,
/// so it never sleeps unnoticed). Used by the consumer's delivery buffer and the runner's in-flight count.
package final class WaitableState<State: Sendable>: Sendable {
    private struct Guarded {
        var state: State
        var waiter: UnsafeContinuation<Void, Never>?
        var condition: (@Sendable (State) -> Bool)?
    }

    private let guarded: Mutex<Guarded>

    package init(_ state: State) {
        guarded = Mutex(Guarded(state: state))
    }

    /// Reads or changes the state without waking the waiter.
    package func withLock<R>(_ body: (inout State) -> R) -> R {
        guarded.withLock { body(&$0.state) }
    }

    /// Changes the state and wakes the waiter if its condition now holds.
    package func update<R>(_ body: (inout State) -> R) -> R {
        let (result, waiter) = guarded.withLock { g -> (R, UnsafeContinuation<Void, Never>?) in
            let result = body(&g.state)
            guard let condition = g.condition, g.waiter != nil, condition(g.state) else { return (result, nil) }
            defer {
                g.waiter = nil
                g.condition = nil
            }
            return (result, g.waiter)
        }
        waiter?.resume()
        return result
    }

    /// Returns when `condition` holds, or when the calling task is cancelled. One waiter at a time.
    package func wait(until condition: @escaping @Sendable (State) -> Bool) async {
        await withTaskCancellationHandler {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
                let ready = guarded.withLock { g -> Bool in
                    if Task.isCancelled || condition(g.state) { return true }
                    g.waiter = continuation
                    g.condition = condition
                    return false
                }
                if ready { continuation.resume() }
            }
        } onCancel: {
            let waiter = guarded.withLock { g -> UnsafeContinuation<Void, Never>? in
                defer {
                    g.waiter = nil
                    g.condition = nil
                }
                return g.waiter
            }
            waiter?.resume()
        }
    }
}
