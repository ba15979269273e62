"""The class a config's ``_target_`` names, resolved and checked against the base class its caller needs.

A ``_target_`` may come from a run.json read back from disk: that is data, so only a subclass of the expected
base is ever returned (never a function or any other callable that instantiating could run)."""

from __future__ import annotations

from typing import Any


def resolve_class(target: Any, base: type, *, what: str, where: str, example: str, hint: str,
                  error: type[Exception] = ValueError) -> type:
    """The class the dotted path ``target`` names, refused with ``error`` unless it is a subclass of ``base``.

    what: the base's name as users know it (``torch.nn.Module``); where: the config key (``model._target_``); example: a value that works (for the message on a missing
    target); hint: what the class must be and what its constructor receives (for the message on a wrong one)."""
    if not isinstance(target, str) or not target:
        raise error(f"{where} is missing: give the dotted path of a {what} class, e.g. {example}")
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception as e:  # noqa: BLE001  (Hydra wraps every import failure in its own exception types)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise error(f"{where}={target!r} cannot be imported ({reason}); give the dotted path of a {what} class "
                    "importable in this environment (install its package or put it on PYTHONPATH)") from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise error(f"{where}={target!r} is a {type(obj).__name__}, not a {what} subclass; {hint}")
    return obj
