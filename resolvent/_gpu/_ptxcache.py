"""A disk cache of the numba kernels' PTX, so that a new process does not compile them again.

numba compiles a kernel to PTX on its first launch in every process; the fused float32 kernels
(generated, unrolled) took about 100 s together on the H200's host, which every new process paid
on its first forward and backward.  numba's own ``cache=True`` needs a function defined in a file,
and ours are generated (``exec``) closures, so the PTX is kept here instead, under a key that fixes
everything it was compiled from:

- a hash of the sources of :mod:`resolvent._gpu` and the versions of numba and NVVM;
- the kernel, described recursively (:func:`function_key`): its bytecode, constants and names, and
  the values it sees through its closure and its globals (block sizes, thread counts, dtypes, the
  generated device functions it calls, described the same way);
- the argument types, the launch bounds and the device's compute capability.

Where: ``$RESOLVENT_KERNEL_CACHE`` if set (``0`` switches the cache off), else
``$XDG_CACHE_HOME/resolvent/kernels`` (``~/.cache/resolvent/kernels``).  Entries are written
atomically; an unreadable or unloadable entry is compiled again and replaced.
"""

from __future__ import annotations

import functools
import hashlib
import os
import types
from pathlib import Path

import numpy as np

__all__ = ["cache_dir", "function_key", "kernel_key", "load", "store"]

_SCALARS = (bool, int, float, complex, str, bytes, type(None), np.generic, np.dtype)


def cache_dir() -> Path | None:
    """The cache's directory, or None when ``RESOLVENT_KERNEL_CACHE=0``."""
    env = os.environ.get("RESOLVENT_KERNEL_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("0", "off", "false", "no") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resolvent" / "kernels"


def value_key(v, seen) -> str:
    """A description of ``v`` as a kernel sees it (a constant, a function it calls, a module)."""
    if isinstance(v, _SCALARS):
        return f"{type(v).__name__}:{v!r}"
    if isinstance(v, (tuple, list)):
        return type(v).__name__ + "(" + ",".join(value_key(x, seen) for x in v) + ")"
    py_func = getattr(v, "py_func", None)  # a numba dispatcher (kernel or device function)
    if isinstance(py_func, types.FunctionType):
        return "jit:" + function_key(py_func, seen)
    if isinstance(v, types.FunctionType):
        return "py:" + function_key(v, seen)
    if isinstance(v, types.ModuleType):
        return "module:" + v.__name__
    if isinstance(v, (types.BuiltinFunctionType, type)):
        return f"{getattr(v, '__module__', '')}.{v.__qualname__}"
    return f"{type(v).__module__}.{type(v).__qualname__}:{v!s}"  # numba types print their meaning


def _code_key(code, seen) -> str:
    parts = [code.co_name, code.co_code.hex(), ",".join(code.co_names), ",".join(code.co_varnames)]
    for c in code.co_consts:
        parts.append(_code_key(c, seen) if isinstance(c, types.CodeType) else f"{type(c).__name__}:{c!r}")
    return "|".join(parts)


def function_key(fn, seen=None) -> str:
    """A description of what ``fn`` computes: its code, and the values it reads through its closure
    and its globals, recursively (a function met again is named, not described again)."""
    seen = set() if seen is None else seen
    if id(fn.__code__) in seen:
        return "seen:" + fn.__qualname__
    seen.add(id(fn.__code__))
    parts = [fn.__qualname__, _code_key(fn.__code__, seen)]
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            parts.append(f"{name}={value_key(cell.cell_contents, seen)}")
        except ValueError:  # an empty cell
            parts.append(f"{name}=<empty>")
    names = set(fn.__code__.co_names)
    for c in fn.__code__.co_consts:  # names used by nested code (comprehensions)
        if isinstance(c, types.CodeType):
            names.update(c.co_names)
    for name in sorted(names):
        if name in fn.__globals__:
            parts.append(f"{name}={value_key(fn.__globals__[name], seen)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@functools.cache
def _environment() -> str:
    """The sources of this package and the compiler's versions."""
    import numba

    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in sorted(here.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(numba.__version__.encode())
    try:
        import importlib.metadata as md

        h.update(md.version("numba-cuda").encode())
    except Exception:
        pass
    try:
        from numba.cuda.cudadrv import nvvm

        h.update(repr(nvvm.NVVM().get_version()).encode())
    except Exception:
        pass
    return h.hexdigest()


def kernel_key(kern, argtypes, launch_bounds, cc) -> str:
    """The cache key of ``kern`` (a numba kernel) compiled for ``argtypes`` on compute capability
    ``cc`` with ``launch_bounds``."""
    parts = [_environment(), function_key(kern.py_func), repr(tuple(str(t) for t in argtypes)),
             repr(launch_bounds), repr(tuple(cc))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load(key) -> str | None:
    """The cached PTX for ``key``, or None."""
    d = cache_dir()
    if d is None:
        return None
    try:
        return (d / f"{key}.ptx").read_text()
    except (OSError, UnicodeDecodeError):
        return None


def store(key, ptx) -> None:
    """Keep ``ptx`` under ``key`` (atomically: a temporary file renamed; errors are ignored, the
    cache only saves time)."""
    d = cache_dir()
    if d is None:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(ptx)
        os.replace(tmp, d / f"{key}.ptx")
    except OSError:
        pass
