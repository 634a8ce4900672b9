"""Fails where a linked binary's baseline code can reach an instruction of an ISA extension (AVX and wider).

Each kernel copy is compiled with its own ISA flags, and the CPU check in Dispatch.swift only guards the calls
into a copy. But modules also define compiler-generated code under shared names — value witnesses such as
`__swift_memcpy88_8`, specialisations of the standard library — as weak symbols, of which the linker keeps the
first it meets and every module then calls. A helper that an AVX-512 copy compiled could so serve baseline code
and crash a CPU without AVX-512 outside any kernel (seen: Zen 3, an illegal instruction copying a test argument).
Package.swift names the copies so that they link after the baseline modules; this check reads what was linked:
each function of the binary that uses a VEX-, EVEX- or AMX-encoded instruction (a `v` mnemonic, ymm, zmm or
mask registers, tile instructions) must be named by no baseline object of its link (one outside the
`_FlashAttentionKernels*` modules, defining or calling it). Functions local to an object (the shims' static C
functions, `t` in nm) do not count: they are not shared. What a named function calls is not followed (the
copies' table accessors are named by Dispatch and guarded there); `make test-isa-emulated` runs the binaries on
emulated CPUs without AVX-512 and without AVX, which catches what this reading cannot.

Usage: python3 Tests/isa/check_baseline_code.py BUILD_DIR BINARY...   (BUILD_DIR: .build/release; each binary
is a product there: libFlashAttention.so, flash-attention, FlashAttentionPackageTests.xctest)
"""
import pathlib
import platform
import re
import shlex
import subprocess
import sys

FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
# VEX/EVEX instructions (v-mnemonics, vzeroupper included), ymm/zmm/mask registers, AVX-512 mask and AMX ones.
AVX = re.compile(r"\t(v[a-z0-9]+|k[a-z]+[bwdq]|tile[a-z]+|tdp[a-z0-9]+|ldtilecfg|sttilecfg)(\s|$)|%([yz]mm|k)\d+")
COPY = "_FlashAttentionKernels"


def avx_functions(binary):
    """The functions of `binary` with an AVX instruction, each with its first such line."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    found, name = {}, None
    for line in text.splitlines():
        if m := FUNCTION.match(line):
            name = m.group(1)
        elif name and name not in found and AVX.search(line):
            found[name] = line.strip()
    return found


def baseline_symbols(build, binary):
    """The global, weak and undefined symbols of the baseline objects linked into `binary`."""
    product = re.sub(r"^lib|\.so$|\.xctest$", "", binary.name)
    objects = shlex.split((build / f"{product}.product" / "Objects.LinkFileList").read_text())
    baseline = [o for o in objects if not pathlib.Path(o).parent.name.startswith(COPY)]
    symbols = set()
    for line in subprocess.run(["nm", *baseline], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[-2] in "TWVUwvDBR":
            symbols.add(parts[-1])
    return symbols


def main():
    if platform.machine() not in ("x86_64", "AMD64"):
        print(f"check_baseline_code: skipped ({platform.machine()}: its one SIMD copy needs no ISA flags)")
        return
    build, failed = pathlib.Path(sys.argv[1]).resolve(), False
    for binary in map(pathlib.Path, sys.argv[2:]):
        vector, baseline = avx_functions(binary), baseline_symbols(build, binary.resolve())
        leaks = {name: line for name, line in vector.items() if name in baseline}
        print(f"{binary}: {len(vector)} functions with AVX instructions, {len(leaks)} of them named by baseline code")
        for name, line in sorted(leaks.items()):
            print(f"  {name}: {line}")
        failed |= bool(leaks)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
