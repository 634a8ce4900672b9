#!/bin/sh
# `make test-arm64`: the NEON kernel copy compiled for aarch64 (Embedded Swift) and its parity tests run under
# qemu-aarch64-static. Installs qemu-user-static and gcc-aarch64-linux-gnu with apt-get when they are missing;
# when they cannot be installed it says why and succeeds (nothing was tested). Correctness only: timings
# under emulation mean nothing. Usage: run.sh OUTDIR.
set -eu
out=${1:-.build/arm64}
here=$(cd "$(dirname "$0")" && pwd)
SWIFTC=${SWIFTC:-swiftc}

if [ "$(uname -s)" = Darwin ]; then
    echo "test-arm64: skipped on macOS: the Embedded objects are ELF and link only with a Linux toolchain; on Apple" \
         "Silicon the package's own tests (swift test, test-python) run the NEON copy natively."
    exit 0
fi
if [ ! -d "$(dirname "$(command -v "$SWIFTC")")/../lib/swift/embedded/aarch64-none-none-elf" ]; then
    echo "test-arm64: SKIPPED: this Swift toolchain has no Embedded standard library for aarch64-none-none-elf." \
         "Nothing was tested."
    exit 0
fi
case $(uname -m) in
aarch64 | arm64)
    # An ARM Linux host runs the same test binary natively (its gcc links it).
    CROSS_CC=${CROSS_CC:-cc} SWIFTC=$SWIFTC sh "$here/build.sh" "$out"
    "$out/arm64_tests"
    exit
    ;;
esac

have_tools() { command -v qemu-aarch64-static >/dev/null 2>&1 && command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; }
if ! have_tools; then
    echo "test-arm64: installing qemu-user-static and gcc-aarch64-linux-gnu (apt-get)"
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo -n"; fi
    if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross; } >"${TMPDIR:-/tmp}/fa-arm64-apt.log" 2>&1 \
        || ! have_tools; then
        echo "test-arm64: SKIPPED: could not install qemu-user-static and gcc-aarch64-linux-gnu (apt-get needs root" \
             "and a Debian/Ubuntu package mirror; log: ${TMPDIR:-/tmp}/fa-arm64-apt.log). Nothing was tested."
        exit 0
    fi
fi

SWIFTC=$SWIFTC sh "$here/build.sh" "$out"
# The micro-kernels must be vector FMAs: a scalar fallback would pass the parity tests and be 8x slower.
fmla=$(aarch64-linux-gnu-objdump -d "$out/kernels.o" | grep -c 'fmla.*v[0-9]*\.4s' || true)
if [ "$fmla" -lt 24 ]; then echo "test-arm64: expected NEON fmla in the kernels, found $fmla"; exit 1; fi
echo "kernels.o: $fmla vector fmla instructions"
qemu-aarch64-static "$out/arm64_tests"
