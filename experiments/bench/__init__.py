"""Benchmarks: speed and memory measured side by side in one run, written to BENCHMARKS.md.

Each module is a script (``python -m experiments.bench.NAME``) that checks parity with its
reference before timing and replaces its own marked section of BENCHMARKS.md with ``--write``
(``maml_torch`` and ``scan_mambapy`` compare against PyTorch peers: ``make bench``).
:mod:`~experiments.bench.timing` holds the shared timing rules (warm-up, interleaved medians,
CPU share of other processes).
"""
