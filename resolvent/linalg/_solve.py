"""Resolvent solves on arbitrary matrices (placeholder until the solvers land)."""


def solve(A, B, *, z=1.0, method="auto", block_size=None, tol=None, maxiter=None, lower=False,
          check_finite=True, return_info=False):
    raise NotImplementedError


def solve_shifts(A, B, zs, *, lower=False, check_finite=True):
    raise NotImplementedError
