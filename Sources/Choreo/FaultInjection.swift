#if DEBUG
    import Foundation
    #if canImport(Glibc)
        import Glibc
    #endif
#endif

/// Crash points between the steps of the delivery protocol, compiled into debug builds only.
///
/// With `CHOREO_FAULT_POINT=<point>` and `CHOREO_FAULT_MARKER=<file>`, the process kills itself with
/// SIGKILL the first time it reaches that point (it creates the marker file first, so the restarted
/// process goes on). The crash tests use this to prove that no step boundary loses or doubles anything.
package enum FaultInjection {
    package static let points = [
        "after-claim", "after-handler", "after-commit", "after-publish", "before-ack", "after-ack",
    ]

    package static func reached(_ point: String) {
        #if DEBUG
            let env = ProcessInfo.processInfo.environment
            guard env["CHOREO_FAULT_POINT"] == point, let marker = env["CHOREO_FAULT_MARKER"] else { return }
            let fd = open(marker, O_CREAT | O_EXCL | O_WRONLY, 0o644)
            guard fd >= 0 else { return }  // already crashed once here
            close(fd)
            kill(getpid(), SIGKILL)
        #endif
    }
}
