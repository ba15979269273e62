"""EDM's non-leaky augment pipe against a reference written from NVIDIA's algorithm (docs/method.md, "The generator (EDM)").

``reference_pipe`` below is an independent, loop-free transcription of the pipe EDM trains with
(NVlabs/edm ``training/augment.py``, the StyleGAN2-ADA pipe restricted to xflip, yflip, scale,
rotate_frac, aniso, translate_frac): the draws from the global RNG in NVIDIA's order and shapes, one
inverse matrix per image, reflect padding sized from the transformed corners, 2× upsampling with the
sym6 wavelet low-pass filter, bilinear ``grid_sample``, low-pass + 2× downsampling. It deliberately
shares no code with ``robustdiff.diffusion.augment``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustdiff.diffusion.augment import AUGMENT_DIM, AugmentPipe

# Daubechies' symlet-6 decomposition low-pass filter (12 taps; orthonormal, sum √2).
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]


def _mat(rows, like=None):
    """3×3 matrix from rows of numbers/tensors; batched (N, 3, 3) if any entry is an (N,) tensor."""
    flat = [v for row in rows for v in row]
    ref = next((v for v in flat if isinstance(v, torch.Tensor)), None)
    if ref is None:
        return torch.tensor(rows, dtype=torch.float32)
    flat = [v if isinstance(v, torch.Tensor) else torch.full_like(ref, v, dtype=torch.float32) for v in flat]
    return torch.stack(flat, dim=-1).reshape(ref.shape + (3, 3))


def _T(tx, ty):
    return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]])


def _S(sx, sy):
    return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])


def _R(t):
    return _mat([[torch.cos(t), torch.sin(-t), 0], [torch.sin(t), torch.cos(t), 0], [0, 0, 1]])


def reference_pipe(images, p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                   scale_std=0.2, rotate_frac_max=1, aniso_std=0.2, aniso_rotate_prob=0.5,
                   translate_frac_std=0.125):
    """NVIDIA's pipe, step by step, on the global RNG. Returns (images, (N, 9) labels)."""
    N, C, H, W = images.shape
    z = torch.zeros(N)
    # Pixel blitting: a fair coin per image, kept with probability multiplier·p. A disabled op (multiplier
    # 0) draws nothing; its label columns stay 0.
    lab = torch.zeros(N, 9)
    if xflip > 0:
        w = torch.randint(2, [N, 1, 1, 1])
        w = torch.where(torch.rand([N, 1, 1, 1]) < xflip * p, w, torch.zeros_like(w))
        images = torch.where(w == 1, images.flip(3), images)
        lab[:, 0] = w.reshape(N)
    if yflip > 0:
        w = torch.randint(2, [N, 1, 1, 1])
        w = torch.where(torch.rand([N, 1, 1, 1]) < yflip * p, w, torch.zeros_like(w))
        images = torch.where(w == 1, images.flip(2), images)
        lab[:, 1] = w.reshape(N)
    # Geometric parameters; G_inv maps output pixel → input pixel (centred pixel units).
    G = I3 = torch.eye(3)
    if scale > 0:
        w = torch.randn([N])
        w = torch.where(torch.rand([N]) < scale * p, w, z)
        s = (w * scale_std).exp2()
        G = G @ _S(1 / s, 1 / s)
        lab[:, 2] = w
    if rotate_frac > 0:
        w = (torch.rand([N]) * 2 - 1) * (math.pi * rotate_frac_max)
        w = torch.where(torch.rand([N]) < rotate_frac * p, w, z)
        G = G @ _R(w)
        lab[:, 3], lab[:, 4] = w.cos() - 1, w.sin()
    if aniso > 0:
        w = torch.randn([N])
        r = (torch.rand([N]) * 2 - 1) * math.pi
        w = torch.where(torch.rand([N]) < aniso * p, w, z)
        r = torch.where(torch.rand([N]) < aniso_rotate_prob, r, z)
        s = (w * aniso_std).exp2()
        G = G @ _R(-r) @ _S(1 / s, 1 / (1 / s)) @ _R(r)  # NVIDIA inverts scale2d(s, 1/s) entrywise
        lab[:, 5], lab[:, 6] = w * r.cos(), w * r.sin()
    if translate_frac > 0:
        w = torch.randn([2, N])
        w = torch.where(torch.rand([1, N]) < translate_frac * p, w, torch.zeros_like(w))
        G = G @ _T(-w[0] * (W * translate_frac_std), -w[1] * (H * translate_frac_std))
        lab[:, 7], lab[:, 8] = w[0], w[1]
    if G is I3:
        return images, lab
    # Padding: enough to hold every transformed corner plus the filter's reach, at most size − 1.
    h = torch.tensor(SYM6)
    hp = len(SYM6) // 4
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=torch.float32)
    cp = (G @ corners.t())[:, :2, :].permute(1, 0, 2).flatten(1)  # (xy, N·4)
    m = torch.cat([-cp, cp]).max(dim=1).values + torch.tensor([hp * 2 - cx, hp * 2 - cy] * 2)
    m = m.clamp(min=0).minimum(torch.tensor([W - 1, H - 1] * 2, dtype=torch.float32))
    mx0, my0, mx1, my1 = m.ceil().to(torch.int32)
    images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
    G = _T((mx0 - mx1) / 2, (my0 - my1) / 2) @ G
    # 2× upsample: interleave zeros, filter with the reversed taps (x, then y).
    k = h.flip(0)[None, None].tile([C, 1, 1])
    images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[..., :-1]
    images = F.conv2d(images, k.unsqueeze(2), groups=C, padding=[0, (len(SYM6) + 1) // 2])
    images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1]
    images = F.conv2d(images, k.unsqueeze(3), groups=C, padding=[(len(SYM6) + 1) // 2, 0])
    G = _S(2, 2) @ G @ _S(1 / 2, 1 / 2)
    G = _T(-0.5, -0.5) @ G @ _T(0.5, 0.5)
    # Resample into a 2× canvas of the image plus hp pixels each side.
    shape = [N, C, (H + hp * 2) * 2, (W + hp * 2) * 2]
    G = _S(2 / images.shape[3], 2 / images.shape[2]) @ G @ _S(shape[3] / 2, shape[2] / 2)
    grid = F.affine_grid(G[:, :2, :], shape, align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Low-pass and 2× downsample (x, then y), then crop hp pixels each side.
    k = h[None, None].tile([C, 1, 1])
    images = F.conv2d(images, k.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, (len(SYM6) - 1) // 2])
    images = images[:, :, :, hp:-hp]
    images = F.conv2d(images, k.unsqueeze(3), groups=C, stride=[2, 1], padding=[(len(SYM6) - 1) // 2, 0])
    images = images[:, :, hp:-hp, :]
    return images, lab


def _images(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _seeded(fn, seed):
    torch.manual_seed(seed)
    out = fn()
    return out, torch.rand(4)  # the global RNG's next draws: equal iff both consumed the same draws


@pytest.mark.parametrize("shape", [(16, 3, 16, 16), (12, 1, 28, 28), (12, 1, 8, 8)])
def test_matches_reference_when_every_op_fires(shape):
    # p = 1: every geometric op is drawn for every image (x/y-flip are fair coins), so scale, rotation,
    # anisotropy, translation, padding (8×8 hits the size − 1 clamp), filters and resampling all run.
    x = _images(shape)
    (ref, ref_lab), ref_next = _seeded(lambda: reference_pipe(x, p=1.0), 3)
    (out, lab), out_next = _seeded(lambda: AugmentPipe(p=1.0)(x), 3)
    assert lab.shape == (shape[0], AUGMENT_DIM) and lab.dtype == torch.float32
    assert (lab[:, [2, 5, 7, 8]] != 0).all() and (lab[:, 3:5] != 0).any(dim=1).all()  # r may be 0: col 6
    assert (lab[:, 0] == 1).any() and (lab[:, 1] == 1).any()
    assert torch.equal(lab, ref_lab)
    assert torch.equal(out_next, ref_next)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_draw_order_and_images_at_edm_probability():
    # EDM's p = 0.12: most images draw no geometric op, a few draw several. Same seed → same labels,
    # the same number of draws from the global RNG, and the same images.
    x = _images((256, 1, 12, 12), seed=1)
    (ref, ref_lab), ref_next = _seeded(lambda: reference_pipe(x, p=0.12), 5)
    (out, lab), out_next = _seeded(lambda: AugmentPipe()(x), 5)
    assert torch.equal(lab, ref_lab) and torch.equal(out_next, ref_next)
    moved = (lab[:, 2:] != 0).any(dim=1)
    assert 20 < int(moved.sum()) < 236
    torch.testing.assert_close(out[moved], ref[moved], rtol=0, atol=1e-5)
    # Images that drew no geometric op are only flipped; NVIDIA's filters change them by round-off only.
    flipped = torch.where(lab[:, 0, None, None, None] == 1, x.flip(3), x)
    flipped = torch.where(lab[:, 1, None, None, None] == 1, flipped.flip(2), flipped)
    assert torch.equal(out[~moved], flipped[~moved])
    torch.testing.assert_close(out[~moved], ref[~moved], rtol=0, atol=3e-5)


def test_generator_gives_the_same_draws_as_the_global_rng():
    x = _images((64, 1, 8, 8), seed=2)
    torch.manual_seed(11)
    want, want_lab = AugmentPipe(p=0.5)(x)
    got, got_lab = AugmentPipe(p=0.5)(x, generator=torch.Generator().manual_seed(11))
    assert torch.equal(got_lab, want_lab) and torch.equal(got, want)


def test_resampling_filter_is_orthonormal_sym6():
    # Upsampling then downsampling with an orthonormal low-pass filter is the identity; a wrong tap breaks it.
    from robustdiff.diffusion.augment import SYM6 as ours

    h = torch.tensor(ours, dtype=torch.float64)
    assert len(ours) == 12 and torch.equal(h, torch.tensor(SYM6, dtype=torch.float64))
    assert abs(h.sum().item() - math.sqrt(2)) < 1e-12
    for shift in range(0, 12, 2):
        assert abs((h[shift:] * h[:12 - shift]).sum().item() - (shift == 0)) < 1e-12, shift


def test_bilinear_warp_would_differ_from_reference():
    # The resampling matters: a single bilinear warp with reflection padding (the pipe before NVIDIA's
    # filters were adopted) on the same matrices is far from the reference, so the tests above catch it.
    x = _images((8, 1, 16, 16), seed=3)
    (ref, lab), _ = _seeded(lambda: reference_pipe(x, p=1.0, xflip=0, yflip=0, scale=0, aniso=0,
                                                   translate_frac=0), 4)
    theta = torch.atan2(lab[:, 4], lab[:, 3] + 1)
    c, s = theta.cos(), theta.sin()
    affine = torch.stack([torch.stack([c, -s, 0 * c], 1), torch.stack([s, c, 0 * c], 1)], 1)
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    bilinear = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    assert (bilinear - ref).abs().max() > 0.1
    (out, _), _ = _seeded(lambda: AugmentPipe(p=1.0, xflip=0, yflip=0, scale=0, aniso=0, translate_frac=0)(x), 4)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
