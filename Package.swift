// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "Choreo",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "ChoreoAMQP", targets: ["ChoreoAMQP"]),
        .library(name: "Choreo", targets: ["Choreo"]),
        .library(name: "ChoreoPostgres", targets: ["ChoreoPostgres"]),
        .library(name: "ChoreoPrometheus", targets: ["ChoreoPrometheus"]),
        .library(name: "ChoreoTesting", targets: ["ChoreoTesting"]),
        .library(name: "ChoreoOps", targets: ["ChoreoOps"]),
        .executable(name: "choreo", targets: ["ChoreoCLI"]),
        .executable(name: "order-service", targets: ["OrderService"]),
        .executable(name: "inventory", targets: ["Inventory"]),
        .executable(name: "payment", targets: ["Payment"]),
        .executable(name: "shipping", targets: ["Shipping"]),
        .executable(name: "notifications", targets: ["Notifications"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-distributed-tracing.git", from: "1.7.3"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    ],
    targets: [
        .systemLibrary(
            name: "CRabbitMQ",
            pkgConfig: "librabbitmq",
            providers: [.apt(["librabbitmq-dev"]), .brew(["rabbitmq-c"])]
        ),
        .target(
            name: "ChoreoAMQP",
            dependencies: [
                "CRabbitMQ",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "Choreo",
            dependencies: [
                "ChoreoAMQP",
                "CRabbitMQ",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "GRDB", package: "GRDB.swift"),
                // The SQLite C API under GRDB, for the ledger's per-event statements.
                .product(name: "GRDBSQLite", package: "GRDB.swift"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .target(
            name: "ChoreoPostgres",
            dependencies: [
                "Choreo",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .target(
            name: "ChoreoPrometheus",
            dependencies: [
                "Choreo",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        .target(
            name: "ChoreoOps",
            dependencies: ["Choreo", "ChoreoAMQP"]
        ),
        .executableTarget(
            name: "ChoreoCLI",
            dependencies: [
                "Choreo", "ChoreoAMQP", "ChoreoOps",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sources/choreo"
        ),
        .target(
            name: "ChoreoTesting",
            dependencies: ["Choreo", "ChoreoAMQP", .product(name: "Logging", package: "swift-log")]
        ),
        .target(
            name: "CRabbitMQBaseline",
            path: "Benchmarks/CRabbitMQBaseline",
            linkerSettings: [.linkedLibrary("rabbitmq")]
        ),
        .executableTarget(
            name: "AMQPBenchmark",
            dependencies: [
                "ChoreoAMQP",
                "CRabbitMQBaseline",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Benchmarks/AMQPBenchmark"
        ),
        .target(
            name: "OrderFulfillmentShared",
            dependencies: ["Choreo", .product(name: "GRDB", package: "GRDB.swift")],
            path: "Samples/OrderFulfillment/Shared"
        ),
        .executableTarget(
            name: "OrderService",
            dependencies: [
                "Choreo", "ChoreoPostgres", "ChoreoPrometheus", "OrderFulfillmentShared",
                .product(name: "GRDB", package: "GRDB.swift"),
            ],
            path: "Samples/OrderFulfillment/OrderService"
        ),
        .executableTarget(
            name: "Inventory",
            dependencies: [
                "Choreo", "ChoreoPostgres", "ChoreoPrometheus", "OrderFulfillmentShared",
                .product(name: "GRDB", package: "GRDB.swift"),
            ],
            path: "Samples/OrderFulfillment/Inventory"
        ),
        .executableTarget(
            name: "Payment",
            dependencies: [
                "Choreo", "ChoreoPostgres", "ChoreoPrometheus", "OrderFulfillmentShared",
                .product(name: "GRDB", package: "GRDB.swift"),
            ],
            path: "Samples/OrderFulfillment/Payment"
        ),
        .executableTarget(
            name: "Shipping",
            dependencies: [
                "Choreo", "ChoreoPostgres", "ChoreoPrometheus", "OrderFulfillmentShared",
                .product(name: "GRDB", package: "GRDB.swift"),
            ],
            path: "Samples/OrderFulfillment/Shipping"
        ),
        .executableTarget(
            name: "Notifications",
            dependencies: [
                "Choreo", "ChoreoPostgres", "ChoreoPrometheus", "OrderFulfillmentShared",
                .product(name: "GRDB", package: "GRDB.swift"),
            ],
            path: "Samples/OrderFulfillment/Notifications"
        ),
        .executableTarget(
            name: "AMQPHello",
            dependencies: ["ChoreoAMQP"],
            path: "Samples/AMQPHello"
        ),
        .target(
            name: "TestEvents",
            dependencies: ["Choreo"],
            path: "Tests/Fixtures/TestEvents"
        ),
        .executableTarget(
            name: "ChoreoTestService",
            dependencies: [
                "Choreo", "ChoreoPostgres", "ChoreoPrometheus", "TestEvents",
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ],
            path: "Tests/Fixtures/ChoreoTestService"
        ),
        .executableTarget(
            name: "chain-baseline-c",
            path: "Benchmarks/ChainBaselineC",
            linkerSettings: [.linkedLibrary("rabbitmq"), .linkedLibrary("sqlite3")]
        ),
        .executableTarget(
            name: "chain-benchmark",
            dependencies: ["Choreo", "ChoreoAMQP", "ChoreoPostgres"],
            path: "Benchmarks/ChainBenchmark"
        ),
        .testTarget(
            name: "ChoreoAMQPTests",
            dependencies: ["ChoreoAMQP"]
        ),
        .testTarget(
            name: "OrderFulfillmentTests",
            dependencies: [
                "Choreo", "ChoreoAMQP", "OrderFulfillmentShared", .product(name: "GRDB", package: "GRDB.swift"),
                "OrderService", "Inventory", "Payment", "Shipping", "Notifications",
            ]
        ),
        .testTarget(
            name: "ChoreoTestingTests",
            dependencies: ["Choreo", "ChoreoAMQP", "ChoreoTesting"]
        ),
        .testTarget(
            name: "ChoreoTests",
            dependencies: [
                "Choreo", "ChoreoAMQP", "ChoreoPostgres", "ChoreoPrometheus", "ChoreoTesting", "ChoreoTestService",
                "TestEvents", .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
