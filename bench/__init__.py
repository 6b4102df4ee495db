"""Benchmarks of the extraction pipeline: `python -m bench [NAME ...] [--quick]` (or `make bench`).

Each benchmark measures its figures side by side in one run, writes ``bench/results/<name>.json`` and the
runner rewrites ``docs/benchmarks.md`` from every result there.
"""
