"""Tables, relative indices and masks checked cell by cell on hand-worked cases (SPEC §4.4, §6)."""
import math

import pytest
import torch

from grl_plugin.layers import geometry as G

CPU = torch.device("cpu")
M = G.MASK_VALUE


def _log_spaced(values, end):
    t = torch.tensor(values, dtype=torch.float32) / end * 8
    return torch.sign(t) * torch.log2(t.abs() + 1) / 3


def test_window_table_ws3():
    table = G.coords_table((3, 3), 1, CPU)
    assert table.shape == (1, 5, 5, 2)
    # coordinates -2..2 divided by 2, times 8, log-spaced: log2(9)/3 and log2(5)/3
    a, b = math.log2(9) / 3, math.log2(5) / 3
    axis = torch.tensor([-a, -b, 0.0, b, a])
    assert torch.allclose(table[0, :, 0, 0], axis) and torch.allclose(table[0, :, 3, 0], axis)
    assert torch.allclose(table[0, 0, :, 1], axis) and torch.allclose(table[0, 4, :, 1], axis)


def test_stripe_table_with_anchor_down_factor():
    table = G.coords_table((4, 8), 2, CPU)
    # rows: w 4, anchor 2 -> -2..2 normalised by 2; cols: w 8, anchor 4 -> -5..5 by 5
    assert table.shape == (1, 5, 11, 2)
    assert torch.allclose(table[0, :, 0, 0], _log_spaced([-2, -1, 0, 1, 2], 2))
    assert torch.allclose(table[0, 0, :, 1], _log_spaced(list(range(-5, 6)), 5))


def test_window_index_ws2():
    idx = G.relative_index((2, 2), 1, True, CPU)
    assert idx.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]


def test_stripe_indices_w2a_and_a2w():
    # stripe 2 x 4, df 2 -> anchor 1 x 2; table 2 x 5 (row stride 5)
    w2a = G.relative_index((2, 4), 2, True, CPU)
    assert w2a.tolist() == [[1, 0], [2, 1], [3, 2], [4, 3], [6, 5], [7, 6], [8, 7], [9, 8]]
    a2w = G.relative_index((2, 4), 2, False, CPU)
    assert a2w.tolist() == [[8, 7, 6, 5, 3, 2, 1, 0], [9, 8, 7, 6, 4, 3, 2, 1]]
    # the two directions are not transposes of each other (official quirk B3)
    assert not torch.equal(a2w, w2a.T)


@pytest.mark.parametrize("window,df", [((8, 8), 1), ((64, 64), 4), ((48, 96), 4), ((36, 72), 2)])
def test_indices_cover_the_table(window, df):
    t0, t1 = window[0] + window[0] // df - 1, window[1] + window[1] // df - 1
    for w2a in (True, False):
        idx = G.relative_index(window, df, w2a, CPU)
        assert idx.min() == 0 and idx.max() == t0 * t1 - 1


def test_window_mask_4x4_ws2_shift1():
    mask = G.window_mask((4, 4), 2, 1, CPU)
    # labels: rows {0,1}->0, 2->1, 3->2 (x3) plus the same for columns
    # [[0,0,1,2],[0,0,1,2],[3,3,4,5],[6,6,7,8]]
    z = torch.zeros(4, 4)
    alt = torch.tensor([[0, M, 0, M], [M, 0, M, 0], [0, M, 0, M], [M, 0, M, 0]])
    blk = torch.tensor([[0, 0, M, M], [0, 0, M, M], [M, M, 0, 0], [M, M, 0, 0]])
    diag = torch.full((4, 4), M).fill_diagonal_(0)
    assert mask.shape == (4, 4, 4)
    for got, want in zip(mask, [z, alt, blk, diag]):
        assert torch.equal(got, want)


def test_stripe_masks_hand_worked():
    # grid 4x4, stripe 2x4, shift (1, 2), df 2 -> anchor grid 2x2, anchor stripe 1x2, shift (0, 1)
    a2w, w2a = G.stripe_masks((4, 4), (2, 4), (1, 2), 2, CPU)
    # token labels [[1,1,2,2],[1,1,2,2],[4,4,5,5],[7,7,8,8]]; anchor labels [[7,8],[7,8]]
    assert w2a.shape == (2, 8, 2) and a2w.shape == (2, 2, 8)
    assert torch.equal(w2a[0], torch.full((8, 2), M))
    assert torch.equal(w2a[1], torch.tensor([[M, M]] * 4 + [[0, M]] * 2 + [[M, 0]] * 2))
    assert torch.equal(a2w, w2a.transpose(1, 2))


def test_stripe_info_sizes_and_groups():
    assert G.stripe_info((8, 16), (None, None), True, (64, 64)) == ((8, 16), (4, 8))
    assert G.stripe_info((8, 16), (None, None), False, (64, 64)) == ((8, 16), (0, 0))
    # groups follow the resolution and ignore the shift flag
    assert G.stripe_info((8, None), (None, 4), False, (64, 48)) == ((8, 12), (0, 6))
    assert G.stripe_info((None, None), (1, 2), True, (32, 32)) == ((32, 16), (0, 8))


def test_pad_multiple_equals_official_pad_size():
    assert G.pad_multiple(8, (8, None), (None, 4), 4) == 16
    assert G.pad_multiple(32, (64, 64), (None, None), 4) == 64
    assert G.pad_multiple(16, (64, 128), (None, None), 4) == 128
    assert G.pad_multiple(36, (72, 144), (None, None), 4) == 144
    assert G.pad_multiple(12, (48, 96), (None, None), 4) == 96


def test_geometry_cached_and_built_on_device():
    G.clear_cache()
    a = G.grl_geometry(8, (8, None), (None, 4), 4, (32, 48), "cpu")
    b = G.grl_geometry(8, [8, None], [None, 4], 4, (32, 48), torch.device("cpu"))
    assert a is b
    assert G._grl_geometry.cache_info().misses == 1
    # tables shared between sizes when they do not depend on the size
    c = G.grl_geometry(8, (8, None), (None, 4), 4, (64, 48), "cpu")
    assert c.window.table is a.window.table


def test_geometry_nonsquare_groups_is_geometrically_right():
    # official bug B1: V stripes built from the H stripe reversed; here from the reversed config
    g = G.grl_geometry(8, (8, None), (None, 4), 4, (32, 64), "cpu")
    assert g.stripe_h.stripe == (8, 16) and g.stripe_v.stripe == (8, 8)
    assert g.stripe_v.mask_w2a.shape == (32 // 8 * 64 // 8, 64, 4)


def test_geometry_built_in_inference_mode_serves_autograd():
    G.clear_cache()
    with torch.inference_mode():
        g = G.grl_geometry(4, (8, 8), (None, None), 2, (8, 8), "cpu")
    assert not g.stripe_h.table.is_inference()
    w = torch.nn.Linear(2, 3)
    w(g.stripe_h.table).sum().backward()  # would raise for an inference tensor
    assert w.weight.grad is not None
