"""Progress bars for long loops over images or bytes: a tqdm bar, shown only when asked for."""

from __future__ import annotations


def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "img", *, unit_scale: bool = True):
    """A tqdm bar over ``total`` units labelled ``desc``; with ``enabled`` false it shows nothing and its
    ``update``/``close`` (and ``with``) do nothing. ``unit_scale`` writes large counts as 12.3k, 1.2M."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=not enabled, dynamic_ncols=True)


__all__ = ["progress_bar"]
