import Choreo
import ChoreoPostgres
import ChoreoPrometheus
import Foundation
import GRDB
import OrderFulfillmentShared

// order-service: accepts orders (`place`) and tracks every order's status from the events it hears (`run`);
// `show` prints each order's flow in causal order and its status.
//
//   order-service place --customer ada --sku widget --quantity 2 --amount-cents 2500 --address "1 Main St"
//   order-service run [--url ...]
//   order-service show [--order ID]

let db = try ServiceState.open(
    "order-service",
    schema: """
        CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, order_id TEXT, type TEXT, source TEXT,
                                           causation_id TEXT, at REAL, summary TEXT);
        """)

/// Records one event of an order's flow; the event id keys it, so hearing it twice records it once.
struct Track<E: OrderEvent>: EventHandler {
    typealias Input = E
    let name: String
    let summary: @Sendable (E) -> String

    func handle(_ event: E, context: HandlerContext) async throws {
        let e = context.envelope
        try await db.write { db in
            try db.execute(
                sql: "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                arguments: [
                    e.id, event.orderID, e.type, e.source, e.causationID, (e.time ?? Date()).timeIntervalSince1970,
                    summary(event),
                ])
        }
    }
}

let trackers: [any EventHandler] = [
    Track<OrderPlaced>(name: "track-placed") {
        "\($0.quantity) x \($0.sku) for \($0.customer), \($0.amountCents) cents"
    },
    Track<InventoryReserved>(name: "track-reserved") { "\($0.quantity) x \($0.sku) held" },
    Track<InventoryRejected>(name: "track-rejected") { $0.reason },
    Track<PaymentCaptured>(name: "track-captured") { "charge \($0.chargeID)" },
    Track<PaymentFailed>(name: "track-payment-failed") { $0.reason },
    Track<InventoryReleased>(name: "track-released") { "\($0.quantity) x \($0.sku) back in stock" },
    Track<ShipmentScheduled>(name: "track-shipped") { "tracking \($0.trackingID)" },
]

/// The status an order's events add up to.
func status(of types: Set<String>) -> String {
    if types.contains(ShipmentScheduled.eventType) { return "FULFILLED" }
    if types.contains(InventoryRejected.eventType) { return "REJECTED (out of stock)" }
    if types.contains(InventoryReleased.eventType) { return "CANCELLED (payment declined, stock released)" }
    if types.contains(PaymentFailed.eventType) { return "PAYMENT DECLINED (release pending)" }
    if types.contains(PaymentCaptured.eventType) { return "PAID (awaiting shipment)" }
    if types.contains(InventoryReserved.eventType) { return "RESERVED" }
    return "PLACED"
}

func show(order: String?) throws {
    let rows = try db.read { db in
        try Row.fetchAll(
            db, sql: "SELECT * FROM events \(order == nil ? "" : "WHERE order_id = ?") ORDER BY at",
            arguments: order.map { [$0] } ?? [])
    }
    var byOrder: [String: [Row]] = [:]
    var orderOf: [String] = []
    for r in rows {
        let id: String = r["order_id"]
        if byOrder[id] == nil { orderOf.append(id) }
        byOrder[id, default: []].append(r)
    }
    for id in orderOf {
        let events = byOrder[id]!
        print("order \(id): \(status(of: Set(events.map { $0["type"] as String })))")
        // Causal order: each event under the event that caused it.
        let ids = Set(events.map { $0["event_id"] as String })
        func children(of parent: String?) -> [Row] {
            events.filter { ($0["causation_id"] as String?).flatMap { ids.contains($0) ? $0 : nil } == parent }
        }
        func walk(_ parent: String?, depth: Int) {
            for e in children(of: parent) {
                let source = (e["source"] as String).replacingOccurrences(of: "choreo://", with: "")
                print(
                    "  \(String(repeating: "  ", count: depth))\(e["type"] as String)  [\(source)]  \(e["summary"] as String)"
                )
                walk(e["event_id"], depth: depth + 1)
            }
        }
        walk(nil, depth: 0)
    }
}

func value(_ flag: String, in args: [String]) -> String? {
    guard let i = args.firstIndex(of: flag), i + 1 < args.count else { return nil }
    return args[i + 1]
}

let args = Array(CommandLine.arguments.dropFirst())
switch args.first {
case "place":
    guard let customer = value("--customer", in: args), let sku = value("--sku", in: args),
        let quantity = value("--quantity", in: args).flatMap(Int.init), quantity > 0,
        let amount = value("--amount-cents", in: args).flatMap(Int.init), amount >= 0
    else {
        FileHandle.standardError.write(
            Data(
                "usage: order-service place --customer C --sku S --quantity N --amount-cents N [--address A] [--id ID] [--url URL]\n"
                    .utf8))
        exit(2)
    }
    let id = value("--id", in: args) ?? "ord-" + UUID().uuidString.prefix(8).lowercased()
    let url =
        value("--url", in: args) ?? ProcessInfo.processInfo.environment["CHOREO_URL"]
        ?? "amqp://guest:guest@127.0.0.1:5672/"
    do {
        let publisher = try await EventPublisher.connect(
            url: url, exchange: value("--exchange", in: args) ?? WireNames.defaultExchange,
            source: "choreo://order-service/place")
        try await publisher.publish(
            OrderPlaced(
                orderID: id, customer: customer, sku: sku, quantity: quantity, amountCents: amount,
                address: value("--address", in: args) ?? "1 Main Street"),
            id: "placed-\(id)", subject: id)
        await publisher.close()
        print(id)
    } catch {
        FileHandle.standardError.write(Data("error: \(error)\n".utf8))
        exit(1)
    }
case "show":
    try show(order: value("--order", in: args))
default:
    let runArgs = args.first == "run" ? Array(args.dropFirst()) : args
    await Choreo.run(
        service: "order-service", handlers: trackers, ledgers: [PostgresLedger.self], metrics: PrometheusEndpoint.self,
        arguments: ServiceState.defaultArguments("order-service", arguments: runArgs))
}
