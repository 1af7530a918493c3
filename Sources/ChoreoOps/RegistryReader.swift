import Choreo
import ChoreoAMQP
import Foundation

/// Reads the handler manifests that runners append to the registry stream.
///
/// A stream does not say how long it is, so the reader first appends a probe entry of its own
/// (confirmed) and reads from the first offset until it meets that probe: it has then seen every
/// manifest written before it started, with no guessing by timeouts.
public struct RegistryReader: Sendable {
    public let connection: AMQPConnection

    public init(connection: AMQPConnection) {
        self.connection = connection
    }

    /// The latest manifest of every (service, handler), sorted by service then handler.
    public func manifests() async throws -> [HandlerManifest] {
        let channel = try await connection.openChannel()
        defer { Task { await channel.close() } }
        do {
            _ = try await channel.declareQueuePassive(WireNames.registryStream)
        } catch {
            if error.replyCode == AMQPError.ReplyCode.notFound { return [] }  // no runner has started on this broker yet
            throw error
        }
        try await channel.enableConfirms()
        let probe = "probe-\(UUID().uuidString)"
        try await channel.publish(
            AMQPOutgoingMessage(
                exchange: "", routingKey: WireNames.registryStream, body: Data(),
                properties: AMQPProperties(deliveryMode: 2, messageID: probe, type: "choreo.registry.probe")))
        let reader = try await connection.openChannel()
        defer { Task { await reader.close() } }
        let consumer = try await reader.consumeStream(queue: WireNames.registryStream, from: .first, prefetch: 500)
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        var latest: [String: HandlerManifest] = [:]
        for try await entry in consumer {
            try entry.ack()
            if entry.properties.messageID == probe { break }
            guard entry.properties.type == "choreo.manifest",
                let m = try? decoder.decode(HandlerManifest.self, from: entry.body)
            else { continue }
            let key = "\(m.service)/\(m.handler)"
            if let seen = latest[key], seen.startedAt > m.startedAt { continue }
            latest[key] = m
        }
        try? await consumer.cancel()
        return latest.values.sorted { a, b in a.service == b.service ? a.handler < b.handler : a.service < b.service }
    }
}
