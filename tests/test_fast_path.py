"""The fast attention path: gradients equal the reference path, and the benchmark smoke run.

Timings are never asserted (shared, noisy CPU); only that the benchmark runs and that its
fast-vs-reference/official max |diff| column stays within the 1e-4 tolerance.
"""
import functools
import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from grl_plugin.archs.grl_arch import GRL
from helpers import assert_same_training_step
from grl_plugin.layers import attention as attention_mod
from grl_plugin.layers import bias as bias_mod
from grl_plugin.layers.kernels import cpu as cpu_mod
from grl_plugin.layers.kernels import sdpa as sdpa_mod
from grl_plugin.layers import cpb as cpb_mod
from grl_plugin.layers import configure
from grl_plugin.layers.attention import AffineTransform, cosine_attention
from grl_plugin.layers import geometry as geometry_mod
from grl_plugin.layers.geometry import coords_table

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4



def use_lean_backward(monkeypatch, save_probs):
    """This module's ``cosine_attention`` calls with the ``lean_backward`` that keeps the
    probabilities (``save_probs`` True), recomputes them (False) or decides (None)."""
    lean = None if save_probs is None else not save_probs
    monkeypatch.setitem(globals(), "cosine_attention",
                        functools.partial(attention_mod.cosine_attention, lean_backward=lean))

def test_position_bias_gather_matches_advanced_indexing_with_grads():
    torch.manual_seed(0)
    t = AffineTransform(3)
    table = torch.randn(1, 7, 7, 2)
    index = torch.randint(0, 49, (20, 30))
    bias = t.position_bias(table, index)
    values = 16 * torch.sigmoid(t.cpb_mlp(table).view(-1, 3))
    expected = values.t()[:, index.reshape(-1)].view(3, 20, 30)
    g = torch.randn_like(bias)
    grads = torch.autograd.grad((bias * g).sum(), list(t.cpb_mlp.parameters()))
    grads_ref = torch.autograd.grad((expected * g).sum(), list(t.cpb_mlp.parameters()))
    assert torch.allclose(bias, expected)
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max()))


def _grid_table(rows_values, cols_values):
    """(1, rows, cols, 2) coordinate grid: cell (i, j) = (rows_values[i], cols_values[j])."""
    return torch.stack(torch.meshgrid(rows_values, cols_values, indexing="ij"), -1)[None]


@pytest.mark.parametrize("form", ["plain", "grid", "grid_unsorted"])
def test_cpb_mlp_function_gradcheck_and_frozen_parts(form):
    """The MLP Function's hand-written backward against autograd (float64 gradcheck): the plain
    form (hidden layer recomputed) on 30 scattered cells, the grid form on a 5 x 6 grid with
    ascending and with shuffled columns; with only some weights trainable, the others get no
    gradient and the rest the same as autograd's."""
    torch.manual_seed(5)
    if form == "plain":
        t, axes = torch.randn(30, 2, dtype=torch.float64), None
        assert cpb_mod.grid_axes(t.view(1, 5, 6, 2)) is None  # (no grid)
    else:
        cols = torch.randn(6, dtype=torch.float64)
        cols = cols.sort().values if form == "grid" else cols
        table = _grid_table(torch.randn(5, dtype=torch.float64), cols)
        axes = geometry_mod.grid_axes(table)  # (cpb.grid_axes: None, the table is small)
        assert cpb_mod.grid_axes(table) is None and (axes.order is None) == (form == "grid")
        assert torch.equal(axes.b, cols.sort().values)
        t = table.reshape(-1, 2)
    w1, b1 = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    w2 = torch.randn(3, 16, dtype=torch.float64)
    params = [x.requires_grad_() for x in (w1, b1, w2)]
    assert torch.autograd.gradcheck(lambda *p: cpb_mod.CpbMlp.apply(t, *p, axes), params)
    for frozen in (w1, b1):
        frozen.requires_grad_(False)
        out = cpb_mod.CpbMlp.apply(t, w1, b1, w2, axes)
        g = torch.randn_like(out)
        wanted = [x for x in (w1, b1, w2) if x.requires_grad]
        got = torch.autograd.grad((out * g).sum(), wanted)
        plain = torch.mm(w2, torch.relu(t @ w1.t() + b1).t())
        assert torch.allclose(out, plain)
        ref = torch.autograd.grad((plain * g).sum(), wanted)
        for a, b in zip(got, ref):
            assert torch.allclose(a, b)
        frozen.requires_grad_(True)


@pytest.mark.parametrize("window,df", [((32, 32), 1), ((64, 64), 4), ((64, 64), 1)])
def test_cpb_grid_form_matches_plain_mlp_on_grl_tables(window, df):
    """The grid form on GRL's large tables (32x32 windows, 64x64 stripes to their anchors, 64x64
    windows): values and the weights' gradients equal the plain MLP's, also for channels that
    switch exactly on a grid column (relu(0): off, no gradient, as autograd has it), channels
    with no column slope (w1[c, 1] == 0, on everywhere or nowhere) and the columns reversed."""
    table = coords_table(window, df, torch.device("cpu"))
    rows, cols = table.shape[1:3]
    axes = cpb_mod.grid_axes(table)
    assert axes is not None and axes.order is None and axes.a.shape == (rows,) and axes.b.shape == (cols,)
    torch.manual_seed(7)
    lin1, lin2 = torch.nn.Linear(2, 512), torch.nn.Linear(512, 3, bias=False)
    with torch.no_grad():
        lin1.weight[:4, 1] = 0.0                        # no slope along the columns
        lin1.bias[1], lin1.bias[3] = 0.3, -0.3          # on everywhere / nowhere (with w1[c, 0] = 0)
        lin1.weight[1:4:2, 0] = 0.0
        b = table[0, 0, :, 1]
        lin1.weight[4:8] = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 2.0], [0.0, -0.5]])
        lin1.bias[4:8] = torch.stack([-b[5], b[9], -2 * b[cols // 2], 0.5 * b[-3]])  # edges on columns
    w1, b1, w2 = lin1.weight, lin1.bias, lin2.weight
    for tab in (table, table.flip(2).contiguous()):
        t = tab.reshape(-1, 2)
        ax = cpb_mod.grid_axes(tab)
        out = cpb_mod.CpbMlp.apply(t, w1, b1, w2, ax)
        plain = cpb_mod.cpb_mlp(t, w1, b1, w2)
        assert out.shape == plain.shape and (out - plain).abs().max() <= 1e-5
        assert out.is_contiguous()  # (heads, T) as the plain form's: the strided bias plans need it
        with torch.no_grad():
            assert torch.equal(cpb_mod.cpb_values(t, w1, b1, w2, ax), out.detach())
        g = torch.randn_like(out)
        got = torch.autograd.grad((out * g).sum(), [w1, b1, w2])
        ref = torch.autograd.grad((plain * g).sum(), [w1, b1, w2])
        for a, r in zip(got, ref):
            assert (a - r).abs().max() <= 1e-5 * float(r.abs().max())
        # exactly: the tie channels' first-layer gradients (the float64 sums: reference in float64)
        w1d, b1d = w1.detach().double().requires_grad_(), b1.detach().double().requires_grad_()
        ref64 = torch.autograd.grad((cpb_mod.cpb_mlp(t.double(), w1d, b1d, w2.double()) * g.double()).sum(),
                                    [w1d, b1d])
        for a, r in zip(got, ref64):
            assert torch.allclose(a[:8].double(), r[:8], rtol=1e-6, atol=1e-9)


def test_cpb_grid_form_only_for_large_cpu_grids():
    """The grid form runs for grids of ``_GRID_MIN_CELLS`` cells and more on the CPU: not for GRL's
    8x8 windows (15 x 15), tables that are no grid, and off the CPU (here the meta device,
    standing for a GPU), which take the plain MLP, as ``torch.compile`` sees it; the axes are
    found once per table."""
    table = coords_table((64, 64), 1, torch.device("cpu"))
    first = cpb_mod.grid_axes(table)
    info = geometry_mod.grid_axes.cache_info()
    assert cpb_mod.grid_axes(table) is first and cpb_mod.grid_axes(table) is first
    assert geometry_mod.grid_axes.cache_info().hits == info.hits + 2
    assert geometry_mod.grid_axes.cache_info().misses == info.misses
    assert cpb_mod.grid_axes(coords_table((8, 8), 1, torch.device("cpu"))) is None
    side = int(cpb_mod._GRID_MIN_CELLS ** 0.5) + 1
    lin = torch.linspace(-1, 1, side)
    assert cpb_mod.grid_axes(_grid_table(lin, lin)) is not None
    assert cpb_mod.grid_axes(_grid_table(lin[:-2], lin[:-2])) is None  # below the size
    assert cpb_mod.grid_axes(torch.randn(1, side, side, 2)) is None   # no grid
    meta = table.to("meta")
    assert cpb_mod.grid_axes(meta) is None
    t = AffineTransform(2).to("meta")
    lin1, lin2 = t.cpb_mlp[0], t.cpb_mlp[2]
    out = cpb_mod.cpb_values(meta.reshape(-1, 2), lin1.weight, lin1.bias, lin2.weight, cpb_mod.grid_axes(meta))
    assert out.shape == (2, 127 * 127) and out.device.type == "meta"


def test_cpu_training_of_large_windows_keeps_the_table_not_the_bias():
    """CPU training of a 32x32 window (GRL's SR geometry; its position-bias MLP in the grid form):
    the attention keeps the table's values for its backward, not a gathered (heads, N1, N2) bias
    (keys in reverse order: the bias is the table seen through strides)."""
    from grl_plugin.layers.geometry import relative_index
    cpu = torch.device("cpu")
    index, table = relative_index((32, 32), 1, True, cpu), coords_table((32, 32), 1, cpu)
    assert cpb_mod.grid_axes(table) is not None
    torch.manual_seed(8)
    t = AffineTransform(2)
    q, k, v = (torch.randn(1, 2, 1024, 8, requires_grad=True) for _ in range(3))
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        out = cosine_attention(q, k, v, t, table, index)
    assert out.shape == (1, 2, 1024, 8)
    assert 2 * 63 * 63 in sizes and max(sizes) < 2 * 1024 * 1024  # the values, no bias


@pytest.mark.parametrize("table_kind", ["scattered", "window32"])
def test_bias_values_training_paths_agree(table_kind):
    """Training bias values: the MLP Function gives the eval values and the same parameter
    gradients as plain autograd through ``cpb_mlp``; under autocast (training and eval) the
    float32 values rounded once to bf16, with the float32 gradients (the MLP stays in float32,
    no bf16 products); on a random 9 x 9 table and on the 63 x 63 grid of 32x32 windows (the
    grid form)."""
    torch.manual_seed(6)
    t = AffineTransform(2)
    if table_kind == "scattered":
        table = torch.randn(1, 9, 9, 2)
    else:
        table = coords_table((32, 32), 1, torch.device("cpu"))
        assert cpb_mod.grid_axes(table) is not None  # (the grid form)
    with torch.no_grad():
        expected = t.bias_values(table)
    values = t.bias_values(table)
    assert values.grad_fn is not None and torch.allclose(values, expected)
    g = torch.randn_like(values)
    params = list(t.cpb_mlp.parameters())
    got = torch.autograd.grad((values * g).sum(), params)
    plain = (16 * torch.sigmoid(t.cpb_mlp(table.reshape(-1, 2)))).t()
    ref = torch.autograd.grad((plain * g).sum(), params)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = t.bias_values(table)
        with torch.no_grad():
            low_eval = t.bias_values(table)
    assert low.dtype == low_eval.dtype == torch.bfloat16 and low.grad_fn is not None
    assert torch.equal(low, expected.to(torch.bfloat16)) and torch.equal(low_eval, low)
    got = torch.autograd.grad((low.float() * g).sum(), params)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-2 * max(1.0, float(b.abs().max()))  # (g rounded to bf16)


@pytest.mark.parametrize("masked", [False, True])
def test_cosine_attention_fast_grads_match_reference(masked):
    torch.manual_seed(1)
    t = AffineTransform(2)
    with torch.no_grad():
        t.logit_scale.copy_(torch.tensor([1.0, 5.0]).view(2, 1, 1))  # one head above the clamp
    n_w, n1, n2 = 3, 16, 8
    table = torch.randn(1, 5, 5, 2)
    index = torch.randint(0, 25, (n1, n2))
    mask = (torch.rand(n_w, n1, n2) > 0.7).float() * -100 if masked else None
    q = torch.randn(2 * n_w, 2, n1, 4, requires_grad=True)
    k = torch.randn(2 * n_w, 2, n2, 4, requires_grad=True)
    v = torch.randn(2 * n_w, 2, n2, 4, requires_grad=True)
    leaves = [q, k, v] + list(t.parameters())
    outs, grads = [], []
    for impl in ("reference", "sdpa"):
        out = cosine_attention(q, k, v, t, table, index, mask, impl=impl)
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                         leaves))
    assert (outs[0] - outs[1]).abs().max() <= TOL
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= TOL * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("local,upsampler", [(False, "pixelshuffledirect"), (True, "pixelshuffle")])
def test_network_train_step_fast_equals_reference(local, upsampler):
    """32x32, batch 2: 2048 token rows, so the fast path's products go through oneDNN (where
    available) and its maps are channels-last views, GRL-B's conv branch included."""
    kw = dict(img_size=32, embed_dim=16, depths=[4], num_heads_window=[2], num_heads_stripe=[2],
              window_size=8, stripe_size=[16, 16], stripe_shift=True, anchor_window_down_factor=2,
              mlp_ratio=2, upscale=2, upsampler=upsampler, drop_path_rate=0.0, local_connection=local)
    torch.manual_seed(0)
    ref = GRL(attn_impl="reference", **kw).train()
    fast = GRL(attn_impl="sdpa", **kw).train()
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(2, 3, 32, 32)

    def contiguous(m, out):  # (the fast path's channels-last maps stay inside)
        assert out.is_contiguous() or m is ref
    assert_same_training_step(ref, fast, x, TOL, contiguous)


def test_bench_attention_quick_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--quick",
                          "--json", str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "rows.json").read_text())  # what the results files record
    assert {"date", "device", "torch", "threads", "command"} <= set(data["meta"]) and len(data["rows"]) == 1
    out = res.stdout.splitlines()
    headers = [i for i, ln in enumerate(out) if ln.startswith("| config")]
    assert len(headers) == 2, res.stdout  # timings, then peak memory
    tables = [[ln for ln in out[i:] if ln.startswith("| tiny |")][:1] for i in headers]
    assert all(len(t) == 1 for t in tables), res.stdout

    def row_of(k):
        cells = [c.strip() for c in tables[k][0].strip("|").split("|")]
        return dict(zip([c.strip() for c in out[headers[k]].strip("|").split("|")], cells))
    row, mem = row_of(0), row_of(1)
    assert float(mem["train fast/ref"]) > 0
    assert float(mem["train fast_lean/ref"]) > 0 and float(row["train fast_lean/ref"]) > 0
    assert float(row["max abs diff fast-ref"]) <= TOL
    assert float(row["max abs diff fast-off"]) <= TOL
    assert re.fullmatch(r"[\d.]+", row["fwd fast/ref"])


def test_bench_attention_breakdown_smoke():
    """``--breakdown``: attention time is a part of each total, and the floor is the shared rest."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--quick", "--breakdown"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout.splitlines()
    (head,) = [ln for ln in out if ln.startswith("| config")]
    (line,) = [ln for ln in out if ln.startswith("| tiny |")]
    row = dict(zip([c.strip() for c in head.strip("|").split("|")], [c.strip() for c in line.strip("|").split("|")]))
    ref_total, ref_attn = map(float, row["fwd reference total / attention (ms)"].split("/"))
    fast_total, fast_attn = map(float, row["fwd fast total / attention (ms)"].split("/"))
    assert 0 < ref_attn < ref_total and 0 < fast_attn < fast_total

    def close(printed, a, b, err=0.05):
        """``printed`` (2 decimals) is a/b, up to its own rounding and that of the printed ms
        from which a, b come (``err`` each: 0.05 ms, 0.1 for a difference of two)."""
        return abs(float(printed) - a / b) <= 0.005 + a / b * (err / a + err / b) + 1e-9
    assert close(row["fwd fast/ref"], fast_total, ref_total)
    assert close(row["attention fast/ref"], fast_attn, ref_attn)
    assert close(row["rest / reference total"], ref_total - ref_attn, ref_total, err=0.1)
    assert close(row["rest fast/ref"], fast_total - fast_attn, ref_total - ref_attn, err=0.1)


def _explicit(q, k, v, bias, mask):
    """softmax(q k^T + bias [+ mask]) @ v in plain operations (the mask batch-major over windows)."""
    s = q @ k.transpose(-2, -1) + bias
    if mask is not None:
        s = (s.view(-1, mask.shape[0], *s.shape[1:]) + mask[None, :, None]).view(s.shape)
    return s.softmax(-1) @ v


def _real_mask_factors_for_random_mask(mask, n1, n2):
    """``_mask_columns`` for the random test masks (which do not factor by regions): exact
    factors a = [mask, 0], b = [identity, 0] (R = N2 + 1 columns, not a multiple of 8)."""
    if mask is None:
        return None, None
    zero = mask.new_zeros(mask.shape[0], n1, 1)
    eye = torch.eye(n2).expand(mask.shape[0], -1, -1)
    return mask, (torch.cat([mask, zero], -1), torch.cat([eye, zero[:, :1].expand(-1, n2, 1)], -1))


def _attention_inputs(masked, requires_grad=True, seed=1, n2=8, batch=2, n1=16):
    torch.manual_seed(seed)
    t = AffineTransform(2)
    n_w = 3
    table = torch.randn(1, 5, 5, 2)
    index = torch.randint(0, 25, (n1, n2))
    mask = (torch.rand(n_w, n1, n2) > 0.7).float() * -100 if masked else None
    qkv = [torch.randn(batch * n_w, 2, n, 4, requires_grad=requires_grad) for n in (n1, n2, n2)]
    return t, table, index, mask, qkv


@pytest.mark.parametrize("save_probs", [False, True, None])
def test_lean_attention_backward_both_modes_match_autograd(save_probs, monkeypatch):
    """The hand-written backward (recomputing P, keeping it, automatic) equals autograd's reference."""
    use_lean_backward(monkeypatch, save_probs)
    t, table, index, mask, (q, k, v) = _attention_inputs(True)
    leaves = [q, k, v] + list(t.parameters())
    grads = []
    for impl in ("reference", "sdpa"):
        out = cosine_attention(q, k, v, t, table, index, mask, impl=impl)
        grads.append(torch.autograd.grad((out * out.detach().cos()).sum(), leaves))
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= TOL * max(1.0, float(b.abs().max()))


def test_eval_bias_cache_reused_and_invalidated_by_weight_changes():
    t, table, index, _, _ = _attention_inputs(False, requires_grad=False)
    with torch.no_grad():
        first = t.position_bias(table, index)
        assert t.position_bias(table, index) is first  # cached while the weights are unchanged
        assert torch.allclose(first, t.position_bias_reference(table, index))
    with torch.enable_grad():  # training forwards never read or fill the cache
        assert t.position_bias(table, index) is not first
    opt = torch.optim.SGD(t.parameters(), lr=0.5)
    t.position_bias(table, index).sum().backward()
    opt.step()  # in-place update: new parameter versions
    with torch.no_grad():
        after_step = t.position_bias(table, index)
        assert after_step is not first and not torch.allclose(after_step, first)
        assert torch.allclose(after_step, t.position_bias_reference(table, index))
        t.load_state_dict(AffineTransform(2).state_dict())
        after_load = t.position_bias(table, index)
        assert torch.allclose(after_load, t.position_bias_reference(table, index))
        assert not torch.allclose(after_load, after_step)
        other_index = torch.randint(0, 25, (16, 8))
        assert torch.allclose(t.position_bias(table, other_index), t.position_bias_reference(table, other_index))
    configure(t, bias_cache_mib=0)
    with torch.no_grad():
        assert t.position_bias(table, index) is not t.position_bias(table, index)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n2", [8, 40])
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_eval_path_matches_reference(masked, n2, batch, monkeypatch):
    """Eval: few keys (8, GRL's anchors at 8x8 windows) and more (40) go through the fused
    kernel and give the reference's result, for one image (its windows are the kernel's batch)
    and two (the per-window bias + mask broadcast over images)."""
    fused_calls = []
    real = sdpa_mod.fused
    monkeypatch.setattr(sdpa_mod, "fused", lambda *a, **kw: (fused_calls.append(1), real(*a, **kw))[1])
    t, table, index, mask, (q, k, v) = _attention_inputs(masked, requires_grad=False, n2=n2, batch=batch)
    with torch.no_grad():
        ref = cosine_attention(q, k, v, t, table, index, mask, impl="reference")
        fast = cosine_attention(q, k, v, t, table, index, mask, impl="sdpa")
        again = cosine_attention(q, k, v, t, table, index, mask, impl="sdpa")  # from the bias cache
    assert (ref - fast).abs().max() <= TOL and torch.equal(fast, again)
    assert len(fused_calls) == 2
    if masked:  # small windows: the eval cache holds bias + mask, one (nW, heads, N1, N2) tensor
        (entry,) = t._bias_cache.values()
        assert entry[0][2] is mask and entry[2].shape == (mask.shape[0], 2) + tuple(index.shape)


MASK = -100.0


def test_masked_position_bias_is_bias_plus_mask_and_cached():
    t, table, index, mask, _ = _attention_inputs(True, requires_grad=False)
    with torch.no_grad():
        plain = t.position_bias(table, index)
        full = t.position_bias(table, index, mask)
        assert full.shape == (3, 2, 16, 8)
        for w in range(3):  # cell by cell: window w, head h is bias[h] + mask[w]
            for h in range(2):
                assert torch.equal(full[w, h], plain[h] + mask[w])
        assert t.position_bias(table, index, mask) is full  # cached beside the plain bias
        assert t.position_bias(table, index) is plain
        other = mask.clone()  # another mask object: its own entry, never the cached sum
        other_full = t.position_bias(table, index, other)
        assert other_full is not full and torch.equal(other_full, full)
        other[0].fill_(MASK)  # ...so a different mask gives its own sum
        changed = t.position_bias(table, index, other.clone())
        assert torch.equal(changed[0], plain + MASK) and torch.equal(changed[1:], full[1:])


def _normalize_qkv_formula(qkv, scale):
    """The plain formula: split (B', N, 3, heads, d) into heads, F.normalize q and k, q * scale."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1), v


def test_normalize_qkv_equals_normalize_times_scale():
    from grl_plugin.layers.attention import normalize_qkv
    torch.manual_seed(0)
    qkv = torch.randn(5, 7, 3, 3, 4, requires_grad=True)
    with torch.no_grad():
        qkv[0, 0, 1, 2] = 0.0  # a zero key stays zero (F.normalize's eps)
    scale = torch.rand(3, 1, 1) * 10
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out = normalize_qkv(qkv, scale)
        for got, want in zip(out, _normalize_qkv_formula(qkv, scale)):
            assert got.shape == (5, 3, 7, 4) and (got.is_contiguous() or not grad)
            assert torch.allclose(got, want, atol=1e-6)
        assert torch.equal(out[1][0, 2, 0], torch.zeros(4))
    g, = torch.autograd.grad(sum((o * torch.randn_like(o)).sum() for o in normalize_qkv(qkv, scale)), qkv)
    assert torch.isfinite(g).all()


def test_normalize_qkv_gradients_match_autograd_of_the_formula():
    """The hand-written backward (input and logit-scale gradients, any output unused) equals
    autograd through F.normalize, including a zero vector (norm clamped to eps), and passes
    gradcheck."""
    from grl_plugin.layers.attention import normalize_qkv
    torch.manual_seed(0)
    base = torch.randn(3, 5, 3, 2, 6, dtype=torch.float64)
    base[1, 2, 0, 1] = 0.0
    log_scale = torch.randn(2, 1, 1, dtype=torch.float64)
    weights = [torch.randn(3, 2, 5, 6, dtype=torch.float64) for _ in range(3)]
    for used in ((0, 1, 2), (0, 1), (1, 2), (0,)):
        grads = []
        for fn in (normalize_qkv, _normalize_qkv_formula):
            qkv, ls = base.clone().requires_grad_(), log_scale.clone().requires_grad_()
            out = fn(qkv, ls.exp())
            loss = sum((out[i] * weights[i]).sum() for i in used)
            grads.append((out, torch.autograd.grad(loss, (qkv, ls), allow_unused=True)))
        (o1, (g1, s1)), (o2, (g2, s2)) = grads
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(o1, o2))
        assert torch.allclose(g1, g2, atol=1e-10), used
        zero = torch.zeros_like(log_scale)  # (an unused q: None from autograd, zeros here)
        assert torch.allclose(zero if s1 is None else s1, zero if s2 is None else s2, atol=1e-10), used
        assert torch.allclose(g1[1, 2, 0, 1], g2[1, 2, 0, 1], rtol=1e-12, atol=0)  # w * scale / eps
    small = (torch.randn(2, 3, 3, 2, 4, dtype=torch.float64, requires_grad=True),
             torch.rand(2, 1, 1, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda x, s: normalize_qkv(x, s + 0.5), small)


def test_normalize_qkv_keeps_no_reference_to_its_input():
    """With autograd, what it saves for the backward shares no storage with its input (a view
    of the whole gathered QKV buffer in the window/stripe modules); without autograd it never
    writes into its input."""
    from grl_plugin.layers.attention import normalize_qkv
    buf = torch.randn(4, 8, 3, 2, 5, requires_grad=True) * 1.0  # non-leaf, as in the modules
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        out = normalize_qkv(buf, torch.full((2, 1, 1), 3.0))
    assert saved and buf.untyped_storage().data_ptr() not in saved
    assert out[0].untyped_storage().data_ptr() in saved  # the output is what it keeps
    x = torch.randn(4, 8, 3, 2, 5)
    before = x.clone()
    with torch.no_grad():
        q, k, v = normalize_qkv(x, torch.ones(2, 1, 1))
    assert torch.equal(x, before) and torch.equal(v, x[:, :, 2].transpose(1, 2))
    assert torch.allclose(k.norm(dim=-1), torch.ones(4, 2, 8))


@pytest.mark.parametrize("size,part,shift", [((16, 24), (8, 8), (4, 4)), ((16, 24), (4, 12), (0, 6)),
                                             ((8, 8), (8, 8), (0, 0)), ((12, 8), (6, 2), (3, 1))])
def test_partition_order_is_roll_then_partition(size, part, shift):
    """The fast path's token gather equals the official roll + window partition cell by cell,
    and its inverse equals window reverse + roll back."""
    from grl_plugin.layers.geometry import partition_order
    from oracle.official_grl import window_partition, window_reverse
    order, inverse = partition_order(size, part, shift, torch.device("cpu"))
    x = torch.randn(2, size[0], size[1], 3)
    rolled = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = window_partition(rolled, part)  # (2 nW, N, 3)
    gathered = x.reshape(2, -1, 3).index_select(1, order)
    assert torch.equal(gathered.view_as(windows), windows)
    back = torch.roll(window_reverse(windows, part, size), shifts=shift, dims=(1, 2))
    assert torch.equal(gathered.index_select(1, inverse).view_as(x), back) and torch.equal(back, x)


def test_permute_tokens_gradient():
    from grl_plugin.layers.geometry import partition_order
    from grl_plugin.layers.window_attn import permute_tokens
    order, inverse = partition_order((8, 12), (4, 4), (2, 2), torch.device("cpu"))
    x = torch.randn(2, 96, 5, requires_grad=True)
    w = torch.randn(2, 96, 5)
    g_fast, = torch.autograd.grad((permute_tokens(x, order) * w).sum(), x)
    g_ref, = torch.autograd.grad((x[:, order] * w).sum(), x)
    assert torch.equal(g_fast, g_ref)


def test_automatic_backward_keeps_probabilities_only_when_small(monkeypatch):
    """Automatic mode: P kept for 8x8 windows (64 x 64 per head, d 32), recomputed for 32x32
    windows (1024 x 1024, d 16) and 64x64 stripes against 16x16 anchors (4096 x 256, d 16)."""
    e = torch.empty
    assert cpu_mod._keep_probs(e(1, 2, 64, 32), e(1, 2, 64, 32), e(1, 2, 64, 32), None)
    assert not cpu_mod._keep_probs(e(1, 2, 1024, 16), e(1, 2, 1024, 16), e(1, 2, 1024, 16), None)
    assert not cpu_mod._keep_probs(e(1, 2, 4096, 16), e(1, 2, 256, 16), e(1, 2, 256, 16), None)
    for forced in (True, False):
        assert cpu_mod._keep_probs(e(1, 2, 64, 32), e(1, 2, 64, 32), e(1, 2, 64, 32), not forced) is forced


def test_cpu_softmax_floor_matches_softmax_and_leaves_no_subnormals():
    """The fast path's in-place softmax (plain, and exp(s - lse) from the forward's row
    log-sum-exp) equals torch.softmax to float32 resolution on logits with -100 masks, and
    writes no subnormal float (the values that make x86 arithmetic slow)."""
    torch.manual_seed(0)
    s = torch.randn(3, 2, 64, 48) * 8 + (torch.rand(3, 1, 64, 48) > 0.5).float() * -100
    ref = torch.softmax(s, -1)
    tiny = torch.finfo(torch.float32).tiny
    assert ((ref > 0) & (ref < tiny)).any()  # softmax itself writes subnormals here
    for p in (cpu_mod._softmax_(s.clone()), cpu_mod._probs_(s - torch.logsumexp(s, -1, keepdim=True))):
        assert (p - ref).abs().max() <= 4e-6  # float32 rounding of exp at logits up to ~40
        assert not ((p > 0) & (p < tiny)).any()
        assert float(p.min()) >= 0.99e-20 / s.shape[-1]  # the floor, divided by a row sum <= N2


@pytest.mark.parametrize("save_probs", [False, True])
@pytest.mark.parametrize("columns", [True, False])
def test_region_mask_as_extra_columns_matches_reference_eval_and_training(save_probs, columns, monkeypatch):
    """A real shifted-window mask (4x4 windows of 8x8 pixels): only the last row and column of
    windows mix regions (up to 4 per window). The fast path adds it through 4 extra q/k
    columns whose product is the mask exactly, runs ONE kernel call with the bias shared by all
    windows (no per-window bias + mask), and gives the reference's results and gradients.
    Below ``_MASK_COLUMNS_MIN_PAIRS`` (as for these 64-token windows by default) it forms
    bias + mask for all windows, also in one call."""
    from grl_plugin.layers.geometry import coords_table, mask_factors, masked_windows, relative_index, window_mask
    use_lean_backward(monkeypatch, save_probs)
    if columns:
        monkeypatch.setattr(sdpa_mod, "_MASK_COLUMNS_MIN_PAIRS", 64 * 64)
    cpu = torch.device("cpu")
    mask = window_mask((32, 32), 8, 4, cpu)
    masked = masked_windows(mask)
    plain = torch.tensor([w for w in range(16) if w not in masked.tolist()])
    assert masked.tolist() == [3, 7, 11, 12, 13, 14, 15] and mask[masked].flatten(1).eq(-100).any(1).all()
    assert not mask[plain].any() and masked_windows(mask) is masked  # cached
    a, b = mask_factors(mask)
    assert a.shape == (16, 64, 4) and b.shape == (16, 64, 4) and mask_factors(mask)[0] is a
    assert torch.equal(a @ b.transpose(1, 2), mask)
    assert not a[plain].any() and set(a.unique().tolist()) == {0.0, -100.0}
    assert torch.equal(b[masked].sum(-1), torch.ones(7, 64)) and not b[plain].any()  # one group per key
    n, d = 64, 4
    masks_seen = []
    real = sdpa_mod.run

    def spy(q, k, v, bias, mask, kernel, *rest):  # the additive masks the kernel receives
        return real(q, k, v, bias, mask, lambda *a: (masks_seen.append(a[3]), kernel(*a))[1], *rest)
    monkeypatch.setattr(sdpa_mod, "run", spy)
    torch.manual_seed(3)
    t = AffineTransform(2)
    table, index = coords_table((8, 8), 1, cpu), relative_index((8, 8), 1, True, cpu)
    q, k, v = (torch.randn(2 * 16, 2, n, d, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        ref = cosine_attention(q, k, v, t, table, index, mask, impl="reference")
        assert (cosine_attention(q, k, v, t, table, index, mask, impl="sdpa") - ref).abs().max() <= TOL
    leaves = [q, k, v] + list(t.parameters())
    grads = [torch.autograd.grad(cosine_attention(q, k, v, t, table, index, mask, impl=impl).square().sum(), leaves)
             for impl in ("reference", "sdpa")]
    for a_, b_ in zip(*grads):
        assert (a_ - b_).abs().max() <= TOL * max(1.0, float(b_.abs().max()))
    # one kernel call per masked attention (eval, and the lean training forward), and what it
    # gets as its mask is the (heads, N1, N2) bias broadcast over all windows: stride 0
    assert len(masks_seen) == (1 if save_probs else 2)
    for m in masks_seen:
        if columns:
            assert m.shape == (32, 2, n, n) and m.stride(0) == 0
        else:  # windows moved into the head axis, bias + mask formed for each
            assert m.shape == (2, 16 * 2, n, n) and m.stride(0) == 0 and m.stride(1) == n * n


def test_mask_factors_of_all_grl_masks_and_a_mask_that_does_not_factor():
    """Window and stripe masks of the SR and model-YAML geometries factor with at most 4
    columns, exactly; a mask whose keys are not grouped by regions is refused (None)."""
    from grl_plugin.layers.geometry import mask_factors, stripe_info, stripe_masks, window_mask
    cpu = torch.device("cpu")
    masks = [window_mask((64, 96), 32, 16, cpu), window_mask((32, 40), 8, 4, cpu)]
    for size, stripe, groups in (((128, 64), (64, 64), (None, None)), ((64, 32), (8, None), (None, 4))):
        st, sh = stripe_info(stripe, groups, True, size)
        masks += list(stripe_masks(size, st, sh, 4, cpu))
    for m in masks:
        a, b = mask_factors(m)
        assert a.shape[-1] <= 4 and torch.equal(a @ b.transpose(1, 2), m)
    odd = torch.zeros(2, 3, 3)
    odd[1] = torch.tensor([[0.0, -100, 0], [-100, 0, 0], [0, 0, -100]])
    assert mask_factors(odd) is None
    torch.manual_seed(0)
    t = AffineTransform(2)
    table, index = torch.randn(1, 3, 3, 2), torch.randint(0, 9, (3, 3))
    q, k, v = (torch.randn(4, 2, 3, 4) for _ in range(3))
    with torch.no_grad():  # the fused path forms bias + mask instead
        ref = cosine_attention(q, k, v, t, table, index, odd, impl="reference")
        fast = sdpa_mod.fused(F.normalize(q, dim=-1) * t.scale(), F.normalize(k, dim=-1), v,
                                    t.position_bias(table, index), odd)
    assert (ref - fast).abs().max() <= TOL


@pytest.mark.parametrize("budget_mib", [None, 0.0])
def test_eval_bias_cache_keeps_autocast_biases_apart(budget_mib, monkeypatch):
    """A position bias made under bf16 autocast (16-bit values) is cached apart from the float32
    one: a float32 eval forward after an autocast one gives the reference's output, not one
    with bf16-rounded biases; for the full bias (within the budget) and the grouped runs
    (budget 0, large windows forced)."""
    from grl_plugin.layers.geometry import relative_index
    cpu = torch.device("cpu")
    monkeypatch.setattr(bias_mod, "_LARGE_INDEX_MIN", 1)
    torch.manual_seed(6)
    index, table = relative_index((8, 8), 1, True, cpu), coords_table((8, 8), 1, cpu)
    q, k, v = (torch.randn(4, 2, 64, 16) for _ in range(3))
    t = AffineTransform(2).eval()
    if budget_mib is not None:  # room for no bias (one byte): the grouped runs only
        configure(t, bias_cache_mib=budget_mib + 2 ** -20)
    with torch.no_grad():
        want = cosine_attention(q, k, v, t, table, index, impl="reference")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = cosine_attention(q, k, v, t, table, index)
        got = cosine_attention(q, k, v, t, table, index)
    assert (low.float() - want).abs().max() > 10 * TOL  # bf16 is visibly coarser...
    assert (got - want).abs().max() <= TOL  # ...and did not leak into float32
    assert len(t._bias_cache) == 2


def test_eval_bias_cache_budget_and_release():
    """The eval bias caches of the modules sharing a budget stay within it (modules beyond it
    recompute, with the same values), switching a module to training frees its entries, and a
    module with another budget (another network) is not affected."""
    t1, table, index, _, _ = _attention_inputs(False, requires_grad=False)
    t2, other = AffineTransform(2), AffineTransform(2)
    one = 2 * index.numel() * 4  # (heads, N1, N2) float32
    pair = configure(torch.nn.ModuleList([t1, t2]), bias_cache_mib=1.5 * one / 2 ** 20)  # room for one entry
    configure(other, bias_cache_mib=1.5 * one / 2 ** 20)
    assert t1.bias_budget is t2.bias_budget is not other.bias_budget
    with torch.no_grad():
        b1, b2 = t1.position_bias(table, index), t2.position_bias(table, index)
        assert t1.position_bias(table, index) is b1  # cached
        assert t2.position_bias(table, index) is not b2  # over budget: recomputed...
        assert torch.allclose(t2.position_bias(table, index), t2.position_bias_reference(table, index))
        assert other.position_bias(table, index) is other.position_bias(table, index)  # its own budget
        assert attention_mod.bias_cache_bytes(pair) == one == t1.bias_budget.used()
        t1.train()
        assert attention_mod.bias_cache_bytes(pair) == 0
        t1.eval()
        assert t2.position_bias(table, index) is t2.position_bias(table, index)  # ...until room


def test_lean_attention_value_head_dim_differs(monkeypatch):
    """v with another head dim than q and k (the fused kernel needs them equal): the lean path
    forced to recompute P keeps P instead, with the reference's results and gradients."""
    use_lean_backward(monkeypatch, False)
    t, table, index, mask, (q, k, v) = _attention_inputs(True)
    v = v[..., :-1].detach().requires_grad_()
    leaves = [q, k, v] + list(t.parameters())
    outs = [cosine_attention(q, k, v, t, table, index, mask, impl=impl) for impl in ("reference", "sdpa")]
    assert outs[1].shape == v.shape[:2] + (q.shape[2], v.shape[-1])
    assert (outs[0] - outs[1]).abs().max() <= TOL
    grads = [torch.autograd.grad(o.square().sum(), leaves) for o in outs]
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= TOL * max(1.0, float(b.abs().max()))


def test_reversed_keys_plan_is_the_index_as_strides():
    """With the keys in reverse order, GRL's window and stripe indices (SR and model-YAML
    geometries, both stripe directions, non-square windows) are the table seen through strides
    (width, 1, width, 1) over (qy, qx, ky, kx): the plan's view of the cell numbers equals
    ``index.flip(-1)`` cell by cell, its view of table values the gathered bias with the keys
    reversed; an index of no such form gets no plan."""
    from grl_plugin.layers.geometry import coords_table, relative_index, reversed_keys_plan
    cpu = torch.device("cpu")
    cases = [((32, 32), 1, True), ((64, 64), 4, True), ((64, 64), 4, False), ((64, 32), 4, True),
             ((8, 8), 1, True), ((8, 16), 4, False), ((12, 24), 4, True)]
    for window, df, w2a in cases:
        index, table = relative_index(window, df, w2a, cpu), coords_table(window, df, cpu)
        cells = table.shape[1] * table.shape[2]
        plan = reversed_keys_plan(index, table.shape[2])
        anchors = (window[0] // df, window[1] // df)
        assert plan[1] == (window + anchors if w2a else anchors + window)
        assert torch.equal(plan[3], index.flip(-1))
        numbers = bias_mod.strided_bias(torch.arange(cells)[None], plan)
        assert torch.equal(numbers.reshape(index.shape), index.flip(-1))
        values = torch.randn(3, cells)
        assert torch.equal(bias_mod.strided_bias(values, plan).reshape(3, *index.shape),
                           bias_mod.gather_bias(values, index).flip(-1))
    index = relative_index((8, 8), 1, True, cpu)
    assert reversed_keys_plan(index[torch.randperm(64)], 15) is None  # queries out of order
    assert reversed_keys_plan(index, 16) is None  # not this table's width


def test_cpu_kernels_take_the_true_head_dim_and_the_mask_columns(monkeypatch):
    """The CPU kernels get q, k, v at their own head dim, widened only by a region mask's q/k
    columns (28 + 4 -> 32, 30 + 4 -> 34), and give the explicit attention's output in the
    plain, masked and grouped calls."""
    from grl_plugin.layers.geometry import coords_table, relative_index, reversed_keys_plan, window_mask
    cpu = torch.device("cpu")
    monkeypatch.setattr(sdpa_mod, "_MASK_COLUMNS_MIN_PAIRS", 1)  # masks as columns at 8x8 too
    widths = []
    real_flash, real_sdpa = cpu_mod._FLASH_CPU, F.scaled_dot_product_attention
    monkeypatch.setattr(cpu_mod, "_FLASH_CPU", lambda q, *a, **kw: widths.append(q.shape[-1]) or real_flash(q, *a, **kw))
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: widths.append(q.shape[-1]) or real_sdpa(q, *a, **kw))
    torch.manual_seed(4)
    index, table = relative_index((8, 8), 1, True, cpu), coords_table((8, 8), 1, cpu)
    plan = reversed_keys_plan(index, table.shape[2])
    values = torch.rand(2, table.shape[1] * table.shape[2]) * 16
    bias = bias_mod.gather_bias(values, index)
    mask = window_mask((16, 16), 8, 4, cpu)
    for d, masked, width in [(30, False, 30), (24, False, 24), (28, True, 32), (30, True, 34), (26, True, 30)]:
        m = mask if masked else None
        q, k, v = (torch.randn(8, 2, 64, d) for _ in range(3))
        want = _explicit(q, k, v, bias, m)
        got = [sdpa_mod.fused(q, k, v, bias, m), cpu_mod._fused_with_lse(q, k, v, bias, m)[0],
               cpu_mod._grouped_flash(q, k.flip(-2), v.flip(-2), bias_mod.grouped_bias(values, plan),
                                      None if m is None else m.flip(-1))]
        assert widths == [width] * (2 + 8), (d, masked, widths)  # (the grouped call: one per window)
        widths.clear()
        for out in got:
            assert out.shape == want.shape and (out - want).abs().max() <= 1e-5


@pytest.mark.skipif(cpu_mod._FLASH_CPU is None, reason="needs the fused CPU kernel")
def test_grouped_flash_equals_attention_with_the_gathered_bias(monkeypatch):
    """The fused kernel called per window with queries grouped by grid column and the bias read
    from the (heads, Qx, Qy + Ky - 1, Kx) runs (keys reversed) gives softmax(q k^T + bias
    [+ mask]) v with the gathered bias: windows and both stripe directions, non-square grids,
    several windows with a shifted-window mask (as q/k columns), v's head dim below q's;
    ``None`` where a mask does not factor or v's head dim is larger. The runs are the table's
    cells: the bias row of query (qy, qx) is ``runs[:, qx, qy:qy + Ky].flatten()``."""
    from grl_plugin.layers.geometry import coords_table, relative_index, reversed_keys_plan, window_mask
    cpu = torch.device("cpu")
    monkeypatch.setattr(sdpa_mod, "_MASK_COLUMNS_MIN_PAIRS", 1)  # masks as columns at 8x8 too
    torch.manual_seed(5)
    cases = [((8, 8), 1, True, None), ((16, 8), 4, True, None), ((16, 8), 4, False, None),
             ((12, 24), 4, True, None), ((8, 8), 1, True, window_mask((16, 16), 8, 4, cpu))]
    for window, df, w2a, mask in cases:
        index, table = relative_index(window, df, w2a, cpu), coords_table(window, df, cpu)
        width, (n1, n2) = table.shape[2], index.shape
        plan = reversed_keys_plan(index, width)
        cells = table.shape[1] * width
        runs = bias_mod.grouped_bias(torch.arange(cells)[None], plan)
        qy, qx, ky, kx = plan[1]
        assert runs.shape == (1, qx, qy + ky - 1, kx)
        for y in range(qy):
            for x in range(qx):
                assert torch.equal(runs[0, x, y:y + ky].flatten(), index[y * qx + x].flip(-1))
        values = torch.rand(3, cells) * 16
        bias = bias_mod.gather_bias(values, index)
        n = 8 if mask is not None else 2
        q, k = torch.randn(n, 3, n1, 6), torch.randn(n, 3, n2, 6)
        for dv in (6, 5):
            v = torch.randn(n, 3, n2, dv)
            want = _explicit(q, k, v, bias, mask)
            got = cpu_mod._grouped_flash(q, k.flip(-2), v.flip(-2), bias_mod.grouped_bias(values, plan),
                                               None if mask is None else mask.flip(-1))
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-5
        assert cpu_mod._grouped_flash(q, k, torch.randn(n, 3, n2, 7), bias_mod.grouped_bias(values, plan),
                                            None) is None
    full = torch.where(torch.rand(4, n1, n2) < 0.5, 0.0, -100.0)  # random: no region structure
    assert cpu_mod._grouped_flash(q, k, v, bias_mod.grouped_bias(values, plan), full) is None


@pytest.mark.skipif(cpu_mod._FLASH_CPU is None, reason="needs the fused CPU kernel")
@pytest.mark.parametrize("masked", [False, True])
def test_eval_beyond_the_bias_budget_takes_the_grouped_kernel(masked, monkeypatch):
    """Eval of large windows (forced: 8x8) whose bias does not fit the cache budget: the
    grouped kernel with its runs cached (one 4-D entry, a quarter of the bias's size here),
    the reference's output; within the budget the (heads, N1, N2) bias is cached and the
    grouped kernel unused; with the cache off, the runs are formed at each call and nothing is
    cached. Also with a shifted-window mask."""
    from grl_plugin.layers.geometry import relative_index, window_mask
    cpu = torch.device("cpu")
    monkeypatch.setattr(bias_mod, "_LARGE_INDEX_MIN", 1)
    monkeypatch.setattr(sdpa_mod, "_MASK_COLUMNS_MIN_PAIRS", 1)
    calls = []
    real = cpu_mod._grouped_flash
    monkeypatch.setattr(cpu_mod, "_grouped_flash", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(2)
    index, table = relative_index((8, 8), 1, True, cpu), coords_table((8, 8), 1, cpu)
    mask = window_mask((16, 16), 8, 4, cpu) if masked else None
    q, k, v = (torch.randn(8, 2, 64, 6) for _ in range(3))
    for mib, form in ((2 ** -20, 4), (1, 3), (0, None)):  # one byte: no room; 1 MiB; no caching
        t = configure(AffineTransform(2).eval(), bias_cache_mib=mib)
        with torch.no_grad():
            want = cosine_attention(q, k, v, t, table, index, mask, impl="reference")
            for _ in range(2):
                got = cosine_attention(q, k, v, t, table, index, mask)
                assert (got - want).abs().max() <= TOL
        entries = [e[2] for e in t._bias_cache.values()]
        assert [e.dim() for e in entries] == ([] if form is None else [form])
        assert len(calls) == (0 if form == 3 else 2)
        if form == 4:
            assert entries[0].numel() == 2 * 8 * 15 * 8  # (heads, Qx, Qy + Ky - 1, Kx)
            with torch.no_grad():  # asked without a plan: the plain bias, not the cached runs
                assert t.position_bias(table, index).shape == (2, 64, 64)
        calls.clear()


@pytest.mark.skipif(cpu_mod._FLASH_CPU is None, reason="needs the fused CPU kernel")
def test_eval_beyond_the_budget_with_a_mask_that_does_not_factor(monkeypatch):
    """Where the grouped kernel cannot take the mask (it does not factor into q/k columns), the
    eval path (beyond the budget) falls back to bias + mask, with the reference's output; only
    the grouped runs stay cached."""
    from grl_plugin.layers.geometry import relative_index
    cpu = torch.device("cpu")
    monkeypatch.setattr(bias_mod, "_LARGE_INDEX_MIN", 1)
    monkeypatch.setattr(sdpa_mod, "_MASK_COLUMNS_MIN_PAIRS", 1)
    torch.manual_seed(7)
    index, table = relative_index((8, 8), 1, True, cpu), coords_table((8, 8), 1, cpu)
    mask = torch.where(torch.rand(4, 64, 64) < 0.5, 0.0, -100.0)  # random: no region structure
    q, k, v = (torch.randn(8, 2, 64, 6) for _ in range(3))
    t = configure(AffineTransform(2).eval(), bias_cache_mib=2 ** -20)  # no room for a bias
    with torch.no_grad():
        want = cosine_attention(q, k, v, t, table, index, mask, impl="reference")
        for _ in range(2):
            assert (cosine_attention(q, k, v, t, table, index, mask) - want).abs().max() <= TOL
    shapes = sorted(tuple(e[2].shape) for e in t._bias_cache.values())
    assert shapes == [(2, 8, 15, 8)]


@pytest.mark.parametrize("save_probs", [False, True, None])
@pytest.mark.parametrize("masked", [False, True])
def test_lean_attention_with_reversed_keys_matches_reference(save_probs, masked, monkeypatch):
    """Where the index has the strided form (forced here for 8x8 windows and a stripe-to-anchor
    index, which are below the size it is used from), the CPU training path takes the keys in
    reverse order: gradients of q, k, v and the bias MLP equal the reference's in every
    backward mode (row blocks of whole query rows forced), with a shifted-window mask, and the
    (heads, N1, N2) bias is not kept for the backward (without the plan it is)."""
    from grl_plugin.layers.geometry import coords_table, relative_index, window_mask
    cpu = torch.device("cpu")
    use_lean_backward(monkeypatch, save_probs)
    monkeypatch.setattr(cpu_mod, "_BACKWARD_BLOCK_BYTES", 1)
    torch.manual_seed(3)
    for window, df, w2a in [((8, 8), 1, True), ((16, 8), 4, True)]:
        t = AffineTransform(2)
        index, table = relative_index(window, df, w2a, cpu), coords_table(window, df, cpu)
        n1, n2 = index.shape
        mask = window_mask((16, 16), 8, 4, cpu) if masked and n1 == n2 else None
        n_w = 4 if mask is not None else 1
        q, k, v = (torch.randn(2 * n_w, 2, n, 4, requires_grad=True) for n in (n1, n2, n2))
        leaves = [q, k, v] + list(t.parameters())
        grads, kept = [], []
        for minimum in (1, 1 << 30):  # the plan's size threshold: taken, not taken
            monkeypatch.setattr(bias_mod, "_LARGE_INDEX_MIN", minimum)
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(tuple(x.shape)) or x,
                                                          lambda x: x):
                out = cosine_attention(q, k, v, t, table, index, mask)
            kept.append((2, n1, n2) in saved)
            grads.append(torch.autograd.grad((out * out.detach().cos()).sum(), leaves))
        assert kept == [False, True]
        ref = cosine_attention(q, k, v, t, table, index, mask, impl="reference")
        want = torch.autograd.grad((ref * ref.detach().cos()).sum(), leaves)
        for got in grads:
            for a, b in zip(got, want):
                assert (a - b).abs().max() <= TOL * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("mode", [None, True, False])
def test_blocks_recompute_mlp_and_projection_unless_told_to_keep(mode, monkeypatch):
    """The MLP and the output projection, each with its post-norm, run under checkpointing
    (only their input kept) in blocks with large windows (16x16, whose attention recomputes
    its probabilities) and small ones (4x4), except with lean_backward False. The gradients
    are the reference block's either way."""
    from grl_plugin.layers import GRLBlock, configure
    from grl_plugin.layers import block as block_mod
    calls = []
    real = block_mod.checkpoint
    monkeypatch.setattr(block_mod, "checkpoint", lambda fn, *a, **kw: calls.append(fn.__name__) or real(fn, *a, **kw))
    dim = 16
    for window in (16, 4):
        torch.manual_seed(0)
        fast = configure(GRLBlock(dim, 2, 2, window_size=window, stripe_size=(16, 16), anchor_window_down_factor=4),
                         lean_backward=mode)
        ref = GRLBlock(dim, 2, 2, window_size=window, stripe_size=(16, 16), anchor_window_down_factor=4,
                       attn_impl="reference")
        ref.load_state_dict(fast.state_dict())
        x = torch.randn(1, 32 * 32, dim, requires_grad=True)
        calls.clear()
        out = fast(x, (32, 32))
        assert calls == ["_project", "_layers"] * (mode is not False)
        want = torch.autograd.grad(ref(x, (32, 32)).square().sum(), [x, *ref.parameters()])
        got = torch.autograd.grad(out.square().sum(), [x, *fast.parameters()])
        for a_, b_ in zip(got, want):
            assert (a_ - b_).abs().max() <= TOL * max(1.0, float(b_.abs().max()))


@pytest.mark.parametrize("mode", [None, True, False])
def test_lean_mlp_matches_plain_mlp_and_keeps_less(mode, monkeypatch):
    """The lean MLP (training path) gives the plain MLP's output and gradients (input, both
    weights and biases) and keeps only its input for the backward, or with
    lean_backward=False what the plain one keeps; the reference path of GRLBlock uses the
    plain one, and GRL.set_attn_impl switches it."""
    from grl_plugin.layers import GRLBlock, Mlp, configure
    keep_hidden = mode is False
    torch.manual_seed(0)
    lean, plain = configure(Mlp(6, 10).double(), lean_backward=mode), Mlp(6, 10, lean=False).double()
    plain.load_state_dict(lean.state_dict())
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 7, 6, dtype=torch.float64)
    grads = []
    for m in (lean, plain):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = m(x)
        grads.append((out, torch.autograd.grad((out * w).sum(), [x, *m.parameters()]), saved))
    (o1, g1, s1), (o2, g2, s2) = grads
    assert torch.allclose(o1, o2, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g1, g2))
    weights = {p.untyped_storage().data_ptr() for m in (lean, plain) for p in m.parameters()}

    def activations(saved):  # values kept for the backward, weights left out, shared storage once
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        return sum(n for ptr, n in storages.items() if ptr not in weights) // 8

    assert activations(s1) == 2 * 7 * (6 + 10 + 10 if keep_hidden else 6)
    assert activations(s2) == 2 * 7 * (6 + 10 + 10)
    norm = torch.nn.LayerNorm(6).double()
    assert torch.autograd.gradcheck(lambda t: lean(t, norm), (x.detach().requires_grad_(),))
    assert GRLBlock(16, 2, 2, attn_impl="reference").mlp.lean is False
    assert GRLBlock(16, 2, 2).mlp.lean is True
    net = GRL(img_size=16, embed_dim=16, depths=[2], num_heads_window=[2], num_heads_stripe=[2],
              window_size=4, stripe_size=[8, 8], upscale=1, upsampler="")
    assert [m.lean for m in net.modules() if isinstance(m, Mlp)] == [True, True]
    assert not net.set_attn_impl("reference").fast
    assert [m.lean for m in net.modules() if isinstance(m, Mlp)] == [False, False]
    assert net.set_attn_impl("sdpa").fast and all(m.lean for m in net.modules() if isinstance(m, Mlp))


@pytest.mark.parametrize("mode", [None, True, False])
def test_post_norms_recompute_their_input(mode, monkeypatch):
    """In training on the fast path the block's two post-norms keep only their row statistics,
    not their inputs (the attention's output projection and fc2's output, recomputed in the
    backward), nor the MLP's hidden layers -- B x L x (2 C + 2 hidden + 4) values fewer per block --
    except with lean_backward=False; output and every gradient equal those of the plain layers."""
    from grl_plugin.layers import GRLBlock, configure
    from grl_plugin.layers import block as block_mod
    torch.manual_seed(0)
    blk = configure(GRLBlock(16, 2, 2, window_size=4, stripe_size=(8, 8), anchor_window_down_factor=2,
                             local_connection=True).double().train(), lean_backward=mode)
    for norm in (blk.norm1, blk.norm2):  # not the initial 1 / 0
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 16 * 16, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 16 * 16, 16, dtype=torch.float64)
    params = dict(blk.named_parameters())
    weights = {p.untyped_storage().data_ptr() for p in params.values()}
    runs = []
    real = block_mod._recompute
    for fused in (True, False):
        monkeypatch.setattr(block_mod, "_recompute", real if fused else (lambda *a: False))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = blk(x, (16, 16))
        grads = torch.autograd.grad((out * w).sum(), [x, *params.values()])
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        runs.append((out, grads, sum(n for p, n in storages.items() if p not in weights) // 8))
    (o1, g1, n1), (o2, g2, n2) = runs
    assert torch.allclose(o1, o2, rtol=0, atol=1e-12)
    for name, a, b in zip(["x", *params], g1, g2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-11), name
    hidden = blk.mlp.fc1.out_features
    # per token: both norms' inputs (2 C) and row statistics (2 x mean, 1/std), fc1's output and the GELU's
    assert n2 - n1 == (0 if mode is False else 2 * 16 * 16 * (2 * 16 + 4 + 2 * hidden))


@pytest.mark.parametrize("mode", [None, False])
def test_lean_mlp_float32_matches_plain(mode, monkeypatch):
    """The lean MLP's hand-written backward (float32, 2048 rows), fc1 recomputed (default) or kept."""
    from grl_plugin.layers import Mlp, configure
    torch.manual_seed(0)
    lean, plain = configure(Mlp(24, 48), lean_backward=mode), Mlp(24, 48, lean=False)
    plain.load_state_dict(lean.state_dict())
    x = torch.randn(2, 1024, 24, requires_grad=True)
    w = torch.randn(2, 1024, 24)
    res = []
    for m in (lean, plain):
        out = m(x)
        res.append((out, torch.autograd.grad((out * w).sum(), [x, *m.parameters()])))
    (o1, g1), (o2, g2) = res
    assert (o1 - o2).abs().max() <= 1e-5 * o2.abs().max()
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("save_probs", [False, True, None])
def test_lean_attention_keeps_the_output_only_when_it_recomputes_probabilities(save_probs, monkeypatch):
    """Recomputing P automatically (large windows), the backward uses the output for
    rowsum(dO * O); keeping P, or for the least memory (lean_backward=True, P always
    recomputed), it takes that row term from P * dP and the output is not kept. Gradients
    equal autograd's through the reference path in every mode."""
    use_lean_backward(monkeypatch, save_probs)
    monkeypatch.setattr(cpu_mod, "_keep_probs", lambda *a: save_probs is True)
    t, table, index, mask, (q, k, v) = _attention_inputs(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.untyped_storage().data_ptr()) or x,
                                                  lambda x: x):
        out = cosine_attention(q, k, v, t, table, index, mask)
    assert (out.untyped_storage().data_ptr() in saved) is (save_probs is None)
    leaves = [q, k, v] + list(t.parameters())
    got = torch.autograd.grad((out * out.detach().cos()).sum(), leaves)
    ref = cosine_attention(q, k, v, t, table, index, mask, impl="reference")
    want = torch.autograd.grad((ref * ref.detach().cos()).sum(), leaves)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= TOL * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("save_probs", [False, True, None])
@pytest.mark.parametrize("columns", [False, True])
def test_lean_attention_backward_in_row_blocks_matches_reference(save_probs, columns, monkeypatch):
    """Windows whose logits are larger than ``_BACKWARD_BLOCK_BYTES`` go through the CPU
    backward one window and a block of query rows at a time (forced here: 6 windows of 72 rows
    in blocks of 16, the last one 8; every block's probabilities recomputed, or sliced from the
    kept P): gradients equal the reference's in every mode, with the region mask added per
    block or entering as extra q/k columns, and with only some inputs needing a gradient."""
    use_lean_backward(monkeypatch, save_probs)
    monkeypatch.setattr(cpu_mod, "_keep_probs", lambda *a: save_probs is True)
    monkeypatch.setattr(cpu_mod, "_BACKWARD_BLOCK_BYTES", 1)
    if columns:
        monkeypatch.setattr(sdpa_mod, "_MASK_COLUMNS_MIN_PAIRS", 1)
        monkeypatch.setattr(sdpa_mod, "mask_columns", _real_mask_factors_for_random_mask)
    blocks = []
    real = cpu_mod._logits_block
    monkeypatch.setattr(cpu_mod, "_logits_block",
                        lambda *a: (blocks.append((a[0].shape[0], a[-1])), real(*a))[1])
    t, table, index, mask, (q, k, v) = _attention_inputs(True, n1=72, n2=24)
    assert cpu_mod._block_rows(2 * 24 * 4, 72) == 16
    assert cpu_mod._backward_blocks(q.shape[0], 2 * 24 * 4, 72, 16, 3) == (1, 16)
    params = list(t.parameters())
    for leaves in ([q, k, v] + params, [k] + params, [q, v]):
        out = cosine_attention(q, k, v, t, table, index, mask)
        blocks.clear()
        got = torch.autograd.grad((out * out.detach().cos()).sum(), leaves)
        if save_probs is not True:  # P recomputed block by block
            assert [(n, b.start, b.stop) for n, b in blocks] == [
                (1, i, i + 16) for _ in range(q.shape[0]) for i in range(0, 72, 16)]
        ref = cosine_attention(q, k, v, t, table, index, mask, impl="reference")
        want = torch.autograd.grad((ref * ref.detach().cos()).sum(), leaves)
        for a, b in zip(got, want):
            assert (a - b).abs().max() <= TOL * max(1.0, float(b.abs().max()))


def test_backward_blocks_of_whole_windows():
    """Where all windows' logits exceed the backward's block size but one window's fit, the
    blocks are whole windows (all rows: no product split into row blocks), as many per block
    as the budget allows, evenly; with a region mask added per window, a divisor or multiple
    of the mask's window count; a window larger than the budget alone goes in row blocks."""
    blocks = cpu_mod._backward_blocks
    budget = cpu_mod._BACKWARD_BLOCK_BYTES
    row = 2 * 1024 * 4  # GRL-S: 2 heads, 32x32 windows: 8 MiB per window
    assert blocks(1, row, 1024) == (1, 1024)
    assert blocks(4, row, 1024) == (1, 1024)  # 64x64 input: 4 windows of 8 MiB
    assert blocks(16, row, 1024) == (1, 1024)
    assert blocks(16, row // 8, 1024) == (8, 1024)  # 1 MiB per window: 8 per block
    assert blocks(12, row // 8, 1024) == (12, 1024)  # 12 MiB: within half as much again
    assert blocks(14, row // 8, 1024) == (7, 1024)  # 2 even blocks, not 8 + 6
    assert blocks(14, row // 8, 1024, 16, 4) == (4, 1024)  # a multiple of the mask's 4
    assert blocks(14, row // 8, 1024, 16, 5) == (5, 1024)
    assert blocks(32, row // 8, 1024, 16, 12) == (6, 1024)  # 8 is not a divisor of 12
    assert blocks(48, row // 16, 1024, 16, 6) == (12, 1024)  # a multiple of the mask's 6
    assert blocks(2, row // 2, 1024) == (2, 1024)  # 8 MiB in all: one block
    # one window over the budget: alone, in blocks of 512 rows of 16 KiB
    assert blocks(3, 2 * budget // 1024, 1024) == (1, 512)


@pytest.mark.parametrize("save_probs", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_lean_attention_backward_in_window_blocks_matches_reference(masked, save_probs, monkeypatch):
    """Blocks of whole windows (forced: 6 windows of 72 x 24 logits, 2 or 3 per block; the
    region mask of 3 windows, where it is added to recomputed logits per window, needs 1 or
    3): every block recomputes all rows of its windows (or slices them from the kept P, which
    needs no mask), and the gradients (q, k, v and the bias MLP's, summed over the blocks)
    equal the reference's."""
    use_lean_backward(monkeypatch, save_probs)
    monkeypatch.setattr(cpu_mod, "_keep_probs", lambda *a: save_probs)
    t, table, index, mask, (q, k, v) = _attention_inputs(masked, n1=72, n2=24)
    window = 2 * 24 * 4 * 72
    blocks = []
    real = cpu_mod._logits_block
    monkeypatch.setattr(cpu_mod, "_logits_block",
                        lambda *a: (blocks.append((a[0].shape[0], a[-1])), real(*a))[1])
    chosen = []
    real_blocks = cpu_mod._backward_blocks
    monkeypatch.setattr(cpu_mod, "_backward_blocks",
                        lambda *a: (chosen.append(real_blocks(*a)), chosen[-1])[1])
    leaves = [q, k, v] + list(t.parameters())
    for budget, per_block in [(2 * window, 1 if masked and not save_probs else 2), (3 * window, 3)]:
        monkeypatch.setattr(cpu_mod, "_BACKWARD_BLOCK_BYTES", budget)
        out = cosine_attention(q, k, v, t, table, index, mask)
        blocks.clear()
        chosen.clear()
        got = torch.autograd.grad((out * out.detach().cos()).sum(), leaves)
        assert chosen == [(per_block, 72)]
        assert [(n, b.start, b.stop) for n, b in blocks] == (
            [] if save_probs else [(per_block, 0, 72)] * (6 // per_block))
        ref = cosine_attention(q, k, v, t, table, index, mask, impl="reference")
        want = torch.autograd.grad((ref * ref.detach().cos()).sum(), leaves)
        for a, b in zip(got, want):
            assert (a - b).abs().max() <= TOL * max(1.0, float(b.abs().max()))
