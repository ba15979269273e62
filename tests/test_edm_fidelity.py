"""EDM fidelity to NVIDIA's code (issue #11): the U-Net block in train mode and under autocast, and the
sampler's churn-noise streams. The reference implementations here are written from NVIDIA's algorithm
(NVlabs/edm ``training/networks.py: UNetBlock/AttentionOp``, ``generate.py``), not copied from it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustdiff.models.unet import UNetBlock

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
