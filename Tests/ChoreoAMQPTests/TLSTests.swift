import ChoreoAMQP
import Foundation
import Testing

/// amqps:// against the test broker's TLS listener, whose throw-away CA scripts/broker.sh creates.
@Suite("TLS against a real broker", .serialized, .timeLimit(.minutes(1)))
struct TLSTests {
    static var port: String { ProcessInfo.processInfo.environment["CHOREO_TEST_TLS_PORT"] ?? "6673" }
    static var ca: String {
        ProcessInfo.processInfo.environment["CHOREO_TEST_TLS_CA"] ?? "/tmp/choreo-brokers/choreo-test/tls/ca.pem"
    }

    @Test("amqps with the broker's CA verifies peer and host name, and carries messages")
    func verifiedRoundTrip() async throws {
        let config = try AMQPConfiguration(url: "amqps://guest:guest@localhost:\(Self.port)/?cacertfile=\(Self.ca)")
        #expect(config.tls?.verifyPeer == true && config.tls?.verifyHostname == true)
        let connection = try await AMQPConnection.connect(to: config)
        defer { Task { await connection.close() } }
        let (channel, queue) = try await TestBroker.confirmingChannel(on: connection, queue: "tls")
        try await channel.publish(.toQueue(queue, "over TLS"))
        let consumer = try await channel.consume(queue: queue)
        var iterator = consumer.makeAsyncIterator()
        let delivery = try await nextDelivery(&iterator)
        #expect(String(decoding: delivery.body, as: UTF8.self) == "over TLS")
        try delivery.ack()
    }

    @Test("a certificate for another host name is refused")
    func hostnameMismatch() async throws {
        // The server certificate names localhost only; 127.0.0.1 does not match it.
        let config = try AMQPConfiguration(url: "amqps://guest:guest@127.0.0.1:\(Self.port)/?cacertfile=\(Self.ca)")
        let error = await #expect(throws: AMQPError.self) { try await AMQPConnection.connect(to: config) }
        #expect(error?.code == .connectionFailed)
        #expect(
            error?.message
                == "TLS handshake failed: the broker's certificate does not name host '127.0.0.1' (connect by a name it holds)"
        )
    }

    @Test("a server whose CA is not trusted is refused")
    func untrustedCA() async throws {
        // The system's CA bundle does not know the test broker's throw-away CA.
        let bundle = ["/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem"].first {
            FileManager.default.fileExists(atPath: $0)
        }
        let config = try AMQPConfiguration(
            url: "amqps://guest:guest@localhost:\(Self.port)/" + (bundle.map { "?cacertfile=\($0)" } ?? ""))
        let error = await #expect(throws: AMQPError.self) { try await AMQPConnection.connect(to: config) }
        #expect(error?.code == .connectionFailed)
        #expect(
            error?.message
                == "TLS handshake failed: the broker's certificate is not signed by a CA this client trusts (name the "
                + "broker's CA with ?cacertfile=PATH)")
    }

    @Test("amqp:// to the TLS port says to use amqps://, not that the password is wrong")
    func plainToTLSPort() async throws {
        let config = try AMQPConfiguration(url: "amqp://guest:guest@127.0.0.1:\(Self.port)/")
        let error = await #expect(throws: AMQPError.self) { try await AMQPConnection.connect(to: config) }
        #expect(error?.code == .connectionFailed)
        #expect(
            error?.description
                == "connect 127.0.0.1:\(Self.port) failed: the server at 127.0.0.1:\(Self.port) speaks TLS: connect with amqps://"
        )
    }

    @Test("amqps:// to the plain port says the port is not TLS")
    func tlsToPlainPort() async throws {
        let plain = try TestBroker.configuration
        let config = try AMQPConfiguration(url: "amqps://guest:guest@localhost:\(plain.port)/?cacertfile=\(Self.ca)")
        let error = await #expect(throws: AMQPError.self) { try await AMQPConnection.connect(to: config) }
        #expect(error?.code == .connectionFailed)
        let message = error?.message ?? ""
        #expect(message.hasPrefix("TLS handshake failed: "), "\(message)")
        #expect(
            message.hasSuffix(
                "; port \(plain.port) is a plain AMQP port, not TLS: use amqp://, or the broker's TLS port"),
            "\(message)")
    }

    @Test("verify_none connects without checking the certificate")
    func verifyNone() async throws {
        let config = try AMQPConfiguration(url: "amqps://guest:guest@127.0.0.1:\(Self.port)/?verify=verify_none")
        #expect(config.tls?.verifyPeer == false && config.tls?.verifyHostname == false)
        let connection = try await AMQPConnection.connect(to: config)
        #expect(connection.isOpen)
        await connection.close()
    }
}
