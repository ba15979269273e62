"""robustdiff-generate: class-balanced stores with provenance, batch-size and process-count invariance,
byte-identical resume after an interruption, classifier filtering, and clear errors on bad input."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from robustdiff.cli.hydra_conf import CONF_DIR
from robustdiff.data.store import GeneratedStore, StoreError, verify_store
from robustdiff.diffusion.edm import EDMPrecond
from robustdiff.diffusion.generate import GenerationError, generate
from robustdiff.diffusion.sampler import sample_images
from robustdiff.training.diffusion import network_kwargs, save_network

N, SHARD = 40, 16  # shards of 16, 16, 8 images


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_network(path: Path) -> Path:
    """A random small 16-px conditional network whose output is not ~0 (the 1e-5 init layers are scaled up)."""
    torch.manual_seed(0)
    kwargs = network_kwargs("small", 16, 1, 10)
    net = EDMPrecond(**kwargs)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("conv1.weight", "proj.weight", "aux_conv.weight")):
                p.mul_(1e4)
    save_network(path, kwargs, net)
    return path


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> Path:
    return tiny_network(tmp_path_factory.mktemp("net") / "network.pt")


def config(network: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("generate", overrides=[f"network={network}", f"n={N}", f"out={out}", "steps=3",
                                              f"shard_size={SHARD}", "batch_size=8", "progress=false", *overrides])


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_store_is_balanced_with_provenance(network, tmp_path):
    manifest = generate(config(network, tmp_path / "s"))
    assert manifest["complete"] and manifest["count"] == N and manifest["class_counts"] == [4] * 10
    assert [s["count"] for s in manifest["shards"]] == [16, 16, 8]
    prov = manifest["provenance"]
    assert prov["generator"]["sha256"] == __import__("hashlib").sha256(network.read_bytes()).hexdigest()
    assert prov["generator"]["file"] == str(network.resolve()) and prov["generator"]["format"] == "robustdiff-network"
    assert prov["sampler"]["num_steps"] == 3 and prov["sampler"]["name"] == "edm_heun"
    assert prov["seed"] == 0 and prov["n"] == N
    assert verify_store(tmp_path / "s") == []
    store = GeneratedStore(tmp_path / "s")
    images, labels = store.get(np.arange(N))
    np.testing.assert_array_equal(labels, np.arange(N) % 10)  # label = index mod classes
    assert images.std() > 10  # not a constant image
    # Image i is what the sampler gives for index i, whatever else is in its batch.
    from robustdiff.training.diffusion import load_network

    net, _ = load_network(network)
    ref, _ = sample_images(net, [5, 33], 10, seed=0, num_steps=3, batch_size=2)
    np.testing.assert_array_equal(ref, images[[5, 33]])
    # Rerunning a finished generation changes nothing.
    before = store_bytes(tmp_path / "s")
    generate(config(network, tmp_path / "s"))
    assert store_bytes(tmp_path / "s") == before


def test_nvidia_seeding_store_records_seeding_and_real_class_counts(network, tmp_path, capsys):
    """seeding=nvidia: image i is NVIDIA generate.py's image for seed i, with the label that seed draws; the
    store is not balanced, and the manifest says how it was seeded and how many images each class has."""
    manifest = generate(config(network, tmp_path / "nv", "seeding=nvidia", "n=23"))  # any n: no balance
    prov = manifest["provenance"]
    assert prov["seeding"] == "nvidia" and "generate.py" in prov["seeds"]
    store = GeneratedStore(tmp_path / "nv")
    images, labels = store.get(np.arange(23))
    assert manifest["class_counts"] == np.bincount(labels, minlength=10).tolist()
    assert len(set(manifest["class_counts"])) > 1  # random labels
    assert "per class [" in capsys.readouterr().out
    from robustdiff.training.diffusion import load_network

    net, _ = load_network(network)
    ref, ref_labels = sample_images(net, [5, 17], 10, seed=0, num_steps=3, batch_size=2, seeding="nvidia")
    np.testing.assert_array_equal(ref_labels, labels[[5, 17]])
    np.testing.assert_array_equal(ref, images[[5, 17]])
    # The default store's provenance is unchanged by the option (stores begun earlier still resume).
    assert "seeding" not in generate(config(network, tmp_path / "default"))["provenance"]
    with pytest.raises(GenerationError, match="seeding=nvidia.*random labels"):
        generate(config(network, tmp_path / "x", "seeding=nvidia", "classifier=somewhere", "keep_fraction=0.5"))
    with pytest.raises(GenerationError, match="seeding='numpy'"):
        generate(config(network, tmp_path / "x", "seeding=numpy"))


def test_interrupted_run_finishes_byte_identical(network, tmp_path, signal_after_shards):
    """A real SIGTERM (a scheduler's stop) after the first shard: that shard is written, the job stops and says
    so, its handler is undone, and the same command writes only the missing shards — the same bytes as a run
    that never stopped."""
    import signal

    generate(config(network, tmp_path / "straight"))
    before = signal.getsignal(signal.SIGTERM)
    signal_after_shards(1)
    assert generate(config(network, tmp_path / "resumed")) == {"stopped": True, "signal": signal.SIGTERM,
                                                               "shards_written": 1}
    assert signal.getsignal(signal.SIGTERM) is before
    assert (tmp_path / "resumed" / "shard-00000.images.u8").is_file()
    assert not (tmp_path / "resumed" / "shard-00001.images.u8").exists()
    with pytest.raises(StoreError, match="incomplete"):
        GeneratedStore(tmp_path / "resumed")
    (tmp_path / "resumed" / ".shard-00001.images.u8.x1.tmp").write_bytes(b"killed mid-shard")
    generate(config(network, tmp_path / "resumed"))
    assert store_bytes(tmp_path / "resumed") == store_bytes(tmp_path / "straight")
    # Resuming with other settings is refused instead of mixing two generations.
    signal_after_shards(1, signal.SIGUSR1)  # SLURM's warning before the time limit stops it the same way
    assert generate(config(network, tmp_path / "other"))["signal"] == signal.SIGUSR1
    with pytest.raises(StoreError, match=r"different generation.*\n  provenance.seed: store has 0, this run has 1\n"):
        generate(config(network, tmp_path / "other", "seed=1"))


def test_batch_size_does_not_change_images(network, tmp_path):
    generate(config(network, tmp_path / "a", "batch_size=16"))
    generate(config(network, tmp_path / "b", "batch_size=3"))
    xa, ya = GeneratedStore(tmp_path / "a").get(np.arange(N))
    xb, yb = GeneratedStore(tmp_path / "b").get(np.arange(N))
    np.testing.assert_array_equal(ya, yb)
    # Convolutions may round differently at another batch size (≤1e-6 in the solver state), which can move a
    # pixel across a uint8 boundary: allow a difference of 1 on a tiny fraction of pixels.
    diff = np.abs(xa.astype(int) - xb.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@pytest.mark.slow
def test_two_processes_write_the_same_store(network, tmp_path):
    """Two gloo processes (Lightning Fabric, spawn) split the shards; the store equals the one-process store."""
    one = generate(config(network, tmp_path / "one"))
    two = generate(config(network, tmp_path / "two", "trainer.devices=2", "trainer.strategy=ddp_spawn"))
    assert two["shards"] == one["shards"]
    assert store_bytes(tmp_path / "two") == store_bytes(tmp_path / "one")


def test_classifier_filter_keeps_most_confident_per_class(network, tmp_path):
    from robustdiff.models.wrn import WideResNet

    torch.manual_seed(1)
    wrn = WideResNet(10, 1, num_classes=10, in_channels=1, mean=(0.2860,), std=(0.3530,))
    run = tmp_path / "classifier"
    run.mkdir()
    torch.save(wrn.state_dict(), run / "model.pt")
    (run / "run.json").write_text(json.dumps({"dataset": "fashionmnist"}))
    manifest = generate(config(network, tmp_path / "kept", "n=20", f"classifier={run}", "keep_fraction=0.5"))
    assert manifest["count"] == 20 and manifest["class_counts"] == [2] * 10
    assert manifest["provenance"]["filter"]["candidates_n"] == 40 and manifest["provenance"]["n"] == 20
    candidates = GeneratedStore(tmp_path / "kept-candidates")
    cx, cy = candidates.get(np.arange(40))
    with torch.no_grad():
        p = wrn.eval()(torch.from_numpy(cx).permute(0, 3, 1, 2).float() / 255).softmax(1)
    conf = p[torch.arange(40), torch.from_numpy(cy)].numpy()
    expected = np.sort(np.concatenate([np.flatnonzero(cy == c)[np.argsort(-conf[cy == c], kind="stable")[:2]]
                                       for c in range(10)]))
    kx, ky = GeneratedStore(tmp_path / "kept").get(np.arange(20))
    np.testing.assert_array_equal(kx, cx[expected])
    np.testing.assert_array_equal(ky, cy[expected])
    # Selecting from a store generated earlier without selection (the same generation) samples nothing new and
    # keeps the same images as selecting from its own candidates.
    raw = tmp_path / "raw"
    generate(config(network, raw, "n=40"))
    np.testing.assert_array_equal(GeneratedStore(raw).get(np.arange(40))[0], cx)
    generate(config(network, tmp_path / "from-raw", "n=20", f"classifier={run}", "keep_fraction=0.5",
                    f"candidates={raw}"))
    np.testing.assert_array_equal(GeneratedStore(tmp_path / "from-raw").get(np.arange(20))[0], kx)
    assert not (tmp_path / "from-raw-candidates").exists()
    # A plain state dict needs dataset= for its normalisation.
    with pytest.raises(GenerationError, match="dataset=<name>"):
        generate(config(network, tmp_path / "k2", "n=20", f"classifier={run / 'model.pt'}", "keep_fraction=0.5"))


def test_bad_inputs(network, tmp_path):
    with pytest.raises(GenerationError, match="n=45 is not a multiple of the network's 10 classes.*n=40 or n=50"):
        generate(config(network, tmp_path / "x", "n=45"))
    with pytest.raises(GenerationError, match="generates 10 classes of 16×16×1 images but dataset cifar100 has 100"):
        generate(config(network, tmp_path / "x", "dataset=cifar100"))
    wrn = tmp_path / "model.pt"
    torch.save({"init_conv.weight": torch.zeros(16, 1, 3, 3)}, wrn)
    with pytest.raises(GenerationError, match="not an EDM network file"):
        generate(config(wrn, tmp_path / "x"))
    ckpt = tmp_path / "evil.pt"
    torch.save({"kwargs": object()}, ckpt)  # needs full unpickling: refused
    with pytest.raises(GenerationError, match="refuses to unpickle"):
        generate(config(ckpt, tmp_path / "x"))
    with pytest.raises(GenerationError, match="no such file"):
        generate(config(tmp_path / "missing.pt", tmp_path / "x"))
    with pytest.raises(GenerationError, match="needs a classifier"):
        generate(config(network, tmp_path / "x", "keep_fraction=0.5"))
    assert not (tmp_path / "x").exists()


def test_cli(network, tmp_path, monkeypatch, capsys):
    from robustdiff.cli.generate import main

    monkeypatch.chdir(tmp_path)
    args = ["robustdiff-generate", f"network={network}", "n=20", "out=cli", "steps=2", "seed=0", "batch_size=256",
            "shard_size=8"]
    monkeypatch.setattr(sys, "argv", args)
    mine = logging.getLogger("a-caller-of-generate")  # run in-process, it leaves the caller's loggers working
    main()
    assert "img/s" in capsys.readouterr().out
    assert not mine.disabled and not logging.getLogger("robustdiff.eval").disabled
    assert GeneratedStore(tmp_path / "cli").class_counts == [2] * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # Hydra wrote nothing else
    monkeypatch.setattr(sys, "argv", [*args[:3], "n=7", "out=bad"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "not a multiple" in capsys.readouterr().err


def test_shards_are_written_on_a_background_thread(network, tmp_path, monkeypatch):
    """Shard b is written by the writer thread while the main thread samples shard b+1."""
    import threading

    import robustdiff.diffusion.shards as gen
    from robustdiff.diffusion import sampler

    real_write, real_sample = gen.write_block, sampler.sample_images
    writes, sample_threads = [], set()
    sampling_shard_1 = threading.Event()

    def recording_write(target, block, images, labels):
        # Shard 0's write waits (bounded) until the main thread samples shard 1: it only returns True if they overlap.
        overlapped = sampling_shard_1.wait(timeout=60) if block == 0 else None
        writes.append((block, threading.current_thread().name, overlapped))
        real_write(target, block, images, labels)

    def recording_sample(net, indices, *args, **kwargs):
        sample_threads.add(threading.current_thread().name)
        if SHARD <= indices[0] < 2 * SHARD:
            sampling_shard_1.set()
        return real_sample(net, indices, *args, **kwargs)

    monkeypatch.setattr(gen, "write_block", recording_write)
    monkeypatch.setattr(sampler, "sample_images", recording_sample)  # run_generation imports it at call time
    generate(config(network, tmp_path / "s"))
    assert [w[0] for w in writes] == [0, 1, 2]
    assert all(w[1].startswith("shard-writer") for w in writes)
    assert writes[0][2] is True  # shard 0 was being written while shard 1 sampled
    assert sample_threads == {threading.main_thread().name}
    assert verify_store(tmp_path / "s") == []


def test_a_failed_shard_write_stops_the_job_and_keeps_earlier_shards(network, tmp_path, monkeypatch):
    import robustdiff.diffusion.shards as gen
    from robustdiff.data.store import finished_blocks

    real = gen.write_block

    def failing_write(target, block, images, labels):
        if block == 1:
            raise OSError(28, "No space left on device")
        real(target, block, images, labels)

    monkeypatch.setattr(gen, "write_block", failing_write)
    with pytest.raises(OSError, match="No space left"):
        generate(config(network, tmp_path / "s"))
    assert list(finished_blocks(tmp_path / "s")) == [0]
    monkeypatch.setattr(gen, "write_block", real)
    generate(config(network, tmp_path / "s"))  # the rerun finishes the store
    generate(config(network, tmp_path / "ref"))
    assert store_bytes(tmp_path / "s") == store_bytes(tmp_path / "ref")


@pytest.mark.slow
def test_compiled_network_gives_the_same_images(network, tmp_path):
    """compile=true compiles the U-Net: float32 round-off only, so a pixel may move by one uint8 level."""
    from torch._dynamo.utils import counters

    generate(config(network, tmp_path / "eager"))
    counters.clear()
    generate(config(network, tmp_path / "compiled", "compile=true"))
    assert counters["stats"]["unique_graphs"] >= 1  # the U-Net really ran compiled
    xa, ya = GeneratedStore(tmp_path / "eager").get(np.arange(N))
    xb, yb = GeneratedStore(tmp_path / "compiled").get(np.arange(N))
    np.testing.assert_array_equal(ya, yb)
    diff = np.abs(xa.astype(int) - xb.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("precision,max_diff", [("bf16", 8), ("fp16", 4)])
def test_reduced_precision_images_stay_close_to_fp32(network, tmp_path, precision, max_diff):
    """The U-Net under bf16/fp16 autocast with the float64 solver: same labels, pixels within a stated bound of
    the fp32 store (uint8 levels; measured on this random network: bf16 2 (mean 0.10), fp16 1 (mean 0.013))."""
    generate(config(network, tmp_path / "fp32"))
    generate(config(network, tmp_path / precision, f"precision={precision}"))
    xa, ya = GeneratedStore(tmp_path / "fp32").get(np.arange(N))
    xb, yb = GeneratedStore(tmp_path / precision).get(np.arange(N))
    np.testing.assert_array_equal(ya, yb)
    diff = np.abs(xa.astype(int) - xb.astype(int))
    assert diff.mean() < 0.5
    assert 0 < diff.max() <= max_diff  # reduced precision really ran, and stayed close
    assert GeneratedStore(tmp_path / precision).manifest["provenance"]["sampler"]["precision"] == precision
    # robustdiff-train's spelling of the same precision gives the same store (and finds the first one complete)
    lightning = {"bf16": "bf16-mixed", "fp16": "16-mixed"}[precision]
    generate(config(network, tmp_path / "lightning", f"precision={lightning}"))
    xc, _ = GeneratedStore(tmp_path / "lightning").get(np.arange(N))
    np.testing.assert_array_equal(xb, xc)
    assert GeneratedStore(tmp_path / "lightning").manifest["provenance"] == \
        GeneratedStore(tmp_path / precision).manifest["provenance"]
