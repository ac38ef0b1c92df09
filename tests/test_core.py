"""core.py: the eval bundle's format, prompts and token spans against hand-worked examples, the seeded shuffle and
few-shot draws, cropping to the block size, batched scores against one sequence per forward, the centered mean,
--json, the download and every bad-input message."""
import json
import random
import zipfile

import pytest
import torch
import torch.nn.functional as F

import common
import core
import train_gpt2
from train_gpt2 import GPT, GPTConfig, ModernGPT

MC = [  # multiple choice: a query, choices, the gold index
    {"query": f"Question {i}: the capital of country {i} is", "choices": [f"Paris{i}", f"Rome{i}", f"Oslo{i}"],
     "gold": i % 3} for i in range(6)]
SCHEMA = [  # schema: context options sharing one continuation
    {"context_options": [f"The cat {i} sat", f"The dog {i} ran"], "continuation": f"on the mat number {i}.",
     "gold": i % 2} for i in range(5)]
LM = [  # language modeling: contexts with whitespace around them, and one longer than a 32-token block
    {"context": f"  Count with me: {i} {i + 1} {i + 2}\n", "continuation": f"{i + 3}"} for i in range(5)] + [
    {"context": " ".join(["word"] * 60), "continuation": "the end"}]
TASKS = [  # (label, kind, shots, delimiter, rows, random baseline %)
    ("mc_task", "multiple_choice", 2, "\nAnswer: ", MC, 25.0),
    ("schema_task", "schema", 1, None, SCHEMA, 50.0),
    ("lm_task", "language_modeling", 1, None, LM, 0.0),
]


def write_bundle(directory, tasks=TASKS, yaml_text=None):
    """An eval bundle in the published layout: core.yaml, eval_data/<uri>, eval_meta_data.csv."""
    (directory / "eval_data" / "sub").mkdir(parents=True)
    entries = []
    for label, kind, shots, delimiter, rows, _ in tasks:
        uri = f"sub/{label}.jsonl"
        (directory / "eval_data" / uri).write_text("".join(json.dumps(r) + "\n" for r in rows))
        entry = f"- label: {label}\n  dataset_uri: {uri}\n  num_fewshot: [{shots}]\n  icl_task_type: {kind}\n"
        entries.append(entry + (f"  continuation_delimiter: {json.dumps(delimiter)}\n" if delimiter else ""))
    (directory / "core.yaml").write_text(yaml_text or "icl_tasks:\n" + "".join(entries))
    (directory / "eval_meta_data.csv").write_text("Eval Task,Task Category,Random baseline\n" + "".join(
        f"{label},x,{baseline}\n" for label, *_, baseline in tasks))
    return directory


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "eval_bundle")


def test_rows_are_shuffled_by_1337_and_max_per_task_takes_the_same_first_rows(bundle):
    tasks = core.load_tasks(bundle)
    assert [t.label for t in tasks] == ["mc_task", "schema_task", "lm_task"]
    assert [t.delimiter for t in tasks] == ["\nAnswer: ", " ", " "] and [t.shots for t in tasks] == [2, 1, 1]
    # random.Random(1337).shuffle of six rows, as nanochat's base_eval.py shuffles every task
    assert [MC.index(r) for r in tasks[0].rows] == [1, 0, 3, 2, 5, 4]
    short = core.load_tasks(bundle, max_per_task=4)
    assert short[0].rows == tasks[0].rows[:4] and short[2].rows == tasks[2].rows[:4]


def fixed(label, kind, shots, delimiter, rows):
    """A task whose rows stay in the given order (no shuffle), for hand-worked prompts."""
    return core.Task(label, kind, shots, delimiter, 0.0, rows)


def test_multiple_choice_prompts_and_spans():
    task = fixed("mc", "multiple_choice", 2, "\nAnswer: ", MC)
    # row 0's two examples: random.Random(1234 + 0).sample([1, 2, 3, 4, 5], 2) = [4, 1]
    head = ("Question 4: the capital of country 4 is\nAnswer: Rome4\n\n"
            "Question 1: the capital of country 1 is\nAnswer: Rome1\n\n")
    assert core.prompts(task, 0) == [head + "Question 0: the capital of country 0 is\nAnswer: " + c
                                     for c in ("Paris0", "Rome0", "Oslo0")]
    enc = common.get_tokenizer()
    spans = core.spans(task, 0)
    for (tokens, start, end), choice in zip(spans, ("Paris0", "Rome0", "Oslo0")):
        assert tokens[0] == common.EOT and end == len(tokens)
        assert tokens[start:end] == enc.encode_ordinary(" " + choice)  # after the options' common prefix
    assert core.prompts(task, 3)[0].startswith("Question 1: the capital of country 1 is\nAnswer: Rome1\n\n"
                                               "Question 4")  # Random(1237).sample([0, 1, 2, 4, 5], 2) = [1, 4]


def test_schema_prompts_score_the_shared_continuation():
    task = fixed("schema", "schema", 1, " ", SCHEMA)
    # row 2's example: random.Random(1236).sample([0, 1, 3, 4], 1) = [4], whose gold option is 0 (the cat)
    assert core.prompts(task, 2) == ["The cat 4 sat on the mat number 4.\n\nThe cat 2 sat on the mat number 2.",
                                     "The cat 4 sat on the mat number 4.\n\nThe dog 2 ran on the mat number 2."]
    enc = common.get_tokenizer()
    for tokens, start, end in core.spans(task, 2):
        assert tokens[start:end] == enc.encode_ordinary(" on the mat number 2.")  # the options' common suffix


def test_language_modeling_trims_the_context_and_scores_the_continuation():
    task = fixed("lm", "language_modeling", 1, " ", LM)
    # row 1's example: random.Random(1235).sample([0, 2, 3, 4, 5], 1) = [4]; contexts trimmed of whitespace
    without, with_continuation = core.prompts(task, 1)
    assert with_continuation == "Count with me: 4 5 6 7\n\nCount with me: 1 2 3 4"
    assert without == "Count with me: 4 5 6 7\n\nCount with me: 1 2 3"  # the delimiter's space stripped off
    [(tokens, start, end)] = core.spans(task, 1)
    assert tokens[start:end] == common.get_tokenizer().encode_ordinary(" 4")


def test_a_sequence_longer_than_the_block_keeps_its_last_tokens():
    task = fixed("lm", "language_modeling", 0, " ", LM)
    [span] = core.spans(task, 5)  # 60 words, then " the end"
    assert len(span[0]) > 32
    tokens, start, end = core.cropped(span, 32)
    assert len(tokens) == 32 and tokens == span[0][-32:] and end == 32
    assert tokens[start:end] == common.get_tokenizer().encode_ordinary(" the end")
    with pytest.raises(common.UserError, match="does not fit the model's context of 2 tokens"):
        core.cropped(span, 2)


def one_sequence_at_a_time(model, item, block_size):
    """The reference: each option alone through the model's full forward pass (logits at every position), losses
    and argmax over its span, as nanochat's core_eval.py scores an item."""
    means, all_right = [], True
    for span in item.spans:
        tokens, start, end = core.cropped(span, block_size)
        idx = torch.tensor([tokens])
        out = model(idx)
        logits = (out[0] if isinstance(out, tuple) else out.logits)[0].float()
        cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        logits = logits if cap is None else cap * torch.tanh(logits / cap)
        losses = F.cross_entropy(logits[start - 1:end - 1], idx[0, start:end], reduction="none")
        means.append(losses.mean().item())
        all_right = all_right and bool((logits[start - 1:end - 1].argmax(-1) == idx[0, start:end]).all())
    return all_right if item.gold is None else means.index(min(means)) == item.gold


@pytest.fixture(scope="module")
def tiny_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    ours, modern = GPT(config).eval(), ModernGPT(config).eval()
    with torch.no_grad():  # the modern head starts at zero (uniform logits, every option alike): give it weights
        modern.lm_head.weight.normal_(0, 0.5)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    return {"gpt2": ours, "modern": modern, "transformers": hf}


@pytest.mark.parametrize("name", ["gpt2", "modern", "transformers"])
def test_batched_scores_equal_one_sequence_at_a_time(bundle, tiny_models, name):
    model = tiny_models[name]
    tasks = core.load_tasks(bundle)
    items = core.render(tasks)
    counts = core.evaluate(model, tasks, items, "cpu", batch_size=4)
    expected = [[0, 0] for _ in tasks]
    with torch.no_grad():
        for item in items:
            expected[item.task][0] += one_sequence_at_a_time(model, item, 32)
            expected[item.task][1] += 1
    assert counts == expected and [n for _, n in counts] == [6, 5, 6]
    # ranks sharing the items sum to the same counts
    shares = [core.evaluate(model, tasks, items, "cpu", batch_size=3, rank=r, world_size=2) for r in (0, 1)]
    assert [[a[0] + b[0], a[1] + b[1]] for a, b in zip(*shares)] == expected


class Bigram(torch.nn.Module):
    """A model that knows one text: at each token it predicts the token that followed it there (logits 10, else 0),
    so a language-modeling row drawn from that text is right, token for token, and the others are not."""

    def __init__(self, tokens):
        super().__init__()
        self.next_of = {a: b for a, b in zip(tokens, tokens[1:])}
        self.config = GPTConfig(block_size=32, vocab_size=50304)

    def hidden_states(self, idx, pos=None, attn_mask=None):
        return idx.unsqueeze(-1).float()

    def lm_head(self, h):
        logits = torch.zeros(h.size(0), self.config.vocab_size)
        logits[torch.arange(h.size(0)), [self.next_of.get(int(t), 0) for t in h[:, 0]]] = 10.0
        return logits

    def forward(self, idx):
        return self.lm_head(self.hidden_states(idx).flatten(0, 1)).view(*idx.shape, -1), None


def test_a_language_modeling_row_is_right_only_when_every_token_is_the_argmax(bundle):
    tasks = core.load_tasks(bundle)[2:]  # lm_task
    items = [core.Item(0, item.spans, item.gold) for item in core.render(tasks)]
    long_row = items[next(i for i, row in enumerate(tasks[0].rows) if row["continuation"] == "the end")]
    model = Bigram(core.cropped(long_row.spans[0], 32)[0])  # knows the long row's last 32 tokens
    counts = core.evaluate(model, tasks, items, "cpu", batch_size=4)
    assert counts == [[1, 6]] and sum(one_sequence_at_a_time(model, item, 32) for item in items) == 1
    wrong = core.Item(0, [(long_row.spans[0][0][:-1] + [0], *long_row.spans[0][1:])], None)  # its last token changed
    assert core.evaluate(model, tasks, [wrong], "cpu") == [[0, 1]]


def test_centered_accuracies_and_their_mean():
    tasks = [core.Task(f"t{i}", "schema", 0, " ", b, []) for i, b in enumerate((25.0, 50.0, 0.0))]
    summary = core.summarize(tasks, [[3, 4], [1, 2], [0, 5]])
    assert summary["tasks"]["t0"] == {"accuracy": 0.75, "centered": pytest.approx(2 / 3), "n": 4}
    assert summary["tasks"]["t1"]["centered"] == 0.0 and summary["tasks"]["t2"]["centered"] == 0.0
    assert summary["core"] == pytest.approx(2 / 9)


def test_cli_scores_a_checkpoint_and_writes_json(bundle, tmp_path, capsys, tiny_models):
    model = tiny_models["gpt2"]
    model.save_pretrained(tmp_path / "hf")  # a Hugging Face directory: loads into our GPT, as hellaswag.py's -m
    core.main(["-m", str(tmp_path / "hf"), "--bundle_dir", str(bundle), "--max_per_task", "4", "-d", "cpu",
               "--json", str(tmp_path / "core.json")])
    result = json.loads((tmp_path / "core.json").read_text())
    assert set(result) == {"core", "tasks"} and list(result["tasks"]) == ["mc_task", "schema_task", "lm_task"]
    assert all(set(r) == {"accuracy", "centered", "n"} and r["n"] == 4 for r in result["tasks"].values())
    tasks = core.load_tasks(bundle, 4)
    assert result == core.summarize(tasks, core.evaluate(model, tasks, core.render(tasks), "cpu"))
    out = capsys.readouterr().out
    assert "mc_task" in out and "multiple_choice" in out and f"CORE {result['core']:.4f}" in out


def test_the_download_is_all_or_nothing(bundle, tmp_path, monkeypatch):
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in bundle.rglob("*"):
            z.write(path, "eval_bundle/" + str(path.relative_to(bundle)))
    monkeypatch.setattr(core, "URL", archive.as_uri())
    target = tmp_path / "cache" / "eval_bundle"
    assert core.download(target) == target and [t.label for t in core.load_tasks(target)][0] == "mc_task"
    assert sorted(p.name for p in target.parent.iterdir()) == ["eval_bundle"]  # no temp files left
    monkeypatch.setattr(core, "URL", (tmp_path / "nowhere.zip").as_uri())
    with pytest.raises(common.UserError) as info:
        core.download(tmp_path / "other" / "eval_bundle")
    message = str(info.value)
    zip_path = tmp_path / "other" / "eval_bundle.zip"
    assert f"curl -L --create-dirs -o {zip_path} {core.URL}" in message
    assert f"unzip {zip_path} -d {tmp_path / 'other'}" in message
    assert "\n" not in message and not (tmp_path / "other").exists()  # nothing left behind, not even the folder
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    monkeypatch.setattr(core, "URL", (tmp_path / "bad.zip").as_uri())
    with pytest.raises(common.UserError, match="did not unpack to a CORE eval bundle"):
        core.download(tmp_path / "third" / "eval_bundle")
    assert not (tmp_path / "third").exists()


def broken(directory, label, rows=None, kind=None, shots=None, baseline=True):
    tasks = [(lb, kind or k, k_shots if shots is None else shots, d, rows if rows is not None else r, b)
             for lb, k, k_shots, d, r, b in TASKS if lb == label]
    write_bundle(directory, tasks)
    if not baseline:
        (directory / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nother,25\n")
    return directory


@pytest.mark.parametrize("make, expected", [
    (lambda d: broken(d, "mc_task", rows=MC[:2] + ["not json"]), r"mc_task.jsonl, line 3: expected a JSON object"),
    (lambda d: broken(d, "mc_task", rows=[{**MC[0], "gold": 3}] + MC[1:]), r"line 1: gold 3 is not the index of"),
    (lambda d: broken(d, "schema_task", rows=[{"context_options": ["a"]}]), r"needs continuation \(str\), gold"),
    (lambda d: broken(d, "lm_task", shots=6), r"task lm_task: 6-shot needs more than 6 rows"),
    (lambda d: broken(d, "lm_task", kind="generation"), r"icl_task_type 'generation' is not one of"),
    (lambda d: broken(d, "mc_task", baseline=False), r"task mc_task: no random baseline for it"),
    (lambda d: (d.mkdir(), d)[1], r"is not a CORE eval bundle \(FileNotFoundError"),
])
def test_bad_bundles_are_one_line(tmp_path, capsys, make, expected):
    import re

    directory = make(tmp_path / "b")
    with pytest.raises(SystemExit):
        core.main(["-m", "gpt2", "--bundle_dir", str(directory), "-d", "cpu"])
    err = capsys.readouterr().err
    assert err.startswith("core.py: error: ") and err.count("\n") == 1 and re.search(expected, err), err


def test_a_malformed_jsonl_line_is_named(tmp_path):
    directory = broken(tmp_path / "b", "mc_task")
    with open(directory / "eval_data" / "sub" / "mc_task.jsonl", "a") as f:
        f.write('{"query": "x", "choices": [\n')
    with pytest.raises(common.UserError, match=r"mc_task.jsonl, line 7: malformed JSON"):
        core.load_tasks(directory)


def test_few_shot_examples_come_from_the_rows_kept(bundle):
    """As nanochat draws them: from the rows after --max_per_task, never from those cut off."""
    task = core.load_tasks(bundle, max_per_task=3)[0]
    kept = {r["query"] for r in task.rows}
    for i in range(3):
        shots = core.prompts(task, i)[0].split("\n\n")[:-1]
        assert all(s.split("\nAnswer: ")[0] in kept for s in shots) and len(shots) == 2


def test_a_vocabulary_too_small_for_gpt2s_ids_is_refused(bundle):
    tasks = core.load_tasks(bundle)
    small = GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(common.UserError, match="the model's vocabulary has 128 ids"):
        core.check_fits(small, core.render(tasks))


def test_random_draws_used_above():
    """The hand-worked examples above rest on Python's seeded generators, which Python keeps stable."""
    assert random.Random(1234).sample([1, 2, 3, 4, 5], 2) == [4, 1]
    assert random.Random(1236).sample([0, 1, 3, 4], 1) == [4]
    assert random.Random(1235).sample([0, 2, 3, 4, 5], 1) == [4]
    assert train_gpt2.GPT2_VOCAB == 50257
