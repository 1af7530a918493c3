import ChoreoAMQP
import Foundation

/// The smallest end-to-end use of ChoreoAMQP: declare a topic exchange and a queue bound to
/// `order.*`, publish a few events with confirms, consume and acknowledge them.
@main
struct AMQPHello {
    static func main() async {
        let url = ProcessInfo.processInfo.environment["CHOREO_URL"] ?? "amqp://guest:guest@127.0.0.1:5674/"
        do {
            let config = try AMQPConfiguration(url: url)
            print("connecting to \(config)")
            let connection = try await AMQPConnection.connect(to: config)
            let channel = try await connection.openChannel()
            try await channel.enableConfirms()
            try await channel.declareExchange("choreo.hello", type: .topic, durable: true)
            let queue = try await channel.declareQueue("choreo.hello.orders", options: .quorum(deliveryLimit: 5))
            try await channel.bindQueue(queue.name, exchange: "choreo.hello", routingKey: "order.*")

            let events = ["order.placed", "order.paid", "order.shipped"]
            for (i, type) in events.enumerated() {
                let body = Data(#"{"orderId":"A-\#(i)"}"#.utf8)
                try await channel.publish(
                    AMQPOutgoingMessage(
                        exchange: "choreo.hello", routingKey: type, body: body,
                        properties: AMQPProperties(
                            contentType: "application/json", deliveryMode: 2, messageID: "evt-\(i)", type: type)))
                print("published \(type) (confirmed by the broker)")
            }

            let consumerChannel = try await connection.openChannel()
            try await consumerChannel.setPrefetch(10)
            let consumer = try await consumerChannel.consume(queue: queue.name)
            var received = 0
            for try await delivery in consumer {
                print("consumed \(delivery.routingKey): \(String(decoding: delivery.body, as: UTF8.self))")
                try delivery.ack()
                received += 1
                if received == events.count { break }
            }
            try await consumer.cancel()
            await connection.close()
            print("done: \(received) events published and consumed")
        } catch {
            FileHandle.standardError.write(Data("amqp-hello: \(error)\n".utf8))
            exit(1)
        }
    }
}
