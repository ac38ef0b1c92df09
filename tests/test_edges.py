"""Issue 31, the training side: the edges where a real run lost a model or failed silently. A checkpoint's name and
content agree and belong to the run; a diverged model is never saved; the last update's model is always kept; one
rank's own error reaches the user; a CPU checkpoint resumes fused on a GPU; a user's first commands work."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, read_log, train
from test_faults import error_of

import bookkeeping
import checkpoints
import common
import train_gpt2


def names(directory):
    return sorted(p.name for p in directory.glob("model_*.pt"))


# -- a checkpoint is what its name says, and the run's ------------------------------------------------------------

def test_a_renamed_copy_of_another_runs_checkpoint_is_refused_by_a_bare_resume(shards, tmp_path, capsys):
    """The issue's sequence: another run's model_00005.pt (seed 7) copied in as model_00020.pt; a bare --resume took
    it as the newest, adopted its flags, trained 5 -> 10 and overwrote this run's good model_00010.pt. Exit 0."""
    ours, other = tmp_path / "ours", tmp_path / "other"
    train(shards, ours, "--max_steps", "10", "--checkpoint_every", "5")
    train(shards, other, "--max_steps", "5", "--checkpoint_every", "5", "--seed", "7")
    shutil.copy(other / "model_00005.pt", ours / "model_00020.pt")
    good = (ours / "model_00010.pt").read_bytes()
    message = error_of(capsys, "--resume", "--log_dir", str(ours), "--max_steps", "10")
    assert "model_00020.pt holds step 5, not the step 20 its name says" in message
    assert (ours / "model_00010.pt").read_bytes() == good
    with pytest.raises(common.UserError, match="holds step 5, not the step 20"):  # every reader of the file
        train_gpt2.GPT.from_checkpoint(ours / "model_00020.pt")


def test_another_runs_checkpoint_under_its_own_name_is_not_adopted(shards, tmp_path, capsys):
    """The same step under the same name, but another run's: log.txt names the directory's run, the file another."""
    ours, other = tmp_path / "ours", tmp_path / "other"
    train(shards, ours, "--max_steps", "10", "--checkpoint_every", "5")
    train(shards, other, "--max_steps", "15", "--checkpoint_every", "15", "--seed", "7")
    shutil.copy(other / "model_00015.pt", ours / "model_00015.pt")
    message = error_of(capsys, "--resume", "--log_dir", str(ours), "--max_steps", "20")
    assert "model_00015.pt belongs to another run" in message and "log.txt records" in message
    assert names(ours) == ["model_00005.pt", "model_00010.pt", "model_00015.pt"]
    # moved out, the run continues from its own newest, and its checkpoints carry the id its log.txt names
    (ours / "model_00015.pt").unlink()
    train(shards, ours, "--resume", "--max_steps", "15", "--checkpoint_every", "5")
    run_id = checkpoints.run_of_log(ours / "log.txt")
    assert run_id and checkpoints.checkpoint_identity(ours / "model_00015.pt") == (run_id, 15)


def test_pruning_never_deletes_another_runs_checkpoint(shards, tmp_path):
    """Pruning went by names: keeping 1, another run's file with a lower step was deleted as this run's own."""
    ours, other = tmp_path / "ours", tmp_path / "other"
    train(shards, other, "--max_steps", "3", "--checkpoint_every", "1", "--keep_checkpoints", "0", "--seed", "7")
    train(shards, ours, "--max_steps", "4", "--checkpoint_every", "2", "--keep_checkpoints", "0")
    shutil.copy(other / "model_00001.pt", ours / "model_00001.pt")  # another run's, though its name fits
    train(shards, ours, "--resume", "--max_steps", "8", "--checkpoint_every", "2", "--keep_checkpoints", "1")
    assert names(ours) == ["model_00001.pt", "model_00008.pt"]  # the other run's file stays; this run keeps its newest
    assert checkpoints.checkpoint_identity(ours / "model_00001.pt")[0] != checkpoints.run_of_log(ours / "log.txt")


def test_resume_with_a_directory_continues_its_newest_checkpoint(shards, tmp_path, capsys):
    """--resume DIR said 'checkpoint DIR not found' for an existing directory."""
    train(shards, tmp_path / "run", "--max_steps", "4", "--checkpoint_every", "4")
    train_gpt2.main(["--resume", str(tmp_path / "run"), "--max_steps", "6"])
    assert f"resumed from {tmp_path / 'run' / 'model_00004.pt'} at step 4" in capsys.readouterr().out
    assert names(tmp_path / "run") == ["model_00004.pt", "model_00006.pt"]
    assert (6, "val") in read_log(tmp_path / "run" / "log.txt")


def test_resume_dir_and_another_log_dir_is_refused(shards, tmp_path, capsys):
    train(shards, tmp_path / "run", "--max_steps", "4", "--checkpoint_every", "4")
    other = tmp_path / "other"
    other.mkdir()
    message = error_of(capsys, *TINY, "--data", str(shards), "--resume", str(tmp_path / "run"), "--log_dir", str(other))
    assert "is a directory, and --log_dir names another" in message


# -- a diverged model is never saved, and the run says so ----------------------------------------------------------

def test_a_run_diverged_by_its_last_update_fails_and_saves_nothing(shards, tmp_path, capsys):
    """The issue's command: the weights after the one update are finite (about 5e8) but the loss is nan on any input;
    the run said "saved model_00001.pt" and exited 0, and hellaswag.py then scored that file."""
    message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(tmp_path), "--max_lr", "1e9",
                       "--warmup_steps", "0", "--max_steps", "1", "--eval_every", "0")
    assert "the loss of the model after step 1 is nan" in message and "No checkpoint of this run was saved" in message
    assert names(tmp_path) == []


def test_a_diverged_model_is_never_checkpointed_whatever_the_intervals(shards, tmp_path, monkeypatch, capsys):
    """--checkpoint_every 1 --eval_every 0: model_00004.pt was saved from weights that were finite but gave nan
    (their loss was never computed before the save), then the run stopped saying the checkpoints were untouched."""
    real_step = train_gpt2.train_step

    def ruin_after_step_3(model, optimizers, loader, step, *args):
        out = real_step(model, optimizers, loader, step, *args)
        if step == 3:  # an update that leaves every weight finite and the logits overflowing
            with torch.no_grad():
                model.lm_head.weight.mul_(1e38)
        return out

    monkeypatch.setattr(train_gpt2, "train_step", ruin_after_step_3)
    message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(tmp_path), "--checkpoint_every", "1",
                       "--eval_every", "0", "--keep_checkpoints", "0")
    assert "the loss of the model after step 4 is nan" in message
    assert f"The newest checkpoint, from before it: {tmp_path / 'model_00003.pt'}" in message
    assert names(tmp_path) == [f"model_{s:05d}.pt" for s in (1, 2, 3)]
    assert torch.isfinite(train_gpt2.GPT.from_checkpoint(tmp_path / "model_00003.pt").lm_head.weight).all()


def test_checkpoint_every_0_still_keeps_the_model_of_the_last_update(shards, tmp_path, capsys):
    """--checkpoint_every 0 trained and kept no model, exit 0, though the help said 'also one at the end'."""
    train(shards, tmp_path, "--checkpoint_every", "0", "--max_steps", "4")
    assert names(tmp_path) == ["model_00004.pt"]
    assert "saved" in capsys.readouterr().out
    assert "(0: only that one)" in train_gpt2.TrainConfig.__dataclass_fields__["checkpoint_every"].metadata["help"]


# -- errors: one line, from the rank that met them ----------------------------------------------------------------

FAIL_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {root!r})
import train_gpt2

real = train_gpt2.train_step

def train_step(model, optimizers, loader, step, *args):
    if os.environ["RANK"] == "1" and step == 2:  # this rank alone runs out of memory
        raise RuntimeError("CPU out of memory (tried to allocate 2.00 GiB)")
    return real(model, optimizers, loader, step, *args)

train_gpt2.train_step = train_step
train_gpt2.main()
"""


@pytest.mark.slow
def test_an_error_on_one_rank_alone_is_printed_by_that_rank(shards, tmp_path):
    """Errors printed on rank 0 only: when rank 1 alone ran out of memory the user saw rank 0's connection error
    (a traceback), and the -B advice was printed zero times."""
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1.format(root=str(ROOT)))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *TINY, "--data", str(shards), "--log_dir", str(tmp_path / "log"),
                          "--dist_timeout", "60"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("train_gpt2.py: error:")]
    advice = [line for line in lines if "[rank 1 of 2] out of CPU memory at step 2 with -B 4" in line]
    assert len(advice) == 1 and "-B 2" in advice[0], out.stderr[-3000:]
    assert 'train_gpt2.py", line' not in out.stderr, out.stderr[-3000:]  # no traceback of ours, on any rank
    assert all("[rank 1" in line or "[rank 0 of 2] stopped at step" in line for line in lines), lines


def test_a_second_ctrl_c_is_one_line_not_a_traceback(shards, tmp_path, monkeypatch, capsys):
    def second_ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_gpt2, "train_step", second_ctrl_c)
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main([*TINY, "--data", str(shards), "--log_dir", str(tmp_path)])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err == "train_gpt2.py: interrupted, without saving; --resume continues from the newest checkpoint"


def test_shared_errors_print_once_per_node_and_a_ranks_own_error_by_it(capsys):
    """report_error's rule, rank by rank: a flag problem (every rank's) once, by each node's first rank; an
    out-of-memory (RankError) by the rank that met it, naming it."""
    def worlds():
        return [train_gpt2.DistInfo(r, r % 2, 4, "cpu", "cpu", r == 0) for r in range(4)]  # 2 nodes of 2

    for world in worlds():
        bookkeeping.report_error("p", common.UserError("bad flag"), world)
    assert capsys.readouterr().err.splitlines() == ["p: error: bad flag", "p: error: [rank 2 of 4] bad flag"]
    for world in worlds():
        error = bookkeeping.RankError("out of memory") if world.rank == 3 else common.UserError("x")
        if world.rank in (1, 3):
            bookkeeping.report_error("p", error, world)
    assert capsys.readouterr().err.splitlines() == ["p: error: [rank 3 of 4] out of memory"]


# -- resuming across devices with fused AdamW -----------------------------------------------------------------------

def test_fused_adamw_is_set_before_its_state_is_placed(monkeypatch):
    """restore_checkpoint turned fused on after load_state_dict had placed the `step` counters by the saved, unfused
    groups (left on the CPU): the fused CUDA kernel then got CPU tensors. Torch runs fused AdamW on CPUs too, so the
    placement is checked here: load_state_dict must see the fused flag of the optimizer the run built."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    saved_opt = torch.optim.AdamW(params, lr=0.1, fused=False)  # as a CPU run saves it
    sum(p.sum() for p in params).backward()
    saved_opt.step()
    state = {"optimizer": [saved_opt.state_dict()], "loaders": [{}], "rng": [None]}
    fused = torch.optim.AdamW(params, lr=0.1, fused=True)  # as a CUDA run builds it
    seen = []
    real = torch.optim.Optimizer._process_value_according_to_param_policy

    def spy(param, value, param_id, param_groups, key=None):
        if key == "step":
            seen.append(next(g for g in param_groups if param_id in g["params"])["fused"])
        return real(param, value, param_id, param_groups, key)

    monkeypatch.setattr(torch.optim.Optimizer, "_process_value_according_to_param_policy", staticmethod(spy))
    loader = type("Loader", (), {"load_state_dict": lambda self, s: None})()
    monkeypatch.setattr(checkpoints, "set_rng_state", lambda *a: None)
    world = train_gpt2.DistInfo(0, 0, 1, "cpu", "cuda", True)  # a CUDA run (device_type), tensors on this CPU
    checkpoints.restore_checkpoint(state, [fused], loader, world)
    assert seen == [True, True] and fused.param_groups[0]["fused"] is True
    fused.step()  # and the fused kernel runs on the restored state
    assert all(s["step"].device == p.device for p, s in fused.state.items())


# -- a new user's first commands ----------------------------------------------------------------------------------

def test_the_fetch_by_hand_command_creates_the_folder(tmp_path, monkeypatch):
    """`curl ... -o input/moliere.txt` stopped with 'Failure writing output' on a fresh clone: no input/ yet."""
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(common.UserError) as error:
        common.download_moliere(tmp_path / "input" / "moliere.txt")
    assert f"`curl -L --create-dirs -o {tmp_path / 'input' / 'moliere.txt'} {common.MOLIERE_URL}`" in str(error.value)
    assert not (tmp_path / "input").exists()  # which is why curl must make it


def test_a_run_that_would_read_a_small_corpus_thousands_of_times_is_refused_before_any_work(tmp_path, capsys):
    """`python train_gpt2.py --data story.txt` (a README example) started GPT-2 124M for 19,073 steps, 180,840 epochs,
    on a CPU without a word, then failed on the HellaSwag download, leaving log/ behind."""
    story = tmp_path / "story.txt"
    story.write_text("Once upon a time there was a small model that read the same story again and again. " * 600)
    message = error_of(capsys, "--data", str(story), "--log_dir", str(tmp_path / "log"), "--device", "cpu")
    assert "19,073 steps of 524,288 tokens would read them" in message and "--preset moliere --data" in message
    assert not (tmp_path / "log").exists()


def test_the_readme_shows_the_cpu_sized_way_to_train_on_a_text_file():
    readme = (ROOT / "README.md").read_text()
    assert "python train_gpt2.py --preset moliere --data story.txt" in readme
    assert "python train_gpt2.py --data story.txt " not in readme


def test_a_failed_evaluation_download_leaves_no_log_dir(shards, tmp_path, monkeypatch, capsys):
    """The HellaSwag download ran inside the run, after log_dir was made: a failure left log/ behind."""
    import hellaswag

    def offline(split):
        raise common.UserError("could not download hellaswag_val.jsonl (network is unreachable)")

    monkeypatch.setattr(hellaswag, "download", offline)
    message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(tmp_path / "log"), "--hellaswag_every",
                       "5")
    assert "network is unreachable" in message and not (tmp_path / "log").exists()


# -- the log_dir a run writes into is the one it locked --------------------------------------------------------------

def test_a_run_never_writes_into_a_log_dir_made_again_under_its_name(shards, tmp_path, monkeypatch, capsys):
    """The lock lived inside the directory: a SIGTERMed run still finishing its step saved into a new run's
    directory of the same name, after the user deleted and recreated it."""
    log_dir = tmp_path / "log"
    real_step = train_gpt2.train_step

    def replace_directory_at_step_3(model, optimizers, loader, step, *args):
        if step == 3:
            shutil.rmtree(log_dir)
            log_dir.mkdir()  # a new run of the same name
            (log_dir / "log.txt").write_text("# the new run's log\n")
        return real_step(model, optimizers, loader, step, *args)

    monkeypatch.setattr(train_gpt2, "train_step", replace_directory_at_step_3)
    message = error_of(capsys, *TINY, "--data", str(shards), "--log_dir", str(log_dir), "--checkpoint_every", "5")
    assert "was deleted or replaced while this run was writing into it" in message
    assert sorted(p.name for p in log_dir.iterdir()) == ["log.txt"]
    assert (log_dir / "log.txt").read_text() == "# the new run's log\n"


# -- Hugging Face exports: damaged, incomplete, or not GPT-2's vocabulary -------------------------------------------

def small_model(vocab_size=50304):
    torch.manual_seed(0)
    return train_gpt2.GPT(train_gpt2.GPTConfig(block_size=16, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16))


def test_a_truncated_export_is_one_line_for_every_reader(shards, tmp_path, capsys):
    """A truncated model.safetensors gave a safetensors traceback from --init_from DIR, hellaswag.py -m DIR and
    GPT.from_pretrained."""
    small_model().save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # (transformers' progress bar while writing it)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    with pytest.raises(common.UserError, match="its weights file is damaged"):
        train_gpt2.GPT.from_pretrained(str(tmp_path / "hf"))
    message = error_of(capsys, *train_gpt2_run_flags(shards, tmp_path), "--init_from", str(tmp_path / "hf"))
    assert "its weights file is damaged" in message


def train_gpt2_run_flags(shards, tmp_path):
    from conftest import TINY_RUN

    return [*TINY_RUN, "-T", "16", "--data", str(shards), "--log_dir", str(tmp_path / "log")]


def test_an_export_missing_a_weight_is_refused_not_filled_with_random_numbers(tmp_path):
    """transformers fills a tensor missing from model.safetensors with random numbers, with only a warning."""
    from safetensors.torch import load_file, save_file

    small_model().save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    missing = next(k for k in weights if k.endswith("mlp.c_fc.weight"))
    del weights[missing]
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(common.UserError, match=f"its weights file lacks {missing}"):
        train_gpt2.GPT.from_pretrained(str(tmp_path / "hf"))


def test_a_vocabulary_smaller_than_the_tokenizer_is_not_exported_with_it(tmp_path):
    """A gpt2-recipe model with vocab_size 1000 was exported with GPT-2's 50,257-token tokenizer."""
    with pytest.raises(common.UserError, match="vocabulary has 1000 ids, fewer than GPT-2's tokenizer's 50,257"):
        small_model(vocab_size=1000).save_pretrained(tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_what_a_run_writes_never_lands_on_what_it_reads(tmp_path, capsys):
    """--data log/log.txt: a fresh run renamed the data to log.prev.txt, a resume appended its records to it."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    text = "A corpus that happens to be called log.txt. " * 300
    (log_dir / "log.txt").write_text(text)
    message = error_of(capsys, *TINY, "--data", str(log_dir / "log.txt"), "--log_dir", str(log_dir))
    assert f"--log_dir {log_dir / 'log.txt'} is the same file as --data {log_dir / 'log.txt'}" in message
    assert "choose another --log_dir" in message and (log_dir / "log.txt").read_text() == text
