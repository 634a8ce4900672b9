import CFlashAttention
import FlashAttentionCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif

/// The fixed description of each status code. String literals are NUL-terminated static storage, so the
/// pointers stay valid for the life of the process.
func statusDescription(_ status: flash_attention_status) -> StaticString {
    switch status {
    case FA_OK: return "success"
    case FA_ERROR_NULL_POINTER: return "a required pointer is NULL"
    case FA_ERROR_INVALID_SHAPE: return "invalid or inconsistent size"
    case FA_ERROR_INVALID_STRIDE: return "invalid stride or addressed range"
    case FA_ERROR_INVALID_ARGUMENT: return "invalid argument"
    case FA_ERROR_UNSUPPORTED: return "unsupported params version or CPU"
    case FA_ERROR_OUT_OF_MEMORY: return "out of memory"
    case FA_ERROR_INTERNAL: return "internal error"
    case FA_ERROR_INVALID_INDEX: return "invalid index in caller memory"
    default: return "unknown status code"
    }
}

/// The per-thread last-error message (sqlite's errmsg idea): a fixed-size buffer per thread, created on the
/// first failure of that thread and freed when the thread exits.
enum LastError {
    static let capacity = 512

    /// The pthread key is created once; Swift initialises globals under a once-lock, so this is race-free.
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        // If no key can be created, every thread reports the static fallback text instead of a message.
        if pthread_key_create(&key, { free($0) }) != 0 { return pthread_key_t.max }
        return key
    }()

    private static let fallback: StaticString = "no detailed message available"

    /// Records `message` for the calling thread (truncated to the buffer).
    static func set(_ message: String) {
        guard key != pthread_key_t.max else { return }
        var buffer = pthread_getspecific(key)?.assumingMemoryBound(to: CChar.self)
        if buffer == nil {
            buffer = malloc(capacity)?.assumingMemoryBound(to: CChar.self)
            guard let fresh = buffer, pthread_setspecific(key, fresh) == 0 else {
                free(buffer)
                return
            }
        }
        guard let buffer else { return }
        var utf8 = Array(message.utf8.prefix(capacity - 1))
        utf8.append(0)
        utf8.withUnsafeBufferPointer { source in
            UnsafeMutableRawPointer(buffer).copyMemory(from: source.baseAddress!, byteCount: source.count)
        }
    }

    /// Empties the calling thread's message without allocating.
    static func clear() {
        guard key != pthread_key_t.max,
            let buffer = pthread_getspecific(key)?.assumingMemoryBound(to: CChar.self)
        else { return }
        buffer[0] = 0
    }

    /// The calling thread's message, or "" if it has none.
    static func current() -> UnsafePointer<CChar> {
        if key != pthread_key_t.max, let buffer = pthread_getspecific(key) {
            return UnsafePointer(buffer.assumingMemoryBound(to: CChar.self))
        }
        return key == pthread_key_t.max ? cString(fallback) : cString("")
    }
}

/// A C view of a static string literal.
func cString(_ s: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(s.utf8Start).assumingMemoryBound(to: CChar.self)
}

/// Runs `body` as one C entry point: success clears the thread's message, a thrown error sets it and
/// becomes the status code.
func withStatus(_ body: () throws(FlashAttentionError) -> Void) -> flash_attention_status {
    do {
        try body()
        LastError.clear()
        return FA_OK
    } catch {
        LastError.set(error.message)
        return error.status
    }
}
