"""Input checks shared by the public functions.

The public functions validate and convert; the private ones compute on arrays that are known to be
well formed.  Every error names the argument, what was given and what is expected.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["as_inexact", "check_finite_array", "check_choice", "check_positive_int", "check_gamma", "unbroadcast"]


def as_inexact(x, name: str, *, min_ndim: int = 0) -> np.ndarray:
    """Return ``x`` as a floating or complex NumPy array.

    Integer and boolean input is promoted to float64; float16 is computed in float32; float32,
    float64, complex64 and complex128 are kept.
    """
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - depends on exotic inputs
        raise TypeError(f"{name} must be array-like, got {type(x).__name__}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must hold numbers, got an array of dtype {arr.dtype}")
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float64)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype not in (np.float32, np.float64, np.complex64, np.complex128):
        # longdouble / clongdouble: LAPACK has no such precision.
        arr = arr.astype(np.complex128 if np.iscomplexobj(arr) else np.float64)
    if arr.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got shape {arr.shape}"
        )
    return arr


def nonfinite_error(name: str) -> ValueError:
    """The error for an argument holding an infinity or a NaN (the CPU and GPU layers alike)."""
    return ValueError(
        f"{name} must contain only finite values (found inf or NaN); "
        "pass check_finite=False to skip this check"
    )


def check_finite_array(arr: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` when ``arr`` holds an infinity or a NaN."""
    if not np.isfinite(arr).all():
        raise nonfinite_error(name)


def check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_positive_int(value, name: str, *, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value}")
    return int(value)


def check_gamma(gamma, batch_shape: tuple, dtype) -> np.ndarray:
    """Validate ``gamma`` in [0, 1) and broadcast it over ``batch_shape``."""
    g = np.asarray(gamma)
    if g.dtype == object or not (np.issubdtype(g.dtype, np.floating) or np.issubdtype(g.dtype, np.integer)):
        raise ValueError(f"gamma must be a real number or array in [0, 1), got {gamma!r}")
    if not np.all(np.isfinite(g)) or np.any(g < 0) or np.any(g >= 1):
        raise ValueError(f"gamma must lie in [0, 1), got {gamma!r}")
    try:
        return np.broadcast_to(g.astype(dtype, copy=False), batch_shape)
    except ValueError:
        raise ValueError(
            f"gamma of shape {g.shape} does not broadcast over the batch dimensions {batch_shape}"
        ) from None


def unbroadcast(grad, shape: tuple):
    """Sum ``grad`` over the dimensions that broadcasting added to an input of ``shape``.

    Works on any array with ``sum`` and ``reshape`` (NumPy and CuPy): gradients of broadcast inputs.
    """
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, (s, g) in enumerate(zip(shape, grad.shape)) if s == 1 and g != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)
