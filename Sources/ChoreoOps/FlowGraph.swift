import Choreo

/// The choreography as the running handlers declared it: who consumes and who emits each event type.
public struct FlowGraph: Sendable {
    public struct Node: Sendable, Hashable {
        public var service: String
        public var handler: String
        public var consumes: String
        public var emits: [String]
        public var name: String { "\(service).\(handler)" }
    }

    public let nodes: [Node]
    /// Types some handler emits and no handler consumes (maybe meant for the outside world, maybe a bug).
    public let unconsumed: [String]
    /// Types some handler consumes and no handler emits (published from outside the mesh, or nobody will ever send them).
    public let unproduced: [String]

    public init(manifests: [HandlerManifest]) {
        nodes = manifests.map {
            Node(service: $0.service, handler: $0.handler, consumes: $0.consumes, emits: $0.emits.sorted())
        }
        .sorted { $0.name < $1.name }
        let consumed = Set(nodes.map(\.consumes))
        let emitted = Set(nodes.flatMap(\.emits))
        unconsumed = emitted.subtracting(consumed).sorted()
        unproduced = consumed.subtracting(emitted).sorted()
    }

    public var types: [String] { Set(nodes.map(\.consumes) + nodes.flatMap(\.emits)).sorted() }

    public func text() -> String {
        var lines: [String] = []
        for type in types {
            let consumers = nodes.filter { $0.consumes == type }.map(\.name)
            let producers = nodes.filter { $0.emits.contains(type) }.map(\.name)
            var flags: [String] = []
            if consumers.isEmpty { flags.append("nobody consumes it") }
            if producers.isEmpty { flags.append("no handler emits it") }
            let from = producers.isEmpty ? "(outside)" : producers.joined(separator: ", ")
            let to = consumers.isEmpty ? "(nobody)" : consumers.joined(separator: ", ")
            lines.append("\(type): \(from) -> \(to)\(flags.isEmpty ? "" : "   [\(flags.joined(separator: "; "))]")")
        }
        return lines.joined(separator: "\n")
    }

    public func mermaid() -> String {
        var lines = ["flowchart LR"]
        func id(_ s: String) -> String { s.map { $0.isLetter || $0.isNumber ? String($0) : "_" }.joined() }
        for type in types {
            let note = unconsumed.contains(type) ? " ⚠ unconsumed" : (unproduced.contains(type) ? " ⚠ no producer" : "")
            lines.append("    t_\(id(type))([\"\(type)\(note)\"])")
        }
        for n in nodes {
            lines.append("    h_\(id(n.name))[\"\(n.name)\"]")
            lines.append("    t_\(id(n.consumes)) --> h_\(id(n.name))")
            for e in n.emits { lines.append("    h_\(id(n.name)) --> t_\(id(e))") }
        }
        return lines.joined(separator: "\n")
    }

    public func dot() -> String {
        var lines = ["digraph choreo {", "    rankdir=LR;"]
        for type in types {
            let flagged = unconsumed.contains(type) || unproduced.contains(type)
            lines.append("    \"\(type)\" [shape=ellipse\(flagged ? ", color=red, style=dashed" : "")];")
        }
        for n in nodes {
            lines.append("    \"\(n.name)\" [shape=box];")
            lines.append("    \"\(n.consumes)\" -> \"\(n.name)\";")
            for e in n.emits { lines.append("    \"\(n.name)\" -> \"\(e)\";") }
        }
        lines.append("}")
        return lines.joined(separator: "\n")
    }
}
