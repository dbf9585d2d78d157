"""Test oracle: a literal, plain-PyTorch restatement of the OFFICIAL GRL network.

Written from ``SPEC.md`` (the description of ``ofsoundof/GRL-Image-Restoration`` commit 3123fca)
only, independently of ``grl_plugin``.  It reproduces the official structure, including:

* the 13 persistent buffers registered on the root at construction for ``img_size`` (they come
  first in ``state_dict``), recomputed for any other padded input size on EVERY forward call
  (SPEC 6.5), and built the official way, including bug B1 (the V-stripe tensors are built from
  the H-stripe size/shift reversed, ``ss[::-1]`` / ``sss[::-1]``);
* module names that give exactly the official state_dict keys/shapes/order;
* shifted windows on EVEN blocks, H/W stripe alternation, stripe shift on ``j % 4 in {2, 3}``;
* res-post-norm blocks, optional CAB local connection, drop path;
* explicit attention: cosine similarity, clamped logit scale, CPB-MLP bias ``16*sigmoid``,
  masks of -100 added through ``view(-1, nW, heads, N1, N2) + mask[None, :, None]``;
* right/bottom reflect padding (zero "constant" padding if reflect raises), mean subtraction
  after padding, and the final crop ``[:H*upscale, :W*upscale]``.

Speed is irrelevant here: this is only a reference to compare against.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BUFFER_NAMES = (
    "table_w",
    "table_sh",
    "table_sv",
    "index_w",
    "index_sh_a2w",
    "index_sh_w2a",
    "index_sv_a2w",
    "index_sv_w2a",
    "mask_w",
    "mask_sh_a2w",
    "mask_sh_w2a",
    "mask_sv_a2w",
    "mask_sv_w2a",
)


def to_2tuple(x):
    if isinstance(x, (list, tuple)):
        assert len(x) == 2
        return tuple(x)
    return (x, x)


# ------------------------------------------------------------------------------------------------
# Layout helpers
# ------------------------------------------------------------------------------------------------
def bchw_to_blc(x):
    """(B, C, H, W) -> (B, H*W, C), tokens in row-major (h, w) order."""
    return x.flatten(2).transpose(1, 2)


def blc_to_bchw(x, x_size):
    """(B, H*W, C) -> (B, C, H, W)."""
    B, L, C = x.shape
    H, W = x_size
    return x.transpose(1, 2).reshape(B, C, H, W)


def window_partition(x, window_size):
    """(B, H, W, C) -> (B * nW, wh * ww, C); windows row-major, tokens row-major inside.

    A size that is not a multiple of the window raises (``view``), as in the official code.
    """
    B, H, W, C = x.shape
    wh, ww = window_size
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, wh * ww, C)


def window_reverse(windows, window_size, img_size):
    """(B * nW, wh * ww, C) -> (B, H, W, C); inverse of ``window_partition``."""
    H, W = img_size
    wh, ww = window_size
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // wh) * (W // ww))
    x = windows.view(B, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, C)


# ------------------------------------------------------------------------------------------------
# Stripe info (SPEC 4.4)
# ------------------------------------------------------------------------------------------------
def get_stripe_info(stripe_size, stripe_groups, stripe_shift, input_resolution):
    """Return (stripe extent per axis, stripe shift per axis).

    g is None -> extent s, shift s // 2 if stripe_shift else 0.
    g given   -> extent d // g, shift 0 if g == 1 else d // (2 g)  (stripe_shift ignored here).
    """
    ss, sss = [], []
    for s, g, d in zip(stripe_size, stripe_groups, input_resolution):
        if g is None:
            ss.append(s)
            sss.append(s // 2 if stripe_shift else 0)
        else:
            ss.append(d // g)
            sss.append(0 if g == 1 else d // (g * 2))
    return ss, sss


# ------------------------------------------------------------------------------------------------
# Coordinate tables (SPEC 6.1)
# ------------------------------------------------------------------------------------------------
def _axis_pos_neg(w, aw):
    pos = w - 1 - (w - aw) // 2
    neg = -(aw - 1) - (w - aw) // 2
    return pos, neg


def get_relative_coords_table(window_size, pretrained_window_size=(0, 0), anchor_window_down_factor=1):
    """(1, w0 + aw0 - 1, w1 + aw1 - 1, 2) float32 log-spaced relative coordinate table."""
    df = anchor_window_down_factor
    ws = to_2tuple(window_size)
    aws = [w // df for w in ws]
    pws = to_2tuple(pretrained_window_size)
    paws = [w // df for w in pws]

    pos0, neg0 = _axis_pos_neg(ws[0], aws[0])
    pos1, neg1 = _axis_pos_neg(ws[1], aws[1])
    coord_h = torch.arange(neg0, pos0 + 1, dtype=torch.float32)
    coord_w = torch.arange(neg1, pos1 + 1, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(coord_h, coord_w, indexing="ij"), dim=-1)  # T0, T1, 2
    table = table.unsqueeze(0).contiguous()  # 1, T0, T1, 2

    if pws[0] > 0:
        # normalise by the pretrained extents (never used by official configs: [0, 0])
        norm0, _ = _axis_pos_neg(pws[0], paws[0])
        norm1, _ = _axis_pos_neg(pws[1], paws[1])
    else:
        norm0, norm1 = pos0, pos1
    table[:, :, :, 0] /= norm0
    table[:, :, :, 1] /= norm1
    table *= 8
    table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
    return table


# ------------------------------------------------------------------------------------------------
# Relative position index (SPEC 6.2)
# ------------------------------------------------------------------------------------------------
def get_relative_position_index(window_size, anchor_window_down_factor=1, window_to_anchor=True):
    """int64 index into the flattened (w0+aw0-1) x (w1+aw1-1) table.

    window_to_anchor=True  (w2a, and plain windows with df=1): shape (w0*w1, aw0*aw1),
        idx[i, j] = (r_i - r'_j + aw0 - 1) * M + (c_i - c'_j + aw1 - 1)
    window_to_anchor=False (a2w): shape (aw0*aw1, w0*w1),
        idx[j, i] = (r'_j - r_i + w0 - 1) * M + (c'_j - c_i + w1 - 1)
    with M = aw1 + w1 - 1; both grids start at 0.
    """
    df = anchor_window_down_factor
    w0, w1 = to_2tuple(window_size)
    aw0, aw1 = w0 // df, w1 // df
    M = aw1 + w1 - 1

    coords_win = torch.stack(
        torch.meshgrid(torch.arange(w0), torch.arange(w1), indexing="ij")
    ).flatten(1)  # 2, w0*w1  (row, col)
    coords_anc = torch.stack(
        torch.meshgrid(torch.arange(aw0), torch.arange(aw1), indexing="ij")
    ).flatten(1)  # 2, aw0*aw1

    if window_to_anchor:
        rel = coords_win[:, :, None] - coords_anc[:, None, :]  # 2, N1, N2
        index = (rel[0] + aw0 - 1) * M + (rel[1] + aw1 - 1)
    else:
        rel = coords_anc[:, :, None] - coords_win[:, None, :]  # 2, N2, N1
        index = (rel[0] + w0 - 1) * M + (rel[1] + w1 - 1)
    return index.to(torch.int64).contiguous()


# ------------------------------------------------------------------------------------------------
# Masks (SPEC 6.3)
# ------------------------------------------------------------------------------------------------
def _label_map(input_resolution, window_size, shift_size):
    """(1, H, W, 1) float label map with 3x3 regions; Python slicing semantics, later wins.

    Along each axis: slice(0, -w), slice(-w, -shift), slice(-shift, None).  With shift 0 the
    middle slice is empty and the last one covers the whole axis.
    """
    H, W = input_resolution
    img_mask = torch.zeros((1, H, W, 1))
    h_slices = (
        slice(0, -window_size[0]),
        slice(-window_size[0], -shift_size[0]),
        slice(-shift_size[0], None),
    )
    w_slices = (
        slice(0, -window_size[1]),
        slice(-window_size[1], -shift_size[1]),
        slice(-shift_size[1], None),
    )
    cnt = 0
    for h in h_slices:
        for w in w_slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    return img_mask


def _compare(labels_q, labels_k):
    """(n, Nq), (n, Nk) -> (n, Nq, Nk): 0 where equal, -100 otherwise."""
    diff = labels_q.unsqueeze(2) - labels_k.unsqueeze(1)
    return diff.masked_fill(diff != 0, float(-100.0)).masked_fill(diff == 0, float(0.0))


def calculate_mask(input_resolution, window_size, shift_size):
    """Shifted-window mask (nW, N, N)."""
    window_size = to_2tuple(window_size)
    shift_size = to_2tuple(shift_size)
    img_mask = _label_map(input_resolution, window_size, shift_size)
    mask_windows = window_partition(img_mask, window_size).squeeze(-1)  # nW, N
    return _compare(mask_windows, mask_windows)


def calculate_mask_stripe(input_resolution, stripe_size, shift_size, anchor_window_down_factor):
    """Stripe masks. Returns (mask_a2w (nS, N2, N1), mask_w2a (nS, N1, N2))."""
    df = anchor_window_down_factor
    H, W = input_resolution
    stripe_size = list(stripe_size)
    shift_size = list(shift_size)
    anchor_resolution = (H // df, W // df)
    anchor_stripe = [s // df for s in stripe_size]
    anchor_shift = [s // df for s in shift_size]

    img_mask = _label_map(input_resolution, stripe_size, shift_size)
    win_labels = window_partition(img_mask, stripe_size).squeeze(-1)  # nS, N1
    anc_mask = _label_map(anchor_resolution, anchor_stripe, anchor_shift)
    anc_labels = window_partition(anc_mask, anchor_stripe).squeeze(-1)  # nS, N2

    mask_w2a = _compare(win_labels, anc_labels)  # nS, N1, N2
    mask_a2w = _compare(anc_labels, win_labels)  # nS, N2, N1
    return mask_a2w, mask_w2a


def build_table_index_mask(
    input_resolution,
    window_size,
    stripe_size,
    stripe_groups,
    anchor_window_down_factor,
    pretrained_window_size=(0, 0),
    pretrained_stripe_size=(0, 0),
):
    """The 13 shared tensors for one (padded) resolution, built the official way (incl. B1)."""
    ws = window_size
    df = anchor_window_down_factor
    ss, sss = get_stripe_info(stripe_size, stripe_groups, True, input_resolution)
    ss_v, sss_v = ss[::-1], sss[::-1]  # B1: reversed H-stripe info, not the reversed config

    out = {}
    out["table_w"] = get_relative_coords_table((ws, ws), pretrained_window_size, 1)
    out["table_sh"] = get_relative_coords_table(ss, pretrained_stripe_size, df)
    out["table_sv"] = get_relative_coords_table(ss_v, pretrained_stripe_size, df)
    out["index_w"] = get_relative_position_index((ws, ws), 1, True)
    out["index_sh_a2w"] = get_relative_position_index(ss, df, False)
    out["index_sh_w2a"] = get_relative_position_index(ss, df, True)
    out["index_sv_a2w"] = get_relative_position_index(ss_v, df, False)
    out["index_sv_w2a"] = get_relative_position_index(ss_v, df, True)
    out["mask_w"] = calculate_mask(input_resolution, (ws, ws), (ws // 2, ws // 2))
    out["mask_sh_a2w"], out["mask_sh_w2a"] = calculate_mask_stripe(input_resolution, ss, sss, df)
    out["mask_sv_a2w"], out["mask_sv_w2a"] = calculate_mask_stripe(input_resolution, ss_v, sss_v, df)
    return out


# ------------------------------------------------------------------------------------------------
# Small building blocks
# ------------------------------------------------------------------------------------------------
def drop_path(x, drop_prob=0.0, training=False):
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class PixelLinear(nn.Linear):
    """conv_type "linear": a Linear(C, C) applied per pixel on a BCHW map."""

    def forward(self, x):
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


def build_last_conv(conv_type, dim):
    if conv_type == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if conv_type == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    if conv_type == "1conv1x1":
        return nn.Conv2d(dim, dim, 1, 1, 0)
    if conv_type == "linear":
        return PixelLinear(dim, dim)
    raise ValueError(f"unknown conv_type {conv_type}")


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))


class ChannelAttention(nn.Module):
    def __init__(self, num_feat, squeeze_factor=18):
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, num_feat // squeeze_factor, 1, padding=0),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // squeeze_factor, num_feat, 1, padding=0),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.attention(x)


class CAB(nn.Module):
    """Local connection: conv3 (C -> C//4), GELU, conv3 (C//4 -> C), channel attention."""

    def __init__(self, num_feat, compress_ratio=4, squeeze_factor=18):
        super().__init__()
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // compress_ratio, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(num_feat // compress_ratio, num_feat, 3, 1, 1),
            ChannelAttention(num_feat, squeeze_factor),
        )

    def forward(self, x, x_size):
        x = self.cab(blc_to_bchw(x, x_size))
        return bchw_to_blc(x)


# ------------------------------------------------------------------------------------------------
# Attention (SPEC 4, 5)
# ------------------------------------------------------------------------------------------------
def cosine_attention(q, k):
    return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)


class AffineTransform(nn.Module):
    """SwinV2-style transform of the attention logits (logit scale, CPB bias, mask, softmax)."""

    def __init__(self, num_heads, attn_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_heads, bias=False),
        )
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, attn, relative_coords_table, relative_position_index, mask=None):
        B_, H, N1, N2 = attn.shape
        # logit scale, clamped at log(1 / 0.01)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        attn = attn * logit_scale
        # continuous position bias
        bias_table = self.cpb_mlp(relative_coords_table)  # 1, T0, T1, heads
        bias_table = bias_table.view(-1, self.num_heads)  # T0*T1, heads
        bias = bias_table[relative_position_index.view(-1)]  # N1*N2, heads
        bias = bias.view(N1, N2, -1).permute(2, 0, 1).contiguous()  # heads, N1, N2
        bias = 16 * torch.sigmoid(bias)
        attn = attn + bias.unsqueeze(0)
        # mask (shifted windows / stripes only)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(-1, nW, H, N1, N2) + mask[None, :, None]
            attn = attn.view(-1, H, N1, N2)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        return attn


class WindowAttention(nn.Module):
    def __init__(self, window_size, num_heads, window_shift=False, attn_drop=0.0):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.shift_size = window_size // 2 if window_shift else 0
        self.attn_transform = AffineTransform(num_heads, attn_drop)

    def forward(self, qkv, x_size, table, index, mask):
        H, W = x_size
        B, L, C = qkv.shape  # C = 3 * dim / 2
        ws = self.window_size
        qkv = qkv.view(B, H, W, C)

        if self.shift_size > 0:
            qkv = torch.roll(qkv, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))

        qkv = window_partition(qkv, (ws, ws))  # B*nW, N, C
        B_, N, _ = qkv.shape
        qkv = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # B_, heads, N, d

        attn = cosine_attention(q, k)
        attn = self.attn_transform(attn, table, index, mask if self.shift_size > 0 else None)
        x = attn @ v  # B_, heads, N, d
        x = x.transpose(1, 2).reshape(B_, N, C // 3)

        x = window_reverse(x, (ws, ws), x_size)  # B, H, W, C/3
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return x.reshape(B, H * W, C // 3)


class AnchorStripeAttention(nn.Module):
    def __init__(
        self,
        stripe_size,
        stripe_groups,
        stripe_shift,
        num_heads,
        anchor_window_down_factor=1,
        attn_drop=0.0,
    ):
        super().__init__()
        self.stripe_size = stripe_size
        self.stripe_groups = stripe_groups
        self.stripe_shift = stripe_shift
        self.num_heads = num_heads
        self.anchor_window_down_factor = anchor_window_down_factor
        self.attn_transform1 = AffineTransform(num_heads, attn_drop)
        self.attn_transform2 = AffineTransform(num_heads, attn_drop)

    def forward(self, qkv, anchor, x_size, table, index_a2w, index_w2a, mask_a2w, mask_w2a):
        H, W = x_size
        B, L, C = qkv.shape  # C = 3 * dim / 2
        df = self.anchor_window_down_factor
        qkv = qkv.view(B, H, W, C)

        stripe_size, shift_size = get_stripe_info(
            self.stripe_size, self.stripe_groups, self.stripe_shift, x_size
        )
        anchor_stripe_size = [s // df for s in stripe_size]
        anchor_shift_size = [s // df for s in shift_size]

        if self.stripe_shift:
            qkv = torch.roll(qkv, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
            anchor = torch.roll(
                anchor, shifts=(-anchor_shift_size[0], -anchor_shift_size[1]), dims=(1, 2)
            )

        qkv = window_partition(qkv, stripe_size)  # B*nS, N1, C
        B_, N1, _ = qkv.shape
        qkv = qkv.reshape(B_, N1, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # B_, heads, N1, d

        anchor = window_partition(anchor, anchor_stripe_size)  # B*nS, N2, C/3
        _, N2, _ = anchor.shape
        anchor = anchor.reshape(-1, N2, self.num_heads, C // 3 // self.num_heads).permute(0, 2, 1, 3)

        # stage 1: anchor -> window (anchor queries the stripe)
        attn = cosine_attention(anchor, k)  # B_, heads, N2, N1
        attn = self.attn_transform1(attn, table, index_a2w, mask_a2w if self.stripe_shift else None)
        x = attn @ v  # B_, heads, N2, d

        # stage 2: window -> anchor (stripe tokens query the anchors)
        attn = cosine_attention(q, anchor)  # B_, heads, N1, N2
        attn = self.attn_transform2(attn, table, index_w2a, mask_w2a if self.stripe_shift else None)
        x = attn @ x  # B_, heads, N1, d

        x = x.transpose(1, 2).reshape(B_, N1, C // 3)
        x = window_reverse(x, stripe_size, x_size)  # B, H, W, C/3
        if self.stripe_shift:
            x = torch.roll(x, shifts=shift_size, dims=(1, 2))
        return x.reshape(B, H * W, C // 3)


class QKVProjection(nn.Module):
    def __init__(self, dim, qkv_bias=True, proj_type="linear"):
        super().__init__()
        if proj_type != "linear":
            raise NotImplementedError(f"qkv_proj_type {proj_type} not in the oracle")
        self.body = nn.Linear(dim, dim * 3, bias=qkv_bias)

    def forward(self, x, x_size):
        return self.body(x)


class AnchorLinear(nn.Module):
    """BLC -> BCHW -> pool(df) -> BLC -> Linear(C, C/2) -> (B, H/df, W/df, C/2)."""

    def __init__(self, in_channels, out_channels, down_factor, pooling_mode="avgpool", bias=True):
        super().__init__()
        self.down_factor = down_factor
        if pooling_mode == "maxpool":
            self.pooling = nn.MaxPool2d(down_factor, down_factor)
        elif pooling_mode == "avgpool":
            self.pooling = nn.AvgPool2d(down_factor, down_factor)
        else:
            raise NotImplementedError(pooling_mode)
        self.reduction = nn.Linear(in_channels, out_channels, bias=bias)

    def forward(self, x, x_size):
        H, W = x_size
        x = self.pooling(blc_to_bchw(x, x_size))  # B, C, H/df, W/df
        x = bchw_to_blc(x)
        x = self.reduction(x)
        return x.reshape(x.shape[0], H // self.down_factor, W // self.down_factor, -1)


class AnchorProjection(nn.Module):
    def __init__(self, dim, proj_type="avgpool", one_stage=True, anchor_window_down_factor=1):
        super().__init__()
        if not one_stage or proj_type not in ("avgpool", "maxpool"):
            raise NotImplementedError(
                f"anchor projection {proj_type} (one_stage={one_stage}) not in the oracle"
            )
        self.body = nn.ModuleList(
            [AnchorLinear(dim, dim // 2, anchor_window_down_factor, proj_type, bias=True)]
        )

    def forward(self, x, x_size):
        for layer in self.body:
            x = layer(x, x_size)
        return x


class MixedAttention(nn.Module):
    def __init__(
        self,
        dim,
        num_heads_w,
        num_heads_s,
        window_size,
        window_shift,
        stripe_size,
        stripe_groups,
        stripe_type,
        stripe_shift,
        qkv_bias=True,
        qkv_proj_type="linear",
        anchor_proj_type="avgpool",
        anchor_one_stage=True,
        anchor_window_down_factor=1,
        attn_drop=0.0,
        proj_drop=0.0,
    ):
        super().__init__()
        self.dim = dim
        self.stripe_type = stripe_type
        self.qkv = QKVProjection(dim, qkv_bias, qkv_proj_type)
        self.anchor = AnchorProjection(dim, anchor_proj_type, anchor_one_stage, anchor_window_down_factor)
        self.window_attn = WindowAttention(window_size, num_heads_w, window_shift, attn_drop)
        self.stripe_attn = AnchorStripeAttention(
            stripe_size, stripe_groups, stripe_shift, num_heads_s, anchor_window_down_factor, attn_drop
        )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, x_size, tim):
        B, L, C = x.shape
        qkv = self.qkv(x, x_size)  # B, L, 3C
        qkv_window, qkv_stripe = torch.split(qkv, C * 3 // 2, dim=-1)
        anchor = self.anchor(x, x_size)  # B, H/df, W/df, C/2

        x_window = self.window_attn(qkv_window, x_size, tim["table_w"], tim["index_w"], tim["mask_w"])
        if self.stripe_type == "H":
            t, ia, iw, ma, mw = (tim[k] for k in ("table_sh", "index_sh_a2w", "index_sh_w2a", "mask_sh_a2w", "mask_sh_w2a"))
        else:
            t, ia, iw, ma, mw = (tim[k] for k in ("table_sv", "index_sv_a2w", "index_sv_w2a", "mask_sv_a2w", "mask_sv_w2a"))
        x_stripe = self.stripe_attn(qkv_stripe, anchor, x_size, t, ia, iw, ma, mw)

        x = torch.cat([x_window, x_stripe], dim=-1)
        x = self.proj(x)
        return self.proj_drop(x)


class EfficientMixAttnTransformerBlock(nn.Module):
    def __init__(
        self,
        dim,
        num_heads_w,
        num_heads_s,
        window_size,
        window_shift,
        stripe_size,
        stripe_groups,
        stripe_type,
        stripe_shift,
        mlp_ratio=4.0,
        qkv_bias=True,
        qkv_proj_type="linear",
        anchor_proj_type="avgpool",
        anchor_one_stage=True,
        anchor_window_down_factor=1,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        norm_layer=nn.LayerNorm,
        res_scale=1.0,
        local_connection=False,
    ):
        super().__init__()
        self.stripe_type = stripe_type
        self.stripe_size = list(stripe_size) if stripe_type == "H" else list(stripe_size)[::-1]
        self.stripe_groups = list(stripe_groups) if stripe_type == "H" else list(stripe_groups)[::-1]
        self.res_scale = res_scale
        self.local_connection = local_connection

        self.attn = MixedAttention(
            dim,
            num_heads_w,
            num_heads_s,
            window_size,
            window_shift,
            self.stripe_size,
            self.stripe_groups,
            stripe_type,
            stripe_shift,
            qkv_bias,
            qkv_proj_type,
            anchor_proj_type,
            anchor_one_stage,
            anchor_window_down_factor,
            attn_drop,
            drop,
        )
        self.norm1 = norm_layer(dim)
        if local_connection:
            self.conv = CAB(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = norm_layer(dim)

    def forward(self, x, x_size, tim):
        # res-post-norm: the norms act on the branch outputs
        if self.local_connection:
            x = (
                x
                + self.res_scale * self.drop_path(self.norm1(self.attn(x, x_size, tim)))
                + self.conv(x, x_size)
            )
        else:
            x = x + self.res_scale * self.drop_path(self.norm1(self.attn(x, x_size, tim)))
        x = x + self.res_scale * self.drop_path(self.norm2(self.mlp(x)))
        return x


class TransformerStage(nn.Module):
    def __init__(
        self,
        dim,
        depth,
        num_heads_window,
        num_heads_stripe,
        window_size,
        stripe_size,
        stripe_groups,
        stripe_shift,
        mlp_ratio,
        qkv_bias,
        qkv_proj_type,
        anchor_proj_type,
        anchor_one_stage,
        anchor_window_down_factor,
        drop,
        attn_drop,
        drop_path,
        norm_layer,
        conv_type,
        init_method,
        local_connection,
    ):
        super().__init__()
        self.init_method = init_method
        self.blocks = nn.ModuleList()
        for j in range(depth):
            self.blocks.append(
                EfficientMixAttnTransformerBlock(
                    dim=dim,
                    num_heads_w=num_heads_window,
                    num_heads_s=num_heads_stripe,
                    window_size=window_size,
                    window_shift=(j % 2 == 0),
                    stripe_size=stripe_size,
                    stripe_groups=stripe_groups,
                    stripe_type="H" if j % 2 == 0 else "W",
                    stripe_shift=(j % 4 in (2, 3)) if stripe_shift else False,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qkv_proj_type=qkv_proj_type,
                    anchor_proj_type=anchor_proj_type,
                    anchor_one_stage=anchor_one_stage,
                    anchor_window_down_factor=anchor_window_down_factor,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[j],
                    norm_layer=norm_layer,
                    res_scale=0.1 if init_method == "r" else 1.0,
                    local_connection=local_connection,
                )
            )
        self.conv = build_last_conv(conv_type, dim)

    def _init_weights(self):
        """Extra stage init for init_method "l", "w", "t<k>" (no effect on forward semantics)."""
        for n, m in self.named_modules():
            if self.init_method == "w":
                if isinstance(m, (nn.Linear, nn.Conv2d)) and "cpb_mlp" not in n:
                    with torch.no_grad():
                        m.weight.mul_(0.1)
            elif self.init_method == "l":
                if isinstance(m, nn.LayerNorm):
                    nn.init.constant_(m.weight, 0)
                    nn.init.constant_(m.bias, 0)
            elif "t" in self.init_method:
                # SPEC 7: "trunc-normal Linear weights with std 0.1^(len-1) * k, Conv x0.1"
                scale = 0.1 ** (len(self.init_method) - 1) * int(self.init_method[-1])
                if isinstance(m, nn.Linear) and "cpb_mlp" not in n:
                    nn.init.trunc_normal_(m.weight, std=scale, a=-2.0, b=2.0)
                elif isinstance(m, nn.Conv2d):
                    with torch.no_grad():
                        m.weight.mul_(0.1)

    def forward(self, x, x_size, tim):
        res = x
        for blk in self.blocks:
            res = blk(res, x_size, tim)
        res = bchw_to_blc(self.conv(blc_to_bchw(res, x_size)))
        return res + x


# ------------------------------------------------------------------------------------------------
# Heads
# ------------------------------------------------------------------------------------------------
class Upsample(nn.Module):
    """pixelshuffle head: 2^n -> n x [conv 64->256, PixelShuffle(2)]; 3 -> [conv 64->576, PS(3)]."""

    def __init__(self, scale, num_feat):
        super().__init__()
        m = []
        if (scale & (scale - 1)) == 0:
            for _ in range(int(math.log(scale, 2))):
                m.append(nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1))
                m.append(nn.PixelShuffle(2))
        elif scale == 3:
            m.append(nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1))
            m.append(nn.PixelShuffle(3))
        else:
            raise ValueError(f"scale {scale} is not supported. Supported scales: 2^n and 3.")
        self.up = nn.Sequential(*m)

    def forward(self, x):
        return self.up(x)


class UpsampleOneStep(nn.Module):
    def __init__(self, scale, num_feat, num_out_ch):
        super().__init__()
        self.up = nn.Sequential(
            nn.Conv2d(num_feat, (scale**2) * num_out_ch, 3, 1, 1),
            nn.PixelShuffle(scale),
        )

    def forward(self, x):
        return self.up(x)


# ------------------------------------------------------------------------------------------------
# GRL
# ------------------------------------------------------------------------------------------------
def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


class OfficialGRL(nn.Module):
    def __init__(
        self,
        img_size=64,
        in_channels=3,
        out_channels=None,
        embed_dim=96,
        upscale=2,
        img_range=1.0,
        upsampler="",
        depths=[6, 6, 6, 6, 6, 6],
        num_heads_window=[3, 3, 3, 3, 3, 3],
        num_heads_stripe=[3, 3, 3, 3, 3, 3],
        window_size=8,
        stripe_size=[8, 8],
        stripe_groups=[None, None],
        stripe_shift=False,
        mlp_ratio=4.0,
        qkv_bias=True,
        qkv_proj_type="linear",
        anchor_proj_type="avgpool",
        anchor_one_stage=True,
        anchor_window_down_factor=1,
        out_proj_type="linear",
        local_connection=False,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1,
        norm_layer=nn.LayerNorm,
        pretrained_window_size=[0, 0],
        pretrained_stripe_size=[0, 0],
        conv_type="1conv",
        init_method="n",
        fairscale_checkpoint=False,
        offload_to_cpu=False,
        euclidean_dist=False,
        **kwargs,
    ):
        super().__init__()
        if euclidean_dist:
            raise NotImplementedError("euclidean_dist is not part of the oracle")
        out_channels = out_channels or in_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        num_out_feats = 64
        self.embed_dim = embed_dim
        self.upscale = upscale
        self.upsampler = upsampler
        self.img_range = img_range
        if in_channels == 3:
            rgb_mean = (0.4488, 0.4371, 0.4040)
            self.mean = torch.Tensor(rgb_mean).view(1, 3, 1, 1)
        else:
            self.mean = torch.zeros(1, 1, 1, 1)

        max_stripe_size = max([0 if s is None else s for s in stripe_size])
        max_stripe_groups = max([0 if s is None else s for s in stripe_groups])
        max_stripe_groups *= anchor_window_down_factor
        self.pad_size = max(window_size, max_stripe_size, max_stripe_groups)

        self.input_resolution = to_2tuple(img_size)
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.stripe_size = list(stripe_size)
        self.stripe_groups = list(stripe_groups)
        self.pretrained_window_size = list(pretrained_window_size)
        self.pretrained_stripe_size = list(pretrained_stripe_size)
        self.anchor_window_down_factor = anchor_window_down_factor

        # 1. the 13 buffers, registered first on the root (persistent -> first in state_dict)
        for k, v in self.set_table_index_mask(self.input_resolution).items():
            self.register_buffer(k, v)

        # 2. head of the body
        self.conv_first = nn.Conv2d(in_channels, embed_dim, 3, 1, 1)
        self.norm_start = norm_layer(embed_dim)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # 3. stages; stochastic depth decay rule
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.layers = nn.ModuleList()
        for i in range(len(depths)):
            layer = TransformerStage(
                dim=embed_dim,
                depth=depths[i],
                num_heads_window=num_heads_window[i],
                num_heads_stripe=num_heads_stripe[i],
                window_size=window_size,
                stripe_size=stripe_size,
                stripe_groups=stripe_groups,
                stripe_shift=stripe_shift,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qkv_proj_type=qkv_proj_type,
                anchor_proj_type=anchor_proj_type,
                anchor_one_stage=anchor_one_stage,
                anchor_window_down_factor=anchor_window_down_factor,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                norm_layer=norm_layer,
                conv_type=conv_type,
                init_method=init_method,
                local_connection=local_connection,
            )
            self.layers.append(layer)
        self.norm_end = norm_layer(embed_dim)

        # 4. tail of the body
        self.conv_after_body = build_last_conv(conv_type, embed_dim)

        # 5. reconstruction head
        if self.upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_out_feats, 3, 1, 1), nn.LeakyReLU(inplace=True)
            )
            self.upsample = Upsample(upscale, num_out_feats)
            self.conv_last = nn.Conv2d(num_out_feats, out_channels, 3, 1, 1)
        elif self.upsampler == "pixelshuffledirect":
            self.upsample = UpsampleOneStep(upscale, embed_dim, out_channels)
        elif self.upsampler == "nearest+conv":
            assert self.upscale == 4, "only support x4 now."
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_out_feats, 3, 1, 1), nn.LeakyReLU(inplace=True)
            )
            self.conv_up1 = nn.Conv2d(num_out_feats, num_out_feats, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_out_feats, num_out_feats, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_out_feats, num_out_feats, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_out_feats, out_channels, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        else:
            self.conv_last = nn.Conv2d(embed_dim, out_channels, 3, 1, 1)

        # 6. init
        self.apply(_init_weights)
        if init_method in ("l", "w") or "t" in init_method:
            for layer in self.layers:
                layer._init_weights()

    # -- tables / indices / masks -------------------------------------------------------------
    def set_table_index_mask(self, x_size):
        return build_table_index_mask(
            x_size,
            self.window_size,
            self.stripe_size,
            self.stripe_groups,
            self.anchor_window_down_factor,
            self.pretrained_window_size,
            self.pretrained_stripe_size,
        )

    def get_table_index_mask(self, device=None, input_resolution=None):
        if tuple(input_resolution) == tuple(self.input_resolution):
            return {k: getattr(self, k) for k in BUFFER_NAMES}
        # recomputed on CPU, on every call, then moved to the device
        return {k: v.to(device) for k, v in self.set_table_index_mask(input_resolution).items()}

    # -- forward -----------------------------------------------------------------------------
    def check_image_size(self, x):
        _, _, h, w = x.size()
        mod_pad_h = (self.pad_size - h % self.pad_size) % self.pad_size
        mod_pad_w = (self.pad_size - w % self.pad_size) % self.pad_size
        try:
            x = F.pad(x, (0, mod_pad_w, 0, mod_pad_h), "reflect")
        except BaseException:
            x = F.pad(x, (0, mod_pad_w, 0, mod_pad_h), "constant")
        return x

    def forward_features(self, x):
        x_size = (x.shape[2], x.shape[3])
        x = bchw_to_blc(x)
        x = self.norm_start(x)
        x = self.pos_drop(x)

        tim = self.get_table_index_mask(x.device, x_size)
        for layer in self.layers:
            x = layer(x, x_size, tim)

        x = self.norm_end(x)
        return blc_to_bchw(x, x_size)

    def forward(self, x):
        H, W = x.shape[2:]
        x = self.check_image_size(x)

        self.mean = self.mean.type_as(x)
        x = (x - self.mean) * self.img_range

        if self.upsampler == "pixelshuffle":
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x)) + x
            x = self.conv_before_upsample(x)
            x = self.conv_last(self.upsample(x))
        elif self.upsampler == "pixelshuffledirect":
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x)) + x
            x = self.upsample(x)
        elif self.upsampler == "nearest+conv":
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x)) + x
            x = self.conv_before_upsample(x)
            x = self.lrelu(self.conv_up1(F.interpolate(x, scale_factor=2, mode="nearest")))
            x = self.lrelu(self.conv_up2(F.interpolate(x, scale_factor=2, mode="nearest")))
            x = self.conv_last(self.lrelu(self.conv_hr(x)))
        else:
            x_first = self.conv_first(x)
            res = self.conv_after_body(self.forward_features(x_first)) + x_first
            if self.in_channels == self.out_channels:
                x = x + self.conv_last(res)
            else:
                x = self.conv_last(res)

        x = x / self.img_range + self.mean
        return x[:, :, : H * self.upscale, : W * self.upscale]
