"""Counter-based Gaussian values: the random draws of weight surgery.

Drop-Upcycling at r = 0.5 draws half of every expert anew: 4.2 G values for 8x1.5B. torch's CPU
``normal_`` draws from one sequential Mersenne Twister at 0.2-0.3 G values/s per core, which made
the draws alone most of a conversion's time. Here value ``p`` of stream ``key`` is a pure function
of ``(key, p)``: the SplitMix64 finaliser of a Weyl counter (Steele, Lea and Flood, OOPSLA 2014)
gives 64 random bits per pair of values, and a Box-Muller transform turns them into two standard
normal values. The loop is plain arithmetic, so a C compiler vectorises it (about 3x torch here),
and any slice of a stream can be produced on its own.

The C kernel (``_gauss.c``) is compiled once per machine with the system C compiler and cached.
Without a compiler, the numpy code below computes the same IEEE single-precision operations in
the same order and gives the same bits, only slower: outputs never depend on whether ``cc``
exists. ``DROPUP_GAUSS=numpy`` forces that path.

Precision: uniforms carry 32 (radius) and 24 (angle) bits, so values reach 6.7 standard
deviations; log, sin and cos are single-precision polynomials (Cephes coefficients, about one
unit in the last place).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

_SOURCE = Path(__file__).with_name("_gauss.c")
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
_CHUNK = 1 << 16  # pairs per numpy step: temporaries stay in cache

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_u64 = np.uint64
_f32 = np.float32
GOLDEN = _u64(0x9E3779B97F4A7C15)


def gaussian(shape: tuple[int, ...] | int, mean: float, std: float, key: int,
             dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
             first: int = 0) -> torch.Tensor:
    """Values ``first, first + 1, ...`` of stream ``key`` as ``mean + std * z``, in ``dtype``.

    ``out`` (contiguous, of ``shape``) is filled when given. float32 and bfloat16 are produced
    directly; other dtypes are rounded from float32.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    if not out.is_contiguous() or tuple(out.shape) != shape:
        raise ValueError(f"out must be a contiguous tensor of shape {shape}")
    key = int(key) & 0xFFFFFFFFFFFFFFFF
    n = out.numel()
    if out.dtype in (torch.float32, torch.bfloat16):
        _fill(key, first, n, mean, std, out)
    else:
        out.copy_(gaussian(shape, mean, std, key, torch.float32, first=first))
    return out


def backend() -> str:
    """``"c"`` when the compiled kernel is in use, else ``"numpy"``."""
    return "c" if _library() is not None else "numpy"


def _fill(key: int, first: int, n: int, mean: float, std: float, out: torch.Tensor) -> None:
    lib = _library()
    if lib is not None:
        fn = lib.dropup_gauss_bf16 if out.dtype == torch.bfloat16 else lib.dropup_gauss_f32
        fn(key, first, n, mean, std, out.data_ptr())  # ctypes drops the GIL for the call
        return
    flat = out.view(-1)
    step = 2 * _CHUNK
    for start in range(0, n, step):
        stop = min(n, start + step)
        values = torch.from_numpy(reference_values(key, first + start, stop - start, mean, std))
        flat[start:stop].copy_(values)  # float32 -> bfloat16 rounds to nearest even, as in C


def reference_values(key: int, first: int, n: int, mean: float, std: float) -> np.ndarray:
    """The numpy definition of values ``first .. first + n - 1`` (float32), bit-equal to C."""
    lo_pair, hi_pair = first // 2, (first + n + 1) // 2
    c, s = _pairs(key, lo_pair, hi_pair - lo_pair)
    both = np.empty(2 * c.size, dtype=_f32)
    both[0::2], both[1::2] = c, s
    z = both[first - 2 * lo_pair:first - 2 * lo_pair + n]
    return _f32(mean) + _f32(std) * z


def _pairs(key: int, first_pair: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(count, dtype=_u64) + _u64(first_pair)
    z = _u64(key) + i * GOLDEN  # uint64 arithmetic wraps, as in C
    z = (z ^ (z >> _u64(30))) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _u64(27))) * _u64(0x94D049BB133111EB)
    h = z ^ (z >> _u64(31))
    u1 = (h >> _u64(32)).astype(np.uint32).astype(_f32) * _f32(2.3283064365386963e-10) \
        + _f32(1.1641532182693481e-10)
    r = np.sqrt(_f32(-2.0) * _log_unit(u1))
    t = (h.astype(np.uint32) >> np.uint32(8)).astype(_f32) * _f32(4.76837158203125e-07)
    j = t.astype(np.int32)
    f = t - j.astype(_f32)
    g = np.where((j & 1) != 0, _f32(1.0) - f, f)
    a = g * _f32(0.785398163397448309616)
    a2 = a * a
    sp = _f32(8.3321608736e-3) + a2 * _f32(-1.9515295891e-4)
    sp = _f32(-1.6666654611e-1) + a2 * sp
    sn = a + (a * a2) * sp
    cp = _f32(-1.388731625493765e-3) + a2 * _f32(2.443315711809948e-5)
    cp = _f32(4.166664568298827e-2) + a2 * cp
    cs = (_f32(1.0) - _f32(0.5) * a2) + (a2 * a2) * cp
    swap = ((j + 1) & 2) != 0
    sv = np.where(swap, cs, sn)
    cv = np.where(swap, sn, cs)
    sv = np.where((j & 4) != 0, -sv, sv)
    cv = np.where(((j + 2) & 4) != 0, -cv, cv)
    return r * cv, r * sv


def _log_unit(x: np.ndarray) -> np.ndarray:
    b = x.view(np.uint32)
    e = ((b >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int32) - np.int32(126)
    m = ((b & np.uint32(0x007FFFFF)) | np.uint32(0x3F000000)).view(_f32)
    small = m < _f32(0.707106781186547524)
    e = e - small.astype(np.int32)
    m = np.where(small, (m + m) - _f32(1.0), m - _f32(1.0))
    z = m * m
    y = _f32(7.0376836292e-2) * m - _f32(1.1514610310e-1)
    for coef in (1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
                 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = y * m + _f32(coef)
    y = (y * m) * z
    fe = e.astype(_f32)
    y = y + fe * _f32(-2.12194440e-4)
    y = y - _f32(0.5) * z
    return (m + y) + fe * _f32(0.693359375)


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("DROPUP_GAUSS", "").lower() != "numpy":
                _lib = _load()
            _tried = True
    return _lib


def _cache_dir() -> Path:
    root = os.environ.get("DROPUP_CACHE") or os.environ.get("XDG_CACHE_HOME") \
        or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dropup"


def _cpu_fingerprint() -> str:
    """The build uses -march=native, so a cache shared between machines keys on the CPU."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}-{platform.processor()}-{flags}"


def _load() -> ctypes.CDLL | None:
    source = _SOURCE.read_bytes()
    cc = os.environ.get("CC", "cc")
    digest = hashlib.sha256(source + " ".join([cc, *_FLAGS]).encode()
                            + _cpu_fingerprint().encode()).hexdigest()[:16]
    path = _cache_dir() / f"gauss-{digest}.so"
    if not path.exists():
        path = _build(cc, path)
    if path is None:
        print("dropup: note: no working C compiler (set CC); random values come from the numpy "
              "path: the same values, about 30x slower", file=sys.stderr)
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64, ctypes.c_float, ctypes.c_float,
                ctypes.c_void_p]
    for fn in (lib.dropup_gauss_f32, lib.dropup_gauss_bf16):
        fn.argtypes, fn.restype = argtypes, None
    return lib


def _build(cc: str, path: Path) -> Path | None:
    """Compile the kernel into ``path`` (or a temporary directory when that is read-only)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / "dropup" / path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        for extra in (["-march=native"], []):
            try:
                done = subprocess.run([cc, *_FLAGS, *extra, "-o", tmp, str(_SOURCE)],
                                      capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError):
                return None
            if done.returncode == 0:
                os.replace(tmp, path)  # atomic: concurrent builders each install a whole file
                return path
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
