"""Read back an offline W&B run: the .wandb file is a LevelDB-style log of protobuf records."""

import json
import struct
from pathlib import Path

BLOCK = 32768


def _chunks(data: bytes):
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, buf = 7, b""  # header: ':W&B', magic (2 bytes), version (1 byte)
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk


def read_run(run_dir: Path) -> dict:
    """{"history": [ {key: value} per logged row ], "config": {key: value}} of a run's single .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list(Path(run_dir).glob("*.wandb"))
    history, config = [], {}
    for raw in _chunks(path.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return {"history": history, "config": config}
