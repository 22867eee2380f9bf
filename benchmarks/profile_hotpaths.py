"""Profile the hot paths on this machine and try the usual speed-ups, side by side in one run.

    .venv/bin/python benchmarks/profile_hotpaths.py [--compile] [--out benchmarks/results/hotpaths.json]

Hot paths: one inversion step (generator forward + teacher forward + backward, what the
meta-generator and the from-scratch baseline repeat), one pixel-optimisation step, and one
meta-test episode (adapt + query). For each: the time per call as the stages run it, with
``channels_last`` memory format, with 1 vs all torch threads, and (``--compile``) under
``torch.compile``, including the compile time a run would pay. Prints a table and writes JSON.
Shapes are the tiny preset's (Omniglot 28x28, Conv4-16 teacher, 5-way x 6 images).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from free.bench.common import pyplot, savefig, write_result
from free.maml import adapt, logits, split_state
from free.models import Generator, build_classifier


def per_call(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hotpaths.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    teacher = build_classifier("conv4", 1, 5, 28, 16, [0.5], [0.25], track_running_stats=True)
    teacher = teacher.eval().requires_grad_(False)
    y = torch.arange(5).repeat_interleave(6)

    def generator_step(g: torch.nn.Module, z: torch.Tensor, net: torch.nn.Module) -> None:
        g.zero_grad(set_to_none=True)
        F.cross_entropy(net(g(z)), y).backward()

    def pixel_step(p: torch.Tensor, net: torch.nn.Module) -> None:
        p.grad = None
        F.cross_entropy(net(torch.sigmoid(p)), y).backward()

    learner = build_classifier("conv4", 1, 5, 28, 16, [0.5], [0.25], track_running_stats=False)
    params, buffers = split_state(learner)
    sx, sy = torch.rand(25, 1, 28, 28), torch.arange(5).repeat_interleave(5)
    qx = torch.rand(75, 1, 28, 28)

    def episode() -> None:
        with torch.no_grad():
            logits(learner, adapt(learner, params, buffers, sx, sy, 5, 0.4), buffers, qx)

    rows: list[dict] = []

    def record(path: str, variant: str, seconds: float, extra: dict | None = None) -> None:
        rows.append({"path": path, "variant": variant, "seconds_per_call": seconds, **(extra or {})})
        print(f"{path:16s} {variant:22s} {1000 * seconds:8.1f} ms", flush=True)

    g, z = Generator(28, 1, 256), torch.randn(30, 256)
    pixels = torch.randn(30, 1, 28, 28, requires_grad=True)
    all_threads = torch.get_num_threads()
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        record(
            "generator step", f"default, {threads} thr", per_call(lambda: generator_step(g, z, teacher), args.repeats)
        )
        record("pixel step", f"default, {threads} thr", per_call(lambda: pixel_step(pixels, teacher), args.repeats))
        record("meta-test episode", f"default, {threads} thr", per_call(episode, args.repeats))
    torch.set_num_threads(all_threads)

    g_cl = Generator(28, 1, 256).to(memory_format=torch.channels_last)
    teacher_cl = build_classifier("conv4", 1, 5, 28, 16, [0.5], [0.25], track_running_stats=True).eval()
    teacher_cl = teacher_cl.requires_grad_(False).to(memory_format=torch.channels_last)
    record("generator step", "channels_last", per_call(lambda: generator_step(g_cl, z, teacher_cl), args.repeats))
    pixels_cl = torch.randn(30, 1, 28, 28).to(memory_format=torch.channels_last).requires_grad_(True)
    record("pixel step", "channels_last", per_call(lambda: pixel_step(pixels_cl, teacher_cl), args.repeats))

    if args.compile:
        start = time.perf_counter()
        g_c, teacher_c = torch.compile(Generator(28, 1, 256)), torch.compile(teacher)
        generator_step(g_c, z, teacher_c)
        compile_seconds = time.perf_counter() - start
        record(
            "generator step",
            "torch.compile",
            per_call(lambda: generator_step(g_c, z, teacher_c), args.repeats),
            {"compile_seconds": compile_seconds},
        )
    path = write_result(
        "hotpaths",
        {"rows": rows, "config": "tiny shapes: 28x28, Conv4-16, 5-way x 6"},
        args.out,
        " ".join(["python", *sys.argv]),
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([f"{r['path']}: {r['variant']}" for r in rows], [1000 * r["seconds_per_call"] for r in rows])
    ax.set(xlabel="ms per call (median)", xscale="log", title="hot paths at the tiny preset's shapes")
    print(f"wrote {path} and {savefig(fig, path)}")


if __name__ == "__main__":
    main()
