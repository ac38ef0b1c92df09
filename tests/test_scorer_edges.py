"""hellaswag.py and core.py at their edges: no output over an input (common.check_outputs), no score for a diverged
model, one line for every bundle, data file or model file they cannot use, and no empty HellaSwag ending."""
import json
import os
import random
import re

import pytest
import torch
from test_core import TASKS, write_bundle
from test_hellaswag import make_examples, save_checkpoint, tiny_gpt, write_examples

import common
import core
import hellaswag
from train_gpt2 import GPT, GPTConfig


@pytest.fixture
def no_work(monkeypatch):
    """hellaswag.py and core.py may not read data, load a model or score: the path checks come first."""
    def fail(*args, **kwargs):
        raise AssertionError("the work started before the paths were checked")

    for name in ("iterate_examples", "load_model", "evaluate", "download"):
        monkeypatch.setattr(hellaswag, name, fail)
    for name in ("load_tasks", "download", "score"):
        monkeypatch.setattr(core, name, fail)


def one_line_error(run, program):
    """The message of main()'s one-line error: hellaswag.py exits with it, core.py prints it to stderr."""
    message = str(run.value.code) if program == "hellaswag.py" else run.err
    assert message.startswith(f"{program}: error: ") and message.rstrip("\n").count("\n") == 0, message
    return message.rstrip("\n")


# -- common.output_conflicts: an output is never an input, never inside one, never holds one

def test_output_conflicts_compare_resolved_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.pt").write_bytes(b"weights")
    (tmp_path / "link.json").symlink_to(tmp_path / "m.pt")
    os.link(tmp_path / "m.pt", tmp_path / "hard.json")
    (tmp_path / "export").mkdir()
    (tmp_path / "sub").mkdir()
    inputs = {"-m": "m.pt"}
    for same in ("m.pt", "./m.pt", "sub/../m.pt", str(tmp_path / "m.pt"), "link.json", "hard.json"):
        assert common.output_conflicts({"--json": same}, inputs) == [
            f"--json {same} is the same file as -m m.pt: writing it would destroy that input; choose another --json"]
    assert common.output_conflicts({"--json": "export/config.json"}, {"-m": "export"}) == [
        "--json export/config.json is inside -m export: outputs never go among the inputs; choose another --json"]
    assert common.output_conflicts({"--out": "."}, {"--input": ["sub/a.txt", "../elsewhere.txt"]}) == [
        "--input sub/a.txt is inside --out ., which this program writes into; choose another --out"]
    # neighbours in one directory, a file named like a directory's prefix, and flags not given: no conflict
    assert common.output_conflicts({"--json": "m.json", "--out": "export2", "--x": None},
                                   {"-m": "m.pt", "--bundle_dir": "export", "--data_file": None}) == []
    with pytest.raises(common.UserError, match=r"^--json m\.pt is the same file as -m m\.pt: .*; "
                                               r"--png m\.pt is the same file as -m m\.pt: .* choose another --out$"):
        common.check_outputs({"--json": "m.pt", "--png": ["m.png", "m.pt"]}, inputs, fix="choose another --out")


# -- 1. --json may not overwrite, or land among, what the program reads

JSON_OVER_INPUTS = {  # name -> (argv given tmp_path's files, the message's start)
    "the checkpoint": (lambda t: ["-m", t / "m.pt", "--json", t / "m.pt"],
                       "--json {t}/m.pt is the same file as -m {t}/m.pt"),
    "the checkpoint by a link": (lambda t: ["-m", t / "m.pt", "--json", t / "link.json"],
                                 "--json {t}/link.json is the same file as -m {t}/m.pt"),
    "the checkpoint, another spelling": (lambda t: ["-m", t / "m.pt", "--json", t / "export" / ".." / "m.pt"],
                                         "--json {t}/export/../m.pt is the same file as -m {t}/m.pt"),
    "the data file": (lambda t: ["-m", t / "m.pt", "--data_file", t / "hs.jsonl", "--json", t / "hs.jsonl"],
                      "--json {t}/hs.jsonl is the same file as --data_file {t}/hs.jsonl"),
    "inside a model directory": (lambda t: ["-m", t / "export", "--json", t / "export" / "config.json"],
                                 "--json {t}/export/config.json is inside -m {t}/export"),
    "a new file in a model directory": (lambda t: ["-m", t / "export", "--json", t / "export" / "h.json"],
                                        "--json {t}/export/h.json is inside -m {t}/export"),
    "the downloaded split": (lambda t: ["-m", t / "m.pt", "--json", t / "cache" / "hellaswag_val.jsonl"],
                             "--json {t}/cache/hellaswag_val.jsonl is the same file as the downloaded split"),
}


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A checkpoint, a link to it, a data file, a model directory and a downloaded split, with their bytes."""
    save_checkpoint(tiny_gpt(), tmp_path / "m.pt")
    (tmp_path / "link.json").symlink_to(tmp_path / "m.pt")
    write_examples(tmp_path / "hs.jsonl", make_examples())
    tiny_gpt().save_pretrained(tmp_path / "export")
    monkeypatch.setattr(hellaswag, "DATA_DIR", tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    write_examples(tmp_path / "cache" / "hellaswag_val.jsonl", make_examples())
    return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", JSON_OVER_INPUTS)
def test_hellaswag_json_never_overwrites_an_input(tmp_path, inputs, no_work, case):
    argv, message = JSON_OVER_INPUTS[case]
    with pytest.raises(SystemExit) as run:
        hellaswag.main(["-d", "cpu", *map(str, argv(tmp_path))])
    error = one_line_error(run, "hellaswag.py")
    assert error.startswith("hellaswag.py: error: " + message.format(t=tmp_path)), error
    assert error.endswith("choose another --json")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == inputs  # nothing written, nothing lost


def test_hellaswag_json_over_the_checkpoint_end_to_end(tmp_path):
    """Without the check the checkpoint was scored, then replaced by the JSON (exit 0): still loadable now."""
    path = save_checkpoint(tiny_gpt(), tmp_path / "m.pt")
    data = write_examples(tmp_path / "hs.jsonl", make_examples())
    with pytest.raises(SystemExit, match="is the same file as -m"):
        hellaswag.main(["-m", str(path), "--data_file", str(data), "-d", "cpu", "--json", str(path)])
    assert hasattr(hellaswag.load_model(str(path)), "hidden_states")


CORE_JSON_OVER_INPUTS = {
    "the checkpoint": (lambda t: ["-m", t / "m.pt", "--bundle_dir", t / "b", "--json", t / "m.pt"],
                       "--json {t}/m.pt is the same file as -m {t}/m.pt"),
    "a bundle file": (lambda t: ["-m", t / "m.pt", "--bundle_dir", t / "b", "--json", t / "b" / "core.yaml"],
                      "--json {t}/b/core.yaml is inside --bundle_dir {t}/b"),
    "the downloaded bundle": (lambda t: ["-m", t / "m.pt", "--json", t / "eval_bundle" / "core.yaml"],
                              "--json {t}/eval_bundle/core.yaml is inside the downloaded eval bundle"),
    "the model directory": (lambda t: ["-m", t / "export", "--bundle_dir", t / "b", "--json",
                                       t / "export" / "model.safetensors"],
                            "--json {t}/export/model.safetensors is inside -m {t}/export"),
}


@pytest.mark.parametrize("case", CORE_JSON_OVER_INPUTS)
def test_core_json_never_overwrites_an_input(tmp_path, monkeypatch, no_work, capsys, case):
    save_checkpoint(tiny_gpt(), tmp_path / "m.pt")
    tiny_gpt().save_pretrained(tmp_path / "export")
    write_bundle(tmp_path / "b")
    write_bundle(tmp_path / "eval_bundle")
    monkeypatch.setattr(core, "BUNDLE_DIR", tmp_path / "eval_bundle")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv, message = CORE_JSON_OVER_INPUTS[case]
    capsys.readouterr()  # (save_pretrained's progress bar)
    with pytest.raises(SystemExit):
        core.main(["-d", "cpu", *map(str, argv(tmp_path))])
    error = one_line_error(capsys.readouterr(), "core.py")
    assert error.startswith("core.py: error: " + message.format(t=tmp_path)) and error.endswith("another --json")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# -- 2. a model whose losses are not finite is refused, not scored

def diverged_gpt(block_size=128):
    """Finite weights (each under 1e31), but attention scores past float32's range: every loss is nan. A run that
    diverged leaves such a model; scored, argmin over nan picked the first ending and the score looked real."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.fill_(1e30)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


DIVERGED = "the model's losses are not finite (nan): it diverged; score an earlier checkpoint"


def test_hellaswag_refuses_a_diverged_model():
    model = diverged_gpt().train()
    with pytest.raises(common.UserError, match=f"^{re.escape(DIVERGED)}$"):
        hellaswag.evaluate(model, make_examples(), "cpu", batch_size=4)
    assert model.training  # back in the mode it came in
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("inf")  # inf weights: nan too, never a score
    with pytest.raises(common.UserError, match="not finite"):
        hellaswag.evaluate(model, make_examples(), "cpu")


def test_hellaswag_cli_writes_no_json_for_a_diverged_checkpoint(tmp_path):
    path = save_checkpoint(diverged_gpt(), tmp_path / "diverged.pt")
    data = write_examples(tmp_path / "hs.jsonl", make_examples())
    with pytest.raises(SystemExit) as run:
        hellaswag.main(["-m", str(path), "--data_file", str(data), "-d", "cpu", "--json", str(tmp_path / "h.json")])
    assert one_line_error(run, "hellaswag.py") == f"hellaswag.py: error: {DIVERGED}"
    assert not (tmp_path / "h.json").exists()


def test_core_refuses_a_diverged_model(tmp_path, capsys):
    bundle = write_bundle(tmp_path / "b")
    tasks = core.load_tasks(bundle)
    with pytest.raises(common.UserError, match=f"^{re.escape(DIVERGED)}$"):
        core.evaluate(diverged_gpt(32), tasks, core.render(tasks), "cpu", batch_size=4)
    path = save_checkpoint(diverged_gpt(32), tmp_path / "diverged.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        core.main(["-m", str(path), "--bundle_dir", str(bundle), "-d", "cpu", "--json", str(tmp_path / "c.json")])
    err = capsys.readouterr().err  # the progress bar of the scoring begun, then the one line
    assert err.splitlines()[-1] == f"core.py: error: {DIVERGED}" and "Traceback" not in err
    assert not (tmp_path / "c.json").exists()


# -- 3. core.py: every bundle it cannot use is one line, refused by load_tasks (training loads its tasks there too)

def with_baseline(directory, value):
    write_bundle(directory, [t if t[0] != "mc_task" else (*t[:5], value) for t in TASKS])
    return directory


def with_yaml(directory, old, new):
    write_bundle(directory)
    text = (directory / "core.yaml").read_text()
    assert old in text
    (directory / "core.yaml").write_text(text.replace(old, new))
    return directory


def not_utf8(directory, name):
    write_bundle(directory)
    path = directory / name
    path.write_bytes(path.read_bytes().replace(b"Paris3", b"Par\xefs3").replace(b"schema_task", b"sch\xe9ma_task"))
    return directory


CSV = r"/eval_meta_data\.csv, task mc_task: random baseline"
YAML = r"/core\.yaml, task mc_task:"
BAD_BUNDLES = {  # name -> (make it, the message load_tasks raises, after the bundle's path)
    "a jsonl line not UTF-8": (lambda d: not_utf8(d, "eval_data/sub/mc_task.jsonl"),
                               r"/eval_data/sub/mc_task\.jsonl, line 4: not UTF-8 text \(invalid continuation byte"),
    "core.yaml not UTF-8": (lambda d: not_utf8(d, "core.yaml"), r"/core\.yaml is not UTF-8 text"),
    "the csv not UTF-8": (lambda d: not_utf8(d, "eval_meta_data.csv"), r"/eval_meta_data\.csv is not UTF-8 text"),
    "a negative num_fewshot": (lambda d: with_yaml(d, "num_fewshot: [2]", "num_fewshot: [-1]"),
                               YAML + r" num_fewshot \[-1\] must hold a whole number of examples, 0 or more"),
    "a fractional num_fewshot": (lambda d: with_yaml(d, "num_fewshot: [2]", "num_fewshot: [1.5]"),
                                 YAML + r" num_fewshot \[1\.5\] must hold a whole number"),
    "a baseline of 100": (lambda d: with_baseline(d, 100.0),
                          CSV + r" '100\.0' must be a percentage from 0 to below 100"),
    "a baseline over 100": (lambda d: with_baseline(d, 150), CSV + r" '150' must be"),
    "a negative baseline": (lambda d: with_baseline(d, -5), CSV + r" '-5' must be"),
    "a baseline not a number": (lambda d: with_baseline(d, "n/a"), CSV + r" 'n/a' must be"),
    "a baseline nan": (lambda d: with_baseline(d, "nan"), CSV + r" 'nan' must be"),
    "a dataset_uri not a string": (lambda d: with_yaml(d, "dataset_uri: sub/mc_task.jsonl", "dataset_uri: 7"),
                                   YAML + r" dataset_uri and continuation_delimiter must be strings"),
    "a null delimiter": (lambda d: with_yaml(d, 'continuation_delimiter: "\\nAnswer: "', "continuation_delimiter:"),
                         YAML + r" dataset_uri and continuation_delimiter must be strings"),
}


@pytest.mark.parametrize("case", BAD_BUNDLES)
def test_bundles_core_cannot_use_are_refused_by_load_tasks(tmp_path, capsys, case):
    make, message = BAD_BUNDLES[case]
    directory = make(tmp_path / "b")
    with pytest.raises(common.UserError, match=f"^{re.escape(str(directory))}{message}"):
        core.load_tasks(directory)
    with pytest.raises(SystemExit):
        core.main(["-m", "gpt2", "--bundle_dir", str(directory), "-d", "cpu"])
    assert re.search(message, one_line_error(capsys.readouterr(), "core.py"))


def test_a_baseline_of_100_never_reaches_the_scoring(tmp_path, capsys, monkeypatch):
    """It divided by zero in summarize, after all the scoring: a ZeroDivisionError traceback and no result."""
    directory = with_baseline(tmp_path / "b", 100)
    save_checkpoint(tiny_gpt(), tmp_path / "m.pt")
    monkeypatch.setattr(core, "score", lambda *a: pytest.fail("scored a bundle it cannot center"))
    with pytest.raises(SystemExit):
        core.main(["-m", str(tmp_path / "m.pt"), "--bundle_dir", str(directory), "-d", "cpu"])
    assert "random baseline '100' must be a percentage" in one_line_error(capsys.readouterr(), "core.py")


# -- 4. HellaSwag: an empty ending is refused, with its file and line

@pytest.mark.parametrize("field, value, message", [
    ("endings", ["a cat", "", "a dog", "a bird"], "'endings' must be 4 non-empty strings, ending 1 is ''"),
    ("endings", ["a cat", "a dog", "a bird", " \n\t"], "'endings' must be 4 non-empty strings, ending 3 is ' \\n\\t'"),
    ("ctx", "   ", "'ctx' must be a non-empty string"),
])
def test_empty_endings_and_contexts_are_refused(tmp_path, field, value, message):
    examples = make_examples()
    examples[2][field] = value
    path = write_examples(tmp_path / "hs.jsonl", examples)
    with pytest.raises(common.UserError, match=f"^{re.escape(f'{path}, line 3: {message}')}$"):
        list(hellaswag.iterate_examples("val", path))
    with pytest.raises(ValueError, match=re.escape(message)):
        hellaswag.render_example(examples[2])
    # what is accepted always has tokens to score: at least one per ending, after a context of at least one
    for example in make_examples() + [{"ctx": ".", "endings": [".", "x", "\u200b", " a"], "label": 0}]:
        data, _, mask, _ = hellaswag.render_example(example)
        assert data["ctx_tokens"] and all(data["ending_tokens"]) and (mask.sum(dim=1) >= 1).all()


# -- 5. a file that is not a checkpoint: never torch's advice to load it with weights_only=False

@pytest.mark.parametrize("content", [random.Random(0).randbytes(4096), b"hello world\n", b""],
                         ids=["random bytes", "text", "empty"])
def test_a_file_that_is_not_a_torch_save_file(tmp_path, capsys, content):
    path = tmp_path / "garbage.bin"
    path.write_bytes(content)
    data = write_examples(tmp_path / "hs.jsonl", make_examples())
    expected = (f"{path} is not a readable checkpoint (not a complete torch.save file: a torn write, or another kind "
                f"of file)")
    with pytest.raises(SystemExit) as run:
        hellaswag.main(["-m", str(path), "--data_file", str(data), "-d", "cpu"])
    assert one_line_error(run, "hellaswag.py") == f"hellaswag.py: error: {expected}"
    with pytest.raises(SystemExit):
        core.main(["-m", str(path), "--bundle_dir", str(write_bundle(tmp_path / "b")), "-d", "cpu"])
    assert one_line_error(capsys.readouterr(), "core.py") == f"core.py: error: {expected}"


class Pickled:
    """Not a tensor nor a container: torch.load(weights_only=True) refuses it, and says it could run its code."""


def test_a_torch_save_file_of_other_objects_never_advises_weights_only_false(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"model": Pickled(), "config": {}, "step": 0}, path)
    with pytest.raises(common.UserError) as info:
        hellaswag.load_model(str(path))
    message = str(info.value)
    assert message.startswith(f"{path} is not a checkpoint of train_gpt2.py") and "\x1b" not in message
    assert "weights_only" not in message and "can still be loaded" not in message


# -- 7. a model directory with a damaged file or config: one line, not a traceback

@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 100), "Error while deserializing header"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "model_type": "gpt_neo", "hidden_size": "x"})),
     "Validation error for field 'hidden_size'"),
])
@pytest.mark.parametrize("ours", [True, False])
def test_a_damaged_model_directory_is_one_line(tmp_path, damage, message, ours):
    if ours:  # a GPT-2 export: loads into our GPT (train_gpt2.GPT.from_pretrained)
        tiny_gpt().save_pretrained(tmp_path / "hf")
    else:  # another architecture: transformers' model
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        GPTNeoForCausalLM(GPTNeoConfig(vocab_size=50257, max_position_embeddings=128, hidden_size=32, num_layers=2,
                                       num_heads=2, attention_types=[[["global", "local"], 1]])).save_pretrained(
            tmp_path / "hf")
    damage(tmp_path / "hf")
    data = write_examples(tmp_path / "hs.jsonl", make_examples())
    with pytest.raises(SystemExit) as run:
        hellaswag.main(["-m", str(tmp_path / "hf"), "--data_file", str(data), "-d", "cpu"])
    error = one_line_error(run, "hellaswag.py")
    assert error.startswith("hellaswag.py: error: could not load ") and str(tmp_path / "hf") in error
    assert message in error
