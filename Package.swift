// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "Choreo",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "ChoreoAMQP", targets: ["ChoreoAMQP"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
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
        .executableTarget(
            name: "AMQPHello",
            dependencies: ["ChoreoAMQP"],
            path: "Samples/AMQPHello"
        ),
        .testTarget(
            name: "ChoreoAMQPTests",
            dependencies: ["ChoreoAMQP"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
