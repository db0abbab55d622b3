"""Smoke test of the asv suite: every benchmark runs once, on tiny inputs, inside the normal test run.

``RESOLVENT_ASV_SMOKE=1`` (set here before the suite is imported) shrinks every parameter list, so a
benchmark broken by an API change fails CI instead of the next ``asv run``.  Combinations that skip
(``NotImplementedError`` in ``setup``: no CuPy or no GPU, no PyTorch, combinations the suite never
runs) are skipped here too; every class must still run at least one combination.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import os
import pkgutil
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PREFIXES = ("time_", "peakmem_", "track_", "mem_", "timeraw_")


def _suite():
    # The suite reads its switches once, at import; restore the environment afterwards so that
    # nothing else in the test run (or a subprocess it starts) sees them.
    saved = {k: os.environ.get(k) for k in ("RESOLVENT_ASV_SMOKE", "RESOLVENT_ASV_LARGE")}
    os.environ["RESOLVENT_ASV_SMOKE"] = "1"
    os.environ.pop("RESOLVENT_ASV_LARGE", None)
    sys.path.insert(0, str(BENCH))
    try:
        for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
            del sys.modules[name]
        pkg = importlib.import_module("benchmarks")
        assert Path(pkg.__file__).resolve().parent == BENCH / "benchmarks", pkg.__file__
        modules = [importlib.import_module(f"benchmarks.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    finally:
        sys.path.remove(str(BENCH))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return modules


MODULES = _suite()
CLASSES = [
    cls
    for mod in MODULES
    for _, cls in inspect.getmembers(mod, inspect.isclass)
    if cls.__module__ == mod.__name__ and any(n.startswith(PREFIXES) for n in dir(cls))
]


def _combinations(cls):
    params = getattr(cls, "params", None)
    if params is None:
        return [()]
    if not (params and isinstance(params[0], list)):
        params = [params]
    return list(itertools.product(*params))


def test_suite_is_found():
    names = {m.__name__.rsplit(".", 1)[-1] for m in MODULES}
    assert {"common", "bench_solve", "bench_chain", "bench_attention", "bench_track"} <= names
    assert len(CLASSES) >= 8


def test_smoke_switch_shrinks_sizes():
    from benchmarks import common

    assert common.SMOKE and not common.LARGE
    for cls in CLASSES:
        names = getattr(cls, "param_names", [])
        if "n" in names:
            assert max(cls.params[names.index("n")]) <= 64, cls.__name__


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_benchmark_runs(cls):
    methods = sorted(n for n in dir(cls) if n.startswith(PREFIXES))
    ran = 0
    skipped = []
    for combo in _combinations(cls):
        bench = cls()
        try:
            if hasattr(bench, "setup"):
                bench.setup(*combo)
        except NotImplementedError as exc:
            skipped.append((combo, str(exc)))
            continue
        try:
            for name in methods:
                result = getattr(bench, name)(*combo)
                if name.startswith("track_"):
                    assert isinstance(result, (int, float)) and result == result, (name, combo, result)
        finally:
            if hasattr(bench, "teardown"):
                bench.teardown(*combo)
        ran += 1
    if ran == 0:
        reasons = {r for _, r in skipped}
        if any("PyTorch" in r for r in reasons):
            pytest.skip(f"{cls.__name__}: {sorted(reasons)}")
        pytest.fail(f"{cls.__name__}: every combination skipped: {sorted(reasons)}")


def test_cupy_entries_skip_cleanly_without_a_gpu():
    from benchmarks import common

    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(NotImplementedError, match="cupy"):
            common.Backend("cupy")
    else:
        pytest.skip("CuPy is installed; the GPU entries run instead")


def test_asv_conf_parses_and_names_the_suite():
    path = BENCH / "asv.conf.json"
    text = path.read_text()
    # asv accepts // comments (as NumPy's and SciPy's configs use); strip whole-line ones for json.
    conf = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))
    assert conf["benchmark_dir"] == "benchmarks"
    assert (path.parent / conf["benchmark_dir"] / "__init__.py").is_file()
    assert conf["repo"] == ".."
    # machine results stay out of the committed markdown under benchmarks/results/
    assert not conf["results_dir"].startswith("results")
    asv_util = pytest.importorskip("asv.util")
    assert asv_util.load_json(str(path), js_comments=True)["benchmark_dir"] == "benchmarks"


def test_scaling_report_runs(tmp_path):
    """The report script end to end at tiny sizes: tables, exponents and the three PNGs."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling_report", BENCH / "scaling_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    results, sweep = report.main(["--smoke", "--no-progress", "--threads", "0", "--out", str(tmp_path)])
    assert all(results[m]["n"] for m in report.METHODS) and all(sweep.values())
    text = (tmp_path / "performance.md").read_text()
    assert "## Fitted exponents" in text and "| blockwise |" in text
    for png in ("scaling_time.png", "scaling_memory.png", "block_size_sweep.png"):
        assert (tmp_path / "img" / png).stat().st_size > 1000
