#!/usr/bin/env bash
# Packaging test: builds the Python wheel, checks the library it bundles, installs it into a fresh virtual
# environment and runs it from outside the repository with the Swift toolchain out of reach.
#
#   bash Tests/packaging/test_wheel.sh        (from the repository root; PYTHON=python3.x to pick the interpreter)
#
# 1. `pip wheel ./bindings/python --no-index --no-deps`: the in-tree backend needs nothing from PyPI
#    (requires = []), so build isolation stays on and --no-index proves the build is offline. SwiftPM builds in
#    .build-wheel/ (kept between runs, like .build/).
# 2. The wheel's name and RECORD; the bundled .so: no libswift* in DT_NEEDED, no RPATH/RUNPATH into a toolchain,
#    nothing unresolved under ldd.
# 3. A fresh venv gets numpy and ml_dtypes from PyPI (the wheel's only dependencies); only where PyPI cannot be
#    reached does the venv fall back to --system-site-packages for numpy. The wheel itself is installed with
#    --no-index.
# 4. From an empty folder outside the repository, under `env -i PATH=/usr/bin:/bin` (no swift on PATH, no
#    LD_LIBRARY_PATH, FLASH_ATTENTION_LIBRARY or PYTHONPATH) and `python -I`: the package must come from the venv,
#    the library from the package's lib/, no libswift*.so may be mapped; forward (float32, causal GQA, LSE,
#    float16, bfloat16), backward and thread invariance are checked against the float64 reference; then
#    `python -m flash_attention info` and `demo`.
# 5. The backend's error when swift is missing, and FLASH_ATTENTION_PREBUILT_LIBRARY, which must give a wheel
#    with the same files and the same library (byte-identical unless a source file changed meanwhile).
# Exits non-zero on the first failure; removes its temporary folder on every exit.

set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/flash-attention-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
started=$SECONDS

step() { printf '\n== %s (%ds)\n' "$*" $((SECONDS - started)); }
fail() { echo "FAIL: $*" >&2; exit 1; }
pip_quiet=(--disable-pip-version-check --no-input -q)
# What a machine without the toolchain looks like: a bare environment and a PATH without /opt/swift.
clean_env=(env -i PATH=/usr/bin:/bin HOME="$HOME" LANG=C.UTF-8)

version=$(sed -nE 's/^#define FA_VERSION_(MAJOR|MINOR|PATCH) ([0-9]+).*/\2/p' "$repo/include/flash_attention.h" | paste -sd.)
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || fail "cannot read FA_VERSION_* from include/flash_attention.h"
echo "repository $repo, version $version, $("$PYTHON" --version), $("$PYTHON" -m pip --version | cut -d' ' -f1-2)"

step "build the wheel"
"$PYTHON" -m pip wheel "${pip_quiet[@]}" --no-index --no-deps -w "$work/dist" "$repo/bindings/python"
wheels=("$work"/dist/*.whl)
[[ ${#wheels[@]} -eq 1 && -f ${wheels[0]} ]] || fail "expected one wheel in $work/dist"
wheel=${wheels[0]}
expected="flash_attention_cpu-$version-py3-none-linux_$(uname -m).whl"
[[ $(basename "$wheel") == "$expected" ]] || fail "wheel is $(basename "$wheel"), expected $expected"
echo "$(basename "$wheel"): $(du -k "$wheel" | cut -f1) KiB"

step "check the wheel's RECORD and the bundled library"
"$PYTHON" - "$wheel" "$work/inspect" <<'EOF'
import base64, hashlib, sys, zipfile
wheel, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    record = next(name for name in names if name.endswith(".dist-info/RECORD"))
    listed = set()
    for line in archive.read(record).decode().splitlines():
        name, digest, size = line.rsplit(",", 2)
        listed.add(name)
        if name == record:
            continue
        data = archive.read(name)
        actual = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert digest == actual and int(size) == len(data), f"RECORD mismatch for {name}"
    assert listed == names, f"RECORD and archive differ: {sorted(listed ^ names)}"
    for required in ["flash_attention/__init__.py", "flash_attention/__main__.py", "flash_attention/_version.py",
                     "flash_attention/lib/libFlashAttention.so"]:
        assert required in names, f"{required} missing from the wheel"
    info = archive.getinfo("flash_attention/lib/libFlashAttention.so")
    assert (info.external_attr >> 16) & 0o111, "the bundled library is not executable"
    archive.extract(info, target)
print(f"RECORD matches all {len(names)} files")
EOF
so="$work/inspect/flash_attention/lib/libFlashAttention.so"
needed=$(readelf -d "$so" | sed -nE 's/.*\(NEEDED\).*\[(.*)\]/\1/p')
echo "NEEDED: $(echo $needed)"
if grep -q '^libswift' <<<"$needed"; then fail "the bundled library links the Swift runtime dynamically"; fi
runpath=$(readelf -d "$so" | sed -nE 's/.*\((RUNPATH|RPATH)\).*\[(.*)\]/\2/p')
echo "RUNPATH: ${runpath:-none}"
if grep -qi 'swift' <<<"$runpath"; then fail "the bundled library's RUNPATH points into a Swift toolchain: $runpath"; fi
ldd_out=$(ldd "$so")
if grep -q 'not found' <<<"$ldd_out"; then fail "unresolved dependencies:"$'\n'"$ldd_out"; fi
if grep -q 'libswift' <<<"$ldd_out"; then fail "ldd resolves a libswift*:"$'\n'"$ldd_out"; fi
echo "ldd: $(wc -l <<<"$ldd_out") entries, none unresolved, no libswift*"
glibc=$(objdump -T "$so" 2>/dev/null | grep -oE 'GLIBC_[0-9]+\.[0-9]+(\.[0-9]+)?' | sort -uV | tail -1 || true)
echo "highest glibc symbol version: ${glibc:-unknown}"

step "create a fresh venv and install numpy, ml_dtypes from PyPI"
"$PYTHON" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
if "$venv_python" -m pip install "${pip_quiet[@]}" "numpy>=1.22" "ml_dtypes>=0.3"; then
    "$venv_python" -m pip install "${pip_quiet[@]}" --no-index "$wheel[bfloat16]"
    echo "venv: numpy $("$venv_python" -c 'import numpy; print(numpy.__version__)') from PyPI"
else
    echo "PyPI unreachable: recreating the venv with --system-site-packages for numpy"
    rm -rf "$work/venv"
    "$PYTHON" -m venv --system-site-packages "$work/venv"
    "$venv_python" -c 'import numpy' || fail "numpy is neither installable from PyPI nor installed in $PYTHON"
    "$venv_python" -m pip install "${pip_quiet[@]}" --no-index --no-deps "$wheel"
fi
"$venv_python" -m pip check

step "smoke test outside the repository, without swift on PATH"
mkdir "$work/outside"
cd "$work/outside"
if "${clean_env[@]}" sh -c 'command -v swift' >/dev/null; then
    echo "note: swift is in /usr/bin or /bin, so it stays on PATH; the libswift checks below still hold"
fi
"${clean_env[@]}" "$venv_python" -I - "$version" "$repo" <<'EOF'
import os, sys
import numpy as np

version, repo = sys.argv[1:]
assert "FLASH_ATTENTION_LIBRARY" not in os.environ and "LD_LIBRARY_PATH" not in os.environ
import flash_attention as fa
from flash_attention import (flash_attn_backward, flash_attn_func, reference_attention,
                             reference_attention_backward)

package = os.path.dirname(fa.__file__)
assert package.startswith(sys.prefix + os.sep), f"imported {package}, not from the venv {sys.prefix}"
assert not package.startswith(repo + os.sep), f"imported the checkout's package {package}"
info = fa.library_info()
bundled = os.path.join(package, "lib", "libFlashAttention.so")
assert info["library"] == bundled, f"loaded {info['library']}, expected the bundled {bundled}"
assert fa.__version__ == info["version"] == version, (fa.__version__, info["version"], version)
assert info["abi_version"] == 1, info

rng = np.random.default_rng(1234)
def randn(*shape):
    return rng.standard_normal(shape, dtype=np.float32)

q, k, v = randn(2, 77, 4, 64), randn(2, 77, 4, 64), randn(2, 77, 4, 64)
error = np.abs(flash_attn_func(q, k, v) - reference_attention(q, k, v)).max()
assert error <= 1e-5, f"float32: {error}"

q, k, v = randn(1, 50, 8, 128), randn(1, 130, 2, 128), randn(1, 130, 2, 128)
out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
ref_out, ref_lse = reference_attention(q, k, v, causal=True, return_lse=True)
assert np.abs(out - ref_out).max() <= 1e-5 and np.abs(lse - ref_lse).max() <= 1e-5, "causal GQA"
single = flash_attn_func(q, k, v, causal=True, num_threads=1)
assert np.array_equal(single, out), "num_threads=1 and 0 differ"

dout = randn(*q.shape)
grads = flash_attn_backward(dout, q, k, v, out, lse, causal=True)
for name, got, want in zip("dq dk dv".split(), grads, reference_attention_backward(dout, q, k, v, causal=True)):
    error = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert error <= 1e-4, f"backward {name}: {error}"

half = randn(1, 64, 2, 64).astype(np.float16)
out = flash_attn_func(half, half, half)
assert out.dtype == np.float16 and np.abs(out - reference_attention(half, half, half)).max() <= 2e-3, "float16"
try:
    import ml_dtypes
except ImportError:
    print("(bfloat16 skipped: no ml_dtypes)")
else:
    bf = randn(1, 64, 2, 64).astype(ml_dtypes.bfloat16)
    out = flash_attn_func(bf, bf, bf, causal=True)
    assert out.dtype == ml_dtypes.bfloat16
    assert np.abs(out.astype(np.float64) - reference_attention(bf, bf, bf, causal=True)).max() <= 1.6e-2, "bfloat16"

with open("/proc/self/maps") as maps:
    mapped = {line.split()[-1] for line in maps if "/" in line}
swift = sorted(path for path in mapped if "libswift" in os.path.basename(path))
assert not swift, f"Swift runtime libraries are mapped: {swift}"
assert bundled in mapped, "the bundled library is not mapped"
print(f"ok: {info['version']} ({info['kernel_isa']}, {info['default_num_threads']} threads) from {info['library']}")
EOF
"${clean_env[@]}" "$venv_python" -I -m flash_attention info | tee "$work/info.txt"
grep -q "$work/venv/.*/flash_attention/lib/libFlashAttention.so" "$work/info.txt" || fail "info does not show the bundled library"
"${clean_env[@]}" "$venv_python" -I -m flash_attention demo
cd "$repo"

step "the backend without swift: a clear error"
if "${clean_env[@]}" "$venv_python" -m pip wheel "${pip_quiet[@]}" --no-index --no-deps -w "$work/nowhere" \
    "$repo/bindings/python" >"$work/noswift.log" 2>&1; then
    if ! "${clean_env[@]}" sh -c 'command -v swift' >/dev/null; then fail "the wheel built without swift on PATH"; fi
else
    grep -q '`swift` was not found on PATH' "$work/noswift.log" || { cat "$work/noswift.log"; fail "unclear error without swift"; }
    echo "ok: $(grep -o '`swift` was not found on PATH[^.]*' "$work/noswift.log" | head -1)"
fi

step "FLASH_ATTENTION_PREBUILT_LIBRARY without swift: the same wheel"
"${clean_env[@]}" FLASH_ATTENTION_PREBUILT_LIBRARY="$so" "$venv_python" -m pip wheel "${pip_quiet[@]}" --no-index \
    --no-deps -w "$work/prebuilt" "$repo/bindings/python"
# Same files and the same library (the Python files are compared too, but may change under a concurrent edit).
"$PYTHON" - "$wheel" "$work/prebuilt/$(basename "$wheel")" <<'PY'
import sys, zipfile
built, prebuilt = (zipfile.ZipFile(path) for path in sys.argv[1:])
assert built.namelist() == prebuilt.namelist(), "the two wheels hold different files"
library = "flash_attention/lib/libFlashAttention.so"
assert built.read(library) == prebuilt.read(library), "the two wheels bundle different libraries"
changed = [name for name in built.namelist() if built.read(name) != prebuilt.read(name)]
print("ok: byte-identical wheel" if not changed else f"ok: same library; changed since the first build: {changed}")
PY

echo
echo "wheel packaging test passed in $((SECONDS - started)) s"
