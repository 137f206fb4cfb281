"""Pure parsers of the files the DiffServe paper's artifact publishes, and f(t) from scores.

Core, below every stage: these modules import only :mod:`diffserve.errors`, :mod:`diffserve.schemas`
and numpy, so the reference scenario (:mod:`diffserve.reference`), the profiler's ``import-csv``
and ``build-cascade --from-scores`` share one reader of each format without the server ever
reaching profiling or training code (``tests/test_import_layers.py`` holds that rule).

- :mod:`.runtime_csv`: ``stable_diffusion_runtimes_*.csv``, batch latencies, into a profile;
- :mod:`.scores`: per-image P(fake) score files, quality-vs-light-fraction tables, the threshold
  grid and the empirical deferral curve f(t);
- :mod:`.pair`: one cascade pair from a deferral curve, a quality table and a profile.
"""
