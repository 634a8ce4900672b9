"""In-tree PEP 517 / PEP 660 build backend for the flash_attention Python package (standard library only).

Building a wheel compiles the Swift library with the Swift standard library linked statically,

    swift build -c release -Xswiftc -static-stdlib --scratch-path <swift package>/.build-wheel --product FlashAttention

and puts the result into the wheel as ``flash_attention/lib/libFlashAttention.so``, where the binding's loader
looks first (after $FLASH_ATTENTION_LIBRARY). The wheel needs no Swift toolchain at run time: the backend refuses
a library that links a ``libswift*`` shared object, and loads the library once to check that its version matches
``include/flash_attention.h`` and its ABI number matches the binding's.

The Swift package is found at ``swift/`` next to pyproject.toml (an sdist carries it there) or in the nearest
folder above that holds both Package.swift and include/flash_attention.h (a checkout: two levels up).

Settings, each as an environment variable or as ``pip ... -C key=value`` (config settings win):

    FLASH_ATTENTION_PREBUILT_LIBRARY / prebuilt-library   package this libFlashAttention.so; run no Swift build
    FLASH_ATTENTION_SWIFT / swift                         the swift executable (default: `swift` on PATH)
    FLASH_ATTENTION_SCRATCH_PATH / scratch-path           SwiftPM's build folder (default: <package>/.build-wheel)

The version comes from FA_VERSION_MAJOR/MINOR/PATCH in include/flash_attention.h, the one place it is kept.
The wheel is tagged py3-none-linux_<arch>, <arch> read from the library's ELF header: it holds no Python
extension module, only a shared library for that architecture. It is not audited for manylinux; the glibc it
needs is printed during the build.

On macOS (Apple Silicon) the library is ``libFlashAttention.dylib``, built without -static-stdlib (Apple's
platforms do not support it; the Swift runtime is part of macOS 15, the package's minimum), and the wheel is
tagged py3-none-macosx_15_0_arm64 from its Mach-O header; a dylib that needs a Swift runtime from outside
/usr/lib/swift (a toolchain's) is refused. Not tested here: no macOS machine was available.

An editable install (pip install -e) puts bindings/python on sys.path and builds nothing; the library then comes
from $FLASH_ATTENTION_LIBRARY or the checkout's .build/release (`make build`), as for the tests.
"""

import base64
import hashlib
import io
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zipfile

NAME = "flash-attention-cpu"
SUMMARY = "Exact FlashAttention (forward and backward) for CPUs: a Swift C-ABI library called through ctypes and numpy"
REQUIRES_PYTHON = ">=3.8"
REQUIRES = ["numpy>=1.22"]
# Optional extras. torch: flash_attention.torch (custom operators, torch.compile; 2.5 has every API it uses).
# transformers: flash_attention.transformers, the attention backend (tested with transformers 5.24).
EXTRAS = {
    "bfloat16": ["ml_dtypes>=0.3"],
    "torch": ["torch>=2.5"],
    "transformers": ["torch>=2.5", "transformers>=5.0"],
}
CLASSIFIERS = [
    "Operating System :: POSIX :: Linux",
    "Operating System :: MacOS",
    "Programming Language :: Python :: 3",
    "Programming Language :: Swift",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
]

PACKAGE = "flash_attention"
DARWIN = sys.platform == "darwin"
LIBRARY_NAME = "libFlashAttention.dylib" if DARWIN else "libFlashAttention.so"
# The package's `platforms:` minimum (Package.swift), which the wheel tag states.
MACOS_MINIMUM = "15_0"
HEADER = pathlib.Path("include") / "flash_attention.h"
SWIFT_PRODUCT = "FlashAttention"
# What an sdist carries of the Swift package (under swift/), relative to the package root.
SWIFT_SOURCES = ["Package.swift", "Sources", "include", "Tests/FlashAttentionTests"]

PROJECT = pathlib.Path(__file__).resolve().parents[1]  # bindings/python, or the unpacked sdist
DIST = re.sub(r"[-_.]+", "_", NAME).lower()


class BuildError(Exception):
    pass


# ---- PEP 517 / PEP 660 hooks -------------------------------------------------------------------------------


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return _write_metadata_directory(metadata_directory)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    return _write_metadata_directory(metadata_directory)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    settings = _Settings(config_settings)
    package_root = _swift_package_root()
    version = _header_version(package_root)
    library = _library(settings, package_root)
    if DARWIN:
        machine, needed, glibc = _inspect_macho(library)
        # The OS's own Swift runtime (/usr/lib/swift) is fine; a toolchain's is not there at run time.
        swift_runtime = [name for name in needed if "libswift" in name and not name.startswith("/usr/lib/swift/")]
    else:
        machine, needed, glibc = _inspect_elf(library)
        swift_runtime = [name for name in needed if name.startswith("libswift")]
    if swift_runtime:
        raise BuildError(
            f"{library} links the Swift runtime dynamically ({', '.join(swift_runtime)}), so the wheel would need a"
            " Swift toolchain at run time. Build it with `swift build -c release -Xswiftc -static-stdlib`."
        )
    _check_loads(library, machine, version)
    tag = f"py3-none-macosx_{MACOS_MINIMUM}_{machine}" if DARWIN else f"py3-none-linux_{machine}"
    _log(f"{library.name} needs {', '.join(needed)}" + (f"; glibc >= {glibc}" if glibc else ""))

    files = []
    for path in sorted((PROJECT / PACKAGE).rglob("*")):
        relative = path.relative_to(PROJECT)
        if path.is_dir() or _skip(relative) or relative.parts[1] == "lib" or relative.name == "_version.py":
            continue
        files.append((relative.as_posix(), path.read_bytes(), False))
    files.append((f"{PACKAGE}/_version.py", _version_module(version), False))
    files.append((f"{PACKAGE}/lib/{LIBRARY_NAME}", library.read_bytes(), True))
    wheel = f"{DIST}-{version}-{tag}.whl"
    _write_wheel(pathlib.Path(wheel_directory) / wheel, version, tag, files)
    _log(f"wrote {wheel}")
    return wheel


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    version = _header_version(_swift_package_root())
    tag = "py3-none-any"
    files = [(f"__editable__.{DIST}.pth", (str(PROJECT) + "\n").encode(), False)]
    wheel = f"{DIST}-{version}-{tag}.whl"
    _write_wheel(pathlib.Path(wheel_directory) / wheel, version, tag, files)
    _log(
        f"editable install of {PROJECT}: the library comes from $FLASH_ATTENTION_LIBRARY, "
        f"{PROJECT / PACKAGE / 'lib'} or the checkout's .build/release (run `make build`)"
    )
    return wheel


def build_sdist(sdist_directory, config_settings=None):
    package_root = _swift_package_root()
    version = _header_version(package_root)
    base = f"{DIST}-{version}"
    members = [("PKG-INFO", _metadata(version))]
    for name in ["pyproject.toml", "README.md", "_backend/flash_attention_build.py"]:
        if (PROJECT / name).is_file():
            members.append((name, (PROJECT / name).read_bytes()))
    for path in sorted((PROJECT / PACKAGE).rglob("*")):
        relative = path.relative_to(PROJECT)
        if path.is_file() and not _skip(relative) and relative.parts[1] != "lib":
            members.append((relative.as_posix(), path.read_bytes()))
    for source in SWIFT_SOURCES:
        top = package_root / source
        paths = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in paths:
            relative = path.relative_to(package_root)
            if path.is_file() and not _skip(relative):
                members.append(("swift/" + relative.as_posix(), path.read_bytes()))
    sdist = f"{base}.tar.gz"
    mtime = _timestamp()
    with tarfile.open(pathlib.Path(sdist_directory) / sdist, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(f"{base}/{name}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            tar.addfile(info, io.BytesIO(data))
    _log(f"wrote {sdist}")
    return sdist


# ---- The Swift library ---------------------------------------------------------------------------------------


class _Settings:
    def __init__(self, config_settings):
        self._config = dict(config_settings or {})

    def get(self, key, environment):
        value = self._config.get(key)
        if isinstance(value, list):  # pip passes a repeated -C key as a list
            value = value[-1]
        return value or os.environ.get(environment) or None


def _swift_package_root():
    candidates = [PROJECT / "swift"] + list(PROJECT.parents)
    for folder in candidates:
        if (folder / "Package.swift").is_file() and (folder / HEADER).is_file():
            return folder
    raise BuildError(
        f"cannot find the FlashAttention Swift package (Package.swift and {HEADER}) in {PROJECT / 'swift'} or"
        f" any folder above {PROJECT}. Build from a checkout (pip install ./bindings/python) or from this"
        " project's sdist; a pip older than 21.3 copies the folder elsewhere first, so upgrade pip."
    )


def _header_version(package_root):
    text = (package_root / HEADER).read_text()
    parts = []
    for part in ("MAJOR", "MINOR", "PATCH"):
        match = re.search(rf"^\s*#\s*define\s+FA_VERSION_{part}\s+(\d+)\s*$", text, re.MULTILINE)
        if not match:
            raise BuildError(f"FA_VERSION_{part} not found in {package_root / HEADER}")
        parts.append(str(int(match.group(1))))
    return ".".join(parts)


def _library(settings, package_root):
    prebuilt = settings.get("prebuilt-library", "FLASH_ATTENTION_PREBUILT_LIBRARY")
    if prebuilt:
        path = pathlib.Path(prebuilt).expanduser()
        if not path.is_absolute():
            # The hook runs in the source tree; $PWD, where the shell left it, is where the user typed the path.
            bases = [pathlib.Path(os.environ["PWD"])] if os.environ.get("PWD") else []
            path = next((base / path for base in bases + [pathlib.Path.cwd()] if (base / path).is_file()), path)
        if not path.is_file():
            raise BuildError(f"FLASH_ATTENTION_PREBUILT_LIBRARY={prebuilt}: no such file (an absolute path is safest)")
        path = path.resolve()
        _log(f"packaging the prebuilt {path}")
        return path
    if not (sys.platform.startswith("linux") or DARWIN):
        raise BuildError(f"the wheel packages {LIBRARY_NAME} and supports Linux and macOS only (this is {sys.platform})")
    swift = settings.get("swift", "FLASH_ATTENTION_SWIFT") or shutil.which("swift")
    if not swift or not shutil.which(swift):
        raise BuildError(
            "`swift` was not found on PATH, and building this wheel compiles the Swift library. Install a Swift 6.2+"
            " toolchain (https://swift.org/install) and put it on PATH, set FLASH_ATTENTION_SWIFT to the swift"
            " executable, or set FLASH_ATTENTION_PREBUILT_LIBRARY to a libFlashAttention.so built with"
            " `swift build -c release -Xswiftc -static-stdlib`."
        )
    scratch = settings.get("scratch-path", "FLASH_ATTENTION_SCRATCH_PATH") or str(package_root / ".build-wheel")
    command = [
        swift, "build", "-c", "release", *([] if DARWIN else ["-Xswiftc", "-static-stdlib"]),
        "--scratch-path", scratch, "--product", SWIFT_PRODUCT,
    ]
    _log("building the library: " + " ".join(command) + f"  (in {package_root})")
    started = time.monotonic()
    # SwiftPM's progress goes to stderr so that it cannot mix with a frontend that reads the hook's stdout.
    _run(command, package_root, stdout=sys.stderr)
    bin_path = _run(command + ["--show-bin-path"], package_root, capture=True).strip().splitlines()[-1]
    library = pathlib.Path(bin_path) / LIBRARY_NAME
    if not library.is_file():
        raise BuildError(f"swift build succeeded but {library} does not exist")
    _log(f"built {library} in {time.monotonic() - started:.1f} s")
    return library


def _run(command, cwd, capture=False, stdout=None):
    try:
        if capture:
            return subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.PIPE, text=True).stdout
        subprocess.run(command, cwd=cwd, check=True, stdout=stdout)
    except subprocess.CalledProcessError as error:
        raise BuildError(f"`{' '.join(command)}` failed with exit status {error.returncode}") from None


def _check_loads(library, machine, version):
    """Loads the library in a child interpreter: its version must be the header's, its ABI the binding's."""
    host = os.uname().machine
    if machine != host:
        _log(f"not loading {library.name}: it is for {machine}, this machine is {host}")
        return
    capi = (PROJECT / PACKAGE / "_capi.py").read_text()
    match = re.search(r"^FA_ABI_VERSION\s*=\s*(\d+)", capi, re.MULTILINE)
    if not match:
        raise BuildError(f"FA_ABI_VERSION not found in {PROJECT / PACKAGE / '_capi.py'}")
    probe = (
        "import ctypes, sys\n"
        "lib = ctypes.CDLL(sys.argv[1])\n"
        "lib.flash_attention_version_string.restype = ctypes.c_char_p\n"
        "print(lib.flash_attention_version_string().decode(), lib.flash_attention_abi_version())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(library)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if result.returncode != 0:
        raise BuildError(f"{library} does not load: {result.stderr.strip()}")
    found_version, found_abi = result.stdout.split()
    if found_version != version or int(found_abi) != int(match.group(1)):
        raise BuildError(
            f"{library} is version {found_version} with ABI {found_abi}; this source tree is version {version}"
            f" with ABI {match.group(1)}. Rebuild the library (or drop FLASH_ATTENTION_PREBUILT_LIBRARY)."
        )


def _inspect_elf(path):
    """(machine, DT_NEEDED names, highest GLIBC_x.y version needed or None) of a 64-bit little-endian ELF."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{path} is not a 64-bit little-endian ELF shared library")
    machine_id, = struct.unpack_from("<H", data, 18)
    machine = {62: "x86_64", 183: "aarch64"}.get(machine_id)
    if machine is None:
        raise BuildError(f"{path}: unsupported ELF machine {machine_id}")
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    loads, dynamic = [], None
    for index in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + index * phentsize)
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        raise BuildError(f"{path} has no dynamic section")

    def offset(address):
        for vaddr, file_offset, size in loads:
            if vaddr <= address < vaddr + size:
                return address - vaddr + file_offset
        raise BuildError(f"{path}: address {address:#x} is outside the file")

    entries = {}
    for position in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, position)
        if tag == 0:
            break
        entries.setdefault(tag, []).append(value)
    strtab = offset(entries[5][0])

    def string(index):
        return data[strtab + index: data.index(b"\0", strtab + index)].decode()

    needed = [string(index) for index in entries.get(1, [])]
    glibc = []
    if 0x6FFFFFFE in entries:  # DT_VERNEED, DT_VERNEEDNUM
        position = offset(entries[0x6FFFFFFE][0])
        for _ in range(entries[0x6FFFFFFF][0]):
            _, count, _, aux, following = struct.unpack_from("<HHIII", data, position)
            entry = position + aux
            for _ in range(count):
                _, _, _, name, next_aux = struct.unpack_from("<IHHII", data, entry)
                match = re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?", string(name))
                if match:
                    glibc.append((int(match.group(1)), int(match.group(2))))
                entry += next_aux
            position += following
    return machine, needed, ("%d.%d" % max(glibc)) if glibc else None


def _inspect_macho(path):
    """(architecture, LC_LOAD_DYLIB paths, None) of a 64-bit little-endian Mach-O dylib."""
    data = path.read_bytes()
    magic, cputype, _, _, ncmds, _ = struct.unpack_from("<IiiIII", data, 0)
    if magic != 0xFEEDFACF:
        raise BuildError(f"{path} is not a 64-bit Mach-O library (a universal binary? build for arm64 only)")
    machine = {0x0100000C: "arm64", 0x01000007: "x86_64"}.get(cputype)
    if machine is None:
        raise BuildError(f"{path}: unsupported Mach-O CPU type {cputype:#x}")
    needed, position = [], 32
    for _ in range(ncmds):
        command, size = struct.unpack_from("<II", data, position)
        if command in (0xC, 0x80000018, 0x8000001F):  # LC_LOAD_DYLIB, LC_LOAD_WEAK_DYLIB, LC_REEXPORT_DYLIB
            name, = struct.unpack_from("<I", data, position + 8)
            needed.append(data[position + name: data.index(b"\0", position + name)].decode())
        position += size
    return machine, needed, None


# ---- Metadata and archives -----------------------------------------------------------------------------------


def _metadata(version):
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {NAME}",
        f"Version: {version}",
        f"Summary: {SUMMARY}",
        f"Requires-Python: {REQUIRES_PYTHON}",
    ]
    lines += [f"Classifier: {classifier}" for classifier in CLASSIFIERS]
    lines += [f"Requires-Dist: {requirement}" for requirement in REQUIRES]
    for extra, requirements in EXTRAS.items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {requirement}; extra == "{extra}"' for requirement in requirements]
    readme = PROJECT / "README.md"
    if readme.is_file():
        lines.append("Description-Content-Type: text/markdown")
        return ("\n".join(lines) + "\n\n" + readme.read_text()).encode()
    return ("\n".join(lines) + "\n").encode()


def _wheel_file(tag):
    return (
        f"Wheel-Version: 1.0\nGenerator: flash_attention_build\nRoot-Is-Purelib: false\nTag: {tag}\n"
    ).encode()


def _write_metadata_directory(metadata_directory):
    version = _header_version(_swift_package_root())
    dist_info = pathlib.Path(metadata_directory) / f"{DIST}-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_bytes(_metadata(version))
    return dist_info.name


def _version_module(version):
    return f'"""Written by the build backend from include/flash_attention.h."""\n\n__version__ = "{version}"\n'.encode()


def _write_wheel(target, version, tag, files):
    dist_info = f"{DIST}-{version}.dist-info"
    files = list(files) + [(f"{dist_info}/METADATA", _metadata(version), False), (f"{dist_info}/WHEEL", _wheel_file(tag), False)]
    record = []
    date_time = time.gmtime(max(_timestamp(), 315532800))[:6]  # zip cannot hold dates before 1980
    temporary = target.with_suffix(".tmp")
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data, executable in files:
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.external_attr = (0o100755 if executable else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        info = zipfile.ZipInfo(f"{dist_info}/RECORD", date_time=date_time)
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, "\n".join(record) + "\n")
    os.replace(temporary, target)


def _timestamp():
    """SOURCE_DATE_EPOCH if set (reproducible archives), else 1980-01-01."""
    return int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))


def _skip(relative):
    return any(part == "__pycache__" or part.startswith(".") for part in relative.parts) or relative.suffix in (
        ".pyc",
        ".pyo",
        ".so",
        ".dylib",
    )


def _log(message):
    print(f"flash_attention_build: {message}", file=sys.stderr, flush=True)
