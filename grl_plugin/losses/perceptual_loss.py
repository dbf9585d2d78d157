"""GRLPerceptualLoss: VGG19 perceptual (+ optional style) loss that never downloads anything.

Same computation as the official GRL loss (and BasicSR's ``PerceptualLoss``): VGG19 features
taken BEFORE the ReLU at ``conv1_2`` (weight 0.1), ``conv2_2`` (0.1), ``conv3_4`` (1),
``conv4_4`` (1), ``conv5_4`` (1), input in [0, 1] RGB normalised with the ImageNet mean/std,
L1 between the features of the output and of the (detached) target; ``perceptual_weight`` 1,
``style_weight`` 0 (Gram-matrix loss, off).

Unlike BasicSR's ``PerceptualLoss`` (which loads ``experiments/pretrained_models/vgg19-dcbb9e9d.pth``
relative to the CWD and otherwise downloads), the VGG19 weights come from the option
``vgg_weights``:

* a path to torchvision's VGG19 ImageNet state dict (``vgg19-dcbb9e9d.pth``, from
  https://download.pytorch.org/models/vgg19-dcbb9e9d.pth -- the file BasicSR uses too).
  ``~`` and environment variables are expanded; a relative path is relative to the CWD. A missing
  file raises a one-line ``FileNotFoundError`` naming the option, the path and that URL;
  nothing is ever downloaded;
* ``random``: randomly initialised VGG19 (tests and smoke runs only -- the loss is then
  meaningless as a perceptual measure);
* ``none`` / ``null`` / ``~``: the loss is disabled: ``forward`` returns ``(None, None)``, which
  BasicSR's SRModel / SRGANModel / RealESRGANModel and GRLModel skip (a warning is logged).

The option is required: leaving it out raises an error instead of silently picking a file.

Option file (Real-SR GAN stage)::

    perceptual_opt:
      type: GRLPerceptualLoss
      vgg_weights: experiments/pretrained_models/vgg19-dcbb9e9d.pth
      layer_weights: {conv1_2: 0.1, conv2_2: 0.1, conv3_4: 1, conv4_4: 1, conv5_4: 1}
      use_input_norm: true
      range_norm: false
      perceptual_weight: 1.0
      style_weight: 0
      criterion: l1           # l1 | l2 | fro

``forward(x, gt)`` returns ``(percep_loss, style_loss)`` like BasicSR's ``PerceptualLoss``;
each is ``None`` when its weight is 0 (or the loss is disabled). The VGG is frozen
(``requires_grad=False``) and always in eval mode.
"""
import os

import torch
from torch import nn

#: torchvision's VGG19 ``features`` layer names (index = ``features.N``).
VGG19_NAMES = (
    'conv1_1', 'relu1_1', 'conv1_2', 'relu1_2', 'pool1',
    'conv2_1', 'relu2_1', 'conv2_2', 'relu2_2', 'pool2',
    'conv3_1', 'relu3_1', 'conv3_2', 'relu3_2', 'conv3_3', 'relu3_3', 'conv3_4', 'relu3_4', 'pool3',
    'conv4_1', 'relu4_1', 'conv4_2', 'relu4_2', 'conv4_3', 'relu4_3', 'conv4_4', 'relu4_4', 'pool4',
    'conv5_1', 'relu5_1', 'conv5_2', 'relu5_2', 'conv5_3', 'relu5_3', 'conv5_4', 'relu5_4', 'pool5')
#: Output channels of the conv layers, block by block (VGG19 configuration "E").
_VGG19_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}

DEFAULT_LAYER_WEIGHTS = {'conv1_2': 0.1, 'conv2_2': 0.1, 'conv3_4': 1.0, 'conv4_4': 1.0, 'conv5_4': 1.0}
VGG19_URL = 'https://download.pytorch.org/models/vgg19-dcbb9e9d.pth'

_REQUIRED = object()
_DISABLED = ('none', 'null', '~', '')


def build_vgg19_features(last_layer):
    """``nn.Sequential`` of torchvision's ``vgg19().features`` up to ``last_layer`` (a name).

    Module indices equal torchvision's ``features.N`` indices, so a torchvision state dict
    loads directly. ReLUs are not in-place (features taken before a ReLU stay intact).
    """
    last = VGG19_NAMES.index(last_layer)
    layers, in_ch = [], 3
    for name in VGG19_NAMES[:last + 1]:
        if name.startswith('conv'):
            out_ch = _VGG19_CHANNELS[int(name[4])]
            layers.append(nn.Conv2d(in_ch, out_ch, 3, 1, 1))
            in_ch = out_ch
        elif name.startswith('relu'):
            layers.append(nn.ReLU(inplace=False))
        else:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def _init_like_torchvision(features):
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            nn.init.zeros_(m.bias)


def load_vgg19_features(features, path, option='vgg_weights'):
    """Load ``features.N.*`` (or bare ``N.*``) tensors of a torchvision VGG19 state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"GRLPerceptualLoss: VGG19 weights not found: {option}: '{path}' -- download torchvision's "
            f"VGG19 ImageNet weights from {VGG19_URL} and set {option} to that file "
            "(or 'random' for tests, 'none' to disable the loss); nothing is downloaded automatically")
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001 - one-line message for any unreadable file
        raise ValueError(f"GRLPerceptualLoss: cannot read {option}: '{path}': "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict):
        raise ValueError(f"GRLPerceptualLoss: {option}: '{path}' is not a state dict (got {type(state).__name__})")
    wanted = features.state_dict()
    picked = {}
    for key in wanted:
        for candidate in (f'features.{key}', key, f'module.features.{key}', f'vgg.features.{key}'):
            if candidate in state:
                picked[key] = state[candidate]
                break
    missing = [k for k in wanted if k not in picked]
    if missing:
        raise ValueError(f"GRLPerceptualLoss: {option}: '{path}' is not a torchvision VGG19 state dict "
                         f"(no 'features.{missing[0]}'); use {VGG19_URL}")
    bad = [k for k in wanted if tuple(picked[k].shape) != tuple(wanted[k].shape)]
    if bad:
        raise ValueError(f"GRLPerceptualLoss: {option}: '{path}': 'features.{bad[0]}' has shape "
                         f"{tuple(picked[bad[0]].shape)}, VGG19 needs {tuple(wanted[bad[0]].shape)}")
    features.load_state_dict(picked, strict=True)


class GRLPerceptualLoss(nn.Module):
    """VGG19 perceptual/style loss with local-only weights (see the module docstring).

    Args:
        vgg_weights (str | None): path to torchvision's ``vgg19-dcbb9e9d.pth``; ``'random'``;
            or ``None`` / ``'none'`` (disabled). Required.
        layer_weights (dict): layer name (``convX_Y`` = before ReLU, ``reluX_Y``, ``poolX``) ->
            weight. Default: conv1_2 0.1, conv2_2 0.1, conv3_4 1, conv4_4 1, conv5_4 1.
        use_input_norm (bool): ImageNet mean/std normalisation of [0, 1] input. Default True.
        range_norm (bool): map [-1, 1] input to [0, 1] first. Default False.
        perceptual_weight (float): weight of the feature loss (0: not computed). Default 1.
        style_weight (float): weight of the Gram-matrix loss (0: not computed). Default 0.
        criterion (str): ``'l1'`` | ``'l2'`` (MSE) | ``'fro'`` (Frobenius norm). Default ``'l1'``.
        vgg_type (str): only ``'vgg19'`` (accepted for BasicSR option compatibility).
    """

    def __init__(self, vgg_weights=_REQUIRED, layer_weights=None, use_input_norm=True, range_norm=False,
                 perceptual_weight=1.0, style_weight=0.0, criterion='l1', vgg_type='vgg19'):
        super().__init__()
        if vgg_weights is _REQUIRED:
            raise ValueError("GRLPerceptualLoss: option 'vgg_weights' is required: a path to torchvision's "
                             f"vgg19-dcbb9e9d.pth ({VGG19_URL}), 'random' (tests) or 'none' (disabled)")
        if vgg_type != 'vgg19':
            raise ValueError(f"GRLPerceptualLoss: only vgg_type 'vgg19' is supported, got {vgg_type!r}")
        self.layer_weights = dict(DEFAULT_LAYER_WEIGHTS if layer_weights is None else layer_weights)
        unknown = [k for k in self.layer_weights if k not in VGG19_NAMES]
        if unknown or not self.layer_weights:
            raise ValueError(f'GRLPerceptualLoss: unknown VGG19 layer {unknown[0] if unknown else None!r} in '
                             f'layer_weights; valid: {", ".join(VGG19_NAMES)}')
        self.perceptual_weight = float(perceptual_weight)
        self.style_weight = float(style_weight)
        self.use_input_norm = use_input_norm
        self.range_norm = range_norm
        if criterion not in ('l1', 'l2', 'fro'):
            raise ValueError(f"GRLPerceptualLoss: criterion must be 'l1', 'l2' or 'fro', got {criterion!r}")
        self.criterion_type = criterion
        self.criterion = {'l1': nn.L1Loss(), 'l2': nn.MSELoss(), 'fro': None}[criterion]

        self.enabled = not (vgg_weights is None or (isinstance(vgg_weights, str) and vgg_weights.strip().lower()
                                                    in _DISABLED))
        self.vgg_weights = vgg_weights
        self.vgg = None
        if self.enabled:
            last = max(self.layer_weights, key=VGG19_NAMES.index)
            self.vgg = build_vgg19_features(last)
            if isinstance(vgg_weights, str) and vgg_weights.strip().lower() == 'random':
                _init_like_torchvision(self.vgg)
            else:
                load_vgg19_features(self.vgg, os.path.expandvars(os.path.expanduser(str(vgg_weights))))
            self.vgg.eval()
            for p in self.vgg.parameters():
                p.requires_grad = False
            # name -> index of the layer whose output is taken
            self._taps = {VGG19_NAMES.index(k): k for k in self.layer_weights}
        else:
            from basicsr.utils import get_root_logger
            get_root_logger().warning('GRLPerceptualLoss: vgg_weights is none -- perceptual loss disabled.')
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        super().train(mode)
        if self.vgg is not None:
            self.vgg.eval()  # frozen feature extractor
        return self

    def features(self, x):
        """Dict ``layer name -> feature`` for the layers in ``layer_weights``."""
        if self.range_norm:
            x = (x + 1) / 2
        if self.use_input_norm:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = {}
        for idx, layer in enumerate(self.vgg):
            x = layer(x)
            if idx in self._taps:
                out[self._taps[idx]] = x
        return out

    def _distance(self, a, b):
        if self.criterion_type == 'fro':
            return torch.norm(a - b, p='fro')
        return self.criterion(a, b)

    @staticmethod
    def _gram_mat(x):
        n, c, h, w = x.size()
        f = x.reshape(n, c, h * w)
        return f.bmm(f.transpose(1, 2)) / (c * h * w)

    def forward(self, x, gt):
        if not self.enabled:
            return None, None
        x_feats = self.features(x)
        with torch.no_grad():
            gt_feats = self.features(gt.detach())
        percep = style = None
        if self.perceptual_weight > 0:
            percep = sum(self._distance(x_feats[k], gt_feats[k]) * self.layer_weights[k] for k in x_feats)
            percep = percep * self.perceptual_weight
        if self.style_weight > 0:
            style = sum(self._distance(self._gram_mat(x_feats[k]), self._gram_mat(gt_feats[k])) * self.layer_weights[k]
                        for k in x_feats)
            style = style * self.style_weight
        return percep, style

    def extra_repr(self):
        return (f'vgg_weights={self.vgg_weights!r}, layer_weights={self.layer_weights}, '
                f'perceptual_weight={self.perceptual_weight}, style_weight={self.style_weight}, '
                f'criterion={self.criterion_type!r}')
