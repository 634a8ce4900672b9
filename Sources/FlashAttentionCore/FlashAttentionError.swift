import CFlashAttention

/// An error the C boundary turns into a status code plus the thread's last-error message.
public struct FlashAttentionError: Error {
    /// One of the `FA_ERROR_*` codes of the header.
    public let status: flash_attention_status
    /// Names the argument and the reason, e.g. "head_dim (0) must be in 1...1024".
    public let message: String

    public init(status: flash_attention_status, message: String) {
        self.status = status
        self.message = message
    }

    public static func nullPointer(_ message: String) -> Self { .init(status: FA_ERROR_NULL_POINTER, message: message) }
    public static func invalidShape(_ message: String) -> Self { .init(status: FA_ERROR_INVALID_SHAPE, message: message) }
    public static func invalidStride(_ message: String) -> Self { .init(status: FA_ERROR_INVALID_STRIDE, message: message) }
    public static func invalidArgument(_ message: String) -> Self {
        .init(status: FA_ERROR_INVALID_ARGUMENT, message: message)
    }
    public static func unsupported(_ message: String) -> Self { .init(status: FA_ERROR_UNSUPPORTED, message: message) }
    public static func outOfMemory(_ message: String) -> Self { .init(status: FA_ERROR_OUT_OF_MEMORY, message: message) }
    public static func invalidIndex(_ message: String) -> Self { .init(status: FA_ERROR_INVALID_INDEX, message: message) }
}
