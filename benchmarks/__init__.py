"""Benchmarks: ``python -m benchmarks [NAME] [--quick]`` (``make bench [BENCH=NAME]``).

Each ``benchmarks/<name>.py`` has a ``main(argv)`` and writes ``benchmarks/results/<name>.json``
(DESIGN.md "Benchmarks convention"); :mod:`benchmarks.common` holds the shared pieces.
"""
