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
        switch connect(host: host, port: port, timeout: timeout) {
        case .connected(let fd):
            close(fd)
            return nil
        case .failed(let reason): return reason
        }
    }

    enum Connection {
        case connected(Int32)
        /// The reason, when the system gave one.
        case failed(String?)
    }

    /// A TCP connection, non-blocking, to the first of the host's addresses that takes one within `timeout`;
    /// else the operating system's reason for the last failure. The caller closes the socket.
    static func connect(host: String, port: Int, timeout: Duration) -> Connection {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        if rc != 0 {
            return .failed("cannot resolve host '\(host)': \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(list) }
        var lastReason: String?
        var entry = list
        while let ai = entry {
            entry = ai.pointee.ai_next
            let fd = socket(
                ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_NONBLOCK.rawValue), ai.pointee.ai_protocol)
            if fd < 0 { continue }
            if Glibc.connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 { return .connected(fd) }
            if errno != EINPROGRESS {
                lastReason = String(cString: strerror(errno)).lowercased()
                close(fd)
                continue
            }
            var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            if poll(&pfd, 1, milliseconds(timeout)) == 0 {
                lastReason = "timed out after \(timeout)"
                close(fd)
                continue
            }
            var soError: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &len)
            if soError == 0 { return .connected(fd) }
            lastReason = String(cString: strerror(soError)).lowercased()
            close(fd)
        }
        return .failed(lastReason)
    }

    /// `d` in whole milliseconds for `poll`, at least 1 for a positive duration.
    static func milliseconds(_ d: Duration) -> Int32 {
        let ms = Int32(clamping: d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000)
        return d > .zero ? max(ms, 1) : 0
    }
}

extension ConnectDiagnosis {
    /// What a server answers to the AMQP 0-9-1 protocol header, asked on a connection of its own after a
    /// connection failed before the broker's greeting (`connection.start`): tells a TLS port, another protocol
    /// or another AMQP apart from a broker that refused the login.
    enum Greeting: Equatable {
        /// `connection.start`: a plain AMQP 0-9-1 listener.
        case amqp091
        /// The protocol header of another AMQP version, e.g. "1.0.0".
        case otherAMQP(String)
        /// A TLS record (the alert a TLS listener sends for bytes that are not a handshake).
        case tls
        /// The first line of a reply in text, e.g. "HTTP/1.1 400 Bad Request".
        case text(String)
        /// Bytes that are none of the above.
        case unknown
        /// Closed without a byte.
        case closed
        /// Nothing within the time.
        case silent
        /// No connection now.
        case unreachable
    }

    static func greeting(host: String, port: Int, timeout: Duration) -> Greeting {
        guard case .connected(let fd) = connect(host: host, port: port, timeout: timeout) else { return .unreachable }
        defer { close(fd) }
        let deadline = ContinuousClock.now + timeout
        func wait(for events: Int32, atMost limit: Duration? = nil) -> Bool {
            var left = deadline - .now
            if let limit { left = min(left, limit) }
            guard left > .zero else { return false }
            var pfd = pollfd(fd: fd, events: Int16(events), revents: 0)
            return poll(&pfd, 1, milliseconds(left)) > 0
        }
        let header: [UInt8] = [0x41, 0x4D, 0x51, 0x50, 0, 0, 9, 1]  // "AMQP" 0-9-1
        guard header.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == header.count
        else { return .closed }
        var reply = [UInt8](repeating: 0, count: 256)
        var count = 0
        // The first bytes may take the whole time; the rest of a reply comes at once or not at all.
        while count < 8, wait(for: Int32(POLLIN), atMost: count == 0 ? nil : .milliseconds(200)) {
            let n = reply.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + count, $0.count - count, 0) }
            if n <= 0 { break }
            count += n
        }
        return classify(Array(reply[..<count]), silent: count == 0 && ContinuousClock.now >= deadline)
    }

    /// Names the protocol of a reply to the AMQP 0-9-1 header.
    static func classify(_ reply: [UInt8], silent: Bool) -> Greeting {
        if reply.isEmpty { return silent ? .silent : .closed }
        // A method frame on channel 0: type 1, channel 0 0.
        if reply.count >= 3, reply[0] == 1, reply[1] == 0, reply[2] == 0 { return .amqp091 }
        if reply.count >= 8, reply.starts(with: Array("AMQP".utf8)) {
            let (major, minor, revision) = (reply[5], reply[6], reply[7])
            return .otherAMQP(major == 0 ? "\(major)-\(minor)-\(revision)" : "\(major).\(minor).\(revision)")
        }
        // A TLS record: content type 20-23 (an alert is 21), then the major version 3.
        if reply.count >= 2, (20...23).contains(reply[0]), reply[1] == 3 { return .tls }
        let line = reply.prefix { $0 != 0x0D && $0 != 0x0A }
        if !line.isEmpty, line.allSatisfy({ (0x20...0x7E).contains($0) }) {
            return .text(String(decoding: line.prefix(80), as: UTF8.self))
        }
        return .unknown
    }
}
