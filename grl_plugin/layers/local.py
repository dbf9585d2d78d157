"""Local modelling: convolutions + channel attention (GRL-B only)."""
from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation ``x * sigmoid(conv(relu(conv(avgpool(x)))))`` (keys ``attention.{1,3}``)."""

    def __init__(self, dim: int, reduction: int = 18):
        super().__init__()
        hidden = max(dim // reduction, 1)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, hidden, 1),
                                       nn.ReLU(inplace=True), nn.Conv2d(hidden, dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    """Conv(dim, dim/4, 3) -> GELU -> Conv(dim/4, dim, 3) -> channel attention (key ``cab``), on
    (B, C, H, W) maps or (B, L, C) tokens with ``x_size``; ``compress_ratio`` (4) reduces the
    first convolution's channels, ``reduction`` (18) is the channel attention's squeeze."""

    def __init__(self, dim: int, compress_ratio: int = 4, reduction: int = 18):
        super().__init__()
        hidden = max(dim // compress_ratio, 1)
        self.cab = nn.Sequential(nn.Conv2d(dim, hidden, 3, 1, 1), nn.GELU(),
                                 nn.Conv2d(hidden, dim, 3, 1, 1), ChannelAttention(dim, reduction))

    def forward(self, x: torch.Tensor, x_size=None, channels_last: bool = False) -> torch.Tensor:
        """``channels_last``: tokens as a channels-last view (no copies) instead of a (B, C, H, W) copy."""
        if x.dim() == 4:
            return self.cab(x)
        B, L, C = x.shape
        H, W = x_size
        if channels_last:
            return self.cab(x.reshape(B, H, W, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, L, C)
        y = self.cab(x.transpose(1, 2).reshape(B, C, H, W))
        return y.flatten(2).transpose(1, 2)
