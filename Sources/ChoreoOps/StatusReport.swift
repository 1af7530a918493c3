import Choreo
import ChoreoAMQP
import Foundation

/// What `choreo status` shows for one handler.
public struct HandlerStatus: Codable, Sendable {
    public var service: String
    public var handler: String
    public var queue: String
    public var ready: UInt32?
    public var consumers: UInt32?
    public var retrying: UInt32?
    public var deadLetters: UInt32?
    public var lastSeen: Date
    public var host: String
    /// Why counts are missing (the queue was deleted), if they are.
    public var problem: String?
}

/// Collects queue depths and consumer counts for every handler in the registry.
public struct StatusReport: Sendable {
    public let connection: AMQPConnection

    public init(connection: AMQPConnection) {
        self.connection = connection
    }

    public func collect(_ manifests: [HandlerManifest]) async throws -> [HandlerStatus] {
        var out: [HandlerStatus] = []
        let channel = try await connection.openChannel()
        defer { Task { await channel.close() } }
        for m in manifests {
            var s = HandlerStatus(
                service: m.service, handler: m.handler, queue: m.queue, lastSeen: m.startedAt, host: m.host)
            do {
                let main = try await channel.declareQueuePassive(m.queue)
                s.ready = main.messageCount
                s.consumers = main.consumerCount
                var retrying: UInt32 = 0
                for q in m.retryQueues { retrying += try await channel.declareQueuePassive(q).messageCount }
                s.retrying = retrying
                s.deadLetters = try await channel.declareQueuePassive(m.deadLetterQueue).messageCount
            } catch {
                guard error.replyCode == AMQPError.ReplyCode.notFound else { throw error }
                s.problem = "queue missing: \(error.message)"
            }
            out.append(s)
        }
        return out
    }
}
