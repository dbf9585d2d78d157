"""Calls of BasicSR's public functions whose results ``test_basicsr_contract.py`` compares between
BasicSR as it is and BasicSR after ``import grl_plugin``.

``python basicsr_probe.py plain|plugin DATA_DIR OUT.json``: ``plain`` loads only the torchvision
import workarounds (``grl_plugin/compat.py`` by file path: BasicSR 1.4.2 does not import on this
torch without them); ``plugin`` imports ``grl_plugin`` first. Each probe records a value (hashes of
arrays and tensors, JSON otherwise) or the class hierarchy of the exception it raised.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import sys
import tempfile
import traceback
from pathlib import Path

mode, data_dir, out_path = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
repo = Path(__file__).resolve().parents[1]
if mode == 'plugin':
    import grl_plugin  # noqa: F401
else:
    spec = importlib.util.spec_from_file_location('grl_compat_alone', repo / 'grl_plugin' / 'compat.py')
    compat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compat)
    compat.apply()

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = {}


def digest(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous().numpy()
    if isinstance(value, np.ndarray):
        return f'{value.dtype}{list(value.shape)}:{hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]}'
    if isinstance(value, dict):
        return {str(k): digest(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [digest(v) for v in value]
    if isinstance(value, bytes):
        return f'bytes:{hashlib.sha256(value).hexdigest()[:16]}'
    if isinstance(value, float):
        return round(value, 10)
    if value is None or isinstance(value, (int, str, bool)):
        return value
    return type(value).__name__


def probe(name):
    def run(fn):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        try:
            RESULTS[name] = {'value': digest(fn())}
        except BaseException as err:  # noqa: BLE001 - the class is the result
            RESULTS[name] = {'error': [c.__name__ for c in type(err).__mro__], 'message': str(err).split('\n')[0],
                             'where': traceback.format_exc().strip().splitlines()[-3:]}
        return fn
    return run


from basicsr.utils import FileClient, imfrombytes, img2tensor, tensor2img  # noqa: E402

png, jpg = (data_dir / 'img.png').read_bytes(), (data_dir / 'img.jpg').read_bytes()
lmdb_gt, lmdb_lq = str(data_dir / 'gt.lmdb'), str(data_dir / 'lq.lmdb')


@probe('disk_get_missing')
def _():
    return FileClient('disk').get(str(data_dir / 'missing.png'))


@probe('disk_get_present')
def _():
    return FileClient('disk').get(str(data_dir / 'img.png'))


@probe('lmdb_get_present')
def _():
    return FileClient('lmdb', db_paths=[lmdb_gt], client_keys=['gt']).get('0000', 'gt')


@probe('lmdb_get_missing_key')
def _():
    return FileClient('lmdb', db_paths=[lmdb_gt], client_keys=['gt']).get('9999', 'gt')


@probe('lmdb_second_backend_same_path')
def _():
    first = FileClient('lmdb', db_paths=[lmdb_gt], client_keys=['gt'])
    second = FileClient('lmdb', db_paths=[lmdb_gt], client_keys=['gt'])
    return [first.get('0001', 'gt'), second.get('0001', 'gt')]


for label, content in (('png', png), ('jpg', jpg), ('motion_photo', jpg + b'\x00\x00\x00\x18ftypmp42' + bytes(2048))):
    for flag in ('color', 'grayscale', 'unchanged'):
        probe(f'imfrombytes_{label}_{flag}')(lambda c=content, f=flag: [imfrombytes(c, f, False), imfrombytes(c, f, True)])

probe('imfrombytes_corrupt_float32')(lambda: imfrombytes(b'\x89PNG\r\n\x1a\n' + bytes(64), float32=True))
probe('imfrombytes_none')(lambda: imfrombytes(None, float32=True))
probe('img2tensor_tensor2img')(lambda: tensor2img(img2tensor(imfrombytes(png, float32=True))))


@probe('paired_dataset_lmdb')
def _():
    from basicsr.data.paired_image_dataset import PairedImageDataset
    ds = PairedImageDataset(dict(dataroot_gt=lmdb_gt, dataroot_lq=lmdb_lq, io_backend=dict(type='lmdb'),
                                 phase='train', scale=2, gt_size=8, use_hflip=True, use_rot=True))
    return [len(ds), ds[0], ds[1]]


@probe('build_dataset_class')
def _():
    from basicsr.data import build_dataset
    ds = build_dataset(dict(name='p', type='PairedImageDataset', dataroot_gt=lmdb_gt, dataroot_lq=lmdb_lq,
                            io_backend=dict(type='lmdb'), phase='val', scale=2))
    return [type(ds).__name__, ds[2]]


@probe('realesrgan_dataset_retries_unreadable_file')
def _():
    import basicsr.data.realesrgan_dataset as mod
    mod.time.sleep = lambda s: None
    kernels = dict(blur_kernel_size=7, kernel_list=['iso'], kernel_prob=[1], blur_sigma=[0.2, 1], betag_range=[0.5, 4],
                   betap_range=[1, 2], sinc_prob=0)
    opt = dict(dataroot_gt=str(data_dir), meta_info=str(data_dir / 'meta_realesrgan.txt'), io_backend=dict(type='disk'),
               use_hflip=False, use_rot=False, final_sinc_prob=0, **kernels,
               **{f'{k}2': v for k, v in kernels.items()})
    ds = mod.RealESRGANDataset(opt)
    return [ds[0]['gt'], ds[0]['gt_path']]


@probe('optimizer_adam')
def _():
    from basicsr.models.base_model import BaseModel
    p = torch.nn.Parameter(torch.ones(2))
    opt = BaseModel.get_optimizer(None, 'Adam', [p], 1e-3, betas=(0.9, 0.99))
    return [type(opt).__name__, opt.param_groups[0]['betas'], opt.param_groups[0]['lr']]


probe('optimizer_unknown')(lambda: __import__('basicsr.models.base_model', fromlist=['BaseModel']).BaseModel
                           .get_optimizer(None, 'NoSuchOptimizer', [torch.nn.Parameter(torch.ones(1))], 1e-3))


def _sr_model(tmp, pretrain=None, net=None):
    from basicsr.models import build_model
    net = net or dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, upscale=2)
    return build_model(dict(model_type='SRModel', is_train=False, dist=False, num_gpu=0, scale=2, network_g=net,
                            path=dict(pretrain_network_g=pretrain, strict_load_g=True, param_key_g='params',
                                      models=tmp)))


@probe('save_network_keys_and_metadata')
def _():
    with tempfile.TemporaryDirectory() as tmp:
        model = _sr_model(tmp)
        model.save_network(model.net_g, 'net_g', 3)
        saved = torch.load(os.path.join(tmp, 'net_g_3.pth'))
        params = saved['params']
        return [sorted(saved), list(params), dict(getattr(params, '_metadata', {}) or {}), params]


@probe('load_network_wrong_shapes')
def _():
    from basicsr.archs.srresnet_arch import MSRResNet
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'w.pth')
        torch.save({'params': MSRResNet(num_feat=4, num_block=1, upscale=2).state_dict()}, path)
        _sr_model(tmp, pretrain=path)


@probe('load_network_good')
def _():
    from basicsr.archs.srresnet_arch import MSRResNet
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'w.pth')
        torch.manual_seed(5)
        torch.save({'params': MSRResNet(num_feat=8, num_block=1, upscale=2).state_dict()}, path)
        return _sr_model(tmp, pretrain=path).net_g.state_dict()


@probe('sampler_and_prefetcher')
def _():
    from basicsr.data import build_dataloader
    from basicsr.data.data_sampler import EnlargedSampler
    from basicsr.data.prefetch_dataloader import CPUPrefetcher
    import basicsr.train as train
    data = [{'i': torch.tensor(i), 'r': torch.rand(1)} for i in range(7)]
    out = []
    for sampler_cls, prefetcher_cls in ((EnlargedSampler, CPUPrefetcher), (train.EnlargedSampler, train.CPUPrefetcher)):
        torch.manual_seed(3)
        sampler = sampler_cls(data, 1, 0, ratio=2)
        sampler.set_epoch(4)
        loader = build_dataloader(data, {'phase': 'train', 'batch_size_per_gpu': 2, 'num_worker_per_gpu': 0},
                                  num_gpu=0, dist=False, sampler=sampler, seed=0)
        prefetcher = prefetcher_cls(loader)
        prefetcher.reset()
        batches, batch = [], prefetcher.next()
        while batch is not None:
            batches.append(batch['i'])
            batch = prefetcher.next()
        out.append(batches)
    return out


@probe('prefetch_generator')
def _():
    from basicsr.data.prefetch_dataloader import PrefetchGenerator
    return list(PrefetchGenerator(iter(range(5)), 2))


@probe('parse_options')
def _():
    from basicsr.utils.options import parse_options
    sys.argv = ['probe', '-opt', str(data_dir / 'train.yml')]
    opt, _ = parse_options(str(data_dir / 'root'), is_train=True)
    return json.loads(json.dumps(opt, default=str))


@probe('registries')
def _():
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY
    import basicsr.archs  # noqa: F401 - BasicSR fills its registries on import
    import basicsr.data  # noqa: F401
    import basicsr.losses  # noqa: F401
    import basicsr.metrics  # noqa: F401
    import basicsr.models  # noqa: F401
    return {r._name: {k: f'{v.__module__}.{v.__qualname__}' for k, v in r._obj_map.items()
                      if v.__module__.startswith('basicsr')}
            for r in (ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY)}


@probe('metrics_losses_archs')
def _():
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from basicsr.archs.srresnet_arch import MSRResNet
    from basicsr.losses.basic_loss import CharbonnierLoss, L1Loss, MSELoss
    from basicsr.metrics import calculate_psnr, calculate_ssim
    from basicsr.utils.matlab_functions import imresize
    img = imfrombytes(png, float32=True)
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 0.05, img.shape), 0, 1)
    a, b = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    x = torch.rand(1, 3, 8, 8)
    return [calculate_psnr(img * 255, noisy * 255, 0), calculate_ssim(img * 255, noisy * 255, 0),
            float(L1Loss()(a, b)), float(MSELoss()(a, b)), float(CharbonnierLoss()(a, b)), imresize(img, 0.5),
            MSRResNet(num_feat=8, num_block=1, upscale=2)(x), RRDBNet(3, 3, num_feat=8, num_block=1, num_grow_ch=4)(x)]


@probe('resume_state_from_cwd')
def _():
    from basicsr.train import load_resume_state
    os.chdir(data_dir / 'root')
    opt = {'name': 'probe_run', 'auto_resume': True, 'num_gpu': 0, 'is_train': True, 'rank': 0,
           'path': {'resume_state': None, 'training_states': str(data_dir / 'root/experiments/probe_run/training_states'),
                    'models': str(data_dir / 'root/experiments/probe_run/models')}}
    state = load_resume_state(opt)
    return [state['iter'], opt['path']['resume_state'].endswith('3.state')]


Path(out_path).write_text(json.dumps(RESULTS, indent=1, sort_keys=True))
