import ChoreoAMQP
import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A URL that reaches something other than a plain AMQP 0-9-1 broker fails with what is there instead, not with
/// "wrong password" or "invalid AMQP data". The TLS cases, against the real broker's two ports, are in TLSTests.
@Suite("connecting to a server that is not an AMQP 0-9-1 broker", .timeLimit(.minutes(1)))
struct ConnectDiagnosisTests {
    struct Case: CustomTestStringConvertible, Sendable {
        let name: String
        let reply: [UInt8]
        let holdOpen: Bool
        let expected: @Sendable (_ port: Int) -> String
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(
            name: "an HTTP server", reply: Array("HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n".utf8),
            holdOpen: false,
            expected: {
                "the server at 127.0.0.1:\($0) does not speak AMQP 0-9-1: it answered 'HTTP/1.1 400 Bad Request' "
                    + "(is \($0) the broker's AMQP port? RabbitMQ's is 5672, or 5671 for amqps://)"
            }),
        Case(
            name: "an AMQP 1.0 broker", reply: [0x41, 0x4D, 0x51, 0x50, 0, 1, 0, 0], holdOpen: false,
            expected: {
                "the server at 127.0.0.1:\($0) speaks AMQP 1.0.0, not 0-9-1: Choreo needs RabbitMQ or another AMQP "
                    + "0-9-1 broker"
            }),
        Case(
            name: "a server that closes at once", reply: [], holdOpen: false,
            expected: {
                "the server at 127.0.0.1:\($0) does not speak AMQP 0-9-1: it closed the connection without a broker's "
                    + "greeting (is \($0) the broker's AMQP port? RabbitMQ's is 5672, or 5671 for amqps://)"
            }),
        Case(
            name: "a server that says nothing", reply: [], holdOpen: true,
            expected: {
                "no AMQP 0-9-1 greeting from the server at 127.0.0.1:\($0) within 1.0 seconds (is \($0) the broker's "
                    + "AMQP port? RabbitMQ's is 5672, or 5671 for amqps://)"
            }),
    ]

    @Test("the failure names what answered instead of a broker, within a bounded time", arguments: cases)
    func notABroker(_ c: Case) async throws {
        let server = try FakeServer(reply: c.reply, holdOpen: c.holdOpen)
        defer { server.stop() }
        var config = try AMQPConfiguration(url: "amqp://guest:a-password@127.0.0.1:\(server.port)/")
        config.connectTimeout = .seconds(1)
        let started = ContinuousClock.now
        let error = await #expect(throws: AMQPError.self) { try await AMQPConnection.connect(to: config) }
        // The login's wait (1 s at most) and the diagnosis' (as long again at most), with room for a slow machine.
        #expect(ContinuousClock.now - started < .seconds(5))
        #expect(error?.code == .connectionFailed)
        #expect(error?.description == "connect 127.0.0.1:\(server.port) failed: \(c.expected(server.port))")
        #expect(error?.description.contains("a-password") == false)
        #expect(server.connections >= 1)
    }
}

/// A TCP server on a free loopback port that answers every connection's first bytes with `reply`, then closes
/// it, or keeps it open until ``stop()`` when `holdOpen`.
final class FakeServer: @unchecked Sendable {
    let port: Int
    private let listener: Int32
    private let lock = NSLock()
    private var stopped = false
    private var accepted: [Int32] = []
    private var count = 0
    private let done = DispatchSemaphore(value: 0)

    var connections: Int { lock.withLock { count } }

    init(reply: [UInt8], holdOpen: Bool) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                bind(fd, pointer, length) == 0 && listen(fd, 8) == 0 && getsockname(fd, pointer, &length) == 0
            }
        }
        guard fd >= 0, bound else {
            if fd >= 0 { close(fd) }
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
        listener = fd
        port = Int(UInt16(bigEndian: address.sin_port))
        let thread = Thread { [self] in
            serve(reply: reply, holdOpen: holdOpen)
            done.signal()
        }
        thread.start()
    }

    private func serve(reply: [UInt8], holdOpen: Bool) {
        while !lock.withLock({ stopped }) {
            var pfd = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, 50) > 0 else { continue }
            let connection = accept(listener, nil, nil)
            guard connection >= 0 else { continue }
            lock.withLock {
                count += 1
                accepted.append(connection)
            }
            // The client's protocol header comes first, as a broker would wait for it.
            var header = [UInt8](repeating: 0, count: 8)
            var client = pollfd(fd: connection, events: Int16(POLLIN), revents: 0)
            if poll(&client, 1, 2000) > 0 { _ = recv(connection, &header, header.count, 0) }
            if !reply.isEmpty {
                _ = reply.withUnsafeBytes { send(connection, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            }
            if !holdOpen {
                shutdown(connection, Int32(SHUT_RDWR))
            }
        }
    }

    func stop() {
        lock.withLock { stopped = true }
        done.wait()
        lock.withLock {
            for fd in accepted { close(fd) }
            accepted = []
        }
        close(listener)
    }
}
