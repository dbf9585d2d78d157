"""State-dict layout and parameter counts against the official GRL (tests/data/official_*.json)."""
import pytest
import torch

from grl_plugin import GRL, PRESET_KWARGS, PRESETS
from helpers import official

STATE_DICTS = official("state_dicts")
TASKS = official("tasks")


@pytest.mark.parametrize("spec", ["tiny", "small", "base", "base_sr_w32"])
def test_keys_and_shapes_equal_official(spec):
    ref = STATE_DICTS[spec]
    model = GRL(**ref["config"])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    want = [(key, shape) for key, shape in ref["params"]]
    assert got == want  # same keys, same order, same shapes; no size-dependent buffers
    assert sum(p.numel() for p in model.parameters()) == ref["num_params_total"]
    assert len(list(model.parameters())) == ref["num_param_tensors"]
    # every state_dict entry is a trainable parameter: nothing tied to a resolution
    assert {k for k, _ in model.named_parameters()} == set(model.state_dict())


@pytest.mark.parametrize("preset,count", [("GRL_T", 906_192), ("GRL_S", 3_487_715),
                                          ("GRL_B", 20_201_299), ("GRL_B_BSR", 20_016_659)])
def test_preset_parameter_counts(preset, count):
    model = PRESETS[preset]()
    assert sum(p.numel() for p in model.parameters()) == count


def test_presets_match_official_model_yamls():
    for preset, spec in [("GRL_T", "tiny"), ("GRL_S", "small"), ("GRL_B", "base")]:
        config = STATE_DICTS[spec]["config"]
        for key, value in PRESET_KWARGS[preset].items():
            assert config[key] == value, (preset, key)


def test_presets_overridable_by_keyword():
    model = PRESETS["GRL_T"](upscale=2, window_size=32, stripe_size=[64, 64], stripe_groups=[None, None])
    assert model.upscale == 2 and model.window_size == 32 and model.pad_size == 64
    assert model.upsample.up[0].out_channels == 2 ** 2 * 3


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_config_parameter_counts_and_geometry(task):
    cfg = TASKS[task]
    model = GRL(**cfg["model_kwargs"])
    assert sum(p.numel() for p in model.parameters()) == cfg["num_params"]
    assert model.pad_size == cfg["pad_size"]
    # the on-the-fly geometry at the training size has the shapes of the official buffers
    pad = cfg["pad_size"]
    g = model.geometry((pad, pad), "cpu")
    got = {
        "table_w": g.window.table, "index_w": g.window.index, "mask_w": g.window.mask,
        "table_sh": g.stripe_h.table, "index_sh_a2w": g.stripe_h.index_a2w,
        "index_sh_w2a": g.stripe_h.index_w2a, "mask_sh_a2w": g.stripe_h.mask_a2w,
        "mask_sh_w2a": g.stripe_h.mask_w2a, "table_sv": g.stripe_v.table,
        "index_sv_a2w": g.stripe_v.index_a2w, "index_sv_w2a": g.stripe_v.index_w2a,
        "mask_sv_a2w": g.stripe_v.mask_a2w, "mask_sv_w2a": g.stripe_v.mask_w2a,
    }
    for name, shape in cfg["buffer_shapes_at_pad_size"].items():
        assert list(got[name].shape) == shape, name


def test_weights_trained_at_one_size_run_at_another():
    kw = dict(embed_dim=16, depths=[2], num_heads_window=[1], num_heads_stripe=[1], window_size=4,
              stripe_size=[8, 8], anchor_window_down_factor=2, upsampler="", upscale=1, img_size=16)
    a = GRL(**kw).eval()
    b = GRL(**dict(kw, img_size=96)).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.rand(1, 3, 40, 24)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("task,family", [("tiny@sr", ("sr", "T")), ("small@sr", ("sr", "S")),
                                         ("tiny@dn", ("dn", "T")), ("small@jpeg", ("jpeg", "S")),
                                         ("small@dm", ("dm", "S")), ("base@db_motion", ("db_motion", "B")),
                                         ("base@db_defocus", ("db_defocus", "B")),
                                         ("base_bsr@bsr", ("bsr", "B"))])
def test_task_kwargs_equal_official_experiment_configs(task, family):
    from grl_plugin.archs.tasks import task_kwargs

    ref = TASKS[task]["model_kwargs"]
    got = task_kwargs(*family)
    assert {k: got[k] for k in got if k in ref} == {k: ref[k] for k in got if k in ref}
    assert GRL(**got).pad_size == TASKS[task]["pad_size"]
