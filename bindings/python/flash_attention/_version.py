"""The package version: FA_VERSION_MAJOR/MINOR/PATCH of include/flash_attention.h.

A wheel replaces this file with the constant its build read from the header; in a checkout the header is read here.
"""

import pathlib
import re


def _from_header():
    header = pathlib.Path(__file__).resolve().parents[3] / "include" / "flash_attention.h"
    try:
        text = header.read_text()
    except OSError:
        return "0+unknown"
    parts = [re.search(rf"^\s*#\s*define\s+FA_VERSION_{part}\s+(\d+)", text, re.MULTILINE) for part in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(str(int(match.group(1))) for match in parts) if all(parts) else "0+unknown"


__version__ = _from_header()
