"""Benchmarks: micro-benchmarks run as scripts (``python benchmarks/head.py``) and the debiasing study, a package run as
``python -m benchmarks.debias`` from the project root."""
