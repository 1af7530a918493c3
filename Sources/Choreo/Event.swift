import Foundation

/// A typed event: a Codable payload with a type name and a schema version.
///
/// ```swift
/// struct OrderPlaced: Event {
///     static let eventType = "order.placed"
///     static let schemaVersion = 2
///     var orderID: String
///     var items: [String: Int]
/// }
/// ```
public protocol Event: Codable, Sendable {
    /// The CloudEvents `type` and the routing key, e.g. `order.placed`.
    static var eventType: String { get }
    /// The version of this payload's schema (CloudEvents extension `dataversion`). Default 1.
    static var schemaVersion: Int { get }
}

extension Event {
    public static var schemaVersion: Int { 1 }
}

/// An event in its CloudEvents 1.0 form: attributes plus the encoded `data`.
public struct EventEnvelope: Sendable, Hashable {
    public var id: String
    public var source: String
    public var type: String
    public var specVersion: String
    public var time: Date?
    public var subject: String?
    public var dataContentType: String?
    public var dataSchema: String?
    /// Schema version of `data`; 1 when the sender did not say.
    public var dataVersion: Int
    public var correlationID: String?
    public var causationID: String?
    public var traceparent: String?
    public var idempotencyKey: String?
    /// Other CloudEvents extensions, as strings.
    public var extensions: [String: String]
    public var data: Data

    public init(
        id: String = EventID.random(), source: String, type: String, time: Date? = Date(),
        subject: String? = nil, dataContentType: String? = "application/json", dataSchema: String? = nil,
        dataVersion: Int = 1, correlationID: String? = nil, causationID: String? = nil, traceparent: String? = nil,
        idempotencyKey: String? = nil, extensions: [String: String] = [:], data: Data
    ) {
        self.id = id
        self.source = source
        self.type = type
        self.specVersion = "1.0"
        self.time = time
        self.subject = subject
        self.dataContentType = dataContentType
        self.dataSchema = dataSchema
        self.dataVersion = dataVersion
        self.correlationID = correlationID
        self.causationID = causationID
        self.traceparent = traceparent
        self.idempotencyKey = idempotencyKey
        self.extensions = extensions
        self.data = data
    }

    /// Builds an envelope for a typed event, encoding it as JSON.
    public init<E: Event>(
        _ event: E, source: String, id: String = EventID.random(),
        correlationID: String? = nil, causationID: String? = nil,
        idempotencyKey: String? = nil, subject: String? = nil
    ) throws {
        guard !id.isEmpty else { throw ConfigurationError("an event's id must not be empty") }
        if idempotencyKey?.isEmpty == true { throw ConfigurationError.emptyIdempotencyKey }
        self.init(
            id: id, source: source, type: E.eventType, subject: subject, dataVersion: E.schemaVersion,
            correlationID: correlationID ?? id, causationID: causationID, idempotencyKey: idempotencyKey,
            data: try PayloadJSON.encode(event))
    }
}

/// The JSON settings Choreo uses for `data`: ISO 8601 dates, sorted keys (stable bytes). The runtime codes
/// payloads with a faster coder of its own that keeps these settings; these Foundation coders read and write
/// the same JSON, for code outside the runtime (tests, tools).
public enum JSONCoding {
    public static var encoder: JSONEncoder {
        let e = JSONEncoder()
        e.dateEncodingStrategy = .iso8601
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return e
    }

    public static var decoder: JSONDecoder {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        return d
    }
}

extension ConfigurationError {
    /// Under an empty key every event would pass for a duplicate of the first: refused where it is set.
    static var emptyIdempotencyKey: ConfigurationError {
        ConfigurationError(
            "an idempotency key must not be empty: give one that names the effect, or nil to deduplicate by event id")
    }
}
