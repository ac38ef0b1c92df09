"""--wandb PROJECT: rank 0 logs the run's records to Weights & Biases, offline here (WANDB_MODE=offline, no account),
and a resumed run continues the same W&B run. The offline run's file is read back to check the logged values."""
import json
import struct
import time

import pytest
from conftest import TINY, read_log

import train_gpt2

wandb_proto = pytest.importorskip("wandb.proto.wandb_internal_pb2")


def read_wandb_file(path):
    """The records of a .wandb file: a 7-byte header, then LevelDB's log format (32 KiB blocks; each chunk has a
    crc32, a length and a type: 1 full, 2 first, 3 middle, 4 last) around protobuf Records."""
    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_proto.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_and_run(run_dir):
    """The run's logged rows and its run record, once wandb's service process has written the exit record (it
    writes the file on its own after wandb.finish() returns)."""
    (path,) = run_dir.glob("run-*.wandb")
    for _ in range(600):
        records = read_wandb_file(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            break
        time.sleep(0.1)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return history, run


@pytest.mark.slow
def test_wandb_offline_logs_the_records_and_a_resume_continues_the_run(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_dir = tmp_path / "run"
    args = TINY + ["--data", str(shards), "--log_dir", str(log_dir), "--max_steps", "6", "--eval_every", "3",
                   "--checkpoint_every", "3", "--wandb", "gpt2-tests"]
    train_gpt2.main(args)
    log = read_log(log_dir / "log.txt")
    (first,) = (log_dir / "wandb").glob("offline-run-*")
    history, run = history_and_run(first)
    assert run.project == "gpt2-tests" and run.display_name == "run"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["max_steps"] == 6 and config["n_embd"] == 32 and config["wandb"] == "gpt2-tests"
    rows = {row["_step"]: row for row in history}
    assert sorted(rows) == list(range(7))
    for step in range(6):  # the values of log.txt, and the figures only stdout had
        assert f"{rows[step]['train/loss']:.6f}" == log[step, "train"]
        assert rows[step]["tokens"] == (step + 1) * 256 and rows[step]["lr"] > 0 and rows[step]["grad_norm"] > 0
        assert rows[step]["tokens_per_sec"] > 0
    for step in (0, 3, 6):
        assert f"{rows[step]['val/loss']:.4f}" == log[step, "val"]

    (log_dir / "model_00006.pt").unlink()  # as if the machine had died after step 3's checkpoint
    train_gpt2.main(args + ["--resume"])
    (second,) = set((log_dir / "wandb").glob("offline-run-*")) - {first}
    history, resumed = history_and_run(second)
    assert resumed.run_id == run.run_id  # the same W&B run goes on
    assert sorted(row["_step"] for row in history) == [3, 4, 5, 6]


def test_wandb_that_cannot_write_its_files_is_one_line(shards, tmp_path, monkeypatch, capsys):
    """W&B's files go under log_dir/wandb: a place it cannot write (here a file in the way, as root ignores
    permissions) is one line, not wandb's traceback."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    (log_dir / "wandb").write_text("in the way")
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main(TINY + ["--data", str(shards), "--log_dir", str(log_dir), "--max_steps", "2",
                                "--warmup_steps", "1", "--wandb", "gpt2-tests"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_gpt2.py: error: W&B could not start its run in"), err
