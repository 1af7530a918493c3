import CRabbitMQ
import Foundation

/// Memory for the C structures of one call (tables, strings, properties), freed together in `deinit`.
///
/// rabbitmq-c keeps pointers into the bytes it is given until the call returns; an arena that lives
/// for the call keeps them valid and frees them at once afterwards.
final class CArena {
    private let pool: UnsafeMutablePointer<amqp_pool_t>

    init(pageSize: Int = 4096) {
        pool = .allocate(capacity: 1)
        init_amqp_pool(pool, pageSize)
    }

    deinit {
        empty_amqp_pool(pool)
        pool.deallocate()
    }

    func allocate<T>(_ type: T.Type, count: Int) throws -> UnsafeMutablePointer<T> {
        guard count > 0 else { return UnsafeMutablePointer<T>.allocate(capacity: 0) }
        guard let raw = amqp_pool_alloc(pool, MemoryLayout<T>.stride * count) else {
            throw AMQPError(.protocolFailure, message: "out of memory", operation: "encode message")
        }
        return raw.bindMemory(to: T.self, capacity: count)
    }

    func bytes(_ string: String) throws -> amqp_bytes_t {
        // Native strings are contiguous UTF-8: copied once, straight into the arena.
        if let copied = try string.utf8.withContiguousStorageIfAvailable({ try bytes(UnsafeRawBufferPointer($0)) }) {
            return copied
        }
        return try Array(string.utf8).withUnsafeBytes { try bytes($0) }
    }

    /// A name, routing key or property: AMQP 0-9-1 sends it as a short string, at most
    /// ``AMQPLimits/shortStringBytes`` of UTF-8. Longer, it is refused here with what it is, where rabbitmq-c
    /// would say only "invalid AMQP data".
    func shortString(_ string: String, _ what: String) throws -> amqp_bytes_t {
        let count = string.utf8.count
        guard count <= AMQPLimits.shortStringBytes else {
            throw AMQPError(
                .invalidArgument,
                message:
                    "the \(what) '\(string.prefix(32))...' is \(count) bytes long; AMQP 0-9-1 allows at most \(AMQPLimits.shortStringBytes)",
                operation: "encode")
        }
        return try bytes(string)
    }

    func bytes(_ array: [UInt8]) throws -> amqp_bytes_t {
        try array.withUnsafeBytes { try bytes($0) }
    }

    func bytes(_ buffer: UnsafeRawBufferPointer) throws -> amqp_bytes_t {
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return amqp_bytes_t(len: 0, bytes: nil) }
        let target = try allocate(UInt8.self, count: buffer.count)
        UnsafeMutableRawPointer(target).copyMemory(from: base, byteCount: buffer.count)
        return amqp_bytes_t(len: buffer.count, bytes: UnsafeMutableRawPointer(target))
    }

    func table(_ table: AMQPTable?) throws -> amqp_table_t {
        guard let table, !table.isEmpty else { return amqp_table_t(num_entries: 0, entries: nil) }
        let entries = try allocate(amqp_table_entry_t.self, count: table.count)
        for (i, (key, value)) in table.enumerated() { entries[i] = try entry(key, value) }
        // Sorted names make the wire bytes the same for the same headers (a dictionary's order is not), which
        // helps tests, and receivers that reuse the previous message's strings. Sorted here, on the C entries
        // by their bytes: sorting the Swift dictionary's pairs cost several times more.
        for i in 1..<table.count {
            let moving = entries[i]
            var j = i
            while j > 0, Self.compare(moving.key, entries[j - 1].key) < 0 {
                entries[j] = entries[j - 1]
                j -= 1
            }
            entries[j] = moving
        }
        return amqp_table_t(num_entries: Int32(table.count), entries: entries)
    }

    /// Headers given as a list: written in its order, as they are.
    func table(_ fields: [AMQPHeaderField]) throws -> amqp_table_t {
        guard !fields.isEmpty else { return amqp_table_t(num_entries: 0, entries: nil) }
        let entries = try allocate(amqp_table_entry_t.self, count: fields.count)
        for (i, field) in fields.enumerated() { entries[i] = try entry(field.name, field.value) }
        return amqp_table_t(num_entries: Int32(fields.count), entries: entries)
    }

    private func entry(_ name: String, _ value: AMQPFieldValue) throws -> amqp_table_entry_t {
        amqp_table_entry_t(key: try shortString(name, "header name"), value: try fieldValue(value))
    }

    /// Byte order of two names (memcmp, then the shorter first).
    private static func compare(_ a: amqp_bytes_t, _ b: amqp_bytes_t) -> Int32 {
        let common = min(a.len, b.len)
        if common > 0, let p = a.bytes, let q = b.bytes {
            let order = memcmp(p, q, common)
            if order != 0 { return order }
        }
        return a.len == b.len ? 0 : (a.len < b.len ? -1 : 1)
    }

    func fieldValue(_ value: AMQPFieldValue) throws -> amqp_field_value_t {
        var v = amqp_field_value_t()
        func kind(_ c: Unicode.Scalar) -> UInt8 { UInt8(ascii: c) }
        switch value {
        case .bool(let b): v.kind = kind("t"); v.value.boolean = b ? 1 : 0
        case .int8(let x): v.kind = kind("b"); v.value.i8 = x
        case .uint8(let x): v.kind = kind("B"); v.value.u8 = x
        case .int16(let x): v.kind = kind("s"); v.value.i16 = x
        case .uint16(let x): v.kind = kind("u"); v.value.u16 = x
        case .int32(let x): v.kind = kind("I"); v.value.i32 = x
        case .uint32(let x): v.kind = kind("i"); v.value.u32 = x
        case .int64(let x): v.kind = kind("l"); v.value.i64 = x
        case .float(let x): v.kind = kind("f"); v.value.f32 = x
        case .double(let x): v.kind = kind("d"); v.value.f64 = x
        case .decimal(let scale, let value):
            v.kind = kind("D"); v.value.decimal = amqp_decimal_t(decimals: scale, value: value)
        case .string(let s): v.kind = kind("S"); v.value.bytes = try bytes(s)
        case .bytes(let b): v.kind = kind("x"); v.value.bytes = try bytes(b)
        case .timestamp(let t): v.kind = kind("T"); v.value.u64 = t
        case .table(let t): v.kind = kind("F"); v.value.table = try table(t)
        case .array(let items):
            v.kind = kind("A")
            let entries = try allocate(amqp_field_value_t.self, count: items.count)
            for (i, item) in items.enumerated() { entries[i] = try fieldValue(item) }
            v.value.array = amqp_array_t(num_entries: Int32(items.count), entries: items.isEmpty ? nil : entries)
        case .void: v.kind = kind("V")
        }
        return v
    }

    func properties(_ p: AMQPProperties) throws -> amqp_basic_properties_t {
        var props = amqp_basic_properties_t()
        var flags: amqp_flags_t = 0
        if let x = p.contentType {
            props.content_type = try shortString(x, "content type"); flags |= CHOREO_PROP_CONTENT_TYPE
        }
        if let x = p.contentEncoding {
            props.content_encoding = try shortString(x, "content encoding"); flags |= CHOREO_PROP_CONTENT_ENCODING
        }
        switch p.headerStorage {
        case .none: break
        case .table(let t): props.headers = try table(t); flags |= CHOREO_PROP_HEADERS
        case .fields(let f): props.headers = try table(f); flags |= CHOREO_PROP_HEADERS
        }
        if let x = p.deliveryMode { props.delivery_mode = x; flags |= CHOREO_PROP_DELIVERY_MODE }
        if let x = p.priority { props.priority = x; flags |= CHOREO_PROP_PRIORITY }
        if let x = p.correlationID {
            props.correlation_id = try shortString(x, "correlation id"); flags |= CHOREO_PROP_CORRELATION_ID
        }
        if let x = p.replyTo { props.reply_to = try shortString(x, "reply-to"); flags |= CHOREO_PROP_REPLY_TO }
        if let x = p.expiration { props.expiration = try shortString(x, "expiration"); flags |= CHOREO_PROP_EXPIRATION }
        if let x = p.messageID { props.message_id = try shortString(x, "message id"); flags |= CHOREO_PROP_MESSAGE_ID }
        if let x = p.timestamp { props.timestamp = x; flags |= CHOREO_PROP_TIMESTAMP }
        if let x = p.type { props.type = try shortString(x, "type"); flags |= CHOREO_PROP_TYPE }
        if let x = p.userID { props.user_id = try shortString(x, "user id"); flags |= CHOREO_PROP_USER_ID }
        if let x = p.appID { props.app_id = try shortString(x, "app id"); flags |= CHOREO_PROP_APP_ID }
        props._flags = flags
        return props
    }
}

/// Decoding of C structures into Swift values; copies everything, so the C memory may be freed after.
enum CDecode {
    static func bytes(_ b: amqp_bytes_t) -> [UInt8] {
        guard b.len > 0, let p = b.bytes else { return [] }
        return Array(UnsafeRawBufferPointer(start: p, count: b.len))
    }

    static func data(_ b: amqp_bytes_t) -> Data {
        guard b.len > 0, let p = b.bytes else { return Data() }
        return Data(bytes: p, count: b.len)
    }

    static func string(_ b: amqp_bytes_t) -> String {
        guard b.len > 0, let p = b.bytes else { return "" }
        let buffer = UnsafeRawBufferPointer(start: p, count: b.len)
        return String(decoding: buffer, as: UTF8.self)
    }

    static func table(_ t: amqp_table_t) -> AMQPTable {
        var result = AMQPTable()
        guard t.num_entries > 0, let entries = t.entries else { return result }
        result.reserveCapacity(Int(t.num_entries))
        for i in 0..<Int(t.num_entries) {
            let e = entries[i]
            result[string(e.key)] = fieldValue(e.value)
        }
        return result
    }

    /// A message's headers in wire order, with names and text values taken from `recent` when they are
    /// the ones the previous message had at the same position. A list rather than a table: most readers
    /// look at a few of them, or at all in turn, and hashing every name cost more than that.
    static func headers(_ t: amqp_table_t, recent: inout RecentStrings) -> [AMQPHeaderField] {
        guard t.num_entries > 0, let entries = t.entries else { return [] }
        var result: [AMQPHeaderField] = []
        result.reserveCapacity(Int(t.num_entries))
        for i in 0..<Int(t.num_entries) {
            let e = entries[i]
            let name = recent.name(at: i, e.key)
            if e.value.kind == UInt8(ascii: "S"), let text = recent.value(at: i, e.value.value.bytes) {
                result.append(AMQPHeaderField(name: name, value: .string(text)))
            } else {
                result.append(AMQPHeaderField(name: name, value: fieldValue(e.value)))
            }
        }
        return result
    }

    static func fieldValue(_ v: amqp_field_value_t) -> AMQPFieldValue {
        // The kind is one ASCII letter; matched as a byte (a Character per value cost more than the rest).
        switch v.kind {
        case UInt8(ascii: "t"): return .bool(v.value.boolean != 0)
        case UInt8(ascii: "b"): return .int8(v.value.i8)
        case UInt8(ascii: "B"): return .uint8(v.value.u8)
        case UInt8(ascii: "s"): return .int16(v.value.i16)
        case UInt8(ascii: "u"): return .uint16(v.value.u16)
        case UInt8(ascii: "I"): return .int32(v.value.i32)
        case UInt8(ascii: "i"): return .uint32(v.value.u32)
        case UInt8(ascii: "l"): return .int64(v.value.i64)
        case UInt8(ascii: "L"):
            return v.value.u64 <= UInt64(Int64.max)
                ? .int64(Int64(v.value.u64)) : .bytes(withUnsafeBytes(of: v.value.u64.bigEndian, Array.init))
        case UInt8(ascii: "f"): return .float(v.value.f32)
        case UInt8(ascii: "d"): return .double(v.value.f64)
        case UInt8(ascii: "D"): return .decimal(scale: v.value.decimal.decimals, value: v.value.decimal.value)
        case UInt8(ascii: "S"):
            // Headers from other clients may carry bytes that are not UTF-8: keep them as bytes, never lose them.
            let b = v.value.bytes
            guard b.len > 0, let p = b.bytes else { return .string("") }
            let buffer = UnsafeBufferPointer(start: p.assumingMemoryBound(to: UInt8.self), count: b.len)
            if let s = String(validating: buffer, as: UTF8.self) { return .string(s) }
            return .bytes(Array(buffer))
        case UInt8(ascii: "x"): return .bytes(bytes(v.value.bytes))
        case UInt8(ascii: "T"): return .timestamp(v.value.u64)
        case UInt8(ascii: "F"): return .table(table(v.value.table))
        case UInt8(ascii: "A"):
            let a = v.value.array
            guard a.num_entries > 0, let entries = a.entries else { return .array([]) }
            return .array((0..<Int(a.num_entries)).map { fieldValue(entries[$0]) })
        default: return .void
        }
    }

    /// A message's properties; `recent` reuses the strings of the connection's previous messages.
    static func properties(_ p: amqp_basic_properties_t, recent: inout RecentStrings) -> AMQPProperties {
        let f = p._flags
        var r =
            f & CHOREO_PROP_HEADERS != 0
            ? AMQPProperties(receivedHeaders: headers(p.headers, recent: &recent)) : AMQPProperties()
        if f & CHOREO_PROP_CONTENT_TYPE != 0 { r.contentType = recent.contentType(p.content_type) }
        if f & CHOREO_PROP_CONTENT_ENCODING != 0 { r.contentEncoding = string(p.content_encoding) }
        if f & CHOREO_PROP_DELIVERY_MODE != 0 { r.deliveryMode = p.delivery_mode }
        if f & CHOREO_PROP_PRIORITY != 0 { r.priority = p.priority }
        if f & CHOREO_PROP_CORRELATION_ID != 0 { r.correlationID = string(p.correlation_id) }
        if f & CHOREO_PROP_REPLY_TO != 0 { r.replyTo = string(p.reply_to) }
        if f & CHOREO_PROP_EXPIRATION != 0 { r.expiration = string(p.expiration) }
        if f & CHOREO_PROP_MESSAGE_ID != 0 { r.messageID = string(p.message_id) }
        if f & CHOREO_PROP_TIMESTAMP != 0 { r.timestamp = p.timestamp }
        if f & CHOREO_PROP_TYPE != 0 { r.type = string(p.type) }
        if f & CHOREO_PROP_USER_ID != 0 { r.userID = string(p.user_id) }
        if f & CHOREO_PROP_APP_ID != 0 { r.appID = string(p.app_id) }
        return r
    }
}

/// The header names, text header values and content type of a connection's last message, by position.
///
/// A publisher writes the same headers in the same order on every message, and many values repeat (spec
/// version, source, type, content type). Reusing the previous message's String where the bytes are the
/// same saves building (allocating and validating) about a dozen strings per delivery. Confined to the
/// connection's I/O thread, like the rest of its decoding.
struct RecentStrings {
    private var names: [String?] = []
    private var values: [String?] = []
    private var lastContentType: String?
    /// Positions beyond this are decoded as usual: a cache, not a copy of any table.
    private static let positions = 32

    mutating func name(at i: Int, _ b: amqp_bytes_t) -> String {
        if i < names.count, let last = names[i], Self.same(last, b) { return last }
        let s = CDecode.string(b)
        remember(s, at: i, in: &names)
        return s
    }

    /// A text value as a String, or nil when its bytes are not UTF-8 (the caller keeps them as bytes).
    mutating func value(at i: Int, _ b: amqp_bytes_t) -> String? {
        if i < values.count, let last = values[i], Self.same(last, b) { return last }
        guard b.len > 0, let p = b.bytes else { return "" }
        let buffer = UnsafeBufferPointer(start: p.assumingMemoryBound(to: UInt8.self), count: b.len)
        guard let s = String(validating: buffer, as: UTF8.self) else { return nil }
        remember(s, at: i, in: &values)
        return s
    }

    mutating func contentType(_ b: amqp_bytes_t) -> String {
        if let last = lastContentType, Self.same(last, b) { return last }
        let s = CDecode.string(b)
        lastContentType = s
        return s
    }

    private func remember(_ s: String, at i: Int, in list: inout [String?]) {
        guard i < Self.positions else { return }
        while list.count <= i { list.append(nil) }
        list[i] = s
    }

    /// Whether a String's UTF-8 is exactly these bytes.
    private static func same(_ s: String, _ b: amqp_bytes_t) -> Bool {
        var s = s
        return s.withUTF8 { utf8 in
            guard utf8.count == b.len else { return false }
            guard utf8.count > 0 else { return true }
            guard let p = b.bytes, let q = utf8.baseAddress else { return false }
            return memcmp(q, p, utf8.count) == 0
        }
    }
}

/// Limits of the AMQP 0-9-1 wire format that callers may check before they reach the wire.
public enum AMQPLimits {
    /// Exchange and queue names, routing keys, header names and most properties are short strings: a length byte,
    /// then at most this many bytes of UTF-8.
    public static let shortStringBytes = 255
}

extension CArena {
    /// What a publish of `message` sends besides its body, each part checked against AMQP's limits.
    func publishFields(_ message: AMQPOutgoingMessage) throws -> (
        properties: amqp_basic_properties_t, exchange: amqp_bytes_t, routingKey: amqp_bytes_t
    ) {
        (
            try properties(message.properties), try shortString(message.exchange, "exchange name"),
            try shortString(message.routingKey, "routing key")
        )
    }
}

extension AMQPOutgoingMessage {
    /// Encodes the message's names and properties without sending anything, and throws what a publish would
    /// refuse (a routing key, a short-string property or a header name over 255 bytes): for messages read from
    /// a file, so that all of them are checked before the first is published.
    public func checkEncodable() throws(AMQPError) {
        let arena = CArena()
        _ = try arena.convert { try arena.publishFields(self) }
    }
}
