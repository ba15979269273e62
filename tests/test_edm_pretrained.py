"""Safe loading of NVIDIA-format EDM pickles.

The fixture writes a ``torch_utils/persistence.py`` into a temp dir that behaves like NVIDIA's: its
``_reconstruct_persistent_obj(meta)`` *executes* ``meta['module_src']``. A pickle built with it embeds
source that writes a marker file when run. We first show that a plain ``pickle.load`` really runs it
(the file is live), then that our loader restores the weights bit-for-bit without ever running it.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from robustdiff.diffusion import pretrained
from robustdiff.diffusion.edm import EDMPrecond, VPPrecond
from robustdiff.diffusion.pretrained import (
    KNOWN_MODULE_SOURCES,
    PretrainedError,
    UnknownSourceWarning,
    load_edm_pickle,
    read_edm_pickle,
)

UNET_KWARGS = dict(augment_dim=9, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                   dropout=0.13, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                   decoder_type="standard", resample_filter=[1, 1])

PERSISTENCE_SRC = textwrap.dedent('''
    """Test double of NVIDIA's torch_utils.persistence: unpickling runs the embedded module source."""
    import types

    def _reconstruct_persistent_obj(meta):
        module = types.ModuleType("_imported_module_for_test")
        exec(meta["module_src"], module.__dict__)
        cls = module.__dict__[meta["class_name"]]
        obj = cls.__new__(cls)
        obj.__dict__.update(meta["state"])
        return obj
''')


@pytest.fixture
def persistence(tmp_path, monkeypatch):
    """Make `torch_utils.persistence` importable for this test only; returns (module, marker path)."""
    root = tmp_path / "site"
    (root / "torch_utils").mkdir(parents=True)
    (root / "torch_utils" / "__init__.py").write_text("")
    (root / "torch_utils" / "persistence.py").write_text(PERSISTENCE_SRC)
    monkeypatch.syspath_prepend(str(root))
    for name in ("torch_utils", "torch_utils.persistence"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import torch_utils.persistence as module

    yield module, tmp_path / "MARKER_code_was_executed"
    for name in ("torch_utils", "torch_utils.persistence"):
        sys.modules.pop(name, None)


def _module_src(marker, class_names) -> str:
    classes = "\n".join(f"class {name}(torch.nn.Module): pass" for name in sorted(class_names))
    return f"import pathlib, torch\npathlib.Path({str(marker)!r}).write_text('pwned')\n{classes}\n" \
           f"class EDMLoss: pass\nclass AugmentPipe: pass\n"


class _Persistent:
    """Pickles like an NVIDIA @persistent_class instance: reduce → (_reconstruct_persistent_obj, (meta,))."""

    def __init__(self, reconstruct, module_src, class_name, state):
        self.reconstruct, self.meta = reconstruct, dict(type="class", version=6, module_src=module_src,
                                                         class_name=class_name, state=state)

    def __reduce__(self):
        return self.reconstruct, (self.meta,)


def _shadow(module: torch.nn.Module, reconstruct, src, init_kwargs: dict):
    """Mirror `module` as NVIDIA's pickle holds it: persistent records for our classes, a real torch
    ModuleDict (pickled by torch's own reduce) for enc/dec, the module __dict__ as state."""
    children = collections.OrderedDict(
        (name, None if child is None else _shadow(child, reconstruct, src, init_kwargs))
        for name, child in module._modules.items())
    if isinstance(module, torch.nn.ModuleDict):
        md = torch.nn.ModuleDict()
        md.__dict__["_modules"] = children
        return md
    state = dict(module.__dict__, _modules=children)
    state.pop("_forward_hooks_always_called", None)  # torch-version noise; NVIDIA files predate it
    state["_init_args"] = ()
    state["_init_kwargs"] = init_kwargs.get(type(module).__name__, {})
    if type(module).__name__ in ("EDMPrecond", "VPPrecond"):
        state["use_fp16"] = False
    if type(module).__name__ == "UNetBlock":  # NVIDIA's hold numpy scalars here (np.sqrt)
        state["skip_scale"] = np.sqrt(0.5)
        state["_init_kwargs"] = dict(init_attn=dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2)))
    return _Persistent(reconstruct, src, type(module).__name__, state)


def _write_nvidia_style_pickle(path, net: EDMPrecond | VPPrecond, persistence_module, marker,
                               src: str | None = None) -> str:
    """Write ``net`` as NVIDIA's training snapshot .pkl; every persistent class embeds ``src`` (default: a
    module that writes ``marker`` when run). Returns the embedded source."""
    names = {type(m).__name__ for m in net.modules() if not isinstance(m, torch.nn.ModuleDict)}
    src = _module_src(marker, names) if src is None else src
    rec = persistence_module._reconstruct_persistent_obj
    unet_init = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, **UNET_KWARGS)
    precond_init = dict(img_resolution=8, img_channels=1, label_dim=10, use_fp16=False, model_type="SongUNet",
                        **UNET_KWARGS)
    data = dict(
        ema=_shadow(net, rec, src, {"SongUNet": unet_init, type(net).__name__: precond_init}),
        loss_fn=_Persistent(rec, src, "EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)),
        augment_pipe=_Persistent(rec, src, "AugmentPipe", dict(p=0.12, xflip=1e8, yflip=1.0)),
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", resolution=8, use_labels=True),
    )
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return src


def test_nvidia_style_pickle_loads_strictly_without_running_its_code(tmp_path, persistence):
    module, marker = persistence
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, **UNET_KWARGS).eval()
    path = tmp_path / "edm-test.pkl"
    src = _write_nvidia_style_pickle(path, net, module, marker)

    # The file is live: a plain unpickle executes the embedded source.
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    # Our loader, with torch_utils still importable (worst case), never runs it. The source is not
    # NVIDIA's, so it warns.
    with pytest.warns(UnknownSourceWarning, match="EDMPrecond.*SongUNet.*UNetBlock"):
        loaded, info = load_edm_pickle(path)
    assert not marker.exists()
    assert isinstance(loaded, EDMPrecond) and not loaded.training
    ours, theirs = net.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 4.0]), torch.tensor([1, 7])
    assert torch.equal(net(x, sigma, labels), loaded(x, sigma, labels))

    assert info["precond"] == "EDMPrecond" and info["unet_kwargs"]["model_channels"] == 16
    assert info["module_src_sha256"]["SongUNet"] == hashlib.sha256(src.encode()).hexdigest()
    assert info["augment_pipe"]["p"] == 0.12 and info["dataset_kwargs"]["resolution"] == 8
    # Reading without building returns inert records.
    assert read_edm_pickle(path)["ema"].class_name == "EDMPrecond"
    assert not marker.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_calling_os_system_is_refused_with_the_global_named(tmp_path):
    marker = tmp_path / "MARKER_os_system"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Evil(marker)}))
    with pytest.raises(PretrainedError) as err:
        load_edm_pickle(path)
    message = str(err.value)
    assert str(path) in message and f"{os.system.__module__}.system" in message and "refused" in message
    assert not marker.exists()


def test_non_edm_content_is_rejected(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"weights": torch.zeros(3)}))
    with pytest.raises(PretrainedError, match="'ema'"):
        load_edm_pickle(path)
    zipped = tmp_path / "ckpt.pt"
    torch.save({"a": torch.zeros(2)}, zipped)
    with pytest.raises(PretrainedError, match="ckpt.pt"):
        load_edm_pickle(zipped)
    with pytest.raises(PretrainedError, match="no such file"):
        load_edm_pickle(tmp_path / "missing.pkl")


def test_vp_pickle_sigma_range_is_read_from_the_pickle(tmp_path, persistence):
    """NVIDIA's VPPrecond computes σ_min = σ(1e-5) in float32 (0.0009765625) and the pickle stores it; the
    loader takes the stored σ_min/σ_max instead of recomputing them."""
    module, marker = persistence
    torch.manual_seed(0)
    net = VPPrecond(img_resolution=8, img_channels=1, label_dim=10, **UNET_KWARGS).eval()
    assert net.sigma_min == 0.0009765625  # float32, as NVIDIA's constructor (float64 gives 0.0010004976)
    assert net.sigma_max == pytest.approx(152.16698, abs=1e-4)
    # Stored values that no recomputation gives: they must come through unchanged.
    net.sigma_min, net.sigma_max = 0.00123, 99.5
    path = tmp_path / "baseline-vp.pkl"
    _write_nvidia_style_pickle(path, net, module, marker)
    with pytest.warns(UnknownSourceWarning):
        loaded, info = load_edm_pickle(path)
    assert isinstance(loaded, VPPrecond) and not marker.exists()
    assert (loaded.sigma_min, loaded.sigma_max) == (0.00123, 99.5)
    assert (info["sigma_min"], info["sigma_max"]) == (0.00123, 99.5)
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 4.0]), torch.tensor([1, 7])
    assert torch.equal(net(x, sigma, labels), loaded(x, sigma, labels))


def _tiny_pickle(tmp_path, persistence, src=None):
    module, marker = persistence
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, **UNET_KWARGS).eval()
    path = tmp_path / "edm-src.pkl"
    return path, _write_nvidia_style_pickle(path, net, module, marker, src=src)


def test_known_embedded_source_loads_without_warning(tmp_path, persistence, monkeypatch):
    """A pickle whose every persistent class embeds a known source loads silently."""
    path, src = _tiny_pickle(tmp_path, persistence, src="# stands in for NVIDIA's training/networks.py\n")
    digest = hashlib.sha256(src.encode()).hexdigest()
    monkeypatch.setattr(pretrained, "KNOWN_MODULE_SOURCES",
                        {name: frozenset({digest}) for name in KNOWN_MODULE_SOURCES})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = load_edm_pickle(path)
    assert info["unknown_sources"] == {}


def test_unknown_embedded_source_warns_naming_class_and_file(tmp_path, persistence, monkeypatch):
    """Only SongUNet's source is known: one warning names the other classes, the file and the hash."""
    path, src = _tiny_pickle(tmp_path, persistence, src="# a modified networks.py\n")
    digest = hashlib.sha256(src.encode()).hexdigest()
    monkeypatch.setitem(pretrained.KNOWN_MODULE_SOURCES, "SongUNet", frozenset({digest}))
    with pytest.warns(UnknownSourceWarning) as caught:
        load_edm_pickle(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message and digest in message and "was not run" in message
    for name in ("AugmentPipe", "Conv2d", "EDMLoss", "EDMPrecond", "UNetBlock"):
        assert name in message
    assert "SongUNet" not in message


def test_known_source_table_covers_the_released_classes():
    """Hashes of NVlabs/edm's training/{networks,loss,augment}.py; every class of an EDM snapshot is listed."""
    for name in ("EDMPrecond", "VPPrecond", "SongUNet", "UNetBlock", "Linear", "Conv2d", "GroupNorm",
                 "PositionalEmbedding", "FourierEmbedding", "EDMLoss", "AugmentPipe"):
        hashes = KNOWN_MODULE_SOURCES[name]
        assert hashes and all(len(h) == 64 and int(h, 16) >= 0 for h in hashes), name
    assert len(KNOWN_MODULE_SOURCES["EDMPrecond"]) == 2  # networks.py before and after "Fix to #2"
    assert KNOWN_MODULE_SOURCES["SongUNet"] is KNOWN_MODULE_SOURCES["EDMPrecond"]
