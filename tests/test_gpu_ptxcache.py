"""The disk cache of the GPU kernels' PTX (resolvent/_gpu/_ptxcache.py): its keys and its files.

No GPU is needed: the keys are computed from the kernels' Python functions, and loading the PTX
into a device is the GPU tests' part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")
if __import__("importlib").util.find_spec("numba.cuda") is None:  # pragma: no cover
    pytest.skip("numba-cuda is not installed", allow_module_level=True)

from resolvent._gpu import _ptxcache as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

KEYS = r"""
import json, numpy as np
from numba.core import types
from resolvent._gpu import _fused as F, _kernels as K, _ptxcache as C
dt = np.dtype(np.float32)
kern = {"rows32": F._rows_kernel(32, 64, 64, 128, 64, dt), "rows24": F._rows_kernel(24, 64, 64, 128, 64, dt),
        "means32": F._means_kernel(32, 256, dt), "means64": F._means_kernel(64, 256, dt),
        "red16": F._reduced_kernel(256, dt, 64, 16, True), "red32": F._reduced_kernel(256, dt, 64, 32, True)}
A3, A2 = types.Array(types.float32, 3, "C"), types.Array(types.float32, 2, "C")
out = {k: C.kernel_key(v, (A3,), K.LAUNCH_BOUNDS.get(id(v)), (9, 0)) for k, v in kern.items()}
out["rows32_other_args"] = C.kernel_key(kern["rows32"], (A2,), None, (9, 0))
out["rows32_other_cc"] = C.kernel_key(kern["rows32"], (A3,), K.LAUNCH_BOUNDS.get(id(kern["rows32"])), (8, 0))
print(json.dumps(out))
"""


def _keys():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    res = subprocess.run([sys.executable, "-c", KEYS], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_keys_are_stable_across_processes_and_tell_kernels_apart():
    """Two processes give every kernel the same key (else nothing is ever found again), and kernels
    generated with other block sizes, column widths, argument types or compute capability get
    other keys (else a process would load PTX compiled for something else)."""
    first, second = _keys(), _keys()
    assert first == second
    assert len(set(first.values())) == len(first)


def test_function_key_sees_closure_values_and_called_functions():
    def make(c, helper):
        def f(x):
            return helper(x) * c

        return f

    def h1(x):
        return x + 1

    def h2(x):
        return x + 2

    assert C.function_key(make(2.0, h1)) == C.function_key(make(2.0, h1))
    assert C.function_key(make(2.0, h1)) != C.function_key(make(3.0, h1))
    assert C.function_key(make(2.0, h1)) != C.function_key(make(2.0, h2))


def test_store_and_load(tmp_path, monkeypatch):
    monkeypatch.setenv("RESOLVENT_KERNEL_CACHE", str(tmp_path / "k"))
    assert C.cache_dir() == tmp_path / "k"
    assert C.load("abc") is None
    C.store("abc", ".version 8.0\n// ptx")
    assert C.load("abc") == ".version 8.0\n// ptx"
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["abc.ptx"]  # no temporary left behind
    monkeypatch.setenv("RESOLVENT_KERNEL_CACHE", "0")
    assert C.cache_dir() is None
    C.store("def", "x")
    assert C.load("abc") is None and not (tmp_path / "k" / "def.ptx").exists()
    monkeypatch.delenv("RESOLVENT_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert C.cache_dir() == tmp_path / "xdg" / "resolvent" / "kernels"
