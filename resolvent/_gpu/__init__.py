"""GPU backend: CuPy (cuBLAS/cuSOLVER) with numba-cuda kernels for blockwise chain attention.

Nothing here runs at ``import resolvent``: :mod:`resolvent._interop` imports this package only when a
call's arrays live on a CUDA device, and the kernels compile on their first launch.

:func:`dispatch` is the entry point.  CuPy arrays are used as they are; PyTorch CUDA tensors and JAX
GPU arrays come in through DLPack (``cupy.from_dlpack``: no copy, no host round trip; bfloat16 and
float16 are converted to float32 in their own framework first, since CuPy has no bfloat16) and the
results go back the same way (``torch.from_dlpack`` / ``jax.dlpack.from_dlpack``), cast back to the
input's half precision.  The work runs on CuPy's current stream, or, for PyTorch tensors, on
PyTorch's current stream (wrapped as a CuPy stream through the CUDA stream protocol).
"""

from __future__ import annotations

import contextlib
import sys

__all__ = ["dispatch", "available"]

_HALF = ("bfloat16", "float16")


def available() -> bool:
    """Whether CuPy and numba-cuda import and a CUDA device is present (checked on call)."""
    try:
        import cupy
        from numba import cuda  # noqa: F401

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _dtype_name(x) -> str:
    from .._interop import _dtype_name as name

    return name(x, None)


def _to_cupy(x, fw):
    import cupy

    if fw == "cupy":
        return x
    if fw == "torch":
        t = x.detach()
        if _dtype_name(t) in _HALF:
            t = t.float()
        return cupy.from_dlpack(t.resolve_conj().resolve_neg())
    if fw == "jax":
        if _dtype_name(x) in _HALF:
            x = x.astype("float32")
        return cupy.from_dlpack(x)
    return cupy.from_dlpack(x)


def _from_cupy(arr, like, fw, half):
    import cupy

    if not isinstance(arr, cupy.ndarray):
        return arr
    cast = half is not None and arr.dtype == cupy.float32
    if fw == "cupy":
        if cast and half == "float16":
            return arr.astype(cupy.float16)
        return arr
    if fw == "torch":
        torch = sys.modules["torch"]
        out = torch.from_dlpack(cupy.ascontiguousarray(arr))
        return out.to(getattr(torch, half)) if cast else out
    if fw == "jax":
        import jax.dlpack

        out = jax.dlpack.from_dlpack(cupy.ascontiguousarray(arr))
        return out.astype(half) if cast else out
    xp = like.__array_namespace__() if hasattr(like, "__array_namespace__") else None
    return xp.from_dlpack(arr) if xp is not None else arr


def _convert_outputs(result, like, fw, half):
    if isinstance(result, tuple) and not hasattr(result, "_fields"):
        return tuple(_convert_outputs(r, like, fw, half) for r in result)
    return _from_cupy(result, like, fw, half)


class _TorchStreamRef:
    """A PyTorch stream seen through the CUDA stream protocol (for PyTorch versions without it)."""

    __slots__ = ("stream",)

    def __init__(self, stream):
        self.stream = stream

    def __cuda_stream__(self):
        return (0, int(self.stream.cuda_stream))


def _stream_context(fw, like):
    if fw == "torch":
        import cupy

        torch = sys.modules["torch"]
        dev = like.device.index or 0
        ts = torch.cuda.current_stream(like.device)
        ctx = contextlib.ExitStack()
        ctx.enter_context(cupy.cuda.Device(dev))  # CuPy allocates on the tensor's device
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is None:  # CuPy < 14
            ctx.enter_context(cupy.cuda.ExternalStream(ts.cuda_stream, dev))
        else:  # the CUDA stream protocol; CuPy 14 deprecates ExternalStream
            ctx.enter_context(from_external(ts if hasattr(ts, "__cuda_stream__") else _TorchStreamRef(ts)))
        return ctx
    if fw == "cupy":
        return like.device
    return contextlib.nullcontext()


def dispatch(name, args, kwargs, *, frameworks, like, fw, half):
    """Run the GPU implementation of the public function ``name`` on CUDA-resident arguments.

    ``frameworks`` maps each array argument's id to its framework name; ``like``/``fw`` are the
    call's primary array and framework, ``half`` the half-precision dtype name to return (or None).
    """
    try:
        import cupy
        from numba import cuda  # noqa: F401
    except ImportError as exc:
        raise NotImplementedError(_unavailable(name, args, kwargs, frameworks, exc)) from None
    from .. import _interop
    from . import _api

    fn = getattr(_api, name, None)
    if fn is None:
        raise NotImplementedError(f"resolvent.{name} has no GPU implementation; pass CPU arrays")

    def conv(a):
        f = frameworks.get(id(a))
        if f is None:
            return a
        dev = a.__dlpack_device__() if hasattr(a, "__dlpack_device__") else (1, 0)
        if int(dev[0]) != 2 and getattr(a, "ndim", 1) == 0:
            return a.item()  # a host scalar (gamma, z) beside device arrays
        return _to_cupy(a, f)

    if fw == "cupy" and _interop._FAST_TYPE[0] is None:
        _interop.register_fast(cupy.ndarray, {"chain_attention": _api.chain_attention_fast,
                                               "chain_attention_vjp": _api.chain_attention_vjp_fast})
    with _stream_context(fw, like):
        new_args = [conv(a) for a in args]
        new_kwargs = {key: conv(a) for key, a in kwargs.items()}
        result = fn(*new_args, **new_kwargs)
        return _convert_outputs(result, like, fw, half)


def _unavailable(name, args, kwargs, frameworks, exc) -> str:
    import inspect

    import resolvent

    params = list(inspect.signature(getattr(resolvent, name)).parameters)
    named = [(params[i] if i < len(params) else f"argument {i}", a) for i, a in enumerate(args)]
    named += list(kwargs.items())
    where = ""
    for nm, a in named:
        if id(a) in frameworks and hasattr(a, "__dlpack_device__"):
            dev = a.__dlpack_device__()
            where = f"{nm} is on cuda:{int(dev[1])}, "
            break
    return (
        f"resolvent.{name}: {where}but the GPU backend is not available yet in this environment "
        f"({exc}; it needs CuPy and numba-cuda: pip install 'resolvent[gpu]'); move the arrays to the "
        "CPU, e.g. x.cpu() in PyTorch or jax.device_put(x, jax.devices('cpu')[0])"
    )
