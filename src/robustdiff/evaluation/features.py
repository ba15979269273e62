"""The feature networks behind FID and classifier FD: uint8 images in, one feature vector per image out.

* ``inception``: Inception-v3 pool3 (2048-d), torch-fidelity's port of the TF FID network as used by
  torchmetrics. Its weights can't be downloaded at run time here: pass a local file (``inception_weights``)
  or put it where torch.hub caches it; the file is read with ``weights_only=True``. FID with this network
  and 50,000 generated images against training-set statistics is the number EDM and the paper report.
* ``classifier``: the penultimate features (the input of the final ``nn.Linear``, `ClassifierFeatures`) of a
  classifier trained by robustdiff on the real data: a run directory of any architecture, its export, or a
  WideResNet state dict. Works offline for every dataset; the numbers rank generators of one dataset
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


def final_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The network's final ``nn.Linear`` (its classification head): the last one ``model.named_modules()`` lists.
    None when the network has none."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class ClassifierFeatures(nn.Module):
    """uint8 images (B, C, H, W) -> the classifier's penultimate features (B, D), eval mode, fp32.

    The features are the input of the network's final ``nn.Linear`` (`final_linear`: the last one registered,
    which must also be the last ``nn.Linear`` the forward pass runs), taken by a forward pre-hook that exists only
    during the call; D is its ``in_features``. For robustdiff's networks that is the globally average-pooled
    activations after the last BN-ReLU, what their ``features()`` returns: ``logits``' input, 64·width, for the
    WideResNet (as before), ``linear``'s, 8·width, for the PreAct-ResNet-18; for any other ``nn.Module`` trained
    through ``model._target_``, the input of its classification head. A network without an ``nn.Linear`` has no
    such layer and is refused (QualityError), as is one whose head input is not one vector per image or whose
    last ``nn.Linear`` run is not its last registered one."""

    def __init__(self, model: nn.Module, source: str = "classifier"):
        super().__init__()
        head = final_linear(model)
        if head is None:
            raise QualityError(f"{source}: {type(model).__name__} has no nn.Linear layer — classifier features are "
                               "the input of the network's final nn.Linear (its classification head); use a "
                               "classifier that ends in one")
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self.head_name = head[0] or type(model).__name__
        self.num_features = int(head[1].in_features)

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last: list = [None, None]

        def grab(module: nn.Module, args: tuple) -> None:
            last[0], last[1] = module, args[0] if args else None

        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        handles = [m.register_forward_pre_hook(grab) for m in linears]
        try:
            self.model(x.float() / 255.0)
        finally:
            for h in handles:
                h.remove()
        module, features = last
        if module is not linears[-1]:
            ran = "no nn.Linear" if module is None else "an nn.Linear other than the last registered one"
            raise QualityError(f"{self.source}: its forward pass ran {ran} last; classifier features are the input "
                               f"of the final nn.Linear ({self.head_name}), which must be the last one run")
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != self.num_features:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise QualityError(f"{self.source}: the input of its final nn.Linear ({self.head_name}) is {shape}, not "
                               f"one {self.num_features}-vector per image (B, {self.num_features})")
        return features.float()


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
    """A robustdiff-trained classifier of any architecture (a run directory, its robustdiff-eval export or a
    WideResNet state dict: ``diffusion.generation_inputs.read_classifier``, which rebuilds a run with
    ``models.loading.load_model``) and a description that names its file. With ``num_classes``/``channels`` it
    must classify that many classes of that many channels."""
    from ..diffusion.generation_inputs import GenerationError, read_classifier

    path = Path(path)
    try:
        model, about = read_classifier(path, dataset, num_classes, channels)
    except GenerationError as e:
        raise QualityError(str(e).replace("classifier=", "classifier ")) from e
    meta = {"classifier": str(path), "classifier_sha256": file_sha256(about["weights"]),
            "classifier_model": about["name"]}
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
                               "the real data (e.g. loss=ce), its robustdiff-eval export or a WideResNet state "
                               "dict (--classifier PATH)")
        return ClassifierFeatures(clf, f"classifier {classifier}"), {"features": "classifier", **clf_meta}, clf
    module, meta = load_inception(inception_weights)
    return module, meta, clf


__all__ = [
    "FEATURE_KINDS", "INCEPTION_FILE", "INCEPTION_URL", "ClassifierFeatures", "final_linear", "InceptionFeatures",
    "load_inception", "find_inception_weights", "load_feature_classifier", "feature_extractor",
]
