"""The feature networks behind FID and classifier FD: uint8 images in, one feature vector per image out.

* ``inception``: Inception-v3 pool3 (2048-d), torch-fidelity's port of the TF FID network as used by
  torchmetrics. Its weights can't be downloaded at run time here: pass a local file (``inception_weights``)
  or put it where torch.hub caches it; the file is read with ``weights_only=True``. FID with this network
  and 50,000 generated images against training-set statistics is the number EDM and the paper report.
* ``classifier``: the penultimate features of a WideResNet trained by robustdiff on the real data (a run
  directory or a state dict). Works offline for every dataset; the numbers rank generators of one dataset
  *measured with the same classifier* only, so every result records the classifier file's sha256.

``feature_extractor`` builds either one from a feature-space name and the files it needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.io import UnreadableWeightsError, file_sha256, load_weights
from .frechet import QualityError

FEATURE_KINDS = ("inception", "classifier")
# torch-fidelity's converted TF-Inception weights (what torchmetrics' FID downloads when it can).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


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


__all__ = [
    "FEATURE_KINDS", "INCEPTION_FILE", "INCEPTION_URL", "ClassifierFeatures", "InceptionFeatures", "load_inception",
    "find_inception_weights", "load_feature_classifier", "feature_extractor",
]
