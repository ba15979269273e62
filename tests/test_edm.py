"""EDM: preconditioning, loss, σ schedule, Heun sampler, batch-invariant generation, SongUNet, augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from robustdiff.diffusion.augment import AUGMENT_DIM, AugmentPipe
from robustdiff.diffusion.edm import (
    EDMPrecond,
    VPPrecond,
    edm_coefficients,
    edm_loss,
    edm_loss_weight,
    to_model_range,
    to_uint8,
)
from robustdiff.diffusion.sampler import (
    edm_sampler,
    labels_for_indices,
    latents_for_indices,
    sample_images,
    sigma_schedule,
)
from robustdiff.models.unet import SongUNet, unet_preset

# A SongUNet small enough for CPU tests: 8×8 → 4×4, attention at 4×4.
TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)


def tiny_net(label_dim: int = 10, augment_dim: int = 0, seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    return EDMPrecond(img_resolution=8, img_channels=1, label_dim=label_dim, augment_dim=augment_dim, **TINY)


# ----------------------------------------------------------------------------- preconditioning


@pytest.mark.parametrize("sigma, c_skip, c_out, c_in, c_noise", [
    (0.5, 0.5, 0.25 / math.sqrt(0.5), 1 / math.sqrt(0.5), math.log(0.5) / 4),
    (1.0, 0.2, 0.5 / math.sqrt(1.25), 1 / math.sqrt(1.25), 0.0),
    (80.0, 0.25 / 6400.25, 40 / math.sqrt(6400.25), 1 / math.sqrt(6400.25), math.log(80) / 4),
])
def test_edm_coefficients_hand_values(sigma, c_skip, c_out, c_in, c_noise):
    got = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), 0.5)
    for g, want in zip(got, (c_skip, c_out, c_in, c_noise)):
        assert float(g) == pytest.approx(want, rel=1e-12, abs=1e-15)
    # Spelled-out decimals as a second check on the formulas themselves.
    if sigma == 80.0:
        assert [float(g) for g in got] == pytest.approx([3.906097e-5, 0.4999902, 0.01249976, 1.0955067], abs=1e-7)


class _Recorder(torch.nn.Module):
    """Stands in for SongUNet: records its inputs and returns a constant F = 2."""

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        self.seen = (x, noise_labels, class_labels, augment_labels)
        return torch.full_like(x, 2.0)


def test_precond_forward_combines_coefficients_and_one_hot_labels():
    net = tiny_net()
    net.model = _Recorder()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 80.0])
    out = net(x, sigma, torch.tensor([0, 3, 9]))
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in edm_coefficients(sigma))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, c_skip * x.float() + c_out * 2.0)
    seen_x, seen_noise, seen_labels, _ = net.model.seen
    torch.testing.assert_close(seen_x, c_in * x.float())
    torch.testing.assert_close(seen_noise, c_noise.flatten())
    torch.testing.assert_close(seen_labels, torch.eye(10)[[0, 3, 9]])
    # A scalar σ broadcasts over the batch; no labels → all-zero one-hot (EDM's convention).
    net(x, 1.0, None)
    assert net.model.seen[1].shape == (3,) and not net.model.seen[2].any()


def test_vp_precond_sigma_round_trip_and_coefficients():
    net = VPPrecond(img_resolution=8, img_channels=1, **TINY)
    t = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t)
    assert net.sigma_min == pytest.approx(float(net.sigma(1e-5))) and net.sigma_max == pytest.approx(152.0, rel=1e-2)
    sigma = torch.tensor([2.0])
    c_skip, c_out, c_in, c_noise = net.coefficients(sigma)
    assert (c_skip.item(), c_out.item(), c_in.item()) == pytest.approx((1.0, -2.0, 1 / math.sqrt(5)))
    assert c_noise.item() == pytest.approx(999 * float(net.sigma_inv(2.0)))


def test_loss_weight_is_inverse_c_out_squared():
    sigma = torch.tensor([0.5, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(edm_loss_weight(sigma), torch.tensor([8.0, 5.0, 6400.25 / 1600], dtype=torch.float64))
    torch.testing.assert_close(edm_loss_weight(sigma), 1 / edm_coefficients(sigma)[1] ** 2)


def test_loss_reduction_sum_over_pixels_mean_over_batch():
    net = tiny_net()
    net.model = _Recorder()  # F = 2 everywhere: the loss is a closed form of σ and the noise.
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = edm_loss(net, images, torch.arange(4), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    sigma = (torch.randn([4, 1, 1, 1], generator=g) * 1.2 - 1.2).exp()
    n = torch.randn(images.shape, generator=g) * sigma
    c_skip, c_out, _, _ = edm_coefficients(sigma)
    D = c_skip * (images + n) + c_out * 2.0
    want = (edm_loss_weight(sigma) * (D - images) ** 2).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss, want)


@pytest.mark.usefixtures("one_thread")
def test_training_steps_decrease_loss():
    net = tiny_net(augment_dim=AUGMENT_DIM)
    net.train()
    data = torch.Generator().manual_seed(0)
    images = (torch.rand(16, 1, 8, 8, generator=data) > 0.5).float() * 2 - 1
    labels = torch.arange(16) % 10
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    augment = AugmentPipe()
    losses = []
    for _ in range(30):
        # Same σ, noise and augmentation every step: a fixed objective that Adam must reduce.
        g = torch.Generator().manual_seed(123)
        loss = edm_loss(net, images, labels, augment_pipe=lambda x, g=g: augment(x, generator=g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_image_range_helpers():
    u8 = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    x = to_model_range(u8)
    assert x.min() == -1 and x.max() == 1
    torch.testing.assert_close(to_model_range(u8.float() / 255), x)
    assert torch.equal(to_uint8(x), u8)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


# ----------------------------------------------------------------------------- sampler


def test_sigma_schedule_matches_spec_18_steps():
    printed = ["80", "57.59", "40.79", "28.37", "19.35", "12.91", "8.40", "5.32", "3.26", "1.92", "1.09",
               "0.585", "0.296", "0.140", "0.060", "0.023", "0.0075", "0.002"]
    t = sigma_schedule(18)
    assert t.dtype == torch.float64 and t.shape == (19,) and t[-1] == 0
    for got, text in zip(t[:-1].tolist(), printed):
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert abs(got - float(text)) <= 0.5 * 10 ** -decimals + 1e-12, (got, text)
    assert t[0] == 80 and abs(t[17] - 0.002) < 1e-15
    assert torch.all(t[1:] < t[:-1])


class _CountingDenoiser:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


@pytest.mark.parametrize("num_steps", [1, 2, 18])
def test_heun_uses_2n_minus_1_network_calls(num_steps):
    counter = _CountingDenoiser(lambda x, sigma, labels: torch.zeros_like(x))
    x = edm_sampler(counter, torch.randn(2, 1, 8, 8), None, num_steps=num_steps)
    assert counter.calls == 2 * num_steps - 1
    assert x.dtype == torch.float64


def test_sampler_is_second_order_on_gaussian_data():
    # For data ~ N(0, s²) the exact denoiser is D(x; σ) = x·s²/(s² + σ²) and the probability-flow ODE
    # maps x(σ_max) to x(0) = x·s/sqrt(s² + σ_max²). Heun's error must shrink ~4× per step doubling.
    s = 0.5
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    want = latents.double() * 80 * s / math.sqrt(s ** 2 + 80 ** 2)

    def error(num_steps):
        x = edm_sampler(lambda x, sigma, labels: x * s ** 2 / (s ** 2 + sigma.reshape(-1, 1, 1, 1) ** 2),
                        latents, num_steps=num_steps, sigma_min=1e-4)
        return float(((x - want) / want).abs().max())

    e64, e128 = error(64), error(128)
    assert e128 < 2e-3
    assert 3.5 < e64 / e128 < 4.5


def test_latents_and_labels_depend_only_on_global_index():
    a = latents_for_indices(range(10), (1, 4, 4), seed=7)
    b = latents_for_indices([3, 9, 5], (1, 4, 4), seed=7)
    assert torch.equal(a[[3, 9, 5]], b)
    assert not torch.equal(latents_for_indices([3], (1, 4, 4), seed=8)[0], a[3])
    assert not torch.equal(a[0], a[1])
    labels = labels_for_indices(range(1000), 10)
    assert torch.equal(torch.bincount(labels), torch.full((10,), 100))
    assert labels_for_indices([0, 11, 25], 10).tolist() == [0, 1, 5]


@pytest.mark.usefixtures("one_thread")
def test_generation_is_batch_size_invariant():
    net = tiny_net().eval()
    indices = list(range(64))
    ref_x = None
    for batch in (1, 7, 64):
        outs = []
        for start in range(0, 64, batch):
            idx = indices[start:start + batch]
            lat = latents_for_indices(idx, (1, 8, 8), seed=3)
            outs.append(edm_sampler(net, lat, labels_for_indices(idx, 10), num_steps=3))
        x = torch.cat(outs)
        if ref_x is None:
            ref_x = x
        else:
            assert (x - ref_x).abs().max() <= 1e-6
    images, labels = sample_images(net, indices, num_classes=10, seed=3, num_steps=3, batch_size=7)
    assert images.shape == (64, 8, 8, 1) and images.dtype.name == "uint8"
    assert labels.tolist() == [i % 10 for i in indices]
    # uint8 output equals to_uint8 of the solver state except where a value sits on a rounding edge.
    ref_u8 = to_uint8(ref_x).permute(0, 2, 3, 1).numpy()
    assert (abs(images.astype(int) - ref_u8.astype(int)) <= 1).all()
    assert (images == ref_u8).mean() > 0.999
    # Churn noise comes from each image's own generator: still batch-invariant.
    c1, _ = sample_images(net, indices[:10], 10, seed=3, num_steps=3, batch_size=3, S_churn=5)
    c2, _ = sample_images(net, indices[:10], 10, seed=3, num_steps=3, batch_size=10, S_churn=5)
    assert (abs(c1.astype(int) - c2.astype(int)) <= 1).all()
    assert not (c1 == images[:10]).all()


# ----------------------------------------------------------------------------- SongUNet


def test_cifar10_ddpmpp_parameter_count():
    with torch.device("meta"):
        net = SongUNet(img_resolution=32, in_channels=3, out_channels=3, label_dim=10, augment_dim=9,
                       model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
                       dropout=0.13, embedding_type="positional", encoder_type="standard",
                       decoder_type="standard")
    assert sum(p.numel() for p in net.parameters()) == 55_735_299
    # Module names NVIDIA's state dicts use.
    keys = set(net.state_dict())
    for k in ["map_label.weight", "map_augment.weight", "map_layer0.bias", "map_layer1.weight",
              "enc.32x32_conv.weight", "enc.16x16_down.conv0.resample_filter", "enc.16x16_down.skip.weight",
              "enc.16x16_block0.qkv.weight", "enc.16x16_block3.proj.bias", "dec.8x8_in0.norm2.weight",
              "dec.8x8_in1.affine.weight", "dec.16x16_up.conv0.resample_filter", "dec.32x32_block4.skip.weight",
              "dec.32x32_aux_norm.weight", "dec.32x32_aux_conv.weight"]:
        assert k in keys, k
    assert "map_augment.bias" not in keys and "dec.32x32_block3.qkv.weight" not in keys


def test_ncsnpp_has_fourier_buffer_and_residual_path():
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], embedding_type="fourier", channel_mult_noise=2,
                   encoder_type="residual", resample_filter=[1, 3, 3, 1])
    keys = set(net.state_dict())
    assert "map_noise.freqs" in keys and "enc.4x4_aux_residual.weight" in keys
    out = net(torch.randn(2, 1, 8, 8), torch.randn(2), None)
    assert out.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("resolution, levels", [(28, 3), (32, 3), (28, 2), (32, 4)])
def test_accepted_resolutions_round_trip(resolution, levels):
    net = SongUNet(resolution, 1, 1, model_channels=8, channel_mult=[1] * levels, num_blocks=1,
                   attn_resolutions=[resolution >> (levels - 1)])
    assert net(torch.randn(1, 1, resolution, resolution), torch.zeros(1), None).shape == (1, 1, resolution, resolution)


def test_rejected_resolutions_raise_clear_errors():
    with pytest.raises(ValueError, match="cannot be halved 3 times"):
        SongUNet(28, 1, 1, channel_mult=[1, 2, 2, 2], attn_resolutions=[])
    with pytest.raises(ValueError, match="attn_resolutions"):
        SongUNet(28, 1, 1, channel_mult=[1, 2, 2], attn_resolutions=[16])
    net = SongUNet(28, 1, 1, **unet_preset("small", 28))
    with pytest.raises(ValueError, match="expected"):
        net(torch.randn(1, 1, 32, 32), torch.zeros(1), None)


def test_small_preset_for_fashion_mnist():
    kwargs = unet_preset("small", 28)
    assert kwargs["attn_resolutions"] == [7]
    net = EDMPrecond(28, 1, label_dim=10, **kwargs).eval()
    out = net(torch.randn(2, 1, 28, 28), torch.tensor([1.0, 2.0]), torch.tensor([1, 2]),
              augment_labels=torch.zeros(2, AUGMENT_DIM))
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()
    # bf16 autocast path returns float32 and stays close to float32 evaluation.
    out16 = net(torch.randn(2, 1, 28, 28), torch.tensor([1.0, 2.0]), torch.tensor([1, 2]),
                autocast_dtype=torch.bfloat16)
    assert out16.dtype == torch.float32


# ----------------------------------------------------------------------------- augmentation


def test_augment_conditioning_zero_when_nothing_applied():
    x = torch.randn(32, 3, 8, 8)
    y, labels = AugmentPipe(p=0.0)(x)
    assert torch.equal(y, x) and labels.shape == (32, AUGMENT_DIM) and not labels.any()


def test_augment_conditioning_layout():
    x = torch.randn(512, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    # Only x-flip: column 0 is the flip bit and the image is exactly mirrored.
    y, lab = AugmentPipe(p=1, xflip=1, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)(x, generator=g)
    flipped = lab[:, 0] == 1
    assert 0.4 < flipped.float().mean() < 0.6 and not lab[:, 1:].any()
    assert torch.equal(y[flipped], x[flipped].flip(3)) and torch.equal(y[~flipped], x[~flipped])
    # Only rotation: columns 3, 4 are cos θ − 1 and sin θ, i.e. a point on the shifted unit circle.
    _, lab = AugmentPipe(p=1, xflip=0, yflip=0, scale=0, rotate_frac=1, aniso=0, translate_frac=0)(x, generator=g)
    torch.testing.assert_close((lab[:, 3] + 1) ** 2 + lab[:, 4] ** 2, torch.ones(512))
    assert (lab[:, [0, 1, 2, 5, 6, 7, 8]] == 0).all()
    # EDM defaults: x-flip always drawn (~50%), each geometric op in ~12% of images.
    _, lab = AugmentPipe()(x, generator=g)
    assert 0.4 < (lab[:, 0] == 1).float().mean() < 0.6
    for col in (1, 2, 4, 5, 7):
        assert 0.05 < (lab[:, col] != 0).float().mean() < 0.2, col


def test_augment_translation_moves_content():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1
    pipe = AugmentPipe(p=1, xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=1,
                       translate_frac_std=1 / 8)  # one unit of tx = one pixel at 8 px
    y, lab = pipe(x, generator=torch.Generator().manual_seed(2))
    tx, ty = lab[0, 7].item(), lab[0, 8].item()
    peak = (y[0, 0] == y[0, 0].max()).nonzero()[0].tolist()
    assert peak == [min(7, max(0, round(4 + ty))), min(7, max(0, round(4 + tx)))]
