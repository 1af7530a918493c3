import Choreo
import Foundation

// The events of the order-fulfillment choreography. Every one carries the order id; the ones a later
// step needs carry what that step needs, so no service reads another's database.

public protocol OrderEvent: Event {
    var orderID: String { get }
}

public struct OrderPlaced: OrderEvent {
    public static let eventType = "order.placed"
    public var orderID: String
    public var customer: String
    public var sku: String
    public var quantity: Int
    public var amountCents: Int
    public var address: String
    public init(orderID: String, customer: String, sku: String, quantity: Int, amountCents: Int, address: String) {
        self.orderID = orderID; self.customer = customer; self.sku = sku; self.quantity = quantity
        self.amountCents = amountCents; self.address = address
    }
}

public struct InventoryReserved: OrderEvent {
    public static let eventType = "inventory.reserved"
    public var orderID: String
    public var customer: String
    public var sku: String
    public var quantity: Int
    public var amountCents: Int
    public var address: String
    public init(orderID: String, customer: String, sku: String, quantity: Int, amountCents: Int, address: String) {
        self.orderID = orderID; self.customer = customer; self.sku = sku; self.quantity = quantity
        self.amountCents = amountCents; self.address = address
    }
}

public struct InventoryRejected: OrderEvent {
    public static let eventType = "inventory.rejected"
    public var orderID: String
    public var customer: String
    public var reason: String
    public init(orderID: String, customer: String, reason: String) {
        self.orderID = orderID; self.customer = customer; self.reason = reason
    }
}

public struct PaymentCaptured: OrderEvent {
    public static let eventType = "payment.captured"
    public var orderID: String
    public var customer: String
    public var chargeID: String
    public var amountCents: Int
    public var address: String
    public init(orderID: String, customer: String, chargeID: String, amountCents: Int, address: String) {
        self.orderID = orderID; self.customer = customer; self.chargeID = chargeID; self.amountCents = amountCents
        self.address = address
    }
}

public struct PaymentFailed: OrderEvent {
    public static let eventType = "payment.failed"
    public var orderID: String
    public var customer: String
    public var reason: String
    public var sku: String
    public var quantity: Int
    public init(orderID: String, customer: String, reason: String, sku: String, quantity: Int) {
        self.orderID = orderID; self.customer = customer; self.reason = reason; self.sku = sku; self.quantity = quantity
    }
}

public struct InventoryReleased: OrderEvent {
    public static let eventType = "inventory.released"
    public var orderID: String
    public var sku: String
    public var quantity: Int
    public init(orderID: String, sku: String, quantity: Int) {
        self.orderID = orderID; self.sku = sku; self.quantity = quantity
    }
}

public struct ShipmentScheduled: OrderEvent {
    public static let eventType = "shipment.scheduled"
    public var orderID: String
    public var customer: String
    public var trackingID: String
    public init(orderID: String, customer: String, trackingID: String) {
        self.orderID = orderID; self.customer = customer; self.trackingID = trackingID
    }
}
