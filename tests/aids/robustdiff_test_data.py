"""A test-only DataModule for ``data._target_=...``: a researcher's own subclass with an argument of its own."""

from __future__ import annotations

from robustdiff.data.datamodule import RobustDataModule


class TaggedData(RobustDataModule):
    """RobustDataModule plus a ``tag`` argument, recorded with the validation split in run.json."""

    def __init__(self, *args, tag: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = tag

    def setup(self, stage=None):
        super().setup(stage)
        self.val_split_info = {**(self.val_split_info or {}), "tag": self.tag}


class NotData:
    """A class that is not a DataModule (refused as a data._target_)."""
