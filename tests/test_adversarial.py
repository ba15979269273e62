import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustdiff.adversarial.attacks import cw_loss, frozen_bn_stats, pgd_attack
from robustdiff.adversarial.trades import (
    AttackConfig,
    kl_batchmean,
    smoothed_cross_entropy,
    trades_adversary,
    trades_loss,
)
from robustdiff.models.wrn import WideResNet


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return WideResNet(depth=10, width=1, num_classes=10, in_channels=1, mean=(0.5,), std=(0.25,))


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


def bn_state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 128 / 255)])
def test_trades_attack_stays_in_ball_and_box_and_freezes_bn(norm, eps):
    m = tiny_model().train()
    x, _ = batch()
    before = bn_state(m)
    x_adv = trades_adversary(m, x, AttackConfig(norm=norm, eps=eps, step=2 / 255, steps=5),
                             torch.Generator().manual_seed(0))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    assert delta.abs().max() > 0  # it moved
    after = bn_state(m)
    for k in before:
        assert torch.equal(before[k], after[k]), f"attack changed {k}"
    assert all(p.grad is None for p in m.parameters()), "the attack must not compute weight gradients"
    assert all(p.requires_grad for p in m.parameters()), "parameters must require grad again afterwards"
    assert m.training


def test_frozen_bn_uses_batch_statistics():
    m = tiny_model().train()
    x, _ = batch()
    with frozen_bn_stats(m):
        out_frozen = m(x)
    m2 = tiny_model().train()
    out_train = m2(x)  # train mode, stats updated, but outputs use batch stats as well
    torch.testing.assert_close(out_frozen, out_train)
    m.eval()
    assert not torch.allclose(m(x), out_frozen)  # eval would use running stats: different


@pytest.mark.parametrize("norm,eps,step", [("linf", 8 / 255, 2 / 255), ("l2", 128 / 255, 15 / 255)])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_in_ball_and_not_weaker_than_clean(norm, eps, step, loss):
    m = tiny_model().eval()
    x, y = batch(32)
    y = m(x).argmax(1)  # points the model classifies "correctly"
    x_adv = pgd_attack(m, x, y, norm=norm, eps=eps, step=step, steps=10, loss=loss,
                       generator=torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (delta.abs().max() <= eps + 1e-6) if norm == "linf" else (delta.norm(dim=1).max() <= eps + 1e-5)
    assert (m(x_adv).argmax(1) == y).float().mean() < 1.0


def test_cw_loss_is_margin():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    # The reference: -clamp(z_y - max_other, min=0) summed: -(2-1) + -clamp(0-3, min=0) = -1 + 0
    assert cw_loss(logits, y).item() == pytest.approx(-1.0)
    # flat (zero loss and gradient) as soon as a point is misclassified, by any margin
    z = torch.tensor([[0.0, 0.5]], requires_grad=True)
    loss = cw_loss(z, torch.tensor([0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0
    assert cw_loss(torch.tensor([[100.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(-100.0)
    # κ > 0 (not the reference) keeps pushing misclassified points up to a margin of κ
    assert cw_loss(torch.tensor([[0.0, 100.0]]), torch.tensor([0]), kappa=50).item() == pytest.approx(50.0)


def test_l2_pgd_starts_on_the_eps_sphere():
    """The reference's ℓ2 start: radius exactly ε (here no clipping: images at 0.5, ε small)."""
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x = torch.full((16, 3, 8, 8), 0.5)
    y = torch.zeros(16, dtype=torch.long)
    x0 = pgd_attack(m, x, y, norm="l2", eps=0.25, step=0.1, steps=0, generator=torch.Generator().manual_seed(0))
    radius = (x0 - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(radius, torch.full((16,), 0.25), atol=1e-6, rtol=0)


def test_pgd_at_attacks_in_eval_mode_and_trains_with_plain_ce():
    from robustdiff.adversarial.trades import AttackConfig, pgd_at_loss

    torch.manual_seed(0)
    m = WideResNet(depth=10, width=1, num_classes=10, in_channels=1, mean=(0.5,), std=(0.5,))
    modes = []
    m.init_conv.register_forward_hook(lambda mod, i, o: modes.append(mod.training))
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    cfg = AttackConfig(norm="linf", eps=8 / 255, step=2 / 255, steps=3)
    m.train()
    out = pgd_at_loss(m, x, y, cfg, generator=torch.Generator().manual_seed(1))
    assert modes[:3] == [False, False, False] and modes[-1] is True and m.training  # attack eval, loss train
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits_adv, y))  # no smoothing
    modes.clear()
    pgd_at_loss(m, x, y, cfg, generator=torch.Generator().manual_seed(1), attack_mode="train", label_smoothing=0.1)
    assert all(modes)


def test_smoothed_ce_and_kl_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    y = torch.tensor([1, 2])
    s = 0.1
    logp = logits.log_softmax(1)
    expected = ((1 - s) * -logp[[0, 1], y] + s * -logp.mean(1)).mean()
    assert smoothed_cross_entropy(logits, y, s).item() == pytest.approx(expected.item(), rel=1e-6)
    q = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    p_, q_ = logits.softmax(1), q.softmax(1)
    kl = (p_ * (p_.log() - q_.log())).sum() / 2
    assert kl_batchmean(logits, q).item() == pytest.approx(kl.item(), rel=1e-6)
    assert kl.item() == pytest.approx(F.kl_div(q.log_softmax(1), p_, reduction="batchmean").item(), rel=1e-6)


class Linear(nn.Module):
    """A BN-free model, so the TRADES loss can be recomputed by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_trades_loss_equals_hand_computation():
    m = Linear()
    x = torch.rand(5, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 1, 0])
    cfg = AttackConfig(norm="linf", eps=0.1, step=0.03, steps=3)
    out = trades_loss(m, x, y, cfg, beta=5.0, label_smoothing=0.1, generator=torch.Generator().manual_seed(7))

    # by hand: same uniform start, 3 signed-gradient steps on batch-mean KL, projection, clip
    g = torch.Generator().manual_seed(7)
    p_nat = m(x).detach().softmax(1)
    x_adv = (x + (2 * torch.rand(x.shape, generator=g) - 1) * 0.1).clamp(0, 1)
    for _ in range(3):
        x_adv.requires_grad_(True)
        kl = (p_nat * (p_nat.log() - m(x_adv).log_softmax(1))).sum() / 5
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + 0.03 * grad.sign(), x - 0.1), x + 0.1).clamp(0, 1)
    logits, logits_adv = m(x), m(x_adv)
    logp = logits.log_softmax(1)
    ce = (0.9 * -logp[torch.arange(5), y] + 0.1 * -logp.mean(1)).mean()
    p = logits.softmax(1)
    rob = (p * (logp - logits_adv.log_softmax(1))).sum() / 5
    expected = ce + 5.0 * rob
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # gradients flow through both branches (clean and adversarial)
    out.loss.backward()
    g1 = m.fc.weight.grad.clone()
    m.zero_grad()
    expected.backward()
    torch.testing.assert_close(g1, m.fc.weight.grad, rtol=1e-5, atol=1e-6)


def test_trades_two_separate_forwards_update_bn_twice():
    m = tiny_model().train()
    x, y = batch()
    before = m.layer[0].block[0].batchnorm_0.num_batches_tracked.item()
    trades_loss(m, x, y, AttackConfig(steps=2), generator=torch.Generator().manual_seed(0))
    assert m.layer[0].block[0].batchnorm_0.num_batches_tracked.item() == before + 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="linf", eps=8), "8/255"), (dict(norm="l1"), "norm"), (dict(steps=0), "steps"),
    (dict(step=0.0), "step"),
])
def test_attack_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackConfig(**kwargs)


def test_l2_zero_gradient_rows_get_random_direction():
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x.flatten(1)[:, :3] * 0 + self.w  # zero input gradient

    x = torch.full((4, 1, 3, 3), 0.5)
    x_adv = trades_adversary(Const(), x, AttackConfig(norm="l2", eps=0.5, steps=3), torch.Generator().manual_seed(0))
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert torch.all(norms > 0.01) and torch.all(norms <= 0.5 + 1e-5)
    assert math.isfinite(norms.sum().item())


def test_training_and_evaluation_accept_the_same_epsilons():
    """One bound per norm (adversarial.config.EPS_LIMIT): an ε that trains can be evaluated, and an ε in pixel
    units is refused by both with the /255 fix."""
    import pytest

    from robustdiff.adversarial.config import EPS_LIMIT, AttackConfig
    from robustdiff.evaluation.robustness import EpsilonError, check_eps

    for norm, limit in EPS_LIMIT.items():
        AttackConfig(norm=norm, eps=limit)
        assert check_eps(norm, limit) == limit
        for eps in (limit * 1.5, 128.0):
            with pytest.raises(ValueError, match=r"/255"):
                AttackConfig(norm=norm, eps=eps)
            with pytest.raises(EpsilonError, match=r"/255"):
                check_eps(norm, eps)
