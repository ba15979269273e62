"""A study's generator, shipped: its EDM snapshots and their provenance in a folder, so a later study run takes
them instead of training the EDM again (as the paper takes NVIDIA's released networks).

``ship_generator`` copies, from a study directory whose EDM stage has finished, the snapshot of every generator the
study file names into ``<dest>/snapshots/`` (the EDM run's own layout and file names), its sample grids into
``<dest>/samples/``, and writes ``<dest>/provenance.json``: the study and its ``edm:`` overrides, the command that
trains the same network, which real images it saw, each snapshot's kimg, size and sha256, and the classifier FD and
label agreement of each generator's raw store where the study has measured them.

``seed_generator`` starts a new study directory from such a folder (``robustdiff-study ... --generator DIR``): it
checks that the folder was made by the same study with the same ``edm:`` overrides and that every snapshot's sha256
matches, then copies the snapshots into ``<out>/edm/snapshots/`` and records the source in ``<out>/edm/shipped.json``.
The EDM stage then finds its generators there and trains nothing; every later stage runs as usual.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..utils.io import atomic_path, atomic_write_json, file_sha256
from .spec import StudyError
from .stages import edm_command, snapshot_path

PROVENANCE = "provenance.json"
SHIPPED = "shipped.json"  # in <out>/edm: the EDM stage's snapshots came from a shipped generator


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _canonical_copy(src: Path, dst: Path) -> None:
    """A weights-only network file, saved again as robustdiff saves one today (the same tensors give the same
    bytes), so the shipped sha256 is the one a retraining reproduces."""
    from ..utils.io import atomic_torch_save, load_weights

    atomic_torch_save(load_weights(src, "an EDM snapshot", map_location="cpu"), dst)


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StudyError(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: {what} is not a JSON object")
    return data


def _measured(spec: DictConfig, out: Path, generator: str) -> dict[str, Any] | None:
    """Classifier FD and label agreement of the generator's own raw (unselected) store, if the study measured it."""
    for name, store in spec.get("stores", {}).items():
        path = out / "quality" / f"{name}.json"
        if store.generator != generator or float(store.get("keep_fraction", 1)) != 1 or not path.is_file():
            continue
        q = _read(path, "a store's quality")
        return {"store": name, "n_images": q.get("n_images"), "classifier_fd": q.get("value"),
                "label_agreement": q.get("label_agreement"), "reference": q.get("reference")}
    return None


def ship_generator(spec: DictConfig, out: Path, dest: Path) -> Path:
    """Copy the finished EDM stage of the study in ``out`` (its snapshots for ``spec.generators``) into ``dest``
    with ``provenance.json``; returns the provenance file. ``dest`` may exist only as an earlier copy of the same
    snapshots (then it is refreshed)."""
    import torch

    from .. import __version__

    edm = out / "edm"
    summary = _read(edm / "summary.json", "the EDM stage's summary") if (edm / "summary.json").is_file() else {}
    if not summary.get("finished"):
        raise StudyError(f"{edm}: the study's EDM stage has not finished (summary.json: finished is not true); run the "
                         f"study until its generators are trained, then ship them")
    # The command as a user would type it in a checkout (run_root under runs/, data_dir=data), not this machine's.
    overrides, command = edm_command(spec, Path("runs") / str(spec.name), "data")
    snapshots: dict[str, Any] = {}
    for name, kimg in spec.generators.items():
        path, exact = snapshot_path(edm, float(kimg))
        _canonical_copy(path, dest / "snapshots" / path.name)
        grid = edm / "samples" / path.name.replace("network-", "grid-").replace(".pt", ".png")
        if grid.is_file():
            _copy(grid, dest / "samples" / grid.name)
        snapshots[name] = {"kimg": exact, "file": f"snapshots/{path.name}",
                           "bytes": (dest / "snapshots" / path.name).stat().st_size,
                           "sha256": file_sha256(dest / "snapshots" / path.name), "grid": f"samples/{grid.name}" if grid.is_file() else None,
                           "quality": _measured(spec, out, name)}
    run = _read(edm / "run.json", "the EDM run's run.json") if (edm / "run.json").is_file() else {}
    timing = _read(out / "timing.json", "timing") if (out / "timing.json").is_file() else {}
    prov = {
        "study": spec.name,
        "dataset": spec.dataset,
        "edm_overrides": list(spec.edm.overrides),
        "command": command,
        "real_images": {"dataset": spec.dataset, "split": "train", "limit_train": run.get("limit_train"),
                        "val_size": run.get("val_size"),
                        "note": "the EDM saw the training images after the first val_size, up to limit_train"},
        "kimg": summary.get("kimg"),
        "steps": summary.get("steps"),
        "edm_seconds": timing.get("edm"),
        "snapshots": snapshots,
        "robustdiff": __version__,
        "torch": torch.__version__,
    }
    provenance = dest / PROVENANCE
    atomic_write_json(provenance, prov)
    return provenance


def read_provenance(source: Path, spec: DictConfig) -> dict[str, Any]:
    """The shipped generator's provenance, checked against the study ``spec``: the same study, dataset and ``edm:``
    overrides, a snapshot for every generator the study names, each file's sha256 as recorded."""
    path = source / PROVENANCE
    if not path.is_file():
        raise StudyError(f"--generator {source}: no {PROVENANCE} there; give a folder written by robustdiff-study "
                         f"--ship-generator (e.g. experiments/study/generators/<study>)")
    prov = _read(path, "a shipped generator's provenance")
    for key, want in (("study", spec.name), ("dataset", spec.dataset), ("edm_overrides", list(spec.edm.overrides))):
        if prov.get(key) != want:
            raise StudyError(f"{path}: {key} is {prov.get(key)!r}, this study's is {want!r}: the generator was trained "
                             f"for another study; drop --generator to train this study's own")
    snaps = prov.get("snapshots") if isinstance(prov.get("snapshots"), dict) else {}
    missing = [g for g in spec.generators if g not in snaps]
    if missing:
        raise StudyError(f"{path}: snapshots has no entry for {', '.join(missing)} (the study's generators: "
                         f"{', '.join(spec.generators)})")
    for name in spec.generators:
        entry = snaps[name]
        f = source / str(entry.get("file", ""))
        if not f.is_file():
            raise StudyError(f"{path}: snapshots.{name}.file={entry.get('file')!r} does not exist in {source}")
        if file_sha256(f) != entry.get("sha256"):
            raise StudyError(f"{f}: sha256 differs from {path} (snapshots.{name}.sha256): the file is damaged or was "
                             f"replaced; restore it (git checkout) or drop --generator to train the generator")
    return prov


def seed_generator(spec: DictConfig, out: Path, source: Path) -> Path:
    """Give the study in ``out`` the shipped generator in ``source`` (see the module docstring); returns
    ``<out>/edm``. Refused where ``out`` already has an EDM of its own, or snapshots from another source."""
    prov = read_provenance(source, spec)
    edm = out / "edm"
    record = {"source": str(source.resolve()),
              "snapshots": {g: prov["snapshots"][g] for g in spec.generators}}
    if (edm / SHIPPED).is_file():
        earlier = _read(edm / SHIPPED, "the shipped generator's record")
        if earlier.get("snapshots") != record["snapshots"]:
            raise StudyError(f"{edm / SHIPPED}: this study directory was started from other snapshots "
                             f"({earlier.get('source')}); use a new --out for this generator")
        return edm
    if (edm / "run.json").is_file() or (edm / "checkpoints").is_dir():
        raise StudyError(f"{edm}: this study directory trains its own EDM; a shipped generator (--generator) can "
                         f"only start a new study directory (another --out)")
    for name in spec.generators:
        entry = prov["snapshots"][name]
        _copy(source / entry["file"], edm / entry["file"])
    atomic_write_json(edm / SHIPPED, record)
    print(f"robustdiff-study: generators {', '.join(spec.generators)} from {source} (sha256 checked); no EDM is "
          f"trained", flush=True)
    return edm
