import ArgumentParser
import Choreo
import ChoreoOps
import Foundation

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Every handler in the registry: queue depth, consumers, retries waiting, dead letters, last seen.")

    @OptionGroup var connection: ConnectionOptions
    @Flag(help: "JSON lines instead of a table.")
    var json = false

    func run() async throws {
        let amqp = try await connection.connect()
        let manifests = try await RegistryReader(connection: amqp).manifests()
        let statuses = try await StatusReport(connection: amqp).collect(manifests)
        if json {
            for s in statuses { print(try jsonLine(s)) }
            return
        }
        if statuses.isEmpty {
            print("no handlers in the registry: no handler service has started on this broker yet")
            return
        }
        func n(_ v: UInt32?) -> String { v.map(String.init) ?? "-" }
        print(
            table(
                ["SERVICE", "HANDLER", "READY", "CONSUMERS", "RETRYING", "DEAD", "LAST SEEN", "HOST"],
                statuses.map { s in
                    [
                        s.service, s.handler, n(s.ready), n(s.consumers), n(s.retrying), n(s.deadLetters),
                        Timestamps.format(s.lastSeen),
                        s.problem.map { "\(s.host) (\($0))" } ?? s.host,
                    ]
                }))
    }
}
