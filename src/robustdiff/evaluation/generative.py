"""Generator quality of a store (docs/method.md, "The generator (EDM)"): the entry points ``robustdiff-fid``,
``robustdiff-study`` and ``robustdiff-demo`` call.

* ``score_store``: FD of a store's first ``n`` images against reference statistics — FID with Inception
  features, classifier FD with a robustdiff classifier's — plus label agreement when a classifier is given,
  recorded in the store's manifest.
* ``label_agreement``: accuracy of a classifier on generated images against the labels they were generated
  for, overall and per class.
* ``real_floor`` / ``reference_and_floor``: the same measurement on *real* held-out images, what a perfect
  generator of that many images would score, and the reference statistics it is measured against.

The statistics and the distance are in ``robustdiff.evaluation.frechet``, the feature networks in
``robustdiff.evaluation.features``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils.hardware import torch_device
from .features import feature_extractor
from .frechet import QualityError, Statistics, compute_statistics, load_statistics, save_statistics

DEFAULT_N = 50_000  # generated images per FID, as EDM and the paper


def batches_of(images: np.ndarray, labels: np.ndarray | None = None, batch_size: int = 500
               ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(uint8 (b, H, W, C), labels (b,) or None) batches of arrays in memory."""
    for a in range(0, len(images), batch_size):
        yield images[a:a + batch_size], None if labels is None else labels[a:a + batch_size]


def store_batches(store, n: int | None = None, batch_size: int = 500) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The first ``n`` images (all by default) of a GeneratedStore, in store order, with their labels."""
    total = len(store) if n is None else min(int(n), len(store))
    for a in range(0, total, batch_size):
        yield store.get(np.arange(a, min(a + batch_size, total)))


def label_agreement(classifier: nn.Module, batches: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int, *,
                    device: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Accuracy of ``classifier`` on images against their (conditioning) labels: overall and per class."""
    dev = torch_device(device)
    classifier = classifier.to(dev).eval()
    correct = np.zeros(num_classes, np.int64)
    count = np.zeros(num_classes, np.int64)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    with torch.inference_mode():
        for images, labels in batches:
            x = torch.from_numpy(np.ascontiguousarray(images)).to(dev).permute(0, 3, 1, 2).float() / 255.0
            pred = classifier(x).argmax(1).cpu().numpy()
            np.add.at(confusion, (labels, pred), 1)
    count = confusion.sum(1)
    correct = np.diag(confusion)
    per_class = [float(c / k) if k else None for c, k in zip(correct, count)]
    return {"label_agreement": float(correct.sum() / max(count.sum(), 1)), "per_class": per_class,
            "n": int(count.sum()), "confusion": confusion.tolist()}


def check_same_space(ref: Statistics, meta: dict[str, Any], ref_path: str | os.PathLike) -> None:
    """Refuse to compare statistics from two different feature spaces (the distance would be meaningless)."""
    kind = ref.meta.get("features", "inception")
    if kind != meta["features"]:
        raise QualityError(f"reference statistics {ref_path}: meta.features is {kind!r} but these images were "
                           f"measured with {meta['features']!r} features; use a reference made with the same "
                           f"features (robustdiff-fid ref --features {meta['features']} ...)")
    if kind == "classifier" and ref.meta.get("classifier_sha256") != meta.get("classifier_sha256"):
        raise QualityError(f"reference statistics {ref_path}: made with classifier {ref.meta.get('classifier')} "
                           f"(sha256 {str(ref.meta.get('classifier_sha256'))[:12]}…), not {meta.get('classifier')} "
                           f"(sha256 {str(meta.get('classifier_sha256'))[:12]}…); classifier FDs are comparable "
                           f"only in one classifier's feature space — recompute the reference with this classifier")


def score_store(store_path: str | os.PathLike, ref_path: str | os.PathLike, *, features: str = "classifier",
                classifier: str | os.PathLike | None = None, inception_weights: str | os.PathLike | None = None,
                n: int | None = DEFAULT_N, batch_size: int = 500, device: str | torch.device | None = "cpu",
                record: bool = True, progress: bool = False) -> dict[str, Any]:
    """FD (FID for inception features) of a store's first ``n`` images against reference statistics, plus
    label agreement when a classifier is given. With ``record`` the result goes into the store's manifest."""
    from ..data.store import GeneratedStore, record_quality

    store = GeneratedStore(store_path)
    ref = load_statistics(ref_path)  # before any long work
    extractor, meta, clf = feature_extractor(features, inception_weights=inception_weights, classifier=classifier,
                                             dataset=store.provenance.get("dataset"),
                                             num_classes=store.num_classes, channels=store.image_shape[2])
    check_same_space(ref, meta, ref_path)
    used = len(store) if n is None else min(int(n), len(store))
    stats = compute_statistics(extractor, store_batches(store, used, batch_size), device=device, meta=meta,
                               progress=progress, total=used)
    fd = stats.distance(ref)
    result: dict[str, Any] = {
        "metric": "fid" if features == "inception" else "classifier_fd", "value": fd, "n": used,
        "n_requested": n, "reference": str(ref_path), "reference_n": ref.n, "reference_source": ref.meta.get("source"),
        **meta,
    }
    if clf is not None:
        agreement = label_agreement(clf, store_batches(store, used, batch_size), store.num_classes, device=device)
        result.update(label_agreement=agreement["label_agreement"], label_agreement_per_class=agreement["per_class"])
    if record:
        record_quality(store_path, result)
    return result


def real_floor(extractor: nn.Module, classifier: nn.Module, ref: Statistics, images: np.ndarray, labels: np.ndarray,
               num_classes: int, source: str, meta: dict[str, Any], batch_size: int = 500) -> dict[str, Any]:
    """FD and label agreement of *real* held-out images against ``ref``: what a perfect generator would score with
    as many images (FD is biased upwards for small sets, so compare generators with the floor at the same n)."""
    stats = compute_statistics(extractor, batches_of(images, None, batch_size), meta=meta)
    agree = label_agreement(classifier, batches_of(images, labels, batch_size), num_classes)
    return {"metric": "classifier_fd" if meta.get("features") == "classifier" else "fid",
            "value": stats.distance(ref), "n": stats.n, "source": source, "reference_source": ref.meta.get("source"),
            "label_agreement": agree["label_agreement"], "label_agreement_per_class": agree["per_class"], **meta}


def reference_and_floor(classifier: str | os.PathLike, dataset: str, data_dir: str | os.PathLike | None,
                        ref_path: str | os.PathLike, reference: tuple[str, int, int], floor: tuple[str, int, int]
                        ) -> dict[str, Any]:
    """The classifier-feature reference statistics of real images ``reference = (split, start, count)`` (computed
    into ``ref_path`` unless it exists) and the floor: the same measurement on the real images ``floor`` — what a
    perfect generator of that many images would score. Returns ``real_floor``'s result plus ``reference`` (the path).
    Used by robustdiff-demo and robustdiff-study."""
    from ..data.datasets import get_info, load_split

    info = get_info(dataset)
    features, meta, clf = feature_extractor("classifier", classifier=classifier, dataset=info.name,
                                            num_classes=info.num_classes, channels=info.image_shape[2])

    def part(split: str, start: int, count: int) -> tuple[np.ndarray, np.ndarray, str]:
        images, labels = load_split(info.name, split, data_dir)
        a, b = int(start), int(start) + int(count)
        if b > len(images):
            raise ValueError(f"{split}[{a}:{b}] is outside the {len(images)} {split} images of {info.name}")
        return images[a:b], labels[a:b], f"{info.name}:{split}[{a}:{b}]"

    ref_path = Path(ref_path)
    if not ref_path.is_file():
        images, _, source = part(*reference)
        save_statistics(ref_path, compute_statistics(features, batches_of(images), meta={**meta, "source": source}))
    images, labels, source = part(*floor)
    result = real_floor(features, clf, load_statistics(ref_path), images, labels, info.num_classes, source, meta)
    result["reference"] = str(ref_path)
    return result


__all__ = [
    "DEFAULT_N", "batches_of", "store_batches", "label_agreement", "check_same_space", "score_store", "real_floor",
    "reference_and_floor",
]
