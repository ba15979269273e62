"""Real multi-process DDP on CPU (gloo): the same global batch as one process, one run directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_train
from robustdiff.training.run import train

CLI = Path(sys.executable).parent / "robustdiff-train"


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for k, v in state.items() if k.startswith("model.") and v.is_floating_point()
                      and "running" not in k])


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    """Same global batches, augmentation and attack noise as one process; only BatchNorm statistics are
    per rank (as in the reference's DataParallel; SyncBatchNorm needs GPUs). So the DDP weights must be far
    closer to the one-process run than a one-process run with another seed is."""
    common = [*TINY, "epochs=1"]
    single = tmp_path / "single"
    train(compose_train(*common), single)
    other_seed = tmp_path / "seed1"
    train(compose_train(*common, "seed=1"), other_seed)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(CLI), *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         f"run_root={tmp_path / 'ddp'}", "name=ddp"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dirs = [p for p in (tmp_path / "ddp").iterdir() if p.is_dir()]
    assert [d.name for d in dirs] == ["ddp"]  # the re-launched rank made no directory of its own
    ddp = dirs[0]
    assert json.loads((ddp / "summary.json").read_text())["finished"]

    def weights(run):
        return flat(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])

    # The initial weights train() starts from (seed_everything(seed), then the model is built).
    import pytorch_lightning as pl

    from robustdiff.models.wrn import WideResNet

    pl.seed_everything(0, verbose=False)
    init = WideResNet(depth=10, width=1, num_classes=10, in_channels=1, mean=(0.2860,), std=(0.3530,))
    w0 = flat({f"model.{k}": v for k, v in init.state_dict().items()})
    w_single, w_ddp, w_seed1 = weights(single), weights(ddp), weights(other_seed)
    step_single, step_ddp = w_single - w0, w_ddp - w0
    rel = float((step_ddp - step_single).norm() / step_single.norm())
    cos_seed = float(torch.nn.functional.cosine_similarity(step_single, w_seed1 - w0, dim=0))
    cos_ddp = float(torch.nn.functional.cosine_similarity(step_single, step_ddp, dim=0))
    print(f"DDP vs 1 process: relative update difference {rel:.3f}, cosine {cos_ddp:.3f} (other seed {cos_seed:.3f})")
    assert rel < 0.35 and cos_ddp > 0.9 and cos_seed < 0.5
    ha = json.loads((single / "history.json").read_text())[0]
    hb = json.loads((ddp / "history.json").read_text())[0]
    assert abs(ha["train_loss"] - hb["train_loss"]) < 0.05 * abs(ha["train_loss"])
    assert ha["lr"] == hb["lr"]
