"""Validate the test oracle (tests/oracle/official_grl.py) against the reference data of SPEC.md.

Every expected value here comes from the official reference facts (``tests/data/official_*.json``:
state dicts, task configurations, forward FLOPs) or was worked out by hand from the formulas of SPEC 4.4 / 6.1-6.3; none is
produced by the oracle code itself.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oracle.official_grl import (  # noqa: E402
    BUFFER_NAMES,
    OfficialGRL,
    _label_map,
    build_table_index_mask,
    calculate_mask,
    calculate_mask_stripe,
    get_relative_coords_table,
    get_relative_position_index,
    get_stripe_info,
)

from helpers import official  # noqa: E402

PARAM_COUNTS = {"tiny": 906_192, "small": 3_487_715, "base": 20_201_299, "base_sr_w32": 20_201_299}

# by hand: sign(t) * log2(|t| + 1) / log2(8) for t = 8 * (-1, -1/2, 0, 1/2, 1)
L9 = 1.0566416671474375  # log2(9) / 3
L5 = 0.7739760316291208  # log2(5) / 3
V5 = [-L9, -L5, 0.0, L5, L9]
NEG = -100.0


def _count_by_top(model):
    top = {}
    for k, p in model.named_parameters():
        parts = k.split(".")
        kk = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        top[kk] = top.get(kk, 0) + p.numel()
    return top


# ------------------------------------------------------------------------------------------------
# state_dict structure
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", list(PARAM_COUNTS))
def test_state_dict_matches_params_json(spec):
    total = PARAM_COUNTS[spec]
    ref = official("state_dicts")[spec]
    model = OfficialGRL(**ref["config"])
    sd = model.state_dict()
    got = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()]
    exp = [tuple(e) for e in ref["buffers"]] + [(key, shape, "float32") for key, shape in ref["params"]]
    assert got == exp
    # buffers come first, exactly the 13 names
    assert [k for k, _, _ in got[:13]] == list(BUFFER_NAMES)
    assert [k for k, _ in model.named_buffers()] == list(BUFFER_NAMES)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == total == ref["num_params_total"]
    assert len(list(model.parameters())) == ref["num_param_tensors"]
    assert _count_by_top(model) == ref["params_per_top_module"]
    # mean is a plain attribute, not state
    assert "mean" not in sd
    assert torch.allclose(model.mean.flatten(), torch.tensor(ref["mean"]))
    # block 0 shapes
    b0 = {k[len("layers.0.blocks.0."):]: list(v.shape) for k, v in sd.items() if k.startswith("layers.0.blocks.0.")}
    prefix = "layers.0.blocks.0."
    assert b0 == {key[len(prefix):]: shape for key, shape in ref["params"] if key.startswith(prefix)}
    assert len(b0) > 20


def test_task_configs_params_and_buffers():
    tasks = official("tasks")
    assert len(tasks) >= 9
    for name, t in tasks.items():
        kwargs = dict(t["model_kwargs"])
        kwargs["img_size"] = t["pad_size"]
        with torch.device("meta"):  # structure only (fast); the real buffers are built below
            model = OfficialGRL(**kwargs)
        assert model.pad_size == t["pad_size"], name
        shapes = {k: list(getattr(model, k).shape) for k in BUFFER_NAMES}
        assert shapes == t["buffer_shapes_at_pad_size"], name
        assert sum(p.numel() for p in model.parameters()) == t["num_params"], name
        assert len(list(model.parameters())) == t["num_param_tensors"], name
        assert _count_by_top(model) == t["params_per_top_module"], name
        # the same tensors, really computed
        res = (t["pad_size"], t["pad_size"])
        tim = build_table_index_mask(res, kwargs["window_size"], kwargs["stripe_size"],
                                     kwargs["stripe_groups"], kwargs["anchor_window_down_factor"])
        assert {k: list(v.shape) for k, v in tim.items()} == t["buffer_shapes_at_pad_size"], name
        for tag in ("w", "sh", "sv"):
            n_table = tim[f"table_{tag}"].shape[1] * tim[f"table_{tag}"].shape[2]
            for k in [k for k in BUFFER_NAMES if k.startswith(f"index_{tag}")]:
                assert int(tim[k].min()) == 0 and int(tim[k].max()) == n_table - 1, (name, k)
            assert float(tim[f"table_{tag}"].abs().max()) == pytest.approx(math.log2(9) / 3)
        for tag in ("sh", "sv"):
            assert torch.equal(tim[f"mask_{tag}_a2w"], tim[f"mask_{tag}_w2a"].transpose(1, 2))
        for k in [k for k in BUFFER_NAMES if k.startswith("mask")]:
            assert ((tim[k] == 0) | (tim[k] == NEG)).all(), (name, k)
        del model, tim


def test_pad_size_examples():
    # SPEC 1.2
    def pad(ws, ss, gs, df):
        img = max([ws] + [s or 0 for s in ss] + [(g or 0) * df for g in gs])
        with torch.device("meta"):
            return OfficialGRL(
                img_size=img, embed_dim=8, depths=[], num_heads_window=[], num_heads_stripe=[],
                window_size=ws, stripe_size=ss, stripe_groups=gs, anchor_window_down_factor=df,
            ).pad_size

    assert pad(8, [8, None], [None, 4], 4) == 16
    assert pad(32, [64, 64], [None, None], 4) == 64
    assert pad(16, [64, 128], [None, None], 4) == 128
    assert pad(36, [72, 144], [None, None], 4) == 144
    assert pad(8, [32, 32], [None, None], 4) == 32
    assert pad(12, [48, 96], [None, None], 4) == 96


# ------------------------------------------------------------------------------------------------
# FLOP counts of the official model (tests/data/official_flops.json): a structural check of every matmul/conv
# ------------------------------------------------------------------------------------------------
def test_forward_flops_match_official_baseline():
    from torch.utils.flop_counter import FlopCounterMode

    runs = official("flops")
    assert len(runs) >= 12
    for r in runs:
        cfg = dict(r["config"])
        cfg["img_size"] = r["padded_input"][0]
        with torch.device("meta"):
            model = OfficialGRL(**cfg).eval()
            x = torch.empty(*r["input"])
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                y = model(x)
        assert list(y.shape) == r["output_shape"], r["spec"]
        assert fc.get_total_flops() == r["flops_forward"], (r["spec"], r["size"])
        by_op = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
        assert by_op == r["flops_forward_by_op"], (r["spec"], r["size"])


# ------------------------------------------------------------------------------------------------
# (a) coordinate tables
# ------------------------------------------------------------------------------------------------
def test_window_table_ws3_by_hand():
    t = get_relative_coords_table((3, 3), (0, 0), 1)
    assert t.shape == (1, 5, 5, 2) and t.dtype == torch.float32
    exp = torch.tensor([[[V5[i], V5[j]] for j in range(5)] for i in range(5)]).unsqueeze(0)
    assert torch.allclose(t, exp, atol=1e-6)
    # channel 0 = row coordinate, channel 1 = column coordinate
    assert t[0, 0, 4, 0] == pytest.approx(-L9) and t[0, 0, 4, 1] == pytest.approx(L9)


def test_stripe_table_4x4_df2_equals_ws3_values():
    # w=4, aw=2: pos = 3 - 1 = 2, neg = -1 - 1 = -2 -> coordinates -2..2 / 2
    t = get_relative_coords_table((4, 4), (0, 0), 2)
    exp = torch.tensor([[[V5[i], V5[j]] for j in range(5)] for i in range(5)]).unsqueeze(0)
    assert torch.allclose(t, exp, atol=1e-6)


def test_stripe_table_asymmetric_by_hand():
    # axis 0: w=12, df=4 -> aw=3, pos = 11 - 4 = 7, neg = -2 - 4 = -6: coords -6..7, / 7
    # axis 1: w=8,  df=4 -> aw=2, pos = 7 - 3 = 4, neg = -1 - 3 = -4: coords -4..4, / 4
    t = get_relative_coords_table((12, 8), (0, 0), 4)
    assert t.shape == (1, 14, 9, 2)

    def f(c, pos):
        v = c / pos * 8
        return math.copysign(math.log2(abs(v) + 1) / 3, v) if v != 0 else 0.0

    exp0 = [f(c, 7) for c in range(-6, 8)]
    exp1 = [f(c, 4) for c in range(-4, 5)]
    assert torch.allclose(t[0, :, 0, 0], torch.tensor(exp0), atol=1e-6)
    assert torch.allclose(t[0, 0, :, 1], torch.tensor(exp1), atol=1e-6)
    assert t[0, 6, 4, 0] == 0 and t[0, 6, 4, 1] == 0  # the zero offset sits at row 6, col 4
    assert t[0, -1, 0, 0] == pytest.approx(L9)
    assert t[0, 0, 0, 0] == pytest.approx(-math.log2(48 / 7 + 1) / 3)

    # (2, 4) df 2: axis 0 w=2, aw=1: pos=1, neg=0 -> coords 0, 1 (not centred!)
    t = get_relative_coords_table((2, 4), (0, 0), 2)
    assert t.shape == (1, 2, 5, 2)
    assert torch.allclose(t[0, :, 0, 0], torch.tensor([0.0, L9]), atol=1e-6)
    assert torch.allclose(t[0, 0, :, 1], torch.tensor(V5), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# (b), (c) relative position indices
# ------------------------------------------------------------------------------------------------
def test_window_index_ws2_by_hand():
    idx = get_relative_position_index((2, 2), 1, True)
    exp = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert idx.dtype == torch.int64
    assert torch.equal(idx, exp)


def test_window_index_ws8_corners():
    idx = get_relative_position_index((8, 8), 1, True)
    assert idx.shape == (64, 64)
    assert idx[0, 0] == 7 * 15 + 7
    assert idx[0, 63] == 0
    assert idx[63, 0] == 14 * 15 + 14
    assert idx.min() == 0 and idx.max() == 15 * 15 - 1


def test_stripe_index_4x4_df2_by_hand():
    # anchor 2x2, M = aw1 + w1 - 1 = 5, table 5x5 (indices 0..24)
    w2a = get_relative_position_index((4, 4), 2, True)
    a2w = get_relative_position_index((4, 4), 2, False)
    assert w2a.shape == (16, 4) and a2w.shape == (4, 16)
    assert w2a.dtype == torch.int64 and a2w.dtype == torch.int64
    # w2a[i, j] = (r_i - r'_j + 1) * 5 + (c_i - c'_j + 1)
    assert w2a[0, 0] == 6
    assert w2a[0, 3] == 0
    assert w2a[15, 0] == 24
    assert w2a[15, 3] == 18
    assert w2a[6, 1] == 12
    # a2w[j, i] = (r'_j - r_i + 3) * 5 + (c'_j - c_i + 3)
    assert a2w[0, 0] == 18
    assert a2w[0, 15] == 0
    assert a2w[3, 0] == 24
    assert a2w[3, 15] == 6
    assert a2w[1, 6] == 12
    assert sorted(set(w2a.flatten().tolist())) == list(range(25))
    assert sorted(set(a2w.flatten().tolist())) == list(range(25))
    # B3: a2w is NOT the transpose of w2a
    assert not torch.equal(a2w, w2a.t())


def test_stripe_index_2x4_df2_full_by_hand():
    # w=(2,4), aw=(1,2), M = 2 + 4 - 1 = 5, table (2, 5)
    w2a = get_relative_position_index((2, 4), 2, True)
    a2w = get_relative_position_index((2, 4), 2, False)
    exp_w2a = torch.tensor([[1, 0], [2, 1], [3, 2], [4, 3], [6, 5], [7, 6], [8, 7], [9, 8]])
    exp_a2w = torch.tensor([[8, 7, 6, 5, 3, 2, 1, 0], [9, 8, 7, 6, 4, 3, 2, 1]])
    assert torch.equal(w2a, exp_w2a)
    assert torch.equal(a2w, exp_a2w)


# ------------------------------------------------------------------------------------------------
# (d), (e) masks
# ------------------------------------------------------------------------------------------------
def _mask_from_labels(lq, lk):
    return torch.tensor([[0.0 if a == b else NEG for b in lk] for a in lq])


def test_window_mask_4x4_ws2_shift1_by_hand():
    labels = _label_map((4, 4), (2, 2), (1, 1))[0, :, :, 0]
    exp_labels = torch.tensor(
        [[0, 0, 1, 2], [0, 0, 1, 2], [3, 3, 4, 5], [6, 6, 7, 8]], dtype=torch.float32
    )
    assert torch.equal(labels, exp_labels)

    m = calculate_mask((4, 4), 2, 1)
    assert m.shape == (4, 4, 4) and m.dtype == torch.float32
    Z, N = 0.0, NEG
    exp = torch.tensor(
        [
            [[Z, Z, Z, Z], [Z, Z, Z, Z], [Z, Z, Z, Z], [Z, Z, Z, Z]],  # labels 0 0 0 0
            [[Z, N, Z, N], [N, Z, N, Z], [Z, N, Z, N], [N, Z, N, Z]],  # labels 1 2 1 2
            [[Z, Z, N, N], [Z, Z, N, N], [N, N, Z, Z], [N, N, Z, Z]],  # labels 3 3 6 6
            [[Z, N, N, N], [N, Z, N, N], [N, N, Z, N], [N, N, N, Z]],  # labels 4 5 7 8
        ]
    )
    assert torch.equal(m, exp)


def test_label_map_shift_zero_python_slicing():
    # shift 0: slice(-w, -0) is empty and slice(-0, None) is the whole axis -> last label row/col
    lab = _label_map((4, 6), (2, 3), (0, 1))[0, :, :, 0]
    # h: only the last slice (whole axis) survives -> label 6 + w-index
    # w (w=3, shift=1): [0,-3) = {0,1,2}, [-3,-1) = {3,4}, [-1,) = {5}
    exp = torch.tensor([[6, 6, 6, 7, 7, 8]] * 4, dtype=torch.float32)
    assert torch.equal(lab, exp)
    # no shift at all: everything is label 8 -> an all-zero window mask
    assert torch.equal(calculate_mask((4, 4), 2, 0), torch.zeros(4, 4, 4))


def test_stripe_mask_8x8_stripe4x8_shift_df2_by_hand():
    # image 8x8, stripe (4, 8), shift (2, 4), df 2 -> anchor grid 4x4, stripe (2, 4), shift (1, 2)
    a2w, w2a = calculate_mask_stripe((8, 8), (4, 8), (2, 4), 2)
    assert w2a.shape == (2, 32, 8) and a2w.shape == (2, 8, 32)
    # image labels by hand: rows 0-3 -> 1|2, rows 4-5 -> 4|5, rows 6-7 -> 7|8 (left/right half)
    img0 = [1] * 4 + [2] * 4
    img = [img0 * 4, [4] * 4 + [5] * 4 + [4] * 4 + [5] * 4 + [7] * 4 + [8] * 4 + [7] * 4 + [8] * 4]
    # anchor labels by hand: rows 0-1 -> 1 1 2 2, row 2 -> 4 4 5 5, row 3 -> 7 7 8 8
    anc = [[1, 1, 2, 2, 1, 1, 2, 2], [4, 4, 5, 5, 7, 7, 8, 8]]
    for n in range(2):
        assert torch.equal(w2a[n], _mask_from_labels(img[n], anc[n]))
        assert torch.equal(a2w[n], _mask_from_labels(anc[n], img[n]))
    assert torch.equal(a2w, w2a.transpose(1, 2))
    assert w2a[0, 0, 0] == 0 and w2a[0, 0, 2] == NEG
    assert w2a[1, 16, 4] == 0 and w2a[1, 0, 4] == NEG


def test_stripe_mask_anchor_shift_zero_by_hand():
    # image 4x4, stripe (2, 4), shift (1, 2), df 2 -> anchor 2x2, stripe (1, 2), shift (0, 1)
    # image labels: rows 0-1: 1 1 2 2 | row 2: 4 4 5 5 | row 3: 7 7 8 8
    # anchor: h-shift 0 -> only the whole-axis slice survives (labels 6..8): [[7, 8], [7, 8]]
    a2w, w2a = calculate_mask_stripe((4, 4), (2, 4), (1, 2), 2)
    assert w2a.shape == (2, 8, 2) and a2w.shape == (2, 2, 8)
    assert torch.equal(w2a[0], torch.full((8, 2), NEG))  # nothing matches in stripe 0
    exp1 = _mask_from_labels([4, 4, 5, 5, 7, 7, 8, 8], [7, 8])
    assert torch.equal(w2a[1], exp1)
    assert torch.equal(a2w[1], exp1.t())


# ------------------------------------------------------------------------------------------------
# stripe info, buffers, resolution handling
# ------------------------------------------------------------------------------------------------
def test_stripe_info_by_hand():
    assert get_stripe_info([8, None], [None, 4], True, (64, 48)) == ([8, 12], [4, 6])
    assert get_stripe_info([None, 8], [4, None], True, (64, 48)) == ([16, 8], [8, 4])
    assert get_stripe_info([8, None], [None, 4], False, (64, 48)) == ([8, 12], [0, 6])
    assert get_stripe_info([8, None], [None, 1], True, (64, 48)) == ([8, 48], [4, 0])
    assert get_stripe_info([64, 64], [None, None], True, (128, 64)) == ([64, 64], [32, 32])
    assert get_stripe_info([64, 64], [None, None], False, (128, 64)) == ([64, 64], [0, 0])
    # B4: W=48, g=4, df=4: token shift 6, anchor shift 6 // 4 = 1
    _, sss = get_stripe_info([8, None], [None, 4], True, (48, 48))
    assert sss[1] == 6 and sss[1] // 4 == 1


def test_b1_v_buffers_use_reversed_h_info():
    # non-square (64, 128), groups [None, 4]: ss = (8, 32) -> V built for (32, 8), not (64//4, 8)
    tim = build_table_index_mask((64, 128), 8, [8, None], [None, 4], 4)
    assert list(tim["table_sh"].shape) == [1, 8 + 2 - 1, 32 + 8 - 1, 2]
    assert list(tim["table_sv"].shape) == [1, 32 + 8 - 1, 8 + 2 - 1, 2]
    assert list(tim["index_sv_w2a"].shape) == [32 * 8, 8 * 2]
    # the W-block at runtime uses (64 // 4, 8) = 16 x 8 -> N1 = 128 != 256
    ss_w, _ = get_stripe_info([None, 8], [4, None], True, (64, 128))
    assert ss_w == [16, 8]


def test_registered_buffers_used_only_at_img_size():
    kw = dict(img_size=32, embed_dim=16, depths=[2], num_heads_window=[1], num_heads_stripe=[1],
              window_size=8, stripe_size=[8, None], stripe_groups=[None, 4],
              anchor_window_down_factor=4, upsampler="pixelshuffledirect", upscale=2)
    model = OfficialGRL(**kw)
    tim = model.get_table_index_mask(torch.device("cpu"), (32, 32))
    for k in BUFFER_NAMES:
        assert tim[k] is getattr(model, k)
    tim = model.get_table_index_mask(torch.device("cpu"), (48, 48))
    assert list(tim["mask_w"].shape) == [36, 64, 64]
    assert list(tim["index_sh_w2a"].shape) == [8 * 12, 2 * 3]
    assert list(tim["mask_sh_w2a"].shape) == [24, 96, 6]
    for k in BUFFER_NAMES:
        assert tim[k] is not getattr(model, k)


def test_block_pattern():
    model = OfficialGRL(img_size=32, embed_dim=16, depths=[6], num_heads_window=[1],
                        num_heads_stripe=[1], window_size=8, stripe_size=[16, 32],
                        stripe_groups=[None, None], stripe_shift=True, anchor_window_down_factor=2,
                        init_method="r", drop_path_rate=0.5)
    blocks = model.layers[0].blocks
    assert [b.attn.window_attn.shift_size for b in blocks] == [4, 0, 4, 0, 4, 0]
    assert [b.stripe_type for b in blocks] == ["H", "W", "H", "W", "H", "W"]
    assert [b.attn.stripe_attn.stripe_shift for b in blocks] == [False, False, True, True, False, False]
    assert [b.stripe_size for b in blocks] == [[16, 32], [32, 16]] * 3
    assert all(b.res_scale == 0.1 for b in blocks)
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)
    assert [round(b.drop_path.drop_prob, 6) for b in blocks[1:]] == [0.1, 0.2, 0.3, 0.4, 0.5]


# ------------------------------------------------------------------------------------------------
# forward behaviour (tiny models; 2 cores)
# ------------------------------------------------------------------------------------------------
YAML_TINY = dict(embed_dim=16, depths=[4], num_heads_window=[2], num_heads_stripe=[2],
                 window_size=8, stripe_size=[8, None], stripe_groups=[None, 4], stripe_shift=True,
                 anchor_window_down_factor=4, mlp_ratio=2, upscale=2,
                 upsampler="pixelshuffledirect")


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (37, 37), (48, 48)])
def test_b1_square_inputs_work(size):
    torch.manual_seed(0)
    model = OfficialGRL(img_size=32, **YAML_TINY).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, *size))
    assert y.shape == (1, 3, 2 * size[0], 2 * size[1])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("size", [(50, 70), (70, 50), (64, 128), (32, 48)])
def test_b1_non_square_inputs_raise(size):
    model = OfficialGRL(img_size=32, **YAML_TINY).eval()
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            model(torch.rand(1, 3, *size))


def test_b1_non_square_img_size():
    # padded 64x80: the V-stripe (80//4=20) x 8 does not tile 64 rows -> the constructor raises
    with pytest.raises(RuntimeError):
        OfficialGRL(img_size=(64, 80), **YAML_TINY)
    # padded 80x64: builds, but the forward raises (W blocks use 20x8 stripes, buffers 16x8)
    model = OfficialGRL(img_size=(80, 64), **YAML_TINY).eval()
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            model(torch.rand(1, 3, 70, 50))


@pytest.mark.parametrize("size", [(37, 37), (50, 70), (70, 50), (17, 33), (5, 12)])
def test_experiment_style_non_square_ok(size):
    torch.manual_seed(0)
    model = OfficialGRL(img_size=32, embed_dim=16, depths=[4], num_heads_window=[1],
                        num_heads_stripe=[2], window_size=8, stripe_size=[16, 32],
                        stripe_groups=[None, None], stripe_shift=True, anchor_window_down_factor=4,
                        mlp_ratio=2, upscale=1, upsampler="").eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, *size))
    assert y.shape == (1, 3, *size)


def test_padding_reflect_then_constant_fallback():
    model = OfficialGRL(img_size=16, embed_dim=8, depths=[], num_heads_window=[],
                        num_heads_stripe=[], window_size=8, stripe_size=[16, 16],
                        stripe_groups=[None, None], anchor_window_down_factor=2)
    x = torch.arange(5 * 12, dtype=torch.float32).view(1, 1, 5, 12)
    # 5 -> 16 needs 11 rows of padding >= 5: reflect raises -> zero "constant" padding
    p = model.check_image_size(x)
    assert p.shape == (1, 1, 16, 16)
    assert torch.equal(p[..., :5, :12], x) and (p[..., 5:, :] == 0).all() and (p[..., :, 12:] == 0).all()
    x = torch.arange(13 * 12, dtype=torch.float32).view(1, 1, 13, 12)
    p = model.check_image_size(x)  # 3 rows / 4 cols of reflect padding
    assert torch.equal(p[0, 0, 13, :12], x[0, 0, 11]) and torch.equal(p[0, 0, 15, :12], x[0, 0, 9])
    assert torch.equal(p[0, 0, :13, 12], x[0, 0, :, 10]) and torch.equal(p[0, 0, :13, 15], x[0, 0, :, 7])


def test_mean_subtracted_after_padding():
    # "" head, in == out == 3, a zeroed conv_last makes the model the identity on the padded,
    # mean-subtracted input plus the mean: output == padded input (constant-padded region = 0).
    model = OfficialGRL(img_size=16, embed_dim=8, depths=[1], num_heads_window=[1],
                        num_heads_stripe=[1], window_size=8, stripe_size=[16, 16],
                        stripe_groups=[None, None], anchor_window_down_factor=2, upscale=4,
                        upsampler="").eval()
    torch.nn.init.zeros_(model.conv_last.weight)
    torch.nn.init.zeros_(model.conv_last.bias)
    x = torch.rand(1, 3, 5, 12)
    with torch.no_grad():
        y = model(x)
    # upscale=4 with the "" head: the crop [:H*4, :W*4] keeps the whole padded map (literal)
    assert y.shape == (1, 3, 16, 16)
    assert torch.allclose(y[..., :5, :12], x, atol=1e-6)
    assert torch.allclose(y[..., 5:, :], torch.zeros(1, 3, 11, 16), atol=1e-6)


@pytest.mark.parametrize(
    "upsampler,upscale,in_ch,out_ch,exp_hw",
    [
        ("pixelshuffle", 2, 3, None, 2),
        ("pixelshuffle", 3, 3, None, 3),
        ("pixelshuffle", 4, 3, None, 4),
        ("pixelshuffle", 8, 3, None, 8),
        ("pixelshuffledirect", 3, 3, None, 3),
        ("nearest+conv", 4, 3, None, 4),
        ("", 1, 1, None, 1),
        ("", 1, 6, 3, 1),
    ],
)
def test_heads_shapes(upsampler, upscale, in_ch, out_ch, exp_hw):
    model = OfficialGRL(img_size=16, in_channels=in_ch, out_channels=out_ch, embed_dim=8,
                        depths=[1], num_heads_window=[1], num_heads_stripe=[1], window_size=8,
                        stripe_size=[16, 16], stripe_groups=[None, None],
                        anchor_window_down_factor=2, upscale=upscale, upsampler=upsampler).eval()
    with torch.no_grad():
        y = model(torch.rand(1, in_ch, 10, 12))
    assert y.shape == (1, out_ch or in_ch, 10 * exp_hw, 12 * exp_hw)
    if upsampler == "pixelshuffle":
        n = {2: 1, 3: 1, 4: 2, 8: 3}[upscale]
        assert [k for k in model.state_dict() if k.startswith("upsample.")] == [
            f"upsample.up.{2 * i}.{p}" for i in range(n) for p in ("weight", "bias")
        ]


def test_conv_type_keys():
    def keys(ct):
        m = OfficialGRL(img_size=16, embed_dim=16, depths=[1], num_heads_window=[1],
                        num_heads_stripe=[1], window_size=8, stripe_size=[16, 16],
                        stripe_groups=[None, None], anchor_window_down_factor=2, conv_type=ct)
        return {k: list(v.shape) for k, v in m.state_dict().items() if k.startswith("conv_after_body")}

    assert keys("1conv") == {"conv_after_body.weight": [16, 16, 3, 3], "conv_after_body.bias": [16]}
    assert keys("1conv1x1") == {"conv_after_body.weight": [16, 16, 1, 1], "conv_after_body.bias": [16]}
    assert keys("linear") == {"conv_after_body.weight": [16, 16], "conv_after_body.bias": [16]}
    assert keys("3conv") == {
        "conv_after_body.0.weight": [4, 16, 3, 3], "conv_after_body.0.bias": [4],
        "conv_after_body.2.weight": [4, 4, 1, 1], "conv_after_body.2.bias": [4],
        "conv_after_body.4.weight": [16, 4, 3, 3], "conv_after_body.4.bias": [16],
    }


def test_init():
    torch.manual_seed(0)
    model = OfficialGRL(img_size=16, embed_dim=64, depths=[2], num_heads_window=[2],
                        num_heads_stripe=[2], window_size=8, stripe_size=[16, 16],
                        stripe_groups=[None, None], anchor_window_down_factor=2)
    at = model.layers[0].blocks[0].attn
    assert torch.allclose(at.window_attn.attn_transform.logit_scale, torch.full((2, 1, 1), math.log(10)))
    w = at.qkv.body.weight
    assert abs(float(w.detach().std()) - 0.02) < 0.002 and (at.qkv.body.bias == 0).all()
    assert (model.norm_start.weight == 1).all() and (model.norm_start.bias == 0).all()
