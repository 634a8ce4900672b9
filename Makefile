# The README's two commands are `make demo` (build + walkthrough + realistic run) and `make test` (every
# test). Each installs what it needs first. CI runs `make test` (.ci/run).

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

PYTHON ?= python3
SWIFT ?= swift
CC ?= cc
CXX ?= c++
BUILD := .build/release
LIB := $(BUILD)/libFlashAttention.so
TMP := .build/c-tests

.PHONY: build demo test test-swift test-c test-python test-sanitizers deps bench clean

build:
	$(SWIFT) build -c release

demo: build
	$(BUILD)/flash-attention demo

# Python packages the tests need (numpy, pytest, hypothesis), from PyPI.
deps:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r bindings/python/requirements-test.txt

test: deps build test-c test-python test-swift test-sanitizers
	@echo "all tests passed"

test-swift:
	$(SWIFT) test -c release

# The header alone as C99 and C++17 with warnings as errors; a dlopen client checked against a naive C
# loop; 8 pthreads calling at once, then dlclose/dlopen; and the exported symbol list, which must hold
# only flash_attention_* functions.
test-c: build
	@mkdir -p $(TMP)
	$(CC) -std=c99 -Wall -Wextra -Werror -pedantic -Iinclude -c Tests/c/header_check.c -o $(TMP)/header_c.o
	$(CXX) -std=c++17 -Wall -Wextra -Werror -pedantic -Iinclude -x c++ -c Tests/c/header_check.c -o $(TMP)/header_cpp.o
	$(CC) -std=c99 -O1 -Wall -Wextra -Werror -Iinclude Tests/c/dlopen_test.c -ldl -lm -o $(TMP)/dlopen_test
	$(TMP)/dlopen_test $(LIB)
	$(CC) -std=c99 -O1 -Wall -Wextra -Werror -Iinclude Tests/c/concurrency_test.c -ldl -lpthread -o $(TMP)/concurrency_test
	$(TMP)/concurrency_test $(LIB)
	@exports=$$(nm -D --defined-only --extern-only $(LIB) | awk '{print $$3}' | grep -v '^flash_attention_'); \
	if [ -n "$$exports" ]; then echo "unexpected exported symbols:"; echo "$$exports"; exit 1; fi; \
	echo "ok: $(LIB) exports only flash_attention_* ($$(nm -D --defined-only --extern-only $(LIB) | wc -l) symbols)"

# The Swift tests under AddressSanitizer (with LeakSanitizer) and ThreadSanitizer, each in its own build
# folder. The suppressions cover the XCTest runner's own leaks and TSan's blindness to swift_once (see the
# files). UndefinedBehaviorSanitizer is not supported for Swift targets on Linux by this toolchain.
test-sanitizers:
	LSAN_OPTIONS=suppressions=$(CURDIR)/Tests/sanitizers/lsan.supp \
		$(SWIFT) test -c release --sanitize=address --scratch-path .build-asan
	TSAN_OPTIONS=suppressions=$(CURDIR)/Tests/sanitizers/tsan.supp \
		$(SWIFT) test -c release --sanitize=thread --scratch-path .build-tsan 2>&1 | grep -v "Cannot export local symbol"

test-python: build
	$(PYTHON) -m pytest -q bindings/python/tests

# Side-by-side benchmark (numpy always; PyTorch if importable: pip install torch==2.13.0).
bench: build
	$(PYTHON) bench/bench.py

clean:
	rm -rf .build
