"""Safe loading of NVIDIA's pretrained EDM checkpoints (``edm-cifar10-32x32-cond-vp.pkl`` etc.), docs/method.md, "The generator (EDM)".

Licence: NVIDIA's EDM network weights are licensed by their authors under Creative Commons
Attribution-NonCommercial-ShareAlike 4.0 (CC BY-NC-SA 4.0, http://creativecommons.org/licenses/by-nc-sa/4.0/).
Images generated with them, and models trained on those images, may carry that licence's
non-commercial / share-alike terms; robustdiff's own MIT licence does not cover the weights.

Why a special loader: the pickles hold ``{'ema': EDMPrecond(model=SongUNet), 'loss_fn', 'augment_pipe',
'dataset_kwargs'}`` whose classes were pickled by NVIDIA's ``torch_utils.persistence``: each object
is rebuilt by calling ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta``
carries the *source code of the defining module*, which a plain ``pickle.load`` (or
``torch.load(weights_only=False)``) **executes**. Any such file is therefore arbitrary code.

What we do instead: a ``pickle.Unpickler`` whose ``find_class`` resolves only this allow-list —

* ``torch._utils._rebuild_tensor_v2``, ``torch._utils._rebuild_parameter`` (checked wrappers),
* ``torch.storage._load_from_bytes`` → our own function that reads the storage bytes with
  ``torch.load(weights_only=True)`` (torch's own function uses ``weights_only=False``),
* ``collections.OrderedDict``, ``builtins.set`` / ``frozenset``,
* numpy scalar and dtype reconstruction (``numpy[._]core.multiarray.scalar``, ``numpy.dtype``;
  object dtypes refused),
* ``torch_utils.persistence._reconstruct_persistent_obj`` → a function returning a ``ModuleRecord``
  (class name, SHA-256 of the embedded source — never executed — and the saved ``__dict__``); a source
  whose hash is not in ``KNOWN_MODULE_SOURCES`` (NVIDIA's released files) raises an ``UnknownSourceWarning``,
* ``torch.nn.modules.container.ModuleDict`` and ``dnnlib.util.EasyDict`` → inert stand-ins,

and refuses every other global with a ``PretrainedError`` that names the file and the global. From the
records we rebuild the ``ema`` state dict out of the saved ``_parameters`` / ``_buffers`` /
``_modules``, construct our own ``EDMPrecond`` / ``VPPrecond`` + ``SongUNet`` from the saved
``_init_kwargs`` and attributes, and ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import io
import os
import pickle
import warnings
from typing import Any

import numpy as np
import torch

from robustdiff.diffusion.edm import EDMPrecond, VPPrecond
from robustdiff.models.unet import SongUNet

__all__ = ["ALLOWED_GLOBALS", "KNOWN_MODULE_SOURCES", "ModuleRecord", "PretrainedError", "UnknownSourceWarning",
           "load_edm_pickle", "read_edm_pickle"]


class PretrainedError(RuntimeError):
    """A pretrained checkpoint could not be loaded safely or is not an EDM SongUNet network pickle."""


class UnknownSourceWarning(UserWarning):
    """A pickle's persistent class embeds module source that is not one of NVIDIA's released EDM sources."""


# SHA-256 of the module source that NVIDIA's torch_utils.persistence embeds in a pickle for each persistent
# class: ``inspect.getsource(module)``, i.e. the whole text of the defining file (UTF-8; these files are
# LF-only, so the hash equals that of the file's bytes). Computed from the git history of NVlabs/edm:
_NETWORKS_PY = frozenset({
    # training/networks.py at 0a2ff34f0b80 ("Initial commit", 2022-10-31)
    "2294828d5f59f5fd008f7141e6b8af2095918f2ce019f280a933e4779b5c3cef",
    # training/networks.py at b2a26c921c57 ("Fix to #2", 2022-11-21); unchanged up to 008a4e5316c8 (2024-03-16)
    "5db27dcd96674b95c72d5e6491b879cdc35e24039ada3411b4b46a28ed1fe284",
})
# training/loss.py and training/augment.py at 0a2ff34f0b80; unchanged up to 008a4e5316c8.
_LOSS_PY = frozenset({"b26f0937bc72b18cc5f9869c86035ca9b872138cdfae7994237e9733951e4415"})
_AUGMENT_PY = frozenset({"fd411af7c2d74489ce11a245293047369fc044d00a9aeed1c0bd46b322c8a8b5"})
# Class name → known hashes of its embedded source. A file whose source is not listed still loads (its
# code is never run) but warns: it is not the released code, so it may not be the checkpoint it claims.
KNOWN_MODULE_SOURCES: dict[str, frozenset[str]] = {
    **dict.fromkeys(["Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
                     "SongUNet", "DhariwalUNet", "VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond"],
                    _NETWORKS_PY),
    **dict.fromkeys(["VPLoss", "VELoss", "EDMLoss"], _LOSS_PY),
    "AugmentPipe": _AUGMENT_PY,
}


class ModuleRecord:
    """Inert stand-in for a pickled object: ``class_name``, ``module_src_sha256`` (None for torch classes)
    and ``state`` (the object's saved ``__dict__``). Building one runs no code from the file."""

    def __init__(self, class_name: str, state: dict, module_src_sha256: str | None = None):
        self.class_name = class_name
        self.state = state
        self.module_src_sha256 = module_src_sha256

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_name!r}, keys={sorted(self.state)[:6]}...)"


class _ModuleDictRecord(ModuleRecord):
    # pickle rebuilds a torch ModuleDict as cls.__new__(cls) then __setstate__(its __dict__).
    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise PretrainedError(f"ModuleDict state is a {type(state).__name__}, expected a dict")
        self.class_name = "torch.nn.ModuleDict"
        self.state = state
        self.module_src_sha256 = None


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict: plain dict contents, no attribute magic needed here."""


def _reconstruct_persistent_obj(meta: Any) -> ModuleRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise PretrainedError(f"persistent object meta is not a class record: {type(meta).__name__}")
    src, name, state = meta.get("module_src"), meta.get("class_name"), meta.get("state")
    if not isinstance(src, str) or not isinstance(name, str):
        raise PretrainedError("persistent object meta lacks module_src/class_name strings")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise PretrainedError(f"persistent object {name}: state is a {type(state).__name__}, expected a dict")
    return ModuleRecord(name, dict(state), hashlib.sha256(src.encode("utf-8")).hexdigest())


def _load_storage_from_bytes(b: Any):
    if not isinstance(b, (bytes, bytearray)):
        raise PretrainedError(f"storage payload is a {type(b).__name__}, expected bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation noise
        storage = torch.load(io.BytesIO(bytes(b)), weights_only=True, map_location="cpu")
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise PretrainedError(f"storage payload decoded to a {type(storage).__name__}")
    return storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise PretrainedError(f"tensor storage is a {type(storage).__name__}")
    if backward_hooks:
        raise PretrainedError("tensor carries backward hooks; refused")
    if metadata is not None and not isinstance(metadata, dict):
        raise PretrainedError("tensor metadata is not a dict")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride),
                                               bool(requires_grad), collections.OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise PretrainedError(f"parameter data is a {type(data).__name__}")
    if backward_hooks:
        raise PretrainedError("parameter carries backward hooks; refused")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


try:  # numpy ≥ 2 pickles name numpy._core; older files say numpy.core. Both resolve to the same function.
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import scalar as _np_scalar


def _numpy_dtype(obj, align=False, copy=False):
    dtype = np.dtype(obj, bool(align), bool(copy))
    if dtype.hasobject:
        raise PretrainedError(f"numpy object dtype {dtype} refused")
    return dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise PretrainedError(f"numpy scalar of dtype {dtype!r} refused")
    return _np_scalar(dtype, data) if data is not None else _np_scalar(dtype)


ALLOWED_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch.storage._load_from_bytes": _load_storage_from_bytes,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.dtype": _numpy_dtype,
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct_persistent_obj,
    "torch.nn.modules.container.ModuleDict": _ModuleDictRecord,
    "dnnlib.util.EasyDict": _EasyDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        key = f"{module}.{name}"
        if key in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[key]
        raise PretrainedError(
            f"{self._source}: refused to load global {key!r}; only EDM network pickles (tensors, "
            f"persistent-class records, numpy scalars) are accepted. If this file should load, inspect it "
            f"(python -m pickletools) before extending robustdiff.diffusion.pretrained.ALLOWED_GLOBALS.")

    def persistent_load(self, pid):
        raise PretrainedError(f"{self._source}: persistent id {pid!r} refused (not an EDM .pkl; a torch.save "
                              f"checkpoint should be read with torch.load(weights_only=True))")


def read_edm_pickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with the allow-list above, executing no code from it. Persistent objects come
    back as ``ModuleRecord``s. Raises ``PretrainedError`` naming the file and any refused global."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            return _RestrictedUnpickler(f, source).load()
    except PretrainedError:
        raise
    except FileNotFoundError:
        raise PretrainedError(f"{source}: no such file") from None
    except Exception as exc:  # malformed stream, truncated file, wrapper argument errors, ...
        raise PretrainedError(f"{source}: not a readable EDM pickle ({type(exc).__name__}: {exc})") from exc


def _state_dict(record: ModuleRecord, source: str, prefix: str = "") -> dict[str, torch.Tensor]:
    state = record.state
    for field in ("_parameters", "_buffers", "_modules"):
        if not isinstance(state.get(field), dict):
            raise PretrainedError(f"{source}: {prefix or 'ema'} ({record.class_name}) has no {field} dict; "
                                  f"not a torch module")
    out: dict[str, torch.Tensor] = {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, t in state["_parameters"].items():
        if t is not None:
            out[prefix + name] = t.detach()
    for name, t in state["_buffers"].items():
        if t is not None and name not in non_persistent:
            out[prefix + name] = t
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not isinstance(child, ModuleRecord):
            raise PretrainedError(f"{source}: submodule {prefix + name} is a {type(child).__name__}")
        out.update(_state_dict(child, source, f"{prefix}{name}."))
    return out


_UNET_KWARGS = set(inspect.signature(SongUNet.__init__).parameters) - {"self"}


def _warn_unknown_sources(source: str, sources: dict[str, set[str]]) -> dict[str, list[str]]:
    """Warn (``UnknownSourceWarning``) once per embedded source that is not a known NVIDIA release, naming
    the classes that carry it. ``sources``: {class name: hashes}. Returns {hash: class names} of the unknown."""
    unknown: dict[str, list[str]] = {}
    for name in sorted(sources):
        for digest in sorted(sources[name]):
            if digest not in KNOWN_MODULE_SOURCES.get(name, ()):
                unknown.setdefault(digest, []).append(name)
    for digest, names in unknown.items():
        warnings.warn(
            f"{source}: the source code embedded for class{'es' if len(names) > 1 else ''} {', '.join(names)} "
            f"(sha256 {digest}) is not one of NVIDIA's released EDM sources (training/networks.py, loss.py, "
            f"augment.py of NVlabs/edm). It was not run and only the weights were loaded, but the file may not be "
            f"the checkpoint it claims to be: check where it came from. If it is a build you trust, add the hash to "
            f"robustdiff.diffusion.pretrained.KNOWN_MODULE_SOURCES.", UnknownSourceWarning, stacklevel=3)
    return unknown


def load_edm_pickle(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Load the ``ema`` network of an NVIDIA EDM ``.pkl`` into our EDMPrecond/VPPrecond + SongUNet.

    Returns (net in eval mode on ``device``, info dict with 'precond', 'precond_kwargs', 'unet_kwargs',
    'sigma_min', 'sigma_max' (the network's σ range: for a VPPrecond the values stored in the pickle),
    'module_src_sha256' {class name: hash} of the ema network's classes, 'unknown_sources' {hash: class names}
    for embedded sources not in ``KNOWN_MODULE_SOURCES`` (each also raises an ``UnknownSourceWarning``),
    'augment_pipe' (its saved settings or None), 'dataset_kwargs').
    Raises PretrainedError for unsafe content, non-EDM content, or a strict-load mismatch.
    """
    source = os.fspath(path)
    top = read_edm_pickle(source)
    if not isinstance(top, dict) or not isinstance(top.get("ema"), ModuleRecord):
        raise PretrainedError(f"{source}: expected a dict with an 'ema' network (NVIDIA EDM training snapshot); "
                              f"got {type(top).__name__} with keys {list(top)[:8] if isinstance(top, dict) else '-'}")
    ema = top["ema"]
    precond_cls = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond}.get(ema.class_name)
    if precond_cls is None:
        raise PretrainedError(f"{source}: ema is a {ema.class_name}; supported: EDMPrecond, VPPrecond")
    model = ema.state.get("_modules", {}).get("model")
    if not isinstance(model, ModuleRecord) or model.class_name != "SongUNet":
        name = getattr(model, "class_name", type(model).__name__)
        raise PretrainedError(f"{source}: ema.model is a {name}; only SongUNet (DDPM++/NCSN++) is implemented "
                              f"(DhariwalUNet/ADM, e.g. the ImageNet-64 model, is not)")

    unet_kwargs = model.state.get("_init_kwargs")
    if not isinstance(unet_kwargs, dict):
        raise PretrainedError(f"{source}: SongUNet record has no _init_kwargs; cannot rebuild the network")
    unknown = set(unet_kwargs) - _UNET_KWARGS
    if unknown:
        raise PretrainedError(f"{source}: SongUNet _init_kwargs has unsupported keys {sorted(unknown)}")
    unet_kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet_kwargs.items()}

    s = ema.state
    try:
        precond_kwargs = dict(img_resolution=int(s["img_resolution"]), img_channels=int(s["img_channels"]),
                              label_dim=int(s["label_dim"]))
        if precond_cls is EDMPrecond:
            precond_kwargs.update(sigma_min=float(s["sigma_min"]), sigma_max=float(s["sigma_max"]),
                                  sigma_data=float(s["sigma_data"]))
        else:
            precond_kwargs.update(beta_d=float(s["beta_d"]), beta_min=float(s["beta_min"]), M=int(s["M"]),
                                  epsilon_t=float(s["epsilon_t"]))
    except KeyError as exc:
        raise PretrainedError(f"{source}: {ema.class_name} record lacks attribute {exc}") from None
    expected = dict(img_resolution=precond_kwargs["img_resolution"], in_channels=precond_kwargs["img_channels"],
                    out_channels=precond_kwargs["img_channels"], label_dim=precond_kwargs["label_dim"])
    for key, value in expected.items():
        if key in unet_kwargs and unet_kwargs[key] != value:
            raise PretrainedError(f"{source}: SongUNet {key}={unet_kwargs[key]} disagrees with "
                                  f"{ema.class_name} ({value})")
    rest = {k: v for k, v in unet_kwargs.items() if k not in expected}

    try:
        net = precond_cls(**precond_kwargs, **rest)
    except (TypeError, ValueError) as exc:
        raise PretrainedError(f"{source}: cannot build the network from its saved kwargs: {exc}") from exc
    if precond_cls is VPPrecond:
        # The pickled σ range is what NVIDIA's sampler clamps to; take it as saved rather than recomputing it.
        for key in ("sigma_min", "sigma_max"):
            if key in s:
                try:
                    setattr(net, key, float(s[key]))
                except (TypeError, ValueError):
                    raise PretrainedError(f"{source}: VPPrecond.{key} is {s[key]!r}, not a number") from None
    state_dict = _state_dict(ema, source)
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise PretrainedError(f"{source}: weights do not match the rebuilt network: {exc}") from exc

    def collect(rec: ModuleRecord, into: dict[str, set[str]]):
        if rec.module_src_sha256:
            into.setdefault(rec.class_name, set()).add(rec.module_src_sha256)
        for child in rec.state.get("_modules", {}).values():
            if isinstance(child, ModuleRecord):
                collect(child, into)

    ema_sources: dict[str, set[str]] = {}
    collect(ema, ema_sources)
    records = {name: min(hashes) for name, hashes in ema_sources.items()}
    all_sources: dict[str, set[str]] = {}
    for value in top.values():
        if isinstance(value, ModuleRecord):
            collect(value, all_sources)
    unknown = _warn_unknown_sources(source, all_sources)
    augment = top.get("augment_pipe")
    info = dict(
        precond=ema.class_name,
        precond_kwargs=precond_kwargs,
        sigma_min=float(net.sigma_min),
        sigma_max=float(net.sigma_max),
        unet_kwargs=unet_kwargs,
        module_src_sha256=records,
        unknown_sources=unknown,
        augment_pipe=dict(augment.state) if isinstance(augment, ModuleRecord) else None,
        dataset_kwargs=dict(top["dataset_kwargs"]) if isinstance(top.get("dataset_kwargs"), dict) else None,
    )
    return net.to(device).eval(), info
