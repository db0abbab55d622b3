"""GPU implementations of the public functions, on CuPy arrays (same signatures as the CPU ones).

Reached through :func:`resolvent._gpu.dispatch` when the arrays of a call live on a CUDA device.
Validation mirrors the CPU layer (same exceptions, same wording); the computing runs on CuPy's
current stream, the numba kernels launched on that stream too.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .._errors import SolveInfo
from .._validate import check_choice, check_gamma, check_positive_int, unbroadcast
from ..attention._api import _check_scale, check_chain_shapes, check_options, check_qkv_shapes
from ..attention._api import default_block_size as _cpu_default_block_size

__all__ = ["chain_attention", "chain_attention_vjp", "default_block_size", "block_mass", "chain", "solve",
           "solve_shifts", "solve_vjp", "chain_vjp", "gpu_block_size"]


def _cp():
    import cupy

    return cupy


def _stream():
    """The numba stream object for CuPy's current stream."""
    from numba import cuda

    return cuda.external_stream(_cp().cuda.get_current_stream().ptr)


@functools.lru_cache(maxsize=256)  # on every call's path: the checks behind it cost microseconds
def gpu_block_size(n, topk=0):
    """The GPU's default block size: the CPU rule ``4 n^(1/3)`` (multiple of 8) capped at 64, the
    largest block whose score tile the fused kernels keep in shared memory (docs/gpu.md)."""
    from ._kernels import MAX_BLOCK

    return min(_cpu_default_block_size(n, topk=topk), MAX_BLOCK)


def default_block_size(n, *, topk=0):
    return _cpu_default_block_size(n, topk=topk)


def _as_float(x, name, min_ndim=0):
    cp = _cp()
    x = cp.asarray(x)
    if x.dtype.kind in "biu":
        x = x.astype(cp.float64)
    elif x.dtype == cp.float16:
        x = x.astype(cp.float32)
    elif x.dtype.kind not in "fc":
        raise TypeError(f"{name} must hold numbers, got an array of dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {x.shape}")
    return x


def _all_finite(*named):
    """One reduction per array, one synchronisation for all; ValueError names the first bad one."""
    from ._fused import raise_nonfinite

    cp = _cp()
    flags = cp.stack([cp.isfinite(x).all() for _, x in named])
    raise_nonfinite([not good for good in cp.asnumpy(flags)], [name for name, _ in named])


def _prepare_qkv(q, k, v, finite=True):
    cp = _cp()
    in16 = all(getattr(x, "dtype", None) == np.float16 for x in (q, k, v))
    q, k, v = (_as_float(x, nm, 2) for x, nm in ((q, "q"), (k, "k"), (v, "v")))
    for nm, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype.kind == "c":
            raise ValueError(f"{nm} must be real for attention, got dtype {x.dtype}")
    batch, n, d = check_qkv_shapes(q, k, v)
    dt = np.result_type(q.dtype, k.dtype, v.dtype)
    out_dt = np.dtype(np.float16) if in16 else dt
    if finite:
        _all_finite(("q", q), ("k", k), ("v", v))
    B = math.prod(batch)

    def flat(x, last):
        if x.dtype == dt and x.flags.c_contiguous and x.shape[:-2] == batch:
            return x.reshape((B, n, last))  # the common case: one call, not three (host time)
        return cp.ascontiguousarray(cp.broadcast_to(x, batch + x.shape[-2:]).reshape((B, n, last)), dtype=dt)

    return flat(q, d), flat(k, d), flat(v, v.shape[-1]), batch, dt, out_dt


_GAMMA: dict = {}  #: (value, batch, dtype, device) -> gamma on the device, for a scalar gamma


def _gamma(gamma, batch, dt):
    """``gamma`` validated and broadcast to one value per batch entry, on the device.  A scalar's
    device copy is kept (the kernels only read it): a host-to-device copy synchronises, and it
    cost more than the kernels' launches."""
    cp = _cp()
    key = None
    if isinstance(gamma, (float, int, np.floating, np.integer)) and not isinstance(gamma, bool):
        key = (float(gamma), tuple(batch), np.dtype(dt).str, cp.cuda.Device().id)
        hit = _GAMMA.get(key)
        if hit is not None:
            return hit
    g = cp.asnumpy(gamma) if isinstance(gamma, cp.ndarray) else gamma
    out = cp.asarray(np.ascontiguousarray(check_gamma(g, batch, dt)).reshape(-1))
    if key is not None:
        if len(_GAMMA) >= 64:
            _GAMMA.clear()
        _GAMMA[key] = out
    return out


def _topk_unsupported(topk):
    raise NotImplementedError(
        f"chain_attention with topk={topk} (block-sparse links) is not implemented on the GPU backend; "
        "use topk=0 on the GPU, or move the arrays to the CPU (x.cpu() in PyTorch, cupy.asnumpy)"
    )


def chain_attention(q, k, v, gamma=0.9, *, method="blockwise", block_size=None, topk=0, scale=None,
                    check_finite=True):
    from . import _attention, _blockwise, _fused

    cp = _cp()
    block_size, topk = check_options(method, block_size, topk)
    if topk:
        _topk_unsupported(topk)
    qf, kf, vf, batch, dt, out_dt = _prepare_qkv(q, k, v, finite=False)
    n, d = qf.shape[-2:]
    scale = _check_scale(scale, d)
    g = _gamma(gamma, batch, dt)
    b = min(block_size or gpu_block_size(n), n)
    if check_finite and not (method == "blockwise" and _fused.supported(dt, b)):
        # the fused pipeline checks inside its kernels, with one synchronisation at the end
        _all_finite(("q", qf), ("k", kf), ("v", vf))
    if method == "dense":
        y = _attention.dense_forward(cp, qf, kf, vf, g, scale)
    elif method == "exact":
        y = _attention.exact_forward(cp, qf, kf, vf, g, scale)
    else:
        y = _blockwise.forward(cp, qf, kf, vf, g, b, scale, check=check_finite)
    return y.reshape(batch + y.shape[-2:]).astype(out_dt, copy=False)


def chain_attention_vjp(q, k, v, gamma, dy, *, method="blockwise", block_size=None, topk=0, scale=None,
                        return_dgamma=False, y=None, check_finite=True):
    from . import _attention, _blockwise

    cp = _cp()
    block_size, topk = check_options(method, block_size, topk)
    if topk:
        _topk_unsupported(topk)
    shapes = [tuple(np.shape(x)) for x in (q, k, v)]
    gamma_shape = np.shape(gamma)
    qf, kf, vf, batch, dt, out_dt = _prepare_qkv(q, k, v, finite=False)
    B, n, d = qf.shape
    dvdim = vf.shape[-1]
    scale = _check_scale(scale, d)
    g = _gamma(gamma, batch, dt)
    dyf = _as_float(dy, "dy", 2)
    if dyf.shape != batch + (n, dvdim):
        raise ValueError(f"dy must have the output's shape {batch + (n, dvdim)}, got {dyf.shape}")
    b = min(block_size or gpu_block_size(n), n)
    in_kernels = method == "blockwise" and _blockwise.checks_inputs(dt, b)
    if check_finite and not in_kernels:
        _all_finite(("q", qf), ("k", kf), ("v", vf), ("dy", dyf))  # one synchronisation for all four
    dyf = cp.ascontiguousarray(dyf.reshape(B, n, dvdim), dtype=dt)
    yf = None
    if y is not None:
        yf = _as_float(y, "y", 2)
        if yf.shape != batch + (n, dvdim):
            raise ValueError(f"y must have the output's shape {batch + (n, dvdim)}, got {yf.shape}")
        yf = cp.ascontiguousarray(yf.reshape(B, n, dvdim), dtype=dt)
    if method == "dense":
        grads = _attention.dense_backward(cp, qf, kf, vf, g, scale, dyf)
    elif method == "exact":
        grads = _attention.exact_backward(cp, qf, kf, vf, g, scale, dyf)
    elif in_kernels:
        # the kernels flag non-finite input; one synchronisation once everything is queued
        from ._fused import SYNC_HEAD, raise_nonfinite

        flags = cp.zeros(SYNC_HEAD, dtype=np.int32)
        grads = _blockwise.backward(cp, qf, kf, vf, g, b, scale, dyf, y=yf, flags=flags)
        if check_finite:
            raise_nonfinite(flags.get(), ("q", "k", "v", "dy"))
    else:
        grads = _blockwise.backward(cp, qf, kf, vf, g, b, scale, dyf, y=yf)
    dq, dk, dvv, dg = grads
    out = [
        unbroadcast(x.reshape(batch + x.shape[-2:]), shp).astype(out_dt, copy=False)
        for x, shp in zip((dq, dk, dvv), shapes)
    ]
    if return_dgamma:
        out.append(unbroadcast(dg.reshape(batch), gamma_shape).astype(dt, copy=False))
    return tuple(out)


def block_mass(q, k, block_size, scale=None, *, topk=0):
    raise NotImplementedError(
        "resolvent.block_mass is not implemented on the GPU backend (it is a diagnostic, not a hot "
        "path); pass CPU arrays (cupy.asnumpy(q), x.cpu() in PyTorch)"
    )


def solve_vjp(*args, **kwargs):
    raise NotImplementedError(
        "resolvent.solve_vjp is not implemented on the GPU backend yet; pass CPU arrays"
    )


def chain_vjp(*args, **kwargs):
    raise NotImplementedError(
        "resolvent.chain_vjp is not implemented on the GPU backend yet; pass CPU arrays"
    )


# --------------------------------------------------------------------------------------------------
# linear solves


def solve(A, B, *, z=1.0, method="auto", block_size=None, tol=None, maxiter=None, lower=False,
          check_finite=True, return_info=False):
    from ..linalg._solve import METHODS as SOLVE_METHODS
    from ..linalg._solve import _check_scalar
    from ._linalg import prepare, relative_residual, solve_direct

    method = check_choice(method, "method", SOLVE_METHODS)
    check_positive_int(block_size, "block_size")
    check_positive_int(maxiter, "maxiter")
    z = _check_scalar(z, "z")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < np.inf):
        raise ValueError(f"tol must be a positive finite real number or None, got {tol!r}")
    if method in ("block_jacobi", "two_level"):
        raise NotImplementedError(
            f"method={method!r} is not implemented on the GPU backend; use method='direct' or 'auto' "
            "(on the GPU 'auto' is a batched LU, or a blocked triangular solve with lower=True), or pass "
            "CPU arrays"
        )
    A, B3, vector, dtype, batch = prepare(A, B, z, check_finite)
    X = solve_direct(A, B3, z, lower, dtype, batch)
    info = SolveInfo(True, 0, relative_residual(A, B3, X, z) if return_info else 0.0, "direct")
    if vector:
        X = X[..., 0]
    return (X, info) if return_info else X


def solve_shifts(A, B, zs, *, lower=False, check_finite=True):
    from ._linalg import solve_shifts as _ss

    return _ss(A, B, zs, lower=lower, check_finite=check_finite)


def chain(A, V, gamma, *, method="auto", block_size=None, tol=None):
    cp = _cp()
    A = _as_float(A, "A", 2)
    V = _as_float(V, "V", 1)
    Vm, vector, batch = check_chain_shapes(A, V)
    dt = np.result_type(A.dtype, Vm.dtype)
    gdt = np.result_type(dt, np.float32).type(0).real.dtype
    g = cp.asnumpy(gamma) if isinstance(gamma, cp.ndarray) else gamma
    g = cp.asarray(np.ascontiguousarray(check_gamma(g, batch, gdt)))[..., None, None]
    U = A @ Vm
    lower = not bool(cp.triu(A, 1).any())
    X = solve(g * A, U, z=1.0, method="direct" if lower else method, block_size=block_size, tol=tol,
              lower=lower)
    Y = (1 - g) * X
    return Y[..., 0] if vector else Y
