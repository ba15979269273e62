"""Reports: EDM runs in their own section, the sweep overlay figure, wrapped titles, labelled image grids.

Run directories are written here in robustdiff's layout (run.json, history.json, summary.json; EDM: samples/ and
csv/version_<k>/metrics.csv), so the tests take seconds; tests/test_evaluation.py reports on real trained runs.
"""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from robustdiff.evaluation.plots import curve_styles, plot_training_curves, wrap
from robustdiff.evaluation.report import write_report
from robustdiff.evaluation.runs import edm_losses, load_run, swept_settings
from robustdiff.utils.images import image_grid, labelled_grid
from robustdiff.utils.io import atomic_write_json


def trades_run(path, ratio, val, seed=0):
    identity = {"dataset.name": "fashionmnist", "ratio": ratio, "seed": seed, "epochs": len(val), "norm.eps": "8/255"}
    atomic_write_json(path / "run.json", {
        "name": path.name, "dataset": "fashionmnist", "model": {"name": "wrn-10-1", "depth": 10, "width": 1},
        "norm": {"name": "linf", "eps": 8 / 255, "step": 2 / 255, "steps": 2}, "ratio": ratio, "epochs": len(val),
        "n_generated": 1000, "generated": "/data/stores/fmnist-edm-1k", "eval": {"steps": 3}, "identity": identity})
    history = [{"epoch": e + 1, "val_pgd_acc": v, "test_clean_acc": v + 0.3,
                "test_pgd_acc": v - 0.01 if (e + 1) % 2 == 0 else None} for e, v in enumerate(val)]
    atomic_write_json(path / "history.json", history)
    best = max(history, key=lambda r: (r["val_pgd_acc"], r["epoch"]))
    atomic_write_json(path / "summary.json", {
        "best_epoch": best["epoch"], "best_val_pgd_acc": best["val_pgd_acc"], "last_epoch": len(val),
        "test_clean_acc_best": best["test_clean_acc"], "test_clean_acc_last": history[-1]["test_clean_acc"],
        "test_pgd_acc_best": best["test_pgd_acc"], "test_pgd_acc_last": history[-1]["test_pgd_acc"],
        "finished": True})


def edm_run(path, losses_by_version):
    atomic_write_json(path / "run.json", {
        "name": path.name, "dataset": "fashionmnist", "resolution": 28, "label_dim": 10, "network": "small",
        "kwargs": {"img_resolution": 28}, "batch_size": 16, "duration_kimg": 0.48, "identity": {"seed": 0}})
    atomic_write_json(path / "summary.json", {"finished": True, "kimg": 0.48, "steps": 30})
    (path / "samples").mkdir()
    for name in ("grid-000000.24.png", "grid-000000.48.png"):
        Image.new("L", (8, 8)).save(path / "samples" / name)
    step = 0
    for version, losses in enumerate(losses_by_version):
        (path / "csv" / f"version_{version}").mkdir(parents=True)
        with open(path / "csv" / f"version_{version}" / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "kimg", "step", "train/loss", "train/lr"])
            for loss in losses:
                step += 1
                w.writerow([0, step * 16 / 1000, step, loss, 0.002])


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "runs"
    for ratio, val in ((0.5, [0.10, 0.20, 0.25, 0.22]), (0.8, [0.12, 0.18, 0.18, 0.24])):
        (root / f"ratio:{ratio}").mkdir(parents=True)
        trades_run(root / f"ratio:{ratio}", ratio, val)
    (root / "edm-small").mkdir()
    edm_run(root / "edm-small", [[900.0, 600.0, 400.0], [300.0, 250.0]])
    return root


def test_edm_runs_get_their_own_section_not_trades_rows(sweep, tmp_path):
    out = tmp_path / "report"
    rows = write_report(sweep, out)
    assert [r["run"] for r in rows] == ["ratio:0.5", "ratio:0.8"]  # no row of "—" for the EDM run
    with open(out / "report.csv") as f:
        assert [r["path"] for r in csv.DictReader(f)] == ["ratio:0.5", "ratio:0.8"]
    md = (out / "report.md").read_text()
    edm = md[md.index("## EDM runs"):]
    assert "| edm-small | fashionmnist | 28 | small | True | 16 | 0.48 | 0.48 | 250.00 | True |" in edm
    # The latest grid (zero-padded kimg names sort), linked relative to the report; the loss figure.
    assert "![edm-small samples](../runs/edm-small/samples/grid-000000.48.png)" in edm
    assert "![EDM training loss](figures/_edm-loss.png)" in edm
    assert Image.open(out / "figures" / "_edm-loss.png").size[0] > 600
    assert "## Training curves" in md and "edm-small" not in md[:md.index("## EDM runs")]


def test_a_standard_classifier_is_reported_as_what_it_is(sweep, tmp_path):
    """loss=ce runs (measuring classifiers) are not counted as adversarial runs, their epoch was picked by clean
    accuracy, and their figure draws no "adversarial (train)" curve."""
    clf = sweep / "classifier"
    clf.mkdir()
    trades_run(clf, 1.0, [0.5, 0.6, 0.7])
    config = json.loads((clf / "run.json").read_text())
    atomic_write_json(clf / "run.json", {**config, "loss": "ce", "eval": {"steps": 1, "select": "clean"}})
    history = json.loads((clf / "history.json").read_text())
    atomic_write_json(clf / "history.json", [{**r, "val_clean_acc": r["val_pgd_acc"] + 0.2, "train_acc_adv": 0.9}
                                             for r in history])
    rows = write_report(sweep, tmp_path / "report")
    kinds = {r["run"]: r["training"] for r in rows}
    assert kinds == {"classifier": "standard, by clean", "ratio:0.5": "TRADES", "ratio:0.8": "TRADES"}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "2 adversarial training run(s) and 1 standard training run(s)" in md and "TRADES run(s)" not in md
    standard, trades = load_run(clf), load_run(sweep / "ratio:0.5")
    assert [s[0] for s in curve_styles(standard)] == ["test_clean_acc", "val_pgd_acc", "test_pgd_acc", "val_clean_acc"]
    assert "train_acc_adv" in [s[0] for s in curve_styles(trades)]


def test_edm_losses_follow_kimg_across_resumed_versions(sweep):
    kimg, loss = edm_losses(sweep / "edm-small")
    assert kimg == pytest.approx([0.016, 0.032, 0.048, 0.064, 0.080]) and loss == [900, 600, 400, 300, 250]


def test_sweep_figure_has_one_line_per_run_labelled_by_the_swept_setting(sweep, tmp_path):
    runs = [load_run(sweep / "ratio:0.5"), load_run(sweep / "ratio:0.8")]
    assert swept_settings(runs) == {str(sweep / "ratio:0.5"): {"ratio": 0.5}, str(sweep / "ratio:0.8"): {"ratio": 0.8}}
    out = tmp_path / "report"
    write_report(sweep, out)
    md = (out / "report.md").read_text()
    assert "## Sweep" in md and "![sweep](figures/_sweep.png)" in md
    assert Image.open(out / "figures" / "_sweep.png").size == (1320, 552)


def test_seeds_of_one_setting_get_mean_and_spread(tmp_path):
    root = tmp_path / "runs"
    # ratio 0.5 at three seeds (last epoch's test PGD 0.21, 0.23, 0.28), ratio 0.8 at one.
    for name, ratio, seed, last in (("a", 0.5, 0, 0.22), ("b", 0.5, 1, 0.24), ("c", 0.5, 2, 0.29), ("d", 0.8, 0, 0.3)):
        (root / name).mkdir(parents=True)
        trades_run(root / name, ratio, [0.10, 0.20, 0.15, last], seed=seed)
    write_report(root, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Over seeds" in md
    (row,) = [line for line in md.splitlines() if line.startswith("| ratio=0.5 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "3"
    # PGD last (%): mean 24.00, sample sd of 21, 23, 28 = 3.61, range 21 to 28.
    assert cells[4] == "24.00 ± 3.61 (21.00 to 28.00)", cells
    assert "ratio=0.8" not in md.split("## Over seeds")[1].split("##")[0]  # one seed: no spread to give
    # Without repeated seeds there is no such section.
    write_report(root / "d", tmp_path / "one")
    assert "## Over seeds" not in (tmp_path / "one" / "report.md").read_text()


def test_single_run_has_no_sweep_figure(sweep, tmp_path):
    write_report(sweep / "ratio:0.5", tmp_path / "one")
    assert "## Sweep" not in (tmp_path / "one" / "report.md").read_text()
    assert not (tmp_path / "one" / "figures" / "_sweep.png").exists()


def test_long_titles_wrap_instead_of_being_clipped(sweep, tmp_path):
    title = "fmnist-" + "-".join(f"setting{i}:value{i}" for i in range(12)) + ": fashionmnist linf ε=8/255"
    lines = wrap(title, 7.5).split("\n")
    assert len(lines) >= 2 and "".join(lines).replace(" ", "") == title.replace(" ", "")
    assert max(map(len, lines)) <= 7.5 * 72 / (0.55 * 9)
    # Drawn: the title's box lies inside the figure.
    run = load_run(sweep / "ratio:0.5")
    run.config["name"] = title
    png = plot_training_curves(run, tmp_path / "long.png")
    image = np.asarray(Image.open(png).convert("L"))
    assert image[:4].min() == 255 and image[:, :3].min() == 255  # nothing drawn into the top or left border


def test_image_grid_pads_and_upscales_small_images_nearest():
    x = torch.zeros(3, 1, 28, 28)
    x[1, 0, 0, 0] = 1.0  # one white pixel in the top-left corner of the second image
    grid = image_grid(x, nrow=3)
    assert grid.shape == (2 + 112 + 2, 2 + 3 * (112 + 2), 1) and grid.dtype == np.uint8
    left = 2 + 114  # second image
    assert (grid[2:6, left:left + 4] == 255).all() and (grid[6:10, left:left + 4] == 0).all()  # a 4×4 block
    assert (grid[0:2] == 255).all()  # white padding
    assert image_grid(torch.zeros(2, 3, 64, 64), nrow=2).shape == (68, 134, 3)  # 64 px: not upscaled


def test_labelled_grid_puts_one_name_per_row():
    x = torch.zeros(6, 1, 28, 28)
    grid = labelled_grid(x, nrow=2, row_labels=["T-shirt/top", "Trouser", "Ankle boot"])
    assert grid.shape[0] == 2 + 3 * 114 and grid.shape[2] == 3
    margin = grid.shape[1] - (2 + 2 * 114)
    assert margin > 40
    for r in range(3):  # dark text in every row's label area, white elsewhere in the margin
        band = grid[2 + r * 114:2 + r * 114 + 112, :margin - 2]
        assert band.min() < 100
    with pytest.raises(ValueError, match="3 rows of 2 images but 2 row labels"):
        labelled_grid(x, nrow=2, row_labels=["a", "b"])


def test_edm_sample_grid_has_one_labelled_row_per_class():
    from robustdiff.data.classes import class_names
    from robustdiff.diffusion.edm import EDMPrecond
    from robustdiff.training.diffusion import network_kwargs, sample_grid

    torch.manual_seed(0)
    net = EDMPrecond(**network_kwargs("small", 16, 1, 10))
    grid = sample_grid(net, 10, rows=1, seed=0, num_steps=2, class_names=class_names("fashionmnist", 10))
    assert grid.shape[0] == 2 + 10 * (64 + 2) and grid.shape[1] > 2 + 66 + 60 and grid.shape[2] == 3
    assert class_names("cifar100", 100)[7] == "class 7" and class_names("fashionmnist", 10)[9] == "Ankle boot"
    json.dumps(class_names("svhn", 10))


def test_sweep_legends_name_a_store_by_its_last_two_parts():
    """A legend entry is the setting that differs, readable: a store's path by its last two parts, never a
    clipped middle of it."""
    from robustdiff.evaluation.plots import _legend

    label = _legend({"generated": "/data/runs/demo/generator/store", "ratio": 0.5}, "run")
    assert label == "generated=generator/store, ratio=0.5"
    assert _legend({"generated": None, "ratio": 1.0}, "run") == "generated=None, ratio=1"
    assert _legend({}, "fallback") == "fallback"
