"""The ctypes mirror agrees with the header and the loaded library."""

import ctypes
import pathlib
import re

from flash_attention import _capi, library_info

HEADER = pathlib.Path(__file__).resolve().parents[3] / "include" / "flash_attention.h"


def test_constants_match_the_header():
    defines = dict(re.findall(r"#define (FA_\w+) (-?\d+)\b", HEADER.read_text()))
    names = [n for n in dir(_capi) if n.startswith("FA_")]
    assert names
    for name in names:
        assert int(defines[name]) == getattr(_capi, name), name


def test_struct_fields_match_the_header():
    body = re.search(r"typedef struct flash_attention_params \{(.*?)\} flash_attention_params;", HEADER.read_text(), re.S)
    text = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    fields = []
    for declaration in text.split(";"):
        declaration = declaration.strip()
        if not declaration:
            continue
        names = declaration.split(None, 1)[1] if not declaration.startswith("const") else declaration.split(None, 2)[2]
        if declaration.startswith(("const void", "void", "float *")):
            names = declaration.split("*", 1)[1]
        fields += [n.strip().lstrip("*") for n in names.split(",")]
    assert fields == [name for name, _ in _capi.Params._fields_]


def test_library_info():
    info = library_info()
    assert info["abi_version"] == _capi.FA_ABI_VERSION
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["version"])
    assert info["kernel_isa"] in ("avx2+fma+f16c", "none")
    assert info["default_num_threads"] >= 1
    assert ctypes.sizeof(_capi.Params) > 0
