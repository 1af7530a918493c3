import Choreo

// The events the fixture service and the integration tests exchange, defined once for both.

public struct Ping: Event {
    public static let eventType = "test.ping"
    public var n: Int
    /// Fail the first `failTimes` attempts with a retryable error.
    public var failTimes: Int?
    /// Fail with a non-retryable error.
    public var poison: Bool?
    /// Work this long before returning.
    public var workMilliseconds: Int?
    /// Kill the whole process, every time (a poison message).
    public var crash: Bool?

    public init(n: Int, failTimes: Int? = nil, poison: Bool? = nil, workMilliseconds: Int? = nil, crash: Bool? = nil) {
        self.n = n
        self.failTimes = failTimes
        self.poison = poison
        self.workMilliseconds = workMilliseconds
        self.crash = crash
    }
}

public struct Pong: Event {
    public static let eventType = "test.pong"
    public var n: Int

    public init(n: Int) { self.n = n }
}
