"""logger=wandb with the real wandb library, offline, read back from the files it wrote (no mocks)."""

import json

import pytest
import torch
from PIL import Image

from conftest import TINY, compose_train
from robustdiff.cli import evaluate as cli_eval
from robustdiff.training.logging import read_record, resolve_mode, wandb_logger
from robustdiff.training.run import train
from wandb_records import read_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No API key, no ~/.netrc login, no WANDB_* settings from the caller's shell."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return monkeypatch


def offline_runs(directory):
    return sorted((directory / "wandb").glob("offline-run-*"))


def plain(config: dict) -> dict:
    return {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in config.items()}


def test_trades_run_summary_artifact_images_and_eval_in_the_same_run(tmp_path, offline):
    run = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("logger=")]
    summary = train(compose_train(*tiny, "epochs=1", "eval.test_every=1", "logger=wandb", "logger.group=sweep-a",
                                  "logger.tags=[tiny,test]"), run)
    (train_dir,) = offline_runs(run)
    rec = read_run(train_dir)

    # One W&B run per run directory, recorded for later jobs.
    assert rec["run"]["job_type"] == "train" and rec["run"]["group"] == "sweep-a"
    assert read_record(run)["id"] == rec["run"]["id"]

    # Metrics and config (ε and step as numbers, the fraction kept as text).
    epoch_rows = [r for r in rec["history"] if "epoch/test_clean_acc" in r]
    assert len(epoch_rows) == 1 and 0.0 <= epoch_rows[0]["epoch/val_pgd_acc"] <= 1.0
    assert epoch_rows[0]["epoch/lr"] > 0 and any("train/loss" in r for r in rec["history"])
    # The one epoch is epoch 1 in W&B as on the console, on step rows and on the epoch's row.
    assert {r["epoch"] for r in rec["history"] if "epoch" in r} == {1}
    assert epoch_rows[0]["epoch"] == 1
    cfg = plain(rec["config"])
    assert cfg["model"]["name"] == "wrn-10-1" and cfg["epochs"] == 1
    assert cfg["norm"]["eps"] == pytest.approx(8 / 255) and cfg["norm"]["eps_text"] == "8/255"
    assert cfg["norm"]["step"] == pytest.approx(2 / 255) and cfg["norm"]["step_text"] == "2/255"

    # The summary shows the best epoch (selection rule of summary.json), not just the last values.
    assert rec["metrics"]["epoch/val_pgd_acc"] == {"max": True}
    s = rec["summary"]
    assert s["epoch/val_pgd_acc"] == {"max": max(r["epoch/val_pgd_acc"] for r in epoch_rows)}
    assert s["best/epoch"] == summary["best_epoch"] == 1
    assert s["best/val_pgd_acc"] == summary["best_val_pgd_acc"]
    assert s["best/test_clean_acc"] == summary["test_clean_acc_best"]
    assert s["last/test_pgd_acc"] == summary["test_pgd_acc_last"]

    # Clean vs adversarial examples at the test epoch, in W&B and in the run directory.
    (image_row,) = [r for r in rec["history"] if "examples/adversarial/_type" in r]  # an image's fields, flattened
    assert image_row["examples/adversarial/_type"] == "image-file" and "PGD-3" in image_row["examples/adversarial/caption"]
    png = Image.open(run / "examples" / "adversarial-0001.png")
    assert png.width > 8 * 28 * 4 and png.height > 2 * 28 * 4  # 8 columns, 2 rows, 4× upscaled, row labels

    # The best model as an artifact.
    (artifact,) = rec["artifacts"]
    assert artifact["type"] == "model" and "best" in artifact["aliases"] and "epoch-1" in artifact["aliases"]
    assert artifact["files"] == {"model.pt": (run / "model.pt").stat().st_size}
    assert artifact["metadata"]["best_epoch"] == 1

    # robustdiff-eval adds its results to the same W&B run.
    cli_eval.main([str(run), "--attacks", "clean,pgd", "--pgd-steps", "2", "--n-examples", "32", "--device", "cpu"])
    evaluation = json.loads((run / "eval.json").read_text())
    eval_dirs = [d for d in offline_runs(run) if d != train_dir]
    assert len(eval_dirs) == 1
    rec = read_run(eval_dirs[0])
    assert rec["run"]["id"] == read_record(run)["id"] and rec["run"]["job_type"] == "train"
    assert rec["summary"]["eval/clean_acc"] == evaluation["clean"]["acc"]
    assert rec["summary"]["eval/pgd_acc"] == evaluation["pgd"]["acc"] and rec["summary"]["eval/pgd_steps"] == 2
    assert rec["summary"]["eval/eps"] == pytest.approx(8 / 255) and rec["summary"]["eval/eps_text"] == "8/255"

    # A checkpoint file has no W&B run of its own: --wandb-project starts one of job_type eval.
    out = tmp_path / "ckpt-eval"
    cli_eval.main([str(run / "model.pt"), "--dataset", "fashionmnist", "--attacks", "clean", "--n-examples", "16",
                   "--device", "cpu", "--out", str(out), "--wandb-project", "robustdiff-test"])
    (ckpt_dir,) = offline_runs(out)
    rec = read_run(ckpt_dir)
    assert rec["run"]["job_type"] == "eval" and rec["run"]["id"] != read_record(run)["id"]
    assert rec["summary"]["eval/clean_acc"] == json.loads((out / "eval.json").read_text())["clean"]["acc"]


def test_wandb_mode_and_dir_from_the_environment_win_over_an_api_key(tmp_path, offline):
    # An API key is present (as on a login node), but the job script asks for offline mode and another directory.
    offline.setenv("WANDB_API_KEY", "x" * 40)
    offline.setenv("WANDB_MODE", "offline")
    offline.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    assert resolve_mode("auto") is None  # wandb reads WANDB_MODE itself
    run_dir = tmp_path / "run"
    logger = wandb_logger(compose_train("logger=wandb"), run_dir, "run", "train")
    experiment = logger.experiment
    assert experiment.settings.mode == "offline"
    experiment.finish()
    assert len(offline_runs(tmp_path / "wandb-files")) == 1 and not (run_dir / "wandb").exists()
    # Without WANDB_MODE, a key means online; an explicit logger.mode always wins.
    offline.delenv("WANDB_MODE")
    assert resolve_mode("auto") == "online" and resolve_mode("offline") == "offline"
    offline.delenv("WANDB_API_KEY")
    assert resolve_mode("auto") == "offline" and resolve_mode(None) == "offline"
    with pytest.raises(ValueError, match="logger.mode='sometimes'"):
        resolve_mode("sometimes")


def test_edm_run_job_type_samples_and_network_artifact(tmp_path, offline):
    from robustdiff.training.edm_run import train_edm
    from test_edm_training import config, fmnist_available  # the same tiny EDM settings

    if not fmnist_available():
        pytest.skip("Fashion-MNIST not installed")
    run = tmp_path / "edm"
    cfg = config("edm.duration_kimg=0.064", "edm.snapshot_kimg=1", "logger=wandb")  # 4 steps, one snapshot
    assert train_edm(cfg, run)["finished"]
    import wandb

    assert wandb.run is None  # finished: the next job in this process starts a W&B run of its own
    (rec,) = [read_run(d) for d in offline_runs(run)]
    assert rec["run"]["job_type"] == "edm" and read_record(run)["id"] == rec["run"]["id"]
    assert any("samples/_type" in r for r in rec["history"])
    (artifact,) = rec["artifacts"]
    assert artifact["type"] == "model" and artifact["files"] == {"network.pt": (run / "network.pt").stat().st_size}
    assert torch.load(run / "network.pt", weights_only=True)["kwargs"]["label_dim"] == 10


def test_examples_leave_the_math_alone_and_a_resumed_run_continues_its_wandb_run(tmp_path, offline, stop_after):
    """2 epochs without W&B == 2 epochs with W&B (examples attacked every epoch), stopped mid-epoch 2 and
    resumed; the resumed job logs into the same W&B run."""
    tiny = [o for o in TINY if not o.startswith("logger=")]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(compose_train(*tiny, "epochs=2", "eval.test_every=1", "logger=none"), straight)
    with_wandb = (*tiny, "epochs=2", "eval.test_every=1", "logger=wandb")
    stop_after(12)  # 8 steps/epoch
    assert train(compose_train(*with_wandb), resumed).get("interrupted")
    stop_after(None)
    assert train(compose_train(*with_wandb), resumed)["finished"]

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "history.json").read_text()) == json.loads((resumed / "history.json").read_text())

    first, second = (read_run(d) for d in offline_runs(resumed))
    assert first["run"]["id"] == second["run"]["id"] == read_record(resumed)["id"]
    assert [r["best/epoch"] for r in first["history"] if "best/epoch" in r] == [1]
    assert [r["best/epoch"] for r in second["history"] if "best/epoch" in r] == [second["summary"]["best/epoch"]]
    assert not first["artifacts"] and len(second["artifacts"]) == 1  # the model once the run has finished
    assert sorted(p.name for p in (resumed / "examples").iterdir()) == ["adversarial-0001.png", "adversarial-0002.png"]


# ---------------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from test_generate import tiny_network

    return tiny_network(tmp_path_factory.mktemp("net") / "network.pt")


def test_generate_run_counts_grid_and_a_resumed_generation_in_the_same_run(generator, tmp_path, offline,
                                                                          signal_after_shards):
    """robustdiff-generate logger=wandb: an interrupted generation and its rerun log into one W&B run of
    job_type generate (its id in the store's wandb.json); progress per shard, the per-class counts and a grid of
    the finished store; the store is byte for byte the one generated without W&B."""
    from robustdiff.diffusion.generate import generate
    from test_generate import SHARD, N, config, store_bytes

    store = tmp_path / "fmnist-tiny"
    on = ("logger=wandb", "logger.project=robustdiff-test", "logger.group=gen", "logger.examples=3")
    signal_after_shards(1)
    assert generate(config(generator, store, *on))["stopped"]
    (first_dir,) = offline_runs(store)
    first = read_run(first_dir)
    # Set aside: W&B names offline directories by the second, and the rerun may start within the same one.
    first_dir.rename(tmp_path / "interrupted-run")
    assert generate(config(generator, store, *on))["complete"]
    (second_dir,) = offline_runs(store)
    second = read_run(second_dir)
    generate(config(generator, tmp_path / "plain"))
    assert {k: v for k, v in store_bytes(store).items() if k != "wandb.json"} == store_bytes(tmp_path / "plain")

    record = read_record(store)
    assert first["run"]["id"] == second["run"]["id"] == record["id"]
    assert record["job_type"] == first["run"]["job_type"] == second["run"]["job_type"] == "generate"
    assert second["run"]["name"] == "fmnist-tiny" and second["run"]["group"] == "gen"
    cfg = plain(second["config"])
    assert cfg["steps"] == 3 and cfg["n"] == N and cfg["precision"] == "fp32" and cfg["seed"] == 0
    prov = json.loads((store / "manifest.json").read_text())["provenance"]
    assert cfg["provenance"] == prov and "splitmix64" in cfg["provenance"]["seeds"]

    # Progress per finished shard (16, 16, 8 images): one shard before the interruption, two after.
    def progress(rec):
        return [r["generate/progress"] for r in rec["history"] if "generate/progress" in r]

    assert progress(first) == [SHARD / N] and progress(second) == [2 * SHARD / N, 1.0]
    assert all(r["generate/images_per_s"] > 0 for r in second["history"] if "generate/progress" in r)
    assert "generate/class_counts" not in first["summary"]
    assert second["summary"]["generate/class_counts"] == [4] * 10 and second["summary"]["generate/count"] == N

    # The grid: 3 images of each of the 10 classes, one row per class, 16 px upscaled 4x.
    (row,) = [r for r in second["history"] if "samples/_type" in r]
    assert row["samples/_type"] == "image-file" and "first 3 images of each class" in row["samples/caption"]
    (png,) = (second_dir / "files").rglob("samples_*.png")
    grid = Image.open(png)
    assert grid.height == 2 + 10 * (16 * 4 + 2) and grid.width > 3 * (16 * 4 + 2)


def test_generate_wandb_failures_keep_the_images_and_a_missing_wandb_is_refused_first(generator, tmp_path, offline,
                                                                                    capsys):
    import sys

    import wandb
    from wandb.sdk.wandb_run import Run

    from robustdiff.data.store import verify_store
    from robustdiff.diffusion.generate import GenerationError, generate
    from test_generate import config

    def down(*args, **kwargs):
        raise RuntimeError("W&B is down")

    on = ("logger=wandb", "logger.project=robustdiff-test")
    with offline.context() as patch:
        patch.setattr(Run, "log", down)  # the run starts, then logging fails
        assert generate(config(generator, tmp_path / "a", *on))["complete"]
        assert "W&B logging failed (RuntimeError: W&B is down)" in capsys.readouterr().err
        patch.setattr(wandb, "init", down)  # no run at all
        assert generate(config(generator, tmp_path / "b", *on))["complete"]
        assert "W&B start failed" in capsys.readouterr().err
    assert verify_store(tmp_path / "a") == [] and verify_store(tmp_path / "b") == []

    offline.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(GenerationError,
                       match=r"logger=wandb logger.project=robustdiff-test needs .*pip install 'robustdiff\[wandb\]'"):
        generate(config(generator, tmp_path / "c", *on))
    with pytest.raises(GenerationError, match="logger.mode='sometimes'"):
        generate(config(generator, tmp_path / "c", *on, "logger.mode=sometimes"))
    with pytest.raises(GenerationError, match="logger=csv: robustdiff-generate logs to W&B only"):
        generate(config(generator, tmp_path / "c", "logger=csv"))
    with pytest.raises(GenerationError, match="W&B is set twice"):
        generate(config(generator, tmp_path / "c", *on, "wandb.project=other"))
    assert not (tmp_path / "c").exists()  # refused before any work
    assert generate(config(generator, tmp_path / "c"))["complete"]  # off by default: wandb is not needed


def test_generate_with_a_classifier_filter_records_the_run_in_the_candidates(generator, tmp_path, offline, capsys):
    """Filtering: the W&B record and files go into the candidates store (written from the start; ``out`` must stay
    empty until its StoreWriter creates it), the run is named after ``out`` and logs ``out``'s counts."""
    from robustdiff.diffusion.generate import generate
    from robustdiff.models.wrn import WideResNet
    from test_generate import config

    run = tmp_path / "classifier"
    run.mkdir()
    wrn = WideResNet(10, 1, num_classes=10, in_channels=1, mean=(0.2860,), std=(0.3530,))
    torch.save(wrn.state_dict(), run / "model.pt")
    (run / "run.json").write_text(json.dumps({"dataset": "fashionmnist"}))
    manifest = generate(config(generator, tmp_path / "kept", "n=20", f"classifier={run}", "keep_fraction=0.5",
                               "wandb.project=robustdiff-test"))  # the older spelling: works, with a note
    assert "write logger=wandb logger.project=robustdiff-test" in capsys.readouterr().err
    assert not (tmp_path / "kept" / "wandb.json").exists() and read_record(tmp_path / "kept-candidates")
    (rec,) = [read_run(d) for d in offline_runs(tmp_path / "kept-candidates")]
    assert rec["run"]["name"] == "kept" and rec["run"]["job_type"] == "generate"
    assert rec["summary"]["generate/class_counts"] == manifest["class_counts"] == [2] * 10
    assert plain(rec["config"])["provenance"]["filter"]["candidates_n"] == 40
