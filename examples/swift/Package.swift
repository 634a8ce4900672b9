// swift-tools-version: 6.2
import PackageDescription

let package = Package(
    name: "attention-example",
    platforms: [.macOS(.v15)],  // the library's minimum (its Package.swift)
    dependencies: [.package(name: "FlashAttention", path: "../..")],
    targets: [
        .executableTarget(
            name: "attention-example",
            dependencies: [.product(name: "FlashAttentionSwift", package: "FlashAttention")]
        )
    ]
)
