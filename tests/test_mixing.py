"""MixedBatchPlan: exact counts, epoch structure, DDP sharding, determinism, resume, permutation passes."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from robustdiff.data.mixing import MixedBatchPlan, generated_per_batch


def plan(**kw):
    args = {"n_real": 1000, "n_generated": 5000, "batch_size": 64, "ratio": 0.3, "iterations_per_epoch": 16}
    args["seed"] = 0
    args.update(kw)
    return MixedBatchPlan(**args)


@pytest.mark.parametrize(
    "batch_size,ratio,expected_gen",
    [
        (512, 0.3, 358),
        (512, 0.0, 512),
        (512, 1.0, 0),
        (1024, 0.2, 819),
        (2048, 0.2, 1638),
        (100, 0.7, 30),
        (10, 0.9, 1),
        (7, 0.5, 3),
        (1000, 0.3, 700),
        (3, 0.34, 1),
    ],
)
def test_counts_per_batch(batch_size, ratio, expected_gen):
    for last_batch in ("fill", "reference"):
        p = plan(batch_size=batch_size, ratio=ratio, last_batch=last_batch)
        assert p.n_gen_per_batch == expected_gen == generated_per_batch(batch_size, ratio)
        assert p.n_real_per_batch == batch_size - expected_gen
        for epoch in (0, 3):
            for step in range(p.iterations_per_epoch):
                real, gen = p.global_batch(epoch, step)
                assert real.dtype == gen.dtype == np.int64
                assert (len(real), len(gen)) == p.step_counts(step)
                if last_batch == "fill" or len(real) == p.n_real_per_batch:
                    assert len(real) == p.n_real_per_batch and len(gen) == p.n_gen_per_batch
                if p.n_gen_per_batch:  # with generated data every batch is full, short real chunks topped up
                    assert len(real) + len(gen) == batch_size
                assert real.size == 0 or (real.min() >= 0 and real.max() < p.n_real)
                assert gen.size == 0 or (gen.min() >= 0 and gen.max() < p.n_generated)


def test_no_generated_data_means_all_real():
    p = plan(n_generated=0, ratio=0.3)
    assert (p.n_real_per_batch, p.n_gen_per_batch) == (64, 0)
    with pytest.raises(ValueError, match="no generated data"):
        plan(n_generated=0, ratio=0.0)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"batch_size": 0}, "batch_size"),
        ({"iterations_per_epoch": 0}, "iterations_per_epoch"),
        ({"seed": -1}, "seed"),
        ({"generated_sampling": "sometimes"}, "generated_sampling"),
        ({"n_real": 0}, "n_real = 0"),
        ({"n_real": -5}, "n_real"),
    ],
)
def test_invalid_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        plan(**kw)


def test_epoch_of_real_images_is_a_permutation_stream():
    # 50,000 CIFAR images less the 1024 validation images, batch 512, ratio 0.3: one epoch is
    # ceil(50000 / 512) = 98 batches of 154 real images = 15,092 real images, all distinct.
    n_real, batch = 50_000 - 1024, 512
    ipe = math.ceil(50_000 / batch)
    p = MixedBatchPlan(n_real, 1_000_000, batch, 0.3, ipe, seed=1)
    real = np.concatenate([p.global_batch(0, s)[0] for s in range(ipe)])
    assert len(real) == ipe * 154 and len(np.unique(real)) == len(real)
    # ratio 1, no generated data, last_batch=fill: 98 × 512 = 50,176 > 48,976, so the stream runs into a
    # second permutation; the first n_real items cover the real set exactly once.
    p = MixedBatchPlan(n_real, 0, batch, 1.0, ipe, seed=1, last_batch="fill")
    real = np.concatenate([p.global_batch(0, s)[0] for s in range(ipe)])
    assert len(real) == ipe * batch
    np.testing.assert_array_equal(np.sort(real[:n_real]), np.arange(n_real))
    assert len(np.unique(real[n_real:])) == len(real) - n_real


def test_real_set_smaller_than_a_batch():
    p = plan(n_real=10, batch_size=64, ratio=1.0, iterations_per_epoch=3)
    real = np.concatenate([p.global_batch(0, s)[0] for s in range(3)])
    for k in range(len(real) // 10):
        np.testing.assert_array_equal(np.sort(real[10 * k : 10 * k + 10]), np.arange(10))


def test_determinism():
    a, b = plan(seed=7), plan(seed=7)
    for epoch, step in [(0, 0), (0, 5), (2, 15)]:
        for x, y in zip(a.global_batch(epoch, step), b.global_batch(epoch, step)):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.global_batch(0, 0)[0], a.global_batch(1, 0)[0])  # new epoch, new order
    assert not np.array_equal(a.global_batch(0, 0)[1], a.global_batch(1, 0)[1])
    assert not np.array_equal(a.global_batch(0, 0)[0], plan(seed=8).global_batch(0, 0)[0])
    # real and generated streams use distinct seeds, even where their sizes agree
    same = plan(n_real=5000, n_generated=5000, ratio=0.5, batch_size=64)
    real, gen = same.global_batch(0, 0)
    assert not np.array_equal(real[:32], gen[:32])


@pytest.mark.parametrize("sampling", ["with_replacement", "permutation"])
def test_resume_equals_uninterrupted(sampling):
    p = plan(generated_sampling=sampling, n_generated=300)
    walked = [p.global_batch(e, s) for e in range(3) for s in range(p.iterations_per_epoch)]
    for e, s in [(2, 7), (1, 0), (0, 15), (2, 15)]:
        fresh = plan(generated_sampling=sampling, n_generated=300)
        real, gen = fresh.global_batch(e, s)
        np.testing.assert_array_equal(real, walked[e * p.iterations_per_epoch + s][0])
        np.testing.assert_array_equal(gen, walked[e * p.iterations_per_epoch + s][1])
    clone = pickle.loads(pickle.dumps(p))
    np.testing.assert_array_equal(clone.global_batch(2, 3)[1], walked[2 * 16 + 3][1])
    resumed = list(plan(generated_sampling=sampling, n_generated=300).epoch_batches(1, start_step=9))
    for s, (real, gen) in enumerate(resumed, start=9):
        np.testing.assert_array_equal(real, walked[16 + s][0])
        np.testing.assert_array_equal(gen, walked[16 + s][1])


def test_permutation_mode_covers_each_generated_image_once_per_pass():
    # 45 generated per batch, 10 batches per epoch: a pass of 1000 images ends inside epoch 2,
    # batch 2, so passes straddle epoch boundaries and one batch holds the end of one pass and
    # the start of the next.
    p = plan(
        n_generated=1000, batch_size=64, ratio=0.3, iterations_per_epoch=10, generated_sampling="permutation"
    )
    assert p.n_gen_per_batch == 44
    stream = np.concatenate([p.global_batch(e, s)[1] for e in range(5) for s in range(10)])
    assert len(stream) == 5 * 10 * 44
    for k in range(len(stream) // 1000):
        np.testing.assert_array_equal(np.sort(stream[1000 * k : 1000 * (k + 1)]), np.arange(1000))
    assert not np.array_equal(stream[:1000], stream[1000:2000])  # each pass is a fresh permutation


def test_with_replacement_is_uniform_draws():
    p = plan(n_generated=50, batch_size=1000, ratio=0.0, iterations_per_epoch=4)
    gen = np.concatenate([p.global_batch(0, s)[1] for s in range(4)])
    counts = np.bincount(gen, minlength=50)
    assert counts.min() > 40 and counts.max() < 120  # 80 expected per image
    assert len(np.unique(p.global_batch(0, 0)[1])) < 1000  # repeats within a batch are allowed


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("ratio", [0.3, 0.0, 1.0, 0.55])
def test_rank_sharding_is_disjoint_and_complete(world_size, ratio):
    # ratio 0.55: batch 15 ends a permutation (1000 mod 66 = 10 real, topped up with 56 generated)
    p = plan(batch_size=120, ratio=ratio, generated_sampling="permutation")
    for epoch, step in [(0, 0), (1, 9), (3, 15)]:
        real, gen = p.global_batch(epoch, step)
        shares = [p.rank_batch(epoch, step, r, world_size) for r in range(world_size)]
        sizes = [len(a) + len(b) for a, b in shares]
        assert sizes == [120 // world_size] * world_size
        gens = [len(b) for _, b in shares]
        assert max(gens) - min(gens) <= 1
        assert gens == [len(gen) // world_size + (r < len(gen) % world_size) for r in range(world_size)]
        # positions, not values: the concatenated shares are the global batch exactly (so disjoint)
        np.testing.assert_array_equal(np.concatenate([a for a, _ in shares]), real)
        np.testing.assert_array_equal(np.concatenate([b for _, b in shares]), gen)
        fresh = plan(batch_size=120, ratio=ratio, generated_sampling="permutation")
        np.testing.assert_array_equal(
            fresh.rank_batch(epoch, step, world_size - 1, world_size)[1], shares[-1][1]
        )


def test_rank_batch_errors():
    p = plan(batch_size=64)
    with pytest.raises(ValueError, match="not divisible by world_size 3"):
        p.rank_batch(0, 0, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        p.rank_batch(0, 0, 2, 2)
    with pytest.raises(ValueError, match="step"):
        p.global_batch(0, 16)
    with pytest.raises(ValueError, match="epoch"):
        p.global_batch(-1, 0)


def test_large_store_permutation_is_cached():
    import time

    p = MixedBatchPlan(48_976, 5_000_000, 512, 0.3, 98, seed=0, generated_sampling="permutation")
    p.global_batch(0, 0)  # builds the pass-0 permutation once
    t = time.perf_counter()
    for s in range(1, 98):
        p.global_batch(0, s)
    assert (time.perf_counter() - t) / 97 < 0.01, "consecutive batches must not rebuild the permutation"


# -- where a permutation of the real images ends (last_batch, docs/method.md, "Data and the mixing ratio") ----


def authors_sampler_sizes(n_real, batch_size, n_gen, num_batches):
    """(real, generated) per batch of the authors' SemiSupervisedSampler, modelled from its description: each
    fresh permutation of the real set is cut into chunks of B − n_gen (the last one short); with generated data
    a chunk is topped up to B; the epoch stops after num_batches, mid-permutation or not."""
    r, sizes = batch_size - n_gen, []
    while len(sizes) < num_batches:
        for start in range(0, n_real, r):
            if len(sizes) == num_batches:
                break
            real = min(r, n_real - start)
            sizes.append((real, batch_size - real if n_gen else 0))
    return sizes


@pytest.mark.parametrize(
    "n_real,batch_size,ratio,n_generated,ipe",
    [
        (50_000 - 1024, 512, 1.0, 0, 98),  # overfitting_cifar10_nogen
        (73_257 - 1024, 1024, 1.0, 0, 72),  # SVHN, no generated data
        (1000, 64, 0.7, 5000, 30),  # 45 real per batch: batch 22 is 1000 mod 45 = 10 real + 54 generated
        (1000, 120, 0.55, 5000, 40),  # several permutations per epoch
        (10, 64, 1.0, 0, 3),  # real set smaller than a batch: every batch is the whole set
        (960, 64, 1.0, 0, 20),  # 64 divides 960: nothing short
    ],
)
def test_reference_last_batch_follows_the_authors_sampler(n_real, batch_size, ratio, n_generated, ipe):
    p = MixedBatchPlan(n_real, n_generated, batch_size, ratio, ipe, seed=0)
    assert p.last_batch == "reference"  # the default
    expected = authors_sampler_sizes(n_real, batch_size, p.n_gen_per_batch, ipe)
    got = [tuple(len(a) for a in p.global_batch(1, s)) for s in range(ipe)]
    assert got == expected == [p.step_counts(s) for s in range(ipe)]
    # each permutation is read once, in order, and the batch after a short one starts a fresh permutation
    real = [p.global_batch(1, s)[0] for s in range(ipe)]
    chunks = -(-n_real // p.n_real_per_batch)
    for k in range(ipe // chunks):
        perm = np.concatenate(real[k * chunks : (k + 1) * chunks])
        np.testing.assert_array_equal(np.sort(perm), np.arange(n_real))


def test_cifar10_nogen_epoch_before_and_after():
    # 50,000 − 1,024 = 48,976 real images, ceil(50,000 / 512) = 98 batches. The reference: one permutation
    # gives 95 full batches and a short one of 48,976 − 95·512 = 336; the last 2 batches are the start of a
    # fresh permutation: 97 × 512 + 1 × 336 = 50,000 images (= N_base, as 1,024 = 2 × 512).
    n_real, ipe = 50_000 - 1024, 98
    ref = MixedBatchPlan(n_real, 0, 512, 1.0, ipe, seed=1)
    sizes = [len(ref.global_batch(0, s)[0]) for s in range(ipe)]
    assert sizes == [512] * 95 + [336] + [512] * 2 and sum(sizes) == 50_000
    assert ref.smallest_batch() == 336
    real = [ref.global_batch(0, s)[0] for s in range(ipe)]
    np.testing.assert_array_equal(np.sort(np.concatenate(real[:96])), np.arange(n_real))
    tail = np.concatenate(real[96:])
    assert len(np.unique(tail)) == 1024 and not np.array_equal(tail, np.concatenate(real[:2]))
    fill = MixedBatchPlan(n_real, 0, 512, 1.0, ipe, seed=1, last_batch="fill")
    assert [len(fill.global_batch(0, s)[0]) for s in range(ipe)] == [512] * 98
    # the two modes agree up to the end of the first permutation
    for s in range(95):
        np.testing.assert_array_equal(fill.global_batch(0, s)[0], real[s])


@pytest.mark.parametrize("sampling", ["with_replacement", "permutation"])
def test_reference_equals_fill_for_the_generated_data_recipes(sampling):
    # CIFAR-10 1M: 154 real per batch × 98 batches = 15,092 < 48,976: an epoch never reaches a
    # permutation's end, so the paper's generated-data runs draw exactly the batches they drew before.
    args = (50_000 - 1024, 1_000_000, 512, 0.3, 98)
    a = MixedBatchPlan(*args, seed=2, generated_sampling=sampling)
    b = MixedBatchPlan(*args, seed=2, generated_sampling=sampling, last_batch="fill")
    for e, s in [(0, 0), (0, 97), (3, 50)]:
        for x, y in zip(a.global_batch(e, s), b.global_batch(e, s)):
            np.testing.assert_array_equal(x, y)


def test_top_ups_keep_the_generated_pass_and_resume_exact():
    # 45 real per batch, 1000 mod 45 = 10: batch 22 of each epoch takes 35 extra generated images; the
    # whole-store permutation still yields each generated image once per pass, and a fresh plan (a resumed
    # run) draws the same batches.
    kw = {"n_generated": 700, "batch_size": 64, "ratio": 0.7, "iterations_per_epoch": 30,
          "generated_sampling": "permutation"}
    p = plan(**kw)
    assert p.n_real_per_batch == 45 and p.step_counts(22) == (10, 54) and p.step_counts(23) == (45, 19)
    walked = [p.global_batch(e, s) for e in range(4) for s in range(30)]
    stream = np.concatenate([g for _, g in walked])
    assert len(stream) == 4 * (30 * 19 + 35)
    for k in range(len(stream) // 700):
        np.testing.assert_array_equal(np.sort(stream[700 * k : 700 * (k + 1)]), np.arange(700))
    for e, s in [(3, 29), (2, 23), (1, 22), (0, 5)]:
        fresh = plan(**kw).global_batch(e, s)
        np.testing.assert_array_equal(fresh[0], walked[30 * e + s][0])
        np.testing.assert_array_equal(fresh[1], walked[30 * e + s][1])


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_short_batch_splits_across_ranks(world_size):
    # no generated data, 1000 mod 120 = 40: batch 8 (and 17, 26) hold 40 images
    p = plan(n_generated=0, ratio=1.0, batch_size=120, iterations_per_epoch=30)
    assert p.step_counts(8) == (40, 0) and p.smallest_batch() == 40
    for epoch, step in [(0, 8), (2, 17), (1, 9)]:
        real, _ = p.global_batch(epoch, step)
        shares = [p.rank_batch(epoch, step, r, world_size)[0] for r in range(world_size)]
        sizes = [len(a) for a in shares]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        np.testing.assert_array_equal(np.concatenate(shares), real)  # disjoint, and the whole batch
    # every rank takes a step at every batch (DDP never waits on a rank that ran out)
    counts = [len(list(p.epoch_batches(0, rank=r, world_size=world_size))) for r in range(world_size)]
    assert counts == [30] * world_size


def test_short_batch_smaller_than_the_world_is_refused():
    p = plan(n_real=962, n_generated=0, ratio=1.0, batch_size=120, iterations_per_epoch=10)
    assert p.smallest_batch() == 2
    p.rank_batch(0, 8, 1, 2)
    with pytest.raises(ValueError, match="holds only 2 real images.*last_batch=fill"):
        p.rank_batch(0, 0, 0, 4)
    fill = plan(n_real=962, n_generated=0, ratio=1.0, batch_size=120, iterations_per_epoch=10, last_batch="fill")
    assert len(fill.rank_batch(0, 8, 3, 4)[0]) == 30
    with pytest.raises(ValueError, match="last_batch"):
        plan(last_batch="drop")
