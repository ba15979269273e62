import pytest
import torch

from robustdiff.adversarial.trades import AttackConfig
from robustdiff.models.wrn import WideResNet
from robustdiff.training.adversarial import AdversarialTraining
from robustdiff.training.ema import EMA, ema_decay


def module(epochs=400, **kw):
    return AdversarialTraining(WideResNet(depth=10, width=1), AttackConfig(), epochs=epochs,
                               iterations_per_epoch=98, lr=0.2, **kw)


def lrs_and_momenta(m, epochs):
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(epochs):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step()
        sched.step()
    return out


def test_cosinew_lr_at_start_end_of_warmup_and_last_epoch():
    values = lrs_and_momenta(module(400), 400)
    lr = [v[0] for v in values]
    assert lr[0] == pytest.approx(0.2 / 25)                      # epoch 0: max_lr / 25
    assert lr[9] == pytest.approx(0.2)                           # warm-up is 2.5% of 400 epochs: peak at epoch 9
    assert max(lr) == pytest.approx(0.2)
    assert lr[5] < lr[9] and lr[10] < lr[9]
    assert lr[-1] == pytest.approx(0.2 / 25 / 1e4, rel=1e-6)      # anneals to max_lr / 25 / 1e4
    mom = [v[1] for v in values]
    assert mom[0] == pytest.approx(0.95) and mom[9] == pytest.approx(0.85) and mom[-1] == pytest.approx(0.95)


@pytest.mark.parametrize("epochs", [1, 10, 39, 41, 400, 2400])
def test_cosinew_equals_torch_onecycle(epochs):
    ours = lrs_and_momenta(module(epochs), epochs)
    m = module(epochs)
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=epochs, pct_start=0.025)
    theirs = []
    for _ in range(epochs):
        theirs.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step()
        ref.step()
    flat = [v for pair in ours for v in pair]
    assert flat == pytest.approx([v for pair in theirs for v in pair], rel=1e-12, abs=1e-15)


def test_cosinew_40_epochs_does_not_crash():
    # OneCycleLR divides by zero here (warm-up of 0.025 * 40 - 1 = 0 steps); we peak at epoch 0.
    lr = [v[0] for v in lrs_and_momenta(module(40), 40)]
    assert lr[0] == pytest.approx(0.2) and lr[-1] == pytest.approx(0.2 / 25 / 1e4)


def test_momentum_cycling_switchable_and_constant_schedule():
    values = lrs_and_momenta(module(40, cycle_momentum=False), 40)
    assert {round(v[1], 6) for v in values} == {0.9}
    opt = module(40, schedule="constant").configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.2


def test_no_weight_decay_on_batchnorm_and_nesterov():
    m = module(10)
    opt = m.configure_optimizers()["optimizer"]
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert decay["nesterov"] and plain["nesterov"]
    bn_params = {id(p) for mod in m.model.modules() if isinstance(mod, torch.nn.BatchNorm2d)
                 for p in mod.parameters()}
    assert {id(p) for p in plain["params"]} == bn_params
    assert len(decay["params"]) + len(plain["params"]) == len(list(m.model.parameters()))


def test_ema_decay_rule_at_known_steps():
    w = 0.025 * 400 * 98  # 980 warm-up steps
    assert ema_decay(0, w) == 0.0
    assert ema_decay(979, w) == 0.0
    assert ema_decay(980, w) == pytest.approx(1 / 10)            # Δ = 0
    assert ema_decay(990, w) == pytest.approx(11 / 20)           # Δ = 10
    assert ema_decay(980 + 1790, w) == pytest.approx(0.995)      # (1+1790)/(10+1790) = 0.995
    assert ema_decay(10**6, w) == 0.995


def test_ema_update_and_bn_copy():
    torch.manual_seed(0)
    live = WideResNet(depth=10, width=1)
    ema = EMA(live, tau=0.995, warmup_steps=2)
    for step in range(5):
        before = [p.clone() for p in ema.module.parameters()]
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
        d = ema.update(live)
        assert d == ema_decay(step + 1, 2)  # the update after the (step+1)-th optimiser step
        assert (d == 0.0) == (step + 1 < 2)  # the first averaging update is the one whose 1-based step reaches W
        for b, e, lp in zip(before, ema.module.parameters(), live.parameters()):
            torch.testing.assert_close(e, d * b + (1 - d) * lp)
    with torch.no_grad():
        live.batchnorm.running_mean.add_(3.0)
    assert not torch.equal(ema.module.batchnorm.running_mean, live.batchnorm.running_mean)
    ema.copy_buffers(live)
    assert torch.equal(ema.module.batchnorm.running_mean, live.batchnorm.running_mean)
    assert all(not p.requires_grad for p in ema.module.parameters())
