import Foundation
import GRDB
import GRDBSQLite
import Synchronization

/// Copies the ledger's write-ahead log back into the database file on a thread and a connection of its own,
/// so that no commit waits for it, and starts the log over at every pass.
///
/// SQLite's own automatic checkpoint runs inside the commit that crosses its threshold: at 8,000 pages
/// that commit took 27-31 ms here (most of it syncing the log), on the thread that also reads the
/// consumer's socket, and every event behind it in the hop waited too. Here the writer's connection
/// only counts: its WAL hook (called after every commit with the log's length in pages) wakes this
/// thread when ``Limits/pass`` pages were added since the last pass.
///
/// A pass is passive checkpoints, which never block the writer, until the log is copied to its end or
/// nearly (three at most: commits slip in meanwhile), then a restart checkpoint, which makes commits wait
/// while it copies the last few pages (a millisecond or two) and lets the writer's next commit start the
/// log over from the beginning of the file. The restart waits 20 ms at most for a gap between commits,
/// else it is tried again at the next pass. Passive passes alone do not get there under a steady stream:
/// at 200 events/s a hop commits every 2.5 ms, and every pass syncs the disk for longer than that. When
/// only a log of 16,000 pages (64 MB) was restarted, every commit until then appended to the file (the
/// first 16 s at 200 events/s, a short-lived process's whole life), and the file stayed 64 MB. Appending
/// costs the writer about twice what rewriting does (the kernel allocates, zeroes and charges a new
/// page-cache page and reserves a block for each page written past the end; `cold_append.c` in
/// Benchmarks/Diagnostics: four frames 60 against 33 µs after a 5 ms sleep). Started over at every pass,
/// the log is rewritten in pages the system holds already from the first pass on, as with SQLite's own
/// checkpoints, and the file stays about a pass long.
///
/// Should this thread fail or fall behind, the writer checkpoints inline at ``Limits/inline`` pages, as
/// SQLite would: the log stays bounded whatever happens here.
final class WALCheckpointer: Sendable {
    struct Limits: Sendable {
        /// Pages added to the log since the last pass that start the next one.
        var pass: Int
        /// Pages in the log at which the writer checkpoints inline.
        var inline: Int

        static let standard = Limits(pass: 4_000, inline: 32_000)
    }

    let limits: Limits
    private let connection: DatabaseQueue
    private let queue = DispatchQueue(label: "choreo.ledger.checkpoint")
    private struct State {
        /// A pass is queued or running.
        var running = false
        /// The log's length in pages after the last commit, and how much of it the last pass copied.
        var logged = 0
        var copied = 0

        /// Whether the log holds `pass` pages more than were copied (a log shorter than that was started over).
        mutating func due(_ pass: Int) -> Bool {
            if logged < copied { copied = 0 }
            return logged - copied >= pass
        }
    }

    private let state = Mutex(State())
    /// Passes run, and passes that failed (other than finding the file busy), for tests.
    let passes = Atomic(0)
    let failures = Atomic(0)

    /// A pass is queued or running.
    var isRunning: Bool { state.withLock { $0.running } }

    /// Opens the checkpoint connection; call ``attach(to:)`` on the writer's connection to start.
    init(path: String, configuration: Configuration, limits: Limits) throws {
        self.limits = limits
        // Waits for a lock (the restart's, for a gap between the writer's commits) in steps of 0.2 ms, for
        // 20 ms at most: a restart that finds none is tried again at the next pass. SQLite's own timeout
        // sleeps 1, 2, 5 ... 100 ms between tries, and behind a busy writer the log grew meanwhile (a test's
        // held 4,173 pages where 200 start a pass); never waiting, it missed the gaps of a backlog (800 to
        // 2,200 pages).
        var own = configuration
        own.busyMode = .callback { tries in
            usleep(200)
            return tries < 100
        }
        connection = try DatabaseQueue(path: path, configuration: own)
    }

    /// Installs the WAL hook on the writer's connection. Replaces SQLite's automatic checkpoint (which is
    /// itself a WAL hook). `self` must outlive the connection's commits: its owner keeps both.
    func attach(to writer: Database) {
        let context = Unmanaged.passUnretained(self).toOpaque()
        sqlite3_wal_hook(
            writer.sqliteConnection,
            { context, db, _, pages in
                guard let context else { return SQLITE_OK }
                let checkpointer = Unmanaged<WALCheckpointer>.fromOpaque(context).takeUnretainedValue()
                checkpointer.committed(logPages: Int(pages), writer: db)
                return SQLITE_OK
            }, context)
    }

    /// On the writer's thread, after a commit.
    private func committed(logPages: Int, writer: OpaquePointer?) {
        if logPages >= limits.inline {
            // This thread is failing or far behind: copy inline rather than let the log grow.
            sqlite3_wal_checkpoint_v2(writer, nil, SQLITE_CHECKPOINT_PASSIVE, nil, nil)
            return
        }
        let start = state.withLock { s -> Bool in
            s.logged = logPages
            guard !s.running, s.due(limits.pass) else { return false }
            s.running = true
            return true
        }
        if start { queue.async { self.pass() } }
    }

    private func pass() {
        var copied = state.withLock { $0.copied }
        var restarted = false
        var busy = false
        var failed = false
        do {
            try connection.writeWithoutTransaction { db in
                // Again while commits slip in during a pass, up to three times (each is shorter).
                for _ in 0..<3 {
                    let result = try db.checkpoint(.passive)
                    copied = result.checkpointedFrameCount
                    if result.checkpointedFrameCount >= result.walFrameCount { break }
                }
                do {
                    try db.checkpoint(.restart)
                    restarted = true
                } catch let error as DatabaseError where error.resultCode == .SQLITE_BUSY {
                    // A commit or a read was under way: the log goes on from where it is until the next pass.
                }
            }
        } catch let error as DatabaseError where error.resultCode == .SQLITE_BUSY {
            // Another connection held a lock the checkpoint needs, for a moment (a single process uses the file).
            busy = true
        } catch {
            // I/O trouble: the next commit asks for another pass, and the inline limit bounds the log.
            failed = true
            failures.add(1, ordering: .relaxed)
        }
        passes.add(1, ordering: .relaxed)
        let next = state.withLock { s -> DispatchTime? in
            if restarted {
                // The next commit starts the log over, and its hook tells the new length.
                s.copied = 0
                s.logged = 0
            } else {
                s.copied = copied
            }
            if busy { return .now() + .milliseconds(10) }
            // Commits during the pass added a pass's worth of pages: copy them now, not at the next commit.
            if !failed, s.due(limits.pass) { return .now() }
            s.running = false
            return nil
        }
        if let next { queue.asyncAfter(deadline: next) { self.pass() } }
    }
}
