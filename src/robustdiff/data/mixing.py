"""Which real and which generated images go into each batch (docs/method.md, "Data and the mixing ratio").

`MixedBatchPlan` is a pure function of (epoch, step): a resumed run needs only those two numbers
to draw exactly the batches an uninterrupted run would have drawn, on any number of ranks.

- Every global batch of size B holds `n_gen_per_batch = int(B·(1 − ratio))` generated images and
  `n_real_per_batch = B − n_gen_per_batch` real ones (`ratio` = fraction of real images).
- Real images: epoch e reads fresh permutations of range(n_real), seeded by (seed, e, k) for
  k = 0, 1, ..., in chunks of `n_real_per_batch`. What happens where a permutation runs out
  (only when an epoch needs more real images than n_real: no or few generated images) is `last_batch`:
  - `reference` (the default, as the authors' sampler): the permutation's last chunk is short
    (n_real mod n_real_per_batch images) and the next batch starts a fresh permutation. With generated
    data that batch is topped up with generated images, so it is still full; without, it is short.
    CIFAR-10, no generated data, B = 512: 95 × 512, 1 × 336, then 2 × 512 from the next permutation.
  - `fill`: the stream continues into the next permutation, so every batch is full (98 × 512).
  The two agree whenever n_real_per_batch divides n_real or an epoch never reaches a permutation's end
  (the paper's generated-data recipes).
- Generated images, `with_replacement` (the reference): uniform draws seeded by (seed, e, step).
  `permutation`: one permutation of the whole store per pass, seeded by (seed, pass), read in order
  across epoch boundaries, so every generated image is seen once per pass.
- Under DDP each rank takes a disjoint, contiguous share of the global batch; the union over
  ranks is exactly the global batch. A short batch (no generated data) is split as evenly as possible
  (sizes differ by at most one); every rank takes a step at every batch, so DDP never waits on a rank.
  DDP averages the ranks' batch-mean losses, so where a short batch does not divide evenly its images
  weigh very slightly unequally (one process would weigh them equally); a short batch smaller than the
  number of processes is refused (use `fill`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from ..conf.schema import choices

GENERATED_SAMPLING = choices("generated_sampling")
LAST_BATCH = choices("last_batch")

# Distinct stream tags so real and generated draws never share a seed.
_TAG_REAL = 0x5EA1
_TAG_GEN_DRAW = 0x6E40
_TAG_GEN_PERM = 0x6E41

_REAL_CACHE = 4  # permutations of the real set kept (a few MB each)
_GEN_CACHE = 2  # whole-store permutations kept (the current pass and the next: 200 MB each at 50M)


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def _permutation(n: int, rng: np.random.Generator) -> np.ndarray:
    # int32 halves the memory of a 50M permutation; Fisher–Yates gives the same order for any dtype.
    perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    rng.shuffle(perm)
    return perm


def generated_per_batch(batch_size: int, ratio: float) -> int:
    """int(B·(1 − ratio)), guarded against float round-off (1 − 0.9 = 0.0999…: 10·0.0999… must give 1)."""
    return math.floor(batch_size * (1.0 - ratio) + 1e-9)


class MixedBatchPlan:
    """Index plan of mixed real/generated batches.

    n_real: real training images (after the validation split); n_generated: images in the store
    (0 = no generated data); batch_size: the GLOBAL batch B; ratio in [0, 1]: fraction of real images;
    iterations_per_epoch: ceil(N_base / B), given by the caller; seed >= 0; last_batch: "reference"
    or "fill" (see the module docstring).
    """

    def __init__(
        self,
        n_real: int,
        n_generated: int,
        batch_size: int,
        ratio: float,
        iterations_per_epoch: int,
        seed: int,
        generated_sampling: str = "with_replacement",
        last_batch: str = "reference",
    ):
        for name, value in (("n_real", n_real), ("n_generated", n_generated)):
            if int(value) != value or value < 0:
                raise ValueError(f"mixing: {name} must be an integer >= 0, got {value!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"mixing: batch_size must be an integer >= 1, got {batch_size!r}")
        if int(iterations_per_epoch) != iterations_per_epoch or iterations_per_epoch < 1:
            raise ValueError(
                f"mixing: iterations_per_epoch must be an integer >= 1 (ceil(N_base / batch_size)), "
                f"got {iterations_per_epoch!r}"
            )
        if not (0.0 <= float(ratio) <= 1.0):
            raise ValueError(
                f"mixing: ratio (fraction of real images per batch) must be in [0, 1], got {ratio!r}"
            )
        if int(seed) != seed or seed < 0:
            raise ValueError(f"mixing: seed must be an integer >= 0, got {seed!r}")
        if generated_sampling not in GENERATED_SAMPLING:
            raise ValueError(
                f"mixing: generated_sampling must be one of {GENERATED_SAMPLING}, got {generated_sampling!r}"
            )
        if last_batch not in LAST_BATCH:
            raise ValueError(
                f"mixing: last_batch must be one of {LAST_BATCH} (reference: the authors' short or topped-up "
                f"batch where a permutation of the real images ends; fill: continue into the next), got {last_batch!r}"
            )
        self.n_real = int(n_real)
        self.n_generated = int(n_generated)
        self.batch_size = int(batch_size)
        self.ratio = float(ratio)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.seed = int(seed)
        self.generated_sampling = generated_sampling
        self.last_batch = last_batch

        if self.n_generated > 0:
            self.n_gen_per_batch = generated_per_batch(self.batch_size, self.ratio)
        else:
            if self.ratio == 0.0:
                raise ValueError(
                    "mixing: ratio = 0 means all-generated batches, but there is no generated data "
                    "(n_generated = 0) — set a generated store or a ratio > 0"
                )
            self.n_gen_per_batch = 0
        self.n_real_per_batch = self.batch_size - self.n_gen_per_batch
        if self.n_real_per_batch > 0 and self.n_real == 0:
            raise ValueError(
                f"mixing: each batch needs {self.n_real_per_batch} real images but n_real = 0 — "
                f"use ratio = 0 (all generated) or provide real data"
            )
        # last_batch=reference: each permutation of the real set gives `_chunks` batches, the last of them
        # with `_short` real images (0: no short chunk) and, with generated data, `_top_up` extra generated.
        r = self.n_real_per_batch
        self._chunks = -(-self.n_real // r) if r else 0
        self._short = self.n_real % r if (r and last_batch == "reference") else 0
        self._top_up = (r - self._short) if (self._short and self.n_gen_per_batch) else 0
        self._real_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._gen_cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"MixedBatchPlan(B={self.batch_size}: {self.n_real_per_batch} real of {self.n_real} + "
            f"{self.n_gen_per_batch} generated of {self.n_generated} ({self.generated_sampling}), "
            f"{self.iterations_per_epoch} it/epoch, last_batch={self.last_batch}, seed={self.seed})"
        )

    def __getstate__(self) -> dict:
        # Caches can be hundreds of MB; workers rebuild what they need.
        state = self.__dict__.copy()
        state["_real_cache"] = OrderedDict()
        state["_gen_cache"] = OrderedDict()
        return state

    # -- streams -----------------------------------------------------------------------------

    def _real_perm(self, epoch: int, k: int) -> np.ndarray:
        key = (epoch, k)
        perm = self._real_cache.get(key)
        if perm is None:
            perm = _permutation(self.n_real, _rng(self.seed, _TAG_REAL, epoch, k))
            self._real_cache[key] = perm
            while len(self._real_cache) > _REAL_CACHE:
                self._real_cache.popitem(last=False)
        else:
            self._real_cache.move_to_end(key)
        return perm

    def _gen_perm(self, pass_: int) -> np.ndarray:
        perm = self._gen_cache.get(pass_)
        if perm is None:
            perm = _permutation(self.n_generated, _rng(self.seed, _TAG_GEN_PERM, pass_))
            self._gen_cache[pass_] = perm
            while len(self._gen_cache) > _GEN_CACHE:
                self._gen_cache.popitem(last=False)
        else:
            self._gen_cache.move_to_end(pass_)
        return perm

    @staticmethod
    def _take(stream, n_items: int, start: int, count: int) -> np.ndarray:
        """Items [start, start+count) of the concatenation stream(0), stream(1), ... each of length n_items."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        pos = start
        while filled < count:
            k, offset = divmod(pos, n_items)
            take = min(count - filled, n_items - offset)
            out[filled : filled + take] = stream(k)[offset : offset + take]
            filled += take
            pos += take
        return out

    def _check(self, epoch: int, step: int) -> None:
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"mixing: epoch must be an integer >= 0, got {epoch!r}")
        if int(step) != step or not (0 <= step < self.iterations_per_epoch):
            raise ValueError(f"mixing: step must be in [0, {self.iterations_per_epoch}), got {step!r}")

    # -- public ------------------------------------------------------------------------------

    def step_counts(self, step: int) -> tuple[int, int]:
        """(real, generated) images in global batch `step` of any epoch. (n_real_per_batch, n_gen_per_batch)
        except, with last_batch=reference, at the end of a permutation of the real set: a short real chunk,
        topped up with generated images when there are any."""
        self._check(0, step)
        if self._short and int(step) % self._chunks == self._chunks - 1:
            return self._short, self.n_gen_per_batch + self._top_up
        return self.n_real_per_batch, self.n_gen_per_batch

    def smallest_batch(self) -> int:
        """The smallest global batch of an epoch: batch_size, or a short batch (no generated data,
        last_batch=reference, an epoch that reaches the end of a permutation)."""
        if self._short and not self.n_gen_per_batch and self.iterations_per_epoch >= self._chunks:
            return self._short
        return self.batch_size

    def global_batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(real indices in [0, n_real), generated indices in [0, n_generated)), int64, of the lengths
        `step_counts(step)`, for batch `step` of epoch `epoch`."""
        self._check(epoch, step)
        epoch, step = int(epoch), int(step)
        r = self.n_real_per_batch
        n_real, g = self.step_counts(step)
        if r == 0:
            real = np.empty(0, dtype=np.int64)
        elif self.last_batch == "reference":
            k, chunk = divmod(step, self._chunks)
            real = self._real_perm(epoch, k)[chunk * r : chunk * r + n_real].astype(np.int64)
        else:
            real = self._take(lambda k: self._real_perm(epoch, k), self.n_real, step * r, r)
        if g == 0:
            gen = np.empty(0, dtype=np.int64)
        elif self.generated_sampling == "with_replacement":
            gen = _rng(self.seed, _TAG_GEN_DRAW, epoch, step).integers(
                0, self.n_generated, size=g, dtype=np.int64
            )
        else:
            # Generated images before this batch: n_gen_per_batch per batch plus the top-ups of the short
            # chunks so far (batch c−1, 2c−1, ... of each epoch, c = batches per permutation).
            start = (epoch * self.iterations_per_epoch + step) * self.n_gen_per_batch
            if self._top_up:
                start += self._top_up * (epoch * (self.iterations_per_epoch // self._chunks) + step // self._chunks)
            gen = self._take(self._gen_perm, self.n_generated, start, g)
        return real, gen

    def rank_counts(self, rank: int, world_size: int, step: int | None = None) -> tuple[int, int]:
        """(real, generated) images of `rank`'s share of global batch `step` (None: a full batch). Shares
        differ by at most one image in size and in generated count; a full batch gives batch_size / world_size
        to every rank."""
        if int(world_size) != world_size or world_size < 1:
            raise ValueError(f"mixing: world_size must be an integer >= 1, got {world_size!r}")
        if int(rank) != rank or not (0 <= rank < world_size):
            raise ValueError(f"mixing: rank must be in [0, {world_size}), got {rank!r}")
        if self.batch_size % world_size:
            raise ValueError(
                f"mixing: the global batch_size {self.batch_size} is not divisible by world_size "
                f"{world_size} — choose a batch size that is a multiple of the number of processes"
            )
        smallest = self.smallest_batch()
        if smallest < world_size:
            raise ValueError(
                f"mixing: batch {self._chunks - 1} of every epoch holds only {smallest} real images (last_batch="
                f"reference: the end of a permutation of the {self.n_real} real images, as the reference) and "
                f"cannot give each of the {world_size} processes one — use last_batch=fill, or a batch_size with "
                f"{self.n_real} mod batch_size >= {world_size}"
            )
        real, g = (self.n_real_per_batch, self.n_gen_per_batch) if step is None else self.step_counts(step)
        total, w = real + g, world_size
        size = total // w + (rank < total % w)
        gen = g // w + (rank < g % w)
        return size - gen, gen

    def rank_batch(self, epoch: int, step: int, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's disjoint share of `global_batch(epoch, step)`: contiguous slices of its real
        and generated parts, so the union over ranks is the global batch exactly."""
        real_start, gen_start, n_real, n_gen = self.rank_slices(step, rank, world_size)
        real, gen = self.global_batch(epoch, step)
        return real[real_start : real_start + n_real], gen[gen_start : gen_start + n_gen]

    def rank_slices(self, step: int, rank: int, world_size: int) -> tuple[int, int, int, int]:
        """(real start, generated start, real count, generated count) of `rank`'s share of batch `step`."""
        self.rank_counts(rank, world_size, step)  # validates rank, world_size and step
        counts = [self.rank_counts(q, world_size, step) for q in range(world_size)]
        real_start = sum(c[0] for c in counts[:rank])
        gen_start = sum(c[1] for c in counts[:rank])
        return real_start, gen_start, *counts[rank]

    def epoch_batches(
        self, epoch: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """rank_batch(epoch, s, rank, world_size) for s = start_step .. iterations_per_epoch − 1."""
        for step in range(int(start_step), self.iterations_per_epoch):
            yield self.rank_batch(epoch, step, rank, world_size)
