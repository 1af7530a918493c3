import Foundation
import Testing

@testable import Choreo

/// The runtime's payload coder against Foundation's, configured as `JSONCoding` is: what one writes the
/// other reads back to an equal value, and malformed input fails the same way.
@Suite("Payload JSON coding")
struct PayloadJSONTests {
    enum Status: String, Codable, Equatable { case open, closed }
    enum Shape: Codable, Equatable {
        case circle(radius: Double)
        case square(side: Int, label: String?)
        case none
    }
    struct Line: Codable, Equatable {
        var sku: String
        var quantity: Int
        var price: Decimal
    }
    struct Everything: Codable, Equatable {
        var text: String
        var escapes: String
        var unicode: String
        var int: Int
        var negative: Int64
        var big: UInt64
        var small: Int8
        var double: Double
        var tiny: Double
        var huge: Double
        var float: Float
        var flag: Bool
        var missing: String?
        var present: Int?
        var date: Date
        var data: Data
        var url: URL
        var status: Status
        var lines: [Line]
        var matrix: [[Int]]
        var byName: [String: Int]
        var byNumber: [Int: String]
        var shapes: [Shape]
        var nothing: [String]
        var nested: [String: [String: Bool]]
    }

    static let sample = Everything(
        text: "plain", escapes: "quote \" backslash \\ slash / newline \n tab \t nul \u{0} bell \u{7}",
        unicode: "grüße ✓ 𝄞 日本", int: 42, negative: -9_000_000_000_000_000, big: UInt64.max, small: -128,
        double: 0.1, tiny: 5e-324, huge: 1.7976931348623157e308, float: 1.5, flag: true, missing: nil, present: 7,
        date: Date(timeIntervalSince1970: 1_764_000_000), data: Data([0, 1, 2, 253, 254, 255]),
        url: URL(string: "https://example.com/a/b?c=d&e=f")!, status: .closed,
        lines: [Line(sku: "A-1", quantity: 2, price: Decimal(string: "19.99")!)], matrix: [[1, 2], [], [3]],
        byName: ["b": 2, "a": 1, "": 0], byNumber: [3: "three", -1: "minus one"],
        shapes: [.circle(radius: 2.5), .square(side: 3, label: nil), .square(side: 4, label: "x"), .none],
        nothing: [], nested: ["x": ["y": true, "z": false]])

    @Test("what it writes, Foundation reads back as the same value, and the other way round")
    func crossCompatible() throws {
        let ours = try PayloadJSON.encode(Self.sample)
        #expect(try JSONCoding.decoder.decode(Everything.self, from: ours) == Self.sample)
        let foundations = try JSONCoding.encoder.encode(Self.sample)
        #expect(try PayloadJSON.decode(Everything.self, from: foundations) == Self.sample)
        #expect(try PayloadJSON.decode(Everything.self, from: ours) == Self.sample)
    }

    @Test("output is compact, keys sorted, slashes kept, control characters escaped")
    func outputForm() throws {
        struct Small: Codable {
            var b: String
            var a: Int
            var c: Double
        }
        let text = String(decoding: try PayloadJSON.encode(Small(b: "x/y\u{1}\"", a: -3, c: 2)), as: UTF8.self)
        #expect(text == #"{"a":-3,"b":"x/y\u0001\"","c":2}"#)
    }

    @Test("the same value always gives the same bytes")
    func deterministic() throws {
        let first = try PayloadJSON.encode(Self.sample)
        for _ in 0..<5 { #expect(try PayloadJSON.encode(Self.sample) == first) }
    }

    @Test("whitespace, escapes, surrogate pairs and numbers written in other forms decode")
    func liberalInput() throws {
        struct Input: Codable, Equatable {
            var s: String
            var i: Int
            var d: Double
            var u: UInt8
        }
        let json = #" { "s" : "\u00e9\ud834\udd1e\/\b\f\r" , "i" : 1e3 , "d" : -0.5E-2 , "u" : 255.0 } "#
        let decoded = try PayloadJSON.decode(Input.self, from: Data(json.utf8))
        #expect(decoded == Input(s: "é𝄞/\u{8}\u{c}\r", i: 1000, d: -0.005, u: 255))
        #expect(try PayloadJSON.decode(Int.self, from: Data("  12 ".utf8)) == 12)
        #expect(try PayloadJSON.decode([Int?].self, from: Data("[1,null,3]".utf8)) == [1, nil, 3])
    }

    @Test("a dead letter's reason names JSON's kinds, where they were expected and what was found")
    func wrongShapeReasons() throws {
        struct Order: Codable {
            var id: String
            var quantity: Int
            var price: Double
            var gift: Bool
            var lines: [String]
        }
        func reason(_ json: String) -> String {
            do {
                _ = try PayloadJSON.decode(Order.self, from: Data(json.utf8))
                return "decoded"
            } catch let error as DecodingError {
                return HandlerDescriptor.describe(error, type: "order.placed")
            } catch {
                return "\(error)"
            }
        }
        let valid = #""id":"o-1","quantity":2,"price":9.5,"gift":false,"lines":["a"]"#
        #expect(reason("{\(valid)}") == "decoded")
        #expect(
            reason("[1,2]") == "JSON does not match 'order.placed': expected an object at the top level, found an array"
        )
        #expect(
            reason("{\(valid.replacingOccurrences(of: "2,", with: "\"two\","))}")
                == "JSON does not match 'order.placed': expected an integer at quantity, found a string")
        #expect(
            reason("{\(valid.replacingOccurrences(of: "9.5", with: "true"))}")
                == "JSON does not match 'order.placed': expected a number at price, found a boolean")
        #expect(
            reason("{\(valid.replacingOccurrences(of: "false", with: "0"))}")
                == "JSON does not match 'order.placed': expected true or false at gift, found a number")
        #expect(
            reason("{\(valid.replacingOccurrences(of: "[\"a\"]", with: "{}"))}")
                == "JSON does not match 'order.placed': expected an array at lines, found an object")
        #expect(
            reason("{\(valid.replacingOccurrences(of: "\"o-1\"", with: "null"))}")
                == "JSON does not match 'order.placed': null where a string is required at id")
        #expect(reason("{\"id\":\"o-1\"}") == "JSON does not match 'order.placed': missing key 'quantity'")
    }

    @Test("malformed JSON is a dataCorrupted error at the top level; Foundation refuses it too")
    func malformed() {
        let inputs = [
            "hello", "{", "{\"a\":}", "{\"a\" 1}", "[1,]", "[1 2]", "01", "1.", "-", "1e", "\"unterminated",
            "\"bad \\x escape\"", "\"\\ud800 alone\"", "\"raw \n newline\"", "nul", "{} {}", "{\"a\":1,}", "",
            String(repeating: "[", count: 600) + String(repeating: "]", count: 600),
        ]
        for input in inputs {
            do {
                _ = try Self.ours(Data(input.utf8))
                Issue.record("accepted \(input.prefix(20).debugDescription)")
            } catch DecodingError.dataCorrupted(let context) {
                #expect(context.codingPath.isEmpty)
                #expect(context.debugDescription == "The given data was not valid JSON.")
            } catch {
                Issue.record("\(input.prefix(20).debugDescription): \(error)")
            }
            // Foundation checks the shape before all of the syntax, so its error may be a type mismatch.
            #expect(throws: DecodingError.self, "\(input.prefix(20).debugDescription)") {
                try Self.foundations(Data(input.utf8))
            }
        }
        // Not UTF-8: refused, not decoded into something else.
        #expect(throws: DecodingError.self) { try Self.ours(Data([0x22, 0xFF, 0xFE, 0x22])) }
        #expect(throws: DecodingError.self) { try Self.ours(Data([0xFF])) }
    }

    static func ours(_ data: Data) throws -> [String: [Int]] {
        try PayloadJSON.decode([String: [Int]].self, from: data)
    }
    static func foundations(_ data: Data) throws -> [String: [Int]] {
        try JSONCoding.decoder.decode([String: [Int]].self, from: data)
    }

    @Test("wrong shapes give the errors Foundation gives, with the same coding paths")
    func shapeErrors() throws {
        struct Target: Codable {
            var n: Int
            var items: [Int]
            var inner: Inner
        }
        struct Inner: Codable { var flag: Bool }
        let cases = [
            #"{"items":[],"inner":{"flag":true}}"#,  // key missing
            #"{"n":"1","items":[],"inner":{"flag":true}}"#,  // string for Int
            #"{"n":null,"items":[],"inner":{"flag":true}}"#,  // null for Int
            #"{"n":1,"items":[1,"2"],"inner":{"flag":true}}"#,  // in an array
            #"{"n":1,"items":[],"inner":{"flag":1}}"#,  // number for Bool
            #"[1]"#,  // array for an object
        ]
        for json in cases {
            let data = Data(json.utf8)
            let ours = Self.describe { _ = try PayloadJSON.decode(Target.self, from: data) }
            let foundations = Self.describe { _ = try JSONCoding.decoder.decode(Target.self, from: data) }
            #expect(ours == foundations, "\(json)")
        }
        // A number that does not fit: Foundation reports it without a path; this coder names the key.
        for json in [#"{"n":1.5,"items":[],"inner":{"flag":true}}"#, #"{"n":1e30,"items":[],"inner":{"flag":true}}"#] {
            let data = Data(json.utf8)
            #expect(Self.describe { _ = try PayloadJSON.decode(Target.self, from: data) } == "dataCorrupted at n")
            #expect(Self.describe { _ = try JSONCoding.decoder.decode(Target.self, from: data) } == "dataCorrupted at ")
        }
    }

    /// The kind of a decoding error and its coding path.
    static func describe(_ body: () throws -> Void) -> String {
        do {
            try body()
            return "no error"
        } catch let error as DecodingError {
            func path(_ c: DecodingError.Context) -> String { c.codingPath.map(\.stringValue).joined(separator: ".") }
            switch error {
            case .keyNotFound(let key, let c): return "keyNotFound \(key.stringValue) at \(path(c))"
            case .typeMismatch(let t, let c): return "typeMismatch \(t) at \(path(c))"
            case .valueNotFound(let t, let c): return "valueNotFound \(t) at \(path(c))"
            case .dataCorrupted(let c): return "dataCorrupted at \(path(c))"
            @unknown default: return "\(error)"
            }
        } catch {
            return "\(error)"
        }
    }

    @Test("member names are matched whether written plainly, with escapes or in other scripts")
    func memberNames() throws {
        struct Names: Codable, Equatable {
            var plain: Int
            var grüße: Int
            var quoted: Int
            enum CodingKeys: String, CodingKey {
                case plain
                case grüße
                case quoted = "a\"b"
            }
        }
        let json = #"{"pl\u0061in":1,"grüße":2,"a\"b":3,"plain":4}"#
        // A repeated name: the first one counts, as with Foundation.
        let expected = Names(plain: 1, grüße: 2, quoted: 3)
        #expect(try PayloadJSON.decode(Names.self, from: Data(json.utf8)) == expected)
        #expect(try JSONCoding.decoder.decode(Names.self, from: Data(json.utf8)) == expected)
        let many = "{" + (0..<40).map { "\"k\($0)\":\($0)" }.joined(separator: ",") + ",\"k7\":70}"
        let byName = try PayloadJSON.decode([String: Int].self, from: Data(many.utf8))
        #expect(byName.count == 40 && byName["k7"] == 7 && byName["k39"] == 39)
        #expect(try JSONCoding.decoder.decode([String: Int].self, from: Data(many.utf8)) == byName)
    }

    @Test("non-finite numbers are refused, as by Foundation")
    func nonFinite() {
        #expect(throws: EncodingError.self) { try PayloadJSON.encode([Double.nan]) }
        #expect(throws: EncodingError.self) { try PayloadJSON.encode(["x": Float.infinity]) }
    }

    @Test("classes that encode through a super encoder round-trip")
    func superEncoders() throws {
        class Base: Codable {
            var id = 1
        }
        final class Derived: Base {
            var name = "n"
            enum K: CodingKey { case name }
            override init() { super.init() }
            required init(from decoder: Decoder) throws {
                let c = try decoder.container(keyedBy: K.self)
                name = try c.decode(String.self, forKey: .name)
                try super.init(from: c.superDecoder())
            }
            override func encode(to encoder: Encoder) throws {
                var c = encoder.container(keyedBy: K.self)
                try c.encode(name, forKey: .name)
                try super.encode(to: c.superEncoder())
            }
        }
        let value = Derived()
        value.id = 9
        value.name = "nine"
        let ours = try PayloadJSON.encode(value)
        #expect(String(decoding: ours, as: UTF8.self) == #"{"name":"nine","super":{"id":9}}"#)
        let back = try JSONCoding.decoder.decode(Derived.self, from: ours)
        #expect(back.id == 9 && back.name == "nine")
        let again = try PayloadJSON.decode(Derived.self, from: try JSONCoding.encoder.encode(value))
        #expect(again.id == 9 && again.name == "nine")
    }
}
