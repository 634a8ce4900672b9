import CFlashAttention
import FlashAttention
import FlashAttentionKernels
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
    let isa = String(cString: flash_attention_kernel_isa())
    #expect(isa == "avx2+fma+f16c" || isa == "none")
}

/// The exp2 of the online softmax: ≤ 2.5 ulp relative error on [−126, 0], at most ~1.5e-38 below (−inf
/// included), NaN for NaN. Checked on 4 million evenly spread arguments plus the edges, against the float64
/// exp2.
@Test func softmaxExp2Accuracy() {
    var worst = 0.0
    let count = 4_000_000
    var lanes = SIMD8<Float>()
    for i in stride(from: 0, to: count, by: 8) {
        for l in 0..<8 { lanes[l] = -126 * Float(i + l) / Float(count - 1) }
        let y = exp2Lanes(lanes)
        for l in 0..<8 {
            let exact = Glibc.exp2(Double(lanes[l]))
            let ulp = Double(Float(exact).ulp)
            worst = max(worst, abs(Double(y[l]) - exact) / ulp)
        }
    }
    #expect(worst <= 2.5, "max error \(worst) ulp")
    let edges = exp2Lanes(SIMD8<Float>(-.infinity, -127, -126.6, -200, 0, -0.0, .nan, -1))
    #expect((0..<4).allSatisfy { edges[$0] >= 0 && edges[$0] <= 1.5e-38 })
    #expect(edges[4] == 1 && edges[5] == 1)
    #expect(edges[6].isNaN)
    #expect(edges[7] == 0.5)
}

import Glibc
