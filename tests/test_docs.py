"""The README's quick start and every public docstring example run as written."""

import doctest
import importlib.util
import pathlib
import re

import numpy as np
import pytest

import resolvent

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_python_blocks_run(index):
    code = readme_blocks()[index]
    for framework in ("torch", "jax"):
        if re.search(rf"^\s*(import|from) {framework}\b", code, re.M) and importlib.util.find_spec(framework) is None:
            pytest.skip(f"{framework} is not installed")
    # blocks build on the previous ones, as a reader runs them in one session
    namespace = {}
    for block in readme_blocks()[: index + 1]:
        exec(compile(block, "README.md", "exec"), namespace)


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line for line in first.splitlines() if line and not line.startswith("#")]
    assert commands[0].endswith("python -m resolvent demo")
    assert commands[1].endswith("python -m pytest")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


@pytest.mark.parametrize("name", [n for n in resolvent.__all__ if callable(getattr(resolvent, n))
                                  and not isinstance(getattr(resolvent, n), type)])
def test_docstring_examples(name):
    fn = getattr(resolvent, name)
    assert fn.__doc__, f"{name} has no docstring"
    assert "Parameters" in fn.__doc__ and "Returns" in fn.__doc__, f"{name}'s docstring is not numpydoc"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(fn, name, globs={"np": np, "resolvent": resolvent}):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {name} failed"


def test_public_surface():
    assert sorted(resolvent.__all__) == sorted(set(resolvent.__all__))
    for name in resolvent.__all__:
        assert hasattr(resolvent, name)
    assert issubclass(resolvent.ConvergenceError, np.linalg.LinAlgError)
