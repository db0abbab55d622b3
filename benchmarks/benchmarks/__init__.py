"""asv benchmarks of resolvent (run from ``benchmarks/``: ``asv run --python=same --quick``).

Laid out as NumPy's and SciPy's suites: one module per area (``bench_solve``, ``bench_chain``,
``bench_attention``, ``bench_track``), shared helpers in ``common``.  Setting the environment
variable ``RESOLVENT_ASV_SMOKE=1`` before import shrinks every parameter list to tiny sizes (what
``tests/test_benchmarks_smoke.py`` runs); ``RESOLVENT_ASV_LARGE=1`` enables the combinations that
are listed but skipped by default because they take minutes (see ``common.LARGE``).
"""
