"""Training end to end: loader order and memory, LR schedule, the loop, DDP equivalence, bad input."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import bookkeeping
import train_gpt2
from conftest import ROOT, SHARED, TINY, TINY_RUN, lrs_of, read_log, torchrun_cpu, write_shards
from train_gpt2 import ShardedLoader, get_lr



# -- the loader ---------------------------------------------------------------------------------------------

def test_one_epoch_serves_every_window_once_across_ranks(tmp_path):
    data = write_shards(tmp_path / "d", [500, 3300, 2600])  # windows of T+1 = 33 tokens: 103 + 81 per epoch
    T, B, W = 32, 4, 2
    loaders = [ShardedLoader(data, B, T, "train", rank=r, world_size=W, seed=5) for r in range(W)]
    expected = sorted(tuple(np.load(p)[i * T: i * T + T + 1].tolist()) for p in sorted(data.glob("*train*"))
                      for i in range((len(np.load(p)) - 1) // T))
    assert loaders[0].epoch_windows == len(expected) == 184
    served = {r: [] for r in range(W)}
    for _ in range(184 // (B * W)):  # 23 micro-batches per rank = every window of the epoch
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch()
            assert x.dtype == torch.int64 and x.shape == y.shape == (B, T) and torch.equal(x[:, 1:], y[:, :-1])
            served[r] += [tuple(row.tolist()) + (int(last),) for row, last in zip(x, y[:, -1])]
    assert not set(served[0]) & set(served[1])  # no overlap between ranks
    assert sorted(served[0] + served[1]) == expected  # each window exactly once


def test_order_is_seeded_shuffled_and_new_each_epoch(shards):
    def first_epoch(seed, epochs=2):
        loader = ShardedLoader(shards, 4, 32, "train", seed=seed)
        n = loader.epoch_windows  # 343 windows: batches run across the epoch boundary
        rows = torch.cat([loader.next_batch()[0] for _ in range(epochs * n // 4)])
        return rows[:n], rows[n:2 * n - 4]

    a1, a2 = first_epoch(1)
    b1, _ = first_epoch(1)
    c1, _ = first_epoch(2)
    assert torch.equal(a1, b1)  # same seed, same order
    assert not torch.equal(a1, c1)  # another seed, another order
    assert not torch.equal(a1[:len(a2)], a2)  # the second epoch is reshuffled...
    assert set(map(tuple, a2.tolist())) <= set(map(tuple, a1.tolist()))  # ...over the same windows


def test_world_size_does_not_change_the_global_order(shards):
    one = ShardedLoader(shards, 4, 32, "train", seed=3)
    two = [ShardedLoader(shards, 4, 32, "train", rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(10):  # 1 process with accumulation 2 == 2 ranks with accumulation 1
        for r in range(2):
            assert torch.equal(one.next_batch()[0], two[r].next_batch()[0])


def test_val_is_read_in_order_and_reset(shards):
    loader = ShardedLoader(shards, 2, 32, "val", seed=9)
    tokens = np.load(shards / "edufineweb_val_000000.npy").astype(np.int64)
    x, _ = loader.next_batch()
    assert torch.equal(x, torch.from_numpy(np.stack([tokens[:32], tokens[32:64]])))
    loader.next_batch()
    loader.reset()
    assert torch.equal(loader.next_batch()[0], x)


def test_state_dict_resumes_the_exact_position_on_another_world_size(shards):
    two = [ShardedLoader(shards, 4, 32, "train", rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(7):
        for loader in two:
            loader.next_batch()
    state = two[0].state_dict()
    assert state == two[1].state_dict()  # a global position: the same on every rank
    one = ShardedLoader(shards, 4, 32, "train", seed=3)
    one.load_state_dict(state)
    for _ in range(5):
        for loader in two:
            assert torch.equal(one.next_batch()[0], loader.next_batch()[0])


def test_text_file_source_is_tokenized_and_split_90_10(tmp_path):
    text = "Le Misanthrope, comédie. " * 200
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    tokens = [50256] + train_gpt2.get_tokenizer().encode_ordinary(text)
    cut = int(0.9 * len(tokens))
    train, val = ShardedLoader(path, 1, 16, "train"), ShardedLoader(path, 1, 16, "val")
    assert train.epoch_windows == (cut - 1) // 16 and val.epoch_windows == (len(tokens) - cut - 1) // 16
    x, y = val.next_batch()
    assert x[0].tolist() == tokens[cut:cut + 16] and y[0].tolist() == tokens[cut + 1:cut + 17]


def test_shards_are_memory_mapped(shards):
    loader = ShardedLoader(shards, 4, 32, "train")
    assert all(isinstance(a, np.memmap) for a in loader.arrays)


@pytest.mark.slow
def test_anonymous_memory_stays_flat_while_reading_two_large_shards(tmp_path):
    """Reading every window of two 20M-token shards adds far less than 64 MiB of anonymous memory."""
    data = tmp_path / "big"
    data.mkdir()
    for i in range(3):
        np.save(data / f"big_{'val' if i == 0 else 'train'}_{i:06d}.npy",
                np.zeros(1000 if i == 0 else 20_000_000, np.uint16))
    code = f"""
import train_gpt2
def anon_kb():
    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1])
loader = train_gpt2.ShardedLoader({str(data)!r}, 64, 1024, 'train')
loader.next_batch()
start = anon_kb()
for _ in range(loader.epoch_windows // 64):
    loader.next_batch()
print(anon_kb() - start)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 64 * 1024


# -- the schedule --------------------------------------------------------------------------------------------

def test_get_lr_warmup_cosine_and_floor():
    lr = lambda step: get_lr(step, max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=100)  # noqa: E731
    assert lr(0) == pytest.approx(6e-4 / 10)
    assert lr(9) == pytest.approx(6e-4)  # the end of warmup
    assert lr(10) == pytest.approx(6e-4)  # the top of the cosine
    assert lr(55) == pytest.approx((6e-4 + 6e-5) / 2)  # halfway down
    assert lr(100) == pytest.approx(6e-5) and lr(500) == pytest.approx(6e-5)


def test_a_longer_max_steps_on_resume_continues_at_min_lr(shards, tmp_path, capsys):
    """The README's "carry on" example: the horizon stays that of the run's start, the LR never rises."""
    args = TINY + ["--data", str(shards), "--log_dir", str(tmp_path), "--eval_every", "0", "--checkpoint_every", "6"]
    train_gpt2.main(args + ["--max_steps", "6"])
    first = lrs_of(capsys.readouterr().out)
    train_gpt2.main(args + ["--max_steps", "10", "--resume"])
    out = capsys.readouterr().out
    later = lrs_of(out)
    assert sorted(later) == [6, 7, 8, 9] and all(lr == pytest.approx(1e-3) for lr in later.values())  # min_lr
    assert first[5] >= later[6]  # no jump at the seam
    assert "cosine to 1.00e-03 at step 6, then 1.00e-03 until step 10" in out
    # a new horizon would rewrite the LR of steps already taken: refused
    with pytest.raises(SystemExit):
        train_gpt2.main(args + ["--max_steps", "14", "--lr_horizon", "14", "--resume"])
    assert "--lr_horizon 14 would change the learning rate" in capsys.readouterr().err


def test_a_new_horizon_is_taken_while_the_schedule_is_unchanged(shards, tmp_path, capsys):
    """Resuming during warmup, the LR so far does not depend on the horizon: a longer schedule is accepted."""
    args = TINY + ["--data", str(shards), "--log_dir", str(tmp_path), "--eval_every", "0", "--warmup_steps", "4"]
    train_gpt2.main(args + ["--max_steps", "6", "--checkpoint_every", "2"])
    (tmp_path / "model_00004.pt").unlink()
    (tmp_path / "model_00006.pt").unlink()
    capsys.readouterr()
    train_gpt2.main(args + ["--max_steps", "12", "--lr_horizon", "12", "--checkpoint_every", "0", "--resume"])
    lrs = lrs_of(capsys.readouterr().out)
    expected = {s: get_lr(s, 1e-2, 1e-3, 4, 12) for s in range(2, 12)}
    assert lrs == pytest.approx(expected, rel=1e-4)  # stdout prints 5 significant digits


def test_warmup_as_long_as_the_run_is_refused(tmp_path, capsys):
    err = run_cli(TINY + ["--data", str(tmp_path), "--warmup_steps", "715", "--max_steps", "200"], tmp_path, capsys)
    assert "--warmup_steps 715 must be fewer than --max_steps 200" in err


def test_help_shows_one_default_per_flag_and_the_presets(capsys):
    with pytest.raises(SystemExit):
        bookkeeping.parse_args(train_gpt2.TrainConfig, train_gpt2.PRESETS, ["--preset", "moliere", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "optimizer steps (default: 200)" in out and "tokens per optimizer step (default: 8192)" in out
    assert "2**19" not in out and "10B" not in out  # the full recipe's rationale is not the preset's
    assert "(default: input/moliere.txt)" in out and "(default: 19073)" not in out
    assert "longest context; 0: 1024 (default: 0)" not in out and "(default: 128)" in out
    assert not re.search(r"\(default[^)]*\) \(default", out)


# -- the loop ------------------------------------------------------------------------------------------------

def test_smoke_30_steps_loss_falls(shards, tmp_path, capsys):
    log_dir = tmp_path / "log"
    train_gpt2.main(TINY + ["--data", str(shards), "--log_dir", str(log_dir), "--max_steps", "30",
                            "--eval_every", "30", "--warmup_steps", "5"])
    log = read_log(log_dir / "log.txt")
    losses = [float(log[s, "train"]) for s in range(30)]
    assert losses[0] > 4.5  # about ln(128) = 4.85 at the start
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
    assert float(log[30, "val"]) < 0.6 * float(log[0, "val"])
    header = open(log_dir / "log.txt").read().splitlines()[:2]
    assert header[0].startswith("# run") and "torch" in header[0] and header[1].startswith("# config {")
    out = capsys.readouterr().out
    assert "step    29 | loss" in out and "tok/sec" in out


def test_sample_needs_no_data_and_no_log_dir(shards, tmp_path, capsys):
    """The README's `--init_from ... --sample PROMPT`: samples from the model, reads no data, writes nothing."""
    log_dir = tmp_path / "log"
    train_gpt2.main(TINY + ["--data", str(shards), "--log_dir", str(log_dir), "--max_steps", "4",
                            "--checkpoint_every", "4"])
    nowhere = tmp_path / "nowhere"
    base = TINY_RUN  # no shape flags: --init_from fixes the shape
    train_gpt2.main(base + ["--init_from", str(log_dir / "model_00004.pt"), "--data", str(nowhere / "data"),
                            "--log_dir", str(nowhere), "--sample", "A"])  # "A" is token 32: in TINY's 128
    out = capsys.readouterr().out
    samples = [line for line in out.splitlines() if line.startswith("> ")]
    assert len(samples) == 4 and all(line.startswith("> A") for line in samples) and not nowhere.exists()
    with pytest.raises(SystemExit):  # "Hello" is token 15496: outside the vocabulary, one line
        train_gpt2.main(base + ["--init_from", str(log_dir / "model_00004.pt"), "--data", str(nowhere / "data"),
                                "--log_dir", str(nowhere), "--sample", "Hello"])
    assert "has tokens outside the model's vocabulary of 128" in capsys.readouterr().err


def test_log_has_a_line_per_step_and_evals_after_the_last(shards, tmp_path):
    log_dir = tmp_path / "log"
    train_gpt2.main(TINY + ["--data", str(shards), "--log_dir", str(log_dir), "--max_steps", "7",
                            "--eval_every", "3"])
    assert sorted(read_log(log_dir / "log.txt")) == sorted(
        [(s, "train") for s in range(7)] + [(s, "val") for s in (0, 3, 6, 7)])


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process_with_twice_the_accumulation(shards, tmp_path):
    args = TINY + ["--data", str(shards), "--max_steps", "6", "--eval_every", "3"]
    torchrun_cpu(args, tmp_path / "ddp")
    train_gpt2.main(args + ["--log_dir", str(tmp_path / "single")])
    ddp, single = read_log(tmp_path / "ddp" / "log.txt"), read_log(tmp_path / "single" / "log.txt")
    assert sorted(ddp) == sorted(single)
    for key in single:
        assert abs(float(ddp[key]) - float(single[key])) <= 1e-4, key
    assert " | cpu x 2 | " in open(tmp_path / "ddp" / "log.txt").readline()  # the header names the world size


# -- bad input: one line on stderr, no traceback, nothing written --------------------------------------------

def run_cli(args, tmp_path, capsys):
    """main(argv) in-process: a non-zero exit, one line on stderr, no traceback, nothing written."""
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main([*args, "--log_dir", str(tmp_path / "log")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and not (tmp_path / "log").exists()
    return err


@pytest.mark.parametrize("case, expected", [
    ("missing dir", "nowhere is missing .no such file or directory., not a shard directory.*python fineweb.py"),
    ("empty dir", "no shards .* in .*python fineweb.py"),
    ("int32 shard", "expected a 1-D uint16 token array, found int32"),
    ("indivisible batch", r"--total_batch_size 1000 is not divisible by B\*T\*world_size = 4\*32\*1 = 128"),
    ("T > block_size", "-T 64 is longer than the model's block_size 32"),
    ("unknown preset", "invalid choice: 'gpt5'"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, case, expected):
    data = write_shards(tmp_path / "shards", [1000, 1000])
    args = TINY + ["--data", str(data)]
    if case == "missing dir":
        args[-1] = str(tmp_path / "nowhere")
    elif case == "empty dir":
        (tmp_path / "empty").mkdir()
        args[-1] = str(tmp_path / "empty")
    elif case == "int32 shard":
        np.save(data / "edufineweb_train_000001.npy", np.arange(1000, dtype=np.int32))
    elif case == "indivisible batch":
        args += ["--total_batch_size", "1000"]
    elif case == "T > block_size":
        args += ["-T", "64"]
    elif case == "unknown preset":
        args += ["--preset", "gpt5"]
    lines = run_cli(args, tmp_path, capsys).splitlines()
    assert lines[-1].startswith("train_gpt2.py: error:") and re.search(expected, lines[-1]), lines
    assert len(lines) == 1 or lines[0].startswith("usage:")  # argparse's errors come after its usage line


def test_indivisible_batch_names_the_valid_micro_batch_sizes(tmp_path, capsys):
    message = run_cli(TINY + ["--data", str(tmp_path), "--total_batch_size", "384", "-B", "5"], tmp_path, capsys)
    assert "valid -B values: [1, 2, 3, 4, 6, 12]" in message


@pytest.mark.slow
def test_hellaswag_and_core_in_the_loop_two_ranks_equal_one_process(shards, tmp_path):
    """Each rank scores a share; the summed counts give the scores of everything in one process, which are those of
    hellaswag.py's and core.py's own scorers on the checkpoint."""
    import core
    import hellaswag
    from test_core import write_bundle
    from test_hellaswag import make_examples, write_examples

    data_file = write_examples(tmp_path / "hella.jsonl", make_examples(n=14, seed=3))
    bundle = write_bundle(tmp_path / "eval_bundle")
    args = TINY + ["--data", str(shards), "--vocab_size", "50304", "--block_size", "128", "--max_steps", "2",
                   "--warmup_steps", "1", "--eval_every", "0", "--checkpoint_every", "2",
                   "--hellaswag_every", "2", "--hellaswag_data", str(data_file), "--core_every", "2",
                   "--core_bundle", str(bundle)]
    torchrun_cpu(args, tmp_path / "ddp")
    train_gpt2.main(args + ["--log_dir", str(tmp_path / "single")])
    ddp, single = read_log(tmp_path / "ddp" / "log.txt"), read_log(tmp_path / "single" / "log.txt")
    for key in ((0, "hella"), (2, "hella"), (0, "core"), (2, "core")):
        assert ddp[key] == single[key], key
    model = train_gpt2.GPT.from_checkpoint(tmp_path / "single" / "model_00002.pt")
    result = hellaswag.evaluate(model, list(hellaswag.iterate_examples("val", data_file)), "cpu")
    assert single[2, "hella"] == f"{result['acc_norm']:.4f}" and result["n"] == 14
    tasks = core.load_tasks(bundle)
    score = core.summarize(tasks, core.evaluate(model, tasks, core.render(tasks), "cpu"))["core"]
    assert single[2, "core"] == f"{score:.4f}"


# -- the quick start's corpus and starting from Hugging Face weights ------------------------------------------

SHARED_MOLIERE = SHARED / "data" / "moliere.txt"


def test_moliere_download_checks_the_sha256_and_leaves_nothing_on_failure(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("not Moliere")
    target = tmp_path / "input" / "moliere.txt"
    with pytest.raises(common.UserError, match="sha256.*curl -L"):
        common.download(bad.as_uri(), target, sha256=common.MOLIERE_SHA256)
    with pytest.raises(common.UserError, match="could not download"):
        common.download((tmp_path / "missing.txt").as_uri(), target, sha256=common.MOLIERE_SHA256)
    assert not target.parent.exists()  # no partial or unverified file, and no input/ folder it made
    if SHARED_MOLIERE.exists():  # the real corpus, served from the workplace's copy instead of GitHub
        common.download(SHARED_MOLIERE.as_uri(), target, sha256=common.MOLIERE_SHA256)
        assert target.read_bytes() == SHARED_MOLIERE.read_bytes()


@pytest.mark.skipif(not SHARED_MOLIERE.exists(), reason="needs the Moliere corpus")
def test_a_failed_download_says_how_to_fetch_and_check_by_hand_in_two_runnable_commands(tmp_path, monkeypatch):
    """The message ran the fetch and the check together (`curl -L URL -o FILE sha256sum FILE -> HASH`): copied as it
    stood, a broken command. Each command is now quoted on its own; here the check is run as printed, on a good and
    a damaged copy, and the fetch is parsed as a shell would."""
    import shlex

    monkeypatch.chdir(tmp_path)
    target = Path("input dir") / "moliere.txt"  # a space, so that quoting matters
    with pytest.raises(common.UserError) as info:
        common.download((tmp_path / "missing.txt").as_uri(), target, sha256=common.MOLIERE_SHA256)
    commands = re.findall(r"`([^`]+)`", str(info.value))
    assert len(commands) == 2, str(info.value)
    fetch, check = commands
    assert shlex.split(fetch) == ["curl", "-L", "--create-dirs", "-o", str(target), (tmp_path / "missing.txt").as_uri()]
    target.parent.mkdir()
    target.write_bytes(SHARED_MOLIERE.read_bytes())  # as curl would have fetched it
    assert subprocess.run(["bash", "-c", check], capture_output=True).returncode == 0
    target.write_bytes(SHARED_MOLIERE.read_bytes()[:-1])
    assert subprocess.run(["bash", "-c", check], capture_output=True).returncode != 0


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MOLIERE.exists(), reason="needs the Moliere corpus")
def test_moliere_preset_runs_and_samples(tmp_path, capsys):
    train_gpt2.main(["--preset", "moliere", "--data", str(SHARED_MOLIERE), "--log_dir", str(tmp_path),
                     "--max_steps", "2", "--warmup_steps", "1", "--eval_every", "2", "--val_tokens", "4096",
                     "--sample_every", "2"])
    out = capsys.readouterr().out
    assert "8,192 tokens per step = 32 x 128 x 1 ranks x 2 accumulation steps" in out
    assert "steps 0 to 2: 16,384 tokens" in out  # the header says how long the run will be
    assert re.search(r"^step     1 \| loss .* \| 2/2 \(100%\), \d+s left$", out, re.M)  # where it is, and the time left
    assert out.count("> sganarelle:") == 8  # 4 samples at step 0, 4 after the last step
    log = read_log(tmp_path / "log.txt")
    assert float(log[2, "val"]) < float(log[0, "val"]) and (tmp_path / "model_00002.pt").exists()


def test_init_from_a_hugging_face_directory(shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                                         vocab_size=128)).save_pretrained(hf_dir)
    train_gpt2.main(TINY_RUN + ["--data", str(shards), "--log_dir", str(tmp_path / "log"), "--init_from", str(hf_dir),
                            "--max_steps", "1", "--warmup_steps", "0", "--eval_every", "1"])
    model = train_gpt2.GPT.from_pretrained(hf_dir).eval()
    val = ShardedLoader(shards, 4, 32, "val")
    with torch.no_grad():
        expected = sum(model(*val.next_batch())[1].item() for _ in range(2)) / 2
    assert read_log(tmp_path / "log" / "log.txt")[0, "val"] == f"{expected:.4f}"  # the HF weights, untrained
    with pytest.raises(SystemExit):  # its shape is the checkpoint's: shape flags are refused
        train_gpt2.main(TINY + ["--data", str(shards), "--log_dir", str(tmp_path / "x"), "--init_from", str(hf_dir)])


@pytest.mark.slow
def test_running_the_script_never_loads_a_second_copy_of_itself(shards, tmp_path):
    """Run as a script, train_gpt2 is __main__; if anything it imports (hellaswag.py) imported train_gpt2 back,
    a second copy with its own GPT and UserError classes would load, and its errors would escape main()."""
    from test_hellaswag import make_examples, write_examples

    data_file = write_examples(tmp_path / "hella.jsonl", make_examples(n=4, seed=1))
    argv = ["train_gpt2.py", *TINY, "--data", str(shards), "--log_dir", str(tmp_path / "log"), "--vocab_size",
            "50304", "--block_size", "128", "--max_steps", "1", "--warmup_steps", "0", "--hellaswag_every", "1",
            "--hellaswag_data", str(data_file)]
    code = ("import runpy, sys\n"
            f"sys.argv = {argv!r}\n"
            "runpy.run_path('train_gpt2.py', run_name='__main__')\n"
            "assert 'train_gpt2' not in sys.modules, 'a second copy of train_gpt2 was loaded'\n"
            "assert 'hellaswag' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HellaSwag" in out.stdout  # the in-loop evaluation ran through hellaswag.py


@pytest.mark.slow
def test_destroying_the_process_group_stops_its_threads(tmp_path):
    """DDP must not leave gloo's threads running into interpreter shutdown, where a late one made a rank abort
    ("terminate called without an active exception", 3 runs in 27): after destroy_process_group only the main
    thread is left."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train_gpt2\n"
        "world = train_gpt2.setup_distributed('cpu')\n"
        "model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))\n"
        "model(torch.ones(2, 4)).sum().backward()\n"
        "del model\n"
        "torch.distributed.barrier()\n"
        "torch.distributed.destroy_process_group()\n"
        "names = sorted(open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task'))\n"
        "print('threads', world.rank, names)\n"
        "assert not any('gloo' in n for n in names), names\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("threads") == 2


# -- resuming from a checkpoint of another directory ----------------------------------------------------------

def test_resume_path_continues_in_its_own_directory_with_its_recipe(shards, tmp_path, monkeypatch, capsys):
    """The README's extension of the modern quick start: `--preset moliere --resume log_moliere_modern/...` without
    --log_dir appended to the gpt2 run's log_moliere/log.txt (the preset's --log_dir) and saved its checkpoint there,
    and the stop message's advice failed with `--recipe gpt2 -> modern`. The run's directory and its recipe now come
    from the checkpoint."""
    monkeypatch.chdir(tmp_path)
    tiny = TINY + ["--data", str(shards), "--warmup_steps", "1", "--eval_every", "2", "--checkpoint_every", "2"]
    train_gpt2.main(["--preset", "moliere", *tiny, "--max_steps", "4"])
    train_gpt2.main(["--preset", "moliere", "--recipe", "modern", "--log_dir", "log_moliere_modern", *tiny,
                     "--max_steps", "4"])
    gpt2_log = (tmp_path / "log_moliere" / "log.txt").read_text()
    capsys.readouterr()
    train_gpt2.main(["--preset", "moliere", "--resume", "log_moliere_modern/model_00002.pt", *tiny,
                     "--log_dir", "log_moliere_modern_6", "--lr_horizon", "6", "--max_steps", "6"])
    out = capsys.readouterr().out
    assert "resumed from log_moliere_modern/model_00002.pt at step 2" in out and "linear decay to 0 at step 6" in out
    assert (tmp_path / "log_moliere" / "log.txt").read_text() == gpt2_log  # the gpt2 run untouched
    assert sorted(p.name for p in (tmp_path / "log_moliere").glob("model_*.pt")) == ["model_00002.pt",
                                                                                     "model_00004.pt"]
    assert (6, "val") in read_log(tmp_path / "log_moliere_modern_6" / "log.txt")
    # sampling from it needs no --recipe either
    train_gpt2.main(["--resume", "log_moliere_modern_6/model_00006.pt", "--sample", "A", "--device", "cpu"])
    assert capsys.readouterr().out.count("> A") == 4  # ("A" is GPT-2's id 32: inside the tiny vocabulary)


def test_resume_into_another_runs_directory_is_refused(shards, tmp_path, capsys):
    base = TINY + ["--data", str(shards), "--warmup_steps", "1", "--checkpoint_every", "2", "--max_steps", "2"]
    train_gpt2.main(base + ["--log_dir", str(tmp_path / "a")])
    train_gpt2.main(base + ["--log_dir", str(tmp_path / "b")])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_gpt2.main(base + ["--log_dir", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "model_00002.pt"),
                                "--max_steps", "4"])
    err = capsys.readouterr().err
    assert f"--log_dir {tmp_path / 'b'} holds another run" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "b").glob("model_*.pt")) == ["model_00002.pt"]


def test_a_shard_directory_with_only_the_val_shard_names_the_cause(tmp_path, capsys):
    """A corpus smaller than fineweb.py's --shard_size gives only the val shard; the trainer said "make shards with
    python fineweb.py", the command just run."""
    data = write_shards(tmp_path / "shards", [5000])
    with pytest.raises(SystemExit):
        train_gpt2.main(TINY + ["--data", str(data), "--log_dir", str(tmp_path / "log")])
    err = capsys.readouterr().err
    assert "smaller --shard_size" in err and "make shards with" not in err
