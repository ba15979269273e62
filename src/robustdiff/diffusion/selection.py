"""Confidence selection of generated images (the paper's filtered 1M CIFAR sets).

Each candidate is scored by a classifier's softmax probability of its generating class (`confidence`, written
per shard by the generation job); `select_confident` then keeps per class the n/K most confident candidates
(ties: lower index first) and writes them, in candidate order, to a new store whose provenance records the
filter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.store import MANIFEST, GeneratedStore, StoreWriter
from ..utils.io import file_sha256
from .shards import scores_path


def confidence(classifier, images: np.ndarray, labels: np.ndarray, batch_size: int, device) -> np.ndarray:
    """Softmax probability of each image's generating class: float32 (n,)."""
    import torch

    out = np.empty(len(labels), dtype=np.float32)
    with torch.no_grad():
        for a in range(0, len(labels), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[a:a + batch_size])).to(device)
            x = x.permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(np.asarray(labels[a:a + batch_size])).to(device)
            p = classifier(x).float().softmax(dim=1)
            out[a:a + len(y)] = p.gather(1, y[:, None])[:, 0].cpu().numpy()
    return out


def select_confident(candidates: Path, out: Path, cfg: dict, n: int, num_classes: int) -> dict:
    """Keep per class the n/K candidates the classifier is most confident about; write them to ``out``
    in candidate order (resumable: StoreWriter continues a partial store). Returns its manifest."""
    store = GeneratedStore(candidates)
    labels = store.labels()
    scores = np.concatenate([np.fromfile(scores_path(candidates, b), dtype=np.float32)
                             for b in range(len(store.manifest["shards"]))])
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        order = np.lexsort((idx, -scores[idx]))  # most confident first, then lower index
        keep.append(idx[order[: n // num_classes]])
    selected = np.sort(np.concatenate(keep))
    cprov = store.provenance
    prov = {**cprov, "n": n, "filter": {
        "candidates": str(candidates.resolve()), "candidates_n": len(store), "keep_fraction": cfg["keep_fraction"],
        "classifier": str(Path(cfg["classifier"]).resolve()),
        "classifier_sha256": file_sha256(Path(cfg["classifier"]) / "model.pt" if Path(cfg["classifier"]).is_dir()
                                         else cfg["classifier"]),
        "score": "softmax probability of the generating class; top n/K per class, ties to the lower index",
        "selected_min_score": float(scores[selected].min()),
    }}
    mpath = out / MANIFEST
    if mpath.is_file():
        old = json.loads(mpath.read_text())
        if old.get("complete") and old.get("provenance") == json.loads(json.dumps(prov)):
            return old
    writer = StoreWriter(out, store.image_shape, num_classes, shard_size=cfg["shard_size"], provenance=prov)
    try:
        start = writer.count
        for a in range(start, len(selected), cfg["shard_size"]):
            images, y = store.get(selected[a:a + cfg["shard_size"]])
            writer.append(images, y)
        return writer.finalize()
    except BaseException:
        writer.close()
        raise
