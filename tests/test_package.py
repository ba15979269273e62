"""The installable package and its command lines: configs inside the package (a wheel carries them), Hydra's own
flags untouched (--cfg, --info, -sc install=bash, completion of experiment=), each CLI's --help listing its own
groups without importing torch, Lightning or wandb, a rejected config leaving no run directory, and a wheel
that works in a fresh virtual environment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONF_DIR, ROOT, TINY, compose_train

HEAVY = {"torch", "pytorch_lightning", "lightning", "lightning_fabric", "wandb"}
BIN = Path(sys.executable).parent
# Runs one CLI's main() with argv and reports which heavy packages it imported (sys.modules, not timing).
RUNNER = """
import importlib, json, sys
heavy, module, argv = set(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3:]
sys.argv = ["robustdiff", *argv]
code = 0
try:
    importlib.import_module(module).main()
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
print("HEAVY=" + json.dumps(sorted({m.split('.')[0] for m in sys.modules} & heavy)), file=sys.stderr)
sys.exit(code)
"""
CLIS = {"train": "train", "edm": "train_edm", "generate": "generate", "eval": "evaluate", "store": "store",
        "fid": "fid", "report": "report", "study": "study", "demo": "demo"}


def run_cli(module: str, *argv: str, env: dict | None = None, rc: int = 0,
            cwd: Path | None = None) -> tuple[str, list[str]]:
    """(stdout, heavy packages imported) of ``robustdiff.cli.<module>`` run with ``argv``; for ``rc`` != 0,
    (stderr, heavy) of a run that must exit with that status."""
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(sorted(HEAVY)), f"robustdiff.cli.{module}", *argv],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=cwd)
    assert proc.returncode == rc, proc.stdout[-2000:] + proc.stderr[-3000:]
    heavy = [ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY=")]
    return (proc.stdout if rc == 0 else proc.stderr), json.loads(heavy[-1][len("HEAVY="):])


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_help_imports_no_torch_lightning_or_wandb(cli):
    out, heavy = run_cli(CLIS[cli], "--help")
    assert heavy == [] and out.strip()


@pytest.mark.parametrize("override, says", [("norm.eps=8", "norm.eps"), ("epochs=0", "epochs=0"),
                                             ("+epoch=3", "did you mean epochs")])
def test_a_bad_train_value_is_refused_before_torch_is_imported(tmp_path, override, says):
    """Range, choice and key checks need no torch: a typo is answered in a second, not after a 20-second import."""
    err, heavy = run_cli("train", override, f"run_root={tmp_path}", "name=bad", rc=2)
    assert says in err and "robustdiff-train: error:" in err
    assert heavy == []
    assert not (tmp_path / "bad").exists()  # and no run directory is left behind


@pytest.mark.parametrize("command, override, says", [
    ("train_edm", "+epoch=3", "robustdiff-edm: error: epoch: not a robustdiff-edm setting"),
    ("train_edm", "+edm.duration=1", "edm.duration: not a robustdiff-edm setting (added with +edm.duration=...); "
                                     "did you mean edm.duration_kimg=...?"),
    ("generate", "+n_imgs=4", "robustdiff-generate: error: n_imgs: not a robustdiff-generate setting"),
])
def test_an_unknown_edm_or_generate_key_is_refused_before_torch_is_imported(tmp_path, command, override, says):
    """robustdiff-edm and robustdiff-generate know their keys as robustdiff-train does: a typo'd key is an error
    in a second, not an EDM run (or a generation) that silently ignores it."""
    place = f"run_root={tmp_path}" if command == "train_edm" else f"out={tmp_path / 'store'}"
    err, heavy = run_cli(command, override, place, rc=2)
    assert says in err and len([ln for ln in err.strip().splitlines() if not ln.startswith("HEAVY=")]) == 1
    assert heavy == []
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_help_lists_each_clis_own_groups_including_experiment():
    def groups(text: str) -> set[str]:
        block = text.split("== Configuration groups ==")[1].split("== Config ==")[0]
        return {ln.split(":")[0] for ln in block.splitlines()[2:] if ":" in ln}

    train, _ = run_cli("train", "--help")
    assert groups(train) == {"dataset", "norm", "model", "data", "trainer", "logger", "experiment", "callbacks", "debug"}
    assert "cifar10_linf_wrn28_10_1m" in train and train.startswith("robustdiff-train")
    edm, _ = run_cli("train_edm", "--help")
    assert groups(edm) == {"dataset", "edm", "trainer", "logger"}
    generate, _ = run_cli("generate", "--help")
    assert groups(generate) == {"trainer", "dataset", "logger"}
    # recipes are advertised only by the command that takes them
    assert "experiment=NAME" in train and "experiment/NAME.yaml" in train
    assert "experiment" not in edm and "experiment" not in generate


def test_hydra_flags_work_without_command_line_rewriting(tmp_path):
    job, heavy = run_cli("train", "epochs=3", "--cfg", "job")
    assert "epochs: 3" in job and "hydra:" not in job and heavy == []
    info, _ = run_cli("train", "--info")
    assert "pkg://robustdiff.conf" in info
    install, _ = run_cli("train", "-sc", "install=bash")
    assert "hydra_bash_completion" in install
    completion, heavy = run_cli("train", "-sc", "query=bash", env={"COMP_LINE": "robustdiff-train experiment=cifar10_l"})
    assert "experiment=cifar10_linf_wrn28_10_1m" in completion.split() and heavy == []
    # A user's own recipe directory joins through Hydra's own search path.
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nepochs: 7\n")
    mine, _ = run_cli("train", f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine", "--cfg", "job")
    assert "epochs: 7" in mine


def test_configs_have_one_home(tmp_path):
    """Package data only. The top-level conf/ of the project's layout is a link to it (one copy); a yaml file left in
    a real top-level conf/ or experiments/experiment/ (e.g. by a merge) would silently not be used."""
    assert (CONF_DIR / "train.yaml").is_file() and (CONF_DIR / "experiment" / "fashionmnist_demo.yaml").is_file()
    top = ROOT / "conf"
    assert top.is_symlink() and top.resolve() == CONF_DIR.resolve(), f"{top} must be a link to {CONF_DIR}"
    stray = sorted(p.relative_to(ROOT) for p in (ROOT / "experiments" / "experiment").rglob("*.yaml"))
    assert stray == [], f"move these into src/robustdiff/conf/experiment/ (git mv): {stray}"


def test_a_rejected_config_leaves_no_run_directory_but_keeps_an_existing_run(tmp_path):
    cli = BIN / "robustdiff-train"
    proc = subprocess.run([str(cli), "norm.eps=8", f"run_root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "8/255" in proc.stderr, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
    run = tmp_path / "mine"
    run.mkdir()
    (run / "run.json").write_text("{}")
    proc = subprocess.run([str(cli), "name=mine", "norm.eps=8", f"run_root={tmp_path}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and (run / "run.json").read_text() == "{}"
    # The refused command's Hydra config copies are not left in the existing run (its record stays as it ran).
    assert sorted(p.name for p in run.iterdir() if not p.name.endswith(".log")) == ["run.json"]


def test_a_missing_extra_is_named(monkeypatch):
    import robustdiff.utils.extras as extras
    from robustdiff.training.config import ConfigError
    from robustdiff.training.trainer import build_logger

    monkeypatch.setattr(extras, "installed", lambda module: False)
    with pytest.raises(ConfigError, match=r"logger=wandb needs .*pip install 'robustdiff\[wandb\]'"):
        build_logger(compose_train("logger=wandb"), Path("/nonexistent"), "x")


def test_importing_the_training_modules_leaves_the_warning_filters_as_they_were():
    """torch and Lightning set filters of their own when imported; robustdiff's modules add none (its jobs silence
    Lightning's warnings about its deliberate choices only while they run)."""
    code = ("import warnings, numpy, torch, pytorch_lightning, omegaconf, hydra.utils; before = list(warnings.filters)"
            "; import robustdiff.training.run, robustdiff.training.edm_run; print(warnings.filters == before)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    """`pip install` of the built wheel (not editable) into a new venv: every console script's --help, --cfg job,
    --info and a tiny training run, with robustdiff imported from the venv, not from this checkout."""
    import shutil

    src = tmp_path / "tree"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    # Without PYTHONPATH: pip must see neither this checkout nor anything else as an installed robustdiff.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WANDB_API_KEY")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300, env=env)
    wheel = next((tmp_path / "dist").glob("robustdiff-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/LICENSE") or n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300, env=env)
    # Reuse this environment's torch & co. (the venv's own site-packages come first, so the wheel's robustdiff
    # wins; the editable install's .pth is not processed from a path added this way).
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    outer = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "_reuse_outer.pth").write_text("\n".join(outer) + "\n")
    cwd = tmp_path / "work"
    cwd.mkdir()

    def run(*cmd: str) -> str:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-1500:]}{proc.stderr[-3000:]}"
        return proc.stdout

    where = run(py, "-c", "import robustdiff; print(robustdiff.__file__)")
    assert where.startswith(str(venv)), where
    for cli in CLIS:
        assert run(venv / "bin" / f"robustdiff-{cli}", "--help").strip()
    assert "epochs: 2" in run(venv / "bin" / "robustdiff-train", "epochs=2", "experiment=fashionmnist_demo", "--cfg", "job")
    assert "pkg://robustdiff.conf" in run(venv / "bin" / "robustdiff-train", "--info")
    assert "shard_size: 10000" in run(venv / "bin" / "robustdiff-generate", "--cfg", "job")
    run(venv / "bin" / "robustdiff-train", *TINY, "epochs=1", "run_root=runs")
    # the shipped studies are found by name (the checkout's experiments/ is not there)
    run(venv / "bin" / "robustdiff-study", "fmnist_v2_quick", "--out", "study", "--report-only")
    (run_dir,) = [p for p in (cwd / "runs").iterdir() if (p / "summary.json").is_file()]
    assert json.loads((run_dir / "summary.json").read_text())["finished"]


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_command_prints_its_version(cli):
    from robustdiff import __version__

    out, heavy = run_cli(CLIS[cli], "--version")
    assert out.strip() == f"robustdiff-{cli} (robustdiff {__version__})" and heavy == []


def test_options_are_never_abbreviated_and_eval_help_shows_export():
    proc = subprocess.run([BIN / "robustdiff-fid", "ref", "--n", "10", "--dataset", "fashionmnist", "--out", "x.npz"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --n 10" in proc.stderr  # not read as --no-progress
    proc = subprocess.run([BIN / "robustdiff-store", "import", "a.npz", "--o", "s"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--o" in proc.stderr
    out, _ = run_cli("evaluate", "--help")
    assert "robustdiff-eval export" in out
