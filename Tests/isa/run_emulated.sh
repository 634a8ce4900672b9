#!/bin/sh
# The library on emulated x86-64 CPUs with fewer extensions than the copies it holds (qemu-user): Haswell (AVX2,
# no AVX-512) and Nehalem (no AVX). Each must list exactly the paths it can run, load without an illegal
# instruction, and pass the C dlopen test on each path and the Swift ABI tests (which run every path's exp2).
# A host with AVX-512 cannot otherwise show that the dispatch and the helpers that modules share by name
# (Package.swift, kernelModule) keep its instructions from a smaller CPU: both once crashed a Zen 3.
# Installs qemu-user-static with apt-get when missing; skips (and succeeds), saying why, when it cannot.
# Usage: sh Tests/isa/run_emulated.sh BUILD_DIR C_TESTS_DIR
set -e
build=$1 ctests=$2
if [ "$(uname -m)" != x86_64 ]; then echo "test-isa-emulated: skipped ($(uname -m): no x86-64 copies)"; exit 0; fi
if ! command -v qemu-x86_64-static >/dev/null 2>&1; then
    echo "test-isa-emulated: installing qemu-user-static (apt-get)"
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo -n"; fi
    if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            qemu-user-static; } >"${TMPDIR:-/tmp}/fa-qemu-apt.log" 2>&1 || ! command -v qemu-x86_64-static >/dev/null 2>&1; then
        echo "test-isa-emulated: SKIPPED: could not install qemu-user-static (log: ${TMPDIR:-/tmp}/fa-qemu-apt.log)"
        exit 0
    fi
fi
emulate() { qemu-x86_64-static -cpu "$cpu" "$@" 2>&1 | grep -v "TCG doesn't support"; }
for case in "Haswell:avx2 portable reference" "Nehalem:portable reference"; do
    cpu=${case%%:*} expected=${case#*:}
    paths=$(emulate "$build/flash-attention" isas)
    if [ "$paths" != "$expected" ]; then echo "FAILED: -cpu $cpu lists '$paths', expected '$expected'"; exit 1; fi
    for isa in $paths; do
        emulate -E FLASH_ATTENTION_ISA=$isa "$ctests/dlopen_test" "$build/libFlashAttention.so" | grep -q '^ok: ' \
            || { echo "FAILED: dlopen test, -cpu $cpu, path $isa"; exit 1; }
    done
    if [ -x "$build/FlashAttentionPackageTests.xctest" ]; then
        emulate "$build/FlashAttentionPackageTests.xctest" --testing-library swift-testing --filter ABITests \
            | grep -q 'Test run with .* passed' || { echo "FAILED: Swift ABI tests, -cpu $cpu"; exit 1; }
    fi
    echo "ok: -cpu $cpu: paths $paths; the dlopen test on each; Swift ABI tests"
done
