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
        .testTarget(
            name: "ChoreoAMQPTests",
            dependencies: ["ChoreoAMQP"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
