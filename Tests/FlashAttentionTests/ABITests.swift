import CFlashAttention
import FlashAttention
import FlashAttentionCore
import Testing

@Test func versionsAgreeWithTheHeader() {
    #expect(flash_attention_abi_version() == FA_ABI_VERSION)
    #expect(flash_attention_version() == FA_VERSION_MAJOR * 10000 + FA_VERSION_MINOR * 100 + FA_VERSION_PATCH)
    #expect(String(cString: flash_attention_version_string()) == "\(FA_VERSION_MAJOR).\(FA_VERSION_MINOR).\(FA_VERSION_PATCH)")
}

@Test func everyStatusHasItsOwnDescription() {
    let codes: [flash_attention_status] = [
        FA_OK, FA_ERROR_NULL_POINTER, FA_ERROR_INVALID_SHAPE, FA_ERROR_INVALID_STRIDE, FA_ERROR_INVALID_ARGUMENT,
        FA_ERROR_UNSUPPORTED, FA_ERROR_OUT_OF_MEMORY, FA_ERROR_INTERNAL,
    ]
    let texts = codes.map { String(cString: flash_attention_status_string($0)) }
    #expect(Set(texts).count == codes.count)
    #expect(!texts.contains("unknown status code"))
    #expect(String(cString: flash_attention_status_string(-3)) == "unknown status code")
    #expect(String(cString: flash_attention_status_string(1000)) == "unknown status code")
}

@Test func introspection() {
    #expect(flash_attention_default_num_threads() >= 1)
    let names = KernelISA.allCases.map(\.name)
    // Widest first (the header appends FA_ISA_NEON after the others; its names carry no order).
    #expect(names == [FA_ISA_AMXBF16, FA_ISA_AVX512BF16, FA_ISA_AVX512, FA_ISA_AVX2, FA_ISA_NEON, FA_ISA_PORTABLE, FA_ISA_REFERENCE])
    let available = String(cString: flash_attention_available_isas()).split(separator: ",").map(String.init)
    #expect(available == KernelSelection.available.map(\.name))
    #expect(available.suffix(2) == ["portable", "reference"], "every CPU runs the portable kernels and the reference loop")
    // Without FLASH_ATTENTION_ISA the widest path runs; with it, the named one (the tests run both ways).
    let isa = String(cString: flash_attention_kernel_isa())
    let forced = getenv("FLASH_ATTENTION_ISA").map { String(cString: $0) } ?? ""
    #expect(isa == (forced.isEmpty ? available[0] : available.contains(forced) ? forced : "invalid"))
    print("kernel paths tested here: \(kernelPaths.map(\.name).joined(separator: ", "));"
          + " not available on this CPU (skipped): \(skippedPaths.isEmpty ? "none" : skippedPaths.map(\.name).joined(separator: ", "))")
}

/// Each kernel copy's exp2 (the online softmax's): on [−126, 0], ≤ 2.05 ulp relative error where its
/// multiply-adds are fused (measured 2.02) and ≤ 2.25 ulp in the portable copy on x86-64, which rounds each
/// product (measured 2.23); at most ~1.5e-38 below (−inf included), NaN for NaN. Checked on 4 million
/// evenly spread arguments plus the edges, against the float64 exp2.
@Test("exp2 accuracy", arguments: tiledPaths)
func softmaxExp2Accuracy(_ isa: KernelISA) {
    #if arch(x86_64)
    let bound = isa == .portable ? 2.25 : 2.05
    #else
    let bound = 2.05
    #endif
    let exp2 = KernelSelection.kernels(for: isa).table.exp2
    let count = 4_000_000
    var values = (0..<count).map { -126 * Float($0) / Float(count - 1) }
    let arguments = values
    values.withUnsafeMutableBufferPointer { exp2($0.baseAddress!, count) }
    var worst = 0.0
    for (x, y) in zip(arguments, values) {
        let exact = LibM.exp2(Double(x))
        worst = max(worst, abs(Double(y) - exact) / Double(Float(exact).ulp))
    }
    #expect(worst <= bound, "\(isa.name): max error \(worst) ulp")
    var edges: [Float] = [-.infinity, -127, -126.6, -200, 0, -0.0, .nan, -1]
    edges.withUnsafeMutableBufferPointer { exp2($0.baseAddress!, $0.count) }
    #expect((0..<4).allSatisfy { edges[$0] >= 0 && edges[$0] <= 1.5e-38 })
    #expect(edges[4] == 1 && edges[5] == 1)
    #expect(edges[6].isNaN)
    #expect(edges[7] == 0.5)
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif
