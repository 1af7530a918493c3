/// An operation that cannot be done as asked: an unknown handler or id, a missing queue. Its
/// description is the one line the CLI prints.
public struct OperationError: Error, CustomStringConvertible, Equatable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension OperationError {
    /// Ids that matched no dead letter.
    public static func noDeadLetter(_ ids: [String]) -> OperationError {
        OperationError("no dead letter with id '\(ids.sorted().joined(separator: "', '"))'")
    }
}
