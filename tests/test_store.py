"""Generated-data store: round trips, .npz import/export, damage detection, resumable writes, CLI."""

from __future__ import annotations

import itertools
import json
import tracemalloc
import zipfile

import numpy as np
import pytest

from robustdiff.cli.store import main as store_cli
from robustdiff.data.store import (
    MANIFEST,
    GeneratedStore,
    NpyMember,
    StoreError,
    StoreWriter,
    export_npz,
    import_npz,
    iter_npz_array,
    verify_store,
)

SHAPE = (8, 8, 3)


def make_data(n: int, shape=SHAPE, num_classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, num_classes, n)


def write_store(path, images, labels, shard_size=300, pieces=(0, 137, 450, 451, 999), num_classes=10):
    with StoreWriter(
        path, images.shape[1:], num_classes, shard_size=shard_size, provenance={"who": "test"}
    ) as w:
        bounds = [p for p in pieces if p < len(labels)] + [len(labels)]
        for a, b in itertools.pairwise(bounds):
            w.append(images[a:b], labels[a:b])
        assert w.count == len(labels)
    return GeneratedStore(path)


def store_files(path):
    return sorted(p.name for p in path.iterdir())


def test_round_trip_multiple_shards_and_gathers(tmp_path):
    images, labels = make_data(1000)
    store = write_store(tmp_path / "s", images, labels)
    m = store.manifest
    assert len(store) == 1000 and m["complete"] and m["count"] == 1000
    assert [s["count"] for s in m["shards"]] == [300, 300, 300, 100]  # last shard short
    assert store.image_shape == SHAPE and store.num_classes == 10
    assert store.class_counts == np.bincount(labels, minlength=10).tolist()
    assert store.provenance == {"who": "test"}
    rng = np.random.default_rng(1)
    for idx in (
        rng.integers(0, 1000, 4000),
        np.array([999, 0, 0, 299, 300, 999]),
        np.arange(1000)[::-1],
        np.array([], dtype=np.int64),
    ):
        x, y = store.get(idx)
        assert x.dtype == np.uint8 and y.dtype == np.int64 and x.shape == (len(idx), *SHAPE)
        np.testing.assert_array_equal(x, images[idx])
        np.testing.assert_array_equal(y, labels[idx])
    np.testing.assert_array_equal(store.labels(), labels)
    with pytest.raises(IndexError):
        store.get(np.array([1000]))
    with pytest.raises(IndexError):
        store.get(np.array([-1]))
    assert verify_store(tmp_path / "s") == []
    assert not any(name.endswith(".tmp") or name == ".writer.lock" for name in store_files(tmp_path / "s"))


def test_few_open_shards_and_pickle(tmp_path):
    import pickle

    images, labels = make_data(500)
    write_store(tmp_path / "s", images, labels, shard_size=50)
    store = GeneratedStore(tmp_path / "s", max_open_shards=2)
    idx = np.random.default_rng(0).integers(0, 500, 700)
    np.testing.assert_array_equal(store.get(idx)[0], images[idx])
    assert len(store._maps) <= 2
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.get(idx)[1], labels[idx])


def test_writer_rejects_bad_input(tmp_path):
    w = StoreWriter(tmp_path / "s", SHAPE, 10)
    with pytest.raises(StoreError, match="uint8"):
        w.append(np.zeros((2, *SHAPE), np.float32), np.zeros(2, int))
    with pytest.raises(StoreError, match="8, 8, 3"):
        w.append(np.zeros((2, 8, 8, 1), np.uint8), np.zeros(2, int))
    with pytest.raises(StoreError, match=r"\[0, 10\)"):
        w.append(np.zeros((2, *SHAPE), np.uint8), np.array([0, 10]))
    w.close()


def test_complete_store_is_never_overwritten(tmp_path):
    images, labels = make_data(100)
    write_store(tmp_path / "s", images, labels)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    with pytest.raises(StoreError, match="already complete"):
        StoreWriter(tmp_path / "s", SHAPE, 10)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        StoreWriter(tmp_path / "other", SHAPE, 10)


def test_interrupted_write_resumes_to_identical_store(tmp_path):
    images, labels = make_data(1000)
    reference = write_store(tmp_path / "ref", images, labels)

    path = tmp_path / "s"
    w = StoreWriter(path, SHAPE, 10, shard_size=300, provenance={"who": "test"})
    w.append(images[:700], labels[:700])  # two finished shards + 100 in the open shard
    assert w.count == 700 and w.finished_count == 600
    del w  # abandoned without finalize or close: the open shard's temporaries stay behind, as after a crash
    (path / ".shard-00002.images.u8.crashed.tmp").write_bytes(b"half a shard")
    (path / "user-notes.txt").write_text("not ours")

    with pytest.raises(StoreError, match="incomplete.*resume"):
        GeneratedStore(path)
    assert json.loads((path / MANIFEST).read_text())["complete"] is False
    assert any("incomplete" in p for p in verify_store(path))
    with pytest.raises(StoreError, match="partial store holds 8×8×3 images of 10 classes"):
        StoreWriter(path, (8, 8, 1), 10)

    w = StoreWriter(path, SHAPE, 10, shard_size=300)
    assert w.count == 600
    assert not any(n.endswith(".tmp") for n in store_files(path))  # its own temporaries cleaned
    assert (path / "user-notes.txt").read_text() == "not ours"  # anything else left alone
    w.append(images[600:], labels[600:])
    w.finalize()
    store = GeneratedStore(path)
    assert store.manifest["shards"] == reference.manifest["shards"]  # same bytes, same checksums
    assert store.class_counts == reference.class_counts
    np.testing.assert_array_equal(store.get(np.arange(1000))[0], images)


def test_second_writer_is_refused_while_one_writes(tmp_path):
    first = StoreWriter(tmp_path / "s", SHAPE, 10)
    with pytest.raises(StoreError, match="another process is writing"):
        StoreWriter(tmp_path / "s", SHAPE, 10)
    first.close()
    StoreWriter(tmp_path / "s", SHAPE, 10).finalize()  # free again once the first has stopped
    assert len(GeneratedStore(tmp_path / "s")) == 0


def test_exception_inside_writer_keeps_store_partial(tmp_path):
    images, labels = make_data(400)
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "s", SHAPE, 10, shard_size=300) as w:
        w.append(images, labels)
        raise RuntimeError("generator died")
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert m["complete"] is False and m["count"] == 300
    assert not any(n.endswith(".tmp") for n in store_files(tmp_path / "s"))


def test_truncated_shard_is_named_when_opening(tmp_path):
    images, labels = make_data(700)
    write_store(tmp_path / "s", images, labels)
    shard = tmp_path / "s" / "shard-00001.images.u8"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(StoreError, match="shard-00001.images.u8.*truncated"):
        GeneratedStore(tmp_path / "s")
    (tmp_path / "s" / "shard-00002.labels.i64").unlink()
    problems = verify_store(tmp_path / "s")
    assert any("shard-00001.images.u8" in p for p in problems)
    assert any("shard-00002.labels.i64" in p and "missing" in p for p in problems)


def test_corrupted_shard_is_named_by_verify(tmp_path):
    images, labels = make_data(700)
    write_store(tmp_path / "s", images, labels)
    shard = tmp_path / "s" / "shard-00001.images.u8"
    data = bytearray(shard.read_bytes())
    data[1234] ^= 0xFF
    shard.write_bytes(bytes(data))
    GeneratedStore(tmp_path / "s")  # opening is fast: sizes only
    problems = verify_store(tmp_path / "s")
    assert len(problems) == 1 and "shard-00001.images.u8" in problems[0] and "sha256" in problems[0]


def test_check_compatible_names_manifest(tmp_path):
    images, labels = make_data(50, shape=(28, 28, 1))
    store = write_store(tmp_path / "gen", images, labels)
    store.check_compatible((28, 28, 1), 10, "fashionmnist")
    manifest = str(tmp_path / "gen" / MANIFEST)
    with pytest.raises(StoreError) as e:
        store.check_compatible((32, 32, 3), 10, "cifar10")
    assert manifest in str(e.value) and "28×28×1" in str(e.value) and "cifar10 is 32×32×3" in str(e.value)
    with pytest.raises(StoreError, match="10 classes but dataset cifar100 has 100"):
        store.check_compatible((28, 28, 1), 100, "cifar100")


@pytest.mark.parametrize("compressed", [False, True])
def test_chunked_npz_reader_matches_np_load(tmp_path, compressed):
    images, labels = make_data(257)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "a.npz", image=images, label=labels)
    chunks = list(iter_npz_array(tmp_path / "a.npz", "image", chunk=20))
    assert [len(c) for c in chunks] == [20] * 12 + [17]
    np.testing.assert_array_equal(np.concatenate(chunks), images)
    with NpyMember(tmp_path / "a.npz", "label") as member:
        member.skip(100)
        np.testing.assert_array_equal(member.read(1000), labels[100:])
    with pytest.raises(StoreError, match="has no array 'images'"):
        NpyMember(tmp_path / "a.npz", "images")


@pytest.mark.parametrize("compressed", [False, True])
def test_import_streams_without_loading_whole_array(tmp_path, compressed):
    images, labels = make_data(4000, shape=(32, 32, 3))  # 12 MB of images
    (np.savez_compressed if compressed else np.savez)(tmp_path / "big.npz", image=images, label=labels)
    tracemalloc.start()
    try:
        import_npz([tmp_path / "big.npz"], tmp_path / "s", shard_size=1500, progress=False, chunk=128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    chunk_bytes = 128 * images[0].nbytes  # 393 KB; zipfile's read buffers cost a few copies of it
    assert peak < min(8 * chunk_bytes, images.nbytes / 4), f"import peaked at {peak} bytes"
    store = GeneratedStore(tmp_path / "s")
    np.testing.assert_array_equal(store.get(np.arange(4000))[0], images)


def test_import_multi_part_export_round_trip(tmp_path):
    images, labels = make_data(900)
    np.savez(tmp_path / "part1.npz", image=images[:400], label=labels[:400])
    np.savez_compressed(tmp_path / "part2.npz", image=images[400:], label=labels[400:].astype(np.int32))
    parts = [tmp_path / "part1.npz", tmp_path / "part2.npz"]
    m = import_npz(parts, tmp_path / "s", shard_size=250, progress=False, chunk=64)
    assert m["count"] == 900 and m["num_classes"] == 10
    assert [f["count"] for f in m["provenance"]["npz_files"]] == [400, 500]
    assert m["provenance"]["npz_files"][1]["path"].endswith("part2.npz")
    store = GeneratedStore(tmp_path / "s")
    x, y = store.get(np.arange(900))
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)

    export_npz(tmp_path / "s", tmp_path / "out.npz", progress=False)
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_array_equal(z["image"], images)
        np.testing.assert_array_equal(z["label"], labels)
    with zipfile.ZipFile(tmp_path / "out.npz") as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_interrupted_import_resumes(tmp_path):
    images, labels = make_data(900)
    np.savez(tmp_path / "p1.npz", image=images[:400], label=labels[:400])
    np.savez(tmp_path / "p2.npz", image=images[400:], label=labels[400:])
    parts = [tmp_path / "p1.npz", tmp_path / "p2.npz"]
    reference = import_npz(parts, tmp_path / "ref", shard_size=250, progress=False)

    # Simulate a crash after three finished shards: write them with a writer carrying the same provenance.
    partial = tmp_path / "s"
    w = StoreWriter(partial, SHAPE, 10, shard_size=250, provenance=reference["provenance"])
    w.append(images[:800], labels[:800])
    w.close()
    assert json.loads((partial / MANIFEST).read_text())["count"] == 750
    with pytest.raises(StoreError, match="partial import of other files"):
        import_npz([tmp_path / "p2.npz"], partial, shard_size=250, progress=False)
    m = import_npz(parts, partial, shard_size=250, progress=False, chunk=70)
    assert m["shards"] == reference["shards"]
    with pytest.raises(StoreError, match="already complete"):
        import_npz(parts, partial, shard_size=250, progress=False)


def test_cli_import_info_verify_export(tmp_path, capsys):
    images, labels = make_data(300)
    np.savez_compressed(tmp_path / "a.npz", image=images, label=labels)
    store = tmp_path / "s"
    assert (
        store_cli(
            [
                "import",
                str(tmp_path / "a.npz"),
                "--out",
                str(store),
                "--shard-size",
                "128",
                "--num-classes",
                "10",
                "--no-progress",
            ]
        )
        == 0
    )
    assert store_cli(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "300" in out and "8×8×3" in out and "complete    True" in out
    assert store_cli(["info", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 300
    assert store_cli(["verify", str(store), "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out
    assert store_cli(["export", str(store), "--out", str(tmp_path / "b.npz"), "--no-progress"]) == 0
    with np.load(tmp_path / "b.npz") as z:
        np.testing.assert_array_equal(z["image"], images)
    capsys.readouterr()
    # The older positional spelling still works, with a note naming the new one.
    assert store_cli(["export", str(store), str(tmp_path / "c.npz"), "--no-progress"]) == 0
    assert "--out" in capsys.readouterr().err and (tmp_path / "c.npz").is_file()
    with pytest.raises(SystemExit):  # no output file at all
        store_cli(["export", str(store)])
    assert "--out OUT.npz" in capsys.readouterr().err

    shard = store / "shard-00002.labels.i64"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert store_cli(["verify", str(store), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "shard-00002.labels.i64" in err and "sha256" in err

    assert store_cli(["info", str(tmp_path / "nowhere")]) == 1
    assert "no manifest" in capsys.readouterr().err
    assert store_cli(["import", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "t")]) == 1
    assert "missing.npz" in capsys.readouterr().err


def test_an_empty_npz_is_refused_and_an_empty_store_cannot_be_read(tmp_path, capsys):
    np.savez(tmp_path / "empty.npz", image=np.zeros((0, 8, 8, 3), np.uint8), label=np.zeros(0, np.int64))
    assert store_cli(["import", str(tmp_path / "empty.npz"), "--out", str(tmp_path / "s"), "--no-progress"]) != 0
    assert "no images to import" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    from conftest import TINY, compose_train
    from robustdiff.training.run import train

    with StoreWriter(tmp_path / "written", (28, 28, 1), 10) as w:  # a writer closed with nothing appended
        pass
    assert w.count == 0 and len(GeneratedStore(tmp_path / "written")) == 0  # a store can be empty...
    with pytest.raises(StoreError, match="holds no images, so no batch could hold the 70% generated"):
        train(compose_train(*TINY, f"generated={tmp_path / 'written'}", "ratio=0.3"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # ...but training on it is refused before anything starts


def test_channels_first_images_are_refused_with_the_conversion(tmp_path, capsys):
    np.savez(tmp_path / "nchw.npz", image=np.zeros((100, 1, 28, 28), np.uint8), label=np.zeros(100, np.int64))
    assert store_cli(["import", str(tmp_path / "nchw.npz"), "--out", str(tmp_path / "s"), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "channels-first" in err and "transpose(0, 2, 3, 1)" in err and "nchw.npz" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("bad", ["num_classes", "negative"])
def test_a_refused_import_leaves_nothing_so_the_corrected_command_works(bad, tmp_path, capsys):
    images, labels = make_data(200)
    if bad == "negative":
        labels = labels.copy()
        labels[150] = -1
    np.savez(tmp_path / "a.npz", image=images, label=labels)
    out = tmp_path / "s"
    first = ["import", str(tmp_path / "a.npz"), "--out", str(out), "--no-progress", "--shard-size", "64"]
    assert store_cli([*first, *(["--num-classes", "5"] if bad == "num_classes" else [])]) != 0
    err = capsys.readouterr().err
    assert ("--num-classes 10" in err) if bad == "num_classes" else ("negative" in err)
    assert not out.exists()
    if bad == "negative":
        labels[150] = 3
        np.savez(tmp_path / "a.npz", image=images, label=labels)
    assert store_cli(first) == 0
    assert len(GeneratedStore(out)) == 200


def _damage(manifest: dict, how: str):
    if how == "not-utf8":
        return b"\xff\xfe{\x00"
    if how == "a-list":
        return json.dumps([manifest]).encode()
    damaged = json.loads(json.dumps(manifest))
    if how == "count-text":
        damaged["count"] = "lots"
    elif how == "shape-short":
        damaged["image_shape"] = [28, 28]
    elif how == "shard-null":
        damaged["shards"][0] = None
    elif how == "shard-path-escapes":
        damaged["shards"][0]["images"] = "../../elsewhere.u8"
    elif how == "shards-object":
        damaged["shards"] = {"0": damaged["shards"][0]}
    return json.dumps(damaged).encode()


@pytest.mark.parametrize("how", ["not-utf8", "a-list", "count-text", "shape-short", "shard-null",
                                 "shard-path-escapes", "shards-object"])
def test_a_damaged_manifest_is_named_by_every_command_not_a_traceback(how, tmp_path, capsys):
    images, labels = make_data(40)
    store = tmp_path / "gen"
    write_store(store, images, labels, shard_size=16, pieces=(0, 40))
    mpath = store / MANIFEST
    mpath.write_bytes(_damage(json.loads(mpath.read_text()), how))
    with pytest.raises(StoreError) as e:
        GeneratedStore(store)
    message = str(e.value)
    assert str(mpath) in message and ("damaged" in message or "unreadable manifest" in message), message
    for command in (["info", str(store)], ["verify", str(store), "--no-progress"],
                    ["export", str(store), "--out", str(tmp_path / "out.npz"), "--no-progress"]):
        capsys.readouterr()
        assert store_cli(command) == 1, command
        err = capsys.readouterr().err
        assert str(mpath) in err and "Traceback" not in err, (command, err)
    assert not (tmp_path / "out.npz").exists()
    with pytest.raises(StoreError):  # nor may a writer append to it
        StoreWriter(store, SHAPE, 10)
