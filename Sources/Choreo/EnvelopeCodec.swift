import ChoreoAMQP
import Foundation

/// Why an incoming message is not a usable CloudEvent. Never retried: retrying cannot fix it.
public struct EnvelopeDecodingError: Error, Sendable, Hashable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// CloudEvents 1.0 over AMQP 0-9-1: binary mode out, binary or structured mode in.
///
/// Binary mode: body = `data`, `content_type` = `datacontenttype`, every other attribute a string
/// header with the `cloudEvents_` prefix (`cloudEvents:` accepted on input); `message_id` mirrors
/// `id`, `type` mirrors `type`, `timestamp` mirrors `time`; persistent delivery.
/// Structured mode (`application/cloudevents+json`) is accepted on input.
public enum EnvelopeCodec {
    /// The AMQP message for an envelope. `extraHeaders` (retry and dead-letter metadata) are added as they are.
    public static func encode(
        _ e: EventEnvelope, exchange: String, routingKey: String? = nil,
        extraHeaders: [String: String] = [:]
    ) -> AMQPOutgoingMessage {
        typealias CE = WireNames.CloudEvents
        typealias H = PrefixedNames
        // The attributes as a list in their names' byte order, as a table would be sent (CArena sorts a
        // table's names): no names hashed into a dictionary and sorted again for every event.
        var fields: [AMQPHeaderField] = []
        fields.reserveCapacity(12)
        func put(_ header: String, _ value: String?) {
            if let value { fields.append(AMQPHeaderField(name: header, value: .string(value))) }
        }
        put(H.causationID, e.causationID)
        put(H.correlationID, e.correlationID)
        put(H.dataSchema, e.dataSchema)
        put(H.dataVersion, String(e.dataVersion))
        put(H.id, e.id)
        put(H.idempotencyKey, e.idempotencyKey)
        put(H.source, e.source)
        put(H.specVersion, e.specVersion)
        put(H.subject, e.subject)
        put(H.time, e.time.map(Timestamps.format))
        put(H.traceparent, e.traceparent)
        put(H.type, e.type)
        var properties = AMQPProperties(
            contentType: e.dataContentType, deliveryMode: 2, messageID: e.id,
            timestamp: e.time.map { UInt64(max(0, $0.timeIntervalSince1970)) }, type: e.type)
        if e.extensions.isEmpty && extraHeaders.isEmpty {
            properties.headerFields = fields
        } else {
            // Extensions and extra headers may name anything, an attribute's header too: a table, the last wins.
            var headers = AMQPTable(fields.map { ($0.name, $0.value) }, uniquingKeysWith: { $1 })
            for (k, v) in e.extensions { headers[CE.prefix + k] = .string(v) }
            for (k, v) in extraHeaders { headers[k] = .string(v) }
            properties.headers = headers
        }
        return AMQPOutgoingMessage(
            exchange: exchange, routingKey: routingKey ?? e.type, body: e.data, properties: properties)
    }

    /// The header names of the attributes, built once: names over 15 bytes are heap strings, and
    /// concatenating them for every message showed in profiles.
    private enum PrefixedNames {
        typealias CE = WireNames.CloudEvents
        static let id = CE.prefix + CE.id
        static let source = CE.prefix + CE.source
        static let specVersion = CE.prefix + CE.specVersion
        static let type = CE.prefix + CE.type
        static let time = CE.prefix + CE.time
        static let subject = CE.prefix + CE.subject
        static let dataSchema = CE.prefix + CE.dataSchema
        static let dataVersion = CE.prefix + CE.dataVersion
        static let correlationID = CE.prefix + CE.correlationID
        static let causationID = CE.prefix + CE.causationID
        static let traceparent = CE.prefix + CE.traceparent
        static let idempotencyKey = CE.prefix + CE.idempotencyKey
    }

    /// The AMQP message for an outbox entry, to the exchange and routing key it was recorded with.
    public static func encode(_ entry: OutboxMessage) -> AMQPOutgoingMessage {
        encode(entry.envelope, exchange: entry.exchange, routingKey: entry.routingKey)
    }

    /// Reads a delivery as a CloudEvent. - Throws: ``EnvelopeDecodingError`` with a reason a person can act on.
    public static func decode(_ delivery: AMQPDelivery) throws(EnvelopeDecodingError) -> EventEnvelope {
        try decode(body: delivery.body, properties: delivery.properties)
    }

    public static func decode(body: Data, properties: AMQPProperties) throws(EnvelopeDecodingError) -> EventEnvelope {
        let contentType = properties.contentType?.lowercased()
        if let contentType, contentType.hasPrefix(WireNames.CloudEvents.structuredContentType) {
            return try decodeStructured(body)
        }
        return try decodeBinary(body: body, properties: properties)
    }

    private static func decodeBinary(body: Data, properties: AMQPProperties) throws(EnvelopeDecodingError)
        -> EventEnvelope
    {
        var attributes = Attributes()
        // In wire order, as received: no table of the headers is built (see AMQPProperties.headerFields).
        for header in properties.headerFields ?? [] {
            guard let attribute = Attributes.name(ofHeader: header.name) else { continue }
            guard let text = stringValue(header.value) else {
                throw EnvelopeDecodingError(
                    "header '\(header.name)' has AMQP type \(typeName(header.value)), expected a string")
            }
            attributes.set(attribute, text)
        }
        // message_id and type mirror the attributes; accept them when a plain AMQP client sent only those.
        if attributes.id == nil, let id = properties.messageID, !id.isEmpty { attributes.id = id }
        if attributes.type == nil, let type = properties.type, !type.isEmpty { attributes.type = type }
        return try envelope(from: attributes, data: body, contentType: properties.contentType)
    }

    private static func decodeStructured(_ body: Data) throws(EnvelopeDecodingError) -> EventEnvelope {
        let object: [String: Any]
        do {
            guard let o = try JSONSerialization.jsonObject(with: body) as? [String: Any] else {
                throw EnvelopeDecodingError("structured CloudEvent is not a JSON object")
            }
            object = o
        } catch let e as EnvelopeDecodingError {
            throw e
        } catch {
            throw EnvelopeDecodingError("structured CloudEvent is not valid JSON")
        }
        var attributes = Attributes()
        for (k, v) in object where k != "data" && k != "data_base64" {
            switch v {
            case let s as String: attributes.set(k, s)
            case let n as NSNumber: attributes.set(k, n.stringValue)
            default: throw EnvelopeDecodingError("structured CloudEvent attribute '\(k)' is not a string")
            }
        }
        var data = Data()
        if let b64 = object["data_base64"] as? String {
            guard let d = Data(base64Encoded: b64) else {
                throw EnvelopeDecodingError("data_base64 is not valid base64")
            }
            data = d
        } else if let value = object["data"] {
            if let s = value as? String, let ct = attributes.dataContentType, !isJSON(ct) {
                data = Data(s.utf8)
            } else {
                do {
                    data = try JSONSerialization.data(withJSONObject: value, options: [.fragmentsAllowed, .sortedKeys])
                } catch { throw EnvelopeDecodingError("structured CloudEvent data cannot be re-encoded") }
            }
        }
        return try envelope(
            from: attributes, data: data,
            contentType: attributes.dataContentType ?? "application/json")
    }

    /// The attributes of an incoming event as they were read, by name (lower case); any other name is an extension.
    /// Fields rather than a dictionary: every event is read through here.
    private struct Attributes {
        var id, source, specVersion, type, time, subject, dataContentType, dataSchema, dataVersion: String?
        var correlationID, causationID, traceparent, idempotencyKey: String?
        var extensions: [String: String] = [:]

        /// An attribute's name: one of the attributes read into fields, or an extension's (lower case).
        enum Name {
            case known(Known)
            case other(String)
        }

        enum Known: CaseIterable {
            case id, source, specVersion, type, time, subject, dataContentType, dataSchema, dataVersion
            case correlationID, causationID, traceparent, idempotencyKey

            var name: String {
                typealias CE = WireNames.CloudEvents
                switch self {
                case .id: return CE.id
                case .source: return CE.source
                case .specVersion: return CE.specVersion
                case .type: return CE.type
                case .time: return CE.time
                case .subject: return CE.subject
                case .dataContentType: return CE.dataContentType
                case .dataSchema: return CE.dataSchema
                case .dataVersion: return CE.dataVersion
                case .correlationID: return CE.correlationID
                case .causationID: return CE.causationID
                case .traceparent: return CE.traceparent
                case .idempotencyKey: return CE.idempotencyKey
                }
            }

            /// The names' UTF-8, to tell which one a header names by comparing bytes.
            static let utf8 = allCases.map { (bytes: Array($0.name.utf8), attribute: $0) }
        }

        /// The attribute a header names (`cloudEvents_` or `cloudEvents:` and the name), nil for any other
        /// header. Names come as CloudEvents writes them, in lower case, and are matched as bytes: comparing
        /// Strings and cutting them cost more than the rest of reading a header, a dozen times per event.
        static func name(ofHeader header: String) -> Name? {
            typealias CE = WireNames.CloudEvents
            var header = header
            return header.withUTF8 { utf8 -> Name? in
                guard let rest = after(CE.prefix, in: utf8) ?? after(CE.legacyPrefix, in: utf8) else { return nil }
                for k in Known.utf8 where k.bytes.count == rest.count {
                    if k.bytes.withUnsafeBufferPointer({ same($0, rest) }) { return .known(k.attribute) }
                }
                return name(String(decoding: rest, as: UTF8.self))
            }
        }

        /// An attribute's name as given (any case; structured mode's keys, a header's in upper case).
        static func name(_ name: String) -> Name {
            let name = name.utf8.contains(where: { $0 >= 0x41 && $0 <= 0x5A }) ? name.lowercased() : name
            return Known.allCases.first(where: { $0.name == name }).map { .known($0) } ?? .other(name)
        }

        /// What follows `prefix` in `utf8`, nil when `utf8` does not start with it.
        private static func after(_ prefix: String, in utf8: UnsafeBufferPointer<UInt8>)
            -> UnsafeBufferPointer<UInt8>?
        {
            var prefix = prefix
            return prefix.withUTF8 { p in
                guard utf8.count >= p.count, same(p, UnsafeBufferPointer(rebasing: utf8[..<p.count])) else {
                    return nil
                }
                return UnsafeBufferPointer(rebasing: utf8[p.count...])
            }
        }

        private static func same(_ a: UnsafeBufferPointer<UInt8>, _ b: UnsafeBufferPointer<UInt8>) -> Bool {
            guard a.count == b.count else { return false }
            guard let p = a.baseAddress, let q = b.baseAddress else { return a.count == 0 }
            return memcmp(p, q, a.count) == 0
        }

        mutating func set(_ name: String, _ value: String) {
            set(Self.name(name), value)
        }

        mutating func set(_ name: Name, _ value: String) {
            switch name {
            case .known(.id): id = value
            case .known(.source): source = value
            case .known(.specVersion): specVersion = value
            case .known(.type): type = value
            case .known(.time): time = value
            case .known(.subject): subject = value
            case .known(.dataContentType): dataContentType = value
            case .known(.dataSchema): dataSchema = value
            case .known(.dataVersion): dataVersion = value
            case .known(.correlationID): correlationID = value
            case .known(.causationID): causationID = value
            case .known(.traceparent): traceparent = value
            case .known(.idempotencyKey): idempotencyKey = value
            case .other(let name): extensions[name] = value
            }
        }
    }

    private static func envelope(from a: Attributes, data: Data, contentType: String?)
        throws(EnvelopeDecodingError) -> EventEnvelope
    {
        typealias CE = WireNames.CloudEvents
        func required(_ value: String?, _ name: String) throws(EnvelopeDecodingError) -> String {
            guard let value, !value.isEmpty else {
                throw EnvelopeDecodingError("missing required CloudEvents attribute '\(name)'")
            }
            return value
        }
        let id = try required(a.id, CE.id)
        let type = try required(a.type, CE.type)
        let source = a.source ?? "unknown"
        let spec = a.specVersion ?? "1.0"
        guard spec == "1.0" else {
            throw EnvelopeDecodingError("unsupported CloudEvents specversion '\(spec)', expected 1.0")
        }
        var time: Date?
        if let t = a.time {
            guard let parsed = Timestamps.parse(t) else {
                throw EnvelopeDecodingError("attribute 'time' is not an RFC 3339 timestamp: '\(t)'")
            }
            time = parsed
        }
        var version = 1
        if let v = a.dataVersion {
            guard let n = Int(v), n > 0 else {
                throw EnvelopeDecodingError("attribute 'dataversion' is not a positive integer: '\(v)'")
            }
            version = n
        }
        var e = EventEnvelope(
            id: id, source: source, type: type, time: time, subject: a.subject, dataContentType: contentType,
            dataSchema: a.dataSchema, dataVersion: version, correlationID: a.correlationID,
            causationID: a.causationID, traceparent: a.traceparent, idempotencyKey: a.idempotencyKey,
            extensions: a.extensions, data: data)
        e.specVersion = spec
        return e
    }

    static func isJSON(_ contentType: String) -> Bool {
        if contentType == "application/json" { return true }
        let base =
            contentType.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces).lowercased() } ?? ""
        return base == "application/json" || base.hasSuffix("+json") || base == "text/json"
    }

    private static func stringValue(_ v: AMQPFieldValue) -> String? {
        switch v {
        case .string(let s): return s
        case .bytes(let b): return String(validating: b, as: UTF8.self)
        default: return nil
        }
    }

    static func typeName(_ v: AMQPFieldValue) -> String {
        switch v {
        case .bool: return "boolean"
        case .int8, .uint8, .int16, .uint16, .int32, .uint32, .int64: return "integer"
        case .float, .double, .decimal: return "number"
        case .string: return "string"
        case .bytes: return "byte array"
        case .timestamp: return "timestamp"
        case .table: return "table"
        case .array: return "array"
        case .void: return "void"
        }
    }
}

/// RFC 3339 timestamps as CloudEvents writes them: UTC, milliseconds (`2026-11-25T14:58:03.123Z`).
///
/// Written and read by hand on the hot path (every event carries one); other RFC 3339 forms (offsets,
/// no fraction) are read through Foundation's ISO 8601 parser.
public enum Timestamps {
    public static func format(_ date: Date) -> String {
        let millisTotal = (date.timeIntervalSince1970 * 1000).rounded(.down)
        guard millisTotal.isFinite, millisTotal >= 0, millisTotal < 253_402_300_800_000 else {
            return date.formatted(Date.ISO8601FormatStyle(includingFractionalSeconds: true))
        }
        let totalMillis = Int64(millisTotal)
        let millis = Int(totalMillis % 1000)
        let seconds = totalMillis / 1000
        let days = Int(seconds / 86_400)
        let secondOfDay = Int(seconds % 86_400)
        let (y, m, d) = civil(fromDays: days)
        var out = [UInt8]()
        out.reserveCapacity(24)
        func digits(_ value: Int, _ count: Int) {
            var divisor = 1
            for _ in 1..<count { divisor *= 10 }
            var v = value
            while divisor > 0 {
                out.append(UInt8(ascii: "0") + UInt8(v / divisor))
                v %= divisor
                divisor /= 10
            }
        }
        digits(y, 4)
        out.append(UInt8(ascii: "-"))
        digits(m, 2)
        out.append(UInt8(ascii: "-"))
        digits(d, 2)
        out.append(UInt8(ascii: "T"))
        digits(secondOfDay / 3600, 2)
        out.append(UInt8(ascii: ":"))
        digits(secondOfDay / 60 % 60, 2)
        out.append(UInt8(ascii: ":"))
        digits(secondOfDay % 60, 2)
        out.append(UInt8(ascii: "."))
        digits(millis, 3)
        out.append(UInt8(ascii: "Z"))
        return String(decoding: out, as: UTF8.self)
    }

    public static func parse(_ text: String) -> Date? {
        if let d = parseUTC(text) { return d }
        if let d = try? Date(text, strategy: Date.ISO8601FormatStyle(includingFractionalSeconds: true)) { return d }
        return try? Date(text, strategy: Date.ISO8601FormatStyle())
    }

    /// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (also with a lowercase `t`/`z`); nil for anything else.
    private static func parseUTC(_ text: String) -> Date? {
        let b = Array(text.utf8)
        guard b.count >= 20, b[4] == UInt8(ascii: "-"), b[7] == UInt8(ascii: "-"),
            b[10] | 0x20 == UInt8(ascii: "t"), b[13] == UInt8(ascii: ":"), b[16] == UInt8(ascii: ":"),
            b[b.count - 1] | 0x20 == UInt8(ascii: "z")
        else { return nil }
        func number(_ from: Int, _ count: Int) -> Int? {
            var v = 0
            for i in from..<(from + count) {
                let c = b[i]
                guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { return nil }
                v = v * 10 + Int(c - UInt8(ascii: "0"))
            }
            return v
        }
        guard let y = number(0, 4), let mo = number(5, 2), let d = number(8, 2), let h = number(11, 2),
            let mi = number(14, 2), let s = number(17, 2), (1...12).contains(mo), (1...31).contains(d), h < 24,
            mi < 60, s < 61
        else { return nil }
        var fraction = 0.0
        if b.count > 20 {
            guard b[19] == UInt8(ascii: "."), b.count > 21, let f = number(20, b.count - 21) else { return nil }
            fraction = Double(f) / pow(10, Double(b.count - 21))
        } else if b.count != 20 {
            return nil
        }
        let days = Self.days(fromCivil: y, mo, d)
        let seconds = Double(days) * 86_400 + Double(h * 3600 + mi * 60 + s)
        return Date(timeIntervalSince1970: seconds + fraction)
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    static func days(fromCivil year: Int, _ month: Int, _ day: Int) -> Int {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let doy = (153 * (month + (month > 2 ? -3 : 9)) + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }

    /// The date of a day count since 1970-01-01 (inverse of ``days(fromCivil:_:_:)``).
    static func civil(fromDays days: Int) -> (year: Int, month: Int, day: Int) {
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (month <= 2 ? 1 : 0), month, day)
    }
}
