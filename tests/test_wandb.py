"""logger=wandb with the real wandb library, offline (no API key), read back from what it wrote."""

from conftest import TINY, compose_train
from robustdiff.training.run import train
from wandb_records import read_run


def test_wandb_offline_run_records_config_and_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("logger=")]
    train(compose_train(*tiny, "epochs=1", "logger=wandb", "logger.group=sweep-a", "logger.tags=[tiny,test]"), run)
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    rec = read_run(offline[0])
    rows = rec["history"]
    epoch_rows = [r for r in rows if "epoch/test_clean_acc" in r]
    assert len(epoch_rows) == 1
    row = epoch_rows[0]
    assert 0.0 <= row["epoch/test_clean_acc"] <= 1.0 and 0.0 <= row["epoch/val_pgd_acc"] <= 1.0
    assert row["epoch/lr"] > 0 and "epoch/train_loss_robust" in row
    assert any("train/loss" in r for r in rows)
    cfg = rec["config"]
    value = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in cfg.items()}
    assert value["model"]["name"] == "wrn-10-1" and value["dataset"]["name"] == "fashionmnist", cfg
    assert value["epochs"] == 1
