import CFlashAttention
import FlashAttentionKernels

/// The C entry points declared in include/flash_attention.h. `@c @implementation` makes the compiler check
/// each signature against the header. Each function is a thin layer: read and widen the params, validate
/// into a problem (Validation.swift), run it (Dispatch.swift), report errors (Errors.swift).

@c @implementation
public func flash_attention_version() -> Int32 {
    FA_VERSION_MAJOR * 10000 + FA_VERSION_MINOR * 100 + FA_VERSION_PATCH
}

@c @implementation
public func flash_attention_version_string() -> UnsafePointer<CChar>! {
    // Kept equal to FA_VERSION_MAJOR.MINOR.PATCH by a test.
    cString("0.1.0")
}

@c @implementation
public func flash_attention_abi_version() -> Int32 {
    FA_ABI_VERSION
}

@c @implementation
public func flash_attention_status_string(_ status: flash_attention_status) -> UnsafePointer<CChar>! {
    cString(statusDescription(status))
}

@c @implementation
public func flash_attention_last_error() -> UnsafePointer<CChar>! {
    LastError.current()
}

/// Params struct sizes this library accepts: every size a released header has had (fields are only
/// appended, so a smaller struct is a prefix of the current one).
let knownParamsSizes: [Int] = [MemoryLayout<flash_attention_params>.size]

@c @implementation
public func flash_attention_params_init(
    _ params: UnsafeMutablePointer<flash_attention_params>!, _ struct_size: Int
) -> flash_attention_status {
    withStatus { () throws(FlashAttentionError) in
        guard let params else { throw .nullPointer("params is NULL") }
        guard knownParamsSizes.contains(struct_size) else {
            throw .unsupported(
                "struct_size (\(struct_size)) is not a flash_attention_params size this library knows"
                    + " (\(knownParamsSizes.map(String.init).joined(separator: ", ")))")
        }
        var defaults = defaultParams()
        defaults.struct_size = UInt64(struct_size)
        UnsafeMutableRawPointer(params).copyMemory(from: &defaults, byteCount: struct_size)
    }
}

@c @implementation
public func flash_attention_forward(_ params: UnsafePointer<flash_attention_params>!) -> flash_attention_status {
    withStatus { () throws(FlashAttentionError) in
        let widened = try widen(params)
        let (problem, options) = try AttentionProblem.validated(widened)
        try runForward(problem, options: options)
    }
}

@c @implementation
public func flash_attention_kernel_isa() -> UnsafePointer<CChar>! {
    cString(CPU.kernelISA)
}

@c @implementation
public func flash_attention_default_num_threads() -> Int32 {
    Int32(clamping: ThreadPool.onlineCores)
}

/// Defaults of every field: zero, except the dim strides (1).
func defaultParams() -> flash_attention_params {
    var params = flash_attention_params()
    params.struct_size = UInt64(MemoryLayout<flash_attention_params>.size)
    params.q_dim_stride = 1
    params.k_dim_stride = 1
    params.v_dim_stride = 1
    params.out_dim_stride = 1
    return params
}

/// Copies a caller's params of any known size over the defaults, so fields the caller's header did not
/// have take their default values.
func widen(_ params: UnsafePointer<flash_attention_params>?) throws(FlashAttentionError) -> flash_attention_params {
    guard let params else { throw .nullPointer("params is NULL") }
    let size = UnsafeRawPointer(params).load(as: UInt64.self)
    guard let known = knownParamsSizes.first(where: { UInt64($0) == size }) else {
        throw .unsupported(
            "params->struct_size (\(size)) is not a flash_attention_params size this library knows"
                + " (\(knownParamsSizes.map(String.init).joined(separator: ", "))); initialise params with"
                + " flash_attention_params_init(&params, sizeof params)")
    }
    var widened = defaultParams()
    withUnsafeMutableBytes(of: &widened) { $0.baseAddress!.copyMemory(from: params, byteCount: known) }
    return widened
}
