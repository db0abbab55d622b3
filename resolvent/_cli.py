"""``python -m resolvent {info,demo}``."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform


def _version_of(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return getattr(mod, "__version__", "unknown version")


def info() -> int:
    """Print the library's version, its dependencies' and which optional backends import."""
    import numpy
    import scipy

    from ._version import __version__

    rows = [
        ("resolvent", __version__),
        ("python", platform.python_version()),
        ("numpy", numpy.__version__),
        ("scipy", scipy.__version__),
    ]
    for label, module in [("numba", "numba"), ("cupy", "cupy"), ("torch", "torch"), ("jax", "jax")]:
        rows.append((label, _version_of(module) or "not installed"))
    cuda = "not available"
    if _version_of("numba") is not None:
        try:
            from numba import cuda as ncuda

            rows.append(("numba CUDA", "importable"))
            cuda = "available" if ncuda.is_available() else "no device"
        except Exception as exc:  # numba-cuda missing or broken
            rows.append(("numba CUDA", f"not importable ({type(exc).__name__})"))
    else:
        rows.append(("numba CUDA", "not installed"))
    if _version_of("cupy") is not None:
        try:
            import cupy

            count = cupy.cuda.runtime.getDeviceCount()
            cuda = f"{count} device(s)" if count else "no device"
        except Exception:
            pass
    rows.append(("CUDA device", cuda))
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


def demo(args) -> int:
    """Run the CPU demonstration: resolvent solves, then chain attention."""
    from .attention import _demo as attention_demo
    from .linalg import _demo as linalg_demo

    linalg_demo.run(quick=args.quick)
    print()
    attention_demo.run(quick=args.quick)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resolvent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and available backends")
    p_demo = sub.add_parser("demo", help="a short demonstration on the CPU")
    p_demo.add_argument("--quick", action="store_true", help="smaller sizes (used by the tests)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    return demo(args)
