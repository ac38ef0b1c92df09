"""The README is a promise: its commands run as written. Every `python train_gpt2.py` line parses; the ones that need
neither the network, a GPU nor the full dataset run, in the README's order, in one directory, as a user following it
would run them (the Molière preset made tiny, so that 200 steps take seconds)."""
import json
import re
import shlex

import pytest
from conftest import ROOT, read_log, write_shards

import fineweb
import plot
import bookkeeping
import train_gpt2

README = (ROOT / "README.md").read_text()


def commands():
    """Every command of the README, in order: the lines of its indented code blocks (a trailing `\\` continues a
    line, `#` starts a comment) and the commands quoted inline in `backticks`."""
    found, pending = [], ""
    for line in README.splitlines():
        if line.startswith("    ") and not pending and not line.strip().startswith(("python ", "torchrun ", "pip ",
                                                                                     "lm_eval ", "WANDB_MODE")):
            continue  # a code block's other lines (sample text, Python)
        if line.startswith("    ") or pending:
            text = pending + line.strip()
            pending = text[:-1] + " " if text.endswith("\\") else ""
            if not pending:
                found.append(shlex.split(text, comments=True))
        else:
            found += [shlex.split(c) for c in re.findall(r"`((?:python|torchrun) [^`]+)`", line)]
    return [c for c in found if c]


def needs_more_than_a_cpu(argv):
    """The network (a hub model, FineWeb-Edu, HellaSwag), a GPU, or the full recipe's data, as the README says."""
    text = " ".join(argv)
    return (argv[0] in ("torchrun", "pip", "lm_eval") or "hellaswag.py" in text or "core.py" in text
            or "--init_from gpt2" in text or argv[1:] in (["fineweb.py"], ["fineweb.py", "--streaming"])
            or ("train_gpt2.py" in text and "moliere" not in text) or "log/log.txt" in text)


def test_every_train_command_of_the_readme_parses():
    train_commands = [c for c in commands() if c[:2] == ["python", "train_gpt2.py"]]
    assert len(train_commands) >= 10
    for argv in train_commands:
        if "--help" not in argv:
            # an unknown or malformed flag exits here
            bookkeeping.parse_args(train_gpt2.TrainConfig, train_gpt2.PRESETS, argv[2:])


@pytest.mark.slow
def test_the_readme_runs_as_written_on_a_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shards = write_shards(tmp_path / "corpus", [4000, 6000, 5000])
    monkeypatch.setitem(train_gpt2.PRESETS, "moliere", dict(  # the quick start's steps and intervals, a tiny model
        data=str(shards), log_dir="log_moliere", n_layer=1, n_head=1, n_embd=16, block_size=16, seq_len=8,
        micro_batch_size=2, total_batch_size=32, max_lr=1e-2, warmup_steps=20, max_steps=200, eval_every=100,
        val_tokens=32, hellaswag_every=0, sample_every=0, checkpoint_every=100, device="cpu", dtype="float32"))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(30)))
    (tmp_path / "notes.txt").write_text("Some notes. " * 200)
    (tmp_path / "story.txt").write_text("Once upon a time. " * 400)
    ran = []
    for argv in commands():
        if needs_more_than_a_cpu(argv) or argv[1] in ("-m", "bench.py") or "--help" in argv:
            continue  # the tests themselves, a 10-minute benchmark, help texts
        if argv[1] == "-c":
            exec(argv[2], {})  # noqa: S102 -- the README's one-liner, as `python -c` runs it
        else:
            {"train_gpt2.py": train_gpt2.main, "plot.py": plot.main, "fineweb.py": fineweb.main}[argv[1]](argv[2:])
        ran.append(" ".join(argv[1:3]))
    out = capsys.readouterr().out
    assert ran.count("train_gpt2.py --preset") >= 4 and "fineweb.py --input" in ran
    assert "plot.py log_moliere/log.txt" in ran
    gpt2 = read_log(tmp_path / "log_moliere" / "log.txt")
    modern = read_log(tmp_path / "log_moliere_modern" / "log.txt")
    extended = read_log(tmp_path / "log_moliere_modern_400" / "log.txt")
    assert (400, "val") in gpt2 and (200, "val") in modern  # each in its own directory
    assert min(extended)[0] == 100 and (400, "val") in extended  # the branch from step 100 carried on to 400
    assert (tmp_path / "log_moliere_modern" / "model_00200.pt").is_file()  # and left the run it came from whole
    assert "> harpagon:" in out and (tmp_path / "moliere-gpt" / "tokenizer.json").is_file()
    assert (tmp_path / "log_moliere" / "val_loss.png").is_file() and (tmp_path / "my_shards").is_dir()
