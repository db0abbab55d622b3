"""Exceptions and the result record shared by every solver."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ConvergenceError", "SolveInfo"]


class ConvergenceError(np.linalg.LinAlgError):
    """An iterative method did not reach its tolerance within ``maxiter`` steps.

    Subclass of :class:`numpy.linalg.LinAlgError`, so code that already catches
    NumPy's linear-algebra errors catches this one too.  The attribute ``info``
    holds the :class:`SolveInfo` of the failed run (what it reached).
    """

    def __init__(self, message: str, info: "SolveInfo | None" = None):
        super().__init__(message)
        self.info = info


@dataclass(frozen=True)
class SolveInfo:
    """What an iterative solve did.

    Attributes
    ----------
    converged : bool
        Whether the relative residual reached ``tol``.
    iterations : int
        Steps taken (0 for a direct solve).
    residual : float
        Final relative residual ``||B - M X|| / ||B||`` (the largest over the batch).
    method : str
        The method that ran (``"auto"`` is resolved to the one it picked).
    """

    converged: bool
    iterations: int
    residual: float
    method: str
