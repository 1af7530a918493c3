import ArgumentParser
import CRabbitMQBaseline
import ChoreoAMQP
import Foundation

/// Publish-with-confirms and consume-with-ack throughput of ChoreoAMQP against rabbitmq-c itself.
///
/// Each round runs both implementations on fresh quorum queues with the same message size, confirm
/// batch and prefetch, alternating which goes first; the medians and their ratio are printed.
@main
struct AMQPBenchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "amqp-benchmark",
        abstract: "Compare ChoreoAMQP's publish and consume rates with raw rabbitmq-c (run in release mode).")

    @Option(help: "Broker URL (the password is never printed).")
    var url = ProcessInfo.processInfo.environment["CHOREO_URL"] ?? "amqp://guest:guest@127.0.0.1:5675/"
    @Option(help: "Messages per run.")
    var count = 50_000
    @Option(help: "Body size in bytes.")
    var size = 1024
    @Option(help: "Publishes per confirm batch.")
    var batch = 100
    @Option(help: "Consumer prefetch.")
    var prefetch: UInt16 = 200
    @Option(help: "Rounds; the median is reported.")
    var rounds = 3

    func run() async throws {
        let config = try AMQPConfiguration(url: url)
        print(
            "amqp-benchmark: \(count) x \(size) B persistent messages, quorum queue, confirm batch \(batch), prefetch \(prefetch), \(rounds) rounds"
        )
        print("broker \(config), \(ProcessInfo.processInfo.activeProcessorCount) cores")
        var results: [String: [Double]] = [:]
        let admin = try await AMQPConnection.connect(to: config)
        let channel = try await admin.openChannel()
        for round in 1...rounds {
            let cQueue = "bench.c.\(round).\(UUID().uuidString.prefix(6))"
            let swiftQueue = "bench.swift.\(round).\(UUID().uuidString.prefix(6))"
            for q in [cQueue, swiftQueue] { try await channel.declareQueue(q, options: .quorum()) }
            let swiftFirst = round % 2 == 0
            for step in swiftFirst ? ["swift", "c"] : ["c", "swift"] {
                let rate =
                    step == "c" ? try await baselinePublish(config, cQueue) : try await swiftPublish(config, swiftQueue)
                results["publish.\(step)", default: []].append(rate)
            }
            for step in swiftFirst ? ["swift", "c"] : ["c", "swift"] {
                let rate =
                    step == "c" ? try await baselineConsume(config, cQueue) : try await swiftConsume(config, swiftQueue)
                results["consume.\(step)", default: []].append(rate)
            }
            for q in [cQueue, swiftQueue] { try await channel.deleteQueue(q) }
            print(
                String(
                    format: "round %d: publish c %.0f swift %.0f msg/s; consume c %.0f swift %.0f msg/s", round,
                    results["publish.c"]!.last!, results["publish.swift"]!.last!,
                    results["consume.c"]!.last!, results["consume.swift"]!.last!))
        }
        await admin.close()
        func median(_ key: String) -> Double { let v = results[key]!.sorted(); return v[v.count / 2] }
        let pc = median("publish.c"), ps = median("publish.swift"), cc = median("consume.c"),
            cs = median("consume.swift")
        print(
            String(
                format: "publish with confirms: rabbitmq-c %.0f msg/s, ChoreoAMQP %.0f msg/s, ratio %.2f", pc, ps,
                ps / pc))
        print(
            String(
                format: "consume with ack:      rabbitmq-c %.0f msg/s, ChoreoAMQP %.0f msg/s, ratio %.2f", cc, cs,
                cs / cc))
    }

    private func swiftPublish(_ config: AMQPConfiguration, _ queue: String) async throws -> Double {
        let connection = try await AMQPConnection.connect(to: config)
        let channel = try await connection.openChannel()
        try await channel.enableConfirms()
        let body = Data(repeating: UInt8(ascii: "x"), count: size)
        let message = AMQPOutgoingMessage(
            exchange: "", routingKey: queue, body: body,
            properties: AMQPProperties(contentType: "application/octet-stream", deliveryMode: 2))
        let start = ContinuousClock.now
        var sent = 0
        while sent < count {
            let n = min(batch, count - sent)
            for result in await channel.publish(contentsOf: Array(repeating: message, count: n)) { try result.get() }
            sent += n
        }
        let elapsed = ContinuousClock.now - start
        await connection.close()
        return Double(count) / elapsed.seconds
    }

    private func swiftConsume(_ config: AMQPConfiguration, _ queue: String) async throws -> Double {
        let connection = try await AMQPConnection.connect(to: config)
        let channel = try await connection.openChannel()
        try await channel.setPrefetch(prefetch)
        let start = ContinuousClock.now
        let consumer = try await channel.consume(queue: queue)
        var received = 0
        for try await delivery in consumer {
            try delivery.ack()
            received += 1
            if received == count { break }
        }
        let elapsed = ContinuousClock.now - start
        await connection.close()
        return Double(count) / elapsed.seconds
    }

    private func baselinePublish(_ config: AMQPConfiguration, _ queue: String) async throws -> Double {
        let (count, size, batch) = (self.count, self.size, self.batch)
        return try await onThread { error in
            choreo_baseline_publish(
                config.host, Int32(config.port), config.username, config.password, queue,
                Int32(count), Int32(size), Int32(batch), error, 512)
        }
    }

    private func baselineConsume(_ config: AMQPConfiguration, _ queue: String) async throws -> Double {
        let (count, prefetch) = (self.count, self.prefetch)
        return try await onThread { error in
            choreo_baseline_consume(
                config.host, Int32(config.port), config.username, config.password, queue,
                Int32(count), Int32(prefetch), error, 512)
        }
    }

    /// Runs a blocking C benchmark on its own thread, off the cooperative pool.
    private func onThread(_ body: @escaping @Sendable (UnsafeMutablePointer<CChar>) -> Double) async throws -> Double {
        let rate = await withCheckedContinuation { continuation in
            Thread {
                let error = UnsafeMutablePointer<CChar>.allocate(capacity: 512)
                error.initialize(repeating: 0, count: 512)
                let rate = body(error)
                let message = String(cString: error)
                error.deallocate()
                continuation.resume(returning: rate < 0 ? -1 : rate)
                if rate < 0 { FileHandle.standardError.write(Data("baseline failed: \(message)\n".utf8)) }
            }.start()
        }
        guard rate > 0 else { throw ValidationError("the rabbitmq-c baseline failed") }
        return rate
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
