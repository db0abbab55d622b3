"""JAX adapter: chain attention with a custom VJP that works under ``jit``, ``grad`` and ``vmap``.

Imported on use (``import resolvent.jax``); importing ``resolvent`` alone never imports JAX.

Why ``jax.pure_callback`` and not a ``jax.numpy`` re-implementation
-------------------------------------------------------------------
The ``exact`` and ``blockwise`` methods are sequences of small, dependent steps: block forward
substitution over key tiles, within-block triangular solves, then an ``m x m`` unit-triangular reduced
system solved row block by row block (SPEC 2.2), with a fused Numba kernel for the within-block work
on the CPU.  Written in ``jax.numpy`` these become ``lax.scan`` loops over blocks with padded ragged
last blocks, which XLA's CPU backend runs no faster than the NumPy/Numba code and which would
duplicate, and have to re-test, every forward *and* backward pass of the library.  A
``pure_callback`` hands the arrays (no copy on the CPU) to the tested NumPy implementation, and
``jax.custom_vjp`` routes the gradient to :func:`resolvent.chain_attention_vjp`, which keeps the
forward's cost class.  The price: the call is opaque to XLA (no fusion across it; it computes on the
host, so arrays on a GPU make a round trip; no forward-mode ``jax.jvp`` and no second derivatives).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .attention import _api

__all__ = ["chain_attention"]

_HALF = (jnp.bfloat16, jnp.float16)


def _leading(args, ndims):
    """Broadcast NumPy ``args`` to their common leading (vmap) shape; ``ndims`` are the unbatched ndims.

    Under ``jax.vmap`` with ``vmap_method="expand_dims"`` every argument of the callback gains the same
    number of leading axes, of the mapped size for batched arguments and of size 1 for the others.
    """
    extra = args[0].ndim - ndims[0]
    lead = np.broadcast_shapes(*(a.shape[:extra] for a in args))
    return [np.broadcast_to(a, lead + a.shape[extra:]) for a in args]


@functools.lru_cache(maxsize=None)
def _function(method, block_size, topk, scale, check_finite, ndim):
    """The ``custom_vjp`` function for one choice of the static options (cached: stable under jit)."""
    opts = dict(method=method, block_size=block_size, topk=topk, scale=scale, check_finite=check_finite)
    ndims = (ndim, ndim, ndim, ndim - 2)

    def forward_cb(q, k, v, g):
        q, k, v, g = _leading([q, k, v, g], ndims)
        return np.asarray(_api.chain_attention(q, k, v, g, **opts), dtype=q.dtype)

    def backward_cb(q, k, v, g, y, dy):
        q, k, v, g, y, dy = _leading([q, k, v, g, y, dy], ndims + (ndim, ndim))
        grads = _api.chain_attention_vjp(q, k, v, g, dy, return_dgamma=True, y=y, **opts)
        return tuple(np.asarray(d, dtype=x.dtype) for d, x in zip(grads, (q, k, v, g)))

    @jax.custom_vjp
    def f(q, k, v, g):
        out = jax.ShapeDtypeStruct(v.shape, v.dtype)
        return jax.pure_callback(forward_cb, out, q, k, v, g, vmap_method="expand_dims")

    def f_fwd(q, k, v, g):
        y = f(q, k, v, g)
        return y, (q, k, v, g, y)  # the backward reuses y (blockwise then skips a forward pass)

    def f_bwd(res, dy):
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in res[:4])
        return jax.pure_callback(backward_cb, shapes, *res, dy, vmap_method="expand_dims")

    f.defvjp(f_fwd, f_bwd)
    return f


def chain_attention(q, k, v, gamma=0.9, *, method="blockwise", block_size=None, topk=0, scale=None,
                    check_finite=True):
    r"""Differentiable chain attention on JAX arrays (CPU), usable under ``jit``, ``grad``, ``vmap``.

    Same arguments and numbers as :func:`resolvent.chain_attention`; the gradient with respect to
    ``q``, ``k``, ``v`` and ``gamma`` is :func:`resolvent.chain_attention_vjp`, attached with
    ``jax.custom_vjp``.  Both run through ``jax.pure_callback`` on the NumPy implementation (see the
    module docstring for why).

    Parameters
    ----------
    q, k : jax.Array, shape (..., n, d)
    v : jax.Array, shape (..., n, dv)
    gamma : float or jax.Array broadcastable to the batch dimensions
        In ``[0, 1)``; one value per head works (shape ``(heads,)`` against a batch ``(batch, heads)``).
    method, block_size, topk, scale, check_finite
        Static options, as for :func:`resolvent.chain_attention` (``check_finite`` applies to the
        forward and the backward pass, whose cotangent it checks too).

    Returns
    -------
    jax.Array, shape (..., n, dv)
        In the common dtype of ``q``, ``k``, ``v`` (bfloat16 and float16 compute in float32).

    Raises
    ------
    ValueError
        Mismatched shapes, found while tracing.  Errors the NumPy implementation finds in values
        (``gamma`` outside ``[0, 1)``, non-finite input unless ``check_finite=False``) surface from
        the callback; under ``jit`` JAX re-raises them wrapped in its runtime error.

    Notes
    -----
    Broadcasting over batch dimensions happens in JAX (``jnp.broadcast_to``) before the callback,
    so JAX's own autodiff sums the gradients of broadcast inputs.  Under ``vmap`` the callback is
    called once with the mapped axis in front (``vmap_method="expand_dims"``), not once per
    element.  Float64 needs ``jax_enable_x64``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, resolvent.jax
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 32, 8))
    >>> loss = lambda q: resolvent.jax.chain_attention(q, k, v, 0.9, block_size=8).sum()
    >>> jax.jit(jax.grad(loss))(q).shape
    (2, 32, 8)
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape (..., n, d), got {x.shape}")
    n, d = q.shape[-2:]
    if k.shape[-2:] != (n, d):
        raise ValueError(f"k must have shape (..., n, d) = (..., {n}, {d}) like q, got {k.shape}")
    if v.shape[-2] != n:
        raise ValueError(f"v must have shape (..., n, dv) with n = {n} like q, got {v.shape}")
    try:
        batch = jnp.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(
            f"batch dimensions of q {q.shape[:-2]}, k {k.shape[:-2]} and v {v.shape[:-2]} do not broadcast"
        ) from None
    out_dtype = jnp.result_type(q, k, v)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        out_dtype = jnp.result_type(float)
    dtype = jnp.float32 if out_dtype in _HALF else out_dtype
    gamma = jnp.asarray(gamma, dtype=dtype)
    try:
        gamma = jnp.broadcast_to(gamma, batch)
    except ValueError:
        raise ValueError(f"gamma of shape {gamma.shape} does not broadcast over the batch dimensions {batch}") from None
    q, k, v = (jnp.broadcast_to(x.astype(dtype), batch + x.shape[-2:]) for x in (q, k, v))
    f = _function(method, block_size, topk, None if scale is None else float(scale), bool(check_finite),
                  len(batch) + 2)
    return f(q, k, v, gamma).astype(out_dtype)
