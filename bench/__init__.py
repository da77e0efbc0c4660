"""Benchmarks that print figures and ratios; none of them passes or fails on a time.

Run one as ``python -m bench.<name> --help``.
"""
