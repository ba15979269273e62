"""Generator quality (docs/method.md, "The generator (EDM)"): FID as EDM computes it, classifier FD, label agreement.

* **Statistics** of a set of images are the mean μ and covariance Σ (float64) of its features, accumulated
  by ``torchmetrics.image.fid.FrechetInceptionDistance`` (sums of features and of their outer products in
  float64), exactly as EDM's ``fid.py``: μ = Σx / n, Σ = (Σxxᵀ − n·μμᵀ) / (n − 1).
* **Fréchet distance** between two sets of statistics, EDM's formula:
  ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·sqrtm(Σ₁Σ₂)), with ``scipy.linalg.sqrtm`` and the real part.
* **Feature spaces**:
  - ``inception``: Inception-v3 pool3 (2048-d), torch-fidelity's port of the TF FID network as used by
    torchmetrics. Its weights can't be downloaded at run time here: pass a local file (``inception_weights``)
    or put it where torch.hub caches it; the file is read with ``weights_only=True``. FID with this network
    and 50,000 generated images against training-set statistics is the number EDM and the paper report.
  - ``classifier``: the penultimate features of a WideResNet trained by robustdiff on the real data (a run
    directory or a state dict). Works offline for every dataset; the numbers rank generators of one dataset
    *measured with the same classifier* only, so every result records the classifier file's sha256.
* **Label agreement**: accuracy of a classifier on generated images against the labels they were
  generated for, overall and per class.

Reference statistics are ``.npz`` files with ``mu`` and ``sigma`` (EDM's ``fid-refs/*.npz`` layout, so EDM's
published CIFAR-10 file loads as is); robustdiff also stores a ``meta`` JSON string (feature space,
classifier sha256, source of the images) that ``score`` checks before comparing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils.io import UnreadableWeightsError, atomic_path, file_sha256, load_weights

FEATURE_KINDS = ("inception", "classifier")
# torch-fidelity's converted TF-Inception weights (what torchmetrics' FID downloads when it can).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
DEFAULT_N = 50_000  # generated images per FID, as EDM and the paper


class QualityError(ValueError):
    """Bad input to a generator-quality measurement; the message names the file or field and the fix."""


# ---------------------------------------------------------------------------------------------------- math


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·sqrtm(Σ₁Σ₂)) in float64, the real part (EDM's ``fid.py``)."""
    import scipy.linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise QualityError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                           f"{sigma2.shape} (features of different networks?)")
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(m + np.trace(sigma1 + sigma2 - 2 * s)))


@dataclass
class Statistics:
    """μ (D,) and Σ (D, D) in float64 of ``n`` images' features, and what they were computed from."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict[str, Any] = field(default_factory=dict)

    def distance(self, other: Statistics) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def save_statistics(path: str | os.PathLike, stats: Statistics) -> Path:
    """Write ``mu``, ``sigma`` (EDM's layout) plus ``n`` and a ``meta`` JSON string, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n),
                 meta=np.array(json.dumps(stats.meta, sort_keys=True)))
    return path


def load_statistics(path: str | os.PathLike) -> Statistics:
    """Reference statistics from an ``.npz`` with ``mu`` and ``sigma`` (EDM's or ours); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise QualityError(f"reference statistics {path}: no such file (make one with `robustdiff-fid ref`, or use "
                           f"EDM's fid-refs/*.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise QualityError(f"reference statistics {path}: needs arrays 'mu' and 'sigma' (EDM's fid-refs "
                                   f"layout), found {sorted(z.files)}")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            n = int(z["n"]) if "n" in z else 0
            meta = json.loads(str(z["meta"])) if "meta" in z else {"features": "inception", "source": "external"}
    except (OSError, ValueError) as e:
        if isinstance(e, QualityError):
            raise
        raise QualityError(f"reference statistics {path}: not a readable .npz ({e})") from e
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise QualityError(f"reference statistics {path}: mu is {mu.shape} and sigma {sigma.shape}; expected (D,) "
                           f"and (D, D)")
    return Statistics(mu, sigma, n, meta)


# ---------------------------------------------------------------------------------------------------- networks


class ClassifierFeatures(nn.Module):
    """uint8 images (B, C, H, W) -> penultimate WideResNet features (B, 64·width), eval mode, fp32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.num_features = int(model.logits.in_features)

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x.float() / 255.0)


class InceptionFeatures(nn.Module):
    """uint8 images (B, C, H, W), any size -> Inception-v3 pool3 features (B, 2048); grey images are tiled to RGB.

    The network is torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's TF-FID port, which resizes to
    299×299 internally as the TF graph did). Weights come from ``state`` (a state dict) or stay randomly
    initialised (``state=None``, tests only): nothing is downloaded and nothing is unpickled.
    """

    num_features = 2048

    def __init__(self, state: dict[str, torch.Tensor] | None):
        super().__init__()
        self.net = _build_inception(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x.contiguous())


_KEEP_INIT = object()


def _build_inception(state: dict[str, torch.Tensor] | None) -> nn.Module:
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as tfi
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise QualityError("Inception features need torch-fidelity: pip install torch-fidelity") from e

    class _Inception(NoTrainInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if state_dict is _KEEP_INIT:
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    # torch-fidelity would download the weights (or torch.load a path without weights_only): hand it ours.
    original = tfi.load_state_dict_from_url
    tfi.load_state_dict_from_url = lambda *a, **k: _KEEP_INIT if state is None else state
    try:
        return _Inception(name="inception-v3-compat", features_list=["2048"])
    finally:
        tfi.load_state_dict_from_url = original


def find_inception_weights(path: str | os.PathLike | None) -> Path:
    """The local Inception weights file: ``path``, else torch.hub's cache; a clear error when there is none."""
    candidates = [Path(path).expanduser()] if path else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    for c in candidates:
        if c.is_file():
            return c
    where = "\n  ".join(str(c) for c in candidates)
    raise QualityError(
        f"Inception-v3 weights for FID not found. Looked in:\n  {where}\n"
        f"Download {INCEPTION_URL} (torch-fidelity's port of the TF FID network, 91 MB) on a machine with "
        f"internet, copy it here and pass --inception-weights PATH (or inception_weights=PATH), or put it in "
        f"torch.hub's cache above. No weights: use --features classifier (classifier FD) instead.")


def load_inception(path: str | os.PathLike | None) -> tuple[InceptionFeatures, dict[str, Any]]:
    weights = find_inception_weights(path)
    try:
        state = load_weights(weights, f"Inception weights (use torch-fidelity's {INCEPTION_FILE})")
    except UnreadableWeightsError as e:
        raise QualityError(str(e)) from None
    try:
        module = InceptionFeatures(state)
    except RuntimeError as e:
        raise QualityError(f"Inception weights {weights}: do not fit torch-fidelity's Inception-v3 ({e}); use "
                           f"{INCEPTION_FILE}") from e
    return module, {"features": "inception", "weights": str(weights), "weights_sha256": file_sha256(weights)}


def load_feature_classifier(path: str | os.PathLike, dataset: str | None, num_classes: int | None = None,
                            channels: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A robustdiff-trained WideResNet (run directory or state dict) and a description that names its file."""
    from ..diffusion.generation_inputs import GenerationError, load_classifier

    path = Path(path)
    weights = path / "model.pt" if path.is_dir() else path
    try:
        if num_classes is None or channels is None:
            state = torch.load(weights, map_location="cpu", weights_only=True) if weights.is_file() else {}
            num_classes = num_classes or (state["logits.weight"].shape[0] if "logits.weight" in state else 0)
            channels = channels or (state["init_conv.weight"].shape[1] if "init_conv.weight" in state else 0)
        model = load_classifier(path, dataset, int(num_classes), int(channels))
    except GenerationError as e:
        raise QualityError(str(e).replace("classifier=", "classifier ")) from e
    meta = {"classifier": str(path), "classifier_sha256": file_sha256(weights),
            "classifier_model": f"wrn-{model.depth}-{model.width}"}
    if path.is_dir() and (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
        meta["classifier_test_clean_acc"] = summary.get("test_clean_acc_best")
    return model, meta


# ---------------------------------------------------------------------------------------------------- statistics


def _device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def compute_statistics(extractor: nn.Module, batches: Iterable[tuple[np.ndarray, Any]], *,
                       device: str | torch.device | None = "cpu", meta: dict[str, Any] | None = None,
                       progress: bool = False, total: int | None = None) -> Statistics:
    """μ, Σ of ``extractor``'s features of uint8 (b, H, W, C) image batches, accumulated by torchmetrics' FID."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    dev = _device(device)
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=True).to(dev)
    bar = _bar(total, "features", progress)
    with torch.inference_mode():
        for images, _ in batches:
            x = torch.from_numpy(np.ascontiguousarray(images)).to(dev).permute(0, 3, 1, 2)
            metric.update(x, real=False)
            bar.update(len(images))
    bar.close()
    n = int(metric.fake_features_num_samples)
    if n < 2:
        raise QualityError(f"statistics need at least 2 images, got {n}")
    total_sum = metric.fake_features_sum.double().cpu().numpy()
    cov_sum = metric.fake_features_cov_sum.double().cpu().numpy()
    mu = total_sum / n
    sigma = (cov_sum - n * np.outer(mu, mu)) / (n - 1)
    return Statistics(mu, sigma, n, dict(meta or {}))


def label_agreement(classifier: nn.Module, batches: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int, *,
                    device: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Accuracy of ``classifier`` on images against their (conditioning) labels: overall and per class."""
    dev = _device(device)
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


def _bar(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return _Null()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


class _Null:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- one call


def feature_extractor(kind: str, *, inception_weights: str | os.PathLike | None = None,
                      classifier: str | os.PathLike | None = None, dataset: str | None = None,
                      num_classes: int | None = None, channels: int | None = None,
                      ) -> tuple[nn.Module, dict[str, Any], nn.Module | None]:
    """(feature module, description, the classifier or None) for ``kind`` in FEATURE_KINDS."""
    if kind not in FEATURE_KINDS:
        raise QualityError(f"features={kind!r}: choose inception (FID) or classifier (classifier FD)")
    clf, clf_meta = (None, {})
    if classifier is not None:
        clf, clf_meta = load_feature_classifier(classifier, dataset, num_classes, channels)
    if kind == "classifier":
        if clf is None:
            raise QualityError("features=classifier needs a classifier: a robustdiff-train run directory trained on "
                               "the real data (e.g. loss=ce) or a WideResNet state dict (--classifier PATH)")
        return ClassifierFeatures(clf), {"features": "classifier", **clf_meta}, clf
    module, meta = load_inception(inception_weights)
    return module, meta, clf


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


__all__ = [
    "FEATURE_KINDS", "DEFAULT_N", "QualityError", "Statistics", "frechet_distance", "save_statistics",
    "load_statistics", "ClassifierFeatures", "InceptionFeatures", "load_inception", "find_inception_weights",
    "load_feature_classifier", "compute_statistics", "label_agreement", "batches_of", "store_batches",
    "feature_extractor", "check_same_space", "score_store", "real_floor",
]


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
