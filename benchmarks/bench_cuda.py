"""GPU benchmark of the fast path: fp32 / bf16 throughput, peak memory, share of the matmul rate.

Made for the device machine (one CUDA GPU); ``--device cpu`` runs the same code on the CPU
(the smoke test uses it; memory columns are then ``nan``). Every network is built from the same
weights in two implementations, ``reference`` (``attn_impl="reference"``) and ``fast`` (the
default path), and, for the memory table, ``fast_ckpt`` (fast + activation checkpointing of
every block). Three tables:

1. throughput at ``--batch`` x ``--patch``^2 (default 8 x 64^2, GRL-B) per dtype (``fp32``,
   ``bf16`` = ``torch.autocast`` bfloat16): eval forward and training step (forward, L1,
   backward, AdamW step with lr 0 so the weights stay put) in images/s, interleaved round by
   round, medians over ``--repeats``; the ratio columns are time ratios fast/reference
   (< 1 = fast is faster); the training step's peak memory; max |fast - reference| of the eval
   outputs in that dtype;
2. peak memory at batch 1 and ``--mem-sizes`` (default 256^2 and 512^2): one eval forward and
   one training step per implementation, each from a clean allocator state
   (``torch.cuda.max_memory_allocated`` over what was allocated before; ``oom`` if it does not
   fit);
3. FLOPs of one eval forward at the throughput input (``torch.utils.flop_counter``, counted on
   the reference path, whose attention is plain matmuls: the same arithmetic), the fast path's
   achieved GFLOP/s and its share of the measured ``torch.mm`` rate in the same dtype
   (``--mm-size``, default 8192).

Configs are those of ``bench_attention.py``: ``tiny/small/base`` (model YAMLs, window 8, stripes
8 x W/4) and ``*@sr`` (window 32, stripes 64x64), x2 upsamplers.

Usage (on the device)::

    python benchmarks/bench_cuda.py                                  # GRL-B, fp32 + bf16
    python benchmarks/bench_cuda.py --configs tiny small base base@sr --json out.json
    python benchmarks/bench_cuda.py --device cpu --quick             # smoke run on the CPU
    python benchmarks/bench_cuda.py --configs small@sr --mem-sizes --compile reduce-overhead --regional
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import CONFIGS, _rule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("reference", "fast")
MEMORY_IMPLS = ("reference", "fast", "fast_ckpt")
NAN = float("nan")


def _imports():
    sys.path.insert(0, str(ROOT))
    import torch
    from grl_plugin.archs.grl_arch import GRL
    return torch, GRL


def build(config: str, impls, device, seed: int = 0, compile_mode: Optional[str] = None,
          regional: bool = False) -> dict:
    """``impls`` of ``config`` with identical weights, on ``device``; with ``compile_mode``
    each wrapped in ``torch.compile(mode=compile_mode)`` (``"default"``, ``"reduce-overhead"``:
    CUDA graphs, ...), or with ``regional`` each GRL block compiled so (``compile_blocks``)."""
    torch, GRL = _imports()
    torch.manual_seed(seed)
    state = GRL(**CONFIGS[config]).state_dict()
    models = {}
    for impl in impls:
        m = GRL(attn_impl="reference" if impl == "reference" else "sdpa", **CONFIGS[config])
        m.load_state_dict(state)
        if impl == "fast_ckpt":
            for mod in m.modules():
                if hasattr(mod, "use_checkpoint"):
                    mod.use_checkpoint = True
        m = m.to(device)
        if compile_mode is not None and regional:
            from grl_plugin.layers import compile_blocks
            m = compile_blocks(m, mode=compile_mode)
        elif compile_mode is not None:
            m = torch.compile(m, mode=compile_mode)
        models[impl] = m
    return models


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(torch, device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fwd(torch, model, x, dtype):
    model.eval()
    with torch.no_grad(), _autocast(torch, x.device, dtype):
        return model(x)


def _train_step(torch, model, opt, x, target, dtype):
    model.train()
    opt.zero_grad(set_to_none=True)
    with _autocast(torch, x.device, dtype):
        out = model(x)
    loss = (out.float() - target).abs().mean()
    loss.backward()
    opt.step()
    return loss.detach()


def _median_times(torch, device, fns: dict, repeats: int, warmup: int) -> dict:
    """Median seconds per call of every fn, timed round by round (interleaved)."""
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            _sync(torch, device)
            t = time.perf_counter()
            fn()
            _sync(torch, device)
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


class _Peak:
    """Peak of allocated device memory in MiB over what was allocated on entry (CUDA only;
    ``nan`` elsewhere)."""

    def __init__(self, torch, device):
        self.torch, self.device, self.mib = torch, device, NAN

    def __enter__(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            self.mib = (self.torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        return False


def _free(torch, device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(torch, err: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (oom and isinstance(err, oom)) or "out of memory" in str(err).lower()


def throughput(config: str, dtype: str, device, batch: int, patch: int, repeats: int, warmup: int,
               compile_mode: Optional[str] = None, regional: bool = False) -> dict:
    """Table 1 row: images/s of eval forward and training step, fast vs reference (both
    compiled with ``compile_mode`` when given, per block with ``regional``)."""
    torch, _ = _imports()
    models = build(config, IMPLS, device, compile_mode=compile_mode, regional=regional)
    torch.manual_seed(1)
    x = torch.rand(batch, 3, patch, patch, device=device)
    # (cloned: a CUDA-graph replay may reuse an output's memory)
    outs = {k: _fwd(torch, m, x, dtype).float().clone() for k, m in models.items()}
    delta = float((outs["fast"] - outs["reference"]).abs().max())
    target = torch.rand_like(outs["fast"])
    del outs
    opts = {k: torch.optim.AdamW(m.parameters(), lr=0.0) for k, m in models.items()}
    fwd = _median_times(torch, device, {k: (lambda m=m: _fwd(torch, m, x, dtype)) for k, m in models.items()},
                        repeats, warmup)
    train = _median_times(torch, device, {k: (lambda k=k, m=m: _train_step(torch, m, opts[k], x, target, dtype))
                                          for k, m in models.items()}, repeats, warmup)
    peak = {}
    for k, m in models.items():
        with _Peak(torch, device) as p:
            _train_step(torch, m, opts[k], x, target, dtype)
        peak[k] = p.mib
    label = compile_mode if compile_mode is None or not regional else f"{compile_mode}, per block"
    row = {"config": config, "dtype": dtype, "batch": batch, "patch": patch, "compile": label, "delta": delta,
           "fwd_s": fwd, "train_s": train, "train_peak_mib": peak}
    del models, opts
    _free(torch, device)
    return row


def memory(config: str, size: int, device) -> dict:
    """Table 2 row: peak memory of one eval forward and one training step at batch 1, per
    implementation, each model built alone."""
    torch, _ = _imports()
    row = {"config": config, "size": size, "fwd_mib": {}, "train_mib": {}}
    for impl in MEMORY_IMPLS:
        model = build(config, (impl,), device)[impl]
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        torch.manual_seed(1)
        x = torch.rand(1, 3, size, size, device=device)
        scale = CONFIGS[config]["upscale"]
        target = torch.rand(1, 3, size * scale, size * scale, device=device)
        for phase, key in (("fwd", "fwd_mib"), ("train", "train_mib")):
            if impl == "fast_ckpt" and phase == "fwd":  # same as fast without autograd
                row[key][impl] = NAN
                continue
            try:
                with _Peak(torch, device) as p:
                    if phase == "fwd":
                        _fwd(torch, model, x, "fp32")
                    else:
                        _train_step(torch, model, opt, x, target, "fp32")
                row[key][impl] = p.mib
            except RuntimeError as err:
                if not _is_oom(torch, err):
                    raise
                row[key][impl] = "oom"
                _free(torch, device)
        del model, opt
        _free(torch, device)
    return row


def count_flops(config: str, device, batch: int, patch: int) -> int:
    """FLOPs of one eval forward (reference path: its attention is explicit matmuls)."""
    torch, _ = _imports()
    from torch.utils.flop_counter import FlopCounterMode
    model = build(config, ("reference",), device)["reference"].eval()
    x = torch.rand(batch, 3, patch, patch, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    del model
    _free(torch, device)
    return int(counter.get_total_flops())


def mm_rate(device, dtype: str, n: int, repeats: int) -> float:
    """Measured ``torch.mm`` GFLOP/s for n x n operands in ``dtype``."""
    torch, _ = _imports()
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.rand(n, n, device=device, dtype=dt)
    b = torch.rand(n, n, device=device, dtype=dt)
    sec = _median_times(torch, device, {"mm": lambda: torch.mm(a, b)}, max(repeats, 3), 2)["mm"]
    return 2 * n ** 3 / sec / 1e9


def _fmt(v, spec: str = ".1f") -> str:
    if isinstance(v, str):
        return v
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _ratio(a, b) -> str:
    if isinstance(a, str) or isinstance(b, str) or not (a == a and b == b) or not b:
        return "nan"
    return f"{a / b:.2f}"


def _markdown(head: str, rows) -> str:
    """A markdown table: the header line, its rule, one line per list of cells."""
    return "\n".join([head, _rule(head)] + ["| " + " | ".join(cells) + " |" for cells in rows])


def format_throughput(rows) -> str:
    head = ("| config | dtype | batch x patch | fwd img/s reference | fwd img/s fast | fwd fast/ref (time) "
            "| train img/s reference | train img/s fast | train fast/ref (time) "
            "| train peak MiB reference/fast | train peak fast/ref | max abs diff fast-ref |")
    cells = []
    for r in rows:
        f, t, p, b = r["fwd_s"], r["train_s"], r["train_peak_mib"], r["batch"]
        cells.append([r["config"] + (f" (compiled, {r['compile']})" if r.get("compile") else ""), r["dtype"], f"{b}x{r['patch']}x{r['patch']}",
                      f"{b / f['reference']:.1f}", f"{b / f['fast']:.1f}", f"{f['fast'] / f['reference']:.2f}",
                      f"{b / t['reference']:.1f}", f"{b / t['fast']:.1f}", f"{t['fast'] / t['reference']:.2f}",
                      f"{_fmt(p['reference'], '.0f')}/{_fmt(p['fast'], '.0f')}", _ratio(p["fast"], p["reference"]),
                      f"{r['delta']:.2e}"])
    return _markdown(head, cells)


def format_memory(rows) -> str:
    head = ("| config | input | eval peak MiB reference/fast | eval fast/ref "
            "| train peak MiB reference/fast/fast_ckpt | train fast/ref | train fast_ckpt/ref |")
    cells = []
    for r in rows:
        f, t = r["fwd_mib"], r["train_mib"]
        cells.append([r["config"], f"{r['size']}x{r['size']}",
                      f"{_fmt(f['reference'], '.0f')}/{_fmt(f['fast'], '.0f')}", _ratio(f["fast"], f["reference"]),
                      "/".join(_fmt(t[k], ".0f") for k in MEMORY_IMPLS), _ratio(t["fast"], t["reference"]),
                      _ratio(t["fast_ckpt"], t["reference"])])
    return _markdown(head, cells)


def format_flops(rows) -> str:
    head = "| config | dtype | batch x patch | GFLOP per forward | fast GFLOP/s | mm GFLOP/s | fast % of mm |"
    return _markdown(head, [[r["config"], r["dtype"], f"{r['batch']}x{r['patch']}x{r['patch']}", f"{r['gflop']:.1f}",
                             f"{r['gflops']:.0f}", f"{r['mm_gflops']:.0f}", f"{100 * r['gflops'] / r['mm_gflops']:.1f}"]
                            for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--configs", nargs="+", default=["base"], choices=list(CONFIGS))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--mem-sizes", nargs="*", type=int, default=[256, 512])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mm-size", type=int, default=8192, help="side of the reference torch.mm")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny, batch 2 x 32^2, memory at 64^2, 1 warm-up, 1 repeat, mm 256")
    p.add_argument("--json", type=str, default=None, help="also write all rows to this JSON file")
    p.add_argument("--compile", default=None, metavar="MODE",
                   help="torch.compile both paths for the throughput table with this mode (default, "
                        "reduce-overhead = CUDA graphs, max-autotune); the warm-up rounds compile")
    p.add_argument("--regional", action="store_true",
                   help="with --compile: compile each GRL block (grl_plugin.layers.compile_blocks: one graph "
                        "per block layout, much quicker to compile) instead of the whole network")
    p.add_argument("--tf32", action="store_true",
                   help="let fp32 products and convolutions run in TF32 (default: off, so fp32 is fp32)")
    args = p.parse_args(argv)
    if args.regional and not args.compile:
        p.error("--regional compiles each block with the --compile MODE: give --compile too")
    torch, _ = _imports()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_cuda.py: --device {args.device}: no CUDA device here (torch {torch.__version__}); "
              f"use --device cpu for a smoke run", file=sys.stderr)
        return 2
    if args.quick:
        args.configs, args.batch, args.patch, args.mem_sizes = ["tiny"], 2, 32, [64]
        args.repeats, args.warmup, args.mm_size = 1, 1, 256
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    tf32 = (f", tf32 matmul {torch.backends.cuda.matmul.allow_tf32} cudnn {torch.backends.cudnn.allow_tf32}"
            if device.type == "cuda" else "")
    compiled = ""
    if args.compile:
        compiled = f", torch.compile mode {args.compile}" + (" per block" if args.regional else "")
    print(f"# torch {torch.__version__}, {name}{tf32}{compiled}, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    results = {"throughput": [], "memory": [], "flops": []}

    def save():
        if args.json:  # after every row: a later failure keeps what was measured
            Path(args.json).write_text(json.dumps(results, indent=1))

    rates = {dt: mm_rate(device, dt, args.mm_size, args.repeats) for dt in args.dtypes}
    for config in args.configs:
        flops = count_flops(config, device, args.batch, args.patch)
        for dt in args.dtypes:
            row = throughput(config, dt, device, args.batch, args.patch, args.repeats, args.warmup, args.compile,
                             args.regional)
            results["throughput"].append(row)
            results["flops"].append({"config": config, "dtype": dt, "batch": args.batch, "patch": args.patch,
                                     "gflop": flops / 1e9, "gflops": flops / row["fwd_s"]["fast"] / 1e9,
                                     "mm_gflops": rates[dt]})
            print(f"# done {config} {dt}", file=sys.stderr, flush=True)
            save()
        for size in args.mem_sizes:
            results["memory"].append(memory(config, size, device))
            print(f"# done {config} memory {size}x{size}", file=sys.stderr, flush=True)
            save()
    print(format_throughput(results["throughput"]))
    print()
    print(format_memory(results["memory"]))
    print()
    print(format_flops(results["flops"]))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
