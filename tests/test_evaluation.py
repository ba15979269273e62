"""Evaluation, export and reports, on a WRN-10-1 trained here with TRADES on real Fashion-MNIST.

Full standard AutoAttack costs minutes per 64 points on this CPU (Square alone runs 5000 queries), so
the AutoAttack tests run the standard attacks APGD-CE + APGD-T through the same code path;
benchmarks/bench_eval.py runs all four.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from robustdiff.adversarial.attacks import pgd_attack
from robustdiff.adversarial.trades import AttackConfig, trades_loss
from robustdiff.cli import evaluate as cli_eval
from robustdiff.cli import report as cli_report
from robustdiff.data.datasets import get_info, load_split
from robustdiff.evaluation.autoattack import StateMismatchError, evaluate_autoattack
from robustdiff.evaluation.export import export_robustbench, model_card
from robustdiff.evaluation.paper import paper_result
from robustdiff.evaluation.report import write_report
from robustdiff.evaluation.results import render_eval_markdown
from robustdiff.evaluation.robustness import (
    EpsilonError,
    check_eps,
    clean_accuracy_warning,
    evaluate_clean,
    evaluate_pgd,
    parse_eps,
)
from robustdiff.evaluation.runs import find_runs, load_run
from robustdiff.models.loading import CheckpointError, infer_architecture, load_wideresnet
from robustdiff.models.wrn import BN_MOMENTUM, build_wrn, set_bn_momentum
from robustdiff.utils.io import atomic_write_json, atomic_write_text

DATASET = "fashionmnist"
EPS = 8 / 255
AA_ATTACKS = ("apgd-ce", "apgd-t")
N_AA, AA_BATCH = 16, 4  # small batches: every attack gets more than one


pytestmark = pytest.mark.usefixtures("one_thread")


def _to_tensors(images, labels):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).contiguous(), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def data():
    images, labels = load_split(DATASET, "train")
    x_val, y_val = _to_tensors(images[:32], labels[:32])  # the validation split is the first 1024 images
    x_train, y_train = _to_tensors(images[1024:9216], labels[1024:9216])
    x_test, y_test = _to_tensors(*(a[:64] for a in load_split(DATASET, "test")))
    return {"val": (x_val, y_val), "train": (x_train, y_train), "test": (x_test, y_test)}


def _pgd_acc(model, x, y, steps, loss, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_adv = pgd_attack(model, x, y, eps=EPS, step=EPS / 4, steps=steps, loss=loss, generator=g)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def _clean_acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train_run(run_dir: Path, data, *, name: str, seed: int, epochs: int, steps_per_epoch: int, batch_size: int = 64):
    """A genuine (tiny) TRADES run, written in robustdiff-train's run-directory layout."""
    torch.manual_seed(seed)
    info = get_info(DATASET)
    model = build_wrn("wrn-10-1", num_classes=10, in_channels=1, mean=info.mean, std=info.std)
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    cfg = AttackConfig("linf", EPS, EPS / 4, 3)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = data["train"]
    x_val, y_val = data["val"]
    x_test, y_test = data["test"]
    history, best_val, best_state, best_epoch = [], -1.0, None, None
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)[: steps_per_epoch * batch_size]
        sums = {"loss": 0.0, "nat": 0.0, "rob": 0.0, "acc_nat": 0.0, "acc_adv": 0.0}
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = x_train[idx], y_train[idx]
            first_step = epoch == 1 and i == 0
            set_bn_momentum(model, 1.0 if first_step else BN_MOMENTUM)  # the reference: stats start from batch one
            out = trades_loss(model, xb, yb, cfg, beta=5.0, label_smoothing=0.1, generator=gen)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            sums["loss"] += out.loss.item()
            sums["nat"] += out.loss_natural.item()
            sums["rob"] += out.loss_robust.item()
            sums["acc_nat"] += (out.logits_natural.argmax(1) == yb).float().mean().item()
            sums["acc_adv"] += (out.logits_adv.argmax(1) == yb).float().mean().item()
        model.eval()
        val_pgd = _pgd_acc(model, x_val, y_val, steps=5, loss="cw")
        is_best = val_pgd >= best_val  # ties go to the later epoch
        if is_best:
            best_val, best_state, best_epoch = val_pgd, copy.deepcopy(model.state_dict()), epoch
        history.append({
            "epoch": epoch, "lr": lr, "train_loss": sums["loss"] / steps_per_epoch,
            "train_loss_natural": sums["nat"] / steps_per_epoch, "train_loss_robust": sums["rob"] / steps_per_epoch,
            "train_acc_natural": sums["acc_nat"] / steps_per_epoch, "train_acc_adv": sums["acc_adv"] / steps_per_epoch,
            "test_clean_acc": _clean_acc(model, x_test, y_test), "val_pgd_acc": val_pgd,
            "test_pgd_acc": _pgd_acc(model, x_test, y_test, 5, "ce") if epoch == epochs else None,
            "is_best": is_best,
        })
    last_clean, last_pgd = history[-1]["test_clean_acc"], history[-1]["test_pgd_acc"]
    model.load_state_dict(best_state)
    model.eval()
    summary = {"best_epoch": best_epoch, "best_val_pgd_acc": best_val, "last_epoch": epochs,
               "test_clean_acc_best": _clean_acc(model, x_test, y_test),
               "test_clean_acc_last": last_clean,
               "test_pgd_acc_best": _pgd_acc(model, x_test, y_test, 5, "ce"),
               "test_pgd_acc_last": last_pgd, "finished": True}
    run = {"name": name, "dataset": DATASET, "data_dir": None, "model": {"name": "wrn-10-1", "depth": 10, "width": 1},
           "num_classes": 10, "in_channels": 1, "norm": {"name": "linf", "eps": EPS, "step": EPS / 4, "steps": 3},
           "generated": None, "n_generated": 0, "ratio": 1.0, "epochs": epochs, "batch_size": batch_size, "lr": lr,
           "beta": 5.0, "seed": seed, "eval": {"steps": 5, "val_loss": "cw", "test_loss": "ce"}}
    atomic_write_json(run_dir / "run.json", run)
    atomic_write_text(run_dir / "config.yaml", f"name: {name}\nseed: {seed}\n")
    atomic_write_json(run_dir / "history.json", history)
    with open(run_dir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in history])
    atomic_write_json(run_dir / "summary.json", summary)
    torch.save(model.state_dict(), run_dir / "model.pt")
    return model


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("sweep")
    model_a = train_run(root / "fmnist-a", data, name="fmnist-a", seed=0, epochs=4, steps_per_epoch=7)
    train_run(root / "group" / "fmnist-b", data, name="fmnist-b", seed=1, epochs=2, steps_per_epoch=3)
    return root, model_a


@pytest.fixture(scope="module")
def model(sweep):
    return sweep[1]


@pytest.fixture(scope="module")
def aa_points(data):
    x, y = data["test"]
    return x[:N_AA], y[:N_AA]


class CountingModel(nn.Module):
    """The same weights, counting forward calls; raises once ``fail_after`` calls have been made."""

    def __init__(self, inner: nn.Module, fail_after: int | None = None):
        super().__init__()
        self.inner, self.calls, self.fail_after = inner, 0, fail_after
        self.train(inner.training)

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner(x)


@pytest.fixture(scope="module")
def aa_reference(model, aa_points):
    counting = CountingModel(model)
    result = evaluate_autoattack(counting, *aa_points, norm="linf", eps=EPS, batch_size=AA_BATCH, seed=0,
                                 attacks=AA_ATTACKS)
    return result, counting.calls


# --- evaluation --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_trained_model_is_nontrivial(sweep, data):
    root, _ = sweep
    summary = json.loads((root / "fmnist-a" / "summary.json").read_text())
    assert summary["test_clean_acc_best"] > 0.3
    assert 0 < summary["test_pgd_acc_best"] <= summary["test_clean_acc_best"]


def test_autoattack_below_pgd_below_clean(model, aa_points, aa_reference):
    result, _ = aa_reference
    clean = evaluate_clean(model, *aa_points, batch_size=AA_BATCH)
    pgd = evaluate_pgd(model, *aa_points, norm="linf", eps=EPS, steps=40, batch_size=AA_BATCH, seed=0)
    assert result["clean_acc"] == clean["acc"]
    assert result["robust_acc"] <= pgd["acc"] <= clean["acc"]
    assert pgd["acc"] > 0 and clean["acc"] > 0.3
    assert list(result["per_attack"]) == ["clean", *AA_ATTACKS]
    assert result["version"] == "standard-subset" and result["n"] == N_AA
    assert result["robust_points"].count("1") == result["n_robust"]
    assert not model.training


def test_autoattack_matches_pyautoattack_directly(model, aa_points, aa_reference, caplog):
    from pyautoattack import AutoAttack

    result, _ = aa_reference
    x, y = aa_points
    adversary = AutoAttack(model, norm="Linf", eps=EPS, version="standard", device="cpu", seed=0)
    adversary.attacks_to_run = list(AA_ATTACKS)
    with caplog.at_level("DEBUG", logger="auto-attack"):
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=AA_BATCH)
    direct = "".join("1" if v else "0" for v in (y_adv == y).tolist())
    assert result["robust_points"] == direct
    # pyautoattack logs its accuracy after each attack; ours must agree to the printed precision.
    for attack in AA_ATTACKS:
        line = next(r.getMessage() for r in caplog.records if f"after {attack.upper()}:" in r.getMessage())
        assert f"{100 * result['per_attack'][attack]:.2f}%" in line


def test_autoattack_interrupted_and_resumed_gives_same_result(model, aa_points, aa_reference, tmp_path):
    reference, total_calls = aa_reference
    state = tmp_path / "aa_state.json"
    # An APGD-CE batch costs ~110 forward calls (100 iterations and pyautoattack's checks): stop in the second.
    interrupted = CountingModel(model, fail_after=160)
    assert total_calls > 2 * 160
    with pytest.raises(KeyboardInterrupt):
        evaluate_autoattack(interrupted, *aa_points, norm="linf", eps=EPS, batch_size=AA_BATCH, seed=0,
                            state_path=state, attacks=AA_ATTACKS)
    saved = json.loads(state.read_text())
    assert (saved["attack"], saved["batches_done"], saved["per_attack"]) == ("apgd-ce", 1, {})
    resumed = evaluate_autoattack(model, *aa_points, norm="linf", eps=EPS, batch_size=AA_BATCH, seed=0,
                                  state_path=state, attacks=AA_ATTACKS)
    assert resumed["resumed"]
    assert resumed["robust_points"] == reference["robust_points"]
    assert resumed["per_attack"] == reference["per_attack"]
    # The same state file for another setting is refused, naming the field.
    with pytest.raises(StateMismatchError, match="'eps'"):
        evaluate_autoattack(model, *aa_points, norm="linf", eps=4 / 255, batch_size=AA_BATCH, seed=0,
                            state_path=state, attacks=AA_ATTACKS)


def test_autoattack_leaves_global_rng_and_mode_alone(model, aa_points):
    model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate_autoattack(model, aa_points[0][:4], aa_points[1][:4], eps=EPS, batch_size=4, attacks=["apgd-ce"])
    assert torch.equal(torch.rand(3), expected)
    assert model.training
    model.eval()


def test_eps_in_pixels_is_refused_with_the_fix():
    with pytest.raises(EpsilonError, match="8/255"):
        check_eps("linf", 8)
    with pytest.raises(EpsilonError, match="128/255"):
        check_eps("l2", 128)
    assert parse_eps("8/255", "linf") == pytest.approx(8 / 255)
    assert parse_eps("0.5", "l2") == 0.5


def test_clean_accuracy_warning_names_causes():
    w = clean_accuracy_warning(0.31, 0.90, n=1000, num_classes=10, what="model.pt")
    assert w and "normalisation applied twice" in w and "wrong dataset" in w
    assert clean_accuracy_warning(0.88, 0.90, n=1000, num_classes=10) is None
    assert clean_accuracy_warning(0.10, None, n=1000, num_classes=10)


def test_paper_table_lookup_and_markdown():
    row = paper_result("cifar10", "linf", "wrn-28-10", 20_000_000)
    assert (row.clean, row.autoattack) == (92.44, 67.31)
    assert paper_result("cifar10", "linf", "wrn-28-10", 20_000_000, epochs=400).autoattack == 63.84
    assert paper_result("fashionmnist", "linf", "wrn-10-1", 0) is None
    results = {"settings": {"name": "x", "dataset": "cifar10", "norm": "linf", "eps": EPS, "model": "wrn-28-10",
                            "n_generated": 20_000_000, "seed": 0},
               "n_examples": 10000, "clean": {"acc": 0.9}, "pgd": None, "autoattack": None, "warnings": [],
               "paper": {"clean": 92.44, "autoattack": 67.31, "note": ""}}
    md = render_eval_markdown(results)
    assert "| paper | 92.44 | — | 67.31 |" in md and "| robustdiff | 90.00 |" in md



def test_an_autoattack_subset_weaker_than_pgd_says_so():
    """apgd-ce alone can leave more points standing than the run's PGD: eval.md says which bound holds."""
    settings = {"name": "x", "dataset": "fashionmnist", "norm": "linf", "eps": EPS, "model": "wrn-10-1",
                "n_generated": 0, "seed": 0, "pgd_steps": 10, "pgd_loss": "cw"}
    aa = {"version": "custom", "attacks": ["apgd-ce"], "robust_acc": 0.36, "per_attack": {"clean": 0.41,
                                                                                          "apgd-ce": 0.36}}
    results = {"settings": settings, "n_examples": 200, "clean": {"acc": 0.41}, "pgd": {"acc": 0.355},
               "autoattack": aa, "warnings": [], "paper": None}
    md = render_eval_markdown(results)
    assert "This AutoAttack subset (apgd-ce) is weaker here than PGD-10 cw" in md
    results["pgd"] = {"acc": 0.37}
    assert "weaker here" not in render_eval_markdown(results)


# --- export ------------------------------------------------------------------------------------------

def _spec_keys(depth: int, width: int) -> set[str]:
    """The DMWideResNet key layout, written out from RobustBench's layout independently of our module."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"init_conv.weight", "logits.weight", "logits.bias"} | {f"batchnorm.{p}" for p in bn}
    n = (depth - 4) // 6
    channels = [16, 16 * width, 32 * width, 64 * width]
    for g in range(3):
        for i in range(n):
            pre = f"layer.{g}.block.{i}."
            keys |= {pre + f"batchnorm_0.{p}" for p in bn} | {pre + f"batchnorm_1.{p}" for p in bn}
            keys |= {pre + "conv_0.weight", pre + "conv_1.weight"}
            if i == 0 and channels[g] != channels[g + 1]:
                keys.add(pre + "shortcut.weight")
    return keys


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_export_roundtrip_has_spec_layout_and_same_logits(model, aa_points, tmp_path):
    path = export_robustbench(model, tmp_path / "model.pt")
    exported = torch.load(path, weights_only=True)
    assert set(exported) == _spec_keys(10, 1)
    fresh = build_wrn("wrn-10-1", num_classes=10, in_channels=1, mean=get_info(DATASET).mean,
                      std=get_info(DATASET).std)
    fresh.load_state_dict(exported, strict=True)
    x = aa_points[0]
    assert torch.equal(_logits(fresh, x), _logits(model, x))
    loaded = load_wideresnet(path, dataset=DATASET)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert set(_spec_keys(28, 10)) == set(build_wrn("wrn-28-10").state_dict())


def test_import_reference_and_robustbench_formats(model, aa_points, tmp_path):
    x = aa_points[0]
    live = copy.deepcopy(model)
    with torch.no_grad():
        live.logits.bias += 1.0
    ref = {"model_state_dict": {f"module.0.{k}": v for k, v in model.state_dict().items()},
           "unaveraged_model_state_dict": {f"module.0.{k}": v for k, v in live.state_dict().items()},
           "epoch": 400}
    torch.save(ref, tmp_path / "ref.pt")
    assert torch.equal(_logits(load_wideresnet(tmp_path / "ref.pt", dataset=DATASET), x), _logits(model, x))
    assert torch.equal(_logits(load_wideresnet(tmp_path / "ref.pt", dataset=DATASET, weights="live"), x),
                       _logits(live, x))
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "rb.pt")
    assert torch.equal(_logits(load_wideresnet(tmp_path / "rb.pt", dataset=DATASET), x), _logits(model, x))
    # A Lightning checkpoint of robustdiff-train holds the live model under model.* and the EMA under ema.module.*
    lightning = {"state_dict": {**{f"model.{k}": v for k, v in live.state_dict().items()},
                                **{f"ema.module.{k}": v for k, v in model.state_dict().items()}}, "epoch": 3}
    torch.save(lightning, tmp_path / "last.ckpt")
    assert torch.equal(_logits(load_wideresnet(tmp_path / "last.ckpt", dataset=DATASET), x), _logits(model, x))
    assert torch.equal(_logits(load_wideresnet(tmp_path / "last.ckpt", dataset=DATASET, weights="live"), x),
                       _logits(live, x))
    arch = infer_architecture(model.state_dict())
    assert (arch.depth, arch.width, arch.num_classes, arch.in_channels) == (10, 1, 10, 1)


def test_import_errors(model, tmp_path):
    sd = model.state_dict()
    with pytest.raises(CheckpointError, match="not a WideResNet state dict.*init_conv.weight"):
        load_wideresnet(nn.Linear(3, 2).state_dict(), dataset=DATASET)
    broken = {k: v for k, v in sd.items() if k != "layer.1.block.0.shortcut.weight"}
    broken["layer.0.block.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys: layer\.1\.block\.0\.shortcut\.weight.*"
                                              r"unexpected keys: layer\.0\.block\.0\.extra\.weight"):
        load_wideresnet(broken, dataset=DATASET)
    with pytest.raises(CheckpointError, match="10-class head.*cifar100 has 100 classes"):
        load_wideresnet(sd, dataset="cifar100")
    with pytest.raises(EpsilonError, match="8/255"):
        model_card(dataset=DATASET, norm="linf", eps=8, architecture="WideResNet-10-1", clean_acc=None,
                   autoattack_acc=None, n_generated=0)
    # weights_only: a checkpoint carrying an arbitrary object is refused, not executed.
    torch.save({"state_dict": sd, "extra": _Arbitrary()}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_wideresnet(tmp_path / "unsafe.pt", dataset=DATASET)


class _Arbitrary:
    pass


def test_model_card_fields():
    card = model_card(dataset="cifar10", norm="linf", eps=8 / 255, architecture="WideResNet-28-10",
                      clean_acc=0.9244, autoattack_acc=0.6731, n_generated=20_000_000)
    assert card["eps"] == "8/255" and card["clean_acc"] == "92.44" and card["autoattack_acc"] == "67.31"
    assert card["reported"] == "67.31" and card["number_forward_passes"] == 1 and card["additional_data"] is False
    assert card["footnote"] == "It uses additional 20M synthetic images in training."
    assert {"link", "name", "authors", "venue", "architecture", "dataset"} <= set(card)


# --- CLI ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(sweep):
    root, _ = sweep
    run_dir = root / "fmnist-a"
    cli_eval.main([str(run_dir), "--n-examples", "16", "--batch-size", "16", "--aa-attacks", "apgd-ce",
                   "--pgd-steps", "20", "--device", "cpu"])
    return run_dir, json.loads((run_dir / "eval.json").read_text())


def test_cli_eval_takes_settings_from_run_json(evaluated):
    run_dir, ev = evaluated
    assert ev["sources"]["dataset"] == "run.json" and ev["sources"]["eps"] == "run.json"
    assert ev["sources"]["n_examples"] == "flag" and ev["settings"]["eps"] == pytest.approx(EPS)
    assert ev["n_examples"] == 16 and ev["pgd"]["steps"] == 20
    assert ev["autoattack"]["robust_acc"] <= ev["pgd"]["acc"] <= ev["clean"]["acc"]
    assert ev["paper"] is None
    md = (run_dir / "eval.md").read_text()
    assert "| robustdiff |" in md and "no number for this setting" in md
    assert any("first 16 of 10000" in w for w in ev["warnings"])


def test_device_names_the_hydra_commands_words_too(sweep, tmp_path):
    from robustdiff.utils.hardware import torch_device

    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert torch_device("gpu") == torch.device("cuda") and torch_device("gpu:0") == torch.device("cuda:0")
        return
    # No GPU here: gpu (as trainer=gpu says it) and cuda are refused before any work, naming the way out.
    root, _ = sweep
    for name in ("gpu", "cuda:1"):
        with pytest.raises(SystemExit) as e:
            cli_eval.main([str(root / "fmnist-a"), "--n-examples", "8", "--attacks", "clean", "--device", name,
                           "--out", str(tmp_path / name)])
        assert f"--device {name}: no CUDA GPU is visible here; use --device cpu" in str(e.value.code), e.value.code
        assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match="--device tpu: not a device"):
        torch_device("tpu")


def test_cli_eval_flags_override_run_json(sweep, tmp_path):
    root, _ = sweep
    out = tmp_path / "eval"
    cli_eval.main([str(root / "fmnist-a"), "--eps", "4/255", "--n-examples", "8", "--attacks", "clean,pgd",
                   "--pgd-steps", "5", "--out", str(out), "--device", "cpu"])
    ev = json.loads((out / "eval.json").read_text())
    assert ev["settings"]["eps"] == pytest.approx(4 / 255) and ev["sources"]["eps"] == "flag"
    assert ev["settings"]["step"] == pytest.approx(1 / 255) and ev["autoattack"] is None
    # the PGD loss is the run's test-set loss (run.json eval.test_loss), the steps come from the flag
    assert ev["sources"]["pgd_loss"] == "run.json" and ev["settings"]["pgd_loss"] == "ce"
    assert ev["sources"]["pgd_steps"] == "flag" and ev["pgd"]["steps"] == 5
    assert "| PGD-5 ce (%) |" in (out / "eval.md").read_text() and "PGD-40" not in (out / "eval.md").read_text()
    # a second evaluation with other settings: eval.json is the latest, the first is kept under evals/
    cli_eval.main([str(root / "fmnist-a"), "--n-examples", "8", "--attacks", "clean,pgd", "--pgd-loss", "cw",
                   "--out", str(out), "--device", "cpu"])
    latest = json.loads((out / "eval.json").read_text())
    assert latest["settings"]["pgd_loss"] == "cw" and latest["sources"]["pgd_steps"] == "run.json"
    assert latest["pgd"]["steps"] == 5  # the run's eval.steps
    kept = [json.loads(f.read_text()) for f in sorted((out / "evals").glob("*.json"))]
    assert [k["settings"]["pgd_loss"] for k in kept] == ["ce", "cw"] and kept[0]["pgd"] == ev["pgd"]
    with pytest.raises(SystemExit, match="8/255"):
        cli_eval.main([str(root / "fmnist-a"), "--eps", "8", "--out", str(out)])


def test_cli_export_and_card(evaluated, aa_points, tmp_path):
    run_dir, _ = evaluated
    out, card_path = tmp_path / "export" / "model.pt", tmp_path / "export" / "card.json"
    with pytest.raises(SystemExit, match="does not exist; create it first"):  # never a silent mkdir -p
        cli_eval.main(["export", str(run_dir), "--out", str(out), "--card", str(card_path)])
    out.parent.mkdir()
    cli_eval.main(["export", str(run_dir), "--out", str(out), "--card", str(card_path)])
    model = load_wideresnet(run_dir / "model.pt", dataset=DATASET)
    assert torch.equal(_logits(load_wideresnet(out, dataset=DATASET), aa_points[0]), _logits(model, aa_points[0]))
    card = json.loads(card_path.read_text())
    assert card["architecture"] == "WideResNet-10-1" and card["eps"] == "8/255" and card["dataset"] == DATASET
    assert card["autoattack_acc"] is None  # eval.json holds only a subset of AutoAttack
    assert card["clean_acc"] is not None and card["footnote"] is None


# --- report ------------------------------------------------------------------------------------------

class _FakeWandbRun:
    def __init__(self):
        self.logged = []

    def log(self, payload):
        self.logged.append(payload)


def test_report_for_a_sweep(sweep, evaluated, tmp_path):
    import wandb

    root, _ = sweep
    assert [p.name for p in find_runs(root)] == ["fmnist-a", "fmnist-b"]
    out = tmp_path / "report"
    fake = _FakeWandbRun()
    rows = write_report(root, out, wandb_run=fake)
    assert [r["run"] for r in rows] == ["fmnist-b", "fmnist-a"]  # sorted by epochs
    summary = json.loads((root / "fmnist-a" / "summary.json").read_text())
    row = next(r for r in rows if r["run"] == "fmnist-a")
    assert row["clean_best"] == round(100 * summary["test_clean_acc_best"], 2)
    assert row["pgd_last"] == round(100 * summary["test_pgd_acc_last"], 2)
    assert row["autoattack"] == round(100 * evaluated[1]["autoattack"]["robust_acc"], 2)
    assert row["pgd_steps"] == 5 and row["eval_pgd_steps"] == 20  # the attacks that made the numbers, not "PGD-40"
    md = (out / "report.md").read_text()
    assert "| PGD steps |" in md and "PGD-40" not in md
    assert "fmnist-a" in md and "fmnist-b" in md and "(subset)" in md and "![fmnist-a](figures/fmnist-a.png)" in md
    with open(out / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    for name in ("fmnist-a", "group_fmnist-b"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (payload,) = fake.logged
    assert isinstance(payload["report/runs"], wandb.Table) and len(payload["report/runs"].data) == 2
    assert sum(isinstance(v, wandb.Image) for v in payload.values()) == 3  # two runs' curves and the sweep figure
    assert isinstance(payload["report/sweep"], wandb.Image) and (out / "figures" / "_sweep.png").is_file()
    history = load_run(root / "fmnist-a").history
    assert [r["epoch"] for r in history] == [1, 2, 3, 4] and history[0]["test_pgd_acc"] is None


def test_report_cli_single_run_from_csv_history(sweep, tmp_path):
    root, _ = sweep
    run_dir = tmp_path / "only-csv"
    run_dir.mkdir()
    for name in ("run.json", "summary.json", "history.csv"):
        (run_dir / name).write_bytes((root / "group" / "fmnist-b" / name).read_bytes())
    assert cli_report.main([str(run_dir)]) == 0
    assert (run_dir / "report.md").is_file() and (run_dir / "figures" / "only-csv.png").is_file()
    assert load_run(run_dir).history == load_run(root / "group" / "fmnist-b").history


def test_cli_warns_when_imported_model_is_far_below_its_recorded_accuracy(sweep, tmp_path):
    root, _ = sweep
    run_dir = tmp_path / "wrong-weights"
    run_dir.mkdir()
    for name in ("run.json", "summary.json"):
        (run_dir / name).write_bytes((root / "fmnist-a" / name).read_bytes())
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["test_clean_acc_best"] = 0.9  # as a well-trained model would record
    atomic_write_json(run_dir / "summary.json", summary)
    torch.manual_seed(5)
    untrained = build_wrn("wrn-10-1", num_classes=10, in_channels=1, mean=(0.5,), std=(0.5,))
    torch.save(untrained.state_dict(), run_dir / "model.pt")
    cli_eval.main([str(run_dir), "--attacks", "clean", "--n-examples", "64", "--device", "cpu"])
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["sources"]["expected_clean"] == "run.json"
    assert any("far below the recorded 90.00%" in w and "applied twice" in w for w in ev["warnings"])
    assert "## Warnings" in (run_dir / "eval.md").read_text()
