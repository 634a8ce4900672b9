import CFlashAttention
import FlashAttention
import Testing

/// Every validation error: the status code, a message naming the argument, and no write to any output.

struct BadInput: CustomTestStringConvertible, Sendable {
    let name: String
    let status: flash_attention_status
    let messagePart: String
    let configure: @Sendable (inout flash_attention_params) -> Void
    var testDescription: String { name }
}

let badInputs: [BadInput] = [
    BadInput(name: "negative batch", status: FA_ERROR_INVALID_SHAPE, messagePart: "batch (-1) must be >= 0") {
        $0.batch = -1
    },
    BadInput(name: "negative seqlen_q", status: FA_ERROR_INVALID_SHAPE, messagePart: "seqlen_q (-5)") {
        $0.seqlen_q = -5
    },
    BadInput(name: "negative seqlen_k", status: FA_ERROR_INVALID_SHAPE, messagePart: "seqlen_k (-2)") {
        $0.seqlen_k = -2
    },
    BadInput(name: "zero heads_kv", status: FA_ERROR_INVALID_SHAPE, messagePart: "heads_kv (0) must be >= 1") {
        $0.heads_kv = 0
    },
    BadInput(name: "heads not divisible", status: FA_ERROR_INVALID_SHAPE,
             messagePart: "heads_q (4) is not a multiple of heads_kv (3)") { $0.heads_kv = 3 },
    BadInput(name: "head_dim 0", status: FA_ERROR_INVALID_SHAPE, messagePart: "head_dim (0) must be in 1...1024") {
        $0.head_dim = 0
    },
    BadInput(name: "head_dim too large", status: FA_ERROR_INVALID_SHAPE, messagePart: "head_dim (1025)") {
        $0.head_dim = 1025
    },
    BadInput(name: "NULL q", status: FA_ERROR_NULL_POINTER, messagePart: "q is NULL") { $0.q = nil },
    BadInput(name: "NULL v", status: FA_ERROR_NULL_POINTER, messagePart: "v is NULL") { $0.v = nil },
    BadInput(name: "NULL out", status: FA_ERROR_NULL_POINTER, messagePart: "out is NULL") { $0.out = nil },
    BadInput(name: "head-dim stride 2", status: FA_ERROR_INVALID_STRIDE, messagePart: "k_dim_stride (2) must be 1") {
        $0.k_dim_stride = 2
    },
    BadInput(name: "stride product overflows", status: FA_ERROR_INVALID_STRIDE, messagePart: "k_row_stride") {
        $0.k_row_stride = Int64.max / 4
    },
    BadInput(name: "range overflows", status: FA_ERROR_INVALID_STRIDE, messagePart: "v") {
        $0.v_batch_stride = Int64.max / 2 - 7
        $0.v_row_stride = Int64.max / 256
    },
    BadInput(name: "range outside address space", status: FA_ERROR_INVALID_STRIDE, messagePart: "q") {
        $0.q_row_stride = -(Int64(1) << 60)
    },
    BadInput(name: "negative num_threads", status: FA_ERROR_INVALID_ARGUMENT, messagePart: "num_threads (-1)") {
        $0.num_threads = -1
    },
    BadInput(name: "unknown algorithm", status: FA_ERROR_INVALID_ARGUMENT, messagePart: "algorithm (9)") {
        $0.algorithm = 9
    },
    BadInput(name: "NaN scale", status: FA_ERROR_INVALID_ARGUMENT, messagePart: "softmax_scale (nan)") {
        $0.softmax_scale = .nan
    },
    BadInput(name: "infinite scale", status: FA_ERROR_INVALID_ARGUMENT, messagePart: "softmax_scale (inf)") {
        $0.softmax_scale = .infinity
    },
    BadInput(name: "misaligned q", status: FA_ERROR_INVALID_ARGUMENT, messagePart: "not aligned to 4 bytes") {
        $0.q = $0.q! + 2
    },
    BadInput(name: "out aliases k", status: FA_ERROR_INVALID_ARGUMENT, messagePart: "out overlaps k") {
        $0.out = UnsafeMutableRawPointer(mutating: $0.k)
    },
    BadInput(name: "out partially overlaps q", status: FA_ERROR_INVALID_ARGUMENT, messagePart: "out partially overlaps q") {
        $0.out = UnsafeMutableRawPointer(mutating: $0.q! + 4)
    },
    BadInput(name: "out rows overlap", status: FA_ERROR_INVALID_STRIDE, messagePart: "out_row_stride (0)") {
        $0.out_row_stride = 0
    },
    BadInput(name: "lse heads overlap", status: FA_ERROR_INVALID_STRIDE, messagePart: "makes distinct elements of lse overlap") {
        $0.lse_head_stride = 1
    },
    BadInput(name: "lse aliases out", status: FA_ERROR_INVALID_ARGUMENT, messagePart: "lse overlaps out") {
        $0.lse = $0.out!.assumingMemoryBound(to: Float.self)
    },
    BadInput(name: "unknown struct size", status: FA_ERROR_UNSUPPORTED, messagePart: "struct_size (12345)") {
        $0.struct_size = 12345
    },
]

let errorProblem = Problem(batch: 2, seqlenQ: 9, seqlenK: 11, headsQ: 4, headsKV: 2, headDim: 8, seed: 41)

@Test("bad input returns its status and message and writes nothing", arguments: badInputs)
func badInputIsRejected(_ bad: BadInput) {
    let (q, k, v) = errorProblem.inputs()
    let output = runLibrary(errorProblem, q: q, k: k, v: v, configure: bad.configure)
    #expect(output.status == bad.status)
    #expect(output.message.contains(bad.messagePart), "message: \(output.message)")
    // Outputs start as NaN; a rejected call must leave every element as it was.
    #expect(output.out.storage.allSatisfy { $0.isNaN })
    #expect(output.lse.allSatisfy { $0.isNaN })
}

@Test func nullParamsIsRejected() {
    #expect(flash_attention_forward(nil) == FA_ERROR_NULL_POINTER)
    #expect(String(cString: flash_attention_last_error()) == "params is NULL")
    #expect(flash_attention_params_init(nil, MemoryLayout<flash_attention_params>.size) == FA_ERROR_NULL_POINTER)
}

@Test func paramsInitRejectsUnknownSizesAndWritesOnlyWhatItKnows() {
    var bytes = [UInt8](repeating: 0xAB, count: MemoryLayout<flash_attention_params>.size + 16)
    let status = bytes.withUnsafeMutableBytes {
        flash_attention_params_init($0.baseAddress!.assumingMemoryBound(to: flash_attention_params.self), 7)
    }
    #expect(status == FA_ERROR_UNSUPPORTED)
    #expect(String(cString: flash_attention_last_error()).contains("struct_size (7)"))
    #expect(bytes.allSatisfy { $0 == 0xAB })
    let ok = bytes.withUnsafeMutableBytes {
        flash_attention_params_init(
            $0.baseAddress!.assumingMemoryBound(to: flash_attention_params.self), MemoryLayout<flash_attention_params>.size)
    }
    #expect(ok == FA_OK)
    #expect(bytes[MemoryLayout<flash_attention_params>.size...].allSatisfy { $0 == 0xAB })
}

@Test func zeroSizedWorkSucceedsWithoutMemory() {
    var params = flash_attention_params()
    #expect(flash_attention_params_init(&params, MemoryLayout<flash_attention_params>.size) == FA_OK)
    (params.batch, params.seqlen_q, params.seqlen_k, params.heads_q, params.heads_kv, params.head_dim) = (0, 4, 4, 2, 1, 8)
    #expect(flash_attention_forward(&params) == FA_OK)
    (params.batch, params.seqlen_q, params.seqlen_k) = (3, 0, 0)
    #expect(flash_attention_forward(&params) == FA_OK)
    #expect(String(cString: flash_attention_last_error()) == "")
}
