import ChoreoAMQP
import Foundation
import Testing

/// The broker the integration tests run against: `CHOREO_TEST_URL`, started by `scripts/test.sh`.
enum TestBroker {
    static var url: String {
        ProcessInfo.processInfo.environment["CHOREO_TEST_URL"] ?? "amqp://guest:guest@127.0.0.1:5673/"
    }

    static var configuration: AMQPConfiguration {
        get throws { try AMQPConfiguration(url: url) }
    }

    static func connect(heartbeat: Duration? = nil) async throws -> AMQPConnection {
        var config = try configuration
        if let heartbeat { config.heartbeat = heartbeat }
        do {
            return try await AMQPConnection.connect(to: config)
        } catch {
            Issue.record(
                "the test broker at \(config) is not reachable (run scripts/test.sh, which starts it): \(error)")
            throw error
        }
    }

    /// Runs `rabbitmqctl` against the test broker through scripts/broker.sh.
    static func ctl(_ args: String...) throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let p = Process()
        p.executableURL = root.appendingPathComponent("scripts/broker.sh")
        p.arguments = ["ctl", ProcessInfo.processInfo.environment["CHOREO_TEST_BROKER_NAME"] ?? "choreo-test"] + args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw AMQPError(
                .protocolFailure, message: "exit \(p.terminationStatus)", operation: "broker.sh ctl \(args)")
        }
    }

    static func uniqueName(_ prefix: String) -> String {
        "test.\(prefix).\(UUID().uuidString.prefix(8).lowercased())"
    }

    /// A channel on `connection` with publisher confirms on, and a new exclusive queue named from `prefix`.
    static func confirmingChannel(on connection: AMQPConnection, queue prefix: String) async throws -> (
        channel: AMQPChannel, queue: String
    ) {
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let queue = uniqueName(prefix)
        try await channel.declareQueue(queue, options: QueueOptions(durable: false, exclusive: true))
        return (channel, queue)
    }
}

extension AMQPOutgoingMessage {
    static func toQueue(_ queue: String, _ text: String, headers: AMQPTable? = nil) -> AMQPOutgoingMessage {
        AMQPOutgoingMessage(
            exchange: "", routingKey: queue, body: Data(text.utf8),
            properties: AMQPProperties(headers: headers, deliveryMode: 2))
    }
}

/// Takes the next delivery or fails the test after a generous bound instead of hanging.
func nextDelivery(_ iterator: inout AMQPConsumer.AsyncIterator, within seconds: Double = 10) async throws
    -> AMQPDelivery
{
    let box = IteratorBox(iterator)
    let delivery = try await withThrowingTaskGroup(of: AMQPDelivery?.self) { group in
        group.addTask { try await box.next() }
        group.addTask {
            try await Task.sleep(for: .seconds(seconds))
            return nil
        }
        let first = try await group.next()!
        group.cancelAll()
        return first
    }
    iterator = box.iterator
    guard let delivery else {
        throw AMQPError(.timeout, message: "no delivery within \(seconds) s", operation: "test consume")
    }
    return delivery
}

private final class IteratorBox: @unchecked Sendable {
    var iterator: AMQPConsumer.AsyncIterator
    init(_ iterator: AMQPConsumer.AsyncIterator) { self.iterator = iterator }
    func next() async throws -> AMQPDelivery? { try await iterator.next() }
}
