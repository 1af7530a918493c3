/// Every header, queue and exchange name Choreo puts on the wire, in one place.
///
/// Other languages rely on these (see the README's wire format); change none of them lightly.
public enum WireNames {
    /// The topic exchange a mesh publishes events to; routing key = event type.
    public static let defaultExchange = "choreo.events"
    /// The durable stream every runner appends its manifest to on start.
    public static let registryStream = "choreo.registry"

    /// CloudEvents binary-mode attribute headers (AMQP binding, `cloudEvents_` prefix).
    public enum CloudEvents {
        public static let prefix = "cloudEvents_"
        /// The older prefix some clients send; accepted on input.
        public static let legacyPrefix = "cloudEvents:"
        public static let id = "id"
        public static let source = "source"
        public static let specVersion = "specversion"
        public static let type = "type"
        public static let time = "time"
        public static let subject = "subject"
        public static let dataContentType = "datacontenttype"
        public static let dataSchema = "dataschema"
        public static let correlationID = "correlationid"
        public static let causationID = "causationid"
        public static let traceparent = "traceparent"
        /// W3C `tracestate`, kept among an envelope's `extensions` (CloudEvents' distributed-tracing extension).
        public static let tracestate = "tracestate"
        public static let idempotencyKey = "idempotencykey"
        /// Schema version of `data`, a decimal integer.
        public static let dataVersion = "dataversion"
        public static let structuredContentType = "application/cloudevents+json"
    }

    /// Headers Choreo adds for retries and dead letters. All flat strings (streams drop tables).
    public enum Headers {
        /// Which delivery attempt of the handler this copy is (1 for the first).
        public static let attempt = "choreo-attempt"
        /// The handler a retry or replay is meant for.
        public static let targetHandler = "choreo-target-handler"
        public static let deadLetterHandler = "choreo-dl-handler"
        public static let deadLetterService = "choreo-dl-service"
        public static let deadLetterErrorType = "choreo-dl-error-type"
        public static let deadLetterErrorMessage = "choreo-dl-error-message"
        public static let deadLetterAttempts = "choreo-dl-attempts"
        public static let deadLetterFirstFailure = "choreo-dl-first-failure"
        public static let deadLetterLastFailure = "choreo-dl-last-failure"
        public static let deadLetterOriginalExchange = "choreo-dl-original-exchange"
        public static let deadLetterOriginalRoutingKey = "choreo-dl-original-routing-key"
        public static let deadLetterQueue = "choreo-dl-queue"
        /// Where the event was first published, carried on retried copies.
        public static let originExchange = "choreo-origin-exchange"
        public static let originRoutingKey = "choreo-origin-routing-key"
        /// When the first failure happened, carried on retried copies (RFC 3339).
        public static let firstFailure = "choreo-first-failure"
    }

    /// Queue names of one handler: `choreo.<service>.<handler>` and its satellites.
    public struct HandlerQueues: Sendable, Hashable {
        public let service: String
        public let handler: String

        public init(service: String, handler: String) {
            self.service = service
            self.handler = handler
        }

        public var main: String { "choreo.\(service).\(handler)" }
        public var deadLetter: String { "\(main).dlq" }
        public func retry(delay: Duration) -> String { "\(main).retry.\(Self.label(delay))" }

        static func label(_ d: Duration) -> String {
            let ms = d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000
            return ms % 1000 == 0 ? "\(ms / 1000)s" : "\(ms)ms"
        }
    }
}
