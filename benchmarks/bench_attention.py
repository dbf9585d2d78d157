"""Benchmark GRL implementations side by side: official (oracle) vs reference vs fast.

For every (config, input size) the three implementations are built with the SAME weights:

* ``official``  -- ``tests/oracle/official_grl.py`` (literal re-statement of the official
  network), built with ``img_size`` = padded input size so its registered buffers are used;
* ``reference`` -- ``GRL(attn_impl="reference")`` (explicit logits, the in-package oracle);
* ``fast``      -- ``GRL(attn_impl="sdpa")`` (the default path).

Timings are taken in ONE process, interleaved round-robin (official, reference, fast,
official, ...) after warm-up, so that machine-load drift hits all three alike; the table
reports medians and the ratios fast/official and fast/reference. Peak memory is the
peak RSS (``VmHWM``) of a fresh subprocess per (config, size, implementation): one eval forward
(``fwd MiB``), then one training step (``train MiB``, max of both phases).

Usage::

    python benchmarks/bench_attention.py                      # T/S/B model-YAML + @sr configs at 64x64
    python benchmarks/bench_attention.py --configs tiny@sr small@sr --sizes 64 128 --repeats 5
    python benchmarks/bench_attention.py --quick              # smoke run (tiny, 32x32, 1 repeat)
    python benchmarks/bench_attention.py --configs tiny small base --breakdown   # where eval time goes

The glibc malloc settings the official network's baseline was timed with (``_common.py``) are applied by re-executing
the script with them unless ``--no-malloc-env`` is given; the memory subprocesses use a fixed
128 KiB mmap threshold instead, so that their peak RSS follows the live tensors (``_common.py``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import maxrss_mib, reexec_for_timing, reset_peak_rss, results_meta, run_memory_child  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("official", "reference", "fast")
# Variants of the fast path for the training columns (same weights, same outputs):
# fast_keepP -- CPU backward always keeps the attention probabilities (layers.configure(net, lean_backward=False));
# fast_lean  -- least-memory backward: P always recomputed, MLP hidden layers too (lean_backward=True);
# fast_ckpt  -- activation checkpointing of every block (GRLStage.use_checkpoint).
VARIANTS = ("fast_keepP", "fast_lean", "fast_ckpt")
# lean_backward option per implementation (None: the automatic default)
LEAN = {"fast_keepP": False, "fast_lean": True}

_COMMON = dict(in_channels=3, img_range=1.0, mlp_ratio=2, stripe_shift=True, qkv_proj_type="linear",
               anchor_proj_type="avgpool", anchor_one_stage=True, anchor_window_down_factor=4,
               out_proj_type="linear", conv_type="1conv", init_method="n", drop_path_rate=0.1)
_MODEL = {
    "tiny": dict(embed_dim=64, depths=[4] * 4, num_heads_window=[2] * 4, num_heads_stripe=[2] * 4,
                 upscale=2, upsampler="pixelshuffledirect", local_connection=False),
    "small": dict(embed_dim=128, depths=[4] * 4, num_heads_window=[2] * 4, num_heads_stripe=[2] * 4,
                  upscale=2, upsampler="pixelshuffle", local_connection=False),
    "base": dict(embed_dim=180, depths=[4, 4, 8, 8, 8, 4, 4], num_heads_window=[3] * 7,
                 num_heads_stripe=[3] * 7, upscale=2, upsampler="pixelshuffle", local_connection=True),
}
_YAML_GEOM = dict(window_size=8, stripe_size=[8, None], stripe_groups=[None, 4])
_SR_GEOM = dict(window_size=32, stripe_size=[64, 64], stripe_groups=[None, None])
CONFIGS = {}
for _name, _kw in _MODEL.items():
    CONFIGS[_name] = {**_COMMON, **_kw, **_YAML_GEOM}
    CONFIGS[_name + "@sr"] = {**_COMMON, **_kw, **_SR_GEOM}


def _imports():
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from grl_plugin.archs.grl_arch import GRL
    from oracle.official_grl import BUFFER_NAMES, OfficialGRL
    return torch, GRL, OfficialGRL, BUFFER_NAMES


def build(config: str, size: int, impls=IMPLS, seed: int = 0):
    """The models of ``impls`` for ``config`` with identical weights (eval mode)."""
    torch, GRL, OfficialGRL, BUFFER_NAMES = _imports()
    kw = dict(CONFIGS[config])
    torch.manual_seed(seed)
    probe = GRL(**kw)
    mult = probe.pad_multiple if hasattr(probe, "pad_multiple") else 64
    padded = -(-size // mult) * mult
    official = OfficialGRL(img_size=padded, **kw)
    sd = {k: v for k, v in official.state_dict().items() if k not in BUFFER_NAMES}
    models = {}
    for impl in impls:
        if impl == "official":
            models[impl] = official
        else:
            m = GRL(attn_impl="reference" if impl == "reference" else "sdpa", **kw)
            m.load_state_dict(sd, strict=True)
            if impl == "fast_ckpt":
                for mod in m.modules():
                    if hasattr(mod, "use_checkpoint"):
                        mod.use_checkpoint = True
            models[impl] = m
    for m in models.values():
        m.eval()
    return models


def _fwd(torch, model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _train_step(torch, model, x, target, seed=0, lean=None):
    from grl_plugin.layers import configure
    configure(model, lean_backward=lean)  # None: the default (automatic)
    model.train()
    torch.manual_seed(seed)  # same DropPath draws for every implementation
    out = model(x)
    loss = (out - target).abs().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())



def memory_child(config: str, size: int, impl: str) -> dict:
    torch, *_ = _imports()
    models = build(config, size, impls=(impl,))
    model = models[impl]
    torch.manual_seed(1)
    x = torch.rand(1, 3, size, size)
    base = maxrss_mib()
    out = _fwd(torch, model, x)
    fwd = maxrss_mib()
    target = torch.rand_like(out)
    del out
    model.train()  # drops eval-time caches before the training step's own peak is read
    gc.collect()
    reset_peak_rss()
    _train_step(torch, model, x, target, lean=LEAN.get(impl))
    train = maxrss_mib()
    # growth of the peak RSS over the RSS after building the model (imports + weights)
    return {"base": base, "fwd": fwd - base, "train": train - base}


def measure_memory(config: str, size: int, impl: str) -> dict:
    return run_memory_child(__file__, (config, size, impl))


def measure(config: str, size: int, repeats: int, warmup: int, memory: bool = True,
            variants=VARIANTS, official: bool = True) -> dict:
    """One row; ``official=False`` leaves the official oracle out of the timings and memory
    (its values are NaN): base@sr trains past 19 GB in it."""
    torch, *_ = _imports()
    impls = IMPLS if official else tuple(i for i in IMPLS if i != "official")
    models = build(config, size, impls=impls + tuple(variants))
    torch.manual_seed(1)
    x = torch.rand(1, 3, size, size)
    outs = {k: _fwd(torch, m, x) for k, m in models.items() if k in IMPLS}
    target = torch.rand_like(outs["fast"])
    nan = float("nan")
    delta_ref = float((outs["fast"] - outs["reference"]).abs().max())
    delta_off = float((outs["fast"] - outs["official"]).abs().max()) if official else nan
    fwd = {k: [] for k in models if k in IMPLS}
    train = {k: [] for k in models}
    # training warm-up first, then all eval rounds, then all training rounds: a training step
    # drops the eval position-bias cache of the fast path (it goes stale with the optimizer
    # step), so interleaving them would time every eval forward with a cold cache
    for _ in range(warmup):
        for k, m in models.items():
            _train_step(torch, m, x, target, lean=LEAN.get(k))
        for k in fwd:
            _fwd(torch, models[k], x)
    for _ in range(repeats):
        for k in fwd:
            t = time.perf_counter()
            _fwd(torch, models[k], x)
            fwd[k].append(time.perf_counter() - t)
    for _ in range(repeats):
        for k, m in models.items():
            t = time.perf_counter()
            _train_step(torch, m, x, target, lean=LEAN.get(k))
            train[k].append(time.perf_counter() - t)
    row = {"config": config, "size": size, "delta_ref": delta_ref, "delta_off": delta_off,
           "fwd": {"official": nan, **{k: statistics.median(v) for k, v in fwd.items()}},
           "train": {"official": nan, **{k: statistics.median(v) for k, v in train.items()}},
           "load": os.getloadavg()[0]}
    models_built = set(models)
    del models
    if memory:
        row["mem"] = {k: measure_memory(config, size, k) if k in models_built else {"fwd": nan, "train": nan}
                      for k in IMPLS + tuple(variants)}
    return row


def breakdown(config: str, size: int, repeats: int, warmup: int) -> dict:
    """Eval-forward time spent inside the window and stripe attention modules vs the whole
    forward, reference and fast, interleaved in one process; medians over ``repeats`` rounds.
    The rest (projections, MLPs, norms, convs, head) is the same layers in both paths; the
    fast path keeps the maps channels-last."""
    torch, *_ = _imports()
    from grl_plugin.layers import AnchorStripeAttention, WindowAttention
    models = build(config, size, impls=("reference", "fast"))
    torch.manual_seed(1)
    x = torch.rand(1, 3, size, size)
    inside = {"t": 0.0}
    started = {}
    for m in models.values():
        for mod in m.modules():
            if isinstance(mod, (WindowAttention, AnchorStripeAttention)):
                mod.register_forward_pre_hook(lambda mod, args: started.__setitem__(mod, time.perf_counter()))
                mod.register_forward_hook(lambda mod, args, out: inside.__setitem__(
                    "t", inside["t"] + time.perf_counter() - started.pop(mod)))
    total = {k: [] for k in models}
    attn = {k: [] for k in models}
    for r in range(warmup + repeats):
        for k, m in models.items():
            inside["t"] = 0.0
            t = time.perf_counter()
            _fwd(torch, m, x)
            if r >= warmup:
                total[k].append(time.perf_counter() - t)
                attn[k].append(inside["t"])
    med = {k: (statistics.median(total[k]), statistics.median(attn[k])) for k in models}
    return {"config": config, "size": size, "total": {k: v[0] for k, v in med.items()},
            "attention": {k: v[1] for k, v in med.items()}, "load": os.getloadavg()[0]}


def format_breakdown(rows) -> str:
    """Markdown table of :func:`breakdown` rows (milliseconds and ratios)."""
    head = ("| config | input | fwd reference total / attention (ms) | fwd fast total / attention (ms) | "
            "fwd fast/ref | attention fast/ref | rest fast/ref | rest / reference total | load |")
    lines = [head, _rule(head)]
    for r in rows:
        tot, att = r["total"], r["attention"]
        rest = {k: tot[k] - att[k] for k in tot}
        lines.append(
            f"| {r['config']} | {r['size']}x{r['size']} | {tot['reference'] * 1e3:.1f} / {att['reference'] * 1e3:.1f} | "
            f"{tot['fast'] * 1e3:.1f} / {att['fast'] * 1e3:.1f} | {tot['fast'] / tot['reference']:.2f} | "
            f"{att['fast'] / att['reference']:.2f} | {rest['fast'] / rest['reference']:.2f} | "
            f"{rest['reference'] / tot['reference']:.2f} | {r['load']:.2f} |")
    return "\n".join(lines)


def format_table(rows) -> str:
    """Two markdown tables: timings (+ max |diff|) and peak memory, with ratios to reference."""
    variants = [v for v in VARIANTS if rows and v in rows[0]["train"]]
    head = ("| config | input | fwd official (s) | fwd reference (s) | fwd fast (s) | fwd fast/off | "
            "fwd fast/ref | train official (s) | train reference (s) | train fast (s) | train fast/off | "
            "train fast/ref | " + "".join(f"train {v}/ref | " for v in variants) +
            "max abs diff fast-ref | max abs diff fast-off | load |")
    lines = [head, _rule(head)]
    for r in rows:
        f, t = r["fwd"], r["train"]
        lines.append(
            f"| {r['config']} | {r['size']}x{r['size']} | {f['official']:.3f} | {f['reference']:.3f} | "
            f"{f['fast']:.3f} | {f['fast'] / f['official']:.2f} | {f['fast'] / f['reference']:.2f} | "
            f"{t['official']:.3f} | {t['reference']:.3f} | {t['fast']:.3f} | "
            f"{t['fast'] / t['official']:.2f} | {t['fast'] / t['reference']:.2f} | " +
            "".join(f"{t[v] / t['reference']:.2f} | " for v in variants) +
            f"{r['delta_ref']:.2e} | {r['delta_off']:.2e} | {r['load']:.2f} |")
    if any(r.get("mem") for r in rows):
        impls = list(IMPLS) + variants
        head = ("| config | input | +peak MiB fwd " + "/".join(IMPLS) + " | +peak MiB train " + "/".join(impls) +
                " | train fast/ref | " + "".join(f"train {v}/ref | " for v in variants))
        head = head.rstrip()
        lines += ["", head, _rule(head)]
        for r in rows:
            mem = r.get("mem")
            if not mem:
                continue
            ref = mem["reference"]["train"]
            lines.append(
                f"| {r['config']} | {r['size']}x{r['size']} | " + "/".join(f"{mem[k]['fwd']:.0f}" for k in IMPLS) +
                (" | " + "/".join(f"{mem[k]['train']:.0f}" for k in impls) + f" | {mem['fast']['train'] / ref:.2f} | " +
                 "".join(f"{mem[v]['train'] / ref:.2f} | " for v in variants)).rstrip())
    return "\n".join(lines)


def _rule(head: str) -> str:
    """The markdown separator line under a header row."""
    return "|" + "---|" * (head.count("|") - 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--sizes", nargs="+", type=int, default=[64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny, 32x32, 1 warm-up, 1 repeat")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--no-malloc-env", action="store_true", help="keep the default glibc malloc settings")
    p.add_argument("--json", type=str, default=None, help="also write the rows to this JSON file")
    p.add_argument("--no-variants", action="store_true", help="skip the fast_keepP / fast_lean / fast_ckpt training variants")
    p.add_argument("--no-official", nargs="*", default=[], metavar="CONFIG",
                   help="leave the official oracle out for these configs (all if none named): NaN columns")
    p.add_argument("--breakdown", action="store_true",
                   help="instead of the main tables: eval time inside the attention modules vs the rest "
                        "(reference and fast) and in the rest")
    p.add_argument("--_memory-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._memory_child:
        c, s, i = args._memory_child
        print(json.dumps(memory_child(c, int(s), i)))
        return 0
    reexec_for_timing(__file__, args.no_malloc_env)
    if args.quick:
        args.configs, args.sizes, args.repeats, args.warmup = ["tiny"], [32], 1, 1
    import torch
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    if args.breakdown:
        rows = [breakdown(config, size, args.repeats, args.warmup) for size in args.sizes for config in args.configs]
        print(format_breakdown(rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": results_meta(torch), "rows": rows}, indent=1))
        return 0
    rows = []
    for size in args.sizes:
        for config in args.configs:
            official = not (args.no_official == [] and "--no-official" in sys.argv or config in args.no_official)
            rows.append(measure(config, size, args.repeats, args.warmup, memory=not args.no_memory,
                                variants=() if args.no_variants else VARIANTS, official=official))
            print(f"# done {config} {size}x{size}", file=sys.stderr, flush=True)
            if args.json:  # after every row: a later crash (e.g. out of memory) keeps what was measured
                Path(args.json).write_text(json.dumps({"meta": results_meta(torch), "rows": rows}, indent=1))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
