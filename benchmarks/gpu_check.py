"""The stages of ``benchmarks/gpu_check.sh`` (issue 32, GRL on the GPU), one subcommand each.

Every stage writes ``<out>/<stage>.json``; ``summary`` merges them into ``<out>/gpu_check.json``
and prints the summary table. ``--smoke`` runs the same code in miniature on the CPU.

* ``tests``: ``pytest tests/test_cuda.py`` (with ``--smoke``: ``GRL_TEST_CUDA_DEVICE=cpu``, the
  CUDA-only checks skipped, the two torch.compile tests deselected); counts from its JUnit XML.
* ``job``: the main job. A small LMDB of scikit-image photo crops (x2, MATLAB-bicubic LQ); GRL-S
  SR x2 geometry (window 32, stripes 64x64; depth shrunk to 2 stages of 4 blocks for time) in bf16
  (``train.amp: bf16``), trained with ``torchrun --nproc_per_node=1 -m grl_plugin.train
  --launcher pytorch`` (nccl on CUDA, gloo on the CPU): once uninterrupted, once killed with
  SIGKILL after a checkpoint exists and continued with ``--auto_resume``; the logged ``l_pix``
  of the resumed run must equal the uninterrupted run's (fixed seed, ``num_worker_per_gpu: 0``,
  ``prefetch_mode: cuda``/null, deterministic algorithms). Then ``grl-test`` with tiles on
  held-out crops, PSNR against bicubic upscaling.
* ``bench``: throughput side by side in one process of ``official`` (tests/oracle/official_grl.py),
  ``reference`` and ``fast`` (same weights): training step (forward, L1, backward, AdamW with lr 0)
  of GRL-S@sr at 8x64^2 and GRL-B with the official denoising geometry (window 16, stripes
  64x128) at 1x256^2, eval forward of GRL-B x4 at 480x640 untiled; fp32 and bf16 autocast;
  images/s, peak CUDA memory, FLOPs (counted on the reference path) and the share of the
  measured bf16 ``torch.mm`` rate.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

NAN = float("nan")
ITER_LINE = re.compile(r"iter:\s*([\d,]+), lr:.*?l_pix: (\S+)")
ITER_TIME = re.compile(r"time \(data\): ([\d.]+) ")
RUN_TIMEOUT = 300  # seconds for one grl-train / grl-test run (a hung one does not eat the device time)
PSNR_LINE = re.compile(r"# psnr: ([\d.]+)")

# imported by grl-train (--import): deterministic kernels, so that an interrupted and an
# uninterrupted run compute the same numbers (cuDNN autotuning and atomics would not)
DETERMINISM_MODULE = '''"""grl-train --import: deterministic algorithms for the exact-resume comparison."""
import os
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.deterministic = True

# GRL_JOB_PAUSE_AFTER=N: after saving iteration N, touch $GRL_JOB_PAUSE_MARK and wait, so that
# the driver's SIGKILL lands right after that checkpoint however fast the iterations are
from grl_plugin.models import GRLModel
_save = GRLModel.save


def _save_then_pause(self, epoch, current_iter):
    _save(self, epoch, current_iter)
    if str(current_iter) == os.environ.get("GRL_JOB_PAUSE_AFTER"):
        import time
        open(os.environ["GRL_JOB_PAUSE_MARK"], "w").close()
        time.sleep(600)


GRLModel.save = _save_then_pause
'''


def _descendants(pid: int) -> list:
    """Process ids below ``pid`` (torchrun's workers are not in its process group)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))


def _env(prepend=(), **extra) -> dict:
    """This environment with ``prepend`` and the repository first on PYTHONPATH (the rest kept:
    gpu_check.sh puts the unpacked wheels there)."""
    env = dict(os.environ)
    paths = [str(p) for p in prepend] + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ------------------------------------------------------------------------------------- tests

def stage_tests(args) -> dict:
    xml = Path(args.work) / "test_cuda.xml"
    env = _env(GRL_TEST_CUDA_DEVICE="cpu") if args.smoke else _env()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", f"--junitxml={xml}"]
    if args.smoke:  # torch.compile on the CPU takes minutes here: left to the device run
        cmd += ["-k", "not compile"]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    print(res.stdout[-3000:], res.stderr[-2000:], sep="\n", flush=True)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = res.returncode == 0 and counts["passed"] > 0
    return {"ok": ok, "returncode": res.returncode, "device": "cpu" if args.smoke else "cuda", "wall_s": wall,
            **counts}


# --------------------------------------------------------------------------------------- job

def _job_sizes(smoke: bool) -> dict:
    if smoke:
        net = dict(type="GRL", in_channels=3, embed_dim=16, depths=[2], num_heads_window=[1], num_heads_stripe=[1],
                   window_size=8, stripe_size=[16, 16], stripe_groups=[None, None], anchor_window_down_factor=2,
                   mlp_ratio=2, upscale=2, upsampler="pixelshuffle", drop_path_rate=0.0)
        return dict(net=net, n_train=6, size=48, gt_size=32, batch=2, iters=10, ckpt=4, kill_after=4,
                    n_test=2, test_size=64, tile=16, overlap=4)
    from bench_attention import CONFIGS
    net = {k: v for k, v in CONFIGS["small@sr"].items()}
    net.update(type="GRL", depths=[4, 4], num_heads_window=[2, 2], num_heads_stripe=[2, 2], drop_path_rate=0.0)
    return dict(net=net, n_train=16, size=192, gt_size=128, batch=4, iters=200, ckpt=50, kill_after=100,
                n_test=4, test_size=256, tile=64, overlap=16)


def _train_opt(name, data, sz, smoke, val_data=None) -> dict:
    from helpers import dataset_options, train_options
    train_ds = dataset_options(data, "train", "photos_train", gt_size=sz["gt_size"], batch_size_per_gpu=sz["batch"],
                               num_worker_per_gpu=0, prefetch_mode=None if smoke else "cuda")
    if not smoke:
        train_ds["pin_memory"] = True  # basicsr's CUDAPrefetcher insists on it
    opt = train_options(data, name=name, model_type="GRLModel", manual_seed=32, num_gpu=0 if smoke else 1,
                        val=None, network_g=sz["net"],
                        train={"total_iter": sz["iters"], "amp": "bf16", "ema_decay": 0,
                               "scheduler": {"type": "MultiStepLR", "milestones": [10 ** 6], "gamma": 0.5}},
                        logger={"print_freq": 1, "save_checkpoint_freq": sz["ckpt"], "use_tb_logger": False})
    opt["datasets"] = {"train": train_ds}
    return opt


def _test_options_file(work: Path, test: dict, model: Path, sz: dict, smoke: bool) -> Path:
    """grl-test options: ``model`` on the ``test`` LMDB, tiled (``val.tile``), PSNR only."""
    from helpers import write_test_options
    return write_test_options(work, test, str(model), name="job_test", filename="test.yml",
                              model_type="GRLModel", num_gpu=0 if smoke else 1, network_g=sz["net"],
                              val={"save_img": False, "tile": {"size": sz["tile"], "overlap": sz["overlap"]},
                                   "metrics": {"psnr": {"type": "calculate_psnr", "crop_border": 2,
                                                        "test_y_channel": False}}})


def _torchrun(opt_path, root, work, *extra) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "grl_plugin.train", "-opt", str(opt_path), "--launcher", "pytorch", "--root", str(root),
            "--import", "gpu_det", *extra]


def _losses(folder: Path) -> list:
    """[[(iter, l_pix string), ...] per train log] of an experiment folder, logs in name order."""
    out = []
    for p in sorted(folder.glob("train_*.log")):
        out.append([(int(m.group(1).replace(",", "")), m.group(2)) for m in ITER_LINE.finditer(p.read_text())])
    return out


def _kill_tree(proc) -> None:
    """SIGKILL ``proc``'s descendants (deepest first), then ``proc``."""
    for pid in reversed(_descendants(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()


def _run_logged(cmd, cwd, log: Path, env, timeout=RUN_TIMEOUT) -> int:
    """Run ``cmd`` with its output in ``log``; past ``timeout`` it is killed (workers too) and
    ``TimeoutError`` raised."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            raise TimeoutError(f"{' '.join(map(str, cmd[:6]))}... ran past {timeout} s; output in {log.name}")


def _tail(log: Path, n: int = 2500) -> str:
    return log.read_text(errors="replace")[-n:] if log.is_file() else ""


def _bicubic_psnr(data: dict, scale: int) -> float:
    """Mean PSNR (RGB, crop_border = scale) of MATLAB-bicubic upscaled LQ against GT."""
    import cv2
    import numpy as np
    import grl_plugin  # noqa: F401 - import fixes before basicsr
    from basicsr.metrics.psnr_ssim import calculate_psnr
    from basicsr.utils.matlab_functions import imresize
    base = Path(data["gt"]).parent
    vals = []
    for key in data["keys"]:
        gt = cv2.imread(str(base / "test_GT_png" / f"{key}.png"))
        lq = cv2.imread(str(base / f"test_LQx{scale}_png" / f"{key}.png")).astype(np.float32) / 255.0
        up = (np.clip(imresize(lq, scale), 0, 1) * 255.0).round()
        vals.append(calculate_psnr(up, gt, crop_border=scale))
    return float(np.mean(vals))


def stage_job(args) -> dict:
    import yaml
    from helpers import make_lmdb
    sz = _job_sizes(args.smoke)
    work = Path(args.work) / "job"
    work.mkdir(parents=True, exist_ok=True)
    (work / "gpu_det.py").write_text(DETERMINISM_MODULE)
    env = _env(prepend=[work])
    result = {"ok": False, "device": "cpu" if args.smoke else "cuda", "net": sz["net"], "iters": sz["iters"],
              "batch": sz["batch"], "gt_size": sz["gt_size"], "amp": "bf16",
              "backend": "gloo" if args.smoke else "nccl"}
    t0 = time.perf_counter()
    data = make_lmdb(work / "data", n_images=sz["n_train"], size=sz["size"], scale=2, name="train")
    test = make_lmdb(work / "data", n_images=sz["n_test"], size=sz["test_size"], scale=2, name="test")
    opts = {}
    for name in ("job_ref", "job_run"):
        opts[name] = work / f"{name}.yml"
        opts[name].write_text(yaml.safe_dump(_train_opt(name, data, sz, args.smoke), sort_keys=False))

    # 1. uninterrupted
    t = time.perf_counter()
    rc = _run_logged(_torchrun(opts["job_ref"], work / "ref", work), work, work / "ref.out", env)
    result["ref_s"] = time.perf_counter() - t
    if rc != 0:
        result["error"] = f"uninterrupted run exited {rc}: {_tail(work / 'ref.out')}"
        return result
    ref_exp = work / "ref" / "experiments" / "job_ref"
    reference = dict(x for run in _losses(ref_exp) for x in run)
    times = [float(t) for p in sorted(ref_exp.glob("train_*.log")) for t in ITER_TIME.findall(p.read_text())]
    # basicsr logs a running mean of the iteration time: the last one covers the run
    result["iters_per_s"] = 1.0 / times[-1] if times else NAN

    # 2. killed with SIGKILL (the training process, then torchrun) once the checkpoint of
    #    kill_after is written
    exp = work / "run" / "experiments" / "job_run"
    state = exp / "training_states" / f"{sz['kill_after']}.state"
    mark = work / "paused"
    kill_env = dict(env, GRL_JOB_PAUSE_AFTER=str(sz["kill_after"]), GRL_JOB_PAUSE_MARK=str(mark))
    with open(work / "killed.out", "w") as f:
        proc = subprocess.Popen(_torchrun(opts["job_run"], work / "run", work), cwd=work, env=kill_env, stdout=f,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + RUN_TIMEOUT
        while proc.poll() is None and not mark.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = proc.poll()
        _kill_tree(proc)  # the training process first, then torchrun
    if ended is not None or not mark.is_file():
        result["error"] = f"the run to kill ended by itself ({ended}) or hung before {state.name}: " \
                          + _tail(work / "killed.out")
        return result
    time.sleep(0.5)  # the killed processes' files closed
    killed_at = max((it for run in _losses(exp) for it, _ in run), default=0)
    result["checkpoint_at_kill"] = state.is_file()
    result["killed_after_iter"] = killed_at
    # 3. continued
    rc = _run_logged(_torchrun(opts["job_run"], work / "run", work, "--auto_resume"), work, work / "resumed.out", env)
    if rc != 0:
        result["error"] = f"resumed run exited {rc}: {_tail(work / 'resumed.out')}"
        return result
    runs = _losses(exp)
    resumed = runs[-1] if len(runs) >= 2 else []
    text = sorted(exp.glob("train_*.log"))[-1].read_text()
    m = re.search(r"Resuming training from epoch: (\d+), iter: (\d+)", text)
    result["resumed_from_iter"] = int(m.group(2)) if m else None
    # every logged loss of the killed and of the resumed run against the uninterrupted run's
    logged = [x for run in runs for x in run]
    same = [v == reference.get(it) for it, v in logged]
    rel = [abs(float(v) - float(reference[it])) / max(abs(float(reference[it])), 1e-12)
           for it, v in logged if it in reference]
    result.update(resumed_iters=[resumed[0][0], resumed[-1][0]] if resumed else [],
                  resumed_equal=bool(resumed) and all(same), resumed_mismatches=same.count(False),
                  resumed_max_rel_diff=max(rel) if rel else NAN,
                  loss_first=reference.get(1), loss_last=reference.get(sz["iters"]))
    # 4. grl-test with tiles on held-out crops, PSNR against bicubic
    topt = _test_options_file(work, test, exp / "models" / "net_g_latest.pth", sz, args.smoke)
    rc = _run_logged([sys.executable, "-m", "grl_plugin.test", "-opt", str(topt), "--root", str(work / "test")],
                     work, work / "test.out", env)
    if rc != 0:
        result["error"] = f"grl-test exited {rc}: {_tail(work / 'test.out')}"
        return result
    logs = sorted((work / "test" / "results" / "job_test").glob("test_*.log"))
    psnr = PSNR_LINE.findall(logs[-1].read_text()) if logs else []
    result["test_psnr"] = float(psnr[-1]) if psnr else NAN
    result["bicubic_psnr"] = _bicubic_psnr(test, 2)
    result["test_tile"] = {"size": sz["tile"], "overlap": sz["overlap"]}
    result["wall_s"] = time.perf_counter() - t0
    result["ok"] = bool(result["resumed_equal"] and result["checkpoint_at_kill"] and killed_at < sz["iters"]
                        and math.isfinite(result["test_psnr"]))
    if not result["ok"]:  # (not "error": the summary still shows the numbers)
        result["problem"] = "resumed losses differ from the uninterrupted run's" if not result["resumed_equal"] \
            else "no PSNR from grl-test or the kill came too late"
    return result


# ------------------------------------------------------------------------------------- bench

def bench_configs(smoke: bool) -> list:
    """(name, phase, GRL kwargs, batch, height, width)."""
    from bench_attention import CONFIGS
    dn = dict(CONFIGS["base"], window_size=16, stripe_size=[64, 128], stripe_groups=[None, None], upscale=1,
              upsampler="")
    x4 = dict(CONFIGS["base@sr"], upscale=4)
    if not smoke:
        return [("GRL-S@sr x2", "train", dict(CONFIGS["small@sr"]), 8, 64, 64),
                ("GRL-B denoise", "train", dn, 1, 256, 256),
                ("GRL-B@sr x4", "eval", x4, 1, 480, 640)]
    # embed_dim 36: the official channel attention squeezes by 18 (16 would leave 0 channels)
    shrink = dict(embed_dim=36, depths=[2], num_heads_window=[1], num_heads_stripe=[1])
    return [("GRL-S@sr x2", "train", dict(CONFIGS["small@sr"], window_size=8, stripe_size=[16, 16], **shrink), 2, 32, 32),
            ("GRL-B denoise", "train", dict(dn, window_size=8, stripe_size=[16, 32], **shrink), 1, 32, 32),
            ("GRL-B@sr x4", "eval", dict(x4, window_size=8, stripe_size=[16, 16], **shrink), 1, 24, 40)]


def build_three(kw: dict, height: int, width: int, device, seed: int = 0) -> dict:
    """official / reference / fast with the official network's weights, on ``device``."""
    import torch
    from grl_plugin.archs.grl_arch import GRL
    from oracle.official_grl import BUFFER_NAMES, OfficialGRL
    torch.manual_seed(seed)
    fast = GRL(attn_impl="sdpa", **kw)
    mult = fast.pad_size
    padded = (-(-height // mult) * mult, -(-width // mult) * mult)
    official = OfficialGRL(img_size=padded, **kw)
    sd = {k: v for k, v in official.state_dict().items() if k not in BUFFER_NAMES}
    ref = GRL(attn_impl="reference", **kw)
    ref.load_state_dict(sd, strict=True)
    fast.load_state_dict(sd, strict=True)
    return {k: m.to(device) for k, m in (("official", official), ("reference", ref), ("fast", fast))}


def bench_row(name, phase, kw, batch, h, w, dtype, device, repeats, warmup) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import bench_cuda as bc
    models = build_three(kw, h, w, device)
    torch.manual_seed(1)
    x = torch.rand(batch, 3, h, w, device=device)
    scale = kw.get("upscale", 1) or 1
    target = torch.rand(batch, 3, h * scale, w * scale, device=device)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=0.0) for k, m in models.items()}

    def step(k):
        if phase == "train":
            return bc._train_step(torch, models[k], opts[k], x, target, dtype)
        return bc._fwd(torch, models[k], x, dtype)

    counter = FlopCounterMode(display=False)
    with counter:
        step("reference")
    flops = int(counter.get_total_flops())
    peak, fns, errors = {}, {}, {}
    for k in models:
        try:
            with bc._Peak(torch, device) as p:
                step(k)
            peak[k] = p.mib
            fns[k] = lambda k=k: step(k)
        except Exception as err:  # recorded: the other implementations still run
            oom = bc._is_oom(torch, err)
            peak[k], errors[k] = "oom" if oom else "error", "out of memory" if oom else f"{type(err).__name__}: {err}"
            print(f"# bench {name} {phase} {dtype} {k}: {errors[k][:300]}", file=sys.stderr, flush=True)
            bc._free(torch, device)
    secs = bc._median_times(torch, device, fns, repeats, warmup) if fns else {}
    row = {"name": name, "phase": phase, "dtype": dtype, "batch": batch, "height": h, "width": w,
           "gflop": flops / 1e9, "impls": {}, "errors": errors}
    for k in models:
        s = secs.get(k)
        row["impls"][k] = {"s": s if s is not None else NAN, "img_per_s": batch / s if s else NAN,
                           "peak_mib": peak.get(k, NAN), "gflops": flops / s / 1e9 if s else NAN}
    del models, opts
    bc._free(torch, device)
    return row


def stage_bench(args) -> dict:
    import torch
    import bench_cuda as bc
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    repeats, warmup, mm = (1, 1, 256) if args.smoke else (5, 2, 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    out = {"ok": False, "device": name, "torch": torch.__version__, "tf32": False,
           "mm_gflops": {dt: bc.mm_rate(device, dt, mm, repeats) for dt in ("fp32", "bf16")}, "rows": []}
    for cfg in bench_configs(args.smoke):
        for dt in ("fp32", "bf16"):
            row = bench_row(*cfg, dt, device, repeats, warmup)
            for v in row["impls"].values():
                v["share_bf16_mm"] = v["gflops"] / out["mm_gflops"]["bf16"] if v["gflops"] == v["gflops"] else NAN
            out["rows"].append(row)
            print(f"# bench {row['name']} {row['phase']} {dt}: " + ", ".join(
                f"{k} {v['img_per_s']:.2f} img/s" for k, v in row["impls"].items()), flush=True)
            _write_json(Path(args.out) / "bench.json", out)
    out["ok"] = all(isinstance(v["s"], float) and v["s"] > 0 for r in out["rows"] for v in r["impls"].values())
    return out


# ----------------------------------------------------------------------------------- summary

def _f(v, spec=".1f") -> str:
    if isinstance(v, str):
        return v
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def summary(args) -> int:
    out = Path(args.out)
    merged = {"smoke": args.smoke, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}
    for stage in ("tests", "job", "bench"):
        p = out / f"{stage}.json"
        if p.is_file():
            merged["stages"][stage] = json.loads(p.read_text())
    merged["ok"] = all(s.get("ok") for s in merged["stages"].values()) and bool(merged["stages"])
    _write_json(out / "gpu_check.json", merged)
    lines = ["| stage | result | numbers |", "|---|---|---|"]
    s = merged["stages"]
    failed = [k for k, v in s.items() if "error" in v and not v.get("ok")]
    for k in failed:
        lines.append(f"| {k} ({s[k].get('device')}) | FAIL | " + s[k]["error"][-300:].replace("\n", " ").replace("|", "/")
                     + " |")
    if "tests" in s and "tests" not in failed:
        t = s["tests"]
        lines.append(f"| tests ({t['device']}) | {'ok' if t['ok'] else 'FAIL'} | {t['passed']} passed, "
                     f"{t['failures'] + t['errors']} failed, {t['skipped']} skipped |")
    if "job" in s and "job" not in failed:
        j = s["job"]
        nums = (f"{j['backend']}, {j['iters']} it bf16, {_f(j.get('iters_per_s'), '.2f')} it/s; killed after it "
                f"{j.get('killed_after_iter')}, resumed from {j.get('resumed_from_iter')}: losses "
                f"{'equal' if j.get('resumed_equal') else 'DIFFER (max rel ' + _f(j.get('resumed_max_rel_diff'), '.1e') + ')'}"
                f"; PSNR {_f(j.get('test_psnr'), '.2f')} dB vs bicubic {_f(j.get('bicubic_psnr'), '.2f')} dB")
        lines.append(f"| job ({j['device']}) | {'ok' if j['ok'] else 'FAIL'} | {nums} |")
    if "bench" in s and "bench" not in failed:
        b = s["bench"]
        lines.append(f"| bench ({b['device']}) | {'ok' if b['ok'] else 'FAIL'} | mm GFLOP/s fp32 "
                     f"{_f(b['mm_gflops']['fp32'], '.0f')}, bf16 {_f(b['mm_gflops']['bf16'], '.0f')} |")
        lines += ["", "| bench | dtype | GFLOP | img/s official/reference/fast | peak MiB official/reference/fast "
                  "| fast/official img/s | fast % of bf16 mm |", "|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            im = r["impls"]
            lines.append(f"| {r['name']} {r['phase']} {r['batch']}x{r['height']}x{r['width']} | {r['dtype']} | "
                         f"{r['gflop']:.1f} | " + "/".join(_f(im[k]["img_per_s"], ".2f") for k in im) + " | "
                         + "/".join(_f(im[k]["peak_mib"], ".0f") for k in im) + " | "
                         + _f(im["fast"]["img_per_s"] / im["official"]["img_per_s"], ".2f") + " | "
                         + _f(100 * im["fast"]["share_bf16_mm"], ".1f") + " |")
    lines.append("")
    lines.append(f"gpu_check: {'ALL OK' if merged['ok'] else 'FAILED'}; numbers in {out / 'gpu_check.json'}")
    print("\n".join(lines))
    return 0 if merged["ok"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="stages of benchmarks/gpu_check.sh")
    p.add_argument("stage", choices=["tests", "job", "bench", "summary"])
    p.add_argument("--out", required=True, help="folder of the JSON results")
    p.add_argument("--work", default=None, help="scratch folder (data, experiments, logs)")
    p.add_argument("--smoke", action="store_true", help="miniature run on the CPU")
    args = p.parse_args(argv)
    if args.stage == "summary":
        return summary(args)
    args.work = args.work or str(Path(args.out) / "work")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        res = {"tests": stage_tests, "job": stage_job, "bench": stage_bench}[args.stage](args)
    except Exception as err:  # recorded, so that the other stages and the summary still run
        import traceback
        traceback.print_exc()
        res = {"ok": False, "error": f"{type(err).__name__}: {err}", "device": "cpu" if args.smoke else "cuda"}
    res.setdefault("wall_s", time.perf_counter() - t)
    _write_json(Path(args.out) / f"{args.stage}.json", res)
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
