import Choreo
import ChoreoPostgres
import ChoreoPrometheus
import Foundation
import GRDB
import OrderFulfillmentShared

// shipping: schedules a shipment for every paid order. Its address check rejects addresses it does not
// know ("Nowhere ...") with a retryable error, so such an order is retried and ends as a dead letter;
// `SHIPPING_ACCEPT_ALL_ADDRESSES=1` is the fix an operator deploys before replaying it.

let db = try ServiceState.open(
    "shipping",
    schema: """
        CREATE TABLE IF NOT EXISTS shipments (order_id TEXT PRIMARY KEY, tracking_id TEXT);
        """)
let acceptAll = ProcessInfo.processInfo.environment["SHIPPING_ACCEPT_ALL_ADDRESSES"] == "1"

struct AddressRejected: Error, CustomStringConvertible {
    var address: String
    var description: String { "the carrier's address check rejected '\(address)'" }
}

struct ScheduleShipment: EventHandler {
    let name = "schedule-shipment"
    var emits: [any Event.Type] { [ShipmentScheduled.self] }
    var retryPolicy: RetryPolicy { RetryPolicy(maxAttempts: 3, delays: [.seconds(1), .seconds(2)]) }

    func handle(_ paid: PaymentCaptured, context: HandlerContext) async throws {
        if paid.address.hasPrefix("Nowhere") && !acceptAll { throw AddressRejected(address: paid.address) }
        let tracking = "TRK-" + paid.orderID.uppercased()
        try await db.write { db in
            try db.execute(sql: "INSERT OR IGNORE INTO shipments VALUES (?, ?)", arguments: [paid.orderID, tracking])
        }
        try context.emit(
            ShipmentScheduled(orderID: paid.orderID, customer: paid.customer, trackingID: tracking),
            subject: paid.orderID)
    }
}

await Choreo.run(
    service: "shipping", handlers: [ScheduleShipment()], ledgers: [PostgresLedger.self],
    metrics: PrometheusEndpoint.self, arguments: ServiceState.defaultArguments("shipping"))
