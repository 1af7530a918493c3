import Choreo
import ChoreoPostgres
import ChoreoPrometheus
import Foundation
import GRDB
import OrderFulfillmentShared

// notifications: records one customer message per final outcome of an order.

let db = try ServiceState.open(
    "notifications",
    schema: """
        CREATE TABLE IF NOT EXISTS messages (order_id TEXT, kind TEXT, customer TEXT, text TEXT, PRIMARY KEY (order_id, kind));
        """)

func record(_ orderID: String, _ kind: String, _ customer: String, _ text: String) async throws {
    try await db.write { db in
        try db.execute(
            sql: "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?)", arguments: [orderID, kind, customer, text])
    }
}

struct NotifyShipped: EventHandler {
    let name = "notify-shipped"
    func handle(_ e: ShipmentScheduled, context: HandlerContext) async throws {
        try await record(
            e.orderID, "shipped", e.customer, "Your order \(e.orderID) is on its way (tracking \(e.trackingID)).")
    }
}

struct NotifyOutOfStock: EventHandler {
    let name = "notify-out-of-stock"
    func handle(_ e: InventoryRejected, context: HandlerContext) async throws {
        try await record(
            e.orderID, "out-of-stock", e.customer, "Sorry, order \(e.orderID) could not be filled: \(e.reason).")
    }
}

struct NotifyPaymentFailed: EventHandler {
    let name = "notify-payment-failed"
    func handle(_ e: PaymentFailed, context: HandlerContext) async throws {
        try await record(
            e.orderID, "payment-failed", e.customer, "Your payment for order \(e.orderID) failed: \(e.reason).")
    }
}

await Choreo.run(
    service: "notifications", handlers: [NotifyShipped(), NotifyOutOfStock(), NotifyPaymentFailed()],
    ledgers: [PostgresLedger.self], metrics: PrometheusEndpoint.self,
    arguments: ServiceState.defaultArguments("notifications"))
