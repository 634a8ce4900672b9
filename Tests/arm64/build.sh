#!/bin/sh
# Builds the NEON kernel copy for aarch64 with Embedded Swift and links it with the C test driver into a static
# PIE that qemu-aarch64-static runs (`make test-arm64`). Usage: build.sh OUTDIR.
#
# Three Embedded modules, as SwiftPM would build them: FlashAttentionCore (the ISA-neutral files the kernels
# use: problem, plan, element types, dropout, backward problem, state merging, kernel table), the kernel source
# of Sources/FlashAttentionKernels compiled with -D FA_KERNEL_NEON (the package's flags) and -D FA_EMBEDDED,
# and the harness exporting C entry points. Not compiled: the thread pool, validation, the C exports and the
# dispatch (Embedded Swift has no Glibc, Atomic or existentials); the two existential dispatchers of the
# kernels are replaced by EmbeddedDispatch.swift.
set -eu
# KernelISA(name:) compares Strings, which needs the Unicode tables of the Embedded stdlib.
out=$1
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$out"
SWIFTC=${SWIFTC:-swiftc}
# Swift 6 language mode, as the package (tools version 6.2) compiles its targets.
flags="-target aarch64-none-none-elf -enable-experimental-feature Embedded -wmo -parse-as-library
       -swift-version 6 -package-name FlashAttention -I $here/include -I $out"
core="ElementType Problem ForwardPlan Dropout AttentionMask BackwardProblem KernelTable FlashAttentionError AttentionStates"
core_files=$(for f in $core; do printf '%s ' "$root/Sources/FlashAttentionCore/$f.swift"; done)

$SWIFTC $flags -O -module-name FlashAttentionCore $core_files "$here/EmbeddedMath.swift" \
    -emit-module -emit-module-path "$out/FlashAttentionCore.swiftmodule" -c -o "$out/core.o"
# The package's kernel flags (Package.swift: -Ounchecked, exclusivity unchecked).
$SWIFTC $flags -Ounchecked -enforce-exclusivity=unchecked -D FA_KERNEL_NEON -D FA_EMBEDDED \
    -module-name FlashAttentionKernelsNEON "$root"/Sources/FlashAttentionKernels/*.swift "$here/EmbeddedDispatch.swift" \
    -emit-module -emit-module-path "$out/FlashAttentionKernelsNEON.swiftmodule" -c -o "$out/kernels.o"
$SWIFTC $flags -O -module-name ARM64Harness_Swift "$here/Harness.swift" -c -o "$out/harness.o"
${CROSS_CC:-aarch64-linux-gnu-gcc} -std=c11 -O1 -Wall -I "$here/include" -static-pie "$here/driver.c" \
    "$out/harness.o" "$out/kernels.o" "$out/core.o" \
    "$(dirname "$(command -v "$SWIFTC")")/../lib/swift/embedded/aarch64-none-none-elf/libswiftUnicodeDataTables.a" \
    -lm -o "$out/arm64_tests"
