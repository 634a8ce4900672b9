import CFlashAttention

/// An error the C boundary turns into a status code plus the thread's last-error message.
package struct FlashAttentionError: Error {
    /// One of the `FA_ERROR_*` codes of the header.
    package let status: flash_attention_status
    /// Names the argument and the reason, e.g. "head_dim (0) must be in 1...1024".
    package let message: String

    package init(status: flash_attention_status, message: String) {
        self.status = status
        self.message = message
    }

    package static func nullPointer(_ message: String) -> Self { .init(status: FA_ERROR_NULL_POINTER, message: message) }
    package static func invalidShape(_ message: String) -> Self { .init(status: FA_ERROR_INVALID_SHAPE, message: message) }
    package static func invalidStride(_ message: String) -> Self { .init(status: FA_ERROR_INVALID_STRIDE, message: message) }
    package static func invalidArgument(_ message: String) -> Self {
        .init(status: FA_ERROR_INVALID_ARGUMENT, message: message)
    }
    package static func unsupported(_ message: String) -> Self { .init(status: FA_ERROR_UNSUPPORTED, message: message) }
    package static func outOfMemory(_ message: String) -> Self { .init(status: FA_ERROR_OUT_OF_MEMORY, message: message) }
    package static func invalidIndex(_ message: String) -> Self { .init(status: FA_ERROR_INVALID_INDEX, message: message) }
}
