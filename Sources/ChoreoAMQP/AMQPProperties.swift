import Foundation

/// The basic properties of a message (content type, headers, persistence, ids).
///
/// Every field is optional; only the ones set are sent.
public struct AMQPProperties: Sendable, Hashable {
    public var contentType: String?
    public var contentEncoding: String?
    /// The headers by name. Headers received, or set as a list (``headerFields``), are kept as that list
    /// in its order, and this table is built from them each time it is read.
    public var headers: AMQPTable? {
        get { headerStorage.table }
        set { headerStorage = HeaderStorage(newValue) }
    }
    /// 2 for persistent, 1 for transient. ``persistent`` reads and writes it as a Bool.
    public var deliveryMode: UInt8?
    public var priority: UInt8?
    public var correlationID: String?
    public var replyTo: String?
    /// Per-message TTL in milliseconds, as a decimal string (AMQP's own representation).
    public var expiration: String?
    public var messageID: String?
    /// Seconds since the Unix epoch.
    public var timestamp: UInt64?
    public var type: String?
    public var userID: String?
    public var appID: String?
    /// Read directly by `CArena`, which writes a list as it is and a table sorted.
    private(set) var headerStorage = HeaderStorage(nil)

    public init(
        contentType: String? = nil,
        contentEncoding: String? = nil,
        headers: AMQPTable? = nil,
        deliveryMode: UInt8? = nil,
        priority: UInt8? = nil,
        correlationID: String? = nil,
        replyTo: String? = nil,
        expiration: String? = nil,
        messageID: String? = nil,
        timestamp: UInt64? = nil,
        type: String? = nil,
        userID: String? = nil,
        appID: String? = nil
    ) {
        self.contentType = contentType
        self.contentEncoding = contentEncoding
        self.headers = headers
        self.deliveryMode = deliveryMode
        self.priority = priority
        self.correlationID = correlationID
        self.replyTo = replyTo
        self.expiration = expiration
        self.messageID = messageID
        self.timestamp = timestamp
        self.type = type
        self.userID = userID
        self.appID = appID
    }

    /// The headers in the order they came on the wire (or were set in), or, for headers set as a table, in
    /// the table's order; nil when there are none.
    ///
    /// Reading a received message's headers this way builds no table: its names are not hashed, and a name
    /// that occurs twice (which AMQP does not allow, and the table resolves to the last) appears twice.
    ///
    /// Headers set this way go out in the order given, without a table built or sorted on the way (a table
    /// goes out with its names in byte order). Give each name once.
    public var headerFields: [AMQPHeaderField]? {
        get {
            switch headerStorage {
            case .none: nil
            case .fields(let fields): fields
            case .table(let table): table.map { AMQPHeaderField(name: $0.key, value: $0.value) }
            }
        }
        set { headerStorage = newValue.map { .fields($0) } ?? .none }
    }

    /// The value of the header `name` (the last when it occurs twice, as in ``headers``), without building
    /// the table.
    public func header(_ name: String) -> AMQPFieldValue? {
        switch headerStorage {
        case .none: nil
        case .fields(let fields): fields.last(where: { $0.name == name })?.value
        case .table(let table): table[name]
        }
    }

    /// The properties of a received message, its headers kept as they came.
    package init(receivedHeaders fields: [AMQPHeaderField]) {
        headerFields = fields
    }

    /// Whether the broker writes the message to disk (delivery mode 2).
    public var persistent: Bool {
        get { deliveryMode == 2 }
        set { deliveryMode = newValue ? 2 : 1 }
    }
}

/// One header of a message: a name and its value.
public struct AMQPHeaderField: Sendable, Hashable {
    public var name: String
    public var value: AMQPFieldValue

    public init(name: String, value: AMQPFieldValue) {
        self.name = name
        self.value = value
    }
}

/// The headers as a table or as a list of fields (a received message's, or set as a list). Equal when
/// their tables are equal, whichever way each is held: ``AMQPProperties`` compares as it did when it held a
/// table.
enum HeaderStorage: Sendable, Hashable {
    case none
    case table(AMQPTable)
    case fields([AMQPHeaderField])

    init(_ table: AMQPTable?) {
        self = table.map { .table($0) } ?? .none
    }

    var table: AMQPTable? {
        switch self {
        case .none: nil
        case .table(let table): table
        case .fields(let fields): AMQPTable(fields.map { ($0.name, $0.value) }, uniquingKeysWith: { $1 })
        }
    }

    static func == (a: HeaderStorage, b: HeaderStorage) -> Bool { a.table == b.table }

    func hash(into hasher: inout Hasher) { hasher.combine(table) }
}

/// A message to publish: where it goes, its body and properties.
public struct AMQPOutgoingMessage: Sendable {
    public var exchange: String
    public var routingKey: String
    public var body: Data
    public var properties: AMQPProperties
    /// When true the broker returns the message if no queue is bound for it, and the publish fails
    /// with ``AMQPError/Code/unroutable``.
    public var mandatory: Bool

    public init(
        exchange: String,
        routingKey: String,
        body: Data,
        properties: AMQPProperties = AMQPProperties(deliveryMode: 2),
        mandatory: Bool = false
    ) {
        self.exchange = exchange
        self.routingKey = routingKey
        self.body = body
        self.properties = properties
        self.mandatory = mandatory
    }
}
