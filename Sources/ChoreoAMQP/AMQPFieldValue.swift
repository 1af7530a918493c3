import Foundation

/// A field table: AMQP headers and arguments, keyed by name.
public typealias AMQPTable = [String: AMQPFieldValue]

/// One value in an AMQP field table, with the wire type it is sent as.
///
/// Every type RabbitMQ accepts is representable. Unsigned 64-bit integers are not: RabbitMQ rejects
/// the `L` field type with a frame error, so ``AMQPFieldValue`` has no such case. Decimals travel as
/// their scale and unscaled value.
public enum AMQPFieldValue: Sendable, Hashable {
    case bool(Bool)
    case int8(Int8)
    case uint8(UInt8)
    case int16(Int16)
    case uint16(UInt16)
    case int32(Int32)
    case uint32(UInt32)
    case int64(Int64)
    case float(Float)
    case double(Double)
    case decimal(scale: UInt8, value: UInt32)
    /// A long string (`S`). Bytes that are not UTF-8 decode as ``bytes(_:)`` instead.
    case string(String)
    /// A byte array (`x`).
    case bytes([UInt8])
    /// A timestamp (`T`), seconds since the Unix epoch.
    case timestamp(UInt64)
    case table(AMQPTable)
    case array([AMQPFieldValue])
    case void

    /// The value as a string when it is a string, else `nil`.
    public var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    /// The value as an integer when it is any integer type, else `nil`.
    public var intValue: Int64? {
        switch self {
        case .int8(let v): return Int64(v)
        case .uint8(let v): return Int64(v)
        case .int16(let v): return Int64(v)
        case .uint16(let v): return Int64(v)
        case .int32(let v): return Int64(v)
        case .uint32(let v): return Int64(v)
        case .int64(let v): return v
        case .timestamp(let v): return Int64(exactly: v)
        default: return nil
        }
    }
}

extension AMQPFieldValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral {
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int64(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
}
