"""robustdiff-study end to end at toy size (experiments/study/fmnist_quality_quick.yaml): classifier, reference
statistics, EDM snapshots, stores, their quality, TRADES arms, a Hydra-multirun ratio sweep, AutoAttack and the
report; a rerun redoes nothing and a changed protocol is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from robustdiff.cli.study import main as study_main

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "experiments" / "study" / "fmnist_quality_quick.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
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


V2_QUICK = ROOT / "experiments" / "study" / "fmnist_v2_quick.yaml"


@pytest.mark.slow
def test_a_study_listing_its_arms_selects_with_a_classifier_of_its_own_data_and_resumes(tmp_path, capsys,
                                                                                          monkeypatch):
    out = tmp_path / "v2"
    # two commands with disjoint arm lists, as two cores would run them; the report waits for both
    assert study_main([str(V2_QUICK), "--out", str(out), "--arms", "real-s0"]) == 0
    assert not (out / "report.md").exists() and "the report waits" in capsys.readouterr().out
    assert not (out / "edm").exists()  # real-only arms need no generator
    assert study_main([str(V2_QUICK), "--out", str(out), "--arms", "raw-64img-s0,selected-s0"]) == 0
    assert (out / "report.md").is_file()

    spec = OmegaConf.load(V2_QUICK)
    edm_run = json.loads((out / "edm" / "run.json").read_text())
    assert edm_run["val_size"] == 32  # the generator never saw the arms' validation images
    selector = json.loads((out / "selector" / "run.json").read_text())
    assert (selector["limit_train"], selector["val_size"]) == (160, 32)  # the selector saw only the arms' data
    quality = {s: json.loads((out / "quality" / f"{s}.json").read_text()) for s in spec.stores}
    best = min(("edm-64img", "edm-128img"), key=lambda g: quality[f"raw-{g[4:]}"]["value"])
    assert quality["best-selected"]["generator"] == best and quality["best-selected"]["keep_fraction"] == 0.5
    assert 0 <= quality["best-selected"]["before_selection"]["label_agreement"] <= 1
    manifest = json.loads((out / "stores" / "best-selected" / "manifest.json").read_text())
    assert manifest["count"] == 20 and str(out / "selector") in json.dumps(manifest["provenance"])
    assert str((out / "stores" / "best-40").resolve()) in json.dumps(manifest["provenance"])  # selected from it
    assert not (out / "stores" / "best-selected-candidates").exists()  # nothing generated twice
    for arm, store in (("raw-64img-s0", "raw-64img"), ("selected-s0", "best-selected")):
        run = json.loads((out / "runs" / arm / "run.json").read_text())
        assert Path(run["generated"]) == out / "stores" / store and run["ratio"] == 0.5
        assert json.loads((out / "runs" / arm / "eval.json").read_text())["autoattack"]["n"] == 8
    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results["rows"]] == list(spec.arms) and all(r["finished"] for r in results["rows"])
    report = (out / "report.md").read_text()
    assert "| best-selected |" in report and "standard error" in report and "vs real only" in report
    for png in ("pgd_vs_epoch.png", "aa_vs_fd.png", "aa_vs_amount.png"):
        assert (out / "figures" / png).stat().st_size > 10_000

    stamps = {p: p.stat().st_mtime_ns for p in [*out.glob("runs/*/model.pt"), out / "selector" / "model.pt",
                                                 *out.glob("quality/*.json"), *out.glob("stores/*/manifest.json")]}
    assert study_main([str(V2_QUICK), "--out", str(out)]) == 0  # a rerun redoes nothing
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    capsys.readouterr()
    assert study_main([str(V2_QUICK), "--out", str(out), "--arms", "nope"]) == 2
    assert "nope not in the study's arms" in capsys.readouterr().err

    # The generators, shipped: a new study directory takes them (sha256 checked) and trains no EDM; a store made
    # from the shipped snapshot is byte for byte the one the original study made.
    from robustdiff.study.listed import generate_store
    from robustdiff.study.spec import load_study

    shipped = tmp_path / "shipped"
    assert study_main([str(V2_QUICK), "--out", str(out), "--ship-generator", str(shipped)]) == 0
    prov = json.loads((shipped / "provenance.json").read_text())
    assert prov["study"] == "fmnist_v2_quick" and prov["edm_overrides"] == list(spec.edm.overrides)
    assert prov["command"].startswith("robustdiff-edm ") and "limit_train=160" in prov["command"]
    assert set(prov["snapshots"]) == set(spec.generators)
    assert prov["snapshots"][best]["quality"]["classifier_fd"] == quality[f"raw-{best[4:]}"]["value"]
    fresh = tmp_path / "from-shipped"
    capsys.readouterr()
    seeded = load_study(V2_QUICK, fresh)
    from robustdiff.study.generator import seed_generator
    from robustdiff.study.stages import train_generator

    seed_generator(seeded, fresh, shipped)
    assert train_generator(seeded, fresh, "data") == fresh / "edm"
    assert not (fresh / "edm" / "run.json").exists() and "shipped" in capsys.readouterr().out  # nothing trained
    generate_store(seeded, fresh, "raw-64img", None, None)
    shard = "shard-00000.images.u8"
    assert (fresh / "stores" / "raw-64img" / shard).read_bytes() == (out / "stores" / "raw-64img" / shard).read_bytes()
    # The recorded command retrains the same bytes (experiments/study/retrain_generator.py, `make study-v2-generator`).
    sys.path.insert(0, str(ROOT / "experiments" / "study"))
    import retrain_generator

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert retrain_generator.main([str(shipped), "--out", str(tmp_path / "retrained")]) == 0
    assert capsys.readouterr().out.count("identical") == len(spec.generators)
    # Refusals: a study directory with its own EDM, a damaged snapshot, a generator of another study.
    assert study_main([str(V2_QUICK), "--out", str(out), "--generator", str(shipped), "--arms", "real-s0"]) == 2
    assert "trains its own EDM" in capsys.readouterr().err
    snap = shipped / prov["snapshots"][best]["file"]
    snap.write_bytes(snap.read_bytes()[:-1] + b"x")
    assert study_main([str(V2_QUICK), "--out", str(tmp_path / "other"), "--generator", str(shipped)]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    prov["study"] = "fmnist_v2"
    (shipped / "provenance.json").write_text(json.dumps(prov))
    assert study_main([str(V2_QUICK), "--out", str(tmp_path / "other2"), "--generator", str(shipped)]) == 2
    assert "trained for another study" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (("val_size=32, grid", "grid"), "must leave out the arms' 32 validation images"),
    (("generator: best, n: 20", "generator: worst, n: 20"), "stores.best-selected.generator='worst'"),
    (("store: raw-64img, ratio", "store: raw-65img, ratio"), "arms.raw-64img-s0.store='raw-65img'"),
    (("keep_fraction: 0.5", "keep_fraction: 1.5"), "keep_fraction=1.5 must be in (0, 1]"),
    (("candidates: best-40", "candidates: raw-64img"), "candidates='raw-64img': name a raw store"),
])
def test_a_listed_study_with_a_bad_reference_is_refused_before_any_work(edit, message, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    text = V2_QUICK.read_text()
    assert edit[0] in text
    bad.write_text(text.replace(*edit))
    assert study_main([str(bad), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "classifier").exists()


def test_a_shared_stage_held_by_the_other_study_command_is_waited_for_not_a_crash(tmp_path, capsys):
    """Two commands of one study (disjoint --arms, one --out) both pass the classifier, selector, EDM and store
    stages: the one that finds a stage locked by the other waits and then finds it done."""
    from robustdiff.study.listed import shared_stage
    from robustdiff.utils.lock import DirectoryLock, DirectoryLockedError

    stage = tmp_path / "classifier"
    other = DirectoryLock(stage, what="robustdiff-train").acquire()  # the other command, mid-stage
    waits = []

    def finished_by_the_other(seconds):  # the other command finishes while this one waits
        waits.append(seconds)
        (stage / "summary.json").write_text('{"finished": true}')
        other.release()

    def train_stage():
        with DirectoryLock(stage, what="robustdiff-train"):
            return json.loads((stage / "summary.json").read_text())

    with pytest.raises(DirectoryLockedError):  # without the wait, a plain call is refused
        train_stage()
    assert shared_stage(train_stage, wait=finished_by_the_other) == {"finished": True}
    assert len(waits) == 1
    out = capsys.readouterr().out
    assert f"robustdiff-study: waiting: {stage}: in use by process" in out and "Traceback" not in out


def test_two_study_commands_side_by_side_add_their_seconds_without_losing_any(tmp_path):
    # Two real processes add to one timing.json at once, as two `--arms` commands do after each stage.
    import subprocess

    path = tmp_path / "timing.json"
    code = ("import sys; from pathlib import Path; from robustdiff.study.run import add_seconds\n"
            "for _ in range(150): add_seconds(Path(sys.argv[1]), sys.argv[2], 1.0)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), key]) for key in ("train", "evaluate")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert json.loads(path.read_text()) == {"train": 150.0, "evaluate": 150.0, "wall": 300.0}
