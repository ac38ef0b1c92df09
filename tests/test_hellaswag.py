"""hellaswag.py: batched scoring equals build-nanogpt's one-example-at-a-time loop; CLI, bad inputs, download."""
import dataclasses
import http.server
import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import hellaswag
from train_gpt2 import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the man takes a ball and throws it to his dog , who runs across green field while children laugh "
         "then she picks up knife cuts onion slowly into small pieces before adding them pan").split()


def make_examples(n=12, seed=0):
    """HellaSwag-shaped examples of varied lengths; the last two have 4 equal endings (ties)."""
    rng = random.Random(seed)
    phrase = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    examples = [{"ind": i, "ctx": phrase(2, 40), "endings": [phrase(1, 15) for _ in range(4)],
                 "label": rng.randrange(4)} for i in range(n - 2)]
    examples[1]["endings"][3] = examples[1]["endings"][1]  # two equal endings: argmin must take the first
    tie = phrase(3, 6)
    examples += [{"ind": n - 2, "ctx": "a tie", "endings": [tie] * 4, "label": 0},  # all equal: picks 0, right
                 {"ind": n - 1, "ctx": "a tie", "endings": [tie] * 4, "label": 3}]  # ... and wrong here
    return examples


def write_jsonl(path, examples):
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
    enc = hellaswag.get_tokenizer()
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
    result = hellaswag.evaluate(model, examples, "cpu", batch_size=batch_size)
    assert model.training
    correct, correct_norm = reference_counts(model, examples)
    assert (result["n"], result["correct"], result["correct_norm"]) == (len(examples), correct, correct_norm)
    assert result["acc"] == correct / len(examples) and result["acc_norm"] == correct_norm / len(examples)
    # rendered tuples (what train_gpt2.py passes, tokenized once) score the same as dicts
    rendered = [hellaswag.render_example(e) for e in examples]
    assert hellaswag.evaluate(model, rendered, "cpu", batch_size=batch_size) == result


def test_per_row_losses_match_reference():
    model, examples = tiny_gpt(seed=1), make_examples(seed=1)
    sums, n_tokens = hellaswag.score_batch(model.eval(), [hellaswag.render_example(e) for e in examples], "cpu")
    ref_sums, ref_means = reference_losses(model, examples)
    torch.testing.assert_close(sums, ref_sums, rtol=0, atol=1e-4)
    torch.testing.assert_close(sums / n_tokens, ref_means, rtol=0, atol=1e-4)
    assert torch.equal(sums[-1], sums[-1][:1].expand(4))  # equal endings: exactly equal losses


def test_ties_take_the_first_ending():
    model, examples = tiny_gpt(), make_examples()[-2:]  # 4 equal endings, labels 0 and 3
    result = hellaswag.evaluate(model, examples, "cpu")
    assert result["correct"] == result["correct_norm"] == 1
    assert hellaswag.evaluate(model, [], "cpu")["n"] == 0  # a rank with no share of the examples


def test_cli_hf_directory(tmp_path, capsys):
    model, examples = tiny_hf_model(), make_examples()
    model.save_pretrained(tmp_path / "hf")
    data = write_jsonl(tmp_path / "hs.jsonl", examples)
    hellaswag.main(["-m", str(tmp_path / "hf"), "--data_file", str(data), "-d", "cpu", "--batch_size", "5",
                    "--json", str(tmp_path / "out.json")])
    correct, correct_norm = reference_counts(model, examples)
    result = json.loads((tmp_path / "out.json").read_text())
    assert result == {"n": 12, "acc": correct / 12, "acc_norm": correct_norm / 12}
    assert f"acc_norm {correct_norm / 12:.4f}" in capsys.readouterr().out


def test_cli_our_checkpoint_and_limit(tmp_path, capsys):
    model, examples = tiny_gpt(seed=2), make_examples(seed=2)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config)}, tmp_path / "model.pt")
    data = write_jsonl(tmp_path / "hs.jsonl", examples)
    hellaswag.main(["-m", str(tmp_path / "model.pt"), "--data_file", str(data), "-d", "cpu", "--limit", "7"])
    _, correct_norm = reference_counts(model, examples[:7])
    out = capsys.readouterr().out
    assert "n 7 " in out and f"acc_norm {correct_norm / 7:.4f}" in out


BAD_FILES = {
    "malformed": ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}\n\n{"ctx": "a", "endings": [\n',
                  r"bad\.jsonl, line 3: malformed JSON"),
    "label": ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 5}\n', r"line 1: 'label' must be 0, 1, 2 or 3"),
    "endings": ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}\n', r"line 1: 'endings' .* got 3 endings"),
    "empty": ("", r"bad\.jsonl: no examples"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_data_files(tmp_path, case):
    text, message = BAD_FILES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        list(hellaswag.iterate_examples("val", data_file=path))
    with pytest.raises(SystemExit, match=r"^hellaswag.py: error: .*" + message):  # main: one line
        hellaswag.main(["-m", "gpt2", "--data_file", str(path), "-d", "cpu"])


def test_render_example_rejects_bad_examples():
    with pytest.raises(ValueError, match="4 strings"):
        hellaswag.render_example({"ctx": "a", "endings": ["b"] * 5, "label": 0})
    with pytest.raises(ValueError, match="label"):
        hellaswag.render_example({"ctx": "a", "endings": ["b"] * 4})


def test_cli_errors(tmp_path, capsys):
    data = write_jsonl(tmp_path / "hs.jsonl", make_examples())
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    for args, message in [(["-m", "no/such/model"], "no such file or directory, and not one of gpt2"),
                          (["--data_file", "missing.jsonl"], "--data_file missing.jsonl: no such file"),
                          (["--limit", "0"], "at least 1")]:
        with pytest.raises(SystemExit):  # argparse's usage line and the error
            hellaswag.main(["-d", "cpu", *args])
        assert message in capsys.readouterr().err
    # the real command line: one line on stderr, no traceback
    run = subprocess.run([sys.executable, "hellaswag.py", "-m", str(tmp_path / "foreign.pt"), "--data_file", str(data)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.startswith("hellaswag.py: error: ") and "not a readable" in run.stderr
    assert run.stderr.count("\n") == 1, run.stderr


def test_import_does_nothing():
    code = ("import sys, hellaswag; assert 'transformers' not in sys.modules and 'requests' not in sys.modules; "
            "assert hellaswag.get_tokenizer.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

# -- download: a local HTTP server on 127.0.0.1 stands in for GitHub


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
    with pytest.raises(OSError, match=r"could not download http://127\.0\.0\.1:\d+/(missing|cut)_val"):
        hellaswag.download("val")
    assert list(hellaswag.DATA_DIR.iterdir()) == []
