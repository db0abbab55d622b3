"""PyTorch adapter: chain attention as an autograd function and as a drop-in attention module.

Imported on use (``import resolvent.torch``); importing ``resolvent`` alone never imports PyTorch.

The forward pass calls :func:`resolvent.chain_attention` and the backward pass
:func:`resolvent.chain_attention_vjp` on the tensors' memory (shared with NumPy through DLPack, no
copies for contiguous CPU tensors).  CUDA tensors go through the same calls to the GPU backend
(``resolvent._gpu``) where CuPy and numba-cuda are installed, and raise ``NotImplementedError``
naming what is missing where they are not.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.autograd.function import once_differentiable

import resolvent as _rs

__all__ = ["chain_attention", "ChainAttention"]


class _ChainAttentionFunction(torch.autograd.Function):
    """``Y = (1 - gamma) A (I - gamma A)^{-1} V``; backward through ``chain_attention_vjp``."""

    @staticmethod
    def forward(ctx, q, k, v, gamma, method, block_size, topk, scale, check_finite):
        ctx.options = dict(method=method, block_size=block_size, topk=topk, scale=scale,
                           check_finite=check_finite)
        y = _rs.chain_attention(q, k, v, gamma, **ctx.options)
        ctx.gamma_is_tensor = isinstance(gamma, torch.Tensor)
        # The backward reuses the forward's output (blockwise then skips recomputing it), unless it
        # was rounded to bfloat16/float16: then the float32 values are recomputed.
        ctx.keep_y = y.dtype in (torch.float32, torch.float64)
        saved = (q, k, v) + ((gamma,) if ctx.gamma_is_tensor else ()) + ((y,) if ctx.keep_y else ())
        ctx.save_for_backward(*saved)
        if not ctx.gamma_is_tensor:
            ctx.gamma = gamma
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        saved = list(ctx.saved_tensors)
        y = saved.pop() if ctx.keep_y else None
        q, k, v = saved[:3]
        gamma = saved[3] if ctx.gamma_is_tensor else ctx.gamma
        dq, dk, dv, dgamma = _rs.chain_attention_vjp(q, k, v, gamma, dy, return_dgamma=True, y=y, **ctx.options)
        grads = [g.to(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v))]
        grads.append(dgamma.to(gamma.dtype) if ctx.gamma_is_tensor else None)
        return (*grads, None, None, None, None, None)  # method, block_size, topk, scale, check_finite


def chain_attention(q, k, v, gamma=0.9, *, method="blockwise", block_size=None, topk=0, scale=None,
                    check_finite=True):
    r"""Differentiable chain attention on PyTorch tensors.

    Computes :func:`resolvent.chain_attention` (same arguments, same numbers) and records a
    ``torch.autograd.Function`` whose backward pass is :func:`resolvent.chain_attention_vjp`:
    gradients flow to ``q``, ``k``, ``v`` and, when it is a tensor, ``gamma``.

    Parameters
    ----------
    q, k : torch.Tensor, shape (..., n, d)
    v : torch.Tensor, shape (..., n, dv)
    gamma : float or torch.Tensor broadcastable to the batch dimensions
        In ``[0, 1)``; a tensor that requires grad (e.g. one value per head, shape ``(heads,)``,
        broadcast over the batch) receives its gradient summed over the broadcast dimensions.
    method, block_size, topk, scale
        As for :func:`resolvent.chain_attention`.
    check_finite : bool, optional
        As for :func:`resolvent.chain_attention`, for the forward and the backward pass (which also
        checks the incoming gradient).  ``False`` skips the checks; on CUDA tensors the calls then
        make no host synchronisation of their own (a ``gamma`` on the device is still read
        back to be validated).

    Returns
    -------
    torch.Tensor, shape (..., n, dv)
        On the inputs' device, in their dtype (bfloat16 and float16 compute in float32).

    Raises
    ------
    ValueError
        As :func:`resolvent.chain_attention`.
    NotImplementedError
        For CUDA tensors when the GPU backend (CuPy, numba-cuda) is not installed.

    Notes
    -----
    Not twice differentiable (the backward is a single fused vector-Jacobian product).

    Examples
    --------
    >>> import torch, resolvent.torch
    >>> q, k, v = (torch.randn(2, 64, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    >>> y = resolvent.torch.chain_attention(q, k, v, 0.9, method="blockwise", block_size=16)
    >>> y.sum().backward()
    >>> q.grad.shape
    torch.Size([2, 64, 8])
    """
    return _ChainAttentionFunction.apply(q, k, v, gamma, method, block_size, topk, scale, check_finite)


class ChainAttention(nn.Module):
    r"""Multi-head causal self-attention with chain attention in place of softmax attention.

    ``x -> out_proj(concat_h chain_attention(q_h, k_h, v_h, gamma_h))`` with ``q, k, v`` the linear
    projections of ``x`` split into ``num_heads`` heads.  A drop-in for a causal self-attention
    block: input and output are ``(batch, n, embed_dim)`` (``(n, batch, embed_dim)`` with
    ``batch_first=False``); causality is built in, so there is no mask argument.

    Parameters
    ----------
    embed_dim : int
        Model width; divisible by ``num_heads``.
    num_heads : int
    gamma : float or sequence of float, optional
        Initial decay per hop, one value or one per head, in ``[0, gamma_max)`` (``(0, gamma_max)``
        when learnable).  Default 0.9.
    learnable_gamma : bool, optional
        Learn one gamma per head (default True).  It is stored as a logit ``gamma_logit`` with
        ``gamma = gamma_max * sigmoid(gamma_logit)``, so it stays in ``(0, gamma_max)`` whatever
        the optimiser does.
    gamma_max : float, optional
        Upper bound of a learnable gamma, default 0.999 (``gamma -> 1`` makes ``I - gamma A``
        nearly singular).
    method, block_size, topk, scale, check_finite
        As for :func:`resolvent.chain_attention`.
    bias : bool, optional
        Biases in the four projections (default True).
    batch_first : bool, optional
        Input shape ``(batch, n, embed_dim)`` (default) or ``(n, batch, embed_dim)``.
    device, dtype : optional
        Of the parameters.

    Raises
    ------
    ValueError
        ``embed_dim`` not divisible by ``num_heads``; ``gamma`` of the wrong length or outside its
        range; a ``gamma_max`` outside ``(0, 1)``.

    Examples
    --------
    >>> import torch, resolvent.torch
    >>> layer = resolvent.torch.ChainAttention(32, 4, block_size=16)
    >>> x = torch.randn(2, 64, 32)
    >>> layer(x).shape
    torch.Size([2, 64, 32])
    >>> layer.gamma.shape
    torch.Size([4])
    """

    def __init__(self, embed_dim, num_heads, *, gamma=0.9, learnable_gamma=True, gamma_max=0.999,
                 method="blockwise", block_size=None, topk=0, scale=None, check_finite=True, bias=True,
                 batch_first=True, device=None, dtype=None):
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 < gamma_max < 1.0:
            raise ValueError(f"gamma_max must lie in (0, 1), got {gamma_max!r}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.method, self.block_size, self.topk, self.scale = method, block_size, topk, scale
        self.check_finite = check_finite
        self.batch_first = batch_first
        self.learnable_gamma = learnable_gamma
        self.gamma_max = float(gamma_max)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

        g = torch.as_tensor(gamma, dtype=torch.float64).reshape(-1)
        if g.numel() == 1:
            g = g.expand(self.num_heads)
        if g.numel() != self.num_heads:
            raise ValueError(f"gamma must be one value or one per head ({self.num_heads}), got {g.numel()}")
        lo_ok = (g > 0) if learnable_gamma else (g >= 0)
        hi = self.gamma_max if learnable_gamma else 1.0
        if not bool(torch.all(lo_ok & (g < hi))):
            interval = f"(0, {self.gamma_max})" if learnable_gamma else "[0, 1)"
            raise ValueError(f"gamma must lie in {interval}, got {gamma!r}")
        pdtype = dtype or torch.get_default_dtype()
        if learnable_gamma:
            p = g / self.gamma_max
            self.gamma_logit = nn.Parameter(torch.log(p / (1 - p)).to(device=device, dtype=pdtype))
        else:
            self.register_buffer("_gamma", g.to(device=device, dtype=pdtype))

    @property
    def gamma(self) -> torch.Tensor:
        """The per-head gamma, shape ``(num_heads,)`` (differentiable when learnable)."""
        if self.learnable_gamma:
            return self.gamma_max * torch.sigmoid(self.gamma_logit)
        return self._gamma

    def forward(self, x):
        """Apply the layer to ``x`` of shape ``(batch, n, embed_dim)`` (or ``(n, batch, embed_dim)``)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            layout = "(batch, n, embed_dim)" if self.batch_first else "(n, batch, embed_dim)"
            raise ValueError(f"x must have shape {layout} with embed_dim = {self.embed_dim}, got {tuple(x.shape)}")
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, n, _ = x.shape

        def heads(t):
            return t.view(batch, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = chain_attention(q, k, v, self.gamma, method=self.method, block_size=self.block_size,
                            topk=self.topk, scale=self.scale, check_finite=self.check_finite)
        y = self.out_proj(y.transpose(1, 2).reshape(batch, n, self.embed_dim))
        return y if self.batch_first else y.transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, method={self.method!r}, "
                f"block_size={self.block_size}, topk={self.topk}, learnable_gamma={self.learnable_gamma}")


