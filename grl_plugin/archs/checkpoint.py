"""Read GRL weights from official Lightning, BasicSR, bare and safetensors files; write converted ones.

:func:`load_checkpoint` returns ``(state_dict, kwargs)``: bare GRL parameter keys (no buffers, no
engine entries, no discriminator) ready for ``GRL(**kwargs).load_state_dict(sd, strict=True)``,
and a :class:`ModelKwargs` dict that records where each value came from. Shape-determined kwargs
are inferred from the weights; window/stripe geometry comes from the stored Hydra config, the
``grl_kwargs`` a file carries (GRLModel's ``net_g_<iter>.pth``, :func:`save_converted`'s output,
safetensors metadata), a ``<stem>.yml`` sidecar, the shapes of the 13 official buffers, or the
caller (``geometry=``); it is never guessed: a file without it raises :class:`CheckpointError`
unless ``require_geometry=False`` (then ``kwargs.missing`` lists it).

Pickles are read with ``weights_only=True`` first; official checkpoints (OmegaConf objects in
``hyper_parameters``) then go through a restricted unpickler that maps omegaconf/typing classes
to inert stand-ins and refuses every other global unless ``trust=True``. :func:`torch_load` is the
same reader for any torch file (BasicSR networks and training states); :func:`check_fit` turns
"these weights do not fit that network" into one line listing the first differing keys.
Pure torch + safetensors + pyyaml: no basicsr, no omegaconf needed.
"""
from __future__ import annotations

import _compat_pickle
import functools
import json
import math
import pickle
import re
import types
import warnings
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import yaml

__all__ = ['CheckpointError', 'CheckpointNotFoundError', 'CheckpointReadError', 'CheckpointWarning', 'ModelKwargs', 'load_checkpoint', 'save_converted',
           'infer_kwargs', 'infer_geometry', 'torch_load', 'fit_problems', 'check_fit', 'GRL_KWARGS',
           'GEOMETRY_KEYS', 'BUFFER_KEYS']

#: Official constructor kwargs that affect the model (the ignored YAML extras are dropped).
GRL_KWARGS = ('img_size', 'in_channels', 'out_channels', 'embed_dim', 'upscale', 'img_range', 'upsampler',
              'depths', 'num_heads_window', 'num_heads_stripe', 'window_size', 'stripe_size', 'stripe_groups',
              'stripe_shift', 'mlp_ratio', 'qkv_bias', 'qkv_proj_type', 'anchor_proj_type', 'anchor_one_stage',
              'anchor_window_down_factor', 'out_proj_type', 'local_connection', 'drop_rate', 'attn_drop_rate',
              'drop_path_rate', 'pretrained_window_size', 'pretrained_stripe_size', 'conv_type', 'init_method',
              'fairscale_checkpoint', 'offload_to_cpu', 'euclidean_dist')
#: Not recoverable from parameter shapes (only from the config or the official buffers).
GEOMETRY_KEYS = ('window_size', 'stripe_size', 'stripe_groups', 'stripe_shift', 'anchor_window_down_factor')
BUFFER_KEYS = ('table_w', 'table_sh', 'table_sv', 'index_w', 'index_sh_a2w', 'index_sh_w2a', 'index_sv_a2w',
               'index_sv_w2a', 'mask_w', 'mask_sh_a2w', 'mask_sh_w2a', 'mask_sv_a2w', 'mask_sv_w2a')
ENGINE_KEYS = ('current_val_metric', 'best_val_metric', 'best_iter')
_DROP_PARTS = ('relative_coords_table', 'relative_position_index', 'attn_mask')
_TOP = ('conv_first.', 'norm_start.', 'layers.', 'norm_end.', 'conv_after_body.', 'conv_before_upsample.',
        'upsample.', 'conv_up1.', 'conv_up2.', 'conv_hr.', 'conv_last.')


class CheckpointError(ValueError, RuntimeError):
    """The file cannot be read or holds no usable GRL weights (one-line message naming the file).
    A ``RuntimeError`` as what ``torch.load`` / ``load_state_dict`` raise in BasicSR's loaders."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The file does not exist (also a ``FileNotFoundError``, as from ``torch.load``)."""


class CheckpointReadError(CheckpointError, OSError):
    """The file exists but cannot be read (also an ``OSError``, as from ``torch.load``)."""


class CheckpointWarning(UserWarning):
    """Something needed to build the model is not stored in the checkpoint."""


class ModelKwargs(dict):
    """GRL kwargs plus provenance: ``format`` (detected file kind), ``origin`` (key -> 'config'
    (Lightning Hydra config), 'metadata' (the file's own ``grl_kwargs``: a BasicSR ``.pth`` entry
    or safetensors metadata), 'sidecar', 'weights', 'buffers', 'assumed' or 'given') and
    ``missing`` (keys that must be supplied, e.g. from a task preset or explicit kwargs)."""

    def __init__(self, *args: Any, format: str = '', **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.format, self.origin, self.missing = format, {}, []


# ----------------------------------------------------------------------------------------------
# restricted unpickling


class _Stub:
    """Inert stand-in for an omegaconf/typing class: records constructor args and pickled state."""
    _origin = '?'

    def __new__(cls, *args: Any, **kwargs: Any) -> '_Stub':
        obj = object.__new__(cls)
        obj.__dict__['_args'] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state, )
        for part in parts:
            if isinstance(part, dict):
                self.__dict__.update(part)
            elif part is not None:
                self.__dict__['_state'] = part

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault('_items', {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault('_list', []).append(value)

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f'<{self._origin}>'


_STUBS: dict = {}


def _stub(module: str, name: str) -> type:
    if (module, name) not in _STUBS:
        _STUBS[module, name] = type(name, (_Stub, ), {'_origin': f'{module}.{name}'})
    return _STUBS[module, name]


class _Refused(pickle.UnpicklingError):
    pass


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Safe ``copyreg._reconstructor`` (protocol 0/1 objects): only for stand-in classes."""
    if isinstance(cls, type) and issubclass(cls, _Stub):
        return cls.__new__(cls)
    raise _Refused(f'copyreg._reconstructor for {cls!r}')


_SAFE = {('collections', 'OrderedDict'): OrderedDict, ('collections', 'defaultdict'): defaultdict,
         ('copyreg', '_reconstructor'): _reconstructor,
         **{('builtins', t.__name__): t for t in (dict, list, tuple, set, frozenset, int, float, str, bool,
                                                    bytes, bytearray, complex, slice, object)}}


@functools.lru_cache(maxsize=None)
def _torch_allowed() -> dict:
    """torch's own weights_only allow-list (tensor rebuild functions, dtypes, Size, Counter...)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return dict(_get_allowed_globals())
    except ImportError:  # private API moved: fall back to the essentials
        from torch import _utils
        return {f'torch._utils.{n}': getattr(_utils, n) for n in ('_rebuild_tensor', '_rebuild_tensor_v2',
                                                                 '_rebuild_parameter') if hasattr(_utils, n)}


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows tensor rebuilding, plain containers and inert omegaconf/typing stand-ins; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _SAFE:
            return _SAFE[module, name]
        if module.split('.')[0] in ('omegaconf', 'typing') and name.isidentifier():
            return _stub(module, name)
        allowed = _torch_allowed().get(f'{module}.{name}')
        if allowed is None:
            raise _Refused(f'{module}.{name}')
        return allowed


_restricted_pickle = types.ModuleType('grl_restricted_pickle')
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()


def _to_plain(obj: Any) -> Any:
    """Turn stand-ins (``_content`` containers, ``_val`` nodes) and containers into plain python."""
    if isinstance(obj, _Stub):
        if '_content' in obj.__dict__:
            return _to_plain(obj._content)
        if '_val' in obj.__dict__:
            return _to_plain(obj._val)
        return repr(obj)
    if isinstance(obj, dict):
        return {_to_plain(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _resolve(value: Any, root: Any, depth: int = 0) -> Any:
    """Resolve absolute ``${a.b}`` interpolations against the root config (others are left as is)."""
    match = re.fullmatch(r'\$\{([A-Za-z_][\w.]*)\}', value) if isinstance(value, str) else None
    if match and depth < 16:
        node = root
        for part in match.group(1).split('.'):
            if not isinstance(node, dict) or part not in node:
                return value
            node = node[part]
        return _resolve(node, root, depth + 1)
    if isinstance(value, dict):
        return {k: _resolve(v, root, depth) for k, v in value.items()}
    return [_resolve(v, root, depth) for v in value] if isinstance(value, list) else value


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f'{type(err).__name__}: {text[0] if text else ""}'.rstrip(': ')


def _torch_load(path: Path, trust: bool, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # OmegaConf objects, or not a checkpoint at all: try the restricted reader
        pass
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_restricted_pickle)
    except _Refused as err:
        if not trust:
            raise CheckpointError(f'refusing to unpickle {err} (not a tensor, container or omegaconf type); '
                                  'pass trust=True (grl-convert/grl-infer --trust, path.trust_checkpoint: true in '
                                  'an option file) only if you trust this file') from None
    except Exception as err:
        with open(path, 'rb') as f:  # zip container or legacy pickle stream, but unreadable
            head = f.read(2)
        kind = 'corrupt or truncated PyTorch checkpoint' if head == b'PK' or head[:1] == b'\x80' else \
            'not a PyTorch checkpoint'
        raise CheckpointError(f'{kind} ({_one_line(err)})') from None
    return torch.load(path, map_location=map_location, weights_only=False)


def torch_load(path: str | Path, *, trust: bool = False, map_location: Any = 'cpu') -> Any:
    """``torch.load`` for files that may come from anyone: ``weights_only=True``, then the restricted
    reader (inert omegaconf stand-ins), a full unpickle only with ``trust=True``. A missing, empty,
    truncated or refused file raises a one-line :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        if not path.is_file():
            raise CheckpointNotFoundError('no such file')
        if path.stat().st_size == 0:
            raise CheckpointError('empty file')
        return _torch_load(path, trust, map_location)
    except CheckpointError as err:
        raise type(err)(f'{path}: {err}') from None
    except OSError as err:
        raise CheckpointReadError(f'{path}: cannot read ({err.strerror or _one_line(err)})') from None


def _shape(value: Any) -> str:
    shape = getattr(value, 'shape', None)
    return str(tuple(shape)) if shape is not None else f'a {type(value).__name__}'


def fit_problems(expected: Mapping[str, Any], given: Mapping[str, Any], limit: int = 3) -> list:
    """Why ``given`` (a loaded state dict) does not load strictly where ``expected`` (a network's
    ``state_dict()``) is needed: ``['2 missing (a, b)', '1 unexpected (c)', '1 shape mismatch (d:
    checkpoint (8, 3) vs network (16, 3))']``, at most ``limit`` keys each; empty if it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f'{k}: checkpoint {_shape(given[k])} vs network {_shape(v)}' for k, v in expected.items()
              if k in given and getattr(given[k], 'shape', None) != getattr(v, 'shape', None)]
    return [f'{len(v)} {what if len(v) == 1 else what + "es" if what.endswith("ch") else what} '
            f'({", ".join(v[:limit])}{", ..." if len(v) > limit else ""})'
            for what, v in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', shapes)) if v]


def check_fit(network: Any, state_dict: Mapping[str, Any], *, path: Optional[str | Path] = None,
              what: Optional[str] = None) -> None:
    """Raise a one-line :class:`CheckpointError` (``PATH: weights do not fit WHAT: ...``, see
    :func:`fit_problems`) unless ``state_dict`` loads strictly into ``network`` (a module or a
    state dict). Nothing is loaded."""
    expected = network.state_dict() if hasattr(network, 'state_dict') else network
    problems = fit_problems(expected, state_dict)
    if problems:
        what = what or (f'the network ({type(network).__name__})' if hasattr(network, 'state_dict') else 'the network')
        raise CheckpointError(f'{f"{path}: " if path is not None else ""}weights do not fit {what}: '
                              f'{"; ".join(problems)}')


# ----------------------------------------------------------------------------------------------
# inference from keys and shapes


def infer_kwargs(sd: Mapping[str, torch.Tensor]) -> dict:
    """Kwargs determined by the bare GRL parameters (channels, depths, heads, head, conv_type...)."""
    try:
        embed_dim, in_ch = sd['conv_first.weight'].shape[:2]
        stages: dict = defaultdict(set)
        for key in sd:
            if m := re.match(r'layers\.(\d+)\.blocks\.(\d+)\.', key):
                stages[int(m[1])].add(int(m[2]))
        if not stages or sorted(stages) != list(range(len(stages))):
            raise CheckpointError(f'stages are not numbered 0..n-1: {sorted(stages)}')
        blk = [f'layers.{i}.blocks.0.' for i in range(len(stages))]
        hidden = sd[blk[0] + 'mlp.fc1.weight'].shape[0]
        ratio = hidden / embed_dim
        if int(embed_dim * ratio) != hidden:  # GRL uses int(embed_dim * mlp_ratio): avoid rounding down
            ratio = (hidden + .5) / embed_dim
        kw = dict(in_channels=in_ch, embed_dim=embed_dim, depths=[len(stages[i]) for i in sorted(stages)],
                  num_heads_window=[sd[b + 'attn.window_attn.attn_transform.logit_scale'].shape[0] for b in blk],
                  num_heads_stripe=[sd[b + 'attn.stripe_attn.attn_transform1.logit_scale'].shape[0] for b in blk],
                  mlp_ratio=int(ratio) if float(ratio).is_integer() else ratio,
                  qkv_bias=blk[0] + 'attn.qkv.body.bias' in sd, local_connection=blk[0] + 'conv.cab.0.weight' in sd)
        body = sd.get('conv_after_body.weight')
        kw['conv_type'] = ('3conv' if 'conv_after_body.0.weight' in sd else 'linear' if body.ndim == 2 else
                           '1conv1x1' if body.shape[-1] == 1 else '1conv')
        ups = sorted(int(m[1]) for k in sd if (m := re.fullmatch(r'upsample\.up\.(\d+)\.weight', k)))
        if 'conv_up1.weight' in sd:
            kw.update(upsampler='nearest+conv', upscale=4, out_channels=sd['conv_last.weight'].shape[0])
        elif 'conv_before_upsample.0.weight' in sd:
            three = len(ups) == 1 and sd['upsample.up.0.weight'].shape[0] == 9 * 64
            kw.update(upsampler='pixelshuffle', upscale=3 if three else 2**len(ups),
                      out_channels=sd['conv_last.weight'].shape[0])
        elif ups:
            n = sd['upsample.up.0.weight'].shape[0]  # scale^2 * out_channels
            scale, kw['upsampler'] = math.isqrt(n // in_ch), 'pixelshuffledirect'
            if scale > 1 and scale * scale * in_ch == n:  # otherwise out_channels/upscale are ambiguous
                kw.update(upscale=scale, out_channels=in_ch)
        else:
            kw.update(upsampler='', upscale=1, out_channels=sd['conv_last.weight'].shape[0])
    except KeyError as err:
        raise CheckpointError(f'incomplete GRL state dict: missing {err.args[0]}') from None
    except AttributeError:
        raise CheckpointError('incomplete GRL state dict: missing conv_after_body.weight') from None
    if kw.get('out_channels') == in_ch:
        del kw['out_channels']
    return kw


def infer_geometry(shapes: Mapping[str, Sequence[int]]) -> Optional[dict]:
    """Window/stripe/df (and img_size) from the shapes of the official buffers, or None.

    window = (table_w[1] + 1) / 2; df = sqrt(index_sh_a2w[1] / index_sh_a2w[0]); stripe per axis
    s = (table_sh[a] + 1) * df / (df + 1). Stripe groups cannot be told apart from sizes at one
    resolution: [None, None] and stripe_shift True are assumed (every official experiment config).
    """
    try:
        table_w, a2w, table_sh = shapes['table_w'], shapes['index_sh_a2w'], shapes['table_sh']
        ws, df = (table_w[1] + 1) // 2, math.isqrt(a2w[1] // a2w[0])
        stripe = [(t + 1) * df // (df + 1) for t in table_sh[1:3]]
    except (KeyError, IndexError, TypeError, ZeroDivisionError):
        return None
    ok = (table_w[1] == table_w[2] == 2 * ws - 1 and df >= 1 and df * df * a2w[0] == a2w[1]
          and all(s > 0 and s % df == 0 and s + s // df - 1 == t for s, t in zip(stripe, table_sh[1:3]))
          and stripe[0] * stripe[1] == a2w[1] and tuple(shapes.get('index_w', (ws * ws, ) * 2)) == (ws * ws, ) * 2)
    if not ok:
        return None
    geo = dict(window_size=ws, stripe_size=stripe, stripe_groups=[None, None], stripe_shift=True,
               anchor_window_down_factor=df)
    n_windows = shapes['mask_w'][0] if 'mask_w' in shapes else 0
    if n_windows and math.isqrt(n_windows)**2 == n_windows:
        geo['img_size'] = ws * math.isqrt(n_windows)
    return geo


# ----------------------------------------------------------------------------------------------
# loading


def _unwrap(obj: Any, key: Optional[str]) -> tuple:
    """(prefixed state dict, model config or None, format name) of a loaded pickle."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'unknown format: top-level object is {type(obj).__name__}, not a dict')
    config, fmt = None, 'state_dict'
    if isinstance(obj.get('state_dict'), Mapping):
        hp = _to_plain(obj.get('hyper_parameters'))
        model = hp.get('model') if isinstance(hp, dict) else None
        model = model.get('model_g', model) if isinstance(model, dict) else None
        config = _resolve(model, hp) if isinstance(model, dict) else None
        obj, fmt = obj['state_dict'], 'lightning'
    stored = [k for k in ('params_ema', 'params') if isinstance(obj.get(k), Mapping)]
    if stored and 'grl_kwargs' in obj:  # written by GRLModel.save_network / save_converted
        if not isinstance(obj['grl_kwargs'], Mapping):
            raise CheckpointError(f"the 'grl_kwargs' entry is a {type(obj['grl_kwargs']).__name__}, not a mapping "
                                  'of GRL arguments')
        config = dict(obj['grl_kwargs'])
    if key is not None and key not in obj:
        if not stored and fmt == 'state_dict' and not any(str(k).endswith('conv_first.weight') for k in obj):
            raise CheckpointError(f'no {key!r} entry (top-level keys: {", ".join(map(str, list(obj)[:6]))})')
        key = None  # BasicSR's rule: a missing params_ema falls back to params; other formats ignore it
    key = key or (stored[0] if stored else None)
    if key is not None:
        obj, fmt = obj[key], f'basicsr ({key})'
    return obj, config, fmt


def _apply_geometry(kwargs: ModelKwargs, geometry: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> None:
    """Fill what the file lacks with the caller's values (origin 'given'); a value the file (or
    its weights) already fixes must agree."""
    if not isinstance(geometry, Mapping):
        raise CheckpointError(f'geometry= must be a mapping of GRL arguments, not a {type(geometry).__name__}')
    for name, value in geometry.items():
        if name not in GRL_KWARGS:
            raise CheckpointError(f'geometry= key {name!r} is not a GRL argument (e.g. {", ".join(GEOMETRY_KEYS)})')
        if name in kwargs and kwargs.origin.get(name) != 'assumed':
            if not _same(kwargs[name], value):
                raise CheckpointError(f'geometry= gives {name}={value!r} but the file ({kwargs.origin.get(name)}) '
                                      f'stores {name}={kwargs[name]!r}; leave {name} out of geometry=')
            continue
        kwargs[name], kwargs.origin[name] = value, 'given'
    up = sd.get('upsample.up.0.weight')
    if 'out_channels' in kwargs.missing and 'out_channels' not in kwargs and isinstance(kwargs.get('upscale'), int) \
            and kwargs['upscale'] > 0 \
            and up is not None and up.shape[0] % kwargs['upscale']**2 == 0:  # pixelshuffledirect: scale^2 * out
        kwargs['out_channels'], kwargs.origin['out_channels'] = up.shape[0] // kwargs['upscale']**2, 'weights'
    kwargs.missing = [k for k in kwargs.missing if k not in kwargs]


def _strip(sd: Mapping[str, Any], fmt: str) -> tuple:
    """(bare parameters, bare buffers, refined format): pick the generator prefix, drop the rest."""
    prefixes = {k[:-len('conv_first.weight')] for k in sd if k.endswith('conv_first.weight')}
    prefix = next((p for p in ('model_g.', 'model.', '') if p in prefixes), None)
    if prefix is None and len(prefixes) == 1:
        prefix = prefixes.pop()
    if prefix is None:
        if any('.blocks.' in k or k.endswith(('conv_last.weight', 'norm_end.weight')) for k in sd):
            raise CheckpointError('GRL keys found but conv_first.weight is missing')
        raise CheckpointError(f'no GRL keys found (keys: {", ".join(map(str, list(sd)[:5]))}...)')
    if prefix in ('model_g.', 'model.') and fmt == 'lightning':
        engine = ('BaseEngine' if prefix == 'model.' else  # model_g.* alone: a GAN generator (model_d.* dropped)
                  'PSNREngine' if 'model.conv_first.weight' in sd and not any(k.startswith('model_d.') for k in sd)
                  else 'GANEngine')
        fmt = f'lightning ({engine}, {prefix}*)'
    params, buffers = {}, {}
    for key, value in sd.items():
        if not key.startswith(prefix) or key in ENGINE_KEYS or any(p in key for p in _DROP_PARTS):
            continue
        name = key[len(prefix):]
        if name in BUFFER_KEYS:
            buffers[name] = value
        elif not name.startswith(_TOP) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f'not a GRL state dict: unexpected entry {key!r} ({type(value).__name__})')
        else:
            params[name] = value
    return params, buffers, fmt


def _read_safetensors(path: Path, map_location: Any) -> tuple:
    from safetensors import safe_open
    try:
        device = str(map_location) if isinstance(map_location, (str, torch.device)) else 'cpu'
        with safe_open(str(path), framework='pt', device=device) as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        return sd, (json.loads(meta['grl_kwargs']) if 'grl_kwargs' in meta else None)
    except Exception as err:
        raise CheckpointError(f'not a readable safetensors file ({_one_line(err)})') from None


def _sidecar(path: Path) -> Optional[dict]:
    """kwargs from ``<stem>.yml`` next to the file, as written by :func:`save_converted`."""
    yml = path.with_suffix('.yml')
    try:
        data = yaml.safe_load(yml.read_text()) if yml.is_file() and yml != path else None
    except yaml.YAMLError as err:
        raise CheckpointError(f'invalid sidecar {yml.name} ({_one_line(err)})') from None
    net = data.get('network_g', data) if isinstance(data, dict) else None
    return net if isinstance(net, dict) and net.get('type', 'GRL') == 'GRL' else None


def _same(a: Any, b: Any) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b


def _merge_kwargs(path: Path, fmt: str, sd: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                  config: Optional[Mapping[str, Any]], source: str) -> ModelKwargs:
    """Weights-inferred kwargs, then buffer geometry, then the stored config (which wins except
    where it contradicts the weights: then a warning and the weights' value). Keys the weights
    determine keep origin 'weights' even where the config agrees."""
    kwargs = ModelKwargs(format=fmt)
    inferred = infer_kwargs(sd)
    geometry = infer_geometry({k: tuple(v.shape) for k, v in buffers.items()}) or {}
    for name, value in inferred.items():
        kwargs[name], kwargs.origin[name] = value, 'weights'
    for name, value in geometry.items():
        kwargs[name], kwargs.origin[name] = value, 'assumed' if name in ('stripe_groups', 'stripe_shift') else 'buffers'
    effective = dict(inferred, out_channels=inferred.get('out_channels', inferred['in_channels']))
    for name, value in (config or {}).items():
        if name not in GRL_KWARGS or (isinstance(value, str) and ('${' in value or value == '???')):
            continue  # ignored YAML extras, unresolved interpolations, missing values
        wanted = effective['in_channels'] if name == 'out_channels' and value is None else value
        if (name in inferred or name == 'out_channels') and not _same(wanted, effective.get(name)):
            warnings.warn(f'{path}: {source} says {name}={value!r} but the weights need {effective.get(name)!r}; '
                          'using the weights', CheckpointWarning, stacklevel=3)
            continue
        if name in inferred:  # agrees with the weights, which fix it: origin 'weights' (never overridden)
            continue
        kwargs[name], kwargs.origin[name] = value, source
    kwargs.missing = [k for k in GEOMETRY_KEYS if k not in kwargs]
    if kwargs.get('upsampler') == 'pixelshuffledirect' and 'upscale' not in kwargs:
        kwargs.missing += ['upscale', 'out_channels']  # scale^2 * out_channels is all the weights tell
    return kwargs


def load_checkpoint(path: str | Path, *, trust: bool = False, map_location: Any = 'cpu', key: Optional[str] = None,
                    geometry: Optional[Mapping[str, Any]] = None, require_geometry: bool = True) -> tuple:
    """Load GRL weights: returns ``(state_dict, kwargs)`` (see the module docstring).

    ``key`` picks ``params`` / ``params_ema`` of a BasicSR file (default: ``params_ema`` if present).
    ``geometry`` supplies GRL kwargs the file does not store (e.g. ``{'window_size': 8,
    'stripe_size': [8, 8], ...}`` of the task preset it was trained with; origin 'given'); a value
    that contradicts the file is an error. Geometry still missing then raises a one-line
    :class:`CheckpointError` naming the keys, or, with ``require_geometry=False`` (callers that
    complete it themselves), gives a :class:`CheckpointWarning` and is listed in ``kwargs.missing``.
    ``trust=True`` allows a full unpickle of files the restricted reader refuses.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise CheckpointNotFoundError('no such file')
        with open(path, 'rb') as f:
            head = f.read(9)
        if not head:
            raise CheckpointError('empty file')
        if path.suffix == '.safetensors' or head[8:9] == b'{':
            raw, config = _read_safetensors(path, map_location)
            fmt, source = 'safetensors', 'metadata'
        else:
            raw, config, fmt = _unwrap(_torch_load(path, trust, map_location), key)
            source = 'config' if fmt.startswith('lightning') else 'metadata'  # Hydra config / grl_kwargs
        sd, buffers, fmt = _strip(raw, fmt)
        if config is None and (config := _sidecar(path)) is not None:
            source = 'sidecar'
        kwargs = _merge_kwargs(path, fmt, sd, buffers, config, source)
        if geometry is not None:
            _apply_geometry(kwargs, geometry, sd)
        if kwargs.missing:
            if require_geometry:
                example = ', '.join(f"'{k}': ..." for k in kwargs.missing)
                raise CheckpointError(f'{", ".join(kwargs.missing)} not stored in the file; pass them with '
                                      f'load_checkpoint(..., geometry={{{example}}}) (e.g. the values of the task '
                                      'preset it was trained with), or require_geometry=False to get the weights '
                                      'and kwargs.missing')
            warnings.warn(f'{path}: {", ".join(kwargs.missing)} not stored in the file; give them explicitly '
                          '(task preset, kwargs or grl-convert --set key=value)', CheckpointWarning, stacklevel=2)
    except CheckpointError as err:
        raise type(err)(f'{path}: {err}') from None
    except OSError as err:
        raise CheckpointReadError(f'{path}: cannot read ({err.strerror or _one_line(err)})') from None
    return sd, kwargs


def _plain_kwargs(kwargs: Mapping[str, Any]) -> dict:
    order = {k: i for i, k in enumerate(GRL_KWARGS)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(kwargs.items(),
                                                                          key=lambda kv: order.get(kv[0], 99))}


def save_converted(state_dict: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any], dst: str | Path) -> tuple:
    """Write ``dst`` (``.pth``: BasicSR ``{'params': sd, 'grl_kwargs': kwargs}``; ``.safetensors``:
    kwargs JSON in metadata key ``grl_kwargs``) plus ``<stem>.yml`` with ``network_g: {type: GRL,
    ...}``. Returns both paths."""
    dst, kw = Path(dst), _plain_kwargs(kwargs)
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if dst.suffix == '.pth':
        torch.save({'params': sd, 'grl_kwargs': kw}, dst)
    elif dst.suffix == '.safetensors':
        from safetensors.torch import save_file
        save_file(sd, str(dst), metadata={'grl_kwargs': json.dumps(kw), 'format': 'pt'})
    else:
        raise CheckpointError(f'{dst}: unsupported output type {dst.suffix!r} (use .pth or .safetensors)')
    yml = dst.with_suffix('.yml')
    yml.write_text(yaml.safe_dump({'network_g': {'type': 'GRL', **kw}}, sort_keys=False))
    return dst, yml
