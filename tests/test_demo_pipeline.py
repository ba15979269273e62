"""robustdiff-demo end to end at toy sizes: EDM -> store -> TRADES with and without it -> AutoAttack -> report;
a second run of the same command redoes nothing."""

import json

import pytest

from robustdiff.cli.demo import build_parser, run_demo

TINY_DEMO = ["--edm-kimg", "0.192", "--edm-limit-train", "512", "--n-generated", "40", "--sampler-steps", "2",
             "--model", "wrn-10-1", "--epochs", "1", "--batch-size", "32", "--limit-train", "320", "--val-size", "64",
             "--limit-test", "64", "--ratio", "0.5", "--n-examples", "8", "--aa-attacks", "apgd-ce",
             "--train-override", "norm.steps=2", "--train-override", "eval.steps=3",
             "--train-override", "logger=none", "--classifier-limit-train", "640", "--classifier-epochs", "1",
             "--fd-reference", "200"]


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    args = build_parser().parse_args(["--out", str(out), *TINY_DEMO])
    result = run_demo(args)

    assert (out / "generator" / "edm" / "network.pt").is_file()
    manifest = json.loads((out / "generator" / "store" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 40
    real, gen = out / "runs" / "real", out / "runs" / "generated"
    assert json.loads((real / "run.json").read_text())["n_generated"] == 0
    assert json.loads((gen / "run.json").read_text())["n_generated"] == 40
    for run in (real, gen):
        assert json.loads((run / "summary.json").read_text())["finished"]
        ev = json.loads((run / "eval.json").read_text())
        assert ev["n_examples"] == 8 and 0 <= ev["autoattack"]["robust_acc"] <= ev["clean"]["acc"] <= 1
    report = (out / "report.md").read_text()
    assert result["report"] == out / "report.md" and "real" in report and "generated" in report
    # Each run's curves and the overlay of the two (the report's sweep figure).
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == ["_sweep.png", "generated.png", "real.png"]
    assert {r["run"] for r in result["rows"]} == {"real", "generated"}
    # The report says how good the generator's data is, beside the runs and in its own section.
    q = json.loads((out / "quality" / "quality.json").read_text())
    assert q["generated"]["n"] == 40 and q["floor"]["n"] == 40 and q["floor"]["source"] == "fashionmnist:train[50000:50040]"
    assert json.loads((gen / "run.json").read_text())["generated_quality"][0]["value"] == q["generated"]["value"]
    assert "## Generator quality" in report and f"{q['generated']['value']:.4f}" in report
    assert "farther from real test images than held-out real images" in report
    assert next(r for r in result["rows"] if r["run"] == "generated")["gen_fd"].endswith("(clf)")

    stamps = {p: p.stat().st_mtime_ns for p in [out / "generator" / "edm" / "network.pt", real / "model.pt",
                                                 out / "quality" / "quality.json",
                                                 gen / "model.pt", real / "eval.json", gen / "eval.json",
                                                 *sorted((out / "generator" / "store").glob("*.npy"))]}
    again = run_demo(args)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sum(again["seconds"].values()) < sum(result["seconds"].values())


@pytest.mark.parametrize("gen_aa", [40.0, 60.0])
def test_demo_verdict_says_its_short_run_cannot_show_the_effect_whichever_way_it_comes_out(gen_aa):
    from robustdiff.pipeline.demo import quality_section

    score = {"value": 2.0, "label_agreement": 0.5, "n": 40, "classifier": "clf", "classifier_model": "wrn-10-2",
             "classifier_test_clean_acc": 0.8, "reference_source": "test", "source": "train[50000:50040]"}
    quality = {"generated": score, "floor": {**score, "value": 0.05, "label_agreement": 0.8}, "edm_kimg": 1,
               "sampler_steps": 8}
    rows = [{"run": "real", "autoattack": 50.0}, {"run": "generated", "autoattack": gen_aa}]
    text = quality_section(quality, rows)["text"]
    assert ("higher" if gen_aa > 50 else "lower") in text
    assert "cannot show the paper's effect" in text and "experiments/README.md" in text


def test_the_demo_counts_attacked_images_with_robustdiff_evals_flag():
    """One name for "the first N test images" across the flag commands: --n-examples (the older --aa-n stays)."""
    from robustdiff.cli.demo import build_parser

    assert build_parser().parse_args(["--n-examples", "40"]).aa_n == 40
    assert build_parser().parse_args(["--aa-n", "40"]).aa_n == 40
    assert "--n-examples" in build_parser().format_help()
