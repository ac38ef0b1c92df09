"""hellaswag.py: batched scoring equals build-nanogpt's one-example-at-a-time loop; CLI, bad inputs, download."""
import dataclasses
import http.server
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import common
import hellaswag
from conftest import ROOT
from train_gpt2 import GPT, GPTConfig

WORDS = ("the man takes a ball and throws it to his dog , who runs across green field while children laugh "
         "then she picks up knife cuts onion slowly into small pieces before adding them pan").split()


def make_examples(n=12, seed=0):
    """HellaSwag-shaped examples of varied lengths; the last two have 4 equal endings (ties)."""
    rng = random.Random(seed)

    def phrase(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    examples = [{"ind": i, "ctx": phrase(2, 40), "endings": [phrase(1, 15) for _ in range(4)],
                 "label": rng.randrange(4)} for i in range(n - 2)]
    examples[1]["endings"][3] = examples[1]["endings"][1]  # two equal endings: argmin must take the first
    tie = phrase(3, 6)
    examples += [{"ind": n - 2, "ctx": "a tie", "endings": [tie] * 4, "label": 0},  # all equal: picks 0, right
                 {"ind": n - 1, "ctx": "a tie", "endings": [tie] * 4, "label": 3}]  # ... and wrong here
    return examples


def write_examples(path, examples):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))


def tiny_hf_model(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_positions=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))


@torch.no_grad()
def reference_losses(model, examples):
    """build-nanogpt's scorer: one example (4 rows) per forward, full logits -> per-row (sum, mean) losses."""
    model.eval()
    sums, means = [], []
    for example in examples:
        _, tokens, mask, _ = hellaswag.render_example(example)
        out = model(tokens)
        logits = out[0] if isinstance(out, tuple) else out.logits  # our GPT, or transformers'
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        shift_mask = mask[:, 1:]
        sum_loss = (losses.view(4, -1) * shift_mask).sum(dim=1)
        sums.append(sum_loss)
        means.append(sum_loss / shift_mask.sum(dim=1))
    return torch.stack(sums), torch.stack(means)


def reference_counts(model, examples):
    sums, means = reference_losses(model, examples)
    labels = torch.tensor([e["label"] for e in examples])
    return int((sums.argmin(1) == labels).sum()), int((means.argmin(1) == labels).sum())


def test_render_example_as_build_nanogpt():
    example = {"ctx": "A man is sitting on a roof.", "endings": ["he starts.", "is a", "x", "runs away fast"],
               "label": 2}
    data, tokens, mask, label = hellaswag.render_example(example)
    enc = common.get_tokenizer()
    ctx = enc.encode("A man is sitting on a roof.")
    assert label == 2 and data["label"] == 2 and data["ctx_tokens"] == ctx
    assert data["ending_tokens"][0] == enc.encode(" he starts.")  # the ending carries the leading space
    L = len(ctx) + max(len(e) for e in data["ending_tokens"])
    assert tokens.shape == mask.shape == (4, L) and tokens.dtype == torch.long
    for i, end in enumerate(data["ending_tokens"]):
        assert tokens[i, :len(ctx) + len(end)].tolist() == ctx + end
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (L - len(ctx) - len(end))
        assert tokens[i, len(ctx) + len(end):].eq(0).all()  # right padding with zeros


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_equals_one_example_at_a_time(batch_size):
    model, examples = tiny_gpt(), make_examples()
    model.train()  # evaluate switches to eval mode and back
    result = hellaswag.evaluate(model, examples, "cpu", batch_size=batch_size, dtype="float32")
    assert model.training
    correct, correct_norm = reference_counts(model, examples)
    assert (result["n"], result["correct"], result["correct_norm"]) == (len(examples), correct, correct_norm)
    assert result["acc"] == correct / len(examples) and result["acc_norm"] == correct_norm / len(examples)
    # rendered tuples (what train_gpt2.py passes, tokenized once) score the same as dicts
    rendered = [hellaswag.render_example(e) for e in examples]
    assert hellaswag.evaluate(model, rendered, "cpu", batch_size=batch_size, dtype="float32") == result


def test_per_row_losses_match_reference():
    model, examples = tiny_gpt(seed=1), make_examples(seed=1)
    sums, n_tokens = hellaswag.score_batch(model.eval(), [hellaswag.render_example(e) for e in examples], "cpu")
    ref_sums, ref_means = reference_losses(model, examples)
    torch.testing.assert_close(sums, ref_sums, rtol=0, atol=1e-4)
    torch.testing.assert_close(sums / n_tokens, ref_means, rtol=0, atol=1e-4)
    assert torch.equal(sums[-1], sums[-1][:1].expand(4))  # equal endings: exactly equal losses


def test_per_row_losses_of_the_modern_recipe():
    """score_batch knows our GPT by its hidden_states(idx, pos, attn_mask): the modern recipe's (rotary positions,
    soft-capped head) scores packed rows as exactly as GPT-2's."""
    import train_gpt2

    torch.manual_seed(0)
    model = train_gpt2.ModernGPT(GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # away from the zero-initialised head and projections, whose logits are all equal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    examples = make_examples(seed=4)
    sums, n_tokens = hellaswag.score_batch(model.eval(), [hellaswag.render_example(e) for e in examples], "cpu")
    ref_sums, ref_means = reference_losses(model, examples)
    torch.testing.assert_close(sums, ref_sums, rtol=0, atol=1e-4)
    torch.testing.assert_close(sums / n_tokens, ref_means, rtol=0, atol=1e-4)


def test_ties_take_the_first_ending():
    model, examples = tiny_gpt(), make_examples()[-2:]  # 4 equal endings, labels 0 and 3
    result = hellaswag.evaluate(model, examples, "cpu", dtype="float32")
    assert result["correct"] == result["correct_norm"] == 1
    assert hellaswag.evaluate(model, [], "cpu", dtype="float32")["n"] == 0  # a rank with no share of the examples


def run_cli(*args):
    """hellaswag.py as users run it: a process of its own, hellaswag.py being __main__."""
    return subprocess.run([sys.executable, "hellaswag.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          check=False)


def assert_one_line(excinfo, message):
    """main(argv) in-process ended with hellaswag.py's one-line error (what the shell shows), saying `message`."""
    error = str(excinfo.value.code)
    assert error.startswith("hellaswag.py: error: ") and "\n" not in error and message in error, error


def assert_one_line_error(run, message):
    assert run.returncode == 1 and run.stderr.startswith("hellaswag.py: error: "), run.stderr
    assert message in run.stderr and run.stderr.count("\n") == 1, run.stderr  # one line, no traceback


def cli_result(tmp_path, model_path, examples, *extra):
    data = write_examples(tmp_path / "hs.jsonl", examples)
    out = tmp_path / "out.json"
    hellaswag.main(["-m", str(model_path), "--data_file", str(data), "-d", "cpu", "--dtype", "float32",
                    "--batch_size", "5", "--json", str(out), *extra])
    return json.loads(out.read_text())


def test_cli_gpt2_hf_directory_scores_packed(tmp_path, capsys):
    """A GPT-2 in HF format loads into our GPT (packed rows): the same metrics as transformers' 4-row path and
    as one example per forward."""
    model, examples = tiny_hf_model(), make_examples()
    model.save_pretrained(tmp_path / "hf")
    assert hasattr(hellaswag.load_model(str(tmp_path / "hf")), "hidden_states")  # our GPT
    result = cli_result(tmp_path, tmp_path / "hf", examples)
    correct, correct_norm = reference_counts(model, examples)
    assert result == {"n": 12, "acc": correct / 12, "acc_norm": correct_norm / 12}
    four_rows = hellaswag.evaluate(model, examples, "cpu", batch_size=5, dtype="float32")  # transformers' model
    assert (four_rows["acc"], four_rows["acc_norm"]) == (result["acc"], result["acc_norm"])
    assert f"acc_norm {correct_norm / 12:.4f}" in capsys.readouterr().out


def tiny_gpt_neo():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    return GPTNeoForCausalLM(GPTNeoConfig(vocab_size=50257, max_position_embeddings=128, hidden_size=32,
                                          num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
                                          window_size=8))


def tiny_gpt2_gelu():  # "gpt2" by its config, but exact GELU (Cerebras-GPT's choice): not our GPT's math
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_positions=128, n_layer=2, n_head=2, n_embd=32, activation_function="gelu"))


@pytest.mark.parametrize("make", [tiny_gpt_neo, tiny_gpt2_gelu])
def test_cli_other_hf_models_score_through_transformers(tmp_path, make):
    torch.manual_seed(0)
    model, examples = make(), make_examples(seed=3)
    model.save_pretrained(tmp_path / "hf")
    assert not hasattr(hellaswag.load_model(str(tmp_path / "hf")), "hidden_states")  # transformers' model
    correct, correct_norm = reference_counts(model, examples)
    assert cli_result(tmp_path, tmp_path / "hf", examples) == {"n": 12, "acc": correct / 12,
                                                                "acc_norm": correct_norm / 12}


def save_checkpoint(model, path):
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 0}, path)
    return path


def test_cli_our_checkpoint_and_limit(tmp_path, capsys):
    model, examples = tiny_gpt(seed=2), make_examples(seed=2)
    path = save_checkpoint(model, tmp_path / "model.pt")
    _, correct_norm = reference_counts(model, examples[:7])
    assert cli_result(tmp_path, path, examples, "--limit", "7")["acc_norm"] == correct_norm / 7
    assert "n 7 " in capsys.readouterr().out


NOT_CHECKPOINTS = {  # what x.pt holds -> what the one-line error says
    "bytes": (b"not a checkpoint", "not a readable checkpoint"),
    "other keys": ({"weights": torch.zeros(2)}, "not a checkpoint of train_gpt2.py"),
    "a tensor": (torch.zeros(3), "not a checkpoint of train_gpt2.py"),
    "a list": ([1, 2, 3], "not a checkpoint of train_gpt2.py"),
    "other shapes": ({"model": {"lm_head.weight": torch.zeros(2, 2)}, "step": 0,
                      "config": {"n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 16, "block_size": 8}},
                     "not a checkpoint of train_gpt2.py"),
    "bad config": ({"model": {}, "config": {"n_embd": 30, "n_head": 4, "vocab_size": 16}, "step": 0},  # 30 % 4
                   "not a checkpoint of train_gpt2.py"),
}


@pytest.mark.parametrize("case", NOT_CHECKPOINTS)
def test_files_that_are_not_checkpoints(tmp_path, case):
    content, message = NOT_CHECKPOINTS[case]
    path = tmp_path / "x.pt"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(common.UserError, match=f"x\\.pt.* {message}"):
        hellaswag.load_model(str(path))
    with pytest.raises(SystemExit, match=f"^hellaswag.py: error: .*x\\.pt.* {message}"):
        hellaswag.main(["-m", str(path), "--data_file", str(write_examples(tmp_path / "hs.jsonl", make_examples()))])


def test_models_too_small_for_the_examples(tmp_path):
    """Longer examples than the model's positions, or ids past its vocabulary: one line, not an IndexError."""
    torch.manual_seed(0)
    examples = make_examples()
    longest = max(hellaswag.render_example(e)[1].size(1) for e in examples)
    short = save_checkpoint(GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=8)),
                            tmp_path / "short.pt")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_positions=16, n_layer=1, n_head=2, n_embd=8)).save_pretrained(tmp_path / "hf")
    for model in (short, tmp_path / "hf"):
        with pytest.raises(SystemExit, match=f"^hellaswag.py: error: HellaSwag examples are up to {longest} tokens, "
                                             "more than the model's block_size 16$"):
            cli_result(tmp_path, model, examples)
    small_vocab = save_checkpoint(GPT(GPTConfig(block_size=128, vocab_size=128, n_layer=1, n_head=2, n_embd=8)),
                                  tmp_path / "vocab.pt")
    with pytest.raises(SystemExit, match="GPT-2's tokenizer .* the model's vocabulary has 128 ids"):
        cli_result(tmp_path, small_vocab, examples)


BAD_FILES = {
    "malformed": ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}\n\n{"ctx": "a", "endings": [\n',
                  r"bad\.jsonl, line 3: malformed JSON"),
    "label": ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 5}\n', r"line 1: 'label' must be 0, 1, 2 or 3"),
    "endings": ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}\n', r"line 1: 'endings' .* got 3 endings"),
    "empty": ("", r"bad\.jsonl: no examples"),
    "binary": (b"\x80\x81\xff\n", r"bad\.jsonl: cannot read it as a jsonl file"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_data_files(tmp_path, case):
    text, message = BAD_FILES[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(common.UserError, match=message):
        list(hellaswag.iterate_examples("val", data_file=path))
    with pytest.raises(SystemExit, match=r"^hellaswag.py: error: .*" + message):  # main: one line
        hellaswag.main(["-m", "gpt2", "--data_file", str(path), "-d", "cpu"])


def test_render_example_rejects_bad_examples():
    with pytest.raises(ValueError, match="4 strings"):
        hellaswag.render_example({"ctx": "a", "endings": ["b"] * 5, "label": 0})
    with pytest.raises(ValueError, match="label"):
        hellaswag.render_example({"ctx": "a", "endings": ["b"] * 4})


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):  # a flag's form: argparse's usage line and the error
        hellaswag.main(["-d", "cpu", "--limit", "0"])
    assert "at least 1" in capsys.readouterr().err
    # paths: one line naming every problem, before any work
    with pytest.raises(SystemExit) as run:
        hellaswag.main(["-d", "cpu", "-m", "no/such/model", "--data_file", "missing.jsonl"])
    assert_one_line(run, "-m no/such/model: no such file or directory, and not one of gpt2, gpt2-medium")
    assert "; --data_file missing.jsonl: no such file" in str(run.value.code)


@pytest.mark.slow
def test_cli_errors_on_the_real_command_line(tmp_path):
    """train_gpt2.py's loader raises the UserError, hellaswag.py (__main__, a process of its own) prints it."""
    data = write_examples(tmp_path / "hs.jsonl", make_examples())
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(run_cli("-m", tmp_path / "foreign.pt", "--data_file", data), "not a readable checkpoint")
    (tmp_path / "not_hf").mkdir()  # a directory without config.json
    assert_one_line_error(run_cli("-m", tmp_path / "not_hf", "--data_file", data),
                          f"could not load the Hugging Face model {tmp_path / 'not_hf'}")


@pytest.mark.slow
def test_offline_tokenizer_is_one_line(tmp_path):
    """tiktoken with an empty cache and no network: common.get_tokenizer's UserError, printed by main."""
    save_checkpoint(tiny_gpt(), tmp_path / "model.pt")
    data = write_examples(tmp_path / "hs.jsonl", make_examples())
    (tmp_path / "empty").mkdir()
    offline = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "NO_PROXY": "", "no_proxy": "",
               **{k: "http://127.0.0.1:9" for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")}}
    run = subprocess.run([sys.executable, "hellaswag.py", "-m", str(tmp_path / "model.pt"), "--data_file", str(data)],
                         cwd=ROOT, capture_output=True, text=True, env=offline, timeout=120, check=False)
    assert_one_line_error(run, "could not load GPT-2's tokenizer")


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves b'{...}' at /ok, 404 elsewhere, and at /cut announces more bytes than it sends."""
    body = b'{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}\n'

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if "ok" not in self.path and "cut" not in self.path:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) * (10 if "cut" in self.path else 1)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setattr(hellaswag, "DATA_DIR", tmp_path / "cache")
    yield f"http://127.0.0.1:{httpd.server_port}", body
    httpd.shutdown()
    httpd.server_close()


def test_download_writes_once(server, monkeypatch):
    base, body = server
    monkeypatch.setattr(hellaswag, "URL", base + "/ok_{split}.jsonl")
    path = hellaswag.download("val")
    assert path == hellaswag.DATA_DIR / "hellaswag_val.jsonl" and path.read_bytes() == body
    assert sorted(p.name for p in hellaswag.DATA_DIR.iterdir()) == ["hellaswag_val.jsonl"]  # no temp file left
    monkeypatch.setattr(hellaswag, "URL", base + "/missing_{split}")  # a second call does not fetch again
    assert hellaswag.download("val") == path
    assert [e["label"] for e in hellaswag.iterate_examples("val")] == [0]


@pytest.mark.parametrize("route", ["/missing_{split}", "/cut_{split}"])
def test_failed_download_leaves_nothing(server, monkeypatch, route):
    base, _ = server
    monkeypatch.setattr(hellaswag, "URL", base + route)
    with pytest.raises(common.UserError, match=r"could not download http://127\.0\.0\.1:\d+/(missing|cut)_val"):
        hellaswag.download("val")
    assert not hellaswag.DATA_DIR.exists()  # nor the folder it created


def test_failed_download_leaves_no_hellaswag_folder(tmp_path, monkeypatch):
    """No empty hellaswag/ after a failed first download, from download() and from the command line."""
    monkeypatch.setattr(hellaswag, "DATA_DIR", tmp_path / "new" / "hellaswag")  # neither folder exists yet
    monkeypatch.setattr(hellaswag, "URL", f"file://{tmp_path}/nowhere/hellaswag_{{split}}.jsonl")
    with pytest.raises(common.UserError, match=f"could not download file://{tmp_path}/nowhere/hellaswag_val.jsonl"):
        hellaswag.download("val")
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as run:
        hellaswag.main(["-d", "cpu"])
    assert_one_line(run, "could not download file://")
    assert not (tmp_path / "new").exists()

# -- the CLI's dtype: float32 by default, the published scores' precision


def near_tie_examples(model, n=8):
    """Examples on which float32 and bf16 pick differently. Every ending is one word; the label's (ending 1)
    float32 logit after the context beats ending 0's by 1e-5 to 1e-4, far below bf16's resolution (about 5e-4 for
    logits near 0.1), so bf16 ties them (argmin then takes ending 0) or swaps them. Endings 2, 3: the least likely."""
    enc = common.get_tokenizer()
    words = {}
    for t in range(common.EOT):  # tokens " word" that encoding " word" gives back
        text = enc.decode([t])
        if text.startswith(" ") and text[1:].isascii() and text[1:].isalpha() and enc.encode_ordinary(text) == [t]:
            words[t] = text[1:]
    ids = torch.tensor(list(words))
    examples = []
    for i in range(n):
        ctx = " ".join(WORDS[i:i + 6])
        with torch.no_grad():
            logits = model.eval()(torch.tensor([enc.encode_ordinary(ctx)]))[0][0, -1, ids]
        order = ids[logits.argsort(descending=True)].tolist()
        gaps = logits.sort(descending=True).values.diff().neg()  # gaps[j]: logit of order[j] - logit of order[j + 1]
        j = int(((gaps > 1e-5) & (gaps < 1e-4)).nonzero()[0])
        examples.append({"ctx": ctx, "endings": [words[t] for t in (order[j + 1], order[j], order[-1], order[-2])],
                         "label": 1})
    return examples


def test_cli_default_is_float32_where_auto_picks_bf16(tmp_path, monkeypatch, capsys):
    """On a machine whose --dtype auto is bf16 (a CPU with native bf16, patched in), the CLI's default scores in
    float32 and equals the one-example-at-a-time float32 reference; bf16 is what --dtype bfloat16 (and auto) give."""
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: True)
    assert common.resolve_dtype("auto", "cpu") == "bfloat16"
    real_autocast, used = common.autocast, []
    monkeypatch.setattr(common, "autocast", lambda device_type, dtype: used.append(dtype) or
                        real_autocast(device_type, dtype))
    model = tiny_gpt()
    examples = near_tie_examples(model)
    path, data = save_checkpoint(model, tmp_path / "model.pt"), write_examples(tmp_path / "hs.jsonl", examples)

    def cli(*extra):
        used.clear()
        hellaswag.main(["-m", str(path), "--data_file", str(data), "-d", "cpu", "--json", str(tmp_path / "h.json"),
                        *extra])
        return json.loads((tmp_path / "h.json").read_text()), set(used)

    assert reference_counts(model, examples) == (8, 8)  # float32 picks every label
    assert cli() == ({"n": 8, "acc": 1.0, "acc_norm": 1.0}, {"float32"})
    assert "acc_norm 1.0000" in capsys.readouterr().out
    bf16, dtypes = cli("--dtype", "bfloat16")
    assert dtypes == {"bfloat16"} and bf16["acc_norm"] < 1.0  # the default's result is not bf16's
    assert cli("--dtype", "auto") == (bf16, {"bfloat16"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_default_on_cuda_is_float32_with_tf32(tmp_path, monkeypatch):
    """On a GPU (bf16 for --dtype auto from sm80) the default is float32 with TF32 matmuls, as published."""
    real_autocast, used = common.autocast, []
    monkeypatch.setattr(common, "autocast", lambda device_type, dtype: used.append(dtype) or
                        real_autocast(device_type, dtype))
    model, examples = tiny_gpt(seed=2), make_examples(seed=2)
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        hellaswag.main(["-m", str(save_checkpoint(model, tmp_path / "model.pt")), "-d", "cuda", "--json",
                        str(tmp_path / "h.json"), "--data_file", str(write_examples(tmp_path / "hs.jsonl", examples))])
        assert torch.get_float32_matmul_precision() == "high" and set(used) == {"float32"}
    finally:
        torch.set_float32_matmul_precision(precision)
    correct, correct_norm = reference_counts(model, examples)  # float32 on the CPU
    result = json.loads((tmp_path / "h.json").read_text())
    assert result == {"n": 12, "acc": correct / 12, "acc_norm": correct_norm / 12}

# -- output and input paths checked before the work


@pytest.fixture
def no_work(monkeypatch):
    """hellaswag.main may not read data or load a model: the checks come first."""
    def fail(*args, **kwargs):
        raise AssertionError("the work started before the paths were checked")

    monkeypatch.setattr(hellaswag, "iterate_examples", fail)
    monkeypatch.setattr(hellaswag, "load_model", fail)


@pytest.fixture
def no_hang():
    """Fail rather than wait forever (opening a FIFO blocks until a writer comes)."""
    def fail(*args):
        raise TimeoutError("blocked")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


JSON_PATHS = {  # --json -> what the one-line error says
    "missing folder": (lambda tmp: tmp / "missing" / "dir" / "h.json", "is not an existing directory"),
    "a directory": (lambda tmp: tmp, "a directory, not a file"),
    "a FIFO": (lambda tmp: os.mkfifo(tmp / "fifo") or tmp / "fifo", "a FIFO (named pipe), not a file"),
    "long folder name": (lambda tmp: tmp / ("d" * 300) / "h.json", "File name too long"),
    "long file name": (lambda tmp: tmp / ("h" * 250), "File name too long"),  # its temp file's name is over 255
    "a file as folder": (lambda tmp: write_examples(tmp / "f", []) / "h.json", "Not a directory"),
    "read-only folder": (lambda tmp: Path("/sys/h.json"), "Permission denied"),  # even for root
}


@pytest.mark.parametrize("case", JSON_PATHS)
def test_json_path_checked_before_the_work(tmp_path, case, no_work, capsys):
    make, message = JSON_PATHS[case]
    if case == "read-only folder" and not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs")
    path = make(tmp_path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SystemExit) as run:
        hellaswag.main(["-m", "gpt2", "-d", "cpu", "--json", str(path)])
    assert_one_line(run, f"--json {path}: ")
    assert str(run.value.code).endswith(message)
    assert capsys.readouterr().out == "" and sorted(tmp_path.iterdir()) == before  # no result, no trial file left


@pytest.mark.parametrize("kind", ["a directory", "a FIFO (named pipe)", "a character device"])
def test_data_file_that_is_not_a_file(tmp_path, kind, no_hang):
    path = {"a directory": tmp_path, "a character device": Path("/dev/null")}.get(kind, tmp_path / "fifo")
    if kind.startswith("a FIFO"):
        os.mkfifo(path)
    with pytest.raises(common.UserError, match=f"^{re.escape(str(path))}: {re.escape(kind)}, not a jsonl file$"):
        list(hellaswag.iterate_examples("val", path))
    with pytest.raises(SystemExit) as run:
        hellaswag.main(["-m", "gpt2", "-d", "cpu", "--data_file", str(path)])
    assert_one_line(run, f"--data_file {path}: {kind}, not a jsonl file")


def test_any_os_error_is_one_line(tmp_path, monkeypatch):
    """A name the OS refuses, or an OSError from deeper down: one line, not a traceback."""
    with pytest.raises(SystemExit) as run:
        hellaswag.main(["-m", str(tmp_path / ("m" * 300) / "model.pt"), "-d", "cpu"])
    assert_one_line(run, "model.pt: File name too long")
    path = save_checkpoint(tiny_gpt(), tmp_path / "model.pt")
    data = write_examples(tmp_path / "hs.jsonl", make_examples())

    def unreadable(name):
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(hellaswag, "load_model", unreadable)
    with pytest.raises(SystemExit) as run:
        hellaswag.main(["-m", str(path), "--data_file", str(data), "-d", "cpu"])
    assert_one_line(run, f"{path}: Permission denied")
