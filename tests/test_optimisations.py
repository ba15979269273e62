"""Each speed-up in the training step leaves the fp32 result unchanged (or within a stated tolerance).

- The attack differentiates the input only (parameters frozen): bitwise the same x_adv as an attack
  whose parameters keep ``requires_grad`` (the reference's way).
- channels_last: the same logits, loss and gradients as the contiguous layout, up to float32 re-association.
- The EMA as one fused ``torch._foreach_lerp_``: within 1e-7 of the reference's per-parameter loop.
- bf16 autocast: the outer step's loss and gradients within a stated tolerance of fp32, fp32 weights and losses.
- ``torch.compile``: the whole TRADES step within float32 round-off of eager.
- Augmentation of whole batches as tensor ops: the same pixels as torchvision's per-image PIL
  RandomCrop(padding, fill 0) + RandomHorizontalFlip + ToTensor at the same offsets and flips.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import robustdiff.adversarial.attacks as attacks_mod
import robustdiff.adversarial.trades as trades_mod
from robustdiff.adversarial.trades import AttackConfig, kl_batchmean, trades_adversary, trades_loss
from robustdiff.data.augment import augment_batch, to_float_nchw
from robustdiff.models.wrn import WideResNet
from robustdiff.training.ema import EMA

# The reference's per-parameter EMA loop, written once in the training benchmark (global_step counts the update,
# 1-based).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_train import reference_ema_update  # noqa: E402


def small_wrn(in_channels: int = 1) -> WideResNet:
    torch.manual_seed(0)
    return WideResNet(depth=10, width=1, num_classes=10, in_channels=in_channels, mean=(0.5,), std=(0.25,))


def batch(n: int = 8, channels: int = 1, size: int = 28, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@contextlib.contextmanager
def _keep_param_grads(model):
    yield  # the reference's way: parameters keep requires_grad during the attack


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_input_grads_only_is_bitwise_equal(monkeypatch, norm):
    model = small_wrn().train()
    x, _ = batch()
    cfg = AttackConfig(norm, 8 / 255 if norm == "linf" else 0.5, 2 / 255, 3)
    frozen = trades_adversary(model, x, cfg, torch.Generator().manual_seed(0))

    monkeypatch.setattr(trades_mod, "input_grad_only", _keep_param_grads)
    assert all(p.requires_grad for p in model.parameters())
    with_param_grads = trades_adversary(model, x, cfg, torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())  # autograd.grad on the input leaves .grad alone
    assert torch.equal(frozen, with_param_grads)


def test_pgd_input_grads_only_is_bitwise_equal(monkeypatch):
    model = small_wrn().eval()
    x, y = batch()
    kwargs = dict(norm="linf", eps=8 / 255, step=2 / 255, steps=3, loss="cw")
    frozen = attacks_mod.pgd_attack(model, x, y, generator=torch.Generator().manual_seed(0), **kwargs)
    monkeypatch.setattr(attacks_mod, "input_grad_only", _keep_param_grads)
    with_param_grads = attacks_mod.pgd_attack(model, x, y, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(frozen, with_param_grads)


# channels_last reorders float32 sums inside the convolutions: differences are round-off only.
CHANNELS_LAST_RTOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_channels_last_matches_contiguous():
    dense = small_wrn(3).train()
    last = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    x, y = batch(channels=3, size=32)
    x_last = x.contiguous(memory_format=torch.channels_last)
    assert last.init_conv.weight.is_contiguous(memory_format=torch.channels_last)

    # The outer TRADES step at a fixed x_adv: loss and every parameter gradient.
    x_adv = (x + 0.03 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))).clamp(0, 1)
    out_d = trades_loss_at(dense, x, x_adv, y)
    out_l = trades_loss_at(last, x_last, x_adv.contiguous(memory_format=torch.channels_last), y)
    assert _rel(out_l[0], out_d[0]) < CHANNELS_LAST_RTOL
    for (name, pd), pl_ in zip(dense.named_parameters(), last.parameters()):
        assert _rel(pl_.grad, pd.grad) < CHANNELS_LAST_RTOL, name
    for bd, bl in zip(dense.buffers(), last.buffers()):  # BN running statistics
        assert _rel(bl.float(), bd.float()) < CHANNELS_LAST_RTOL

    # The attack's input gradient at a point where the KL is not ~0 (x_adv, not x + tiny).
    grads = []
    for model, inp in ((dense, x), (last, x_last)):
        xa = x_adv.clone().contiguous(memory_format=torch.channels_last if model is last else torch.contiguous_format)
        xa.requires_grad_(True)
        with torch.no_grad():
            p_nat = model(inp)
        (g,) = torch.autograd.grad(kl_batchmean(p_nat, model(xa)), xa)
        grads.append(g)
    assert _rel(grads[1], grads[0]) < CHANNELS_LAST_RTOL


def trades_loss_at(model, x, x_adv, y, beta=5.0):
    """The outer TRADES loss at a given x_adv, backpropagated (the part of trades_loss after the attack)."""
    logits_nat, logits_adv = model(x), model(x_adv)
    loss = trades_mod.smoothed_cross_entropy(logits_nat, y, 0.1) + beta * kl_batchmean(logits_nat, logits_adv)
    loss.backward()
    return loss.detach(), logits_nat.detach()


def test_channels_last_trades_step_runs_and_keeps_layout():
    model = small_wrn(3).train().to(memory_format=torch.channels_last)
    x, y = batch(channels=3, size=32)
    out = trades_loss(model, x.contiguous(memory_format=torch.channels_last), y, AttackConfig("linf", 8 / 255, 2 / 255, 2),
                      generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.init_conv.weight.is_contiguous(memory_format=torch.channels_last)


# float32 has 1.19e-7 between 1 and 2, and BN weights sit near 1: an absolute 1e-7 alone would demand
# agreement below one ulp there. Both orders of rounding agree to 1e-7 absolute plus two ulps relative.
EMA_ATOL, EMA_RTOL = 1e-7, 2.4e-7


def test_fused_ema_matches_python_loop():
    model = small_wrn()
    warmup = 5.0
    fused = EMA(model, tau=0.995, warmup_steps=warmup)
    loop = copy.deepcopy(model)
    exact = [p.detach().double().clone() for p in model.parameters()]  # the same average in float64
    g = torch.Generator().manual_seed(3)
    for step in range(40):
        with torch.no_grad():  # a training step: every weight moves a little
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        decay = fused.update(model)
        # The reference calls ema_update after incrementing its global step, with the same warm-up W.
        reference_ema_update(loop, model, step + 1, 0.995, warmup)
        exact = [e * decay + p.detach().double() * (1 - decay) for e, p in zip(exact, model.parameters())]
        for a, b, e in zip(fused.module.parameters(), loop.parameters(), exact):
            torch.testing.assert_close(a, b, atol=EMA_ATOL, rtol=EMA_RTOL)
            # The fused update is no worse an approximation of the exact average than the loop, up to one ulp.
            fused_err = float((a.detach().double() - e).abs().max())
            assert fused_err <= float((b.detach().double() - e).abs().max()) + 1.2e-7


@pytest.mark.parametrize("channels,size,padding", [(1, 28, 2), (3, 32, 4)])
def test_batch_augmentation_matches_per_image_pil(channels, size, padding):
    pytest.importorskip("torchvision")
    from PIL import Image
    from torchvision.transforms import functional as TF

    n = 32
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8))
    out = augment_batch(to_float_nchw(images), "crop_flip", padding, torch.Generator().manual_seed(5))

    # The same draws, in augment_batch's order: crop rows, crop columns, then flips.
    g = torch.Generator().manual_seed(5)
    top = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    flip = torch.rand((n,), generator=g) < 0.5
    assert 0 < int(flip.sum()) < n and len(set(top.tolist())) > 1  # the check is not vacuous

    for i in range(n):
        arr = images[i].numpy()
        img = Image.fromarray(arr[:, :, 0], mode="L") if channels == 1 else Image.fromarray(arr)
        # torchvision RandomCrop(size, padding): pad with 0, then crop at (top, left) of the padded image.
        img = TF.crop(TF.pad(img, padding, fill=0), int(top[i]), int(left[i]), size, size)
        if flip[i]:
            img = TF.hflip(img)
        assert torch.equal(out[i], TF.to_tensor(img)), i


def test_batch_augmentation_offsets_cover_the_padding():
    x = torch.ones(512, 1, 8, 8)
    out = augment_batch(x, "crop_flip", 2, torch.Generator().manual_seed(0))
    # A crop at the far corner shows two zero rows and columns; every offset 0..4 occurs in a large batch.
    zero_rows = {int((o[0].sum(1) == 0).sum()) for o in out}
    assert zero_rows == {0, 1, 2}


# ---------------------------------------------------------------------------------------------- bf16 autocast
# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); a 10-layer network accumulates a few of those.
# Stated tolerance for the outer TRADES step at a fixed x_adv: loss within 0.5%, every parameter gradient at
# cosine ≥ 0.995 to the fp32 one (measured: 7e-5 and 0.9998). Weights, optimiser and the CE/KL reductions stay fp32.
BF16_LOSS_RTOL, BF16_GRAD_COS = 5e-3, 0.995


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_bf16_autocast_trades_step_within_tolerance_of_fp32():
    fp32 = small_wrn(3).train()
    bf16 = copy.deepcopy(fp32)
    x, y = batch(n=32, channels=3, size=32)
    x_adv = (x + 0.03 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))).clamp(0, 1)
    loss32, _ = trades_loss_at(fp32, x, x_adv, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = bf16(x)
        assert logits.dtype == torch.bfloat16  # autocast is really on: the network runs in bf16
        assert kl_batchmean(logits, logits).dtype == torch.float32  # the reductions are fp32
        loss16, _ = trades_loss_at(bf16, x, x_adv, y)
    assert loss16.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in bf16.parameters())
    assert _rel(loss16, loss32) < BF16_LOSS_RTOL
    for (name, p32), p16 in zip(fp32.named_parameters(), bf16.parameters()):
        assert _cos(p16.grad, p32.grad) >= BF16_GRAD_COS, name
    assert not torch.equal(loss16, loss32)  # bf16 really changed the arithmetic


# ---------------------------------------------------------------------------------------------- torch.compile
# Inductor fuses and reorders float32 arithmetic: round-off only, but the attack takes sign(grad), so an input
# gradient within round-off of zero may flip one pixel's step. Stated tolerance: the whole TRADES step (attack
# included) gives the same loss to 1e-5 relative and every parameter gradient at cosine ≥ 0.99999
# (measured: 2e-7 and 1 − 5e-9).
COMPILE_LOSS_RTOL, COMPILE_GRAD_COS = 1e-5, 0.99999


@pytest.mark.slow
def test_compiled_trades_step_matches_eager():
    eager = small_wrn().train()
    plain = copy.deepcopy(eager)
    compiled = torch.compile(plain)
    x, y = batch(n=16)
    cfg = AttackConfig("linf", 8 / 255, 2 / 255, 2)
    outs = []
    for model in (eager, compiled):
        out = trades_loss(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        outs.append(out)
    assert _rel(outs[1].loss.detach(), outs[0].loss.detach()) < COMPILE_LOSS_RTOL
    for (name, pe), pc in zip(eager.named_parameters(), plain.parameters()):
        assert _cos(pc.grad, pe.grad) >= COMPILE_GRAD_COS, name
    for (name, be), bc in zip(eager.named_buffers(), plain.buffers()):  # BN running statistics, one update
        # Both forwards' batch statistics enter them. A running mean of near-zero-mean features (|mean| ~ 1e-4
        # after one update) carries the sum's round-off at an absolute level (measured up to 3e-8), so it is
        # compared with an absolute floor; an extra update during the attack would move it by its own size.
        torch.testing.assert_close(bc.float(), be.float(), rtol=1e-4, atol=1e-6, msg=name)
    # The attack ran with parameters frozen and BN statistics untouched, and the switches were restored.
    assert all(p.requires_grad for p in plain.parameters())
    assert all(m.track_running_stats for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("kind", ["none", "crop_flip", "crop_flip_rotate"])
def test_uint8_augmentation_is_bitwise_the_float_augmentation(kind):
    """The training step crops and flips the uint8 pixels before converting: the same floats, bit for bit,
    including a DDP rank's rows of a global batch."""
    from robustdiff.data.augment import augment_images

    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    want = augment_batch(to_float_nchw(images), kind, 4, torch.Generator().manual_seed(7))
    got = augment_images(images, kind, 4, torch.Generator().manual_seed(7))
    assert got.dtype == torch.float32 and got.shape == (64, 3, 32, 32)
    assert torch.equal(got, want)
    rows = torch.arange(1, 64, 2)  # rank 1 of 2
    part = augment_images(images[rows], kind, 4, torch.Generator().manual_seed(7), index=rows, total=64)
    assert torch.equal(part, want[rows])
    if kind != "none":
        assert not torch.equal(want, to_float_nchw(images))  # the augmentation did something


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_batch_takes_the_models_memory_layout(channels_last):
    """The augmented batch has the model's layout: a channels_last-strided input would send a contiguous model's
    convolutions to other kernels, changing the fp32 rounding (and, for one channel, .contiguous() keeps it)."""
    from types import SimpleNamespace

    from robustdiff.training.adversarial import AdversarialTraining

    module = AdversarialTraining(small_wrn(), AttackConfig(), epochs=1, iterations_per_epoch=1,
                                 channels_last=channels_last, augmentation="crop_flip", crop_padding=2)
    module._trainer = SimpleNamespace(training=True)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8))
    batch = {"image": images, "label": torch.zeros(8, dtype=torch.long), "epoch": 0, "step": 0,
             "position": torch.arange(8), "global_size": 8}
    x = module.on_after_batch_transfer(batch, 0)["x"]
    want = (784, 1, 28, 1) if channels_last else (784, 784, 28, 1)
    assert x.stride() == want
