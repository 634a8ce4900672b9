import FlashAttentionCore

/// This compiled copy's table of entry points: what the library's dispatch sees of it.
package let kernelTable = KernelTable(
    isa: kernelISA, geometry: geometry,
    forwardScratchBytes: { Workspace.floatCount(headDim: $0, headDimV: $1) * MemoryLayout<Float>.size },
    forward: runForwardItem,
    backwardScratchBytes: backwardScratchBytes,
    backward: backwardRunner,
    exp2: exp2InPlace)
