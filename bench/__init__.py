"""Benchmarks, installed as ``xtk.bench``; ``python -m xtk bench`` runs ``xtk.bench.cli.main``."""
