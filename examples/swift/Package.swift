// swift-tools-version: 6.2
import PackageDescription

let package = Package(
    name: "attention-example",
    platforms: [.macOS(.v15)],  // the library's minimum (its Package.swift)
    // The module is named in capitals: it links before the library's ISA-flagged kernel copies (the library's
    // Package.swift, `kernelModule`, says why that matters).
    products: [.executable(name: "attention-example", targets: ["AttentionExample"])],
    dependencies: [.package(name: "FlashAttention", path: "../..")],
    targets: [
        .executableTarget(
            name: "AttentionExample",
            dependencies: [.product(name: "FlashAttentionSwift", package: "FlashAttention")],
            path: "Sources/attention-example"
        )
    ]
)
