#!/bin/sh
# `make mca-arm64`: the NEON micro-kernels' inner loops (score tile S = K·Qᵀ, output tile O += P·V, 6 × 16
# floats) cut from the aarch64 object that `make test-arm64` built, through llvm-mca. A model, not a
# measurement: see mca.py and bench/RESULTS.md. Usage: mca.sh ARM64_BUILD_DIR.
set -eu
out=${1:-.build/arm64}
here=$(cd "$(dirname "$0")" && pwd)
aarch64-linux-gnu-objdump -d --no-show-raw-insn "$out/kernels.o" > "$out/kernels.dis"
python3 "$here/extract_loop.py" "$out/kernels.dis" scoreTile > "$out/score_tile.s"
# outputTile specialised for six rows of packed float32 values (the forward's and the backward's tile).
python3 "$here/extract_loop.py" "$out/kernels.dis" 'SixJ0O_AA07Float32K0O' > "$out/output_tile.s"
python3 "$here/mca.py" "$out/score_tile.s" "$out/output_tile.s"
