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
    return min(_cpu_default_block_size(n, topk=topk), _max_block())


@functools.cache
def _max_block():
    from ._kernels import MAX_BLOCK

    return MAX_BLOCK


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
        key = (float(gamma), tuple(batch), np.dtype(dt).str, cp.cuda.runtime.getDevice())
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


_F32 = np.dtype(np.float32)


def _fast_case(q, k, v, gamma, method, block_size, topk, scale, check_finite):
    """The common case of the fast entries below, checked with a few comparisons: C-contiguous
    float32 CuPy arrays q, k (..., n, d) and v (..., n, dv) of one batch shape on the current device,
    a Python float ``gamma`` in ``[0, 1)``, the default ``method``, ``topk`` and ``scale``, blocks of
    at most ``MAX_BLOCK``.  Returns ``(B, n, d, dv, b, device, gamma on the device)``, or None."""
    if not (type(gamma) is float and 0.0 <= gamma < 1.0 and scale is None and type(method) is str
            and method == "blockwise" and type(topk) is int and topk == 0
            and (check_finite is True or check_finite is False)
            and (block_size is None or (type(block_size) is int and block_size > 0))):
        return None
    if type(k) is not type(q) or type(v) is not type(q):
        return None
    if q.dtype is not _F32 or k.dtype is not _F32 or v.dtype is not _F32:
        return None
    shp = q.shape
    vs = v.shape
    nd = len(shp)
    if nd < 2 or k.shape != shp or len(vs) != nd or vs[:-1] != shp[:-1]:
        return None
    n, d, dv = shp[-2], shp[-1], vs[-1]
    B = shp[0] if nd == 3 else math.prod(shp[:-2])
    if B < 1 or n < 1 or d < 1 or dv < 1:
        return None
    if not (q.flags.c_contiguous and k.flags.c_contiguous and v.flags.c_contiguous):
        return None
    dev = _cp().cuda.runtime.getDevice()
    if q.data.device_id != dev or k.data.device_id != dev or v.data.device_id != dev:
        return None
    b = min(block_size or gpu_block_size(n), n)
    if b > _max_block():
        return None
    return B, n, d, dv, b, dev, _gamma(gamma, (B,), _F32)


def _like_v(x, v):
    """Whether ``x`` (dy or y) can go to the kernels as it is: v's type, shape, dtype and device, and
    C-contiguous (the fast entries' condition)."""
    return (type(x) is type(v) and x.shape == v.shape and x.dtype is _F32 and x.flags.c_contiguous
            and x.data.device_id == v.data.device_id)


def chain_attention_fast(q, k, v, gamma=0.9, *rest, method="blockwise", block_size=None, topk=0, scale=None,
                         check_finite=True, **extra):
    """:func:`chain_attention` for its common case (:func:`_fast_case`), entered from the public
    function before the general argument handling (``resolvent._interop.register_fast``); anything
    else returns ``NotImplemented`` and goes the general way, which raises the errors.

    The general way spent about 0.1 ms of host time before the first launch (some 250 Python calls),
    which a timed call sees as idle device time; this is the same launch plan after a few
    comparisons."""
    case = None if rest or extra else _fast_case(q, k, v, gamma, method, block_size, topk, scale, check_finite)
    if case is None:
        return NotImplemented
    from . import _fused

    B, n, d, dv, b, dev, g = case
    vs = v.shape
    if len(vs) != 3:
        q, k, v = q.reshape(B, n, d), k.reshape(B, n, d), v.reshape(B, n, dv)
    y = _fused.run_plan(q, k, v, g, b, 1.0 / math.sqrt(d), dev, check_finite)
    return y if len(vs) == 3 else y.reshape(vs)


def chain_attention_vjp_fast(q, k, v, gamma, dy, *rest, method="blockwise", block_size=None, topk=0, scale=None,
                             return_dgamma=False, y=None, check_finite=True, **extra):
    """:func:`chain_attention_vjp` for the common case of :func:`chain_attention_fast` (``dy`` and
    ``y``, if given, shaped and stored as ``v``); ``NotImplemented`` otherwise."""
    if rest or extra or not (return_dgamma is True or return_dgamma is False):
        return NotImplemented
    case = _fast_case(q, k, v, gamma, method, block_size, topk, scale, check_finite)
    if case is None or not _like_v(dy, v) or not (y is None or _like_v(y, v)):
        return NotImplemented
    from ._fused import raise_nonfinite

    B, n, d, dv, b, dev, g = case
    shapes = (q.shape, k.shape, v.shape)
    if q.ndim != 3:
        q, k, v, dy = q.reshape(B, n, d), k.reshape(B, n, d), v.reshape(B, n, dv), dy.reshape(B, n, dv)
        y = None if y is None else y.reshape(B, n, dv)
    dq, dk, dvv, dg, bad = _checked_backward(q, k, v, g, b, 1.0 / math.sqrt(d), dy, y, check_finite)
    if check_finite:
        raise_nonfinite(bad, ("q", "k", "v", "dy"))
    out = [x.reshape(shp) for x, shp in zip((dq, dk, dvv), shapes)]
    if return_dgamma:
        out.append(unbroadcast(dg.reshape(shapes[0][:-2]), ()).astype(_F32, copy=False))
    return tuple(out)


def _checked_backward(q, k, v, g, b, scale, dy, y, check):
    """The fused backward with its non-finite flags: ``(dq, dk, dv, dgamma, flags on the host)``
    (``None`` for the flags when not ``check``).  C-contiguous CuPy arrays on a device run the
    backward's launch plan (``_fused.run_backward_plan``); the flags are copied back on a side
    stream as soon as the kernel that sets the last of them has run, so the call waits for that
    kernel, not for the whole backward (``_fused.copy_flags_after``)."""
    from . import _fused
    from ._blockwise import backward

    cp = _cp()
    if _fused._planned(q, k, v, g, dy) and (y is None or _fused._planned(y)):
        dev = cp.cuda.runtime.getDevice()
        if y is None:
            y = _fused.run_plan(q, k, v, g, b, scale, dev, check=False)
        return _fused.run_backward_plan(q, k, v, y, dy, g, b, scale, dev, check)
    flags = cp.zeros(_fused.SYNC_HEAD, dtype=np.int32)
    got = []
    hook = (lambda: got.append(_fused.copy_flags_after(cp.cuda.get_current_stream(), flags.data.ptr, 4))) \
        if check else None
    dq, dk, dvv, dg = backward(cp, q, k, v, g, b, scale, dy, y=y, flags=flags, flags_set=hook)
    if not check:
        return dq, dk, dvv, dg, None
    if not got:  # no kernel set the flags early (not expected on this path): read them at the end
        return dq, dk, dvv, dg, flags.get()
    done, bad = got[0]
    done.synchronize()
    return dq, dk, dvv, dg, bad


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
        from ._fused import raise_nonfinite

        *grads, bad = _checked_backward(qf, kf, vf, g, b, scale, dyf, yf, check_finite)
        if check_finite:
            raise_nonfinite(bad, ("q", "k", "v", "dy"))
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
