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


def flush() -> None:
    """Wait until the wandb service has written everything: ``run.finish()`` returns before an offline run's
    last records reach the .wandb file, and the service writes them on its own schedule (at the latest when the
    process exits). ``wandb.teardown`` stops the service after it has flushed; the next run starts a new one."""
    import wandb

    wandb.teardown()


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(run_dir: Path) -> dict:
    """What one offline run directory (its single .wandb file) holds:
    {"history": [{key: value} per logged row], "config": {key: value}, "summary": {key: value} (the final state
    of the summary updates), "run": {"id", "job_type", "group", "project", "resumed", "name"},
    "artifacts": [{"name", "type", "aliases", "metadata", "files"}], "metrics": {name: summary options}}."""
    from wandb.proto import wandb_internal_pb2 as pb

    flush()
    (path,) = list(Path(run_dir).glob("*.wandb"))
    history, config, summary, run, artifacts, metrics = [], {}, {}, {}, [], {}
    for raw in _chunks(path.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            run = {"id": rec.run.run_id, "job_type": rec.run.job_type, "group": rec.run.run_group,
                   "project": rec.run.project, "resumed": rec.run.resumed, "name": rec.run.display_name}
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
            for i in rec.summary.remove:
                summary.pop(_key(i), None)
        elif kind == "artifact":
            a = rec.artifact
            artifacts.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                              "metadata": json.loads(a.metadata or "{}"),
                              "files": {c.path: c.size for c in a.manifest.contents}})
        elif kind == "metric":
            m = rec.metric
            metrics[m.name or m.glob_name] = {f.name: v for f, v in m.summary.ListFields()}
    return {"history": history, "config": config, "summary": summary, "run": run, "artifacts": artifacts,
            "metrics": metrics}
