"""Benchmark GRL-T/S/B against BasicSR's SwinIR at matched parameter count (CPU, fp32).

For every GRL size (``tiny``/``small``/``base``) a SwinIR is built whose parameter count is
matched to the GRL preset (within ``--param-tol``, default 10 %):

* GRL: ``grl_plugin.archs.tasks.task_kwargs("sr", T/S/B, scale=--scale)`` -- the released
  classical-SR models (window 32, stripes 64x64, anchor factor 4, head of the size preset);
  ``--grl-geometry yaml`` uses the model-YAML geometry instead (window 8, stripes 8 x W/4);
* SwinIR (``basicsr.archs.swinir_arch.SwinIR``, window 8, mlp_ratio 2, 6 heads, the GRL's
  upsampler): ``tiny`` uses the SwinIR-light layout (4 RSTB x 6 layers), ``small``/``base`` the
  classical-SR layout (6 RSTB x 6 layers); only ``embed_dim`` is searched, over the multiples of
  the head count, for the count closest to the GRL's. The parameter count of a fixed layout is
  an exact quadratic in ``embed_dim``, so three tiny builds give it for every candidate (the
  chosen model's real count is checked against the prediction).

Per (model, input size), in ONE process after ``--warmup`` untimed rounds, interleaved round by
round (GRL and SwinIR alternate which goes first) together with a large fp32 ``torch.mm``
(``--mm-size``, default 2048): eval forward latency (``no_grad``), training-step latency
(train-mode forward + L1 + backward, no optimizer step), medians over ``--repeats`` rounds.
FLOPs of one eval forward come from ``torch.utils.flop_counter.FlopCounterMode`` (counted once,
untimed; a multiply-add = 2 FLOPs, as for the mm's 2 n^3; the fused CPU attention kernel, for
which torch has no formula, is counted as its two matmuls); achieved GFLOP/s = FLOPs / eval
median, also as a percentage of the measured mm rate and of the better of that and the same
product's rate through oneDNN (``% of best``; on CPUs where MKL's sgemm is slow, oneDNN's
rate is the machine's). Peak memory: growth of the peak RSS
(``VmHWM``) of a fresh subprocess per (model, size, network) over its RSS after imports + build,
during one eval forward and during one training step (its own peak: reset after the forward).

Usage::

    python benchmarks/bench_vs_swinir.py                         # T/S/B, 64x64, x2
    python benchmarks/bench_vs_swinir.py --models tiny small --sizes 64 128 --repeats 5
    python benchmarks/bench_vs_swinir.py --quick                 # smoke run (tiny, 32x32, 1 repeat)

The glibc malloc settings the official network's baseline was timed with (``_common.py``) are applied by re-executing
the script with them unless ``--no-malloc-env`` is given; the memory subprocesses use a fixed
128 KiB mmap threshold instead (see ``_common.py``).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import maxrss_mib, reexec_for_timing, reset_peak_rss, run_memory_child  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tiny": "T", "small": "S", "base": "B"}
ARCHS = ("grl", "swinir")
SWINIR_WINDOW = 8
SWINIR_HEADS = 6
#: SwinIR layouts: SwinIR-light for tiny, classical SR for small/base (RSTB count x layers).
SWINIR_DEPTHS = {"tiny": [6] * 4, "small": [6] * 6, "base": [6] * 6}


def _imports():
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # SwinIR's meshgrid call
    import torch
    import grl_plugin  # noqa: F401  (import fixes for basicsr/torchvision, registers GRL)
    from basicsr.archs.swinir_arch import SwinIR
    from grl_plugin.archs.grl_arch import GRL
    return torch, GRL, SwinIR


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def grl_kwargs(model: str, scale: int, geometry: str) -> dict:
    if geometry == "sr":
        from grl_plugin.archs.tasks import task_kwargs
        return task_kwargs("sr", MODELS[model], scale=scale)
    from grl_plugin.archs.presets import preset_kwargs
    return preset_kwargs("GRL_" + MODELS[model], upscale=scale)


def swinir_kwargs(model: str, embed_dim: int, scale: int, upsampler: str, img_size: int = 8) -> dict:
    depths = list(SWINIR_DEPTHS[model])
    return dict(img_size=img_size, patch_size=1, in_chans=3, embed_dim=int(embed_dim), depths=depths,
                num_heads=[SWINIR_HEADS] * len(depths), window_size=SWINIR_WINDOW, mlp_ratio=2.0,
                upscale=scale, img_range=1.0, upsampler=upsampler, resi_connection="1conv",
                drop_path_rate=0.1)


def match_swinir(model: str, target: int, scale: int, upsampler: str):
    """``embed_dim`` (multiple of the head count) whose SwinIR count is closest to ``target``.

    Returns ``(embed_dim, predicted parameter count)``.
    """
    torch, _, SwinIR = _imports()
    h = SWINIR_HEADS
    dims = (h, 2 * h, 3 * h)
    counts = [_n_params(SwinIR(**swinir_kwargs(model, d, scale, upsampler))) for d in dims]
    # P(d) = a d^2 + b d + c exactly (linear / conv / norm weights); fit from three points
    a = Fraction(counts[2] - 2 * counts[1] + counts[0], 2 * h * h)
    b = Fraction(counts[1] - counts[0], h) - a * 3 * h
    c = counts[0] - a * h * h - b * h

    def predict(d):
        return int(a * d * d + b * d + c)

    best = min(range(h, 64 * h + 1, h), key=lambda d: abs(math.log(predict(d) / target)))
    return best, predict(best)


def build(spec: dict, arch: str, size: int, seed: int = 0):
    """The ``arch`` network of ``spec`` for ``size`` x ``size`` inputs (eval mode)."""
    torch, GRL, SwinIR = _imports()
    torch.manual_seed(seed)
    if arch == "grl":
        net = GRL(**spec["grl_kwargs"])
    else:
        padded = -(-size // SWINIR_WINDOW) * SWINIR_WINDOW
        kw = dict(spec["swinir_kwargs"], img_size=padded)  # attention mask precomputed for it
        inner = SwinIR(**kw)

        class _Padded(torch.nn.Module):
            """SwinIR with the input reflect-padded to a multiple of its window, output cropped
            (BasicSR's SwinIR needs H, W divisible by the window; its test scripts pad)."""

            def __init__(self, net, mult, scale):
                super().__init__()
                self.net, self.mult, self.scale = net, mult, scale

            def forward(self, x):
                H, W = x.shape[-2:]
                ph, pw = (-H) % self.mult, (-W) % self.mult
                if ph or pw:
                    x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
                return self.net(x)[..., :H * self.scale, :W * self.scale]

        net = _Padded(inner, SWINIR_WINDOW, kw["upscale"])
    count = _n_params(net)
    if count != spec[arch + "_params"]:
        raise RuntimeError(f"{arch} of {spec['model']}: {count} parameters, expected {spec[arch + '_params']}")
    return net.eval()


def make_spec(model: str, scale: int, geometry: str, tol: float) -> dict:
    """GRL and matched SwinIR kwargs of ``model`` with their parameter counts."""
    torch, GRL, SwinIR = _imports()
    gkw = grl_kwargs(model, scale, geometry)
    gparams = _n_params(GRL(**gkw))
    dim, sparams = match_swinir(model, gparams, scale, gkw["upsampler"])
    skw = swinir_kwargs(model, dim, scale, gkw["upsampler"])
    ratio = gparams / sparams
    if abs(ratio - 1) > tol:
        print(f"# WARNING: {model}: params GRL/SwinIR {ratio:.3f} outside 1 +- {tol}", file=sys.stderr)
    return {"model": model, "grl_kwargs": gkw, "swinir_kwargs": skw, "grl_params": gparams,
            "swinir_params": sparams, "params_ratio": ratio}


def _fwd(torch, model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _train_step(torch, model, x, target, seed=0):
    model.train()
    torch.manual_seed(seed)
    out = model(x)
    loss = (out - target).abs().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def _count_flops(torch, model, x) -> int:
    """FLOPs of one eval forward (after the one in ``measure``: GRL's position biases are cached,
    as in the timed forwards). torch's counter has no formula for the fused CPU attention kernel
    that ``F.scaled_dot_product_attention`` runs on CPU (it would count GRL's attention as 0), so
    it is given the one torch uses for the other SDPA kernels (q @ k^T and p @ v).

    GRL is counted on its reference path (every ``attn_impl`` set to ``"reference"``, the
    official steps: q @ k^T and p @ v of the true head dim), so that the count is the
    network's and not the fast path's own: that one widens q and k by the region mask's
    columns and pads head dims on CPU (``grl_plugin.layers.attention``), work it does but the
    network does not need."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = cpu_flash
    model.eval()
    impls = [(m, m.attn_impl) for m in model.modules() if hasattr(m, "attn_impl")]
    for m, _ in impls:
        m.attn_impl = "reference"
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, impl in impls:
            m.attn_impl = impl
    return int(counter.get_total_flops())


def _time_mm(torch, a, b) -> float:
    t = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - t


def _time_onednn(torch, a, b) -> float:
    """The same n x n product through oneDNN: a 1x1 convolution of ``a`` seen as a channels-last
    (1, n, 1, n) map (on some CPUs oneDNN's rate is above that of the BLAS behind ``torch.mm``)."""
    x = a.t().reshape(1, a.shape[1], 1, a.shape[0]).contiguous(memory_format=torch.channels_last)
    w = b.t().reshape(b.shape[1], b.shape[0], 1, 1)
    t = time.perf_counter()
    torch.nn.functional.conv2d(x, w)
    return time.perf_counter() - t


def memory_child(job: dict) -> dict:
    torch, *_ = _imports()
    torch.set_num_threads(job["threads"])
    model = build(job["spec"], job["arch"], job["size"])
    torch.manual_seed(1)
    x = torch.rand(1, 3, job["size"], job["size"])
    base = maxrss_mib()
    out = _fwd(torch, model, x)
    fwd = maxrss_mib()
    target = torch.rand_like(out)
    del out
    model.train()  # drops eval-time caches before the training step's own peak is read
    gc.collect()
    reset_peak_rss()
    _train_step(torch, model, x, target)
    train = maxrss_mib()
    return {"base": base, "fwd": fwd - base, "train": train - base}


def measure_memory(spec: dict, arch: str, size: int, threads: int) -> dict:
    return run_memory_child(__file__, (json.dumps({"spec": spec, "arch": arch, "size": size, "threads": threads}),))


def measure(spec: dict, size: int, repeats: int, warmup: int, mm_size: int, threads: int,
            memory: bool = True) -> dict:
    torch, *_ = _imports()
    models = {arch: build(spec, arch, size) for arch in ARCHS}
    torch.manual_seed(1)
    x = torch.rand(1, 3, size, size)
    outs = {k: _fwd(torch, m, x) for k, m in models.items()}
    if outs["grl"].shape != outs["swinir"].shape:
        raise RuntimeError(f"output shapes differ: {tuple(outs['grl'].shape)} vs {tuple(outs['swinir'].shape)}")
    target = torch.rand_like(outs["grl"])
    flops = {k: _count_flops(torch, m, x) for k, m in models.items()}
    a, b = torch.rand(mm_size, mm_size), torch.rand(mm_size, mm_size)
    for _ in range(warmup):
        _time_mm(torch, a, b)
        _time_onednn(torch, a, b)
        for m in models.values():
            _train_step(torch, m, x, target)
        for m in models.values():
            _fwd(torch, m, x)
    fwd = {k: [] for k in models}
    train = {k: [] for k in models}
    mm, onednn = [], []
    # all eval rounds before all training rounds: a GRL training step drops its eval
    # position-bias cache (stale after an optimizer step), see bench_attention.py
    for r in range(repeats):
        order = list(ARCHS) if r % 2 == 0 else list(reversed(ARCHS))
        mm.append(_time_mm(torch, a, b))
        onednn.append(_time_onednn(torch, a, b))
        for k in order:
            t = time.perf_counter()
            _fwd(torch, models[k], x)
            fwd[k].append(time.perf_counter() - t)
    for r in range(repeats):
        order = list(ARCHS) if r % 2 == 0 else list(reversed(ARCHS))
        mm.append(_time_mm(torch, a, b))
        onednn.append(_time_onednn(torch, a, b))
        for k in order:
            t = time.perf_counter()
            _train_step(torch, models[k], x, target)
            train[k].append(time.perf_counter() - t)
    fwd_med = {k: statistics.median(v) for k, v in fwd.items()}
    mm_gflops = 2 * mm_size ** 3 / statistics.median(mm) / 1e9
    onednn_gflops = 2 * mm_size ** 3 / statistics.median(onednn) / 1e9
    best = max(mm_gflops, onednn_gflops)
    gflops_s = {k: flops[k] / fwd_med[k] / 1e9 for k in models}
    row = {"model": spec["model"], "size": size, "grl_params": spec["grl_params"],
           "swinir_params": spec["swinir_params"], "params_ratio": spec["params_ratio"],
           "fwd": fwd_med, "train": {k: statistics.median(v) for k, v in train.items()},
           "flops": flops, "gflops_per_s": gflops_s, "mm_size": mm_size, "mm_gflops_per_s": mm_gflops,
           "pct_of_mm": {k: 100.0 * v / mm_gflops for k, v in gflops_s.items()},
           "onednn_gflops_per_s": onednn_gflops,
           "pct_of_best": {k: 100.0 * v / best for k, v in gflops_s.items()},
           "load": os.getloadavg()[0]}
    del models, outs
    if memory:
        row["mem"] = {k: measure_memory(spec, k, size, threads) for k in ARCHS}
    return row


def _describe(spec: dict) -> tuple:
    g, s = spec["grl_kwargs"], spec["swinir_kwargs"]
    stripes = "x".join(str(v) if v is not None else "HW"[i] + (f"/{n}" if n else "")
                       for i, (v, n) in enumerate(zip(g["stripe_size"], g["stripe_groups"])))
    grl = (f"GRL_{MODELS[spec['model']]} x{g['upscale']}: dim {g['embed_dim']}, depths "
           f"{'+'.join(map(str, g['depths']))}, win {g['window_size']}, stripes {stripes}, "
           f"{g['upsampler']}")
    swin = (f"SwinIR x{s['upscale']}: dim {s['embed_dim']}, depths {'+'.join(map(str, s['depths']))}, "
            f"heads {s['num_heads'][0]}, win {s['window_size']}, mlp {s['mlp_ratio']:g}, {s['upsampler']}")
    return grl, swin


def format_models(specs) -> str:
    lines = ["| model | GRL config | GRL params (M) | SwinIR config | SwinIR params (M) | params GRL/SwinIR |",
             "|---|---|---|---|---|---|"]
    for spec in specs:
        grl, swin = _describe(spec)
        lines.append(f"| {spec['model']} | {grl} | {spec['grl_params'] / 1e6:.3f} | {swin} | "
                     f"{spec['swinir_params'] / 1e6:.3f} | {spec['params_ratio']:.3f} |")
    return "\n".join(lines)


def format_table(rows) -> str:
    head = ("| model | input | fwd GRL (s) | fwd SwinIR (s) | fwd GRL/SwinIR | train GRL (s) | "
            "train SwinIR (s) | train GRL/SwinIR | GFLOP fwd GRL/SwinIR | GFLOP/s GRL/SwinIR | "
            "% of mm GRL/SwinIR | % of best GRL/SwinIR | +peak MiB fwd GRL/SwinIR | fwd mem GRL/SwinIR | "
            "+peak MiB train GRL/SwinIR | train mem GRL/SwinIR | mm GFLOP/s | oneDNN GFLOP/s | load |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]

    def ratio(d):
        return f"{d['grl'] / d['swinir']:.2f}" if d["swinir"] else "nan"

    for r in rows:
        f, t = r["fwd"], r["train"]
        mem = r.get("mem")
        if mem:
            mf = f"{mem['grl']['fwd']:.0f}/{mem['swinir']['fwd']:.0f}"
            mt = f"{mem['grl']['train']:.0f}/{mem['swinir']['train']:.0f}"
            rf = ratio({k: mem[k]["fwd"] for k in ARCHS})
            rt = ratio({k: mem[k]["train"] for k in ARCHS})
        else:
            mf = mt = rf = rt = "-"
        fl, gs, pc, pb = r["flops"], r["gflops_per_s"], r["pct_of_mm"], r["pct_of_best"]
        lines.append(
            f"| {r['model']} | {r['size']}x{r['size']} | {f['grl']:.3f} | {f['swinir']:.3f} | {ratio(f)} | "
            f"{t['grl']:.3f} | {t['swinir']:.3f} | {ratio(t)} | {fl['grl'] / 1e9:.2f}/{fl['swinir'] / 1e9:.2f} | "
            f"{gs['grl']:.1f}/{gs['swinir']:.1f} | {pc['grl']:.1f}/{pc['swinir']:.1f} | "
            f"{pb['grl']:.1f}/{pb['swinir']:.1f} | {mf} | {rf} | {mt} | {rt} | {r['mm_gflops_per_s']:.1f} | "
            f"{r['onednn_gflops_per_s']:.1f} | {r['load']:.2f} |")
    return "\n".join(lines)


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--sizes", nargs="+", type=int, default=[64])
    p.add_argument("--scale", type=int, default=2, choices=[2, 3, 4], help="SR factor (default 2)")
    p.add_argument("--grl-geometry", choices=["sr", "yaml"], default="sr",
                   help="sr: released SR-experiment geometry (task_kwargs); yaml: model-YAML presets")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=_default_threads(), help="torch threads (default: all cores)")
    p.add_argument("--mm-size", type=int, default=2048, help="side of the reference fp32 torch.mm")
    p.add_argument("--param-tol", type=float, default=0.10, help="allowed |params GRL/SwinIR - 1|")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny, 32x32, 1 warm-up, 1 repeat")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--no-malloc-env", action="store_true", help="keep the default glibc malloc settings")
    p.add_argument("--json", type=str, default=None, help="also write the rows to this JSON file")
    p.add_argument("--_memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._memory_child:
        print(json.dumps(memory_child(json.loads(args._memory_child))))
        return 0
    reexec_for_timing(__file__, args.no_malloc_env)
    if args.quick:
        args.models, args.sizes, args.repeats, args.warmup = ["tiny"], [32], 1, 1
    torch, *_ = _imports()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, fp32 CPU, x{args.scale}, "
          f"GRL geometry {args.grl_geometry}, repeats {args.repeats}, warmup {args.warmup}, "
          f"load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    if os.getloadavg()[0] + args.threads > _default_threads() + 0.5:
        print(f"# WARNING: load {os.getloadavg()[0]:.2f} + {args.threads} threads > {_default_threads()} "
              "cores: oversubscribed OpenMP threads can slow every op several-fold and unevenly; "
              "compare ratios only, or rerun on an idle machine / with fewer --threads", file=sys.stderr)
    specs = [make_spec(m, args.scale, args.grl_geometry, args.param_tol) for m in args.models]
    print(format_models(specs), flush=True)
    print()
    rows = []
    for size in args.sizes:
        for spec in specs:
            rows.append(measure(spec, size, args.repeats, args.warmup, args.mm_size, args.threads,
                                memory=not args.no_memory))
            print(f"# done {spec['model']} {size}x{size}", file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "scale": args.scale,
                "grl_geometry": args.grl_geometry, "repeats": args.repeats, "warmup": args.warmup,
                "param_tol": args.param_tol}
        Path(args.json).write_text(json.dumps({"meta": meta, "specs": specs, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
