"""The entity-tracking example: its task generator is right, and its training loop runs."""

import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "entity_tracking.py"


@pytest.fixture(scope="module")
def et():
    spec = importlib.util.spec_from_file_location("entity_tracking", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("deepest", [True, False])
def test_following_the_chain_from_the_question_reaches_the_answer(et, deepest):
    n_vars, n_vals, hops = 40, 5, 4
    lhs, rhs, ans = et.make_batch(20, 3, hops, n_vars, n_vals, np.random.default_rng(0), deepest=deepest)
    for i in range(20):
        target, t, steps = rhs[i, -1].item(), lhs.shape[1] - 1, 0
        while target < n_vars:  # a variable: jump to the earlier assignment that defines it
            defs = [s for s in range(t) if lhs[i, s].item() == target]
            assert len(defs) == 1, "each variable is assigned once, before it is used"
            t = defs[0]
            target = rhs[i, t].item()
            steps += 1
        assert target - (n_vars + 1) == ans[i].item()
        if deepest:
            assert steps == hops


def test_training_runs_for_every_variant(et):
    for attention in (dict(method="dense"), dict(method="blockwise", block_size=4, topk=1)):
        acc, _, gamma = et.train("smoke", attention, n_chains=2, hops=3, steps=2, batch=4, seed=0)
        assert 0.0 <= acc <= 1.0 and 0.0 < gamma < 1.0
