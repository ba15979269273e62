"""EDM fidelity to NVIDIA's code: the U-Net block in train mode and under autocast, and the
sampler's churn-noise streams. The reference implementations here are written from NVIDIA's algorithm
(NVlabs/edm ``training/networks.py: UNetBlock/AttentionOp``, ``generate.py``), not copied from it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustdiff.diffusion.edm import EDMPrecond
from robustdiff.diffusion.sampler import edm_sampler, sample_images
from robustdiff.models.unet import UNetBlock

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- reference U-Net block


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """NVIDIA's attention: weights softmax(qᵀk/√d) in float32 whatever the input dtype, cast back to q's dtype,
    then applied to v in that dtype. q, k, v: (N, d, L) → (N, d, L). No autocast inside (NVIDIA has none)."""
    with torch.autocast(q.device.type, enabled=False):
        k_scaled = k / math.sqrt(k.shape[1])
        w = torch.einsum("ncq,nck->nqk", q.to(torch.float32), k_scaled.to(torch.float32)).softmax(dim=2)
    return torch.einsum("nqk,nck->ncq", w.to(q.dtype), v)


def reference_block(block: UNetBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """NVIDIA's UNetBlock.forward (non-adaptive scale) over ``block``'s own layers."""
    orig = x
    x = block.conv0(F.silu(block.norm0(x)))
    x = F.silu(block.norm1(x + block.affine(emb)[:, :, None, None].to(x.dtype)))
    x = block.conv1(F.dropout(x, p=block.dropout, training=block.training))
    x = (x + (block.skip(orig) if block.skip is not None else orig)) * block.skip_scale
    if block.num_heads:
        b, c = x.shape[:2]
        q, k, v = block.qkv(block.norm2(x)).reshape(b * block.num_heads, c // block.num_heads, 3, -1).unbind(2)
        a = _reference_attention(q, k, v)
        x = (block.proj(a.reshape(*x.shape)) + x) * block.skip_scale
    return x


def _blocks(dropout: float = 0.3) -> list[UNetBlock]:
    torch.manual_seed(0)
    kw = dict(emb_channels=32, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
              init_zero=dict(init_weight=0.5), init_attn=dict(init_weight=1.0))
    # An attention block, then two plain blocks: the attention block's output layout reaches their dropout.
    return [UNetBlock(16, 16, attention=True, **kw), UNetBlock(16, 32, **kw), UNetBlock(32, 32, **kw)]


def _run(blocks, x, emb, forward, seed=1234):
    torch.manual_seed(seed)
    for block in blocks:
        x = forward(block, x, emb)
    return x


def test_train_mode_block_chain_matches_reference_dropout_masks():
    """Same seed, same dropout masks: the outputs of a train-mode chain agree with NVIDIA's block."""
    blocks = [b.train() for b in _blocks()]
    x, emb = torch.randn(3, 16, 8, 8), torch.randn(3, 32)
    ours = _run(blocks, x, emb, lambda b, x, e: b(x, e))
    ref = _run(blocks, x, emb, reference_block)
    assert ours.is_contiguous()
    assert (ours - ref).abs().max() < 1e-5  # float32 kernel differences only (a different mask gives O(1))
    # The attention block hands on a contiguous (NCHW) tensor, as NVIDIA's einsum does.
    assert blocks[0](x, emb).is_contiguous()


def test_eval_mode_block_matches_reference():
    blocks = [b.eval() for b in _blocks()]
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 32)
    assert (_run(blocks, x, emb, lambda b, x, e: b(x, e)) - _run(blocks, x, emb, reference_block)).abs().max() < 1e-5


def _peaked_attention_block() -> UNetBlock:
    """An attention block whose logits are large (a peaked softmax), where low-precision weights show."""
    torch.manual_seed(0)
    block = UNetBlock(32, 32, 32, attention=True, skip_scale=math.sqrt(0.5), eps=1e-6,
                      init_zero=dict(init_weight=1.0), init_attn=dict(init_weight=4.0)).eval()
    return block


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_weights_in_float32_under_autocast(dtype):
    """Under autocast the q·k softmax runs in float32 (NVIDIA's AttentionOp): the block then equals the
    reference block under the same autocast, and its error against float32 stays at the level of the
    low-precision convolutions."""
    block = _peaked_attention_block()
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 32)
    with torch.no_grad():
        exact = block(x, emb)
        with torch.autocast("cpu", dtype=dtype):
            ours = block(x, emb).float()
            ref = reference_block(block, x, emb).float()
    assert torch.equal(ours, ref)
    err = (ours - exact).abs().max().item()
    assert err < 0.25 * exact.abs().max().item(), err


def test_attention_gradients_flow_under_autocast():
    block = _peaked_attention_block().train()
    x, emb = torch.randn(2, 32, 8, 8, requires_grad=True), torch.randn(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, emb).float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and block.qkv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- sampler: NVIDIA's seeding

TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
# 4 steps: σ = 80, 9.7, 0.47, 0.002. S_min/S_max leave the first and last steps without churn.
CHURN = dict(num_steps=4, S_churn=8.0, S_min=0.1, S_max=20.0, S_noise=1.007)


def _tiny_net() -> EDMPrecond:
    torch.manual_seed(0)
    return EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, **TINY).eval()


def _reference_heun(net, latents, class_labels, randn_like, num_steps, S_churn, S_min, S_max, S_noise,
                    sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM Algorithm 2 as NVIDIA's generate.py runs it: the churn noise is drawn and added on every step,
    with weight sqrt(t_hat² − t_cur²) (zero where the step does not churn)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x = latents.to(torch.float64) * t[0]
    for n in range(num_steps):
        t_cur, t_next = t[n], t[n + 1]
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)
        d = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if n < num_steps - 1:
            d2 = (x - net(x, t_next, class_labels).to(torch.float64)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
    return x


def _reference_generate(net, seeds, max_batch, **kw):
    """NVIDIA's generate.py, written from its description: seeds split into batches; per-image generators
    seeded with seed mod 2³²; latents, then random one-hot labels, then churn noise from the same generators."""
    images, labels = [], []
    for batch in torch.as_tensor(seeds).tensor_split((len(seeds) - 1) // max_batch + 1):
        gens = [torch.Generator().manual_seed(int(s) % (1 << 32)) for s in batch]
        latents = torch.stack([torch.randn([net.img_channels, net.img_resolution, net.img_resolution], generator=g)
                               for g in gens])
        idx = torch.stack([torch.randint(net.label_dim, size=[], generator=g) for g in gens])
        one_hot = torch.eye(net.label_dim)[idx]

        def randn_like(x, gens=gens):
            return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens])

        x = _reference_heun(net, latents, one_hot, randn_like, **kw)
        images.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        labels.append(idx.numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_nvidia_seeding_reproduces_generate_py_seed_for_seed():
    net = _tiny_net()
    ref_images, ref_labels = _reference_generate(net, list(range(6)), max_batch=6, **CHURN)
    images, labels = sample_images(net, range(6), 10, seed=0, batch_size=6, seeding="nvidia", **CHURN)
    assert np.array_equal(labels, ref_labels) and len(set(labels.tolist())) > 1
    assert np.array_equal(images, ref_images)
    # Seeds are seed + index: a later range continues the same seed list (in other batches: float32
    # kernels may round differently, as between NVIDIA runs with different --batch).
    tail, tail_labels = sample_images(net, range(3), 10, seed=3, batch_size=3, seeding="nvidia", **CHURN)
    assert np.array_equal(tail_labels, ref_labels[3:])
    assert (np.abs(tail.astype(int) - ref_images[3:].astype(int)) <= 1).all()


def test_churn_noise_every_step_differs_from_churned_steps_only():
    """With S_min/S_max excluding a step, drawing only on churned steps shifts the stream."""
    net = _tiny_net()
    latents = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([3, 4])

    def run(every):
        gen = torch.Generator().manual_seed(7)
        return edm_sampler(net, latents, labels, randn_like=lambda x: torch.randn(x.shape, generator=gen,
                                                                                 dtype=x.dtype),
                           noise_every_step=every, **CHURN)

    assert (run(True) - run(False)).abs().max() > 1e-2


def test_default_seeding_with_churn_window_is_batch_invariant_and_balanced():
    net = _tiny_net()
    a, la = sample_images(net, range(6), 10, seed=3, batch_size=3, **CHURN)
    b, lb = sample_images(net, range(6), 10, seed=3, batch_size=6, **CHURN)
    assert np.array_equal(la, np.arange(6)) and np.array_equal(la, lb)
    assert (np.abs(a.astype(int) - b.astype(int)) <= 1).all()


def test_unknown_seeding_is_refused():
    with pytest.raises(ValueError, match="seeding 'numpy'"):
        sample_images(_tiny_net(), range(2), 10, seed=0, seeding="numpy")
