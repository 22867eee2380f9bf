"""Benchmarks (``free bench ...``): scripts that measure and save numbers, never timed tests.

* :mod:`free.bench.recovery`   - data recovery: meta-generator vs from scratch vs pixels.
* :mod:`free.bench.accuracy`   - the method table (FREE, ablation, baselines, bounds), 1- and 5-shot.
* :mod:`free.bench.evaluation` - meta-test throughput, vectorised vs loop, and peak memory.
* :mod:`free.bench.pipeline`   - the tiny pipeline through Prefect, DVC and bare, and no-op reruns.

Each writes ``benchmarks/results/<name>.json`` (machine, versions, config, numbers) and a PNG.
"""
