import Foundation

/// The JSON coding of event payloads (`data`), with ``JSONCoding``'s settings: ISO 8601 dates, sorted keys,
/// slashes not escaped, Data as Base64, non-finite numbers refused.
///
/// Foundation's `JSONEncoder` and `JSONDecoder` cost about a tenth of a handler's CPU per event on the small
/// payloads events carry, mostly in set-up and bookkeeping that is the same for every value. This coder
/// parses into a small tree and encodes from one, and gives the same `DecodingError`s for the same faults,
/// so dead-letter reasons read the same. What it writes, Foundation reads back to equal values, and the
/// other way round (the payload coding tests check both ways).
enum PayloadJSON {
    static func encode<T: Encodable>(_ value: T) throws -> Data {
        let encoder = TreeEncoder(codingPath: [])
        let node = try encoder.box(value)
        var out: [UInt8] = []
        out.reserveCapacity(128)
        node.write(to: &out)
        return Data(out)
    }

    static func decode<T: Decodable>(_ type: T.Type, from data: Data) throws -> T {
        let root: JSONValue
        do {
            root = try data.withUnsafeBytes { raw in
                var parser = JSONParser(bytes: raw.bindMemory(to: UInt8.self))
                return try parser.parseDocument()
            }
        } catch let error as JSONParser.SyntaxError {
            throw DecodingError.dataCorrupted(
                .init(codingPath: [], debugDescription: "The given data was not valid JSON.", underlyingError: error))
        }
        return try TreeDecoder(value: root, codingPath: []).unbox(type)
    }
}

// MARK: - Parsing

/// A parsed JSON value. Numbers keep their text, converted when a type asks for them.
enum JSONValue {
    case null
    case bool(Bool)
    case number(String)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)

    var kind: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }
}

/// An object's members in document order; looked up by a scan while small, through an index when large.
struct JSONObject {
    var members: [(key: String, value: JSONValue)]
    private var index: [String: Int]?

    init(members: [(key: String, value: JSONValue)]) {
        self.members = members
        if members.count > 16 {
            // A repeated name: the first one counts, as with Foundation's decoder.
            index = Dictionary(members.enumerated().map { ($1.key, $0) }, uniquingKeysWith: { first, _ in first })
        }
    }

    subscript(key: String) -> JSONValue? {
        if let index { return index[key].map { members[$0].value } }
        return members.first(where: { $0.key == key })?.value
    }
}

struct JSONParser {
    struct SyntaxError: Error, CustomStringConvertible {
        var description: String
    }

    let bytes: UnsafeBufferPointer<UInt8>
    var position = 0
    var depth = 0
    /// Foundation's limit too: deeper input is refused instead of exhausting the stack.
    static let maxDepth = 512

    init(bytes: UnsafeBufferPointer<UInt8>) {
        self.bytes = bytes
    }

    mutating func parseDocument() throws -> JSONValue {
        skipWhitespace()
        let value = try parseValue()
        skipWhitespace()
        guard position == bytes.count else { throw error("unexpected text after the JSON value") }
        return value
    }

    private func error(_ what: String) -> SyntaxError {
        SyntaxError(description: "\(what) at offset \(position)")
    }

    private mutating func skipWhitespace() {
        while position < bytes.count {
            switch bytes[position] {
            case 0x20, 0x09, 0x0A, 0x0D: position += 1
            default: return
            }
        }
    }

    private mutating func parseValue() throws -> JSONValue {
        guard position < bytes.count else { throw error("unexpected end of data") }
        switch bytes[position] {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .number(try parseNumber())
        default: throw error("unexpected character")
        }
    }

    private mutating func literal(_ word: StaticString) throws {
        let n = word.utf8CodeUnitCount
        guard position + n <= bytes.count,
            memcmp(bytes.baseAddress! + position, word.utf8Start, n) == 0
        else { throw error("invalid literal") }
        position += n
    }

    private mutating func nest() throws {
        depth += 1
        guard depth <= Self.maxDepth else { throw error("nested too deep") }
    }

    private mutating func parseObject() throws -> JSONValue {
        try nest()
        position += 1
        var members: [(key: String, value: JSONValue)] = []
        skipWhitespace()
        if position < bytes.count, bytes[position] == UInt8(ascii: "}") {
            position += 1
            depth -= 1
            return .object(JSONObject(members: members))
        }
        while true {
            skipWhitespace()
            guard position < bytes.count, bytes[position] == UInt8(ascii: "\"") else {
                throw error("expected a member name")
            }
            let key = try parseString()
            skipWhitespace()
            guard position < bytes.count, bytes[position] == UInt8(ascii: ":") else { throw error("expected ':'") }
            position += 1
            skipWhitespace()
            members.append((key, try parseValue()))
            skipWhitespace()
            guard position < bytes.count else { throw error("unexpected end of data in an object") }
            if bytes[position] == UInt8(ascii: ",") {
                position += 1
                continue
            }
            guard bytes[position] == UInt8(ascii: "}") else { throw error("expected ',' or '}'") }
            position += 1
            depth -= 1
            return .object(JSONObject(members: members))
        }
    }

    private mutating func parseArray() throws -> JSONValue {
        try nest()
        position += 1
        var elements: [JSONValue] = []
        skipWhitespace()
        if position < bytes.count, bytes[position] == UInt8(ascii: "]") {
            position += 1
            depth -= 1
            return .array(elements)
        }
        while true {
            skipWhitespace()
            elements.append(try parseValue())
            skipWhitespace()
            guard position < bytes.count else { throw error("unexpected end of data in an array") }
            if bytes[position] == UInt8(ascii: ",") {
                position += 1
                continue
            }
            guard bytes[position] == UInt8(ascii: "]") else { throw error("expected ',' or ']'") }
            position += 1
            depth -= 1
            return .array(elements)
        }
    }

    /// -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
    private mutating func parseNumber() throws -> String {
        let start = position
        func digits() -> Int {
            let from = position
            while position < bytes.count, bytes[position] >= UInt8(ascii: "0"), bytes[position] <= UInt8(ascii: "9") {
                position += 1
            }
            return position - from
        }
        if bytes[position] == UInt8(ascii: "-") { position += 1 }
        guard position < bytes.count else { throw error("invalid number") }
        if bytes[position] == UInt8(ascii: "0") {
            position += 1
        } else if digits() == 0 {
            throw error("invalid number")
        }
        if position < bytes.count, bytes[position] == UInt8(ascii: ".") {
            position += 1
            guard digits() > 0 else { throw error("invalid number") }
        }
        if position < bytes.count, bytes[position] | 0x20 == UInt8(ascii: "e") {
            position += 1
            if position < bytes.count, bytes[position] == UInt8(ascii: "+") || bytes[position] == UInt8(ascii: "-") {
                position += 1
            }
            guard digits() > 0 else { throw error("invalid number") }
        }
        return String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self)
    }

    private mutating func parseString() throws -> String {
        position += 1  // the opening quote
        let start = position
        // Fast path: no escapes, the bytes are the string.
        while position < bytes.count {
            let b = bytes[position]
            if b == UInt8(ascii: "\"") {
                let s = try Self.validated(UnsafeBufferPointer(rebasing: bytes[start..<position]), at: start)
                position += 1
                return s
            }
            if b == UInt8(ascii: "\\") { break }
            guard b >= 0x20 else { throw error("unescaped control character in a string") }
            position += 1
        }
        var out = Array(bytes[start..<position])
        while position < bytes.count {
            let b = bytes[position]
            switch b {
            case UInt8(ascii: "\""):
                position += 1
                return try out.withUnsafeBufferPointer { try Self.validated($0, at: start) }
            case UInt8(ascii: "\\"):
                position += 1
                guard position < bytes.count else { throw error("unexpected end of data in a string") }
                let e = bytes[position]
                position += 1
                switch e {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var scalar = try hex4()
                    if (0xD800...0xDBFF).contains(scalar) {
                        // A high surrogate must be followed by an escaped low one.
                        guard position + 1 < bytes.count, bytes[position] == UInt8(ascii: "\\"),
                            bytes[position + 1] == UInt8(ascii: "u")
                        else { throw error("unpaired UTF-16 surrogate in a string") }
                        position += 2
                        let low = try hex4()
                        guard (0xDC00...0xDFFF).contains(low) else {
                            throw error("unpaired UTF-16 surrogate in a string")
                        }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    } else if (0xDC00...0xDFFF).contains(scalar) {
                        throw error("unpaired UTF-16 surrogate in a string")
                    }
                    out.append(contentsOf: String(Character(Unicode.Scalar(scalar)!)).utf8)
                default: throw error("invalid escape in a string")
                }
            default:
                guard b >= 0x20 else { throw error("unescaped control character in a string") }
                out.append(b)
                position += 1
            }
        }
        throw error("unexpected end of data in a string")
    }

    private mutating func hex4() throws -> UInt32 {
        guard position + 4 <= bytes.count else { throw error("invalid \\u escape") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = bytes[position]
            let d: UInt8
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = c - UInt8(ascii: "A") + 10
            default: throw error("invalid \\u escape")
            }
            v = v << 4 | UInt32(d)
            position += 1
        }
        return v
    }

    private static func validated(_ utf8: UnsafeBufferPointer<UInt8>, at offset: Int) throws -> String {
        guard let s = String(validating: utf8, as: UTF8.self) else {
            throw SyntaxError(description: "a string that is not valid UTF-8 at offset \(offset)")
        }
        return s
    }
}

// MARK: - Decoding

private struct TreeDecoder: Decoder {
    let value: JSONValue
    /// The path to the container this value is in, and its key there. The whole path is an array made
    /// when it is read (for an error, or a nested container), not one more array for every field decoded.
    private let parentPath: [CodingKey]
    private let key: CodingKey?
    var codingPath: [CodingKey] { key.map { parentPath + [$0] } ?? parentPath }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    init(value: JSONValue, codingPath: [CodingKey]) {
        self.init(value: value, in: codingPath, at: nil)
    }

    init(value: JSONValue, in parentPath: [CodingKey], at key: CodingKey?) {
        self.value = value
        self.parentPath = parentPath
        self.key = key
    }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        guard case .object(let object) = value else {
            throw mismatch([String: Any].self, value, codingPath)
        }
        return KeyedDecodingContainer(KeyedContainer<Key>(object: object, codingPath: codingPath))
    }

    func unkeyedContainer() throws -> UnkeyedDecodingContainer {
        guard case .array(let elements) = value else { throw mismatch([Any].self, value, codingPath) }
        return UnkeyedContainer(elements: elements, codingPath: codingPath)
    }

    func singleValueContainer() throws -> SingleValueDecodingContainer { self }

    /// A value of type `T`: the types JSON knows directly, the ones Foundation's decoder treats specially
    /// (Date, Data, URL, Decimal), else the type's own `init(from:)`.
    func unbox<T: Decodable>(_ type: T.Type) throws -> T {
        switch type {
        case is String.Type: return try decode(String.self) as! T
        case is Int.Type: return try decode(Int.self) as! T
        case is Double.Type: return try decode(Double.self) as! T
        case is Bool.Type: return try decode(Bool.self) as! T
        case is Date.Type:
            let text = try decode(String.self)
            guard let date = try? Date(text, strategy: .iso8601) else {
                throw DecodingError.dataCorrupted(
                    .init(codingPath: codingPath, debugDescription: "Expected date string to be ISO8601-formatted."))
            }
            return date as! T
        case is Data.Type:
            guard let data = Data(base64Encoded: try decode(String.self)) else {
                throw DecodingError.dataCorrupted(
                    .init(codingPath: codingPath, debugDescription: "Encountered Data is not valid Base64."))
            }
            return data as! T
        case is URL.Type:
            guard let url = URL(string: try decode(String.self)) else {
                throw DecodingError.dataCorrupted(
                    .init(codingPath: codingPath, debugDescription: "Invalid URL string."))
            }
            return url as! T
        case is Decimal.Type:
            let text = try numberText(Decimal.self)
            guard let decimal = Decimal(string: text, locale: Locale(identifier: "en_US_POSIX")) else {
                throw DecodingError.dataCorrupted(
                    .init(codingPath: codingPath, debugDescription: "Parsed JSON number <\(text)> is not a Decimal."))
            }
            return decimal as! T
        default:
            return try T(from: self)
        }
    }

    private func numberText(_ type: Any.Type) throws -> String {
        guard case .number(let text) = value else { throw mismatch(type, value, codingPath) }
        return text
    }

    fileprivate func integer<I: FixedWidthInteger>(_ type: I.Type) throws -> I {
        let text = try numberText(type)
        if let i = I(text, radix: 10) { return i }
        // 1e3 or 2.0: a whole number written another way.
        if let d = Double(text), d.rounded() == d, let i = I(exactly: d) { return i }
        throw DecodingError.dataCorrupted(
            .init(codingPath: codingPath, debugDescription: "Parsed JSON number <\(text)> does not fit in \(type)."))
    }

    fileprivate func floatingPoint<F: BinaryFloatingPoint & LosslessStringConvertible>(_ type: F.Type) throws -> F {
        let text = try numberText(type)
        guard let f = F(text), f.isFinite else {
            throw DecodingError.dataCorrupted(
                .init(codingPath: codingPath, debugDescription: "Parsed JSON number <\(text)> does not fit in \(type).")
            )
        }
        return f
    }
}

private func mismatch(_ type: Any.Type, _ value: JSONValue, _ path: [CodingKey]) -> DecodingError {
    if case .null = value {
        return .valueNotFound(
            type, .init(codingPath: path, debugDescription: "Cannot get \(type) -- found null value instead"))
    }
    return .typeMismatch(
        type, .init(codingPath: path, debugDescription: "Expected to decode \(type) but found \(value.kind) instead."))
}

extension TreeDecoder: SingleValueDecodingContainer {
    func decodeNil() -> Bool {
        if case .null = value { return true }
        return false
    }

    func decode(_ type: Bool.Type) throws -> Bool {
        guard case .bool(let b) = value else { throw mismatch(type, value, codingPath) }
        return b
    }

    func decode(_ type: String.Type) throws -> String {
        guard case .string(let s) = value else { throw mismatch(type, value, codingPath) }
        return s
    }

    func decode(_ type: Double.Type) throws -> Double { try floatingPoint(type) }
    func decode(_ type: Float.Type) throws -> Float { try floatingPoint(type) }
    func decode(_ type: Int.Type) throws -> Int { try integer(type) }
    func decode(_ type: Int8.Type) throws -> Int8 { try integer(type) }
    func decode(_ type: Int16.Type) throws -> Int16 { try integer(type) }
    func decode(_ type: Int32.Type) throws -> Int32 { try integer(type) }
    func decode(_ type: Int64.Type) throws -> Int64 { try integer(type) }
    func decode(_ type: UInt.Type) throws -> UInt { try integer(type) }
    func decode(_ type: UInt8.Type) throws -> UInt8 { try integer(type) }
    func decode(_ type: UInt16.Type) throws -> UInt16 { try integer(type) }
    func decode(_ type: UInt32.Type) throws -> UInt32 { try integer(type) }
    func decode(_ type: UInt64.Type) throws -> UInt64 { try integer(type) }
    func decode<T: Decodable>(_ type: T.Type) throws -> T { try unbox(type) }
}

private struct KeyedContainer<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let object: JSONObject
    let codingPath: [CodingKey]

    var allKeys: [Key] { object.members.compactMap { Key(stringValue: $0.key) } }

    func contains(_ key: Key) -> Bool { object[key.stringValue] != nil }

    private func child(_ key: Key) throws -> TreeDecoder {
        guard let value = object[key.stringValue] else {
            throw DecodingError.keyNotFound(
                key,
                .init(
                    codingPath: codingPath,
                    debugDescription: "No value associated with key \(key) (\"\(key.stringValue)\")."))
        }
        return TreeDecoder(value: value, in: codingPath, at: key)
    }

    func decodeNil(forKey key: Key) throws -> Bool { try child(key).decodeNil() }
    func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool { try child(key).decode(type) }
    func decode(_ type: String.Type, forKey key: Key) throws -> String { try child(key).decode(type) }
    func decode(_ type: Double.Type, forKey key: Key) throws -> Double { try child(key).decode(type) }
    func decode(_ type: Float.Type, forKey key: Key) throws -> Float { try child(key).decode(type) }
    func decode(_ type: Int.Type, forKey key: Key) throws -> Int { try child(key).decode(type) }
    func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 { try child(key).decode(type) }
    func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 { try child(key).decode(type) }
    func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 { try child(key).decode(type) }
    func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 { try child(key).decode(type) }
    func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt { try child(key).decode(type) }
    func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 { try child(key).decode(type) }
    func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 { try child(key).decode(type) }
    func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 { try child(key).decode(type) }
    func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 { try child(key).decode(type) }
    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T { try child(key).unbox(type) }

    func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws
        -> KeyedDecodingContainer<NestedKey>
    {
        try child(key).container(keyedBy: type)
    }

    func nestedUnkeyedContainer(forKey key: Key) throws -> UnkeyedDecodingContainer {
        try child(key).unkeyedContainer()
    }

    func superDecoder() throws -> Decoder {
        TreeDecoder(value: object["super"] ?? .null, in: codingPath, at: IndexKey(stringValue: "super"))
    }

    func superDecoder(forKey key: Key) throws -> Decoder {
        TreeDecoder(value: object[key.stringValue] ?? .null, in: codingPath, at: key)
    }
}

private struct UnkeyedContainer: UnkeyedDecodingContainer {
    let elements: [JSONValue]
    let codingPath: [CodingKey]
    private(set) var currentIndex = 0

    init(elements: [JSONValue], codingPath: [CodingKey]) {
        self.elements = elements
        self.codingPath = codingPath
    }

    var count: Int? { elements.count }
    var isAtEnd: Bool { currentIndex >= elements.count }

    private mutating func next(_ type: Any.Type) throws -> TreeDecoder {
        guard !isAtEnd else {
            throw DecodingError.valueNotFound(
                type,
                .init(
                    codingPath: codingPath + [IndexKey(intValue: currentIndex)],
                    debugDescription: "Unkeyed container is at end."))
        }
        let decoder = TreeDecoder(value: elements[currentIndex], in: codingPath, at: IndexKey(intValue: currentIndex))
        currentIndex += 1
        return decoder
    }

    mutating func decodeNil() throws -> Bool {
        guard !isAtEnd, case .null = elements[currentIndex] else { return false }
        currentIndex += 1
        return true
    }

    mutating func decode<T: Decodable>(_ type: T.Type) throws -> T {
        // Decoded before moving on: a failed element is not skipped (Foundation behaves the same).
        let decoder = try next(type)
        do { return try decoder.unbox(type) } catch {
            currentIndex -= 1
            throw error
        }
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws
        -> KeyedDecodingContainer<NestedKey>
    {
        try next([String: Any].self).container(keyedBy: type)
    }

    mutating func nestedUnkeyedContainer() throws -> UnkeyedDecodingContainer {
        try next([Any].self).unkeyedContainer()
    }

    mutating func superDecoder() throws -> Decoder { try next(Any.self) }
}

/// Array positions and the `super` key in coding paths.
private struct IndexKey: CodingKey {
    var stringValue: String
    var intValue: Int?
    init(stringValue: String) { self.stringValue = stringValue }
    init(intValue: Int) {
        self.stringValue = "Index \(intValue)"
        self.intValue = intValue
    }
}

// MARK: - Encoding

/// What an encoder builds: finished JSON text for scalars, boxes that containers keep filling for the rest.
private enum Node {
    case text(String)
    case object(ObjectBox)
    case array(ArrayBox)

    func write(to out: inout [UInt8]) {
        switch self {
        case .text(let s): out.append(contentsOf: s.utf8)
        case .object(let box):
            out.append(UInt8(ascii: "{"))
            // Sorted keys: the same value always gives the same bytes (a dictionary's order changes from
            // one process to the next). Structs mostly come in declaration order, often sorted already.
            var first = true
            for (key, value) in box.sortedMembers {
                if !first { out.append(UInt8(ascii: ",")) }
                first = false
                PayloadJSON.appendString(key, to: &out)
                out.append(UInt8(ascii: ":"))
                value.write(to: &out)
            }
            out.append(UInt8(ascii: "}"))
        case .array(let box):
            out.append(UInt8(ascii: "["))
            for (i, value) in box.elements.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                value.write(to: &out)
            }
            out.append(UInt8(ascii: "]"))
        }
    }
}

/// An object's members in the order they were set; setting a key again replaces its value.
private final class ObjectBox {
    private var members: [(key: String, value: Node)] = []
    /// Positions by key, once the object is too large for a scan.
    private var index: [String: Int]?

    subscript(key: String) -> Node? {
        get { position(of: key).map { members[$0].value } }
        set {
            guard let newValue else { return }
            if let i = position(of: key) {
                members[i].value = newValue
                return
            }
            members.append((key, newValue))
            if index != nil {
                index![key] = members.count - 1
            } else if members.count > 16 {
                index = Dictionary(members.enumerated().map { ($1.key, $0) }, uniquingKeysWith: { $1 })
            }
        }
    }

    private func position(of key: String) -> Int? {
        if let index { return index[key] }
        return members.firstIndex { $0.key == key }
    }

    /// By the keys' UTF-8 bytes, which is the order of their Unicode scalars.
    var sortedMembers: [(key: String, value: Node)] {
        let inOrder = zip(members, members.dropFirst()).allSatisfy { utf8Precedes($0.key, $1.key) }
        return inOrder ? members : members.sorted { utf8Precedes($0.key, $1.key) }
    }
}

private final class ArrayBox {
    var elements: [Node] = []
}

extension PayloadJSON {
    /// Appends a JSON string literal: quotes, backslash and control characters escaped (RFC 8259); slashes
    /// and non-ASCII as they are. Also what the ledger's outbox attributes are written with.
    static func appendString(_ s: String, to out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\""): out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\"")])
            case UInt8(ascii: "\\"): out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\\")])
            case 0x0A: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "n")])
            case 0x0D: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "r")])
            case 0x09: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "t")])
            case 0x08: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "b")])
            case 0x0C: out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "f")])
            case 0..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                out.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0")])
                out.append(hex[Int(b >> 4)])
                out.append(hex[Int(b & 0xF)])
            default: out.append(b)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}

private func quoted(_ s: String) -> String {
    var out: [UInt8] = []
    out.reserveCapacity(s.utf8.count + 2)
    PayloadJSON.appendString(s, to: &out)
    return String(decoding: out, as: UTF8.self)
}

private final class TreeEncoder: Encoder {
    let codingPath: [CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }
    /// What this encoder's value became, once a container or a single value was asked for.
    var node: Node? {
        didSet { if let node, let onSet { onSet(node) } }
    }
    /// For a super encoder: puts its value into the container that made it.
    var onSet: ((Node) -> Void)?

    init(codingPath: [CodingKey]) {
        self.codingPath = codingPath
    }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        let box: ObjectBox
        if case .object(let existing) = node {
            box = existing
        } else {
            box = ObjectBox()
            node = .object(box)
        }
        return KeyedEncodingContainer(KeyedEncoding<Key>(box: box, codingPath: codingPath))
    }

    func unkeyedContainer() -> UnkeyedEncodingContainer {
        let box: ArrayBox
        if case .array(let existing) = node {
            box = existing
        } else {
            box = ArrayBox()
            node = .array(box)
        }
        return UnkeyedEncoding(box: box, codingPath: codingPath)
    }

    func singleValueContainer() -> SingleValueEncodingContainer { SingleValueEncoding(encoder: self) }

    /// The node for a value: JSON's own types directly, Foundation's special cases as its encoder writes
    /// them, anything else through its `encode(to:)`.
    func box<T: Encodable>(_ value: T) throws -> Node {
        switch value {
        case let s as String: return .text(quoted(s))
        case let i as Int: return .text(String(i))
        case let d as Double: return .text(try number(d, at: codingPath))
        case let b as Bool: return .text(b ? "true" : "false")
        case let date as Date: return .text(quoted(date.formatted(.iso8601)))
        case let data as Data: return .text(quoted(data.base64EncodedString()))
        case let url as URL: return .text(quoted(url.absoluteString))
        case let decimal as Decimal:
            guard decimal.isFinite else { throw nonFinite(decimal, "Decimal.nan", at: codingPath) }
            return .text(decimal.description)
        default:
            let child = TreeEncoder(codingPath: codingPath)
            try value.encode(to: child)
            // A type that encodes nothing is an empty object, as with Foundation.
            return child.node ?? .object(ObjectBox())
        }
    }
}

/// The error for a number JSON cannot hold, as Foundation words it.
private func nonFinite(_ value: Any, _ name: String, at path: [CodingKey]) -> EncodingError {
    .invalidValue(value, .init(codingPath: path, debugDescription: "Unable to encode \(name) directly in JSON."))
}

/// A finite number as JSON, whole numbers without ".0" (as Foundation writes them).
private func number<F: BinaryFloatingPoint & LosslessStringConvertible>(_ f: F, at path: [CodingKey]) throws -> String {
    guard f.isFinite else { throw nonFinite(f, "\(F.self).\(f)", at: path) }
    var text = f.description
    if text.hasSuffix(".0") { text.removeLast(2) }
    return text
}

private struct SingleValueEncoding: SingleValueEncodingContainer {
    let encoder: TreeEncoder
    var codingPath: [CodingKey] { encoder.codingPath }

    func encodeNil() { encoder.node = .text("null") }
    func encode(_ value: Bool) { encoder.node = .text(value ? "true" : "false") }
    func encode(_ value: String) { encoder.node = .text(quoted(value)) }
    func encode(_ value: Double) throws { encoder.node = .text(try number(value, at: codingPath)) }
    func encode(_ value: Float) throws { encoder.node = .text(try number(value, at: codingPath)) }
    func encode(_ value: Int) { encoder.node = .text(String(value)) }
    func encode(_ value: Int8) { encoder.node = .text(String(value)) }
    func encode(_ value: Int16) { encoder.node = .text(String(value)) }
    func encode(_ value: Int32) { encoder.node = .text(String(value)) }
    func encode(_ value: Int64) { encoder.node = .text(String(value)) }
    func encode(_ value: UInt) { encoder.node = .text(String(value)) }
    func encode(_ value: UInt8) { encoder.node = .text(String(value)) }
    func encode(_ value: UInt16) { encoder.node = .text(String(value)) }
    func encode(_ value: UInt32) { encoder.node = .text(String(value)) }
    func encode(_ value: UInt64) { encoder.node = .text(String(value)) }
    func encode<T: Encodable>(_ value: T) throws { encoder.node = try encoder.box(value) }
}

private struct KeyedEncoding<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let box: ObjectBox
    let codingPath: [CodingKey]

    private func child(_ key: Key) -> TreeEncoder { TreeEncoder(codingPath: codingPath + [key]) }

    mutating func encodeNil(forKey key: Key) { box[key.stringValue] = .text("null") }
    mutating func encode(_ value: Bool, forKey key: Key) { box[key.stringValue] = .text(value ? "true" : "false") }
    mutating func encode(_ value: String, forKey key: Key) { box[key.stringValue] = .text(quoted(value)) }
    mutating func encode(_ value: Int, forKey key: Key) { box[key.stringValue] = .text(String(value)) }
    mutating func encode(_ value: Int64, forKey key: Key) { box[key.stringValue] = .text(String(value)) }
    mutating func encode(_ value: Double, forKey key: Key) throws {
        box[key.stringValue] = .text(try number(value, at: codingPath + [key]))
    }
    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        box[key.stringValue] = try child(key).box(value)
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key)
        -> KeyedEncodingContainer<NestedKey>
    {
        let nested = ObjectBox()
        box[key.stringValue] = .object(nested)
        return KeyedEncodingContainer(KeyedEncoding<NestedKey>(box: nested, codingPath: codingPath + [key]))
    }

    mutating func nestedUnkeyedContainer(forKey key: Key) -> UnkeyedEncodingContainer {
        let nested = ArrayBox()
        box[key.stringValue] = .array(nested)
        return UnkeyedEncoding(box: nested, codingPath: codingPath + [key])
    }

    mutating func superEncoder() -> Encoder { superEncoder(named: IndexKey(stringValue: "super")) }
    mutating func superEncoder(forKey key: Key) -> Encoder { superEncoder(named: key) }

    private func superEncoder(named key: CodingKey) -> Encoder {
        let encoder = TreeEncoder(codingPath: codingPath + [key])
        box[key.stringValue] = .text("{}")
        encoder.onSet = { [box] node in box[key.stringValue] = node }
        return encoder
    }
}

private struct UnkeyedEncoding: UnkeyedEncodingContainer {
    let box: ArrayBox
    let codingPath: [CodingKey]
    var count: Int { box.elements.count }

    private var elementPath: [CodingKey] { codingPath + [IndexKey(intValue: count)] }

    mutating func encodeNil() { box.elements.append(.text("null")) }
    mutating func encode(_ value: Bool) { box.elements.append(.text(value ? "true" : "false")) }
    mutating func encode(_ value: String) { box.elements.append(.text(quoted(value))) }
    mutating func encode(_ value: Int) { box.elements.append(.text(String(value))) }
    mutating func encode<T: Encodable>(_ value: T) throws {
        box.elements.append(try TreeEncoder(codingPath: elementPath).box(value))
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type)
        -> KeyedEncodingContainer<NestedKey>
    {
        let nested = ObjectBox()
        let path = elementPath
        box.elements.append(.object(nested))
        return KeyedEncodingContainer(KeyedEncoding<NestedKey>(box: nested, codingPath: path))
    }

    mutating func nestedUnkeyedContainer() -> UnkeyedEncodingContainer {
        let nested = ArrayBox()
        let path = elementPath
        box.elements.append(.array(nested))
        return UnkeyedEncoding(box: nested, codingPath: path)
    }

    mutating func superEncoder() -> Encoder {
        let index = box.elements.count
        let encoder = TreeEncoder(codingPath: elementPath)
        box.elements.append(.text("{}"))
        encoder.onSet = { [box] node in box.elements[index] = node }
        return encoder
    }
}

/// Whether `a` sorts before `b` by their UTF-8 bytes: the order of their Unicode scalars, and a fraction of
/// the cost of `<` (for sorting keys, where only a fixed order matters).
private func utf8Precedes(_ a: String, _ b: String) -> Bool {
    var a = a
    var b = b
    return a.withUTF8 { x in
        b.withUTF8 { y in
            let common = min(x.count, y.count)
            let order = common == 0 ? 0 : memcmp(x.baseAddress!, y.baseAddress!, common)
            return order != 0 ? order < 0 : x.count < y.count
        }
    }
}
