"""Arrays of any framework in, the same framework's arrays out (DLPack interop).

The computing modules of ``resolvent`` are NumPy-only.  :func:`interop` wraps a public function so
that it also accepts PyTorch and JAX arrays (and any other object with ``__dlpack__``):

1. every argument is inspected; the *framework* of the call is that of its arrays with at least one
   dimension (0-d arrays, like a ``gamma`` or ``z`` tensor, are scalars and may come from anywhere);
2. arguments of two frameworks, or on two devices, raise (``TypeError`` / ``ValueError``) naming
   the arguments; CUDA arrays go to the GPU backend (``resolvent._gpu.dispatch``, imported on first
   use), which raises ``NotImplementedError`` naming what is missing when CuPy or numba-cuda is not
   installed; any other non-CPU device raises ``NotImplementedError``;
3. CPU arrays become NumPy arrays without a copy where DLPack allows it (``np.from_dlpack``; a torch
   tensor that requires grad is detached first, its data is shared), bfloat16 and float16 are
   converted to float32 in the caller's framework first (NumPy has no bfloat16);
4. the NumPy function runs, and every ndarray in its result (element-wise through tuples; other
   objects such as ``SolveInfo`` or an ``int`` pass through) is converted back: ``torch.from_numpy``
   (no copy), ``jax.device_put`` onto the input's device, or the array-API namespace's
   ``from_dlpack``; float32 results go back to bfloat16/float16 when that was the input dtype.

A call whose arrays are all NumPy (or plain Python values) goes straight to the NumPy function.
Nothing here imports torch or jax: a framework is recognised only once the caller has imported it
(``sys.modules``), so importing ``resolvent`` never imports either.
"""

from __future__ import annotations

import functools
import inspect
import sys

import numpy as np

__all__ = ["interop", "to_numpy", "from_numpy", "framework_of"]

_HALF = ("bfloat16", "float16")
# DLPack device types (dlpack.h): 1 = CPU, 3 = CUDA pinned host memory (CPU-addressable).
_CPU_DEVICES = (1, 3)
_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal", 9: "vpi",
                 10: "rocm", 11: "rocm_host", 13: "cuda_managed", 14: "oneapi"}


def _torch():
    return sys.modules.get("torch")


def _jax():
    return sys.modules.get("jax")


def framework_of(x):
    """Name of the framework that owns ``x``: "numpy", "torch", "jax", another module name, or None.

    ``None`` means a plain Python value (number, string, list, None...), which any framework accepts.
    """
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    jax = _jax()
    if jax is not None and isinstance(x, jax.Array):
        return "jax"
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return type(x).__module__.split(".")[0]
    return None


def _device(x, fw):
    """``(dlpack_device_type, index)`` of an array, (1, 0) for NumPy."""
    if fw == "numpy":
        return (1, 0)
    dev = x.__dlpack_device__()
    return (int(dev[0]), int(dev[1]))


def _device_name(dev) -> str:
    kind = _DEVICE_NAMES.get(dev[0], f"device type {dev[0]}")
    return kind if kind == "cpu" else f"{kind}:{dev[1]}"


def _type_name(x) -> str:
    t = type(x)
    mod = t.__module__.split(".")[0]
    if mod == "jaxlib":
        return "jax.Array"
    return f"{mod}.{t.__qualname__}"


_DTYPE_NAMES: dict = {}  #: dtype object -> its short name (``str`` of a NumPy dtype costs microseconds)


def _dtype_name(x, fw) -> str:
    dt = getattr(x, "dtype", None)
    if dt is None:
        return ""
    try:
        return _DTYPE_NAMES[dt]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype-like object
        name = str(dt).rsplit(".", 1)[-1]  # "torch.bfloat16" -> "bfloat16"
    try:
        _DTYPE_NAMES[dt] = name
    except TypeError:
        pass
    return name


def to_numpy(x, fw=None):
    """A CPU array of any framework as a NumPy array, sharing memory where DLPack allows it.

    bfloat16 and float16 arrays are converted to float32 (a copy) in their own framework first.
    A torch tensor that requires grad is detached (the data is shared, the graph is not followed).
    0-d arrays become NumPy scalars, so that they pass ``numbers.Real`` checks like Python numbers.
    """
    fw = fw or framework_of(x)
    if fw == "numpy":
        arr = x
    elif fw == "torch":
        t = x.detach()
        if t.dtype in (_torch().bfloat16, _torch().float16):
            t = t.float()
        t = t.resolve_conj().resolve_neg()
        try:
            arr = np.from_dlpack(t)
        except (BufferError, RuntimeError, TypeError):  # pragma: no cover - exotic layouts
            arr = t.numpy()
    elif fw == "jax":
        if _dtype_name(x, fw) in _HALF:
            x = x.astype("float32")
        arr = np.from_dlpack(x)
    else:
        try:
            arr = np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError):
            arr = np.asarray(x)
        if arr.dtype.name in _HALF:
            arr = arr.astype(np.float32)
    if arr.ndim == 0:
        return arr[()]
    return arr


def from_numpy(arr, like, fw, half=None):
    """Convert a NumPy result back to the framework ``fw`` of the array ``like``, on its device.

    ``half`` ("bfloat16" or "float16") casts float32 results back to that dtype.
    """
    if isinstance(arr, np.generic):
        arr = np.asarray(arr)
    if fw == "numpy":
        return arr
    cast = half is not None and arr.dtype == np.float32
    if fw == "torch":
        torch = _torch()
        if not arr.flags.writeable or any(s < 0 for s in arr.strides):
            arr = np.array(arr)  # torch.from_numpy needs writeable memory with non-negative strides
        out = torch.from_numpy(arr)
        if cast:
            out = out.to(getattr(torch, half))
        device = like.device
        return out if device.type == "cpu" else out.to(device)
    if fw == "jax":
        jax = _jax()
        out = jax.device_put(arr, next(iter(like.devices())))
        return out.astype(half) if cast else out
    xp = like.__array_namespace__() if hasattr(like, "__array_namespace__") else None
    if xp is None or not hasattr(xp, "from_dlpack"):
        return arr.astype(half) if cast and half in np.sctypeDict else arr
    if not arr.flags.writeable:
        arr = np.array(arr)
    out = xp.from_dlpack(arr)
    return out.astype(getattr(xp, half)) if cast and hasattr(xp, half) else out


def _convert_outputs(result, like, fw, half):
    if isinstance(result, (np.ndarray, np.generic)):
        return from_numpy(result, like, fw, half)
    if isinstance(result, tuple) and not hasattr(result, "_fields"):
        return tuple(_convert_outputs(r, like, fw, half) for r in result)
    return result


def _is_tracer(x) -> bool:
    jax = _jax()
    return jax is not None and isinstance(x, jax.core.Tracer)


_FAST: dict = {}  #: public function name -> an entry for its common case on one array type
_FAST_TYPE = [None]  #: that array type (CuPy's ndarray once the GPU backend has run)


def register_fast(array_type, entries):
    """Let ``entries`` (public function name -> function) take the calls whose first argument is
    exactly of ``array_type`` before the general conversion below; an entry returns
    ``NotImplemented`` to decline (the general path then runs, and raises any error).  The GPU
    backend registers its ``chain_attention`` this way: the general path cost about 0.1 ms of host
    time before the first kernel launch."""
    _FAST.update(entries)
    _FAST_TYPE[0] = array_type


def interop(fn):
    """Decorate a NumPy implementation so that it accepts and returns any framework's arrays.

    See the module docstring for the rules; the wrapper keeps ``fn``'s name, signature and
    docstring (``functools.wraps``).
    """
    sig = inspect.signature(fn)
    params = list(sig.parameters)

    fname = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if args and type(args[0]) is _FAST_TYPE[0]:
            fast = _FAST.get(fname)
            if fast is not None:
                out = fast(*args, **kwargs)
                if out is not NotImplemented:
                    return out
        found = []  # (name, value, framework)
        for i, a in enumerate(args):
            fw = framework_of(a)
            if fw is not None:
                found.append((params[i] if i < len(params) else f"argument {i}", a, fw))
        for key, a in kwargs.items():
            fw = framework_of(a)
            if fw is not None:
                found.append((key, a, fw))
        if all(fw == "numpy" for _, _, fw in found):
            return fn(*args, **kwargs)  # the NumPy fast path: nothing to convert

        for name, a, fw in found:
            if fw == "jax" and _is_tracer(a):
                raise TypeError(
                    f"resolvent.{fn.__name__} got a traced JAX value for {name} (inside jax.jit, "
                    "jax.grad or jax.vmap); NumPy cannot see its values. Use "
                    "resolvent.jax.chain_attention, which runs under JAX transformations, or call "
                    f"resolvent.{fn.__name__} outside them"
                )
        arrays = [(nm, a, fw) for nm, a, fw in found if np.ndim(a) > 0] or found
        frameworks = {fw for _, _, fw in arrays}
        if len(frameworks) > 1:
            desc = ", ".join(f"{nm} is a {_type_name(a)}" for nm, a, _ in arrays)
            raise TypeError(
                f"resolvent.{fn.__name__} got arrays of different frameworks ({desc}); pass arrays of "
                "one framework (convert with torch.from_numpy, jax.numpy.asarray or numpy.from_dlpack)"
            )
        fw = arrays[0][2]
        like = arrays[0][1]
        devices = {}
        for nm, a, afw in found:
            devices.setdefault(_device(a, afw), []).append(nm)
        primary_devices = {_device(a, afw) for _, a, afw in arrays}
        if len(primary_devices) > 1:
            desc = "; ".join(f"{', '.join(nms)} on {_device_name(dev)}" for dev, nms in devices.items())
            raise ValueError(
                f"resolvent.{fn.__name__} got arrays on different devices ({desc}); move them to one "
                "device"
            )
        off_cpu = [(nm, dev) for dev, nms in devices.items() for nm in nms if dev[0] not in _CPU_DEVICES]
        if off_cpu and all(dev[0] == 2 for dev in primary_devices):
            # CUDA arrays: the same function in the GPU backend (imported here, on first use only);
            # the arrays stay on the device and come back in the caller's framework.
            from ._gpu import dispatch

            dtypes = {_dtype_name(a, afw) for _, a, afw in arrays if _is_floating(a, afw)}
            half = dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in _HALF else None
            return dispatch(fn.__name__, args, kwargs, frameworks={id(a): afw for _, a, afw in found},
                            like=like, fw=fw, half=half)
        if off_cpu:
            nm, dev = off_cpu[0]
            raise NotImplementedError(
                f"resolvent.{fn.__name__}: {nm} is on {_device_name(dev)}, but the GPU backend is not "
                "available yet (resolvent computes on the CPU for now); move the arrays to the CPU, "
                "e.g. x.cpu() in PyTorch or jax.device_put(x, jax.devices('cpu')[0])"
            )
        dtypes = {_dtype_name(a, afw) for _, a, afw in arrays if _is_floating(a, afw)}
        half = dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in _HALF else None

        new_args = [to_numpy(a, framework_of(a)) if framework_of(a) is not None else a for a in args]
        new_kwargs = {
            key: (to_numpy(a, framework_of(a)) if framework_of(a) is not None else a)
            for key, a in kwargs.items()
        }
        return _convert_outputs(fn(*new_args, **new_kwargs), like, fw, half)

    wrapper.__wrapped_numpy__ = fn
    return wrapper


def _is_floating(x, fw) -> bool:
    name = _dtype_name(x, fw)
    return name.startswith(("float", "bfloat"))
