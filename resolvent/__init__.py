"""resolvent: fast resolvents ``(zI - A)^{-1} B`` on arbitrary matrices and inside attention layers.

The public surface is this module's ``__all__``; everything else lives in private modules.
Importing ``resolvent`` touches no device, compiles nothing and imports neither PyTorch nor JAX.
"""

from ._errors import ConvergenceError, SolveInfo
from ._version import __version__
from .attention._api import block_mass, chain, chain_attention, chain_attention_vjp, default_block_size
from .linalg._solve import solve, solve_shifts

__all__ = [
    "ConvergenceError",
    "SolveInfo",
    "__version__",
    "block_mass",
    "chain",
    "chain_attention",
    "chain_attention_vjp",
    "default_block_size",
    "solve",
    "solve_shifts",
]
