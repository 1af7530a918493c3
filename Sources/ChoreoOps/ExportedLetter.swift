import Choreo
import ChoreoAMQP
import Foundation

/// One exported dead letter, one JSON line: the queue, the body in base64, every property, and the
/// headers with their AMQP types so an import restores them exactly. `x-delivery-count` is left out:
/// the broker adds it to each redelivery, it describes a delivery, not the message.
struct ExportedLetter: Codable {
    struct Properties: Codable {
        var contentType, contentEncoding, correlationID, replyTo, expiration, messageID, type, userID, appID: String?
        var deliveryMode, priority: UInt8?
        var timestamp: UInt64?
        var headers: [String: TypedValue]?
    }

    var queue: String
    var id: String
    var handler: String
    var errorType: String
    var errorMessage: String
    var properties: Properties
    var body: String

    init(_ l: DeadLetter) {
        queue = l.queue
        id = l.id
        handler = l.handler
        errorType = l.errorType
        errorMessage = l.errorMessage
        let p = l.properties
        properties = Properties(
            contentType: p.contentType, contentEncoding: p.contentEncoding, correlationID: p.correlationID,
            replyTo: p.replyTo,
            expiration: p.expiration, messageID: p.messageID, type: p.type, userID: p.userID, appID: p.appID,
            deliveryMode: p.deliveryMode, priority: p.priority, timestamp: p.timestamp,
            headers: p.headers?.filter { $0.key != "x-delivery-count" }.mapValues(TypedValue.init))
        body = l.body.base64EncodedString()
    }

    func message() throws -> AMQPOutgoingMessage {
        guard let bytes = Data(base64Encoded: body) else { throw OperationError("body is not base64") }
        let p = properties
        let props = AMQPProperties(
            contentType: p.contentType, contentEncoding: p.contentEncoding,
            headers: try p.headers?.mapValues { try $0.value() },
            deliveryMode: p.deliveryMode, priority: p.priority, correlationID: p.correlationID, replyTo: p.replyTo,
            expiration: p.expiration, messageID: p.messageID, timestamp: p.timestamp, type: p.type, userID: p.userID,
            appID: p.appID)
        // Mandatory: a dead-letter queue deleted after import checked it fails the import instead of dropping letters.
        let message = AMQPOutgoingMessage(
            exchange: "", routingKey: queue, body: bytes, properties: props, mandatory: true)
        try message.checkEncodable()
        return message
    }
}

/// An AMQP field value with its wire type, as JSON: `{"t": "S", "v": "text"}`.
indirect enum TypedValue: Codable {
    case scalar(type: String, value: String)
    case table([String: TypedValue])
    case array([TypedValue])

    private enum Keys: String, CodingKey { case t, v }

    init(_ v: AMQPFieldValue) {
        switch v {
        case .bool(let x): self = .scalar(type: "t", value: x ? "true" : "false")
        case .int8(let x): self = .scalar(type: "b", value: String(x))
        case .uint8(let x): self = .scalar(type: "B", value: String(x))
        case .int16(let x): self = .scalar(type: "s", value: String(x))
        case .uint16(let x): self = .scalar(type: "u", value: String(x))
        case .int32(let x): self = .scalar(type: "I", value: String(x))
        case .uint32(let x): self = .scalar(type: "i", value: String(x))
        case .int64(let x): self = .scalar(type: "l", value: String(x))
        case .float(let x): self = .scalar(type: "f", value: String(x.bitPattern))
        case .double(let x): self = .scalar(type: "d", value: String(x.bitPattern))
        case .decimal(let scale, let value): self = .scalar(type: "D", value: "\(scale):\(value)")
        case .string(let s): self = .scalar(type: "S", value: s)
        case .bytes(let b): self = .scalar(type: "x", value: Data(b).base64EncodedString())
        case .timestamp(let t): self = .scalar(type: "T", value: String(t))
        case .void: self = .scalar(type: "V", value: "")
        case .table(let t): self = .table(t.mapValues(TypedValue.init))
        case .array(let a): self = .array(a.map(TypedValue.init))
        }
    }

    func value() throws -> AMQPFieldValue {
        switch self {
        case .table(let t): return .table(try t.mapValues { try $0.value() })
        case .array(let a): return .array(try a.map { try $0.value() })
        case .scalar(let type, let v):
            func bad() -> OperationError { OperationError("header value '\(v)' is not a valid '\(type)'") }
            switch type {
            case "t": return .bool(v == "true")
            case "b": guard let x = Int8(v) else { throw bad() }; return .int8(x)
            case "B": guard let x = UInt8(v) else { throw bad() }; return .uint8(x)
            case "s": guard let x = Int16(v) else { throw bad() }; return .int16(x)
            case "u": guard let x = UInt16(v) else { throw bad() }; return .uint16(x)
            case "I": guard let x = Int32(v) else { throw bad() }; return .int32(x)
            case "i": guard let x = UInt32(v) else { throw bad() }; return .uint32(x)
            case "l": guard let x = Int64(v) else { throw bad() }; return .int64(x)
            case "f": guard let x = UInt32(v) else { throw bad() }; return .float(Float(bitPattern: x))
            case "d": guard let x = UInt64(v) else { throw bad() }; return .double(Double(bitPattern: x))
            case "D":
                let parts = v.split(separator: ":")
                guard parts.count == 2, let s = UInt8(parts[0]), let x = UInt32(parts[1]) else { throw bad() }
                return .decimal(scale: s, value: x)
            case "S": return .string(v)
            case "x": guard let d = Data(base64Encoded: v) else { throw bad() }; return .bytes(Array(d))
            case "T": guard let x = UInt64(v) else { throw bad() }; return .timestamp(x)
            case "V": return .void
            default: throw OperationError("unknown header type '\(type)'")
            }
        }
    }

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        let t = try c.decode(String.self, forKey: .t)
        switch t {
        case "F": self = .table(try c.decode([String: TypedValue].self, forKey: .v))
        case "A": self = .array(try c.decode([TypedValue].self, forKey: .v))
        default: self = .scalar(type: t, value: try c.decode(String.self, forKey: .v))
        }
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: Keys.self)
        switch self {
        case .scalar(let t, let v): try c.encode(t, forKey: .t); try c.encode(v, forKey: .v)
        case .table(let t): try c.encode("F", forKey: .t); try c.encode(t, forKey: .v)
        case .array(let a): try c.encode("A", forKey: .t); try c.encode(a, forKey: .v)
        }
    }
}
