"""Token-wise linear layers through oneDNN on CPU (the fast path's QKV, output and MLP products).

PyTorch runs ``F.linear`` on x86 CPUs through the BLAS sgemm (MKL) and convolutions through
oneDNN. MKL runs its AVX-512 kernels on Intel CPUs only; on an AMD CPU with AVX-512 its sgemm
reaches half of oneDNN's rate on GRL's shapes (measured on a 2-core AMD EPYC VM with AVX-512,
float32, 4096 tokens, C=180: 110-170 GFLOP/s for ``F.linear``, 320-370 for the same product as
a 1x1 convolution; on the Zen 4 VMs of sessions 18-22, whose oneDNN rate is lower, 110-179
against 146-188 over GRL's (4096, C) x (C, N) shapes, the gap largest at C=180 -> 540). A
Linear applied to (..., C) tokens *is* a 1x1 convolution of the tokens seen as a channels-last
map, and :func:`linear` hands it to oneDNN as one without copying: the tokens are viewed as a
(1, C, 1, M) channels-last map and the (N, C) weight as (N, C, 1, 1).
The result is the same product (float32 rounding aside: max |difference| ~1e-6 at C=360).
:func:`linear_gelu` adds the MLP's GELU to the product inside oneDNN when no gradient is needed.

By default (:func:`set_onednn_linear` ``None``) this route is taken on AMD CPUs with AVX-512
only (:func:`onednn_linear_faster`): on a 2-core AMD EPYC VM with AVX2 only, both libraries
ran these forward products at the same ~165 GFLOP/s and oneDNN's backward (a convolution
backward) at 0.8 of the two matrix products' rate, and GRL-T/S's fast path ran 2-6 %
faster without it. It applies where the product is large (``_MIN_ROWS`` token rows and more;
below that oneDNN's per-call cost shows), on float32 CPU tensors outside autocast; everywhere
else it is ``F.linear``. :func:`linear_backward` gives the three gradients of the same product
for hand-written backward passes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

_MIN_ROWS = 1024
_ENABLED: list = [None]  # None: automatic (onednn_linear_faster)
try:  # oneDNN's linear with a fused element-wise op (inference only: no autograd formula)
    _LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):  # a build without it
    _LINEAR_POINTWISE = None


def set_onednn_linear(enabled: Optional[bool] = None) -> None:
    """Route the fast path's large float32 CPU products through oneDNN (``True``), never
    (``False``), or where that is expected to be faster (``None``, the default:
    :func:`onednn_linear_faster`)."""
    _ENABLED[0] = None if enabled is None else bool(enabled)


def onednn_linear_faster() -> bool:
    """Whether this CPU is one where MKL's sgemm lags oneDNN: an AMD CPU (``/proc/cpuinfo``)
    on which PyTorch runs AVX-512 kernels (MKL keeps to AVX2 there). ``False`` where either
    cannot be told. Read once, at import (a file read inside ``torch.compile`` would break
    the graph)."""
    return _ONEDNN_FASTER


def _read_cpuinfo() -> str:
    try:
        with open(Path("/proc/cpuinfo"), encoding="ascii", errors="replace") as f:
            return f.read(4096)
    except OSError:
        return ""


def _onednn_faster_on(capability: str, cpuinfo: str) -> bool:
    return capability.startswith("AVX512") and "AuthenticAMD" in cpuinfo


_ONEDNN_FASTER = _onednn_faster_on(torch.backends.cpu.get_cpu_capability(), _read_cpuinfo())


_MKLDNN = torch.backends.mkldnn.is_available()


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes the oneDNN route for ``x``: float32 CPU tokens, enough rows,
    not under autocast, and not under ``torch.compile``, which picks its own kernels (and cannot
    trace ``torch.backends.mkldnn.is_available``: a graph break in every product)."""
    enabled = _ENABLED[0]
    if enabled is None:
        enabled = onednn_linear_faster()
    return (enabled and _MKLDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.dim() >= 2 and x.numel() >= _MIN_ROWS * x.shape[-1]
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _as_map(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> a (1, C, 1, M) channels-last view (a copy only if ``x`` is not contiguous)."""
    return x.reshape(1, 1, -1, x.shape[-1]).permute(0, 3, 1, 2)


def _from_map(y: torch.Tensor, lead) -> torch.Tensor:
    return y.permute(0, 2, 3, 1).reshape(*lead, y.shape[1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, as a oneDNN 1x1 convolution where that is faster."""
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    return _from_map(F.conv2d(_as_map(x), weight[:, :, None, None], bias), x.shape[:-1])


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.gelu(linear(x, weight, bias))`` (exact GELU); without autograd, where :func:`linear`
    uses oneDNN, one oneDNN call with the GELU applied to the product's output in cache (no
    pass of its own over the hidden layer)."""
    if (_LINEAR_POINTWISE is not None and _use_onednn(x, weight) and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export()
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))):
        return _LINEAR_POINTWISE(x.contiguous(), weight, bias, "gelu", [], "none")
    return F.gelu(linear(x, weight, bias))


def linear_backward(d_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool = True,
                    need_weight: bool = True, need_bias: bool = True
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients (x, weight, bias) of ``linear(x, weight, bias)`` for the output gradient
    ``d_out``; ``None`` for those not asked for."""
    if _use_onednn(x, weight):
        n, c = weight.shape
        dx, dw, db = torch.ops.aten.convolution_backward(
            _as_map(d_out), _as_map(x), weight[:, :, None, None], [n] if need_bias else None,
            [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_x, need_weight, need_bias])
        return (_from_map(dx, x.shape[:-1]) if need_x else None,
                dw.view(n, c) if need_weight else None, db if need_bias else None)
    d_out2 = d_out.reshape(-1, d_out.shape[-1])
    return (torch.matmul(d_out, weight) if need_x else None,
            d_out2.t().mm(x.reshape(-1, x.shape[-1])) if need_weight else None,
            d_out2.sum(0) if need_bias else None)
