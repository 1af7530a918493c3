import Choreo
import ChoreoPostgres
import ChoreoPrometheus
import Foundation
import GRDB
import OrderFulfillmentShared

// payment: charges reserved orders through a fake external gateway. The gateway, like a real one, takes
// an idempotency key and never charges the same key twice; every request it receives is recorded, so a
// duplicate charge attempt would be visible. Rule: amounts over 500.00 are declined.

/// The fake payment provider: a separate SQLite file, standing for someone else's system.
struct FakeGateway {
    let db: DatabaseQueue

    init() throws {
        db = try ServiceState.open(
            "payment-gateway",
            schema: """
                CREATE TABLE IF NOT EXISTS requests (idempotency_key TEXT, order_id TEXT, amount_cents INTEGER, at REAL);
                CREATE TABLE IF NOT EXISTS charges (idempotency_key TEXT PRIMARY KEY, order_id TEXT, amount_cents INTEGER, outcome TEXT, charge_id TEXT);
                """)
    }

    /// Charges once per key; a repeated key returns the first outcome.
    func charge(key: String, orderID: String, amountCents: Int) throws -> (approved: Bool, chargeID: String) {
        try db.write { db in
            try db.execute(
                sql: "INSERT INTO requests VALUES (?, ?, ?, ?)",
                arguments: [key, orderID, amountCents, Date().timeIntervalSince1970])
            if let row = try Row.fetchOne(
                db, sql: "SELECT outcome, charge_id FROM charges WHERE idempotency_key = ?", arguments: [key])
            {
                return ((row["outcome"] as String) == "approved", row["charge_id"])
            }
            let approved = amountCents <= 50_000
            let chargeID = "ch_" + orderID
            try db.execute(
                sql: "INSERT INTO charges VALUES (?, ?, ?, ?, ?)",
                arguments: [key, orderID, amountCents, approved ? "approved" : "declined", chargeID])
            return (approved, chargeID)
        }
    }
}

let gateway = try FakeGateway()

struct ChargePayment: EventHandler {
    let name = "charge-payment"
    var emits: [any Event.Type] { [PaymentCaptured.self, PaymentFailed.self] }
    /// The gateway is "external": one charge per order, whatever the event id of the reservation.
    func idempotencyKey(for event: InventoryReserved, envelope: EventEnvelope) -> String? { "charge-\(event.orderID)" }

    func handle(_ reserved: InventoryReserved, context: HandlerContext) async throws {
        let result = try gateway.charge(
            key: context.idempotencyKey, orderID: reserved.orderID, amountCents: reserved.amountCents)
        if result.approved {
            try context.emit(
                PaymentCaptured(
                    orderID: reserved.orderID, customer: reserved.customer, chargeID: result.chargeID,
                    amountCents: reserved.amountCents, address: reserved.address), subject: reserved.orderID)
        } else {
            try context.emit(
                PaymentFailed(
                    orderID: reserved.orderID, customer: reserved.customer,
                    reason:
                        "card declined for \(reserved.amountCents / 100).\(String(format: "%02d", reserved.amountCents % 100))",
                    sku: reserved.sku, quantity: reserved.quantity), subject: reserved.orderID)
        }
    }
}

await Choreo.run(
    service: "payment", handlers: [ChargePayment()], ledgers: [PostgresLedger.self], metrics: PrometheusEndpoint.self,
    arguments: ServiceState.defaultArguments("payment"))
