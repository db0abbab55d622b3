"""resolvent: fast resolvents ``(zI - A)^{-1} B`` on arbitrary matrices and inside attention layers.

The public surface is this module's ``__all__``; everything else lives in private modules.
Importing ``resolvent`` touches no device, compiles nothing and imports neither PyTorch nor JAX.

Every public function accepts NumPy arrays, array-likes and any array with ``__dlpack__`` (PyTorch,
JAX) and returns the caller's type on the caller's device (see ``docs/frameworks.md``).  The
framework adapters with autograd support are the submodules ``resolvent.torch`` and
``resolvent.jax``, imported on use.
"""

from ._errors import ConvergenceError, SolveInfo
from ._interop import interop as _wrap
from ._version import __version__
from .attention import _api as _attention_api
from .linalg import _solve as _solve_mod
from .linalg import _vjp as _vjp_mod

block_mass = _wrap(_attention_api.block_mass)
chain = _wrap(_attention_api.chain)
chain_attention = _wrap(_attention_api.chain_attention)
chain_attention_vjp = _wrap(_attention_api.chain_attention_vjp)
chain_vjp = _wrap(_vjp_mod.chain_vjp)
default_block_size = _wrap(_attention_api.default_block_size)
solve = _wrap(_solve_mod.solve)
solve_shifts = _wrap(_solve_mod.solve_shifts)
solve_vjp = _wrap(_vjp_mod.solve_vjp)

__all__ = [
    "ConvergenceError",
    "SolveInfo",
    "__version__",
    "block_mass",
    "chain",
    "chain_attention",
    "chain_attention_vjp",
    "chain_vjp",
    "default_block_size",
    "solve",
    "solve_shifts",
    "solve_vjp",
]
