"""robustdiff-study end to end at toy size (experiments/study/fmnist_quality_quick.yaml): classifier, reference
statistics, EDM snapshots, stores, their quality, TRADES arms, a Hydra-multirun ratio sweep, AutoAttack and the
report; a rerun redoes nothing and a changed protocol is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from robustdiff.cli.study import main as study_main

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "experiments" / "study" / "fmnist_quality_quick.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_study_runs_every_stage_resumes_and_fixes_its_protocol(tmp_path, capsys):
    out = tmp_path / "study"
    assert study_main([str(QUICK), "--out", str(out)]) == 0

    spec = OmegaConf.load(QUICK)
    quality = {g: json.loads((out / "quality" / f"{g}.json").read_text()) for g in spec.generators}
    floor = json.loads((out / "quality" / "floor.json").read_text())
    for q in [*quality.values(), floor]:
        assert q["metric"] == "classifier_fd" and q["value"] >= 0 and 0 <= q["label_agreement"] <= 1
        assert len(q["classifier_sha256"]) == 64
    for g, q in quality.items():  # the same numbers sit in the store's manifest
        manifest = json.loads((out / "stores" / g / "manifest.json").read_text())
        assert manifest["quality"][0]["value"] == pytest.approx(q["value"])
        label = f"{q['kimg']:010.3f}".rstrip("0").rstrip(".")
        assert manifest["provenance"]["generator"]["file"].endswith(f"network-{label}.pt")
    best = min(quality, key=lambda g: quality[g]["value"])

    runs = sorted(p.parent for p in out.glob("runs/*/run.json")) + sorted(p.parent for p in out.glob("sweep/*/run.json"))
    names = {r.name for r in runs if r.parent.name == "runs"}
    seeds = spec.train.seeds
    assert names == {f"real-s{seeds[0]}", f"real-s{seeds[1]}", *(f"{g}-r0.5-s0" for g in spec.generators),
                     f"{best}-r0.5-s1"}
    sweep = [r for r in runs if r.parent.name == "sweep"]
    assert [json.loads((r / "run.json").read_text())["ratio"] for r in sweep] == [0.25]
    for r in runs:
        run = json.loads((r / "run.json").read_text())
        assert json.loads((r / "summary.json").read_text())["finished"]
        assert json.loads((r / "eval.json").read_text())["autoattack"]["n"] == 8
        if run["generated"]:  # every training run records the quality of the data it used
            g = Path(run["generated"]).name
            assert run["generated_quality"][0]["value"] == pytest.approx(quality[g]["value"])

    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 6 and results["findings"]
    report = (out / "report.md").read_text()
    assert "| generator | EDM kimg | classifier FD |" in report and "PGD best − last" in report
    assert f"best generator ({best}" in report
    for png in ("fd_vs_accuracy.png", "pgd_vs_epoch.png"):
        assert (out / "figures" / png).stat().st_size > 10_000

    stamps = {p: p.stat().st_mtime_ns for p in [*out.glob("runs/*/model.pt"), *out.glob("sweep/*/model.pt"),
                                                 out / "classifier" / "model.pt", out / "edm" / "network.pt",
                                                 *out.glob("quality/*.json"), *out.glob("runs/*/eval.json")]}
    assert study_main([str(QUICK), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    changed = tmp_path / "changed.yaml"
    changed.write_text(QUICK.read_text().replace("ratio: 0.5", "ratio: 0.7"))
    capsys.readouterr()
    assert study_main([str(changed), "--out", str(out)]) == 2
    assert "another protocol" in capsys.readouterr().err
