import ArgumentParser
import Choreo
import ChoreoAMQP
import ChoreoOps
import Foundation

struct Publish: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Publish a CloudEvent into the mesh, with a publisher confirm, and print its id.")

    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "The event type, e.g. order.placed (also the routing key).")
    var type: String
    @Option(help: "The event data: JSON text, or @FILE to read it from a file.")
    var data: String
    @Option(help: "Idempotency key handlers deduplicate by (default: the event id).")
    var key: String?
    @Option(help: "Correlation id (default: the event id).")
    var correlationId: String?
    @Option(help: "Event id (default: a new UUID).")
    var id: String?
    @Option(help: "CloudEvents source.")
    var source = "choreo-cli"
    @Option(parsing: .unconditional, help: "Schema version of the data.")
    var dataVersion = 1
    @Option(help: "The mesh's topic exchange.")
    var exchange = WireNames.defaultExchange

    func validate() throws {
        if type.isEmpty || type.contains(" ") {
            throw ValidationError("the event type must be a non-empty word such as order.placed")
        }
        if dataVersion < 1 { throw ValidationError("--data-version must be at least 1") }
        let given: [(String, String?)] = [
            ("--key", key), ("--correlation-id", correlationId), ("--id", id), ("--source", source),
        ]
        for (option, value) in given where value?.isEmpty == true {
            throw ValidationError("\(option) must not be empty")
        }
    }

    func run() async throws {
        var bytes: Data
        if data.hasPrefix("@") {
            let path = String(data.dropFirst())
            guard let d = FileManager.default.contents(atPath: path) else {
                throw ValidationError("cannot read --data file '\(path)'")
            }
            bytes = d
        } else {
            bytes = Data(data.utf8)
        }
        guard (try? JSONSerialization.jsonObject(with: bytes, options: [.fragmentsAllowed])) != nil else {
            throw ValidationError("--data is not valid JSON")
        }
        let eventID = id ?? EventID.random()
        let envelope = EventEnvelope(
            id: eventID, source: source, type: type, dataVersion: dataVersion,
            correlationID: correlationId ?? eventID, idempotencyKey: key, data: bytes)
        let amqp = try await connection.connect()
        let channel = try await amqp.openChannel()
        try await channel.enableConfirms()
        // Passive: a mistyped --exchange must not create an exchange nobody is bound to.
        do { try await channel.declareExchangePassive(exchange) } catch {
            if error.replyCode == AMQPError.ReplyCode.notFound {
                throw OperationError(
                    "exchange '\(exchange)' does not exist on this broker: no handler service has declared it (is --exchange right?)"
                )
            }
            throw error
        }
        var message = EnvelopeCodec.encode(envelope, exchange: exchange)
        message.mandatory = true
        // A blocked publish waits, and one given up on may still reach the broker when the alarm clears: say so,
        // with the id that makes a second attempt a copy the handlers drop.
        let idOption = id == nil ? " --id \(eventID)" : ""
        amqp.onBlockedChange { reason in
            guard reason != nil else { return }
            FileHandle.standardError.write(
                Data(
                    ("waiting for the broker to accept event \(eventID); stopped now, it may still be published when "
                        + "the alarm clears: to try again without a duplicate, publish again with the same "
                        + "arguments\(idOption)\n").utf8))
        }
        do {
            try await channel.publish(message)
        } catch {
            if error.code == .unroutable {
                throw OperationError(
                    "no handler consumes '\(type)': no queue is bound to it on exchange '\(exchange)', so the event was not published"
                )
            }
            throw error
        }
        print(eventID)
    }
}
