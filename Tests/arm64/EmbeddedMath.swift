import EmbeddedMath

/// Embedded-Swift build only (compiled into FlashAttentionCore by Tests/arm64/build.sh): the scalar math that a
/// normal build gets from Glibc or Darwin, which an Embedded module cannot import. Public, so that the kernel
/// module (Backward.swift's `exp`) sees them too.
@inline(__always) public func exp(_ x: Float) -> Float { expf(x) }
@inline(__always) public func log(_ x: Float) -> Float { logf(x) }
@inline(__always) public func log1p(_ x: Float) -> Float { log1pf(x) }
