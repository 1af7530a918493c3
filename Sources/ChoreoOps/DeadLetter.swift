import Choreo
import ChoreoAMQP
import Foundation

/// One message in a handler's dead-letter queue, with its failure metadata read from the headers.
public struct DeadLetter: Sendable {
    /// The event id (CloudEvents `id`, else the AMQP message id).
    public var id: String
    public var type: String
    public var service: String
    public var handler: String
    /// The dead-letter queue it sits in.
    public var queue: String
    /// The handler's own queue, where a replay sends it.
    public var handlerQueue: String
    public var errorType: String
    public var errorMessage: String
    public var attempts: Int
    public var firstFailure: Date?
    public var lastFailure: Date?
    public var originalExchange: String
    public var originalRoutingKey: String
    public var body: Data
    public var properties: AMQPProperties

    init(delivery: AMQPDelivery, manifest: HandlerManifest) {
        typealias H = WireNames.Headers
        let h = delivery.properties.headers ?? [:]
        func s(_ k: String) -> String? { h[k]?.stringValue }
        id = s("cloudEvents_id") ?? s("cloudEvents:id") ?? delivery.properties.messageID ?? "(no id)"
        type = s("cloudEvents_type") ?? s("cloudEvents:type") ?? delivery.properties.type ?? "(no type)"
        service = s(H.deadLetterService) ?? manifest.service
        handler = s(H.deadLetterHandler) ?? manifest.handler
        queue = manifest.deadLetterQueue
        handlerQueue = manifest.queue
        if let errorType = s(H.deadLetterErrorType) {
            self.errorType = errorType
            errorMessage = s(H.deadLetterErrorMessage) ?? ""
            attempts = Int(s(H.deadLetterAttempts) ?? "") ?? 1
        } else {
            // Dead-lettered by the broker itself: the delivery limit (the process died handling it) or a rejection.
            let reason = s("x-first-death-reason") ?? "unknown"
            let deliveries = h["x-delivery-count"]?.intValue.map(Int.init)
            errorType = reason == "delivery_limit" ? "DeliveryLimitExceeded" : "BrokerDeadLettered"
            errorMessage =
                reason == "delivery_limit"
                ? "the broker dead-lettered it after its delivery limit: the handler process kept dying or timing out while handling it"
                : "the broker dead-lettered it (\(reason))"
            attempts = deliveries ?? 0
        }
        firstFailure = s(H.deadLetterFirstFailure).flatMap(Timestamps.parse)
        lastFailure =
            s(H.deadLetterLastFailure).flatMap(Timestamps.parse)
            ?? delivery.properties.timestamp.map { Date(timeIntervalSince1970: TimeInterval($0)) }
        originalExchange = s(H.deadLetterOriginalExchange) ?? s("x-first-death-exchange") ?? ""
        originalRoutingKey = s(H.deadLetterOriginalRoutingKey) ?? type
        body = delivery.body
        properties = delivery.properties
    }

    /// The copy a replay publishes: the same body, id and CloudEvents headers; attempts and failure
    /// metadata reset; sent straight to the handler's own queue.
    var replayMessage: AMQPOutgoingMessage {
        typealias H = WireNames.Headers
        var headers = properties.headers ?? [:]
        for key in headers.keys
        where key.hasPrefix("choreo-dl-") || key.hasPrefix("x-")
            || [H.attempt, H.firstFailure, H.originExchange, H.originRoutingKey].contains(key)
        {
            headers[key] = nil
        }
        headers[H.originExchange] = .string(originalExchange)
        headers[H.originRoutingKey] = .string(originalRoutingKey)
        headers["choreo-replayed-at"] = .string(Timestamps.format(Date()))
        var p = properties
        p.headers = headers
        p.deliveryMode = 2
        return AMQPOutgoingMessage(exchange: "", routingKey: handlerQueue, body: body, properties: p, mandatory: true)
    }
}

/// Which dead letters an operation applies to.
public struct DeadLetterFilter: Sendable {
    public var handler: String?
    public var ids: Set<String> = []
    /// Only the handlers of this service.
    public var service: String?
    public var type: String?
    public var errorText: String?
    public var since: Date?
    public var limit: Int?

    public init(
        handler: String? = nil, ids: Set<String> = [], type: String? = nil, errorText: String? = nil,
        since: Date? = nil, limit: Int? = nil, service: String? = nil
    ) {
        self.handler = handler
        self.service = service
        self.ids = ids
        self.type = type
        self.errorText = errorText
        self.since = since
        self.limit = limit
    }

    func matches(_ m: HandlerManifest) -> Bool {
        if let service, m.service != service { return false }
        guard let handler else { return true }
        return handler == m.handler || handler == "\(m.service).\(m.handler)" || handler == "\(m.service)/\(m.handler)"
    }

    func matches(_ d: DeadLetter) -> Bool {
        if !ids.isEmpty && !ids.contains(d.id) { return false }
        if let type, d.type != type { return false }
        if let errorText, !d.errorMessage.localizedCaseInsensitiveContains(errorText),
            !d.errorType.localizedCaseInsensitiveContains(errorText)
        {
            return false
        }
        if let since, (d.lastFailure ?? .distantPast) < since { return false }
        return true
    }
}
