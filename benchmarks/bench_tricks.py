"""Does each trick of the CPU fast path earn its lines? Interleaved A/B, end to end.

For every trick, the configurations it targets are timed with the trick on and off in one
process, alternating (on, off, on, off, ...) for ``--rounds`` rounds after a warm-up; the
medians and their ratio (off / on: above 1 means the trick saves time) are printed, and for
training the peak memory of one training step with the trick on and off, each in a fresh
process (growth of the peak RSS over the built model; ``_common.py``). A trick is kept if it
gains at least 5 % time or 20 % peak memory on a configuration it targets. Same weights and
input for both; the outputs are checked to agree.

    python benchmarks/bench_tricks.py                       # every trick, its configurations
    python benchmarks/bench_tricks.py --tricks mask_columns --rounds 7
    python benchmarks/bench_tricks.py --quick               # smoke run (tiny models, 32x32)

Configurations (64x64 inputs, models of ``bench_attention.py``): ``tiny``/``small``/``base``
are the model YAMLs (8x8 windows), ``*@sr`` the SR experiment geometry (32x32 windows, 64x64
stripes); ``eval`` is a forward without autograd, ``train`` forward + L1 + backward.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import maxrss_mib, reset_peak_rss, results_meta, run_memory_child  # noqa: E402
from bench_attention import CONFIGS, _imports  # noqa: E402


def _normalize_plain(qkv, factor):
    """normalize_qkv's result with autograd's own formulas (no custom Function)."""
    import torch
    import torch.nn.functional as F
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = q * (factor[0] / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12))
    return q, F.normalize(k, dim=-1, eps=1e-12), v


def _tricks():
    """name -> (what it is, [(config, mode)], patches that switch it off)."""
    from grl_plugin.layers import bias, block, cpb
    from grl_plugin.layers.kernels import cpu, sdpa
    huge = 1 << 62
    return {
        "mask_columns": ("region mask as extra q/k columns (large windows)",
                         [("base@sr", "eval"), ("small@sr", "train")],
                         [(sdpa, "_MASK_COLUMNS_MIN_PAIRS", huge)]),
        "large_index_plans": ("reversed keys (strided bias) / grouped kernel for large indices",
                              [("small@sr", "eval"), ("small@sr", "train"), ("base@sr", "eval")],
                              [(bias, "_LARGE_INDEX_MIN", huge)]),
        "backward_blocks": ("CPU backward in cache-sized blocks",
                            [("small@sr", "train"), ("tiny@sr", "train")],
                            [(cpu, "_BACKWARD_BLOCK_BYTES", huge)]),
        "grid_cpb": ("position-bias MLP in its grid form (large tables)",
                     [("tiny@sr", "train"), ("small@sr", "train"), ("small@sr", "eval")],
                     [(cpb, "_GRID_MIN_CELLS", huge)]),
        "lean_mlp_norm": ("MLP and output projection + post-norm recomputed (checkpoint), input kept",
                          [("tiny", "train"), ("small", "train"), ("small@sr", "train")],
                          [(block, "_recompute", lambda *a, **k: False)]),
        "normalize_function": ("normalize_qkv's autograd Function (keeps only its output)",
                               [("tiny", "train"), ("small@sr", "train")],
                               [(sdpa._NormalizeQKV, "apply", staticmethod(_normalize_plain))]),
        "grouped_kernel": ("grouped kernel beyond the bias budget (eval of large windows and stripes)",
                           [("base@sr", "eval"), ("small@sr", "eval")],
                           [(cpu, "_grouped_flash", lambda *a: None)]),
    }


@contextlib.contextmanager
def _off(patches):
    with contextlib.ExitStack() as stack:
        for owner, attr, value in patches:
            stack.enter_context(mock.patch.object(owner, attr, value))
        yield


def _model(config: str, size: int, train: bool):
    torch, GRL, *_ = _imports()
    torch.manual_seed(0)
    net = GRL(**CONFIGS[config]).train(train)
    return torch, net, torch.rand(1, 3, size, size), torch.rand(1, 3, size * 2, size * 2)


def _step(torch, net, x, target, mode):
    torch.manual_seed(1)  # same drop-path draws
    if mode == "eval":
        with torch.no_grad():
            return net(x)
    out = net(x)
    (out - target).abs().mean().backward()
    net.zero_grad(set_to_none=True)
    return out.detach()


def memory_child(trick: str, config: str, size: int, off: bool) -> dict:
    """Peak RSS growth of one training step over the built model, in this fresh process."""
    torch, net, x, target = _model(config, size, True)
    patches = _tricks()[trick][2]
    with _off(patches) if off else contextlib.nullcontext():
        _step(torch, net, x[..., :8, :8].contiguous() if size > 8 else x, target, "eval")  # imports, kernels
        net.train()  # frees the eval biases the warm-up cached (the training step would, inside its peak)
        gc.collect()
        reset_peak_rss()  # the peak restarts from what is resident now
        base = maxrss_mib()
        _step(torch, net, x, target, "train")
    return {"train": maxrss_mib() - base}


def measure(trick: str, config: str, mode: str, size: int, rounds: int, memory: bool = True) -> dict:
    what, _, patches = _tricks()[trick]
    torch, net, x, target = _model(config, size, mode == "train")

    def step(off: bool):
        with _off(patches) if off else contextlib.nullcontext():
            t = time.perf_counter()
            out = _step(torch, net, x, target, mode)
            return time.perf_counter() - t, out

    outs = [step(False)[1], step(True)[1]]  # warm-up (caches, allocator), and the outputs to compare
    on, off = [], []
    for _ in range(rounds):
        on.append(step(False)[0])
        off.append(step(True)[0])
    row = {"trick": trick, "what": what, "config": config, "mode": mode, "size": size, "rounds": rounds,
           "on_s": statistics.median(on), "off_s": statistics.median(off),
           "max_abs_diff": float((outs[0] - outs[1]).abs().max())}
    row["time_gain"] = row["off_s"] / row["on_s"] - 1
    row["peak_on_mib"] = row["peak_off_mib"] = row["memory_gain"] = float("nan")
    if mode == "train" and memory:
        row["peak_on_mib"] = run_memory_child(__file__, (trick, config, size, 0))["train"]
        row["peak_off_mib"] = run_memory_child(__file__, (trick, config, size, 1))["train"]
        row["memory_gain"] = 1 - row["peak_on_mib"] / row["peak_off_mib"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tricks", nargs="*", help="tricks to measure (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny configs, 32x32, 1 round")
    parser.add_argument("--no-memory", action="store_true", help="no peak-memory subprocesses")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_child:
        t, c, size, off = args._memory_child
        print(json.dumps(memory_child(t, c, int(size), off == "1")))
        return 0
    torch, *_ = _imports()
    tricks = _tricks()
    names = args.tricks or list(tricks)
    unknown = [n for n in names if n not in tricks]
    if unknown:
        parser.error(f"unknown trick(s) {', '.join(unknown)}; choose from {', '.join(tricks)}")
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; off/on > 1: the trick saves time")
    print("| trick | config | mode | on (s) | off (s) | time gain | peak on / off (MiB) | memory gain | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for config, mode in tricks[name][1]:
            if args.quick:
                config = "tiny@sr" if config.endswith("@sr") else "tiny"
            r = measure(name, config, mode, 32 if args.quick else args.size, 1 if args.quick else args.rounds,
                        memory=not args.no_memory)
            rows.append(r)
            print(f"| {name} | {config} | {mode} | {r['on_s']:.3f} | {r['off_s']:.3f} | {100 * r['time_gain']:+.1f} % | "
                  f"{r['peak_on_mib']:.0f} / {r['peak_off_mib']:.0f} | {100 * r['memory_gain']:+.1f} % | "
                  f"{r['max_abs_diff']:.1e} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": results_meta(torch), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
