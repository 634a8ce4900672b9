import CFlashAttention

/// FlashAttentionCore is not API: its declarations are `public` only so that the kernel copies can inline its
/// `@inlinable` accessors (this toolchain does not inline `package` declarations across modules).
///
/// What a compiled kernel copy offers the rest of the library: its instruction set, the tile shapes and block
/// sizes the work decomposition must follow, and its entry points. Each `FlashAttentionKernels<ISA>` module
/// exports one `KernelTable`; `FlashAttention` picks one when the library loads (Dispatch.swift).

/// The kernel paths, by the names the header defines (FA_ISA_*), which `FLASH_ATTENTION_ISA` accepts and
/// `flash_attention_kernel_isa()` reports. Widest first: the default is the first one the CPU can run.
public enum KernelISA: CaseIterable, Sendable {
    /// The avx512bf16 copy on a CPU with AMX-BF16 tiles (Sapphire Rapids and later) whose OS grants the tile state:
    /// both products of bfloat16 q/k/v in AMX tiles (`tdpbf16ps`, P rounded to bfloat16); everything else as avx512.
    case amxbf16
    /// The avx512 copy with AVX512_BF16 (Zen 4/5, Cooper Lake, Sapphire Rapids and later): bfloat16 q/k/v
    /// multiply in bfloat16 pairs with `vdpbf16ps`, accumulating in float32; every other input as avx512.
    case avx512bf16
    /// AVX-512 F/BW/DQ/VL with FMA and F16C: 16-lane vectors, 32 registers.
    case avx512
    /// AVX2 with FMA and F16C: 8-lane vectors, 16 registers.
    case avx2
    /// ARMv8.0 Advanced SIMD (aarch64 only): 8-lane vectors in pairs of q registers, 32 registers.
    case neon
    /// No ISA flags (SSE2 on x86-64): 4-lane vectors, multiplies and adds instead of FMAs.
    case portable
    /// The plain float64-accumulating loop for the forward pass (the backward, which has no such loop,
    /// runs the portable kernels).
    case reference

    /// The name in the header, e.g. "avx512".
    public var name: String {
        switch self {
        case .amxbf16: return FA_ISA_AMXBF16
        case .avx512bf16: return FA_ISA_AVX512BF16
        case .avx512: return FA_ISA_AVX512
        case .avx2: return FA_ISA_AVX2
        case .neon: return FA_ISA_NEON
        case .portable: return FA_ISA_PORTABLE
        case .reference: return FA_ISA_REFERENCE
        }
    }

    public init?(name: String) {
        guard let isa = Self.allCases.first(where: { $0.name == name }) else { return nil }
        self = isa
    }
}

/// Tile shapes and block sizes of one kernel copy, derived from its vector width (Vector.swift); the work
/// decomposition (ForwardPlan, BackwardProblem) follows them.
public struct TileGeometry: Sendable {
    /// Floats per vector.
    public let lanes: Int
    /// Rows of a micro-tile (keys of a score tile, queries of an output tile).
    public let microRows: Int
    /// Columns of a micro-tile: two vectors.
    public let microCols: Int
    /// Queries per query block and keys per key block of the forward; query blocks may be cut smaller in
    /// steps of `subBlockRows` (the rows that go through score → softmax → output together).
    public let queryBlock: Int
    public let keyBlock: Int
    public let subBlockRows: Int
    /// Rows of one kv head's slot in a decoding item: whole vectors holding at least `microRows` rows.
    public let thinSlotRows: Int
    /// Keys per block of a decoding item.
    public let thinBlockKeys: Int
    /// Keys per block of the backward pass.
    public let backwardKeyBlock: Int

    public init(
        lanes: Int, microRows: Int, queryBlock: Int, keyBlock: Int, subBlockRows: Int, thinBlockKeys: Int,
        backwardKeyBlock: Int
    ) {
        self.lanes = lanes
        self.microRows = microRows
        microCols = 2 * lanes
        self.queryBlock = queryBlock
        self.keyBlock = keyBlock
        self.subBlockRows = subBlockRows
        thinSlotRows = (microRows + lanes - 1) / lanes * lanes
        self.thinBlockKeys = thinBlockKeys
        self.backwardKeyBlock = backwardKeyBlock
    }
}

/// Work item runners: item `item` of the plan, with the calling thread's scratch.
public typealias ForwardItemRunner = @Sendable (ForwardPlan, Int, UnsafeMutableRawPointer) -> Void
public typealias BackwardItemRunner = @Sendable (BackwardProblem, Int, UnsafeMutableRawPointer) -> Void

/// One compiled kernel copy's entry points.
public struct KernelTable: Sendable {
    public let isa: KernelISA
    public let geometry: TileGeometry
    /// Scratch bytes per thread of the forward (a function of the head sizes of q/k and of v).
    public let forwardScratchBytes: @Sendable (_ headDim: Int, _ headDimV: Int) -> Int
    public let forward: ForwardItemRunner
    /// The backward's three phases (BackwardProblem.swift) and the scratch of each, per thread.
    public let backwardScratchBytes: @Sendable (BackwardProblem, BackwardPhase) -> Int
    public let backward: @Sendable (BackwardPhase) -> BackwardItemRunner
    /// This copy's exp2 over `count` floats in place, for the accuracy tests.
    public let exp2: @Sendable (UnsafeMutablePointer<Float>, Int) -> Void

    public init(
        isa: KernelISA, geometry: TileGeometry, forwardScratchBytes: @escaping @Sendable (Int, Int) -> Int,
        forward: @escaping ForwardItemRunner,
        backwardScratchBytes: @escaping @Sendable (BackwardProblem, BackwardPhase) -> Int,
        backward: @escaping @Sendable (BackwardPhase) -> BackwardItemRunner,
        exp2: @escaping @Sendable (UnsafeMutablePointer<Float>, Int) -> Void
    ) {
        self.isa = isa
        self.geometry = geometry
        self.forwardScratchBytes = forwardScratchBytes
        self.forward = forward
        self.backwardScratchBytes = backwardScratchBytes
        self.backward = backward
        self.exp2 = exp2
    }
}
