#!/usr/bin/env bash
# Install test: what a C user gets from `make install`.
#
#   bash Tests/install/test_install.sh        (from anywhere; `make test-install` runs it; MAKE=... to pick make)
#
# 1. `make install PREFIX=.build/install-test/prefix` (the static-stdlib build in .build-install/): the exact file
#    list (header, libFlashAttention.so.X.Y.Z, .so.X and .so links, pkgconfig/flash-attention.pc).
# 2. The installed library: SONAME libFlashAttention.so.X, no libswift* in NEEDED, no RPATH/RUNPATH other than
#    $ORIGIN, only flash_attention_* exported.
# 3. examples/c/attention.c built from a folder outside the repository with nothing but
#    `pkg-config --cflags --libs flash-attention` (plus -lm for the example's own reference loop), C99 with
#    warnings as errors; the program must record the SONAME, and under `env -i PATH=/usr/bin:/bin` (no swift on
#    PATH) with only LD_LIBRARY_PATH=<installed libdir>, ldd must resolve the installed copy and no libswift*;
#    then it runs and must print the header's version and pass its own check.
# 4. DESTDIR staging with LIBDIR/INCLUDEDIR overrides: files land under DESTDIR, the .pc names the final paths.
# 5. `make uninstall` with the same variables leaves no file or link behind.
# Exits non-zero on the first failure with a FAIL: line.

set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MAKE=${MAKE:-make}
work="$repo/.build/install-test"
prefix="$work/prefix"
started=$SECONDS

step() { printf '\n== %s (%ds)\n' "$*" $((SECONDS - started)); }
fail() { echo "FAIL: $*" >&2; exit 1; }
# What a machine without the toolchain looks like: a bare environment and a PATH without /opt/swift.
clean_env=(env -i PATH=/usr/bin:/bin HOME="$HOME" LANG=C.UTF-8)

header="$repo/include/flash_attention.h"
major=$(sed -nE 's/^#define FA_VERSION_MAJOR ([0-9]+).*/\1/p' "$header")
minor=$(sed -nE 's/^#define FA_VERSION_MINOR ([0-9]+).*/\1/p' "$header")
patch=$(sed -nE 's/^#define FA_VERSION_PATCH ([0-9]+).*/\1/p' "$header")
version="$major.$minor.$patch"
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || fail "cannot read FA_VERSION_* from $header"
soname="libFlashAttention.so.$major"
for tool in pkg-config readelf ldd nm cc; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done
echo "repository $repo, version $version, prefix $prefix"

# Lists the files and links under $1 as sorted relative paths ("" when there are none).
installed_files() { (cd "$1" && find . \( -type f -o -type l \) | sed 's|^\./||' | LC_ALL=C sort); }

step "make install PREFIX=$prefix"
rm -rf "$work"
mkdir -p "$work"
"$MAKE" -C "$repo" --no-print-directory install PREFIX="$prefix" || fail "make install PREFIX=$prefix failed"
expected=$(printf '%s\n' include/flash_attention.h lib/libFlashAttention.so "lib/$soname" \
    "lib/libFlashAttention.so.$version" lib/pkgconfig/flash-attention.pc | LC_ALL=C sort)
actual=$(installed_files "$prefix")
[[ $actual == "$expected" ]] || fail "installed files differ from the expected list:
$(diff <(echo "$expected") <(echo "$actual") || true)"
lib="$prefix/lib/libFlashAttention.so.$version"
[[ -f $lib && ! -L $lib && -x $lib ]] || fail "$lib is not an executable regular file"
[[ $(readlink "$prefix/lib/$soname") == "libFlashAttention.so.$version" ]] || fail "lib/$soname does not point to libFlashAttention.so.$version"
[[ $(readlink "$prefix/lib/libFlashAttention.so") == "$soname" ]] || fail "lib/libFlashAttention.so does not point to $soname"
cmp -s "$header" "$prefix/include/flash_attention.h" || fail "the installed header differs from include/flash_attention.h"
echo "ok: $(echo $actual)"

step "check the installed library"
dynamic=$(readelf -d "$lib")
got_soname=$(sed -nE 's/.*\(SONAME\).*\[(.*)\]/\1/p' <<<"$dynamic")
echo "SONAME: $got_soname"
[[ $got_soname == "$soname" ]] || fail "SONAME is '$got_soname', expected $soname"
needed=$(sed -nE 's/.*\(NEEDED\).*\[(.*)\]/\1/p' <<<"$dynamic")
echo "NEEDED: $(echo $needed)"
if grep -q '^libswift' <<<"$needed"; then fail "the installed library links the Swift runtime dynamically: $(echo $needed)"; fi
runpath=$(sed -nE 's/.*\((RUNPATH|RPATH)\).*\[(.*)\]/\2/p' <<<"$dynamic")
echo "RPATH/RUNPATH: ${runpath:-none}"
for entry in ${runpath//:/ }; do
    [[ $entry == '$ORIGIN' ]] || fail "the installed library has RPATH/RUNPATH entry '$entry' (only \$ORIGIN is allowed)"
done
exports=$(nm -D --defined-only --extern-only "$lib" | awk '{print $3}')
if grep -v '^flash_attention_' <<<"$exports"; then fail "the installed library exports more than flash_attention_*"; fi
echo "ok: exports $(wc -l <<<"$exports") flash_attention_* symbols"

step "build examples/c/attention.c with pkg-config only"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
pc_version=$(pkg-config --modversion flash-attention) || fail "pkg-config cannot find flash-attention in $PKG_CONFIG_PATH"
[[ $pc_version == "$version" ]] || fail "pkg-config says version $pc_version, the header $version"
pc_flags=$(pkg-config --cflags --libs flash-attention)
echo "pkg-config --cflags --libs flash-attention: $pc_flags"
[[ $(pkg-config --variable=libdir flash-attention) == "$prefix/lib" ]] || fail "the .pc's libdir is not $prefix/lib"
[[ $(pkg-config --variable=includedir flash-attention) == "$prefix/include" ]] || fail "the .pc's includedir is not $prefix/include"
# From a folder of its own with a copy of the source, so neither the repository's include/ nor its .build can
# be picked up by accident.
mkdir -p "$work/example"
cp "$repo/examples/c/attention.c" "$work/example/"
# pc_flags is unquoted on purpose: it is a list of flags, as in the README's command.
# shellcheck disable=SC2086
(cd "$work/example" && cc -std=c99 -Wall -Wextra -Werror attention.c $pc_flags -lm -o attention) \
    || fail "examples/c/attention.c does not build with the installed copy"
example_needed=$(readelf -d "$work/example/attention" | sed -nE 's/.*\(NEEDED\).*\[(.*)\]/\1/p')
grep -qx "$soname" <<<"$example_needed" || fail "the example does not record $soname in NEEDED: $(echo $example_needed)"
echo "ok: the example's NEEDED: $(echo $example_needed)"

step "run the example without the toolchain"
run_env=("${clean_env[@]}" LD_LIBRARY_PATH="$prefix/lib")
resolved=$(cd "$work/example" && "${run_env[@]}" ldd ./attention) || fail "ldd failed on the example"
echo "$resolved"
if grep -q 'not found' <<<"$resolved"; then fail "ldd finds unresolved libraries"; fi
if grep -q 'libswift' <<<"$resolved"; then fail "a libswift* library is loaded"; fi
target=$(awk -v name="$soname" '$1 == name && $2 == "=>" {print $3}' <<<"$resolved")
[[ -n $target ]] || fail "ldd does not list $soname"
[[ $(realpath "$target") == "$(realpath "$lib")" ]] || fail "$soname resolved to $target, not the installed $lib"
status=0
output=$(cd "$work/example" && "${run_env[@]}" ./attention) || status=$?
echo "$output"
[[ $status == 0 ]] || fail "the example exited with status $status"
grep -q "^libFlashAttention $version " <<<"$output" || fail "the example did not report library version $version"
grep -qx ok <<<"$output" || fail "the example did not print ok"
# ldd shows link-time dependencies only; the loader's own log also covers anything dlopen'ed while running.
loaded=$(cd "$work/example" && "${run_env[@]}" LD_DEBUG=files ./attention 2>&1 >/dev/null) || fail "the example failed under LD_DEBUG=files"
if grep -q 'file=libswift' <<<"$loaded"; then fail "a libswift* library was loaded at run time: $(grep -o 'file=libswift[^ ]*' <<<"$loaded" | sort -u | tr '\n' ' ')"; fi
grep -qF "calling init: $prefix/lib/$soname" <<<"$loaded" || fail "the loader's log shows no $prefix/lib/$soname being initialised"
echo "ok: the loader initialised $prefix/lib/$soname and loaded no libswift*"

step "DESTDIR staging with LIBDIR/INCLUDEDIR overrides"
stage="$work/stage"
staged=(PREFIX=/opt/fa LIBDIR=/opt/fa/lib64 INCLUDEDIR=/opt/fa/include/fa DESTDIR="$stage")
"$MAKE" -C "$repo" --no-print-directory install "${staged[@]}" || fail "make install ${staged[*]} failed"
expected_staged=$(printf '%s\n' opt/fa/include/fa/flash_attention.h opt/fa/lib64/libFlashAttention.so \
    "opt/fa/lib64/$soname" "opt/fa/lib64/libFlashAttention.so.$version" opt/fa/lib64/pkgconfig/flash-attention.pc \
    | LC_ALL=C sort)
actual_staged=$(installed_files "$stage")
[[ $actual_staged == "$expected_staged" ]] || fail "DESTDIR install differs from the expected list:
$(diff <(echo "$expected_staged") <(echo "$actual_staged") || true)"
pc="$stage/opt/fa/lib64/pkgconfig/flash-attention.pc"
grep -qx 'prefix=/opt/fa' "$pc" || fail "the staged .pc does not say prefix=/opt/fa"
staged_flags=$(PKG_CONFIG_PATH="$stage/opt/fa/lib64/pkgconfig" pkg-config --cflags --libs flash-attention)
staged_flags=$(echo $staged_flags) # pkg-config ends its output with a space
[[ $staged_flags == "-I/opt/fa/include/fa -L/opt/fa/lib64 -lFlashAttention" ]] || fail "the staged .pc gives '$staged_flags'"
if grep -q "$stage" "$pc"; then fail "the staged .pc contains the DESTDIR path"; fi
"$MAKE" -C "$repo" --no-print-directory uninstall "${staged[@]}" || fail "make uninstall ${staged[*]} failed"
[[ -z $(installed_files "$stage") ]] || fail "make uninstall left files under $stage: $(installed_files "$stage")"
echo "ok"

step "make uninstall PREFIX=$prefix"
"$MAKE" -C "$repo" --no-print-directory uninstall PREFIX="$prefix" || fail "make uninstall PREFIX=$prefix failed"
left=$(installed_files "$prefix")
[[ -z $left ]] || fail "make uninstall left files under $prefix: $(echo $left)"
echo "ok: no files left under $prefix"

printf '\ninstall test passed (%ds)\n' $((SECONDS - started))
