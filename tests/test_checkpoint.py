"""Checkpoints: exact resume (also across world sizes), torn writes, SIGTERM, refusals, disk full, NaN."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoints
import common
import bookkeeping
import train_gpt2
from conftest import ROOT, TINY, read_log, torchrun_cpu, train
from train_gpt2 import GPT, ShardedLoader




def assert_same_tensors(a, b, where=""):
    """Nested dicts/lists of tensors equal bit for bit (torch.equal), everything else equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_is_bit_identical_to_an_uninterrupted_run(shards, tmp_path):
    straight = train(shards, tmp_path / "a", "--max_steps", "10", "--eval_every", "2", "--checkpoint_every", "10")
    train(shards, tmp_path / "b", "--max_steps", "10", "--eval_every", "2", "--checkpoint_every", "4")
    # throw away everything after step 4's checkpoint, as if the machine had died at step 6
    for name in ("model_00008.pt", "model_00010.pt"):
        (tmp_path / "b" / name).unlink()
    resumed = train(shards, tmp_path / "b", "--max_steps", "10", "--eval_every", "2", "--checkpoint_every", "10",
                  "--resume")
    assert straight == resumed  # every train and val value, to the logged digit
    assert "# resume" in (tmp_path / "b" / "log.txt").read_text()  # appended, not wiped
    a, b = (torch.load(tmp_path / d / "model_00010.pt", weights_only=True) for d in ("a", "b"))
    assert_same_tensors(a["model"], b["model"], "model")  # the weights, bit for bit
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")  # and the moments of the optimizer
    assert a["loaders"] == b["loaders"]


def test_checkpoint_contents_and_pruning(shards, tmp_path):
    train(shards, tmp_path, "--max_steps", "10", "--checkpoint_every", "2", "--keep_checkpoints", "2")
    assert sorted(p.name for p in tmp_path.glob("model_*")) == ["model_00008.pt", "model_00010.pt"]
    ckpt = torch.load(tmp_path / "model_00010.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["config"]["n_layer"] == 2 and ckpt["args"]["max_steps"] == 10
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert {"optimizer", "loaders", "rng", "val_loss", "date", "git", "torch"} <= set(ckpt)
    assert ckpt["loaders"][0]["position"] == 10 * 2 * 4  # 10 steps x 2 micro-batches x B=4 windows
    assert set(ckpt["rng"][0]) >= {"python", "numpy", "torch"}


def test_from_checkpoint_gives_the_trained_model(shards, tmp_path):
    log = train(shards, tmp_path, "--max_steps", "6", "--eval_every", "6", "--checkpoint_every", "6")
    model = GPT.from_checkpoint(tmp_path / "model_00006.pt").eval()
    val = ShardedLoader(shards, 4, 32, "val")
    with torch.no_grad():
        losses = [model(*val.next_batch())[1].item() for _ in range(2)]  # --val_tokens 256 = 2 batches
    assert f"{sum(losses) / 2:.4f}" == log[6, "val"]
    assert float(log[6, "val"]) < float(log[0, "val"])  # it is the trained model, not a fresh one


def test_torn_write_is_never_taken_for_a_checkpoint(shards, tmp_path, monkeypatch, capsys):
    real_replace = os.replace

    def die_at_step_8(src, dst):  # the process "dies" between writing model_00008.pt's temp file and renaming it
        if str(dst).endswith("model_00008.pt"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(common.os, "replace", die_at_step_8)
    with pytest.raises(SystemExit):
        train(shards, tmp_path, "--max_steps", "10", "--checkpoint_every", "4")
    monkeypatch.undo()
    assert len(list(tmp_path.glob(".model_00008.pt.*.tmp"))) == 1 and (tmp_path / "model_00004.pt").exists()
    (tmp_path / "model_00009.pt").write_bytes(b"half a checkpoint")  # and a truncated file under a real name
    log = train(shards, tmp_path, "--max_steps", "10", "--checkpoint_every", "4", "--resume")
    out = capsys.readouterr().out
    assert "skipping" in out and "resumed from" in out and "model_00004.pt at step 4" in out
    assert (10, "val") in log


def test_resume_refuses_flags_that_change_the_math(shards, tmp_path, capsys):
    train(shards, tmp_path, "--max_steps", "4", "--checkpoint_every", "4")
    with pytest.raises(SystemExit):
        train(shards, tmp_path, "--max_steps", "8", "--resume", "--n_embd", "64", "--seed", "7")
    err = capsys.readouterr().err
    assert "--n_embd 32 -> 64" in err and "--seed 1337 -> 7" in err and "Traceback" not in err
    train(shards, tmp_path, "--max_steps", "8", "--resume")  # a longer run is fine, and said
    assert "resuming with changed --max_steps 4 -> 8" in capsys.readouterr().out


def test_resume_without_checkpoints_and_fresh_run_over_checkpoints_are_clear_errors(shards, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(shards, tmp_path / "empty", "--resume")
    assert "no checkpoint (model_NNNNN.pt) in" in capsys.readouterr().err
    train(shards, tmp_path / "done", "--max_steps", "2", "--warmup_steps", "1", "--checkpoint_every", "2")
    with pytest.raises(SystemExit):  # a fresh run would mix its checkpoints with the earlier run's
        train(shards, tmp_path / "done", "--max_steps", "2", "--warmup_steps", "1")
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err


def test_full_disk_keeps_the_previous_checkpoint(shards, tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def fill_disk(obj, f):  # torch.save reports a full disk as a RuntimeError, not an OSError
        if obj.get("step") == 8:
            f.write(b"x" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", fill_disk)
    with pytest.raises(SystemExit) as exit_info:
        train(shards, tmp_path, "--max_steps", "10", "--checkpoint_every", "4")
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "could not write" in err and "model_00008.pt" in err and "GB free there" in err and "--resume" in err
    assert sorted(p.name for p in tmp_path.iterdir() if "model" in p.name) == ["model_00004.pt"]  # no temp file
    kept = checkpoints.load_checkpoint(tmp_path / "model_00004.pt", for_resume=True)  # whole and matching its checksum
    assert kept["step"] == 4 and kept["loaders"][0]["position"] == 4 * 2 * 4


def test_non_finite_loss_stops_with_the_step_and_keeps_checkpoints(shards, tmp_path, capsys):
    """Whichever check meets the divergence first (the loss of the weights before a checkpoint, or the train loss),
    no checkpoint after it exists, and the message names the last good one, which resumes to a finite loss."""
    with pytest.raises(SystemExit) as exit_info:
        train(shards, tmp_path, "--max_steps", "40", "--checkpoint_every", "1", "--max_lr", "1e6",
            "--warmup_steps", "1", "--grad_clip", "0", "--eval_every", "0")
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "diverged" in err and ("is nan" in err or "is inf" in err)
    kept = sorted(tmp_path.glob("model_*.pt"))
    assert (f"The newest checkpoint, from before it: {kept[-1]}" if kept else "No checkpoint of this run") in err
    x = torch.tensor(np.load(next(shards.glob("*val*")))[:33].astype(np.int64))[None]
    for path in kept:  # every state saved is one whose loss is finite
        assert torch.isfinite(GPT.from_checkpoint(path)(x[:, :-1], x[:, 1:])[1])


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resume_finishes_identically(shards, tmp_path):
    args = [sys.executable, str(ROOT / "train_gpt2.py"), *TINY, "--data", str(shards), "--max_steps", "400",
            "--eval_every", "100"]
    proc = subprocess.Popen(args + ["--log_dir", str(tmp_path / "b")], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step    20 | loss"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "stopped by SIGTERM" in out and "--resume" in out
    saved = list((tmp_path / "b").glob("model_*.pt"))
    assert len(saved) == 1 and 20 < int(saved[0].stem.split("_")[1]) < 400
    subprocess.run(args + ["--log_dir", str(tmp_path / "b"), "--resume"], check=True, capture_output=True)
    straight = train(shards, tmp_path / "a", "--max_steps", "400", "--eval_every", "100")
    assert read_log(tmp_path / "b" / "log.txt") == straight


@pytest.mark.slow
def test_signals_after_the_checkpoint_is_saved_never_turn_the_clean_exit_into_a_kill(shards, tmp_path):
    """A VM shutdown keeps signalling: SIGTERMs (and a Ctrl-C) arriving every few milliseconds from the first one until
    the process has gone must leave exit status 0 and the checkpoint (the old handler came back after the loop, and
    the next SIGTERM killed the process on its way out: exit -15, 5 runs of 5)."""
    import threading

    args = [sys.executable, str(ROOT / "train_gpt2.py"), *TINY, "--data", str(shards), "--max_steps", "400",
            "--eval_every", "100", "--log_dir", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step    10 | loss"):
            break

    def keep_signalling():
        while proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                return
            time.sleep(0.002)

    signaller = threading.Thread(target=keep_signalling)
    signaller.start()
    out = proc.communicate(timeout=120)[0]
    signaller.join()
    assert proc.returncode == 0 and "stopped by SIGTERM" in out, (proc.returncode, out[-500:])
    assert len(list(tmp_path.glob("model_*.pt"))) == 1


@pytest.mark.slow
def test_two_ranks_resume_on_one_with_twice_the_accumulation(shards, tmp_path):
    """A run on 2 ranks loses one after step 4's checkpoint and carries on alone: same data, same losses."""
    args = TINY + ["--data", str(shards), "--max_steps", "8", "--eval_every", "2", "--checkpoint_every", "4"]
    torchrun_cpu(args, tmp_path / "b")
    ckpt = torch.load(tmp_path / "b" / "model_00004.pt", weights_only=True)
    assert len(ckpt["loaders"]) == 2 and len(ckpt["rng"]) == 2  # every rank's state
    (tmp_path / "b" / "model_00008.pt").unlink()
    train_gpt2.main(args + ["--log_dir", str(tmp_path / "b"), "--resume"])  # 1 process, accumulation 2
    straight = train(shards, tmp_path / "a", "--max_steps", "8", "--eval_every", "2")
    resumed = read_log(tmp_path / "b" / "log.txt")  # steps 4-8 of the 2-rank run are overwritten (later wins)
    assert sorted(resumed) == sorted(straight)
    for key in straight:  # same data order; the sums differ only in float rounding
        assert abs(float(resumed[key]) - float(straight[key])) <= 1e-4, key
    assert "# resume" in (tmp_path / "b" / "log.txt").read_text()


# -- what a resume keeps, and what pruning may delete ----------------------------------------------------------

def checkpoint_names(log_dir):
    return sorted(p.name for p in log_dir.glob("model_*.pt"))


def test_a_resume_from_an_older_checkpoint_never_deletes_what_it_saves(shards, tmp_path, capsys):
    """Pruning kept the highest step numbers: a resume from step 10 of a run that reached 20 deleted the model_00012.pt
    it had just written and announced. Resuming in the same directory is refused (the later checkpoints would be
    overwritten one by one); in an empty --log_dir the branch runs and keeps its own newest file."""
    log_dir = tmp_path / "a"
    train(shards, log_dir, "--max_steps", "20", "--checkpoint_every", "5", "--keep_checkpoints", "0")
    with pytest.raises(SystemExit):
        train(shards, log_dir, "--resume", str(log_dir / "model_00010.pt"), "--max_steps", "12", "--keep_checkpoints",
            "1", "--checkpoint_every", "5")
    err = capsys.readouterr().err
    assert "later steps (model_00015.pt, model_00020.pt)" in err and f"--resume {log_dir / 'model_00020.pt'}" in err
    assert checkpoint_names(log_dir) == [f"model_{s:05d}.pt" for s in (5, 10, 15, 20)]  # nothing touched
    branch = tmp_path / "branch"
    train_gpt2.main(["--resume", str(log_dir / "model_00010.pt"), "--max_steps", "12", "--keep_checkpoints", "1",
                     "--log_dir", str(branch)])
    out = capsys.readouterr().out
    assert f"saved {branch / 'model_00012.pt'}" in out and checkpoint_names(branch) == ["model_00012.pt"]
    assert len(checkpoint_names(log_dir)) == 4


def test_pruning_keeps_the_new_checkpoint_over_a_later_one_resume_skipped(shards, tmp_path, capsys):
    """--resume passes over a corrupt newest checkpoint to the one before; the later file is not this run's to count:
    keeping 1 kept it and deleted the checkpoint just written."""
    train(shards, tmp_path, "--max_steps", "15", "--checkpoint_every", "5", "--keep_checkpoints", "0")
    corrupt = tmp_path / "model_00015.pt"
    corrupt.write_bytes(corrupt.read_bytes()[:-100])  # torn
    train(shards, tmp_path, "--resume", "--max_steps", "12", "--keep_checkpoints", "1", "--checkpoint_every", "5")
    out = capsys.readouterr().out
    assert "skipping" in out and f"saved {tmp_path / 'model_00012.pt'}" in out
    assert checkpoint_names(tmp_path) == ["model_00012.pt", "model_00015.pt"]  # the run's newest, and the other one
    assert checkpoints.load_checkpoint(tmp_path / "model_00012.pt")["step"] == 12


def test_resume_takes_every_flag_of_the_run_from_its_checkpoint(shards, tmp_path, capsys):
    """Only the math flags and --log_dir came from the checkpoint: --keep_checkpoints fell back to 3 (model_00002.pt
    and model_00004.pt were deleted without a word), --data to edu_fineweb10B, --eval_every to 250. Now every flag not
    given is the checkpoint's, except the machine's, and a flag given that differs is said."""
    train(shards, tmp_path, "--max_steps", "8", "--checkpoint_every", "2", "--keep_checkpoints", "0",
        "--eval_every", "3", "--val_tokens", "128")
    train_gpt2.main(["--resume", str(tmp_path / "model_00008.pt"), "--max_steps", "12", "--device", "cpu",
                     "--dtype", "float32", "-B", "4"])
    out = capsys.readouterr().out
    assert "resuming with changed --max_steps 8 -> 12\n" in out  # and nothing else changed
    assert checkpoint_names(tmp_path) == [f"model_{s:05d}.pt" for s in (2, 4, 6, 8, 10, 12)]  # keep 0, every 2
    log = read_log(tmp_path / "log.txt")
    assert {s for s, kind in log if kind == "val"} == {0, 3, 6, 8, 9, 12}  # every 3 and at the end of each start
    straight = train(shards, tmp_path / "straight", "--max_steps", "12", "--checkpoint_every", "2", "--eval_every", "3",
                   "--val_tokens", "128", "--lr_horizon", "8")
    assert log[12, "val"] == straight[12, "val"]  # the same 128 val tokens of the same shards
    train_gpt2.main(["--resume", str(tmp_path / "model_00012.pt"), "--max_steps", "13", "--keep_checkpoints", "2",
                     "--device", "cpu", "--dtype", "float32"])
    out = capsys.readouterr().out
    # -B not given: the checkpoint's 4 (issue 31: the machine's default, 64 halved to 8, changed the accumulation, so
    # a --preset moliere run resumed without --preset summed its gradients in another order)
    assert "resuming with changed --max_steps 12 -> 13, --keep_checkpoints 0 -> 2\n" in out
    assert "256 tokens per step = 4 x 32 x 1 ranks x 2 accumulation steps" in out
    assert checkpoint_names(tmp_path) == ["model_00012.pt", "model_00013.pt"]


def test_the_table_says_what_resume_does_with_each_flag():
    """One list: the fields of TrainConfig, each marked; the machine's are the ones the issue names."""
    kinds = {f.name: f.metadata["on_resume"] for f in train_gpt2.dataclasses.fields(train_gpt2.TrainConfig)}
    assert set(kinds.values()) == {"math", "run", "machine", "command"}
    assert {k for k, v in kinds.items() if v == "machine"} == {"device", "dtype", "compile", "micro_batch_size",
                                                               "dist_timeout", "activation_checkpointing", "fsdp"}
    assert {k for k, v in kinds.items() if v == "command"} == {"resume", "sample", "log_dir", "temperature", "top_k",
                                                               "num_samples", "max_new_tokens"}  # --sample's own


# -- a diverged run is never saved or reported as a success -------------------------------------------------------

def test_a_nan_val_loss_stops_without_saving(shards, tmp_path, capsys):
    """The issue's run: val loss nan at step 1, then `saved model_00001.pt` and exit 0."""
    with pytest.raises(SystemExit) as exit_info:
        train(shards, tmp_path, "--max_lr", "1e9", "--warmup_steps", "0", "--max_steps", "1", "--checkpoint_every", "1",
            "--eval_every", "1")
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "the val loss is nan at step 1: the run diverged; stopping without saving" in err
    assert "No checkpoint of this run was saved" in err and len(err.splitlines()) == 1
    assert checkpoint_names(tmp_path) == []


def test_a_nan_val_loss_mid_run_leaves_the_earlier_checkpoints_as_they_were(shards, tmp_path, monkeypatch, capsys):
    """At a step that both evaluates and saves, the nan val loss was saved with the state (and the run went on)."""
    real = train_gpt2.evaluate_val
    calls = []

    def nan_on_the_third(*args, **kwargs):
        if args[2] > 1:  # (the one-batch probe before each checkpoint is not an evaluation)
            calls.append(1)
        return float("nan") if len(calls) == 3 and args[2] > 1 else real(*args, **kwargs)

    monkeypatch.setattr(train_gpt2, "evaluate_val", nan_on_the_third)
    with pytest.raises(SystemExit):
        train(shards, tmp_path, "--max_steps", "10", "--checkpoint_every", "3", "--eval_every", "3",
            "--keep_checkpoints", "0")
    assert "the val loss is nan at step 6" in capsys.readouterr().err
    assert checkpoint_names(tmp_path) == ["model_00003.pt"]
    assert checkpoints.load_checkpoint(tmp_path / "model_00003.pt", for_resume=True)["val_loss"] < 10


def test_an_inf_gradient_stops_before_the_update_and_no_nan_weights_are_saved(shards, tmp_path, monkeypatch, capsys):
    """A finite loss with an inf gradient: the update made every weight nan, and the next step's checkpoint (saved
    before its loss is known) held them."""
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def inf_on_the_fourth(parameters, max_norm):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == 4:
            parameters[0].grad[0, 0] = float("inf")
        return real(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_on_the_fourth)
    with pytest.raises(SystemExit):
        train(shards, tmp_path, "--max_steps", "10", "--checkpoint_every", "1", "--eval_every", "0",
            "--keep_checkpoints", "0")
    assert "the gradient norm is inf at step 3" in capsys.readouterr().err
    assert checkpoint_names(tmp_path)[-1] == "model_00003.pt"
    for path in tmp_path.glob("model_*.pt"):
        assert all(torch.isfinite(t).all() for t in GPT.from_checkpoint(path).state_dict().values()), path


def test_a_checkpoint_is_never_written_from_non_finite_weights(shards, tmp_path):
    cfg, _ = bookkeeping.parse_args(train_gpt2.TrainConfig, train_gpt2.PRESETS, TINY)
    world = train_gpt2.DistInfo(0, 0, 1, "cpu", "cpu", True)
    model = GPT(train_gpt2.GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32))
    (tmp_path / "log").mkdir()
    optimizers = model.configure_optimizers(0.1, 1e-3, "cpu")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 4] = float("nan")
    loader = ShardedLoader(shards, 4, 32, "train")
    with pytest.raises(common.UserError, match=r"not saving step 5: model.transformer.h.1.mlp.c_fc.weight hold nan"):
        checkpoints.save_checkpoint(tmp_path / "log", 5, model, optimizers, loader, 3.0, cfg, world)
    assert list((tmp_path / "log").iterdir()) == []
