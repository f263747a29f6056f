"""regfast's benchmark suite: ``python -m regfast.bench`` (``--help`` for the options).

- :mod:`~regfast.bench.workloads`: parameter shapes of real models, generated;
- :mod:`~regfast.bench.providers`: the operations, and every way of computing each (naive loops,
  torch foreach / compile, Apex, regfast per backend);
- :mod:`~regfast.bench.suite`: the cases, each checked against the naive loop, then timed;
- :mod:`~regfast.bench.timing`: how a call is timed, and the copy-bandwidth ceiling;
- :mod:`~regfast.bench.report`: the CSV, the terminal and markdown tables, the chart.

``pytest benchmarks/ --benchmark-only`` runs the same cases under pytest-benchmark.
"""
