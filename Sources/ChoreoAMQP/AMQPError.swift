/// An error from the AMQP layer: what failed, the broker's reply when there was one, and why.
///
/// Every C status and every broker close goes through one place that builds this type, so callers
/// can switch on ``code`` (a struct of static constants, extensible without breaking anyone) and
/// show ``description`` to a person as it is. Credentials never appear in it.
///
/// ```swift
/// do { try await channel.declareQueue("orders", options: .init(durable: false)) }
/// catch let error as AMQPError where error.replyCode == AMQPError.ReplyCode.preconditionFailed { ... }
/// ```
public struct AMQPError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The kind of failure.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        let raw: String
        public var description: String { raw }

        /// TCP or TLS connection could not be established (refused, unreachable, timed out).
        public static let connectionFailed = Code(raw: "connectionFailed")
        /// The broker refused the credentials (403 ACCESS_REFUSED during login).
        public static let authenticationFailed = Code(raw: "authenticationFailed")
        /// The broker closed the connection (connection.close with a reply code).
        public static let connectionClosed = Code(raw: "connectionClosed")
        /// The socket went away or the heartbeat timed out.
        public static let connectionLost = Code(raw: "connectionLost")
        /// The broker closed a channel (channel.close with a reply code); the connection is still usable.
        public static let channelClosed = Code(raw: "channelClosed")
        /// A publish was negatively acknowledged by the broker.
        public static let publishNacked = Code(raw: "publishNacked")
        /// A mandatory publish could not be routed to any queue (basic.return).
        public static let unroutable = Code(raw: "unroutable")
        /// The broker cancelled a consumer (queue deleted, failover).
        public static let consumerCancelled = Code(raw: "consumerCancelled")
        /// An ack, nack or reject named a delivery from a channel that has since been reopened.
        public static let staleDelivery = Code(raw: "staleDelivery")
        /// The connection or channel was closed by this process.
        public static let closed = Code(raw: "closed")
        /// An argument was invalid before anything was sent (a bad URL, a header the protocol cannot carry).
        public static let invalidArgument = Code(raw: "invalidArgument")
        /// The broker did not answer within the configured time.
        public static let timeout = Code(raw: "timeout")
        /// rabbitmq-c reported a protocol or library failure.
        public static let protocolFailure = Code(raw: "protocolFailure")
    }

    /// AMQP 0-9-1 reply codes that the broker sends and that callers commonly match on.
    public enum ReplyCode {
        public static let contentTooLarge: UInt16 = 311
        public static let noRoute: UInt16 = 312
        public static let connectionForced: UInt16 = 320
        public static let invalidPath: UInt16 = 402
        public static let accessRefused: UInt16 = 403
        public static let notFound: UInt16 = 404
        public static let resourceLocked: UInt16 = 405
        public static let preconditionFailed: UInt16 = 406
        public static let frameError: UInt16 = 501
        public static let syntaxError: UInt16 = 502
        public static let commandInvalid: UInt16 = 503
        public static let channelError: UInt16 = 504
        public static let unexpectedFrame: UInt16 = 505
        public static let resourceError: UInt16 = 506
        public static let notAllowed: UInt16 = 530
        public static let notImplemented: UInt16 = 540
        public static let internalError: UInt16 = 541
    }

    /// What kind of failure this is.
    public var code: Code
    /// The broker's reply code (404, 406, 320, ...) when the broker said why; `nil` for local failures.
    public var replyCode: UInt16?
    /// The broker's reply text, or a description of the local failure.
    public var message: String
    /// The operation that failed, for example `queue.declare "orders"` or `connect 127.0.0.1:5672`.
    public var operation: String

    public init(_ code: Code, replyCode: UInt16? = nil, message: String, operation: String) {
        self.code = code
        self.replyCode = replyCode
        self.message = message
        self.operation = operation
    }

    public var description: String {
        if let replyCode {
            return "\(operation) failed: \(replyCode) \(message)"
        }
        return "\(operation) failed: \(message)"
    }
}
