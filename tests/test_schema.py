"""The structured-config schema (robustdiff.conf.schema) is the one place robustdiff-train's choice lists and
bounds live: train.yaml's keys are its fields, the training modules read their lists from it, and a value it
refuses is named with its key, the accepted values or bounds, before any work."""

from __future__ import annotations

import re

import pytest

from conftest import TINY, compose_train
from robustdiff.conf.schema import choices, top_level_keys
from robustdiff.training.config import ConfigError, validate


def test_train_yaml_keys_are_the_schemas_fields():
    composed = {str(k) for k in compose_train(*TINY) if k != "hydra"}
    assert composed <= top_level_keys(), composed - top_level_keys()
    assert top_level_keys() - composed <= {"debug_mode"}  # set only by the debug group


def test_the_modules_choice_lists_are_the_schemas():
    from robustdiff.adversarial.config import NORMS
    from robustdiff.data.mixing import GENERATED_SAMPLING, LAST_BATCH
    from robustdiff.training.adversarial import LOSSES, SCHEDULES, SELECT

    assert LOSSES == choices("loss") == ("trades", "pgd_at", "pgd_at_train", "ce")
    assert SCHEDULES == choices("schedule") and SELECT == choices("eval.select")
    assert NORMS == choices("norm.name") == ("linf", "l2")
    assert GENERATED_SAMPLING == choices("generated_sampling") and LAST_BATCH == choices("last_batch")


@pytest.mark.parametrize("key", ["loss", "schedule", "eval.val_loss", "eval.select", "last_batch"])
def test_a_value_outside_a_choice_list_names_the_key_and_every_choice(key):
    with pytest.raises(ConfigError) as e:
        validate(compose_train(*TINY, f"{key}=bogus"))
    message = str(e.value)
    assert f"{key.split('.')[-1]}='bogus'" in message or f"{key}='bogus'" in message, message
    assert all(str(c) in message for c in choices(key) if c is not None), message


@pytest.mark.parametrize("override, bound", [("momentum=1", "[0, 1)"), ("ema_decay=1.5", "(0, 1)"),
                                             ("epochs=0", ">= 1"), ("ratio=1.5", "[0, 1]")])
def test_a_value_out_of_bounds_names_the_key_and_the_bounds(override, bound):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        validate(compose_train(*TINY, override))
    assert re.search(rf"{key}=\S+ .*{re.escape(bound)}", str(e.value)), str(e.value)


def test_the_attack_losses_are_the_schemas_eval_losses():
    from robustdiff.adversarial.attacks import LOSSES

    assert tuple(LOSSES) == choices("eval.val_loss") == choices("eval.test_loss") == ("cw", "ce")
