import ArgumentParser
import ChoreoOps
import Foundation

struct Graph: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "The choreography as the running handlers declared it, with unconsumed and unproduced event types flagged.")

    enum Format: String, ExpressibleByArgument, CaseIterable { case text, mermaid, dot }

    @OptionGroup var connection: ConnectionOptions
    @Option(help: "text, mermaid or dot.")
    var format: Format = .text

    func run() async throws {
        let amqp = try await connection.connect()
        let graph = FlowGraph(manifests: try await RegistryReader(connection: amqp).manifests())
        if graph.nodes.isEmpty {
            throw OperationError("no handlers in the registry: no handler service has started on this broker yet")
        }
        switch format {
        case .text: print(visible(graph.text(), keepingLines: true))
        case .mermaid: print(graph.mermaid())
        case .dot: print(graph.dot())
        }
    }
}
