"""CPU kernels compiled with Numba (optional: ``pip install resolvent[cpu]``).

Nothing here is imported or compiled when ``resolvent`` is imported: :func:`available` and the
kernel getters import Numba on first use, and the kernels are compiled then (and cached on disk).
"""

from __future__ import annotations

import functools
import importlib.util

__all__ = ["available"]


@functools.cache
def available() -> bool:
    """Whether Numba can be imported (checked once, lazily)."""
    if importlib.util.find_spec("numba") is None:
        return False
    try:
        import numba  # noqa: F401
    except Exception:  # a broken numba install: fall back to NumPy
        return False
    return True
