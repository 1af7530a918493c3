import ChoreoAMQP
import Testing

@Suite("AMQP URLs and configuration")
struct ConfigurationTests {
    @Test("a full URL is percent-decoded")
    func fullURL() throws {
        let c = try AMQPConfiguration(url: "amqp://us%40er:p%3Ass@broker.example:5673/my%2fvhost?heartbeat=5&name=svc")
        #expect(c.username == "us@er")
        #expect(c.password == "p:ss")
        #expect(c.host == "broker.example")
        #expect(c.port == 5673)
        #expect(c.virtualHost == "my/vhost")
        #expect(c.heartbeat == .seconds(5))
        #expect(c.connectionName == "svc")
        #expect(c.tls == nil)
        #expect(!c.description.contains("p:ss"))
    }

    @Test("defaults: vhost /, port by scheme, TLS verification on")
    func defaults() throws {
        let plain = try AMQPConfiguration(url: "amqp://localhost")
        #expect(plain.port == 5672 && plain.virtualHost == "/" && plain.username == "guest")
        let tls = try AMQPConfiguration(url: "amqps://[::1]/?cacertfile=/etc/ca.pem")
        #expect(tls.port == 5671 && tls.host == "::1")
        #expect(tls.tls == AMQPConfiguration.TLS(caFile: "/etc/ca.pem", verifyPeer: true, verifyHostname: true))
        #expect(tls.address == "[::1]:5671")
    }

    @Test("bad URLs are clear errors with the password masked")
    func badURLs() {
        let e1 = #expect(throws: AMQPError.self) { try AMQPConfiguration(url: "http://u:secret@h") }
        #expect(e1?.description == "parse URL http://u:***@h failed: unsupported scheme 'http', expected amqp or amqps")
        let e2 = #expect(throws: AMQPError.self) { try AMQPConfiguration(url: "amqp://u:secret@h:99999") }
        #expect(e2?.description == "parse URL amqp://u:***@h:99999 failed: port must be 1 to 65535")
        let e3 = #expect(throws: AMQPError.self) { try AMQPConfiguration(url: "amqp://h?cacertfile=x") }
        #expect(e3?.message == "'cacertfile' needs an amqps:// URL")
    }

    @Test("redaction hides only the password")
    func redaction() {
        #expect(AMQPConfiguration.redact(url: "amqp://user:pw@host:5672/v") == "amqp://user:***@host:5672/v")
        #expect(AMQPConfiguration.redact(url: "amqp://host/v") == "amqp://host/v")
    }
}
