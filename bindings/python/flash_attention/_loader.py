"""Finds and loads libFlashAttention (.so on Linux, .dylib on macOS), then checks that it speaks the ABI this binding was written for.

Search order: $FLASH_ATTENTION_LIBRARY, the package's own lib/ folder (wheels), the repository's release
build (.build/release). The error lists every path tried and how to build the library.
"""

import ctypes
import os
import pathlib
import sys
import threading

from . import _capi

ENV_VAR = "FLASH_ATTENTION_LIBRARY"
# SwiftPM names a dynamic library product libX.dylib on macOS and libX.so elsewhere.
LIBRARY_NAME = "libFlashAttention.dylib" if sys.platform == "darwin" else "libFlashAttention.so"

_lock = threading.Lock()
_library = None


def candidate_paths():
    """Every path the loader tries, in order."""
    paths = []
    if os.environ.get(ENV_VAR):
        paths.append(pathlib.Path(os.environ[ENV_VAR]))
    package = pathlib.Path(__file__).resolve().parent
    paths.append(package / "lib" / LIBRARY_NAME)
    repo = package.parents[2]
    paths.append(repo / ".build" / "release" / LIBRARY_NAME)
    return paths


def load():
    """The loaded, ABI-checked library (loaded once per process)."""
    global _library
    if _library is not None:  # the common case, without taking the lock
        return _library
    with _lock:
        if _library is None:
            _library = _load()
        return _library


def _load():
    tried = []
    for path in candidate_paths():
        if not path.is_file():
            tried.append(f"{path} (not found)")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as error:
            tried.append(f"{path} ({error})")
            continue
        _check_abi(_capi.declare(lib), path)
        lib.path = str(path)
        return lib
    raise OSError(
        f"{LIBRARY_NAME} was not found. Tried:\n  "
        + "\n  ".join(tried)
        + f"\nBuild it with `swift build -c release` (or `make build`) in the repository, or point {ENV_VAR}"
        " at the library."
    )


def _check_abi(lib, path):
    abi = lib.flash_attention_abi_version()
    if abi != _capi.FA_ABI_VERSION:
        raise OSError(f"{path} has ABI version {abi}; this binding needs {_capi.FA_ABI_VERSION}")
    params = _capi.Params()
    size = ctypes.sizeof(params)
    status = lib.flash_attention_params_init(ctypes.byref(params), size)
    if status != _capi.FA_OK or params.struct_size != size:
        raise OSError(
            f"{path} does not accept this binding's flash_attention_params ({size} bytes): "
            + lib.flash_attention_last_error().decode()
        )
