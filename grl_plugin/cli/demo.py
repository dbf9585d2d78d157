"""Demo: run every GRL preset on a real photograph and save the results.

Usage: ``python -m grl_plugin.cli.demo [--size 64] [--image astronaut] [--presets GRL_T ...]``
(or ``grl-demo``, or ``make demo``).

The low-resolution input is the centre of a photograph bundled with scikit-image,
downsampled 4x (bicubic) and cropped to ``size x size``. For each preset it prints the
parameter count, input/output shapes, forward time (after one warm-up pass) and output
range, and writes ``<preset>_x<scale>.png`` (bicubic upscaling | model output) to
``results/demo/`` under the current directory, next to ``lr.png`` and ``hr.png``.
Models are untrained until weights are loaded, so their outputs are not meaningful yet.
"""
import argparse
import math
import os
import sys
import time

import numpy as np

DOWNSCALE = 4  # the LR input is the HR crop downsampled by this factor


def load_photo(name, size):
    """Return (lr, hr) uint8 RGB arrays: a centre crop of ``skimage.data.<name>()``."""
    import cv2
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    h, w = img.shape[:2]
    hr_size = min(size * DOWNSCALE, h, w)
    top, left = (h - hr_size) // 2, (w - hr_size) // 2
    hr = np.ascontiguousarray(img[top:top + hr_size, left:left + hr_size])
    lr = cv2.resize(hr, (size, size), interpolation=cv2.INTER_CUBIC)
    return lr, hr


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64))**2)
    return float('inf') if mse == 0 else 10 * math.log10(255.0**2 / mse)


def to_uint8(t):
    """(1, C, H, W) float tensor in [0, 1] -> (H, W, C) uint8."""
    return (t[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)


def save_png(path, rgb):
    import cv2
    if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f'could not write {path}')


def parse_args(argv, preset_names):
    p = argparse.ArgumentParser(prog='grl-demo', description=__doc__.split('\n')[0])
    p.add_argument('--size', type=int, default=64, help='LR input size in pixels (default 64)')
    p.add_argument('--image', default='astronaut', help='skimage.data photograph (default astronaut)')
    p.add_argument('--presets', nargs='+', default=list(preset_names), choices=list(preset_names),
                   metavar='NAME', help=f'presets to run (default all: {" ".join(preset_names)})')
    p.add_argument('--out', default=os.path.join('results', 'demo'), help='output folder (default results/demo)')
    p.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    return p.parse_args(argv)


def main(argv=None):
    import cv2
    import torch

    import grl_plugin  # noqa: F401  (applies grl_plugin.compat)
    from grl_plugin.archs.presets import PRESETS

    args = parse_args(argv, list(PRESETS))
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    os.makedirs(args.out, exist_ok=True)

    lr, hr = load_photo(args.image, args.size)
    save_png(os.path.join(args.out, 'lr.png'), lr)
    save_png(os.path.join(args.out, 'hr.png'), hr)
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float().div(255.0).to(device)
    print(f'image: skimage.data.{args.image}, HR crop {hr.shape[1]}x{hr.shape[0]}, '
          f'LR input {args.size}x{args.size}, device {device}, torch threads {torch.get_num_threads()}')
    print('models are untrained unless weights are loaded: outputs are not meaningful yet')

    for name in args.presets:
        torch.manual_seed(0)
        model = PRESETS[name]().to(device).eval()
        scale = int(model.upscale)
        n_params = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            model(x)  # warm-up
            if device.type == 'cuda':
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = model(x)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        out = to_uint8(y)
        bicubic = cv2.resize(lr, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_CUBIC)
        path = os.path.join(args.out, f'{name}_x{scale}.png')
        save_png(path, np.concatenate([bicubic, out], axis=1))
        line = (f'{name:10s} params {n_params / 1e6:6.2f}M  in {tuple(x.shape)} -> out {tuple(y.shape)}  '
                f'forward {dt:7.3f}s  range [{y.min().item():.3f}, {y.max().item():.3f}]')
        if out.shape == hr.shape:
            line += f'  PSNR vs HR {psnr(out, hr):.2f} dB (bicubic {psnr(bicubic, hr):.2f} dB)'
        print(line)
        print(f'{"":10s} wrote {path} (left: bicubic, right: {name})')
        del model
    return 0


if __name__ == '__main__':
    sys.exit(main())
