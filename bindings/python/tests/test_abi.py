"""The ctypes mirror agrees with the header and the loaded library."""

import ctypes
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from flash_attention import _capi, library_info

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE.parents[2] / "include" / "flash_attention.h"


def test_constants_match_the_header():
    text = HEADER.read_text()
    defines = dict(re.findall(r"#define (FA_\w+) (-?\d+)\b", text))
    defines.update(re.findall(r'#define (FA_\w+) "([^"]*)"', text))
    names = [n for n in dir(_capi) if n.startswith("FA_")]
    assert names
    for name in names:
        value = getattr(_capi, name)
        assert (defines[name] if isinstance(value, str) else int(defines[name])) == value, name
    # The kernel paths: every FA_ISA_* of the header (appended there, so widest first only here).
    assert sorted(_capi.KERNEL_ISAS) == sorted(re.findall(r'#define FA_ISA_\w+ "([^"]*)"', text))
    assert _capi.KERNEL_ISAS[-2:] == (_capi.FA_ISA_PORTABLE, _capi.FA_ISA_REFERENCE)


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
    assert info["available_isas"][-2:] == ["portable", "reference"]
    assert all(isa in _capi.KERNEL_ISAS for isa in info["available_isas"])
    # Widest first, except that avx512bf16 may follow avx512 (on Intel cores, where it is no faster).
    widest_first = [isa for isa in _capi.KERNEL_ISAS if isa in info["available_isas"]]
    available = info["available_isas"]
    if "avx512bf16" in available and available.index("avx512") < available.index("avx512bf16"):
        i = widest_first.index("avx512bf16")
        widest_first[i], widest_first[i + 1] = widest_first[i + 1], widest_first[i]
    assert info["available_isas"] == widest_first
    forced = os.environ.get("FLASH_ATTENTION_ISA", "")
    assert info["kernel_isa"] == (forced if forced else info["available_isas"][0])
    assert info["default_num_threads"] >= 1
    assert ctypes.sizeof(_capi.Params) > 0


@pytest.mark.parametrize("name", ["bogus"] + [isa for isa in _capi.KERNEL_ISAS])
def test_isa_override_is_used_or_refused_with_a_message(name):
    # FLASH_ATTENTION_ISA is read once per process, so each value gets a fresh interpreter. A path this CPU
    # can run is used; any other name makes every call fail with FA_ERROR_UNSUPPORTED (never an illegal
    # instruction), naming the value and the paths that are available.
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE.parents[0])!r})
        import numpy as np
        from flash_attention import flash_attn_func, library_info
        info = library_info()
        q = np.ones((1, 4, 2, 16), np.float32)
        try:
            out = flash_attn_func(q, q, q)
            print("ran", info["kernel_isa"], float(out.sum()))
        except Exception as error:
            print("refused", info["kernel_isa"], type(error).__name__, error)
    """)
    env = dict(os.environ, FLASH_ATTENTION_ISA=name)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    available = library_info()["available_isas"]
    if name in available:
        assert result.stdout.startswith(f"ran {name} 128.0"), result.stdout
    else:
        assert result.stdout.startswith("refused invalid"), result.stdout
        assert f"FLASH_ATTENTION_ISA={name} cannot be used" in result.stdout
        assert "available here: " + ", ".join(available) in result.stdout
