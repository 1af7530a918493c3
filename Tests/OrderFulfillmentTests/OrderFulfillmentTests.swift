import Choreo
import ChoreoAMQP
import Foundation
import GRDB
import OrderFulfillmentShared
import Testing

/// The sample choreography end to end: each service a real process, against the test broker.
@Suite("Order fulfillment choreography", .serialized, .timeLimit(.minutes(5)))
struct OrderFulfillmentTests {
    static var url: String {
        ProcessInfo.processInfo.environment["CHOREO_TEST_URL"] ?? "amqp://guest:guest@127.0.0.1:5673/"
    }

    final class Service: @unchecked Sendable {
        let process = Process()
        /// Where the sample's executables are: beside the test bundle.
        static var products: URL {
            Bundle.allBundles.first { $0.bundlePath.hasSuffix(".xctest") }?.bundleURL.deletingLastPathComponent()
                ?? URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        }

        init(_ name: String, state: URL, exchange: String, environment: [String: String] = [:]) throws {
            process.executableURL = Self.products.appendingPathComponent(name)
            process.arguments = ["--url", OrderFulfillmentTests.url, "--exchange", exchange]
            var env = ProcessInfo.processInfo.environment
            env["CHOREO_STATE_DIR"] = state.path
            env["CHOREO_LOG_LEVEL"] = "warning"
            for (k, v) in environment { env[k] = v }
            process.environment = env
            let log = state.appendingPathComponent("\(name).log")
            if !FileManager.default.fileExists(atPath: log.path) {
                _ = FileManager.default.createFile(atPath: log.path, contents: nil)
            }
            let handle = try FileHandle(forWritingTo: log)
            handle.seekToEndOfFile()
            process.standardOutput = handle
            process.standardError = handle
            try process.run()
        }
        func kill9() { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
        func stop() { if process.isRunning { process.terminate(); process.waitUntilExit() } }
        deinit { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
    }

    enum Kind: CaseIterable { case fulfilledWidgets, outOfStock, declined, fulfilledGizmo }

    static func order(_ i: Int) -> (Kind, OrderPlaced) {
        let id = "t-\(i)"
        switch i % 4 {
        case 0:
            return (
                .fulfilledWidgets,
                OrderPlaced(
                    orderID: id, customer: "c\(i)", sku: "widget", quantity: 2, amountCents: 2500, address: "1 Main St")
            )
        case 1:
            return (
                .outOfStock,
                OrderPlaced(
                    orderID: id, customer: "c\(i)", sku: "gadget", quantity: 50, amountCents: 5000, address: "1 Main St"
                )
            )
        case 2:
            return (
                .declined,
                OrderPlaced(
                    orderID: id, customer: "c\(i)", sku: "gizmo", quantity: 3, amountCents: 99_900, address: "1 Main St"
                )
            )
        default:
            return (
                .fulfilledGizmo,
                OrderPlaced(
                    orderID: id, customer: "c\(i)", sku: "gizmo", quantity: 1, amountCents: 1000, address: "1 Main St")
            )
        }
    }

    private func sqlite<T>(_ path: URL, _ body: (Database) throws -> T) throws -> T {
        // The services write these files while the test reads them: wait for their locks instead of failing.
        var config = Configuration()
        config.busyMode = .timeout(10)
        return try DatabaseQueue(path: path.path, configuration: config).read(body)
    }

    /// Polls a count the services are still driving up until it reaches `target` or three minutes pass,
    /// and returns the last value read: the caller asserts on it.
    private func poll(_ path: URL, sql: String, reaching target: Int) async throws -> Int {
        let deadline = ContinuousClock.now + .seconds(180)
        var value = 0
        while ContinuousClock.now < deadline {
            value = (try? sqlite(path) { db in try Int.fetchOne(db, sql: sql) ?? 0 }) ?? 0
            if value >= target { break }
            try await Task.sleep(for: .milliseconds(200))
        }
        return value
    }

    @Test("each service's --help and --manifest answer without a broker and leave no file behind")
    func informationalRuns() async throws {
        let state = FileManager.default.temporaryDirectory.appendingPathComponent(
            "orders-info-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: state, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: state) }
        for name in ["order-service", "inventory", "payment", "shipping", "notifications"] {
            for flag in ["--help", "--manifest"] {
                let p = Process()
                p.executableURL = Service.products.appendingPathComponent(name)
                p.arguments = [flag, "--url", "amqp://guest:guest@127.0.0.1:1/"]
                p.currentDirectoryURL = state
                p.environment = ProcessInfo.processInfo.environment.merging(["CHOREO_STATE_DIR": state.path]) { $1 }
                p.standardOutput = FileHandle.nullDevice
                p.standardError = FileHandle.nullDevice
                try p.run()
                p.waitUntilExit()
                #expect(p.terminationStatus == 0, "\(name) \(flag)")
            }
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: state.path) == [])
    }

    @Test("500 orders of four kinds reach the right outcome while payment is killed with SIGKILL and restarted")
    func fiveHundredOrdersWithPaymentKilled() async throws {
        let state = FileManager.default.temporaryDirectory.appendingPathComponent(
            "orders-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: state, withIntermediateDirectories: true)
        let exchange = "test.orders.\(UUID().uuidString.prefix(8))"
        var services: [String: Service] = [:]
        for name in ["order-service", "inventory", "payment", "shipping", "notifications"] {
            services[name] = try Service(name, state: state, exchange: exchange)
        }
        defer { for s in services.values { s.stop() } }

        // Wait until every handler queue has its consumer.
        let connection = try await AMQPConnection.connect(to: try AMQPConfiguration(url: Self.url))
        defer { Task { await connection.close() } }
        let channel = try await connection.openChannel()
        let queues = [
            "inventory.reserve-stock", "inventory.release-stock", "payment.charge-payment",
            "shipping.schedule-shipment",
            "notifications.notify-shipped", "order-service.track-shipped",
        ].map { "choreo.\($0)" }
        let deadline = ContinuousClock.now + .seconds(60)
        for q in queues {
            while (try? await channel.declareQueuePassive(q))?.consumerCount ?? 0 == 0 && ContinuousClock.now < deadline
            {
                try await Task.sleep(for: .milliseconds(100))
            }
        }

        let n = 500
        let publisher = try await EventPublisher.connect(url: Self.url, exchange: exchange, source: "test")
        for start in stride(from: 0, to: n, by: 50) {
            try await publisher.publish(
                contentsOf: try (start..<start + 50).map { i in
                    try EventEnvelope(Self.order(i).1, source: "test", id: "placed-t-\(i)")
                })
            if start == 100 {
                // Payment dies mid-run, hard, and comes back.
                services["payment"]!.kill9()
                services["payment"] = try Service("payment", state: state, exchange: exchange)
            }
        }
        await publisher.close()

        // Each kind of order ends as it should, with the events it should have.
        func expected(_ kind: Kind) -> Set<String> {
            switch kind {
            case .fulfilledWidgets, .fulfilledGizmo:
                return ["order.placed", "inventory.reserved", "payment.captured", "shipment.scheduled"]
            case .outOfStock:
                return ["order.placed", "inventory.rejected"]
            case .declined:
                return ["order.placed", "inventory.reserved", "payment.failed", "inventory.released"]
            }
        }
        let expectedPairs = (0..<n).reduce(0) { $0 + expected(Self.order($1).0).count }

        // The order service hears each event type on its own queue, so an order's final event can be
        // tracked before its `order.placed`: wait until every expected (order, type) pair is there.
        let orders = state.appendingPathComponent("order-service.state.sqlite")
        let pairs = try await poll(
            orders, sql: "SELECT count(*) FROM (SELECT DISTINCT order_id, type FROM events)",
            reaching: expectedPairs)
        #expect(pairs == expectedPairs, "\(pairs) of \(expectedPairs) (order, event type) pairs were tracked")

        let types: [String: Set<String>] = try sqlite(orders) { db in
            var out: [String: Set<String>] = [:]
            for row in try Row.fetchAll(db, sql: "SELECT order_id, type FROM events") {
                out[row["order_id"], default: []].insert(row["type"])
            }
            return out
        }
        var wrong: [String] = []
        for i in 0..<n {
            let (kind, order) = Self.order(i)
            if types[order.orderID] != expected(kind) {
                wrong.append("\(order.orderID): \(types[order.orderID]?.sorted() ?? [])")
            }
        }
        #expect(wrong.isEmpty, "\(wrong.count) orders have the wrong events, e.g. \(wrong.prefix(5))")

        // Released inventory equals reserved inventory for every failed payment; stock adds up.
        let inventory = state.appendingPathComponent("inventory.state.sqlite")
        let holds: [String: String] = try sqlite(inventory) { db in
            Dictionary(
                uniqueKeysWithValues: try Row.fetchAll(db, sql: "SELECT order_id, status FROM holds").map {
                    ($0["order_id"], $0["status"])
                })
        }
        let count = { (k: Kind) in (0..<n).filter { Self.order($0).0 == k }.count }
        let declinedIDs = (0..<n).filter { Self.order($0).0 == .declined }.map { Self.order($0).1.orderID }
        #expect(declinedIDs.allSatisfy { holds[$0] == "released" })
        let stock: [String: Int] = try sqlite(inventory) { db in
            Dictionary(
                uniqueKeysWithValues: try Row.fetchAll(db, sql: "SELECT sku, available FROM stock").map {
                    ($0["sku"], $0["available"])
                })
        }
        #expect(stock["widget"] == 1_000_000 - 2 * count(.fulfilledWidgets))
        #expect(stock["gizmo"] == 1_000_000 - 1 * count(.fulfilledGizmo), "declined gizmo holds were all released")
        #expect(stock["gadget"] == 5)

        // No customer is charged twice: one charge per paid order, whatever the gateway was asked.
        let gateway = state.appendingPathComponent("payment-gateway.state.sqlite")
        let (approved, perOrderMax): (Int, Int) = try sqlite(gateway) { db in
            (
                try Int.fetchOne(db, sql: "SELECT count(*) FROM charges WHERE outcome = 'approved'") ?? -1,
                try Int.fetchOne(db, sql: "SELECT max(c) FROM (SELECT count(*) AS c FROM charges GROUP BY order_id)")
                    ?? -1
            )
        }
        #expect(approved == count(.fulfilledWidgets) + count(.fulfilledGizmo))
        #expect(perOrderMax == 1)
        // Notifications hears the final events on queues of its own, so it may still be catching up.
        let messages = try await poll(
            state.appendingPathComponent("notifications.state.sqlite"), sql: "SELECT count(*) FROM messages",
            reaching: n)
        #expect(messages == n, "one customer message per final outcome")
        for q in queues {
            #expect(try await channel.declareQueuePassive(q + ".dlq").messageCount == 0, "\(q) has dead letters")
        }
    }
}
