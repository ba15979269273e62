"""End-to-end TRADES runs on real Fashion-MNIST, resume exactness, configs and bad input."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import EXPERIMENTS_DIR, compose_train
from robustdiff.training.run import ConfigError, train
from robustdiff.utils.naming import run_name


def load_weights(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"]


@pytest.mark.slow
def test_two_epochs_equal_interrupted_and_resumed(tmp_path, tiny_overrides, stop_after):
    """2 epochs straight == killed mid-epoch 1, resumed, killed at the end of epoch 1, resumed."""
    straight = tmp_path / "straight"
    cfg = compose_train(*tiny_overrides, "epochs=2")
    s1 = train(cfg, straight)
    assert s1["finished"] and s1["last_epoch"] == 2

    resumed = tmp_path / "resumed"
    stop_after(4)  # SIGTERM after 4 optimiser steps, then after 12: the same command each time
    out = train(cfg, resumed)
    assert out.get("interrupted") and not (resumed / "history.json").exists()
    ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    stop_after(12)
    out = train(cfg, resumed)
    assert out.get("interrupted")
    assert len(json.loads((resumed / "history.json").read_text())) == 1  # epoch 1 finished and evaluated
    stop_after(None)
    s2 = train(cfg, resumed)
    assert s2["finished"]

    a, b = load_weights(straight), load_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    ha = json.loads((straight / "history.json").read_text())
    hb = json.loads((resumed / "history.json").read_text())
    assert ha == hb
    assert torch.equal(torch.load(straight / "model.pt", weights_only=True)["logits.weight"],
                       torch.load(resumed / "model.pt", weights_only=True)["logits.weight"])


def test_finished_run_is_not_retrained_and_other_model_refused(tmp_path, tiny_overrides):
    run = tmp_path / "r"
    train(compose_train(*tiny_overrides, "epochs=1"), run)
    stamp = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    again = train(compose_train(*tiny_overrides, "epochs=1"), run)
    assert again["finished"] and (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="model"):
        train(compose_train(*tiny_overrides, "epochs=1", "model=wrn-10-2"), run)
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp  # untouched


@pytest.mark.slow
def test_short_run_on_fashion_mnist_learns(tmp_path):
    """Clean and PGD accuracy of the trained EMA model beat the untrained model's."""
    overrides = ["model=wrn-10-1", "batch_size=64", "limit_train=1600", "val_size=256", "limit_test=256",
                 "norm.steps=3", "eval.steps=5", "logger=csv", "trainer.enable_progress_bar=false", "epochs=4",
                 "lr=0.1", "ema_warmup=0.5"]
    run = tmp_path / "learn"
    summary = train(compose_train(*overrides), run)
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    # chance level is 10%; an untrained WRN sits there
    assert summary["test_clean_acc_last"] > 0.45, history
    assert summary["best_val_pgd_acc"] > 0.25, history
    assert summary["test_pgd_acc_last"] is not None  # PGD on the test set at the last epoch
    assert (run / "csv" / "version_0" / "metrics.csv").is_file() and (run / "model.pt").is_file()
    state = torch.load(run / "model.pt", weights_only=True)
    assert "init_conv.weight" in state and not any(k.startswith("module.") for k in state)


def test_every_config_group_composes():
    from robustdiff.data.datasets import get_info
    from robustdiff.models.wrn import WideResNet
    from robustdiff.training.config import attack_config, validate
    from robustdiff.training.trainer import CONTROLLED, build_logger, trainer_arguments, user_callbacks

    conf = Path(__file__).resolve().parents[1] / "conf"
    for group in ("dataset", "norm", "model", "trainer", "logger", "callbacks"):
        for option in sorted(p.stem for p in (conf / group).glob("*.yaml")):
            cfg = compose_train(f"{group}={option}")
            assert cfg[group] is not None
            validate(cfg)
            info = get_info(cfg.dataset.name)
            if group == "model" and option in ("wrn-10-1", "wrn-10-2", "wrn-16-4"):
                WideResNet(depth=cfg.model.depth, width=cfg.model.width, num_classes=info.num_classes)
            attack_config(cfg.norm)
            if group == "logger" and option != "wandb":
                build_logger(cfg, Path("/tmp/unused"), "x")
            if group == "trainer":
                assert not set(trainer_arguments(cfg, {})) & set(CONTROLLED)
            if group == "callbacks":
                user_callbacks(cfg)
    for option in sorted(p.stem for p in (conf / "debug").glob("*.yaml")):
        cfg = compose_train(f"debug={option}")
        assert cfg.debug_mode == option
        validate(cfg)
        trainer_arguments(cfg, {})
    for recipe in sorted((EXPERIMENTS_DIR / "experiment").glob("*.yaml")):
        cfg = compose_train(f"experiment={recipe.stem}")
        validate(cfg)


@pytest.mark.parametrize("trainer, expected", [("gpu", True), ("ddp", True), ("cpu", False)])
def test_gpu_trainers_autotune_cudnn(tmp_path, monkeypatch, trainer, expected):
    """trainer=gpu/ddp give Lightning benchmark=True (cuDNN picks each convolution's fastest kernel once, as the
    bare-step benchmark does); trainer=cpu leaves torch's setting alone."""
    from robustdiff.training.trainer import make_trainer

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = compose_train(f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=1", "logger=none",
                        "trainer.enable_progress_bar=false")
    make_trainer(cfg, tmp_path, [], max_epochs=1)
    assert torch.backends.cudnn.benchmark is expected


def test_unknown_choice_lists_options():
    with pytest.raises(ConfigCompositionException, match="fashionmnist"):
        compose_train("dataset=mnist")


@pytest.mark.parametrize("override,match", [
    ("norm.eps=8", "8/255"), ("batch_size=0", "batch_size"), ("epochs=0", "epochs"),
    ("label_smoothing=1.5", "label_smoothing"), ("beta=-1", "beta"), ("norm.steps=0", "steps"),
    ("norm.eps=abc", "not a number"), ("ratio=1.5", "ratio"), ("trainer=ddp", "divisible"),
    ("precision=fp16", "precision"), ("compile=fast", "compile"),
])
def test_bad_values_fail_before_training(tmp_path, override, match):
    extra = ["batch_size=33"] if override == "trainer=ddp" else []
    with pytest.raises(ConfigError, match=match):
        train(compose_train("logger=none", *extra, override), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_missing_dataset_files_say_where_they_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        train(compose_train("dataset=cifar10", f"data_dir={tmp_path}", "logger=none", "epochs=1"), tmp_path / "r")


def test_run_names_are_deterministic():
    assert run_name(None, "dataset:cifar10__epochs:400") == "dataset:cifar10__epochs:400"
    assert run_name("a=b,c") == "a_b_c"  # '=' and ',' would break Hydra overrides that name the directory
    assert run_name(None, "") == "default"
    assert run_name("my run/1") == "my_run_1"
    long = run_name(None, "x=" + "a" * 300)
    assert len(long) <= 120 and long == run_name(None, "x=" + "a" * 300)


@pytest.mark.slow
def test_fast_path_bf16_channels_last_compile_trains(tmp_path, tiny_overrides, monkeypatch):
    """precision=bf16-mixed + channels_last + compile: the attack and the step run autocast in the compiled
    network; the checkpoints keep the plain key layout (no ``_orig_mod.``) and the EMA model stays fp32."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    counters.clear()
    # Falling back to eager past the graph limit would pass silently; make it an error here.
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    run = tmp_path / "fast"
    summary = train(compose_train(*tiny_overrides, "epochs=1", "precision=bf16-mixed", "channels_last=true",
                                  "compile=true"), run)
    history = json.loads((run / "history.json").read_text())
    assert summary["finished"] and all(map(math.isfinite, (history[0]["train_loss"], history[0]["train_loss_robust"])))
    assert counters["stats"]["unique_graphs"] >= 2  # the training network really was compiled (attack + step)
    assert torch._dynamo.config.recompile_limit >= 16  # room for the step's graphs (allow_graphs)
    state = torch.load(run / "model.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in state) and "init_conv.weight" in state
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    assert json.loads((run / "run.json").read_text())["precision"] == "bf16-mixed"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_training_step_never_waits_for_the_device(tmp_path, tiny_overrides, monkeypatch, norm):
    """No host-device synchronisation inside a step: our hooks (augmentation, TRADES step, metric sums, EMA)
    never read a tensor's value on the host (.item(), .tolist(), bool(), float(), int()) nor copy Python numbers
    to the device (torch.tensor(..., device=)). On a CPU these are harmless, but on a GPU each would stall the
    queue; here every such call made inside a step is recorded."""
    import traceback

    from robustdiff.training.adversarial import AdversarialTraining
    from robustdiff.training.ema import EMA

    inside, calls = [False], []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def recording(self, *args, _original=original, _name=name, **kwargs):
            if inside[0]:
                calls.append((_name, "".join(traceback.format_stack(limit=4)[:-1])))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recording)
    # A tensor made from Python numbers directly on the device is a blocking host-to-device copy: on a GPU the
    # host waits for the queue to drain (torch.full/zeros fill on the device instead).
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def recording_new(*args, _original=original, _name=name, **kwargs):
            if inside[0] and kwargs.get("device") is not None:
                calls.append((f"torch.{_name}(..., device=...)", "".join(traceback.format_stack(limit=4)[:-1])))
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, recording_new)

    def step_part(method):
        def wrapped(*args, **kwargs):
            inside[0] = True
            try:
                return method(*args, **kwargs)
            finally:
                inside[0] = False
        return wrapped

    steps = []
    real_step = AdversarialTraining.training_step
    monkeypatch.setattr(AdversarialTraining, "training_step",
                        step_part(lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k)))
    monkeypatch.setattr(AdversarialTraining, "on_after_batch_transfer",
                        step_part(AdversarialTraining.on_after_batch_transfer))
    monkeypatch.setattr(EMA, "update", step_part(EMA.update))
    summary = train(compose_train(*tiny_overrides, "epochs=1", f"norm={norm}"), tmp_path / "run")
    assert summary["finished"] and len(steps) >= 5
    assert calls == [], "host reads inside a training step:\n" + "\n".join(f"{n}:\n{s}" for n, s in calls[:3])


def test_run_name_in_a_sweep_puts_swept_keys_first_and_drops_constant_keys_first():
    from robustdiff.utils.naming import run_name, sweep_name

    od = "a_long_constant:" + "x" * 60 + "__batch_size:64__model:wrn-28-10__norm:linf__ratio:0.5"
    assert run_name(None, od, swept=["ratio"]).startswith("ratio:0.5__a_long_constant:")
    cut = run_name(None, od + "__zz:" + "y" * 80, swept=["ratio", "norm"])
    assert len(cut) <= 120 and cut.startswith("norm:linf__ratio:0.5__") and "zz:" not in cut
    assert cut != run_name(None, od + "__zz:" + "y" * 81, swept=["ratio", "norm"])  # the hash keeps names apart
    assert run_name(None, od, swept=[]).startswith(od[:100] + "-")  # single runs: a plain cut at 100 characters + hash
    assert sweep_name("batch_size:64__ratio:0.5,0.7", ["ratio"]) == "ratio:0.5,0.7__batch_size:64"


def test_per_epoch_evaluation_runs_in_fp32_under_bf16_training(tmp_path, tiny_overrides, monkeypatch):
    """precision=bf16-mixed trains under autocast, but the per-epoch clean and PGD accuracy that choose the best
    epoch are fp32, as robustdiff-eval's are: the EMA network's logits are float32 in every validation batch and
    the recorded test clean accuracy is that of model.pt evaluated afterwards in fp32."""
    from robustdiff.training.adversarial import AdversarialTraining

    dtypes = []
    original = AdversarialTraining.validation_step

    def recording(self, batch, batch_idx, dataloader_idx=0):
        hook = self.ema.module.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        try:
            return original(self, batch, batch_idx, dataloader_idx)
        finally:
            hook.remove()

    monkeypatch.setattr(AdversarialTraining, "validation_step", recording)
    run = tmp_path / "bf16"
    summary = train(compose_train(*tiny_overrides, "epochs=1", "precision=bf16-mixed"), run)
    assert summary["finished"] and dtypes and set(dtypes) == {torch.float32}

    from robustdiff.data.augment import to_float_nchw
    from robustdiff.data.datasets import load_split
    from robustdiff.evaluation.robustness import evaluate_clean
    from robustdiff.models.loading import load_model

    record = json.loads((run / "run.json").read_text())
    images, labels = load_split("fashionmnist", "test", record["data_dir"])
    x, y = to_float_nchw(torch.from_numpy(images[:128])), torch.from_numpy(labels[:128])
    model = load_model(run / "model.pt", dataset="fashionmnist", record=record["model"])
    history = json.loads((run / "history.json").read_text())
    assert history[-1]["test_clean_acc"] == pytest.approx(evaluate_clean(model, x, y)["acc"], abs=1e-6)
