import contextlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def rng():
    return np.random.default_rng(20261130)


@pytest.fixture(scope="module")
def one_thread():
    """Run BLAS and Numba on one thread (modules opt in with ``pytestmark``).

    The problems in those modules are tiny, and on a shared 2-core machine waking and spinning
    worker threads cost up to 100x the arithmetic; the numbers are the same either way.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the limit is a speed-up, not a requirement
        threadpool_limits = None
    try:
        import numba
    except ImportError:
        numba = None
    old = numba.get_num_threads() if numba else None
    with threadpool_limits(1) if threadpool_limits else contextlib.nullcontext():
        if numba:
            numba.set_num_threads(1)
        yield
        if numba:
            numba.set_num_threads(old)
