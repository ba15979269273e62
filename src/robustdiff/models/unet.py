"""SongUNet: the DDPM++ / NCSN++ U-Net of Song et al. (2021) as configured by EDM (Karras et al., 2022).

Plain PyTorch. Module and attribute names (``map_noise``, ``enc['32x32_block0'].conv0``, ...) and the
constructor keyword names follow NVIDIA's EDM release exactly, so that the ``ema`` network of an EDM
``.pkl`` (see ``robustdiff.diffusion.pretrained``) loads into ``SongUNet(**saved_init_kwargs)`` with
``load_state_dict(strict=True)``. Everything below is written from the architecture description in
docs/method.md, "The generator (EDM)"; parameter counts are checked in the tests (CIFAR-10 conditional DDPM++: 55,735,299).

Image sizes: the encoder halves the resolution ``len(channel_mult) - 1`` times with stride-2 resampling
and the decoder doubles it back, so ``img_resolution`` must be divisible by ``2 ** (len(channel_mult) - 1)``.
Examples: 32 px accepts 1-6 levels; 28 px (Fashion-MNIST) accepts 1-3 levels (28 → 14 → 7); 64 px 1-7.
Every entry of ``attn_resolutions`` must be one of the resolutions in that pyramid. A ``ValueError``
names the offending value otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNET_PRESETS",
    "Conv2d",
    "FourierEmbedding",
    "GroupNorm",
    "Linear",
    "PositionalEmbedding",
    "SongUNet",
    "UNetBlock",
    "attention",
    "resolution_pyramid",
    "unet_preset",
]


def _init_weight(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random tensor for the given init mode (EDM's 'xavier_uniform' is the only one SongUNet uses)."""
    u = torch.rand(*shape) * 2 - 1
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * u
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * u
    raise ValueError(f"unknown init mode {mode!r}; use 'xavier_uniform' or 'kaiming_uniform'")


class Linear(nn.Module):
    """y = x W^T + b, with W of shape (out, in). Parameters are cast to the input dtype (autocast-friendly)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "xavier_uniform", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_init_weight([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(_init_weight([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Square 'same' convolution with optional stride-2 resampling by a separable FIR filter.

    ``kernel=0`` means resampling only (no weight). With ``down`` the input is low-pass filtered and
    decimated before the convolution; with ``up`` it is zero-stuffed and filtered (transposed
    convolution, gain 4) first. ``fused_resample`` (down only) convolves first and decimates after,
    which is what NCSN++'s residual encoder path uses. The 2-D filter is the outer product of
    ``resample_filter`` normalised to unit sum and is stored as the buffer ``resample_filter``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "xavier_uniform",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        if fused_resample and up:
            raise ValueError("Conv2d: fused_resample is only implemented for down-sampling")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(_init_weight([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(_init_weight([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f2d = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f2d if (up or down) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            channels = x.shape[1]
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with min(num_groups, C // min_channels_per_group) groups (EDM's rule)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1:
            raise ValueError(f"GroupNorm: {num_channels} channels is fewer than {min_channels_per_group} per group")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block (GroupNorm → SiLU → conv, + embedding bias, GroupNorm → SiLU → dropout → conv)
    with optional stride-2 resampling and optional single-head self-attention after it.

    Both the residual sum and the attention sum are multiplied by ``skip_scale`` (sqrt(0.5) in SongUNet).
    The qkv 1×1 conv emits q, k, v interleaved per channel: output channel 3c + j is (q, k, v)[j] of channel c.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int = 1, dropout: float = 0.0,
                 skip_scale: float = 1.0, eps: float = 1e-5, resample_filter: Sequence[float] = (1, 1),
                 resample_proj: bool = False, init: dict | None = None, init_zero: dict | None = None,
                 init_attn: dict | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero if init_zero is not None else {"init_weight": 0})
        init_attn = dict(init_attn if init_attn is not None else init)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = num_heads if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError(f"UNetBlock: {out_channels} channels do not split into {self.num_heads} heads")
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = x + self.affine(emb).to(x.dtype)[:, :, None, None]
        x = F.silu(self.norm1(x))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (orig if self.skip is None else self.skip(orig))) * self.skip_scale

        if self.num_heads:
            b, c, h, w = x.shape
            heads = self.num_heads
            # (B, 3C, H, W) → per head (B·heads, C/heads, 3, HW), interleaved q/k/v per channel.
            q, k, v = self.qkv(self.norm2(x)).reshape(b * heads, c // heads, 3, h * w).unbind(2)
            # contiguous(): the attention output must keep the NCHW layout (NVIDIA's does), or the layout
            # carries into later blocks and F.dropout draws its mask over a different element order.
            a = attention(q, k, v).reshape(b, c, h, w).contiguous()
            x = (self.proj(a) + x) * self.skip_scale
        return x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Single-head attention over pixels, EDM's layout: q, k, v (N, d, L) → (N, d, L),
    out[:, :, i] = Σ_j softmax_j(q_i·k_j / sqrt(d)) v[:, :, j].

    Float32 without autocast: PyTorch's fused ``scaled_dot_product_attention`` (the same numbers up to
    float32 rounding). Otherwise (autocast, or half-precision inputs) NVIDIA's AttentionOp: the logits
    and the softmax are computed in float32 — k is scaled by 1/sqrt(d) in its own dtype first — and the
    weights are cast back to q's dtype before they multiply v.
    """
    if q.dtype == torch.float32 and not torch.is_autocast_enabled(q.device.type):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    with torch.autocast(q.device.type, enabled=False):
        k = k / math.sqrt(k.shape[1])
        weights = torch.einsum("ncq,nck->nqk", q.to(torch.float32), k.to(torch.float32)).softmax(dim=2)
    return torch.einsum("nqk,nck->ncq", weights.to(q.dtype), v)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a scalar per sample: (B,) → (B, num_channels) as [sin, cos].

    Frequencies are (1/max_positions)^(i / (n/2 - endpoint)), i < n/2. EDM computes [cos, sin] and then
    swaps the halves inside SongUNet; we emit [sin, cos] directly, which is the same vector.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.sin(), x.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++): (B,) → (B, num_channels) as [sin, cos] of 2π·x·freqs.

    ``freqs`` is a random buffer drawn at construction; a pretrained checkpoint's values must be loaded.
    Emitted as [sin, cos] for the same reason as ``PositionalEmbedding``.
    """

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.sin(), x.cos()], dim=1)


def resolution_pyramid(img_resolution: int, num_levels: int) -> list[int]:
    """Resolutions of the U-Net levels, e.g. (28, 3) → [28, 14, 7]; ValueError if a halving is inexact."""
    if not isinstance(img_resolution, int) or img_resolution < 1:
        raise ValueError(f"SongUNet: img_resolution must be a positive int, got {img_resolution!r}")
    if num_levels < 1:
        raise ValueError("SongUNet: channel_mult needs at least one level")
    step = 2 ** (num_levels - 1)
    if img_resolution % step:
        ok = [n for n in range(1, 8) if img_resolution % (2 ** (n - 1)) == 0]
        raise ValueError(
            f"SongUNet: img_resolution {img_resolution} cannot be halved {num_levels - 1} times exactly "
            f"(channel_mult has {num_levels} levels; stride-2 down/up would not round-trip). "
            f"Use a channel_mult with at most {max(ok)} levels for {img_resolution} px, "
            f"or a resolution divisible by {step}."
        )
    return [img_resolution >> level for level in range(num_levels)]


class SongUNet(nn.Module):
    """DDPM++ (positional embedding, standard encoder, [1,1] filter) or NCSN++ (Fourier embedding,
    residual encoder, [1,3,3,1] filter) U-Net.

    forward(x, noise_labels, class_labels, augment_labels=None):
        x: (B, in_channels, R, R), any float dtype (parameters are cast to it);
        noise_labels: (B,) conditioning scalar (EDM: ln(σ)/4);
        class_labels: (B, label_dim) one-hot floats, or None when label_dim == 0;
        augment_labels: (B, augment_dim) or None (no augmentation; sampling always passes None).
    Returns (B, out_channels, R, R).
    """

    def __init__(self,
                 img_resolution: int,
                 in_channels: int,
                 out_channels: int,
                 label_dim: int = 0,
                 augment_dim: int = 0,
                 model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4,
                 num_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10,
                 label_dropout: float = 0.0,
                 embedding_type: str = "positional",
                 channel_mult_noise: int = 1,
                 encoder_type: str = "standard",
                 decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1)):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"SongUNet: embedding_type {embedding_type!r}; use 'positional' or 'fourier'")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"SongUNet: encoder_type {encoder_type!r}; use 'standard', 'skip' or 'residual'")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"SongUNet: decoder_type {decoder_type!r}; use 'standard' or 'skip'")
        resolutions = resolution_pyramid(img_resolution, len(channel_mult))
        bad = [r for r in attn_resolutions if r not in resolutions]
        if bad:
            raise ValueError(f"SongUNet: attn_resolutions {list(attn_resolutions)} include {bad}, which are not "
                             f"among this network's resolutions {resolutions}")
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise (+ label + augmentation) embedding → two SiLU linear layers.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. Insertion order of the ModuleDict is the execution order.
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = resolutions[level]
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skip_channels = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # Decoder: at the lowest resolution two blocks (the first with attention), elsewhere an
        # up-sampling block; then num_blocks + 1 blocks that each consume one encoder skip.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolutions[level]
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        r = self.img_resolution
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, r, r):
            raise ValueError(f"SongUNet: input of shape {tuple(x.shape)}; expected (B, {self.in_channels}, {r}, {r})")

        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"SongUNet: class-conditional network (label_dim {self.label_dim}) needs class_labels")
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        out = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                out = block(out)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                out = tmp if out is None else tmp + out
            else:
                # An encoder skip is concatenated whenever the running width differs from the block's input.
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


# Architecture presets (SongUNet kwargs other than img_resolution / channels / label_dim).
UNET_PRESETS: dict[str, dict] = {
    # EDM's CIFAR-10 DDPM++ ("vp" pickles): 55,735,299 parameters with label_dim 10, augment_dim 9.
    "ddpmpp": dict(model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
                   attn_resolutions=[16], dropout=0.13, embedding_type="positional", channel_mult_noise=1,
                   encoder_type="standard", decoder_type="standard", resample_filter=[1, 1], augment_dim=9),
    # EDM's CIFAR-10 NCSN++ ("ve" pickles).
    "ncsnpp": dict(model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
                   attn_resolutions=[16], dropout=0.13, embedding_type="fourier", channel_mult_noise=2,
                   encoder_type="residual", decoder_type="standard", resample_filter=[1, 3, 3, 1], augment_dim=9),
    # CPU-sized DDPM++ for 28×28 (Fashion-MNIST) or 32×32: levels R, R/2, R/4 (28 → 14 → 7), attention
    # at R/4 (the decoder's first block at the lowest level always has attention too).
    "small": dict(model_channels=32, channel_mult=[1, 2, 2], channel_mult_emb=4, num_blocks=1,
                  attn_resolutions=None, dropout=0.1, embedding_type="positional", channel_mult_noise=1,
                  encoder_type="standard", decoder_type="standard", resample_filter=[1, 1], augment_dim=9),
}


def unet_preset(name: str, img_resolution: int) -> dict:
    """SongUNet kwargs of preset ``name`` for ``img_resolution``; attn_resolutions None means 'lowest level'.

    For 'ddpmpp'/'ncsnpp' at a resolution other than 32 the attention level is moved to img_resolution/2
    (the level CIFAR's 16×16 is at 32 px), so e.g. ddpmpp at 28 px attends at 14×14.
    """
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown SongUNet preset {name!r}; choose one of {sorted(UNET_PRESETS)}")
    kwargs = dict(UNET_PRESETS[name])
    levels = resolution_pyramid(img_resolution, len(kwargs["channel_mult"]))
    if kwargs["attn_resolutions"] is None:
        kwargs["attn_resolutions"] = [levels[-1]]
    elif img_resolution != 32:
        kwargs["attn_resolutions"] = [img_resolution // 2]
    return kwargs
