"""Benchmarks of the GPT-2 scoring/generation pipeline against transformers (not tests).

Run `python -m bench.run --help`; what each workload measures is in BENCHMARKS.md.
"""
