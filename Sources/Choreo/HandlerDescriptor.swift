import ChoreoAMQP
import Foundation

/// A handler with its input type erased, as the runner drives it.
package struct HandlerDescriptor: Sendable {
    /// A decoded input, ready to run.
    package struct Prepared: Sendable {
        package var key: String?
        package var run: @Sendable (HandlerContext) async throws -> Void
    }

    package let name: String
    package let inputType: String
    package let inputVersion: Int
    package let acceptedVersions: Set<Int>
    package let emitTypes: [String]
    package let emitTypeSet: Set<String>
    package let retryPolicy: RetryPolicy
    package let concurrency: Int?
    /// Decodes (upcasting when needed) and binds the handler. Throws ``EventRejection`` for input no retry can fix.
    package let prepare: @Sendable (EventEnvelope) throws(EventRejection) -> Prepared

    package init<H: EventHandler>(_ handler: H) {
        name = handler.name
        inputType = H.Input.eventType
        inputVersion = H.Input.schemaVersion
        acceptedVersions = handler.acceptedVersions
        emitTypes = handler.emits.map { $0.eventType }
        emitTypeSet = Set(emitTypes)
        retryPolicy = handler.retryPolicy
        concurrency = handler.concurrency
        prepare = { envelope throws(EventRejection) in
            guard envelope.type == H.Input.eventType else {
                throw EventRejection(
                    errorType: "UnknownEventType",
                    message:
                        "event type '\(envelope.type)' is not handled by \(handler.name) (it handles '\(H.Input.eventType)')"
                )
            }
            if let ct = envelope.dataContentType, !EnvelopeCodec.isJSON(ct) {
                throw EventRejection(
                    errorType: "UnsupportedContentType",
                    message: "content type '\(ct)' is not JSON; \(handler.name) decodes application/json")
            }
            var data = envelope.data
            if !handler.acceptedVersions.contains(envelope.dataVersion) {
                do {
                    data = try handler.upcast(data, from: envelope.dataVersion)
                } catch {
                    throw EventRejection(errorType: "UnsupportedVersion", message: String(describing: error))
                }
            }
            if data.isEmpty {
                throw EventRejection(
                    errorType: "DecodingError", message: "empty body: expected a JSON '\(H.Input.eventType)' event")
            }
            let event: H.Input
            do {
                event = try PayloadJSON.decode(H.Input.self, from: data)
            } catch let error as DecodingError {
                throw EventRejection(errorType: "DecodingError", message: Self.describe(error, type: H.Input.eventType))
            } catch {
                throw EventRejection(errorType: "DecodingError", message: "body is not valid JSON: \(error)")
            }
            return Prepared(key: handler.idempotencyKey(for: event, envelope: envelope)) { context in
                try await handler.handle(event, context: context)
            }
        }
    }

    /// An input that decoded and that the handler accepts, with the key it runs under.
    package struct Admission: Sendable {
        package var envelope: EventEnvelope
        package var prepared: Prepared
        /// The handler's key function, else the event's idempotency key, else its id.
        package var key: String
    }

    /// Why an input was refused; `envelope` is there when the envelope itself decoded.
    package struct Refusal: Error {
        package var errorType: String
        package var message: String
        package var envelope: EventEnvelope?
    }

    /// Step 1 of the delivery protocol, for the runner and the test harness alike: decodes the envelope,
    /// lets the handler vet it and chooses the idempotency key.
    package func admit(body: Data, properties: AMQPProperties) -> Result<Admission, Refusal> {
        let envelope: EventEnvelope
        do throws(EnvelopeDecodingError) {
            envelope = try EnvelopeCodec.decode(body: body, properties: properties)
        } catch {
            return .failure(Refusal(errorType: "EnvelopeDecodingError", message: error.reason, envelope: nil))
        }
        do throws(EventRejection) {
            let prepared = try prepare(envelope)
            let key = prepared.key ?? envelope.idempotencyKey ?? envelope.id
            // Under an empty key every such event would be a duplicate of the first and be dropped unhandled.
            guard !key.isEmpty else {
                throw EventRejection(
                    errorType: "EmptyIdempotencyKey",
                    message: prepared.key != nil
                        ? "\(name)'s key function gave an empty key: it must name the effect, or return nil to use "
                            + "the event's"
                        : "attribute 'idempotencykey' is empty: give a key that names the effect, or leave the "
                            + "attribute out to deduplicate by event id")
            }
            return .success(Admission(envelope: envelope, prepared: prepared, key: key))
        } catch {
            return .failure(Refusal(errorType: error.errorType, message: error.message, envelope: envelope))
        }
    }

    package func validate() throws {
        let allowed = Set("abcdefghijklmnopqrstuvwxyz0123456789-_")
        guard !name.isEmpty, name.allSatisfy({ allowed.contains($0) }) else {
            throw ConfigurationError("handler name '\(name)' must be lowercase letters, digits, '-' or '_'")
        }
        try retryPolicy.validate(handler: name)
    }

    /// A Swift type as the JSON a person would write for it: "an object", not "Dictionary<String, Any>".
    static func jsonKind(_ t: Any.Type) -> String {
        switch t {
        case is String.Type, is Substring.Type, is Character.Type, is URL.Type, is UUID.Type: return "a string"
        case is Bool.Type: return "true or false"
        case is any BinaryInteger.Type: return "an integer"
        case is any BinaryFloatingPoint.Type, is Decimal.Type: return "a number"
        default:
            let name = String(describing: t)
            if name.hasPrefix("Dictionary<") || name.hasPrefix("KeyedDecodingContainer") { return "an object" }
            if name.hasPrefix("Array<") || name.hasPrefix("UnkeyedDecodingContainer") { return "an array" }
            return name
        }
    }

    /// Y of a decoder's "Expected to decode X but found Y instead.", with an article as ``jsonKind(_:)`` writes
    /// it (Foundation's decoder gives none).
    static func foundKind(in description: String) -> String? {
        guard let start = description.range(of: " but found "),
            let end = description[start.upperBound...].range(of: " instead")
        else { return nil }
        let words = String(description[start.upperBound..<end.lowerBound])
        let named = [
            "number": "a number", "string": "a string", "bool": "a boolean", "boolean": "a boolean",
            "array": "an array", "dictionary": "an object", "object": "an object",
        ]
        return named[words] ?? words
    }

    /// What is wrong with JSON that did not decode as `type`, for a person; `whole` names what was read.
    package static func describe(_ error: DecodingError, type: String, whole: String = "body") -> String {
        func path(_ c: [CodingKey]) -> String {
            c.isEmpty ? "the top level" : c.map(\.stringValue).joined(separator: ".")
        }
        switch error {
        case .dataCorrupted(let c):
            if c.codingPath.isEmpty { return "\(whole) is not valid JSON (or not UTF-8): \(c.debugDescription)" }
            return "invalid value at \(path(c.codingPath)) in '\(type)': \(c.debugDescription)"
        case .keyNotFound(let key, let c):
            return "JSON does not match '\(type)': missing key '\(path(c.codingPath + [key]))'"
        case .typeMismatch(let t, let c):
            let found = Self.foundKind(in: c.debugDescription).map { ", found \($0)" }
            return "JSON does not match '\(type)': expected \(jsonKind(t)) at \(path(c.codingPath))\(found ?? "")"
        case .valueNotFound(let t, let c):
            return "JSON does not match '\(type)': null where \(jsonKind(t)) is required at \(path(c.codingPath))"
        @unknown default:
            return "JSON does not match '\(type)': \(error)"
        }
    }
}

/// Input that no retry can fix; dead-lettered at once.
package struct EventRejection: Error, CustomStringConvertible {
    package var errorType: String
    package var message: String
    package var description: String { message }
}
