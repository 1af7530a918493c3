import Choreo
import ChoreoPostgres
import ChoreoPrometheus
import Foundation
import GRDB
import OrderFulfillmentShared

// inventory: reserves stock for placed orders and releases the hold when the payment fails (the compensation).
// Its effects are keyed by order id inside its own transaction, so a re-run after a crash changes nothing twice.

let db = try ServiceState.open(
    "inventory",
    schema: """
        CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, available INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS holds (order_id TEXT PRIMARY KEY, sku TEXT, quantity INTEGER, status TEXT);
        INSERT OR IGNORE INTO stock VALUES ('widget', 1000000), ('gadget', 5), ('gizmo', 1000000);
        """)

struct ReserveStock: EventHandler {
    let name = "reserve-stock"
    var emits: [any Event.Type] { [InventoryReserved.self, InventoryRejected.self] }

    func handle(_ order: OrderPlaced, context: HandlerContext) async throws {
        let reserved: Bool = try await db.write { db in
            if let status = try String.fetchOne(
                db, sql: "SELECT status FROM holds WHERE order_id = ?", arguments: [order.orderID])
            {
                return status != "rejected"
            }
            let available =
                try Int.fetchOne(db, sql: "SELECT available FROM stock WHERE sku = ?", arguments: [order.sku]) ?? 0
            let ok = available >= order.quantity
            if ok {
                try db.execute(
                    sql: "UPDATE stock SET available = available - ? WHERE sku = ?",
                    arguments: [order.quantity, order.sku])
            }
            try db.execute(
                sql: "INSERT INTO holds VALUES (?, ?, ?, ?)",
                arguments: [order.orderID, order.sku, order.quantity, ok ? "held" : "rejected"])
            return ok
        }
        if reserved {
            try context.emit(
                InventoryReserved(
                    orderID: order.orderID, customer: order.customer, sku: order.sku, quantity: order.quantity,
                    amountCents: order.amountCents, address: order.address), subject: order.orderID)
        } else {
            try context.emit(
                InventoryRejected(
                    orderID: order.orderID, customer: order.customer,
                    reason: "not enough \(order.sku) in stock for \(order.quantity)"), subject: order.orderID)
        }
    }
}

struct ReleaseStock: EventHandler {
    let name = "release-stock"
    var emits: [any Event.Type] { [InventoryReleased.self] }

    func handle(_ failed: PaymentFailed, context: HandlerContext) async throws {
        try await db.write { db in
            guard
                try String.fetchOne(db, sql: "SELECT status FROM holds WHERE order_id = ?", arguments: [failed.orderID])
                    == "held"
            else { return }
            try db.execute(sql: "UPDATE holds SET status = 'released' WHERE order_id = ?", arguments: [failed.orderID])
            try db.execute(
                sql: "UPDATE stock SET available = available + ? WHERE sku = ?",
                arguments: [failed.quantity, failed.sku])
        }
        try context.emit(
            InventoryReleased(orderID: failed.orderID, sku: failed.sku, quantity: failed.quantity),
            subject: failed.orderID)
    }
}

await Choreo.run(
    service: "inventory", handlers: [ReserveStock(), ReleaseStock()], ledgers: [PostgresLedger.self],
    metrics: PrometheusEndpoint.self, arguments: ServiceState.defaultArguments("inventory"))
