"""robustdiff-train's settings as a structured-config schema: every key's type, accepted values and bounds,
written once. ``training.config.validate`` walks it to check a composed config before any work, and the modules
that take these settings read their choice lists from here (``choices("loss")``). The values themselves (the
defaults) stay in train.yaml and its groups; every field here is MISSING.

Registered in Hydra's ConfigStore as ``train_schema``. Imports no torch: the command line answers a bad value at
once.

Field metadata (``setting(...)``):

* ``choices``: ``{value: what it means}``, in the order the error lists them (``None`` is written null);
* ``ge``/``gt``/``le``/``lt``: bounds of a number;
* ``example``: how a number is written (floats also accept fractions such as ``8/255``);
* ``help``: what the value means, quoted in its error; ``null``: what null means, for an Optional field.

A field typed ``Any`` is an open node (a Hydra group with free keys such as ``model``, ``data``, ``trainer``, ``logger``,
``callbacks``): only its presence is known here; the code that builds it checks it.
"""

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

# torch.compile's modes (compile=<mode>); compile=true is torch's default mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# W&B modes of the logger group's logger.mode (logger=wandb; robustdiff-generate's too).
WANDB_MODES = ("auto", "online", "offline", "disabled")
# The losses an evaluation attack maximises (eval.val_loss, eval.test_loss): robustdiff.adversarial.attacks.LOSSES
# maps these names, in this order, to its loss functions.
ATTACK_LOSSES = {"cw": "Carlini-Wagner margin, the reference", "ce": "cross-entropy"}


def setting(*, choices: dict | None = None, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, example: str | None = None,
            help: str | None = None, null: str | None = None) -> Any:
    """A schema field: no default (train.yaml gives it), the checks in its metadata."""
    meta = {"checked": True, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "example": example, "help": help,
            "null": null}
    return field(default="???", metadata={k: v for k, v in meta.items() if v is not None})


@dataclass
class NormSchema:
    """The ``norm`` group: the threat model (AttackConfig checks ε's range for the norm)."""
    name: str = setting(choices={"linf": "ℓ∞", "l2": "ℓ2"})
    eps: float = setting(example="8/255", help="the attack's radius")
    step: float = setting(gt=0, example="2/255", help="the attack's step size")
    steps: int = setting(ge=1, help="attack steps during training")


@dataclass
class EvalSchema:
    """The ``eval`` node: the EMA model's evaluation every epoch."""
    batch_size: int = setting(ge=1)
    steps: int = setting(ge=1, help="PGD steps of the evaluation")
    val_loss: str = setting(choices=ATTACK_LOSSES)
    test_loss: str = setting(choices=ATTACK_LOSSES)
    test_every: int = setting(ge=1, help="epochs between full test-set evaluations")
    select: str = setting(choices={"pgd": "best epoch = highest validation PGD accuracy, the reference",
                                   "clean": "highest validation clean accuracy"})


@dataclass
class TrainSchema:
    """robustdiff-train's config (train.yaml and its groups). A key not listed here is not a setting."""
    # Groups (open nodes: their own code checks them) and the group-set debug marker.
    dataset: Any = None
    norm: NormSchema = field(default_factory=NormSchema)
    model: Any = None
    data: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    debug_mode: str | None = setting(choices={None: "a real run", "fdr": "debug=fdr", "limit": "debug=limit",
                                                 "overfit": "debug=overfit"})

    name: Any = None
    run_root: Any = None
    data_dir: Any = None
    download: bool = setting()
    limit_train: int | None = setting(ge=1, help="the first N training images", null="the whole training set")
    limit_test: int | None = setting(ge=1, help="the first N test images", null="the whole test set")
    val_size: int = setting(ge=1, help="held-out training images that choose the best epoch")
    val_split: str | None = setting(choices={
        "first": "the first val_size training images, the reference",
        "stratified": "a seeded sample of every class",
        None: "the dataset's rule: stratified for class-sorted sets such as tinyimagenet, first otherwise"})
    val_seed: int = setting(ge=0)
    generated: Any = None
    ratio: float | None = setting(ge=0, le=1, example="0.3", help="the real fraction of each batch",
                                     null="0.3 with generated data, 1.0 without")
    generated_sampling: str = setting(choices={"with_replacement": "the reference",
                                               "permutation": "each generated image once per pass"})
    last_batch: str = setting(choices={
        "reference": "a short batch where a permutation of the real images ends, topped up with generated images "
                     "when there are any",
        "fill": "every batch full, continuing into the next permutation"})

    epochs: int = setting(ge=1)
    batch_size: int = setting(ge=2, help="the global batch, split across DDP ranks")
    lr: float = setting(gt=0, example="0.2")
    momentum: float = setting(ge=0, lt=1, example="0.9")
    nesterov: bool = setting()
    weight_decay: float = setting(ge=0, example="5e-4")
    schedule: str = setting(choices={"cosinew": "the reference's one-cycle schedule", "constant": "a constant lr"})
    cycle_momentum: bool = setting()
    loss: str = setting(choices={
        "trades": "the paper",
        "pgd_at": "the reference's: eval-mode attack, plain CE",
        "pgd_at_train": "batch-statistics attack, label smoothing",
        "ce": "standard training, no attack: for the classifiers that measure generated data"})
    beta: float = setting(ge=0, example="5.0", help="TRADES' robustness weight")
    label_smoothing: float = setting(ge=0, lt=1, example="0.1")
    ema_decay: float = setting(gt=0, lt=1, example="0.995")
    ema_warmup: float = setting(ge=0, le=1, example="0.025", help="the fraction of all steps before the average "
                                "starts")
    seed: int = setting(ge=0)
    precision: str = setting(choices={
        "32-true": "the reference", "32": "as 32-true",
        "bf16-mixed": "autocasts the network and keeps fp32 weights and losses", "16-mixed": "fp16 autocast",
        "bf16-true": "bf16 weights", "auto": "bf16-mixed where the hardware has bf16 units, else 32-true"})
    channels_last: bool = setting()
    compile: Any = setting(choices={False: "eager", True: "torch.compile's default mode",
                                    **{mode: "" for mode in COMPILE_MODES}})

    eval: EvalSchema = field(default_factory=EvalSchema)
    progress: bool = setting()


def walk(schema: type = TrainSchema, prefix: str = ""):
    """(dotted key, field, nested schema or None) of every field, depth first."""
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        nested = f.type if is_dataclass(f.type) else None
        yield key, f, nested
        if nested is not None:
            yield from walk(nested, f"{key}.")


def spec(key: str):
    """The schema field of a dotted key (``eval.select``); KeyError when the schema has none."""
    for name, f, _ in walk():
        if name == key:
            return f
    raise KeyError(f"{key}: not in robustdiff-train's schema")


def choices(key: str) -> tuple:
    """The accepted values of a setting, in the schema's order (``choices("loss")``)."""
    return tuple(spec(key).metadata["choices"])


def top_level_keys() -> set[str]:
    return {f.name for f in fields(TrainSchema)}


ConfigStore.instance().store(name="train_schema", node=TrainSchema)
