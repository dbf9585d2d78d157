"""GRL building blocks inside other networks: public layer API on odd sizes, compile, bf16;
the hybrid archs (GRLUNet, GRLInserted); a user arch registered from outside and trained
through ``grl-train --import``; the hybrid option file's dry run."""
from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from torch import nn

from helpers import REPO_ROOT, VENV_BIN, make_lmdb, run_cli, subprocess_env, write_options

import grl_plugin  # noqa: F401 - compat fixes + registration
from grl_plugin.archs.hybrid_arch import AnchorStripeAttention2d, GRLInserted, GRLUNet, WindowAttention2d
from grl_plugin.layers import CAB, GRLBlock, GRLStage, default_heads

SIZES = [(1, 1), (7, 13), (33, 17)]
GEOM = dict(window_size=4, stripe_size=(8, 8), anchor_window_down_factor=2)
UNET_LEVELS = [dict(dim=8, depth=1, grl=False),
               dict(dim=16, depth=2, grl=True, window_size=4, stripe_size=[8, 8],
                    anchor_window_down_factor=2, stripe_shift=True)]
EDSR = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, upscale=2)
INSERT = [dict(after='body.1', depth=2, window_size=4, stripe_size=[8, 8], anchor_window_down_factor=2)]


def _register_hybrid():
    """Until the lead wires them into ``grl_plugin._register_all``."""
    from basicsr.utils.registry import ARCH_REGISTRY
    from grl_plugin.patching import register
    for cls in (GRLUNet, GRLInserted):
        if cls.__name__ not in ARCH_REGISTRY:
            register(ARCH_REGISTRY, cls)


def _blocks():
    torch.manual_seed(0)
    return {
        'stage': GRLStage(16, 2, stripe_shift=True, **GEOM),
        'block': GRLBlock(16, window_shift=True, local_connection=True, **GEOM),
        'window': WindowAttention2d(16, window_size=4, window_shift=True),
        'stripe': AnchorStripeAttention2d(16, stripe_size=(8, 8), stripe_shift=True),
        'stripe_groups_W': AnchorStripeAttention2d(16, 2, stripe_size=(8, None), stripe_groups=(None, 2),
                                                   stripe_type='W'),
        'cab': CAB(16),
    }


# --------------------------------------------------------------------------- the layer API
def test_default_heads_divide():
    for dim in (2, 6, 16, 48, 64, 96, 180):
        h = default_heads(dim)
        assert (dim // 2) % h == 0


@pytest.mark.parametrize('name', list(_blocks()))
def test_blocks_any_size_in_sequential(name):
    blk = _blocks()[name].eval()
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), blk, nn.Conv2d(16, 3, 3, 1, 1))
    for h, w in SIZES:
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            y = net(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    # gradients reach every parameter of the block
    net.train()
    net(torch.rand(1, 3, 9, 11)).square().mean().backward()
    missing = [n for n, p in blk.named_parameters() if p.grad is None]
    assert not missing, missing


def test_blocks_token_form_matches_map_form():
    stage = GRLStage(16, 2, **GEOM).eval()
    x = torch.rand(1, 16, 8, 16)
    with torch.no_grad():
        tokens = stage(x.flatten(2).transpose(1, 2), (8, 16))
        maps = stage(x)
    torch.testing.assert_close(tokens.transpose(1, 2).reshape_as(x), maps)


@pytest.mark.parametrize('name', ['stage', 'window', 'stripe'])
def test_blocks_compile_eager(name):
    blk = _blocks()[name].eval()
    x = torch.rand(1, 16, 7, 13)
    with torch.no_grad():
        ref = blk(x)
        torch._dynamo.reset()
        out = torch.compile(blk, backend='eager')(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['stage', 'window', 'stripe'])
def test_blocks_graph_breaks_only_at_geometry(name):
    blk = _blocks()[name].eval()
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(blk)(torch.rand(1, 16, 7, 13))
    for reason in explain.break_reasons:
        # the only break: the @torch.compiler.disable'd cache lookup layers.geometry.grl_geometry
        assert 'torch.compiler.disable' in str(reason.reason), reason
    assert explain.graph_break_count <= 2, explain.break_reasons   # one per geometry lookup
    torch._dynamo.reset()


def test_network_training_graph_breaks_only_at_geometry(monkeypatch):
    """A training forward under ``torch.compile`` (with stochastic depth) breaks only at the network's one geometry
    lookup: no break inside the blocks, so no per-block resumed frames, which dynamo would
    recompile for every block's drop-path rate until its recompile limit."""
    from grl_plugin.archs.grl_arch import GRL
    torch.manual_seed(0)
    net = GRL(img_size=32, embed_dim=16, depths=[2, 2], num_heads_window=[2, 2], num_heads_stripe=[2, 2],
              window_size=8, stripe_size=[16, 16], anchor_window_down_factor=2, mlp_ratio=2, upscale=1,
              upsampler='', drop_path_rate=0.2).train()
    x = torch.rand(1, 3, 32, 32)
    counts = {}
    for mode in ('eval', 'train'):
        getattr(net, mode)()
        torch._dynamo.reset()
        explain = torch._dynamo.explain(lambda t: net(t).abs().mean())(x)
        (reason,) = explain.break_reasons  # (before the fix, training: 35, one per product)
        assert 'torch.compiler.disable' in str(reason.reason) and reason.user_stack[-1].name == 'geometry'
        counts[mode] = explain.graph_count, explain.graph_break_count
    assert counts['train'] == counts['eval'], counts
    torch._dynamo.reset()


def test_compile_blocks_one_graph_per_block_layout():
    """``compile_blocks`` (regional compilation): eight blocks of eight drop-path rates and four
    layouts (shift, stripe type, stripe shift; the first block without stochastic depth) give
    one graph per layout, no recompilation per rate (each rate was a recompile before the rate
    became a tensor under compile: the 9th block hit dynamo's limit of 8 and ran eagerly); the
    compiled network gives the eager output and trains; ``uncompile_blocks`` undoes it."""
    from torch._dynamo.utils import counters
    from grl_plugin.archs.grl_arch import GRL
    from grl_plugin.layers import compile_blocks, uncompile_blocks
    torch.manual_seed(0)
    net = GRL(img_size=16, embed_dim=16, depths=[8], num_heads_window=[2], num_heads_stripe=[2],
              window_size=4, stripe_size=[8, 8], anchor_window_down_factor=2, mlp_ratio=2, upscale=1,
              upsampler='', drop_path_rate=0.2, stripe_shift=True)
    blocks = list(net.layers[0].blocks)
    assert len({b.drop_path.drop_prob for b in blocks[1:]}) == 7
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = net.eval()(x)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(net, backend='eager')
    assert all('forward_tokens' in vars(b) for b in blocks)
    net.train()
    net(x).abs().mean().backward()
    frames, graphs = dict(counters['frames']), counters['stats']['unique_graphs']
    assert frames['total'] == frames['ok'] and graphs == 5, (frames, graphs)  # 4 layouts + the rate-0 block
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with torch.no_grad():
        got = net.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(net)  # (an EMA copy, say) runs its own weights, not the original's
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
        torch.testing.assert_close(twin(x), want, rtol=1e-5, atol=1e-5)
        assert (net(x) - want).abs().max() > 1e-3
    uncompile_blocks(net)
    assert not any('forward_tokens' in vars(b) for b in blocks)
    torch._dynamo.reset()


def test_drop_path_eager_draws_and_compiled_rate():
    """DropPath: eager draws as the official ``bernoulli_(keep)`` per sample; under compile (the
    rate a tensor) samples are dropped at the rate and the kept ones scaled by 1 / keep."""
    from grl_plugin.layers import DropPath
    dp = DropPath(0.25).train()
    x = torch.ones(20000, 1, 2)
    torch.manual_seed(3)
    got = dp(x)
    torch.manual_seed(3)
    want = x * x.new_empty(20000, 1, 1).bernoulli_(0.75) / 0.75
    assert torch.equal(got, want)
    torch._dynamo.reset()
    out = torch.compile(dp, backend='eager')(x)
    kept = out[:, 0, 0] != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.75))
    dropped = 1 - kept.float().mean().item()
    assert abs(dropped - 0.25) < 5 * (0.25 * 0.75 / 20000) ** 0.5, dropped
    assert dp.eval()(x) is x
    torch._dynamo.reset()


def test_drop_path_rate_buffer_moves_and_stays_out_of_the_state_dict():
    """DropPath's compile-time rate is a non-persistent buffer: it follows ``.to()`` (dtype here;
    the device likewise), keeps its device when the rate is set again, and the state dict of a
    GRL with stochastic depth holds none of them."""
    from grl_plugin.archs.grl_arch import GRL
    from grl_plugin.layers import DropPath
    dp = DropPath(0.2)
    assert float(dp._keep) == pytest.approx(0.8) and 'drop_prob=0.2' in repr(dp)
    dp.to(torch.float64)
    assert dp._keep.dtype == torch.float64
    dp.drop_prob = 0.5
    assert float(dp._keep) == 0.5 and dp._keep.device == torch.device('cpu')
    net = GRL(img_size=16, embed_dim=16, depths=[2], num_heads_window=[2], num_heads_stripe=[2],
              window_size=4, stripe_size=[8, 8], anchor_window_down_factor=2, mlp_ratio=2, upscale=1,
              upsampler='', drop_path_rate=0.2)
    assert any(isinstance(m, DropPath) for m in net.modules())
    assert not any(k.endswith('_keep') for k in net.state_dict())


@pytest.mark.parametrize('name', ['stage', 'block', 'window', 'stripe'])
def test_blocks_bf16_autocast(name):
    blk = _blocks()[name].eval()
    x = torch.rand(1, 16, 7, 13)
    with torch.no_grad():
        ref = blk(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = blk(x)
    assert torch.isfinite(out).all()
    err = (out.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err


# ----------------------------------------------------------------------------- hybrid archs
def _unet():
    torch.manual_seed(0)
    return GRLUNet(in_channels=3, levels=UNET_LEVELS)


def _inserted():
    _register_hybrid()
    torch.manual_seed(0)
    return GRLInserted(backbone=EDSR, insert=INSERT)


@pytest.mark.parametrize('make', [_unet, _inserted], ids=['GRLUNet', 'GRLInserted'])
def test_hybrid_state_dict_round_trip_any_size(make, tmp_path):
    net = make().eval()
    path = tmp_path / 'w.pth'
    torch.save(net.state_dict(), path)
    torch.manual_seed(123)
    fresh = make().eval()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    scale = 2 if isinstance(net, GRLInserted) else 1
    for h, w in SIZES:
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            a, b = net(x), fresh(x)
        assert a.shape == (1, 3, h * scale, w * scale)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unet_keys_and_padding():
    net = _unet()
    assert net.pad_multiple == 16               # lcm(2, 8 * 2)
    assert any(k.startswith('bottleneck.blocks.1.attn') for k in net.state_dict())
    with pytest.raises(ValueError, match='level 0'):
        GRLUNet(levels=[dict(dim=8, depth=1, grl=False, window_size=4), dict(dim=16, depth=1)])
    with pytest.raises(ValueError, match='divisible by 4'):
        GRLUNet(levels=[dict(dim=8, depth=1, grl=False), dict(dim=10, depth=1, grl=False)])


def test_inserted_wraps_module_and_errors():
    net = _inserted()
    seq = net.backbone.body[1]
    assert isinstance(seq, nn.Sequential) and isinstance(seq[1], GRLStage)
    assert 'backbone.body.1.1.blocks.0.attn.qkv.body.weight' in net.state_dict()
    with pytest.raises(ValueError, match="no module 'body.9'"):
        GRLInserted(backbone=EDSR, insert=[dict(after='body.9')])
    with pytest.raises(ValueError, match='outputs 16 channels but the insert says dim: 32'):
        GRLInserted(backbone=EDSR, insert=[dict(after='body.1', dim=32)])
    with pytest.raises(ValueError, match='not a registered arch'):
        GRLInserted(backbone=dict(type='NoSuchArch'), insert=INSERT)


def test_build_network_after_import():
    _register_hybrid()
    from basicsr.archs import build_network
    unet = build_network(dict(type='GRLUNet', in_channels=3, levels=UNET_LEVELS))
    ins = build_network(dict(type='GRLInserted', backbone=EDSR, insert=INSERT))
    assert isinstance(unet, GRLUNet) and isinstance(ins, GRLInserted)


# --------------------------------------------------------------------------- through the CLI
def _grl_train():
    exe = VENV_BIN / 'grl-train'
    return [str(exe)] if exe.exists() else [str(VENV_BIN / 'python'), '-m', 'grl_plugin.cli.train']


USER_MODULE = '''
import torch
from torch import nn
from basicsr.utils.registry import ARCH_REGISTRY
from grl_plugin.patching import register
from grl_plugin.layers import GRLBlock, GRLStage


class MyGRLNet(nn.Module):
    """A user network: conv head, one GRL block, one GRL stage, conv tail, global residual."""

    def __init__(self, in_ch=3, dim=16):
        super().__init__()
        self.head = nn.Conv2d(in_ch, dim, 3, 1, 1)
        self.body = nn.Sequential(
            GRLBlock(dim, window_size=4, stripe_size=(8, 8), anchor_window_down_factor=2),
            GRLStage(dim, 2, window_size=4, stripe_size=(8, 8), anchor_window_down_factor=2))
        self.tail = nn.Conv2d(dim, in_ch, 3, 1, 1)

    def forward(self, x):
        return x + self.tail(self.body(self.head(x)))


register(ARCH_REGISTRY, MyGRLNet)
'''


def test_user_arch_trains_through_grl_train(tmp_path):
    import subprocess
    (tmp_path / 'mymod.py').write_text(textwrap.dedent(USER_MODULE), encoding='utf-8')
    data = make_lmdb(tmp_path / 'data', n_images=2, size=24, scale=1)
    opt = write_options(tmp_path, data, name='my_grl_net',
                        network_g=dict(type='MyGRLNet', in_ch=3, dim=16),
                        train=dict(total_iter=3), logger=dict(save_checkpoint_freq=3))
    # network_g is deep-merged: drop the tiny-GRL keys MyGRLNet does not take
    import yaml
    o = yaml.safe_load(opt.read_text())
    o['network_g'] = dict(type='MyGRLNet', in_ch=3, dim=16)
    o['val'] = None
    del o['datasets']['val']
    opt.write_text(yaml.safe_dump(o, sort_keys=False))
    root = tmp_path / 'root'
    res = subprocess.run(_grl_train() + ['-opt', str(opt), '--root', str(root), '--import', 'mymod'],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                         env=subprocess_env([str(tmp_path)]))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = root / 'experiments' / 'my_grl_net' / 'models' / 'net_g_latest.pth'
    assert ckpt.is_file()
    sd = torch.load(ckpt, weights_only=True)['params']
    assert any(k.startswith('body.1.blocks.1.attn') for k in sd)


def test_hybrid_option_file_dry_run(tmp_path):
    opt = REPO_ROOT / 'options' / 'hybrid' / 'train_GRLUNet_DN_color_s25.yml'
    # registers GRLUNet / GRLInserted if `import grl_plugin` does not (yet): idempotent otherwise
    (tmp_path / 'reg_hybrid.py').write_text(
        'from basicsr.utils.registry import ARCH_REGISTRY\n'
        'from grl_plugin.patching import register\n'
        'from grl_plugin.archs.hybrid_arch import GRLInserted, GRLUNet\n'
        'for c in (GRLUNet, GRLInserted):\n'
        '    register(ARCH_REGISTRY, c)\n', encoding='utf-8')
    res = run_cli(['-m', 'grl_plugin.cli.train', '-opt', opt, '--dry-run', '--root', tmp_path,
                   '--import', 'reg_hybrid'], cwd=tmp_path, extra_pythonpath=[tmp_path])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'GRLUNet' in res.stdout + res.stderr
