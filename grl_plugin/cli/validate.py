"""Option-file validation for the GRL command-line tools, before any work starts.

``grl-train``, ``grl-test`` (also with ``--dry-run``), ``grl-infer --opt`` / ``grl-export --opt``
and ``grl-prepare`` (the option files it writes) call into this module. It reports, one
:class:`Problem` each:

* unknown keys -- in a GRL ``network_g`` (``type: GRL`` or a preset such as ``GRL_T``; the
  constructor signature of :class:`grl_plugin.archs.GRL` is the source of truth, so the official
  no-op keys it accepts stay valid), in the options of the datasets of the plugin and of BasicSR
  (the keys their code reads, found by reading their source, plus the data loader's keys) and in
  ``val.tile`` -- with the closest valid key (:mod:`difflib`);
* names that are not registered (``model_type``, ``network_*.type``, ``datasets.*.type``, loss
  and metric types) and values outside a fixed set of choices (``upsampler``, ``conv_type``, ...);
* combinations the network cannot run: stripe sizes not divisible by
  ``anchor_window_down_factor``; a stripe axis with neither a size nor a group count; head counts
  that do not divide the ``embed_dim / 2`` channels of their attention half (window or stripe);
  stage lists of different lengths; an ``upscale`` the reconstruction head cannot produce or that
  differs from the option file's ``scale``; ``in_channels`` / ``out_channels`` that do not match
  what the datasets deliver (gray noise/JPEG data: 1 channel, dual-pixel input: 6);
  ``val.tile.size`` smaller than the network's padding size, or an overlap that does not fit;
* missing files: dataset roots (``dataroot_*``), ``meta_info_file`` / ``meta_info`` (folder
  backends), ``path.pretrain_network_*``, ``path.resume_state``, ``vgg_weights`` of losses.

* BasicSR's own fields (:func:`check_basicsr`): the keys its pipelines and models read with
  ``opt[...]`` (missing, or misspelled: named with the key they should be), misspelled optional
  keys, types (numbers that YAML reads as text, e.g. ``lr: 2e-4``, booleans) and ranges of the
  counts, rates and factors, dataset phases, the scheduler and optimizer sections, a loss;
* a network that is not GRL whose output is not ``scale`` times its input (it is built and run
  once on a small input, :func:`check_network_output`; only from :func:`validate_file`, when
  nothing else is wrong).

Every problem is printed as one line ``<prog>: error: <file>: <dotted.key>=<value>: <what>``.
Nothing else here builds a network, and nothing reads a dataset.
"""
from __future__ import annotations

import ast
import copy
import difflib
import inspect
import os.path as osp
import sys
import textwrap
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, TextIO, Tuple

#: Problem kinds: ``'option'`` (a key or value of the file), ``'path'`` (a file that is missing).
OPTION, PATH = 'option', 'path'

#: Dataset keys that BasicSR itself sets or reads for every dataset (``parse_options``,
#: ``build_dataloader``, ``train_pipeline``) besides the keys the dataset class reads; ``gt_size``
#: is the conventional patch size (BasicSR's Real-ESRGAN files set it; ``--dry-run`` prints it).
COMMON_DATASET_KEYS = frozenset({
    'name', 'type', 'phase', 'scale', 'batch_size_per_gpu', 'num_worker_per_gpu', 'use_shuffle',
    'dataset_enlarge_ratio', 'prefetch_mode', 'num_prefetch_queue', 'pin_memory', 'persistent_workers',
    'gt_size', 'skip_corrupt'})  # skip_corrupt: grl_plugin.data.robust (also for basicsr's)

#: Keys of ``val.tile`` (:meth:`grl_plugin.models.GRLModel.test`).
TILE_KEYS = ('size', 'overlap', 'blend')

#: ``vgg_weights`` values that do not name a file (:class:`grl_plugin.losses.GRLPerceptualLoss`).
_NO_FILE = ('random', 'none', 'null', '~', '')


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an option file: the dotted ``key``, its ``value`` and what is wrong."""

    key: str
    value: Any
    message: str
    kind: str = OPTION

    def format(self, source: str) -> str:
        """``<source>: <key>=<value>: <message>`` on one line."""
        text = f'{source}: {self.key}={format_value(self.value)}: {self.message}'
        return ' '.join(text.split())


# ------------------------------------------------------------------------------------ helpers
def format_value(value: Any, limit: int = 80) -> str:
    """A short YAML-like rendering of an option value (``null``, ``true``, ``[8, 8]``, ``'a b'``);
    lists and mappings longer than ``limit`` characters are cut, strings (paths) never."""
    if value is None:
        text = 'null'
    elif isinstance(value, bool):
        text = 'true' if value else 'false'
    elif isinstance(value, str):
        plain = value and value.strip() == value and not any(c in value for c in ' :#,[]{}\'"')
        return value if plain else repr(value)
    elif isinstance(value, Mapping):
        text = '{' + ', '.join(f'{k}: {format_value(v, limit)}' for k, v in value.items()) + '}'
    elif isinstance(value, (list, tuple)):
        text = '[' + ', '.join(format_value(v, limit) for v in value) + ']'
    else:
        text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'


def closest(name: str, choices: Iterable[str]) -> Optional[str]:
    """The choice closest to ``name`` (:func:`difflib.get_close_matches`), or None."""
    choices = [str(c) for c in choices]
    match = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    if not match:  # case slips (GRL_t, pixelShuffle) score low on raw characters
        lower = {c.lower(): c for c in choices}
        match = [lower[m] for m in difflib.get_close_matches(str(name).lower(), list(lower), n=1, cutoff=0.6)]
    return match[0] if match else None


def _did_you_mean(name: Any, choices: Iterable[str]) -> str:
    best = closest(str(name), choices)
    return f" (did you mean '{best}'?)" if best is not None else ''


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pos_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _plain(obj: Any) -> Any:
    """OrderedDicts -> dicts, tuples -> lists (recursively)."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _in_registry(registry, name: Any) -> bool:
    """BasicSR's ``Registry.get`` also finds ``<name>_basicsr``."""
    return isinstance(name, str) and (name in registry or f'{name}_basicsr' in registry)


# ------------------------------------------------------------------------------------ network
@lru_cache(maxsize=None)
def grl_signature() -> Tuple[Tuple[str, ...], Dict[str, Any]]:
    """(keyword names, defaults) of :class:`grl_plugin.archs.GRL` -- the keys ``network_g`` may use."""
    from grl_plugin.archs.grl_arch import GRL
    params = [p for p in inspect.signature(GRL.__init__).parameters.values()
              if p.name != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return tuple(p.name for p in params), defaults


def grl_types() -> Dict[str, Optional[Dict[str, Any]]]:
    """``network_g.type`` names built by GRL: ``'GRL'`` -> None, preset name -> its kwargs."""
    from grl_plugin.archs.presets import PRESET_KWARGS
    out: Dict[str, Optional[Dict[str, Any]]] = {'GRL': None}
    out.update({name: dict(kwargs) for name, kwargs in PRESET_KWARGS.items()})
    return out


def network_kwargs(net_opt: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The kwargs GRL is built with for ``net_opt`` (class defaults < preset < given), or None
    when ``net_opt`` is not a GRL network. Unknown keys are left in (see :func:`check_network`)."""
    if not isinstance(net_opt, Mapping):
        return None
    kind = net_opt.get('type', 'GRL')
    types = grl_types()
    if not isinstance(kind, str) or kind not in types:
        return None
    _, defaults = grl_signature()
    kwargs = dict(copy.deepcopy(defaults))
    kwargs.update(copy.deepcopy(types[kind] or {}))
    kwargs.update({k: _plain(v) for k, v in net_opt.items() if k != 'type'})
    return kwargs


def pad_size(kwargs: Mapping[str, Any]) -> Optional[int]:
    """The padding multiple of a GRL built with ``kwargs`` (None if the geometry is invalid)."""
    from grl_plugin.layers.geometry import pad_multiple
    try:
        return int(pad_multiple(int(kwargs['window_size']), list(kwargs['stripe_size']),
                                list(kwargs['stripe_groups']), int(kwargs['anchor_window_down_factor'])))
    except (TypeError, ValueError, KeyError):
        return None


def _choices_problems(prefix: str, given: Mapping[str, Any], kwargs: Mapping[str, Any]) -> List[Problem]:
    from grl_plugin.archs.grl_arch import UPSAMPLERS
    from grl_plugin.layers.attention import ATTN_IMPLS
    from grl_plugin.layers.block import CONV_TYPES
    from grl_plugin.layers.stripe_attn import ANCHOR_PROJ_TYPES
    choices = {'upsampler': UPSAMPLERS, 'conv_type': CONV_TYPES, 'anchor_proj_type': ANCHOR_PROJ_TYPES,
               'attn_impl': ATTN_IMPLS, 'qkv_proj_type': ('linear',)}
    out = []
    for key, allowed in choices.items():
        value = kwargs.get(key)
        if key in kwargs and value not in allowed:
            shown = ', '.join(repr(a) for a in allowed)
            hint = _did_you_mean(value, [a for a in allowed if a]) if isinstance(value, str) else ''
            out.append(Problem(f'{prefix}.{key}', value, f'must be one of {shown}{hint}'))
    if kwargs.get('euclidean_dist'):
        out.append(Problem(f'{prefix}.euclidean_dist', kwargs['euclidean_dist'],
                           'not supported (no official configuration uses it); remove it or set false'))
    return out


def _blame(prefix: str, given: Mapping[str, Any], *keys: str) -> str:
    """The dotted key to name for a problem involving ``keys``: the first one the file sets."""
    for key in keys:
        if key in given:
            return f'{prefix}.{key}'
    return f'{prefix}.{keys[0]}'


def _stage_problems(prefix: str, given: Mapping[str, Any], kwargs: Mapping[str, Any]) -> List[Problem]:
    """Stage lists, embed_dim and the head counts of the window / stripe halves."""
    out = []
    dim = kwargs.get('embed_dim')
    if not _is_pos_int(dim):
        return [Problem(f'{prefix}.embed_dim', dim, 'must be a positive integer')]
    lists = {}
    for key in ('depths', 'num_heads_window', 'num_heads_stripe'):
        value = kwargs.get(key)
        if not isinstance(value, (list, tuple)) or not value or not all(_is_pos_int(v) for v in value):
            out.append(Problem(f'{prefix}.{key}', value, 'must be a list of positive integers, one per stage'))
        else:
            lists[key] = list(value)
    if out:
        return out
    n = len(lists['depths'])
    for key in ('num_heads_window', 'num_heads_stripe'):
        if len(lists[key]) != n:
            out.append(Problem(f'{prefix}.{key}', lists[key],
                               f'has {len(lists[key])} entries but depths {lists["depths"]} has {n} stages'))
    if dim % 2:
        out.append(Problem(f'{prefix}.embed_dim', dim, 'must be even: half of the channels go to window '
                                                       'attention, half to stripe attention'))
        return out
    half = dim // 2
    for key, what in (('num_heads_window', 'window'), ('num_heads_stripe', 'stripe')):
        bad = [(i, h) for i, h in enumerate(lists[key]) if half % h]
        if bad:
            i, h = bad[0]
            ok = [d for d in range(1, half + 1) if half % d == 0]
            blamed = _blame(prefix, given, key, 'embed_dim')
            out.append(Problem(blamed, kwargs[blamed.rsplit('.', 1)[1]],
                               f'{h} heads (stage {i}) do not divide the {half} channels of the {what} '
                               f'attention half (embed_dim {dim} / 2); head counts that fit: '
                               f'{", ".join(map(str, ok[:12]))}{", ..." if len(ok) > 12 else ""}'))
    return out


def _geometry_problems(prefix: str, given: Mapping[str, Any], kwargs: Mapping[str, Any]) -> List[Problem]:
    """Window / stripe sizes, stripe groups and the anchor down-factor."""
    out = []
    df, ws = kwargs.get('anchor_window_down_factor'), kwargs.get('window_size')
    if not _is_pos_int(df):
        out.append(Problem(f'{prefix}.anchor_window_down_factor', df, 'must be a positive integer'))
    if not _is_pos_int(ws):
        out.append(Problem(f'{prefix}.window_size', ws, 'must be a positive integer (a square window side)'))
    pairs = {}
    for key in ('stripe_size', 'stripe_groups'):
        value = kwargs.get(key)
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(v is None or _is_pos_int(v) for v in value)):
            out.append(Problem(f'{prefix}.{key}', value, 'must be a list of two positive integers or nulls '
                                                         '([height, width])'))
        else:
            pairs[key] = list(value)
    if out:
        return out
    sizes, groups = pairs['stripe_size'], pairs['stripe_groups']
    for axis, (s, g) in enumerate(zip(sizes, groups)):
        if s is None and g is None:
            blamed = _blame(prefix, given, 'stripe_size', 'stripe_groups')
            out.append(Problem(blamed, pairs[blamed.rsplit('.', 1)[1]],
                               f'axis {axis} has neither a stripe size nor a stripe group count '
                               f'(stripe_size {sizes}, stripe_groups {groups})'))
    bad = [s for s, g in zip(sizes, groups) if s is not None and g is None and s % df]
    if bad:
        blamed = _blame(prefix, given, 'stripe_size', 'anchor_window_down_factor')
        out.append(Problem(blamed, kwargs[blamed.rsplit('.', 1)[1]],
                           f'stripe size {bad[0]} is not divisible by anchor_window_down_factor {df} '
                           f'(anchors pool {df}x{df} pixels of each stripe)'))
    return out


def _upscale_problems(prefix: str, given: Mapping[str, Any], kwargs: Mapping[str, Any]) -> List[Problem]:
    up, upsampler = kwargs.get('upscale'), kwargs.get('upsampler')
    key = f'{prefix}.upscale'
    if not _is_pos_int(up):
        return [Problem(key, up, 'must be a positive integer')]
    if upsampler == 'pixelshuffle' and not (up == 3 or (up > 1 and up & (up - 1) == 0)):
        return [Problem(key, up, "upsampler 'pixelshuffle' supports upscale 2, 3, 4, 8, ... (powers of 2, or 3); "
                                 "use 'pixelshuffledirect' for other factors")]
    if upsampler == 'nearest+conv' and up != 4:
        return [Problem(key, up, "upsampler 'nearest+conv' supports upscale 4 only")]
    if upsampler == '' and up != 1:
        return [Problem(key, up, "upsampler '' (no upsampling: denoising, JPEG, demosaicking, deblurring) needs "
                                 "upscale 1; set an upsampler for super-resolution")]
    return []


def check_network(net_opt: Any, prefix: str = 'network_g', shape_keys: bool = True) -> List[Problem]:
    """Problems of a GRL ``network_g`` block (nothing for other architectures).

    ``shape_keys=False`` skips what the weights decide anyway (stage lists, heads, channels,
    upscale; ``grl-infer`` takes those from the checkpoint).
    """
    if not isinstance(net_opt, Mapping):
        return [Problem(prefix, net_opt, 'must be a mapping of network options')]
    kwargs = network_kwargs(net_opt)
    if kwargs is None:
        return []
    given = {k: v for k, v in net_opt.items() if k != 'type'}
    names, _ = grl_signature()
    out = [Problem(f'{prefix}.{k}', v, f'unknown key for {net_opt.get("type", "GRL")}{_did_you_mean(k, names)}')
           for k, v in given.items() if k not in names]
    out += _choices_problems(prefix, given, kwargs)
    out += _geometry_problems(prefix, given, kwargs)
    if shape_keys:
        out += _stage_problems(prefix, given, kwargs)
        out += _upscale_problems(prefix, given, kwargs)
        for key in ('in_channels',):
            if not _is_pos_int(kwargs.get(key)):
                out.append(Problem(f'{prefix}.{key}', kwargs.get(key), 'must be a positive integer'))
        if kwargs.get('out_channels') is not None and not _is_pos_int(kwargs['out_channels']):
            out.append(Problem(f'{prefix}.out_channels', kwargs['out_channels'], 'must be a positive integer or null'))
    return out


# ------------------------------------------------------------------------------------ datasets
def _reads_opt(node: ast.AST) -> bool:
    """``opt``, ``dataset_opt`` or ``<anything>.opt``: the names dataset code reads options from."""
    return ((isinstance(node, ast.Name) and node.id in ('opt', 'dataset_opt'))
            or (isinstance(node, ast.Attribute) and node.attr == 'opt'))


def _str_const(node: Optional[ast.AST]) -> Optional[str]:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


@lru_cache(maxsize=256)
def option_keys_in_source(source: str) -> FrozenSet[str]:
    """Option keys Python ``source`` reads: ``opt['k']``, ``opt.get('k')``, ``'k' in opt`` (also on
    ``self.opt`` / ``dataset_opt``), plus every string constant ``dataroot_*``."""
    try:
        tree = ast.parse(textwrap.dedent(source))
    except (SyntaxError, ValueError):
        return frozenset()
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _reads_opt(node.value):
            key = _str_const(node.slice)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ('get', 'pop', 'setdefault') and _reads_opt(node.func.value) and node.args):
            key = _str_const(node.args[0])
        elif (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn))
              and _reads_opt(node.comparators[0])):
            key = _str_const(node.left)
        else:
            key = _str_const(node)
            key = key if key and key.startswith('dataroot_') and key.isidentifier() else None
        if key:
            keys.add(key)
    return frozenset(keys)


def _source(obj: Any) -> str:
    """Source text of a module, class or function ('' when unavailable)."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ''


#: Packages whose dataset classes have their keys derived from their source.
_DATA_PACKAGES = ('grl_plugin.data', 'basicsr.data')


def _dataset_sources(cls: type) -> List[str]:
    """Source texts where a dataset's option keys are read: the modules of ``cls`` and of its
    bases in :data:`_DATA_PACKAGES`, and the helper functions those modules import from these
    packages (e.g. ``check_gt_size`` from ``grl_plugin.data.base``)."""
    sources = {}
    for klass in inspect.getmro(cls):
        if not klass.__module__.startswith(_DATA_PACKAGES):
            continue
        module = sys.modules.get(klass.__module__)
        if module is None:
            continue
        sources[module.__name__] = _source(module)
        for value in vars(module).values():
            where = str(getattr(value, '__module__', ''))
            if inspect.isfunction(value) and where.startswith(_DATA_PACKAGES) and where != module.__name__:
                sources[f'{where}.{value.__name__}'] = _source(value)
    return [text for text in sources.values() if text]


def dataset_known_keys(type_name: Any) -> Optional[FrozenSet[str]]:
    """Every key a dataset of ``type_name`` may have, or None when it cannot be derived (not
    registered, or a class defined outside ``grl_plugin.data`` / ``basicsr.data``, e.g. a user's
    subclass that reads keys of its own)."""
    from basicsr.utils.registry import DATASET_REGISTRY
    if not _in_registry(DATASET_REGISTRY, type_name):
        return None
    cls = DATASET_REGISTRY.get(type_name if type_name in DATASET_REGISTRY else f'{type_name}_basicsr')
    if not inspect.isclass(cls) or not cls.__module__.startswith(_DATA_PACKAGES):
        return None
    import basicsr.data
    keys = set(COMMON_DATASET_KEYS) | set(option_keys_in_source(_source(basicsr.data)))
    for text in _dataset_sources(cls):
        keys |= option_keys_in_source(text)
    return frozenset(keys)


def dataset_channels(ds_opt: Mapping[str, Any]) -> Optional[Tuple[int, Optional[int], str]]:
    """(input channels, GT channels or None, why) of the samples a dataset delivers, or None
    when unknown."""
    kind = ds_opt.get('type')
    if kind in ('GaussianNoiseDataset', 'JPEGDataset'):
        color = ds_opt.get('color', True)
        n = 3 if color else 1
        return n, n, f'color: {format_value(color)}'
    if kind == 'DemosaicDataset':
        return 3, 3, 'interpolated RGB mosaic'
    if kind == 'DualPixelDataset':
        return 6, 3, 'left + right views'
    if kind in ('PairedImageDataset', 'SingleImageDataset'):
        y = ds_opt.get('color') == 'y'
        n = 1 if y else 3
        return n, (None if kind == 'SingleImageDataset' else n), 'color: y' if y else 'RGB images'
    if kind == 'RealESRGANDataset':
        return 3, 3, 'RGB images'
    return None


def check_datasets(opt: Mapping[str, Any]) -> List[Problem]:
    """Dataset types and keys (unknown keys with the closest known one)."""
    from basicsr.utils.registry import DATASET_REGISTRY
    datasets = opt.get('datasets')
    if datasets is None:
        return []
    if not isinstance(datasets, Mapping):
        return [Problem('datasets', datasets, 'must be a mapping of phase -> dataset options')]
    out = []
    for phase, ds in datasets.items():
        prefix = f'datasets.{phase}'
        if not isinstance(ds, Mapping):
            out.append(Problem(prefix, ds, 'must be a mapping of dataset options'))
            continue
        kind = ds.get('type')
        if kind is None:
            continue  # BasicSR reports it
        if not _in_registry(DATASET_REGISTRY, kind):
            out.append(Problem(f'{prefix}.type', kind, 'not a registered dataset'
                                                       f'{_did_you_mean(kind, DATASET_REGISTRY.keys())}'))
            continue
        known = dataset_known_keys(kind)
        if known is None:
            continue
        out += [Problem(f'{prefix}.{k}', v, f'unknown key for {kind}{_did_you_mean(k, known)}')
                for k, v in ds.items() if k not in known]
    return out


# ------------------------------------------------------------------------- BasicSR's own fields
#: Shown as the value of a key the file lacks.
MISSING = '<missing>'

#: Keys BasicSR's pipelines and models read with ``opt[...]`` (a KeyError mid-run otherwise),
#: per mode; ``datasets.train.*`` only in training. Dataset-specific keys (``gt_size``,
#: ``use_hflip``, ``use_rot``) are required where the dataset's code reads them that way.
REQUIRED_KEYS = {
    'train': ('name', 'model_type', 'scale', 'num_gpu', 'network_g', 'path', 'datasets', 'datasets.train',
              'logger', 'logger.use_tb_logger', 'logger.print_freq', 'logger.save_checkpoint_freq', 'train',
              'train.total_iter', 'train.optim_g', 'train.scheduler'),
    'test': ('name', 'model_type', 'scale', 'num_gpu', 'network_g', 'path', 'datasets', 'val', 'val.save_img'),
}

#: Keys of the sections BasicSR and the plugin read, for "did you mean" on misspelled keys
#: (only a key close to one of these that the section lacks is reported: other keys are
#: left alone, models and datasets may read keys of their own).
KNOWN_KEYS = {
    '': ('name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'network_g', 'network_d', 'path',
         'train', 'val', 'logger', 'dist_params', 'find_unused_parameters', 'cudnn_deterministic'),
    'logger': ('print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb'),
    'train': ('total_iter', 'warmup_iter', 'ema_decay', 'optim_g', 'optim_d', 'scheduler', 'pixel_opt',
              'perceptual_opt', 'gan_opt', 'net_d_iters', 'net_d_init_iters', 'grad_clip', 'amp', 'nan_tolerance',
              'lean_backward'),
    'val': ('val_freq', 'save_img', 'metrics', 'tile', 'suffix', 'pbar', 'self_ensemble'),
    'path': ('pretrain_network_g', 'strict_load_g', 'param_key_g', 'resume_state', 'pretrain_network_d',
             'strict_load_d', 'param_key_d'),
}

#: ``train.scheduler.type`` values BasicSR's ``setup_schedulers`` builds.
SCHEDULERS = ('MultiStepLR', 'MultiStepRestartLR', 'CosineAnnealingRestartLR')

#: Dataset keys the training phase needs when the dataset's code reads them with ``opt[...]``.
_TRAIN_DATASET_KEYS = ('gt_size', 'use_hflip', 'use_rot')

_SUFFIXES = {'k': 10 ** 3, 'm': 10 ** 6}


def _number_text(text: str) -> Optional[float]:
    """The number a string such as ``'2e-4'``, ``'1e5'`` or ``'300k'`` stands for, or None."""
    text = text.strip().replace('_', '')
    try:
        return float(text)
    except ValueError:
        pass
    if text[-1:].lower() in _SUFFIXES:
        try:
            return float(text[:-1]) * _SUFFIXES[text[-1].lower()]
        except ValueError:
            return None
    return None


def _float_spelling(text: str) -> str:
    """``'2e-4'`` -> ``'2.0e-4'`` (the spelling YAML reads as a float)."""
    mantissa, e, exponent = text.strip().lower().partition('e')
    if e and '.' not in mantissa:
        return f'{mantissa}.0e{exponent}'
    return text.strip()


def _type_problem(key: str, value: Any, integer: bool) -> Optional[Problem]:
    """A Problem when ``value`` is not a number (an int for ``integer``), with the spelling that
    would be one; None when it is."""
    what = 'an integer' if integer else 'a number'
    if isinstance(value, bool):
        return Problem(key, value, f'must be {what}, not a boolean')
    if isinstance(value, str):
        number = _number_text(value)
        if number is None:
            return Problem(key, value, f'must be {what}, got the text {value!r}')
        if integer and number < 0:
            return Problem(key, value, f'is the text {value!r}, not {what}: write {number:g} unquoted in the file '
                                       '(--force_yml keeps negative numbers as text)')
        if integer:
            hint = f'write {int(number)}' if number == int(number) else 'write a whole number'
            return Problem(key, value, f'is text, not {what} (YAML reads {value} as a string): {hint}')
        if 'e' in value.lower() and '.' not in value.lower().partition('e')[0]:
            return Problem(key, value, f'is text, not a number: YAML reads exponents without a dot as strings; '
                                       f'write {_float_spelling(value)} or !!float {value.strip()}')
        return Problem(key, value, f'is text, not a number: write {number:g}')
    if integer and not _is_int(value):
        if isinstance(value, float) and value == int(value):
            return None  # 5.0e+5: BasicSR's int() and % take it
        return Problem(key, value, f'must be {what}')
    if not integer and not isinstance(value, (int, float)):
        return Problem(key, value, f'must be {what}')
    return None


def _number(out: List[Problem], node: Mapping[str, Any], prefix: str, key: str, integer: bool,
            ok, rule: str) -> None:
    """Check ``node[key]`` (when present): its type, then ``ok(value)`` (message ``rule``)."""
    if not isinstance(node, Mapping) or key not in node:
        return
    dotted = f'{prefix}.{key}' if prefix else key
    value = node[key]
    problem = _type_problem(dotted, value, integer)
    if problem is not None:
        out.append(problem)
    elif not ok(value):
        out.append(Problem(dotted, value, rule))


def _lookup(opt: Mapping[str, Any], dotted: str) -> Tuple[bool, Any, Optional[Mapping[str, Any]]]:
    """(found, value, parent mapping or None when a parent is missing / not a mapping)."""
    node: Any = opt
    keys = dotted.split('.')
    for key in keys[:-1]:
        if not isinstance(node, Mapping) or key not in node:
            return False, None, None
        node = node[key]
    if not isinstance(node, Mapping):
        return False, None, None
    return keys[-1] in node, node.get(keys[-1]), node


def _missing_problem(prefix: str, key: str, parent: Mapping[str, Any], why: str) -> Problem:
    """A required ``key`` absent from ``parent``: name a present key that looks like it, if any."""
    dotted = f'{prefix}.{key}' if prefix else key
    others = [str(k) for k in parent if k not in KNOWN_KEYS.get(prefix, ()) and k != key]
    best = closest(key, others)
    if best is not None and difflib.SequenceMatcher(None, key, best).ratio() >= 0.75:
        where = f'{prefix}.{best}' if prefix else best
        return Problem(where, parent[best], f"unknown key (did you mean '{key}'? {why})")
    return Problem(dotted, MISSING, f'missing: {why}')


def _required_problems(opt: Mapping[str, Any], mode: str) -> List[Problem]:
    out, reported = [], set()
    pipeline = "BasicSR's train pipeline" if mode == 'train' else "BasicSR's test pipeline"
    for dotted in REQUIRED_KEYS[mode]:
        found, _, parent = _lookup(opt, dotted)
        if found or parent is None:
            continue  # present, or its section is missing (reported once, for the section)
        prefix, _, key = dotted.rpartition('.')
        problem = _missing_problem(prefix, key, parent, f'{pipeline} reads it')
        if problem.key not in reported:
            reported.add(problem.key)
            out.append(problem)
    return out


def _misspelled_problems(opt: Mapping[str, Any]) -> List[Problem]:
    """Keys of the top level and of ``logger`` / ``train`` / ``val`` / ``path`` that are not
    known but close to a known key the section lacks (BasicSR would silently ignore them)."""
    out = []
    for prefix, known in KNOWN_KEYS.items():
        node = opt if not prefix else opt.get(prefix)
        if not isinstance(node, Mapping):
            continue
        for key, value in node.items():
            if not isinstance(key, str) or key in known:
                continue
            best = closest(key, [k for k in known if k not in node])
            if best is not None and difflib.SequenceMatcher(None, key, best).ratio() >= 0.8:
                dotted = f'{prefix}.{key}' if prefix else key
                out.append(Problem(dotted, value, f"unknown key (did you mean '{best}'?)"))
    return out


def _subscripted_keys(source: str) -> FrozenSet[str]:
    """Keys ``source`` reads with ``opt['key']`` (no default: required)."""
    try:
        tree = ast.parse(textwrap.dedent(source))
    except (SyntaxError, ValueError):
        return frozenset()
    return frozenset(key for node in ast.walk(tree)
                     if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _reads_opt(node.value)
                     for key in [_str_const(node.slice)] if key)


@lru_cache(maxsize=64)
def dataset_required_train_keys(type_name: Any) -> FrozenSet[str]:
    """Of ``gt_size`` / ``use_hflip`` / ``use_rot``, those the training dataset ``type_name``
    reads with ``opt[...]`` (empty when its code cannot be read)."""
    from basicsr.utils.registry import DATASET_REGISTRY
    if not _in_registry(DATASET_REGISTRY, type_name):
        return frozenset()
    cls = DATASET_REGISTRY.get(type_name if type_name in DATASET_REGISTRY else f'{type_name}_basicsr')
    if not inspect.isclass(cls):
        return frozenset()
    keys = set()
    for text in _dataset_sources(cls) or [_source(cls)]:
        keys |= _subscripted_keys(text)
    return frozenset(k for k in _TRAIN_DATASET_KEYS if k in keys)


def _dataset_field_problems(opt: Mapping[str, Any], mode: str) -> List[Problem]:
    datasets = opt.get('datasets')
    if not isinstance(datasets, Mapping):
        return []
    out = []
    phases = ('train', 'val') if mode == 'train' else ('train', 'val', 'test')
    scale = opt.get('scale')
    for phase, ds in datasets.items():
        prefix = f'datasets.{phase}'
        kind = str(phase).split('_')[0]
        if kind not in phases:
            allowed = "'train' and 'val' or 'val_<n>'" if mode == 'train' else "'test_<n>', 'val_<n>' or 'train'"
            out.append(Problem(prefix, ds if not isinstance(ds, Mapping) else ds.get('name'),
                               f'BasicSR does not know the dataset phase {kind!r}: name it {allowed}'))
            continue
        if not isinstance(ds, Mapping):
            continue  # check_datasets reports it
        for key in ('name', 'type'):
            if key not in ds:
                out.append(_missing_problem(prefix, key, ds, 'BasicSR reads it for every dataset'))
        if kind != 'train':
            continue
        need = ['batch_size_per_gpu', 'num_worker_per_gpu']
        need += sorted(dataset_required_train_keys(ds.get('type')))
        for key in need:
            if key not in ds:
                out.append(_missing_problem(prefix, key, ds, f'the training data loader of {ds.get("type")} '
                                                              'reads it'))
        _number(out, ds, prefix, 'batch_size_per_gpu', True, lambda v: v > 0, 'must be a positive integer')
        _number(out, ds, prefix, 'num_worker_per_gpu', True, lambda v: v >= 0,
                'must be an integer >= 0 (0: load in the main process)')
        _number(out, ds, prefix, 'dataset_enlarge_ratio', False, lambda v: v > 0, 'must be a positive number')
        _number(out, ds, prefix, 'gt_size', True, lambda v: v > 0, 'must be a positive integer (the patch side)')
        gt = ds.get('gt_size')
        if (_is_pos_int(gt) and _is_pos_int(scale) and 1 < scale <= 8 and ds.get('dataroot_lq') is not None
                and gt % scale):
            out.append(Problem(f'{prefix}.gt_size', gt, f'is not a multiple of scale {scale} (the LQ patch is '
                                                         f'gt_size / scale pixels): use {gt // scale * scale or scale}'))
        for key in ('use_hflip', 'use_rot'):
            if key in ds and not isinstance(ds[key], bool):
                out.append(Problem(f'{prefix}.{key}', ds[key], 'must be true or false'))
    return out


def _scheduler_problems(train: Mapping[str, Any]) -> List[Problem]:
    sched = train.get('scheduler')
    if 'scheduler' not in train:
        return []
    if not isinstance(sched, Mapping):
        return [Problem('train.scheduler', sched, 'must be a mapping with a type')]
    kind = sched.get('type')
    if kind not in SCHEDULERS:
        shown = ', '.join(SCHEDULERS)
        hint = _did_you_mean(kind, SCHEDULERS) if isinstance(kind, str) else ''
        return [Problem('train.scheduler.type', MISSING if kind is None else kind,
                        f'must be one of {shown}{hint}')]
    from basicsr.models import lr_scheduler
    cls = lr_scheduler.CosineAnnealingRestartLR if kind == 'CosineAnnealingRestartLR' else lr_scheduler.MultiStepRestartLR
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in ('self', 'optimizer', 'last_epoch')}
    out = [Problem(f'train.scheduler.{k}', v, f'unknown key for {kind}{_did_you_mean(k, params)}')
           for k, v in sched.items() if k != 'type' and k not in params]
    out += [Problem(f'train.scheduler.{n}', MISSING, f'missing: {kind} needs it')
            for n, p in params.items() if p.default is inspect.Parameter.empty and n not in sched]
    steps = 'milestones' if kind != 'CosineAnnealingRestartLR' else 'periods'
    value = sched.get(steps)
    if steps in sched:
        bad = next((_type_problem(f'train.scheduler.{steps}', v, True) for v in value
                    if _type_problem('', v, True) is not None), None) if isinstance(value, list) else None
        if not isinstance(value, list) or not value:
            out.append(Problem(f'train.scheduler.{steps}', value, 'must be a list of iteration counts'))
        elif bad is not None:
            out.append(Problem(f'train.scheduler.{steps}', value, f'entries must be integers: {bad.message}'))
        elif any(v <= 0 for v in value):
            out.append(Problem(f'train.scheduler.{steps}', value, 'must be positive iteration counts'))
        elif steps == 'milestones' and any(b <= a for a, b in zip(value, value[1:])):
            out.append(Problem(f'train.scheduler.{steps}', value, 'must be strictly increasing'))
    _number(out, sched, 'train.scheduler', 'gamma', False, lambda v: v > 0, 'must be a positive number')
    _number(out, sched, 'train.scheduler', 'eta_min', False, lambda v: v >= 0, 'must be a number >= 0')
    weights = sched.get('restart_weights')
    if kind == 'CosineAnnealingRestartLR' and isinstance(value, list) and 'restart_weights' in sched:
        if not isinstance(weights, list) or len(weights) != len(value):
            out.append(Problem('train.scheduler.restart_weights', weights,
                               f'must be a list with one weight per period ({len(value)})'))
    return out


def _optimizer_problems(train: Mapping[str, Any]) -> List[Problem]:
    import torch
    out = []
    names = sorted(n for n in dir(torch.optim) if inspect.isclass(getattr(torch.optim, n))
                   and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != 'Optimizer')
    for key, optim in train.items():
        if not (isinstance(key, str) and key.startswith('optim_')):
            continue
        prefix = f'train.{key}'
        if not isinstance(optim, Mapping):
            out.append(Problem(prefix, optim, 'must be a mapping with type and lr'))
            continue
        kind = optim.get('type')
        if kind not in names:
            same = [n for n in names if isinstance(kind, str) and n.lower() == kind.lower()]
            hint = f" (did you mean '{same[0]}'?)" if same else _did_you_mean(kind, names) if isinstance(kind, str) else ''
            out.append(Problem(f'{prefix}.type', MISSING if kind is None else kind,
                               f'must name a torch.optim optimizer (e.g. Adam, AdamW){hint}'))
        if 'lr' not in optim:
            out.append(_missing_problem(prefix, 'lr', optim, 'the optimizer needs a learning rate'))
        _number(out, optim, prefix, 'lr', False, lambda v: v > 0, 'must be a positive number')
        _number(out, optim, prefix, 'weight_decay', False, lambda v: v >= 0, 'must be a number >= 0')
        betas = optim.get('betas')
        if 'betas' in optim and not (isinstance(betas, list) and len(betas) == 2
                                     and all(_type_problem('', b, False) is None and 0 <= b < 1 for b in betas)):
            out.append(Problem(f'{prefix}.betas', betas, 'must be two numbers in [0, 1), e.g. [0.9, 0.99]'))
    return out


def _train_field_problems(opt: Mapping[str, Any]) -> List[Problem]:
    train = opt.get('train')
    if not isinstance(train, Mapping):
        return [] if train is None else [Problem('train', train, 'must be a mapping of training options')]
    out: List[Problem] = []
    _number(out, train, 'train', 'total_iter', True, lambda v: v > 0, 'must be a positive number of iterations')
    _number(out, train, 'train', 'warmup_iter', True, lambda v: v >= -1,
            'must be an integer >= -1 (-1: no warm-up)')
    _number(out, train, 'train', 'ema_decay', False, lambda v: 0 <= v < 1,
            'must be in [0, 1) (0: no EMA; e.g. 0.999)')
    out += _optimizer_problems(train)
    out += _scheduler_problems(train)
    for key, loss in train.items():
        if isinstance(key, str) and key.endswith('_opt') and isinstance(loss, Mapping):
            _number(out, loss, f'train.{key}', 'loss_weight', False, lambda v: v >= 0, 'must be a number >= 0')
    from basicsr.models.sr_model import SRModel
    from basicsr.utils.registry import MODEL_REGISTRY
    kind = opt.get('model_type')
    model = MODEL_REGISTRY.get(kind) if _in_registry(MODEL_REGISTRY, kind) else None
    if (inspect.isclass(model) and issubclass(model, SRModel)
            and not train.get('pixel_opt') and not train.get('perceptual_opt')):
        losses = [k for k in train if isinstance(k, str) and k not in KNOWN_KEYS['train']]
        best = closest('pixel_opt', losses) or closest('perceptual_opt', losses)
        if best is not None:
            out.append(Problem(f'train.{best}', train[best], "unknown key (did you mean 'pixel_opt' or "
                                                              "'perceptual_opt'? the model needs one of them)"))
        else:
            out.append(Problem('train.pixel_opt', MISSING, f'{kind} needs a loss: train.pixel_opt or '
                                                           'train.perceptual_opt (e.g. {type: L1Loss})'))
    return out


def _top_field_problems(opt: Mapping[str, Any], mode: str) -> List[Problem]:
    out: List[Problem] = []
    if 'name' in opt and (not isinstance(opt['name'], str) or not opt['name']):
        out.append(Problem('name', opt['name'], 'must be a non-empty string (the run folder name)'))
    num_gpu = opt.get('num_gpu')
    if 'num_gpu' in opt and num_gpu != 'auto':
        _number(out, opt, '', 'num_gpu', True, lambda v: v >= 0, "must be an integer >= 0 or 'auto' (0: CPU)")
    _number(out, opt, '', 'scale', True, lambda v: 1 <= v <= 8, 'must be an integer in 1..8 (1: restoration)')
    if opt.get('manual_seed') is not None and not _is_int(opt['manual_seed']):
        out.append(Problem('manual_seed', opt['manual_seed'], 'must be an integer (or null: a random seed)'))
    for section in ('path', 'logger', 'val'):
        if section in opt and opt[section] is not None and not isinstance(opt[section], Mapping):
            out.append(Problem(section, opt[section], 'must be a mapping'))
    logger = opt.get('logger')
    if mode == 'train' and isinstance(logger, Mapping):
        _number(out, logger, 'logger', 'print_freq', True, lambda v: v > 0, 'must be a positive number of iterations')
        _number(out, logger, 'logger', 'save_checkpoint_freq', True, lambda v: v > 0,
                'must be a positive number of iterations')
        if 'use_tb_logger' in logger and not isinstance(logger['use_tb_logger'], bool):
            out.append(Problem('logger.use_tb_logger', logger['use_tb_logger'], 'must be true or false'))
        wandb = logger.get('wandb')
        if (isinstance(wandb, Mapping) and wandb.get('project') is not None and logger.get('use_tb_logger') is not True
                and 'debug' not in str(opt.get('name', ''))):
            out.append(Problem('logger.use_tb_logger', logger.get('use_tb_logger', MISSING),
                               'must be true when logger.wandb.project is set (BasicSR asserts it)'))
    val = opt.get('val')
    if isinstance(val, Mapping):
        if mode == 'train':
            if 'val_freq' not in val:
                out.append(_missing_problem('val', 'val_freq', val, "BasicSR's train pipeline reads it"))
            if 'save_img' not in val:
                out.append(_missing_problem('val', 'save_img', val, "BasicSR's train pipeline reads it"))
            _number(out, val, 'val', 'val_freq', True, lambda v: v > 0, 'must be a positive number of iterations')
        if 'save_img' in val and not isinstance(val['save_img'], bool):
            out.append(Problem('val.save_img', val['save_img'], 'must be true or false'))
        if 'self_ensemble' in val and not isinstance(val['self_ensemble'], bool):
            out.append(Problem('val.self_ensemble', val['self_ensemble'],
                               'must be true (x8 self-ensemble) or false'))
    return out


def check_basicsr(opt: Mapping[str, Any], mode: str = 'train') -> List[Problem]:
    """BasicSR's own option fields: required keys (a misspelled one is named with the key it
    should be), misspelled optional keys, the types (numbers YAML reads as text, e.g. ``2e-4``)
    and ranges of the counts, rates and factors BasicSR reads, dataset phases, the scheduler
    and optimizer sections, and a loss for SRModel-based training."""
    out = _required_problems(opt, mode)
    named = {p.key for p in out}
    out += [p for p in _misspelled_problems(opt) if p.key not in named]
    out += _top_field_problems(opt, mode)
    out += _dataset_field_problems(opt, mode)
    if mode == 'train':
        out += _train_field_problems(opt)
    seen, unique = set(), []
    for problem in out:  # one line per key
        if problem.key not in seen:
            seen.add(problem.key)
            unique.append(problem)
    return unique


# ------------------------------------------------------------------------------ combinations
def check_registered(opt: Mapping[str, Any]) -> List[Problem]:
    """``model_type``, ``network_*.type``, loss and metric types name registered components."""
    from basicsr.utils.registry import ARCH_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY
    out = []

    def check(key: str, value: Any, registry, what: str) -> None:
        if value is not None and not _in_registry(registry, value):
            out.append(Problem(key, value, f'not a registered {what}{_did_you_mean(value, registry.keys())}'))

    check('model_type', opt.get('model_type'), MODEL_REGISTRY, 'model')
    for key, value in opt.items():
        if isinstance(key, str) and key.startswith('network_') and isinstance(value, Mapping):
            check(f'{key}.type', value.get('type'), ARCH_REGISTRY, 'architecture')
    train = opt.get('train')
    for key, value in (train.items() if isinstance(train, Mapping) else ()):
        if isinstance(key, str) and key.endswith('_opt') and isinstance(value, Mapping):
            check(f'train.{key}.type', value.get('type'), LOSS_REGISTRY, 'loss')
    val = opt.get('val')
    metrics = val.get('metrics') if isinstance(val, Mapping) else None
    for key, value in (metrics.items() if isinstance(metrics, Mapping) else ()):
        if isinstance(value, Mapping):
            check(f'val.metrics.{key}.type', value.get('type'), METRIC_REGISTRY, 'metric')
    return out


def check_scale(opt: Mapping[str, Any], kwargs: Mapping[str, Any]) -> List[Problem]:
    """The option file's ``scale`` (data, metrics, tiling) equals ``network_g.upscale``."""
    scale, up = opt.get('scale'), kwargs.get('upscale')
    if not _is_pos_int(scale) or scale > 8 or not _is_pos_int(up) or scale == up:  # (bad scale: check_basicsr)
        return []
    return [Problem('network_g.upscale', up, f'differs from the option file\'s scale {format_value(scale)} '
                                             '(the data and the metrics use scale; they must be equal)')]


def check_channels(opt: Mapping[str, Any], kwargs: Mapping[str, Any]) -> List[Problem]:
    """``in_channels`` / ``out_channels`` match the channels every dataset delivers."""
    datasets = opt.get('datasets')
    if not isinstance(datasets, Mapping):
        return []
    cin = kwargs.get('in_channels')
    cout = kwargs.get('out_channels') or cin
    if not _is_pos_int(cin) or not _is_pos_int(cout):
        return []
    for phase, ds in datasets.items():
        info = dataset_channels(ds) if isinstance(ds, Mapping) else None
        if info is None:
            continue
        lq, gt, why = info
        where = f'datasets.{phase} ({ds.get("type")}, {why})'
        if lq != cin:
            return [Problem('network_g.in_channels', cin, f'{where} gives {lq}-channel inputs')]
        if gt is not None and gt != cout:
            key = 'network_g.out_channels'
            return [Problem(key, kwargs.get('out_channels'),
                            f'the network outputs {cout} channels but {where} has {gt}-channel ground truth')]
    return []


def check_tile(opt: Mapping[str, Any], kwargs: Optional[Mapping[str, Any]]) -> List[Problem]:
    """``val.tile`` keys, blend, and size / overlap against the network's padding size."""
    from grl_plugin.tiling import BLENDS
    val = opt.get('val')
    tile = val.get('tile') if isinstance(val, Mapping) else None
    if tile is None:
        return []
    if _is_int(tile):
        tile = {'size': tile}
    if not isinstance(tile, Mapping):
        return [Problem('val.tile', tile, 'must be a tile size or a mapping {size, overlap, blend}')]
    out = [Problem(f'val.tile.{k}', v, f'unknown key{_did_you_mean(k, TILE_KEYS)}')
           for k, v in tile.items() if k not in TILE_KEYS]
    blend = tile.get('blend', 'linear')
    if blend not in BLENDS:
        out.append(Problem('val.tile.blend', blend, f'must be one of {", ".join(map(repr, BLENDS))}'
                                                    f'{_did_you_mean(blend, BLENDS)}'))
    size, overlap = tile.get('size'), tile.get('overlap', 0)
    if size is None or size == 0:
        return out
    if not _is_int(size) or size < 0:
        return out + [Problem('val.tile.size', size, 'must be a non-negative integer (0: whole images)')]
    pad = pad_size(kwargs) if kwargs is not None else None
    if pad is not None and size < pad:
        out.append(Problem('val.tile.size', size, f"smaller than the network's padding size {pad} (tiles are "
                                                  f'multiples of it): use 0 for whole images or a size >= {pad}'))
        return out
    tile_px = -(-size // pad) * pad if pad else size
    if not _is_int(overlap) or not 0 <= overlap < tile_px:
        out.append(Problem('val.tile.overlap', overlap, f'must be an integer in [0, {tile_px}) (the tile is '
                                                        f'{tile_px} pixels)'))
    return out


# ------------------------------------------------------------------------ network output size
#: Side of the probe input (a multiple of the network's ``pad_size`` when it has one).
PROBE_SIDE = 32


def _upscale_key(net_opt: Mapping[str, Any]) -> Tuple[str, Any]:
    """The dotted key that sets the network's scale factor (``upscale`` / ``scale`` of
    ``network_g`` or of its ``backbone``), for the problem line; ``network_g.type`` otherwise."""
    for prefix, node in (('network_g', net_opt), ('network_g.backbone', net_opt.get('backbone'))):
        if isinstance(node, Mapping):
            for key in ('upscale', 'scale', 'upscale_factor'):
                if key in node:
                    return f'{prefix}.{key}', node[key]
    return 'network_g.type', net_opt.get('type')


def check_network_output(opt: Mapping[str, Any]) -> List[Problem]:
    """Build a non-GRL ``network_g`` (GRLUNet, GRLInserted, BasicSR or user archs: their scale
    factor is not known from the options) on the CPU and run it once on a small zero input; a
    problem when the output is not ``scale`` times the input, the tensor-size error the first
    training iteration (or the first test image) would otherwise stop with. Networks that
    cannot be built or run here are left to BasicSR. The RNG state is kept."""
    net_opt, scale = opt.get('network_g'), opt.get('scale')
    if not isinstance(net_opt, Mapping) or not _is_pos_int(scale) or network_kwargs(net_opt) is not None:
        return []  # GRL: upscale vs scale is checked from the options (check_scale)
    import torch
    from basicsr.utils.registry import ARCH_REGISTRY
    kwargs = {k: v for k, v in _plain(net_opt).items() if k != 'type'}
    try:
        # the class itself, not build_network: that would set up BasicSR's logger before the run
        # gives it its log file
        cls = ARCH_REGISTRY.get(net_opt.get('type'))
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            net = cls(**kwargs).eval()
            conv = next((m for m in net.modules() if isinstance(m, torch.nn.Conv2d)), None)
            if conv is None:
                return []
            pad = getattr(net, 'pad_size', None)
            side = -(-PROBE_SIDE // pad) * pad if _is_pos_int(pad) else PROBE_SIDE
            out = net(torch.zeros(1, conv.in_channels, side, side))
    except Exception:  # noqa: BLE001 - BasicSR reports what cannot be built, with its own message
        return []
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        return []
    got = tuple(out.shape[-2:])
    if got == (side * scale, side * scale):
        return []
    factor = got[1] / side
    shown = f'{factor:g}' if got[0] == got[1] else f'{got[0] / side:g} x {factor:g}'
    key, value = _upscale_key(net_opt)
    return [Problem(key, value, f'network_g ({net_opt.get("type")}) outputs {got[0]}x{got[1]} for a {side}x{side} '
                                f'input (x{shown}) but the option file\'s scale is {scale}: make them equal')]


# ------------------------------------------------------------------------------------- paths
def _expand(path: str) -> str:
    return osp.expandvars(osp.expanduser(path))


def check_paths(opt: Mapping[str, Any], mode: str = 'train', auto_resume: bool = False) -> List[Problem]:
    """Files and folders the run will open: dataset roots and file lists, weights, states."""
    out = []
    datasets = opt.get('datasets')
    for phase, ds in (datasets.items() if isinstance(datasets, Mapping) else ()):
        if not isinstance(ds, Mapping):
            continue
        backend = ds.get('io_backend')
        lmdb = isinstance(backend, Mapping) and backend.get('type') == 'lmdb'
        for key, value in ds.items():
            if not isinstance(value, str) or not value:
                continue
            if str(key).startswith('dataroot') and not osp.exists(_expand(value)):
                out.append(Problem(f'datasets.{phase}.{key}', value, 'no such file or directory', PATH))
            elif key in ('meta_info_file', 'meta_info') and not lmdb and not osp.isfile(_expand(value)):
                out.append(Problem(f'datasets.{phase}.{key}', value, 'no such file', PATH))
    path_opt = opt.get('path')
    path_opt = path_opt if isinstance(path_opt, Mapping) else {}
    resume = path_opt.get('resume_state')
    resuming = auto_resume or bool(resume)
    for key, value in path_opt.items():
        if not isinstance(value, str) or not value:
            continue
        if (key == 'resume_state' and not auto_resume) or (str(key).startswith('pretrain_network') and not resuming):
            if not osp.isfile(_expand(value)):
                what = 'is a directory, not a file' if osp.isdir(_expand(value)) else 'no such file'
                out.append(Problem(f'path.{key}', value, what, PATH))
    train = opt.get('train')
    for key, loss in (train.items() if mode == 'train' and isinstance(train, Mapping) else ()):
        vgg = loss.get('vgg_weights') if isinstance(loss, Mapping) else None
        if isinstance(vgg, str) and vgg.strip().lower() not in _NO_FILE and not osp.isfile(_expand(vgg)):
            out.append(Problem(f'train.{key}.vgg_weights', vgg, "no such file (torchvision's vgg19-dcbb9e9d.pth; "
                                                               "'random' for tests)", PATH))
    return out


# ------------------------------------------------------------------------------ entry points
def apply_force_yml(opt: Mapping[str, Any], entries: Optional[Sequence[str]]) -> Tuple[dict, List[Problem]]:
    """A copy of ``opt`` with BasicSR's ``--force_yml key:sub=value`` overrides applied (same value
    parsing), and the problems of entries whose section does not exist."""
    out = copy.deepcopy(dict(opt))
    problems: List[Problem] = []
    if not entries:
        return out, problems
    from basicsr.utils.options import _postprocess_yml_value
    for entry in entries:
        keys, _, value = entry.partition('=')
        path = [k.strip() for k in keys.strip().split(':')]
        node: Any = out
        for i, key in enumerate(path[:-1]):
            if not isinstance(node, dict) or key not in node:
                problems.append(Problem('.'.join(path), value.strip(),
                                        f"--force_yml: no section {'.'.join(path[:i + 1])!r} in the option file"))
                node = None
                break
            node = node[key]
        if node is None:
            continue
        if not isinstance(node, dict):
            problems.append(Problem('.'.join(path), value.strip(),
                                    f"--force_yml: {'.'.join(path[:-1])!r} is not a section"))
            continue
        try:
            node[path[-1]] = _postprocess_yml_value(value.strip())
        except Exception:  # noqa: BLE001 - eval of a bad literal: BasicSR keeps the text
            node[path[-1]] = value.strip()
    return out, problems


def validate_options(opt: Mapping[str, Any], mode: str = 'train', paths: bool = True,
                     auto_resume: bool = False) -> List[Problem]:
    """Every problem of a BasicSR option dict for ``grl-train`` (``mode='train'``) / ``grl-test``.

    ``paths=False`` skips the file checks (``--dry-run`` reports missing files itself;
    ``grl-prepare`` checks the files it writes before their data exists). ``auto_resume``: the
    training state is looked up by BasicSR, so ``resume_state`` / ``pretrain_network_*`` are
    not checked.
    """
    out = check_basicsr(opt, mode)
    out += check_registered(opt)
    out += check_datasets(opt)
    net = opt.get('network_g')
    kwargs = None
    if net is not None:
        net_problems = check_network(net)
        out += net_problems
        kwargs = network_kwargs(net) if isinstance(net, Mapping) else None
        if kwargs is not None:  # each network key is reported once
            named = {p.key for p in net_problems}
            out += [p for p in check_scale(opt, kwargs) + check_channels(opt, kwargs) if p.key not in named]
    out += check_tile(opt, kwargs if kwargs is not None and pad_size(kwargs) else None)
    if paths:
        out += check_paths(opt, mode, auto_resume)
    seen = set()
    return [p for p in out if not (p.key in seen or seen.add(p.key))]  # one line per key


def validate_file(opt: Mapping[str, Any], mode: str = 'train', force_yml: Optional[Sequence[str]] = None,
                  paths: bool = True, auto_resume: bool = False, prog: str = 'grl') -> List[Problem]:
    """:func:`validate_options` of ``opt`` after the ``--force_yml`` overrides.

    When nothing else is wrong, a network that is not GRL is built and probed for its scale
    factor (:func:`check_network_output`). A failure of the checks themselves never stops a
    run: it is reported as a one-line warning
    (``<prog>: warning: ...``) and BasicSR's own checks remain.
    """
    try:
        opt, problems = apply_force_yml(opt, force_yml)
        problems += validate_options(opt, mode, paths=paths, auto_resume=auto_resume)
        return problems or check_network_output(opt)
    except Exception as err:  # noqa: BLE001 - a bug here must not block a valid run
        text = ' '.join(str(err).split()) or type(err).__name__
        print(f'{prog}: warning: option checks skipped ({type(err).__name__}: {text})', file=sys.stderr)
        return []


def validate_option_text(text: str, mode: str = 'train') -> List[Problem]:
    """:func:`validate_options` (without file checks) of option-file text, read with BasicSR's
    YAML loader; for tools that write option files (``grl-prepare``)."""
    import yaml
    from basicsr.utils.options import ordered_yaml
    opt = yaml.load(text, Loader=ordered_yaml()[0])
    if not isinstance(opt, Mapping):
        return [Problem('<file>', type(opt).__name__, 'must hold a mapping of options')]
    return validate_options(opt, mode, paths=False)


def validate_network_file(opt: Mapping[str, Any]) -> List[Problem]:
    """Problems of the parts of an option file that ``grl-infer --opt`` uses: the GRL geometry of
    ``network_g`` (unknown keys, choices, stripes vs down-factor; the weights decide channels,
    stages and heads) and ``val.tile``."""
    net = opt.get('network_g')
    out = check_network(net, shape_keys=False) if net is not None else []
    kwargs = network_kwargs(net) if isinstance(net, Mapping) else None
    return out + check_tile(opt, kwargs if kwargs is not None and not out and pad_size(kwargs) else None)


def report(prog: str, source: str, problems: Sequence[Problem], file: Optional[TextIO] = None) -> int:
    """Print one ``<prog>: error: <source>: <key>=<value>: <what>`` line per problem; returns 2."""
    stream = file if file is not None else sys.stderr
    for problem in problems:
        print(f'{prog}: error: {problem.format(source)}', file=stream)
    stream.flush()
    return 2
