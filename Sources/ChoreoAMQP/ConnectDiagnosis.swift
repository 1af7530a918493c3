import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Finds out why a TCP connect failed, in words a person can act on ("connection refused").
///
/// rabbitmq-c reports only "a socket error occurred"; after such a failure one plain connect with the
/// same timeout recovers the operating system's reason. Runs only on the failure path.
enum ConnectDiagnosis {
    static func reason(host: String, port: Int, timeout: Duration) -> String? {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        if rc != 0 {
            return "cannot resolve host '\(host)': \(String(cString: gai_strerror(rc)))"
        }
        defer { freeaddrinfo(list) }
        var lastReason: String?
        var entry = list
        while let ai = entry {
            entry = ai.pointee.ai_next
            let fd = socket(
                ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_NONBLOCK.rawValue), ai.pointee.ai_protocol)
            if fd < 0 { continue }
            defer { close(fd) }
            if connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 { return nil }
            if errno != EINPROGRESS {
                lastReason = String(cString: strerror(errno)).lowercased()
                continue
            }
            var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            let ms = Int32(
                clamping: timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
            let ready = poll(&pfd, 1, ms)
            if ready == 0 {
                lastReason = "timed out after \(timeout)"
                continue
            }
            var soError: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &len)
            if soError == 0 { return nil }
            lastReason = String(cString: strerror(soError)).lowercased()
        }
        return lastReason
    }
}
