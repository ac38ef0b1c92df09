"""Faults and bad input in training: locked log dirs, links, full disks, bad shards and flags, files that are not
checkpoints, corrupt checkpoints, stop signals (also during evaluations), and the GPU-path decisions that can be
checked on a CPU."""
import errno
import os
import signal
import zipfile

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, TINY_RUN, train, write_shards
from test_checkpoint import assert_same_tensors

import bookkeeping
import checkpoints
import common
import train_gpt2


def error_of(capsys, *argv):
    """main(argv) must exit non-zero with one line on stderr and no traceback: returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main(list(argv))
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_gpt2.py: error: "), lines
    return lines[0]


# -- output directories --------------------------------------------------------------------------------------

def test_a_second_run_into_the_same_log_dir_is_refused(shards, tmp_path, capsys):
    holder = common.lock_directory(tmp_path / "log", "another train_gpt2.py")  # as if a first run were going on
    try:
        message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(tmp_path / "log"))
    finally:
        os.close(holder)
    assert "is in use by another train_gpt2.py (pid" in message
    assert not (tmp_path / "log" / "log.txt").exists()
    train(shards, tmp_path / "log", "--max_steps", "2", "--warmup_steps", "1")  # free again once released


def test_temp_files_never_follow_a_planted_link(shards, tmp_path):
    log_dir, victim = tmp_path / "log", tmp_path / "victim.txt"
    victim.write_text("precious")
    log_dir.mkdir()
    for name in ("model_00004.pt.tmp", "model_00004.pt.tmp.tmp", ".model_00004.pt.tmp", "wandb_id.txt.tmp"):
        (log_dir / name).symlink_to(victim)
    train(shards, log_dir, "--max_steps", "4", "--checkpoint_every", "4")
    assert victim.read_text() == "precious" and (log_dir / "model_00004.pt").is_file()


def test_an_unwritable_log_dir_is_one_line(shards, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(tmp_path / "file" / "log"))
    assert "cannot write into" in message and "Not a directory" in message


def test_a_full_disk_while_logging_is_one_line_and_resumable(shards, tmp_path, monkeypatch, capsys):
    real_open, lines = open, []

    def full_after_5_records(path, mode="r", *args, **kwargs):
        if str(path).endswith("log.txt") and "a" in mode:
            lines.append(path)
            if len(lines) > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(bookkeeping, "open", full_after_5_records, raising=False)
    message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(tmp_path), "--checkpoint_every", "2")
    assert "could not write" in message and "No space left on device" in message and "--resume" in message
    monkeypatch.undo()
    resumed = train(shards, tmp_path, "--checkpoint_every", "2", "--resume")  # from the last checkpoint before it
    assert resumed == train(shards, tmp_path / "straight", "--checkpoint_every", "2")  # every record, to the digit


# -- data checked before step 0 ------------------------------------------------------------------------------

def test_a_token_outside_the_vocabulary_is_found_before_training(tmp_path, capsys):
    data = write_shards(tmp_path / "d", [1000, 3000, 3000])
    tokens = np.load(data / "edufineweb_train_000002.npy")
    tokens[2900] = 128  # TINY's vocabulary is 128: ids 0..127
    np.save(data / "edufineweb_train_000002.npy", tokens)
    message = error_of(capsys, *TINY, "--data", str(data), "--log_dir", str(tmp_path / "log"))
    assert "edufineweb_train_000002.npy: holds token id 128, outside the model's vocabulary of 128" in message
    assert not (tmp_path / "log").exists()  # refused before anything was written


@pytest.mark.parametrize("case, expected", [
    ("truncated", "edufineweb_train_000001.npy is not a readable .npy shard"),
    ("pickled objects", "edufineweb_train_000001.npy is not a readable .npy shard"),
    ("text named .npy", "edufineweb_train_000001.npy is not a readable .npy shard"),
    ("mixed prefixes", r"mixes shards of several runs \(prefixes edufineweb, other\)"),
    ("missing index", r"shard indices have gaps \(missing \[2\]\)"),
    ("not utf-8 text", "cannot read text file .*bad.txt"),
])
def test_unreadable_data_is_one_line_naming_the_file(tmp_path, capsys, case, expected):
    import re

    data = write_shards(tmp_path / "d", [1000, 3000, 3000, 3000])
    shard = data / "edufineweb_train_000001.npy"
    if case == "truncated":
        shard.write_bytes(shard.read_bytes()[:3000])
    elif case == "pickled objects":
        np.save(shard, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif case == "text named .npy":
        shard.write_text("these are not tokens\n")
    elif case == "mixed prefixes":
        (data / "edufineweb_train_000003.npy").rename(data / "other_train_000003.npy")
    elif case == "missing index":
        (data / "edufineweb_train_000002.npy").unlink()
    elif case == "not utf-8 text":
        data = tmp_path / "bad.txt"
        data.write_bytes(b"caf\xe9 au lait\n" * 100)
    message = error_of(capsys, *TINY, "--data", str(data), "--log_dir", str(tmp_path / "log"))
    assert re.search(expected, message), message


def test_a_short_last_shard_from_fineweb_is_skipped_with_a_note(tmp_path, capsys):
    data = write_shards(tmp_path / "d", [1000, 3000, 3000, 20])  # the last shard: less than T+1 = 33 tokens
    log = train(data, tmp_path / "log", "--max_steps", "2", "--warmup_steps", "1")
    assert "note: skipping" in capsys.readouterr().out and (2, "val") in log


# -- flags outside their domain: all refused together, before any work ---------------------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--min_lr_ratio", "-0.1"], "--min_lr_ratio must be between 0 and 1, not -0.1"),
    (["--n_layer", "-1"], "cannot be negative"),
    (["--max_lr", "-1"], "--max_lr must be a positive number, not -1.0"),
    (["--max_lr", "nan"], "--max_lr must be a positive number, not nan"),
    (["--n_embd", "-32"], "cannot be negative"),
    (["--weight_decay", "inf"], "--weight_decay and --grad_clip must be finite"),
    (["--dist_timeout", "0"], "--dist_timeout must be between 1 and 604800 seconds"),
    (["--dist_timeout", str(10**12)], "--dist_timeout must be between 1 and 604800 seconds"),
    (["--seed", "-1"], "--seed must be between 0 and 2**64 - 1, not -1"),  # numpy's generators refuse it, mid-run
    (["--seed", str(2**64)], "--seed must be between 0 and 2**64 - 1"),  # torch.manual_seed overflows
    (["--wandb", ""], "--wandb needs a project name"),  # W&B was silently off
    (["--prompt", "", "--sample_every", "5"], "the samples' prompt is empty"),  # failed at the first sample
    (["--hellaswag_every", "5", "--hellaswag_data", "nowhere.jsonl"],
     "--hellaswag_data nowhere.jsonl is missing (no such file or directory), not a jsonl file"),
])
def test_flags_outside_their_domain_are_refused(shards, tmp_path, capsys, flags, expected):
    message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(tmp_path / "log"), *flags)
    assert expected in message and not (tmp_path / "log").exists()


@pytest.mark.parametrize("kind", ["fifo", "directory named .txt", "name too long", "log_dir name too long"])
def test_a_path_that_is_not_what_it_should_be_is_one_line_saying_what_it_is(shards, tmp_path, capsys, kind):
    data, log_dir = shards, tmp_path / "log"
    if kind == "fifo":
        data = tmp_path / "corpus.txt"
        os.mkfifo(data)  # reading it would block forever
    elif kind == "directory named .txt":
        (data := tmp_path / "corpus.txt").mkdir()
    elif kind == "name too long":
        data = tmp_path / ("x" * 300) / "corpus.txt"
    else:
        log_dir = tmp_path / ("x" * 300)
    message = error_of(capsys, *TINY, "--data", str(data), "--log_dir", str(log_dir))
    expected = {"fifo": "is a FIFO (named pipe), not a text file", "directory named .txt": "is a directory, not a text",
                "name too long": "File name too long", "log_dir name too long": "File name too long"}[kind]
    assert expected in message and "not found" not in message


def test_every_problem_is_named_in_one_line(shards, tmp_path, capsys):
    message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(tmp_path / "log"),
                       "--min_lr_ratio", "-1", "--max_lr", "nan", "--n_layer", "-1", "-B", "5")
    assert all(s in message for s in ("--min_lr_ratio", "--max_lr", "cannot be negative", "not divisible"))


def test_seq_len_longer_than_an_init_checkpoints_block_size_is_refused(shards, tmp_path, capsys):
    train(shards, tmp_path / "a", "--max_steps", "2", "--warmup_steps", "1", "--checkpoint_every", "2")
    base = TINY_RUN  # without the shape flags: the checkpoint fixes the shape (block_size 32)
    message = error_of(capsys, *base, "-T", "64", "-B", "2", "--data", str(shards), "--log_dir",
                       str(tmp_path / "b"), "--init_from", str(tmp_path / "a" / "model_00002.pt"))
    assert "-T 64 is longer than the model's block_size 32" in message


def test_resume_with_max_steps_below_the_checkpoint_is_refused(shards, tmp_path, capsys):
    train(shards, tmp_path, "--max_steps", "6", "--checkpoint_every", "6")
    message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(tmp_path), "--resume",
                       "--max_steps", "4")
    assert "--max_steps 4 is below the checkpoint's step 6: nothing to do" in message


# -- files that are not what they claim ----------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    ({"weights": torch.zeros(3)}, "not a checkpoint of train_gpt2.py (missing or malformed: model, config, step"),
    (torch.zeros(3), "not a checkpoint of train_gpt2.py (it holds a Tensor)"),
    ([1, 2, 3], "not a checkpoint of train_gpt2.py (it holds a list)"),
])
def test_a_pt_file_that_is_not_a_checkpoint_is_one_line(shards, tmp_path, capsys, content, expected):
    torch.save(content, tmp_path / "model_00004.pt")
    message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(tmp_path), "--resume",
                       str(tmp_path / "model_00004.pt"))
    assert expected in message
    message = error_of(capsys, *TINY_RUN, "--data", str(shards), "--log_dir", str(tmp_path / "x"),
                       "--init_from", str(tmp_path / "model_00004.pt"))
    assert expected in message


def flip_a_byte_of_the_weights(path):
    """Flip one byte in the middle of the largest tensor stored in a checkpoint (a zip archive, uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        header = archive.fp
        header.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(header.read(2), "little") for _ in range(2))
    offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_a_checkpoint_with_a_flipped_byte_is_refused(shards, tmp_path, capsys):
    train(shards, tmp_path, "--max_steps", "4", "--checkpoint_every", "2", "--keep_checkpoints", "0")
    flip_a_byte_of_the_weights(tmp_path / "model_00004.pt")
    torch.load(tmp_path / "model_00004.pt", weights_only=True)  # torch itself loads it without a word
    with pytest.raises(common.UserError, match="model_00004.pt is corrupt: its contents do not match"):
        checkpoints.load_checkpoint(tmp_path / "model_00004.pt")
    train(shards, tmp_path, "--max_steps", "6", "--checkpoint_every", "2", "--resume")  # falls back to step 2
    out = capsys.readouterr().out
    assert "skipping" in out and "is corrupt" in out and "model_00002.pt at step 2" in out


def test_a_changed_flag_in_a_checkpoint_is_caught_as_corruption(shards, tmp_path, capsys):
    """A flipped bit in the saved flags (max_lr, say) was caught only as a resume-flag mismatch that told the user to
    rerun with the corrupted value: the checksum covers the whole checkpoint, metadata included."""
    train(shards, tmp_path, "--max_steps", "4", "--checkpoint_every", "2", "--keep_checkpoints", "0")
    checkpoint = torch.load(tmp_path / "model_00004.pt", weights_only=True)
    checkpoint["args"]["max_lr"] = 1e-2 * 2 ** 10  # one bit of the float's exponent
    torch.save(checkpoint, tmp_path / "model_00004.pt")
    with pytest.raises(common.UserError, match="model_00004.pt is corrupt"):
        checkpoints.load_checkpoint(tmp_path / "model_00004.pt")
    train(shards, tmp_path, "--max_steps", "6", "--checkpoint_every", "2", "--resume")  # falls back to step 2
    out = capsys.readouterr().out
    assert "is corrupt" in out and "model_00002.pt at step 2" in out and "--max_lr" not in out


# -- stop requests -------------------------------------------------------------------------------------------

def test_stop_signals_say_so_at_once_ignore_repeats_and_a_second_ctrl_c_stops(capfd):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with bookkeeping.StopSignals():
        assert signal.getsignal(signal.SIGTERM) not in before.values()
    assert {s: signal.getsignal(s) for s in before} == before  # without a stop, the handlers from before are back
    with bookkeeping.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"
        assert "SIGTERM received: stopping at the next safe point" in capfd.readouterr().err  # before any update
        os.kill(os.getpid(), signal.SIGTERM)  # a VM shutdown signals the group, torchrun forwards another
        assert stop.received == "SIGTERM"  # still alive, still saving
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # only a second Ctrl-C stops at once
    # after a stop (the checkpoint saved), nothing that arrives may kill the process on its way out
    assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_a_stop_during_evaluation_saves_at_once_and_resumes_exactly(shards, tmp_path, monkeypatch, capsys):
    straight = train(shards, tmp_path / "a", "--max_steps", "8", "--eval_every", "4", "--checkpoint_every", "8")
    real_evaluate, calls = train_gpt2.evaluate_val, []

    def sigterm_during_the_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the eval at step 4: the signal arrives before its first batch is done
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_gpt2, "evaluate_val", sigterm_during_the_second_evaluation)
    cut = train(shards, tmp_path / "b", "--max_steps", "8", "--eval_every", "4", "--checkpoint_every", "8")
    monkeypatch.undo()
    assert "stopped by SIGTERM at step 4" in capsys.readouterr().out
    assert (4, "val") not in cut and (3, "train") in cut and (4, "train") not in cut  # no half-measured val loss
    assert [p.name for p in (tmp_path / "b").glob("model_*.pt")] == ["model_00004.pt"]
    resumed = train(shards, tmp_path / "b", "--max_steps", "8", "--eval_every", "4", "--checkpoint_every", "8",
                    "--resume")
    assert resumed == straight
    a, b = (torch.load(tmp_path / d / "model_00008.pt", weights_only=True) for d in ("a", "b"))
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["optimizer"], b["optimizer"])


# -- decisions of the GPU path, checked on a CPU -------------------------------------------------------------

def test_bf16_only_on_gpus_that_compute_it_natively():
    assert common.resolve_dtype("auto", "cuda", cuda_capability=(7, 0)) == "float32"  # V100
    assert common.resolve_dtype("auto", "cuda", cuda_capability=(7, 5)) == "float32"  # T4
    assert common.resolve_dtype("auto", "cuda", cuda_capability=(8, 0)) == "bfloat16"  # A100
    assert common.resolve_dtype("auto", "cuda", cuda_capability=(9, 0)) == "bfloat16"  # H100
    assert common.resolve_dtype("auto", "mps") == "float32"
    assert common.resolve_dtype("float32", "cuda", cuda_capability=(9, 0)) == "float32"


def test_more_ranks_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(common.UserError, match="larger than this machine's 2 GPUs: use --nproc_per_node=2"):
        train_gpt2.setup_distributed("cuda")


def test_the_collective_timeout_is_the_flags(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.update(kw, b=backend))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    world = train_gpt2.setup_distributed("cpu", timeout_s=42)
    assert seen["b"] == "gloo" and seen["timeout"].total_seconds() == 42 and world.world_size == 2


def test_a_cuda_checkpoints_fused_adamw_resumes_unfused_on_a_cpu(shards, tmp_path):
    train(shards, tmp_path, "--max_steps", "4", "--checkpoint_every", "4")
    checkpoint = torch.load(tmp_path / "model_00004.pt", weights_only=True)
    for state in checkpoint["optimizer"]:  # one state per optimizer
        for group in state["param_groups"]:
            group["fused"] = True  # as saved on a GPU
    del checkpoint["checksum"]
    checkpoint["checksum"] = checkpoints.checksum(checkpoint)
    torch.save(checkpoint, tmp_path / "model_00004.pt")
    train(shards, tmp_path, "--max_steps", "6", "--checkpoint_every", "6", "--resume")
    saved = torch.load(tmp_path / "model_00006.pt", weights_only=True)
    assert all(group["fused"] is False for state in saved["optimizer"] for group in state["param_groups"])


def test_a_compiler_failure_at_the_first_step_says_what_to_do(shards, tmp_path, monkeypatch, capsys):
    class TritonMissing(Exception):
        pass

    TritonMissing.__module__ = "torch._inductor.exc"  # where torch.compile's failures come from

    def fail(*args):
        raise TritonMissing("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(train_gpt2, "train_step", fail)
    message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(tmp_path))
    assert "torch.compile failed" in message and "--compile false" in message and "build-essential" in message


def test_a_stop_during_hellaswag_saves_without_a_partial_score(shards, tmp_path, monkeypatch, capsys):
    import hellaswag
    from test_hellaswag import make_examples, write_examples

    data_file = write_examples(tmp_path / "hella.jsonl", make_examples(n=6, seed=2))
    real_evaluate, calls = hellaswag.evaluate, []

    def sigterm_during_the_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(hellaswag, "evaluate", sigterm_during_the_second_evaluation)
    log = train(shards, tmp_path / "log", "--vocab_size", "50304", "--block_size", "128", "--max_steps", "4",
                "--eval_every", "0", "--hellaswag_every", "2", "--hellaswag_data", str(data_file))
    assert "stopped by SIGTERM at step 2" in capsys.readouterr().out
    assert (0, "hella") in log and (2, "hella") not in log and (1, "train") in log and (2, "train") not in log
    assert [p.name for p in (tmp_path / "log").glob("model_*.pt")] == ["model_00002.pt"]


@pytest.mark.slow
def test_init_from_the_hub_offline_is_one_line(shards, tmp_path):
    """Offline, transformers retries and ends in a traceback; the user gets one line that says what to do."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}  # an empty cache
    out = subprocess.run([sys.executable, str(bookkeeping.HERE / "train_gpt2.py"), *TINY_RUN, "--data", str(shards),
                          "--log_dir", str(tmp_path / "log"), "--init_from", "gpt2", "--max_steps", "1",
                          "--warmup_steps", "0"], env=env, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[0].startswith("train_gpt2.py: error: could not load gpt2") and "HF_HUB_OFFLINE" in lines[0]


def test_a_failure_on_rank_0_reaches_every_rank(monkeypatch):
    """on_master: rank 0's failure (a download) is shared before anyone waits, so rank 1 stops too instead of
    sitting in a barrier until the timeout."""
    world = train_gpt2.DistInfo(rank=1, local_rank=1, world_size=2, device="cpu", device_type="cpu",
                                is_master=False)

    def all_reduce_as_rank_0_failed(tensor, op=None):
        tensor.fill_(1)  # the MAX over ranks of "failed": rank 0 said 1

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce_as_rank_0_failed)
    ran = []
    with pytest.raises(common.UserError, match="rank 0 failed"):
        bookkeeping.on_master(world, ran.append, "download")
    assert ran == []  # only rank 0 downloads


def test_peak_flops_knows_the_variants_before_their_base_names(monkeypatch):
    world = train_gpt2.DistInfo(0, 0, 1, "cuda:0", "cuda", True)
    expected = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
                "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA A100-SXM4-80GB": 312e12, "Tesla T4": None}
    for name, flops in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert train_gpt2.peak_flops(world) == flops, name


# -- a model too large for the machine, error paths that must not fail themselves, messages under torchrun ------

@pytest.mark.parametrize("flags, named", [
    (["--block_size", "2000000000"], "--block_size 2000000000: the run needs at least"),  # a 256 GB allocation failed
    (["--vocab_size", "3000000000"], "--vocab_size 3000000000: the run needs at least"),
    (["--n_layer", "100000", "--n_embd", "1024", "--n_head", "16"], "--n_layer 100000 and --n_embd 1024: the run"),
    (["-B", str(2**26), "--total_batch_size", str(2**31)], f"-B {2**26} with -T 32: the run needs at least"),
    (["--block_size", "2000000000", "--sample", "Hello"], "the run needs at least 256.0 GB (weights)"),
])
def test_a_model_that_cannot_fit_in_memory_is_one_line_before_allocating(tmp_path, capsys, flags, named):
    message = error_of(capsys, *TINY, "--data", str(tmp_path / "unused.txt"), "--log_dir", str(tmp_path / "log"),
                       *flags)
    assert named in message and "GB of RAM: use a smaller" in message and not (tmp_path / "log").exists()


def raise_without_a_message(*args, **kwargs):
    raise ValueError()


def test_an_exception_with_an_empty_message_still_gives_one_line(shards, tmp_path, monkeypatch):
    """Two error paths took str(e).splitlines()[0] and raised IndexError while reporting an empty-message error."""
    monkeypatch.setattr(np, "load", raise_without_a_message)
    with pytest.raises(common.UserError, match=r"is not a readable .npy shard \(ValueError\)"):
        common.load_shard(shards / "edufineweb_val_000000.npy")
    monkeypatch.undo()
    train(shards, tmp_path, "--max_steps", "2", "--warmup_steps", "1", "--checkpoint_every", "2")
    monkeypatch.setattr(train_gpt2.GPT, "load_state_dict", lambda self, state: (_ for _ in ()).throw(KeyError()))
    with pytest.raises(common.UserError, match=r"is not a checkpoint of train_gpt2.py's GPT \(KeyError\)"):
        train_gpt2.GPT.from_checkpoint(tmp_path / "model_00002.pt")
    assert common.first_line(OSError("first\nsecond")) == "first"


@pytest.mark.slow
def test_each_message_prints_once_under_torchrun(tmp_path):
    """The note on a short last shard and the one on a corrupt checkpoint were printed by every rank."""
    import subprocess
    import sys

    data = write_shards(tmp_path / "d", [1000, 3000, 3000, 20])  # the last shard: less than T+1 = 33 tokens
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "train_gpt2.py"), *TINY, "--data", str(data), "--log_dir", str(tmp_path / "log"),
            "--max_steps", "4", "--warmup_steps", "1", "--checkpoint_every", "2", "--keep_checkpoints", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    newest = tmp_path / "log" / "model_00004.pt"
    newest.write_bytes(newest.read_bytes()[:-100])
    second = subprocess.run(args + ["--resume", "--max_steps", "6"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert first.stdout.count("note: skipping") == 1 and second.stdout.count("note: skipping") == 1
    assert second.stdout.count("model_00004.pt is not a readable checkpoint") == 1
