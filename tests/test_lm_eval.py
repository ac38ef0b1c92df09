"""lm-evaluation-harness scores an exported model of either recipe offline, and its log-likelihoods are ours.

Skipped without lm-eval (pip install "lm-eval[hf]"). The task is a local one the test writes: a jsonl of
(context, continuation) pairs scored as loglikelihood requests, as lambada or the MC tasks score theirs.
"""
import json
import socket

import pytest
import torch
import torch.nn.functional as F

from common import EOT, get_tokenizer
from train_gpt2 import RECIPES, GPTConfig

lm_eval = pytest.importorskip("lm_eval")

pytestmark = pytest.mark.slow  # importing lm-eval's stack dominates: about 30 s on a busy 2-core CPU

CONFIG = GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)

# Each pair exercises one rule of how lm-eval splits and tokenizes (lm_eval/api/model.py, _encode_pair)
PAIRS = [
    ("The capital of France is", " Paris"),
    ("Hello ", "world"),  # trailing whitespace of the context moves to the continuation: "Hello" + " world"
    ("Question: 2 + 2 =  ", "4"),
    ("Line one\n\n", "Line two"),  # newlines are whitespace too
    ("", "An empty context"),  # replaced by one <|endoftext|> token
    # A token merges across the boundary (" cats"): lm-eval cuts the whole text's tokens at the context's length,
    # so it scores " are asleep" after "The cats", and a tokenizer-level replication must do the same
    ("The cat", "s are asleep"),
    ("Café crème ", "au lait 🍵"),
    ("first document<|endoftext|>", "second document"),  # the special token in text is id 50256
    ("日本語の", "テキスト"),
    (" ".join(["word"] * 40), " and the end of a context longer than the model's 32 positions"),  # left-truncated
]

TASK = """\
task: tiny_pairs
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def lm_eval_loglikelihood(model, context, continuation):
    """(log p(continuation | context), is_greedy) as lm-eval's HF model computes it, with our GPT and tiktoken.

    Its tokenizer gives tiktoken's ids with <|endoftext|> in text as the special id (tests/test_export.py), so
    encode(allowed_special="all"). The split and the window follow lm_eval/api/model.py (loglikelihood,
    _encode_pair) and lm_eval/models/huggingface.py (_loglikelihood_tokens).
    """
    def encode(text):
        return get_tokenizer().encode(text, allowed_special="all")

    if context == "":
        context_ids, continuation_ids = [EOT], encode(continuation)
    else:
        spaces = len(context) - len(context.rstrip())  # " world" is one token, "world" after "Hello " is not
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = encode(context)
        continuation_ids = encode(context + continuation)[len(context_ids):]
    # The model sees the last block_size tokens of context + continuation without its final token
    window = (context_ids + continuation_ids)[-(model.config.block_size + 1):][:-1]
    logits, _ = model(torch.tensor([window]))
    logprobs = F.log_softmax(logits[0, -len(continuation_ids):], dim=-1)  # over all 50,304 ids, as lm-eval does
    targets = torch.tensor(continuation_ids)
    picked = logprobs.gather(-1, targets[:, None])
    return picked.sum().item(), bool((logprobs.argmax(-1) == targets).all())


def greedy_pair(model, context):
    """(context, the model's first choice after it): a pair lm-eval must find greedy."""
    enc = get_tokenizer()
    logits, _ = model(torch.tensor([enc.encode(context)]))
    best = logits[0, -1].argmax().item()
    continuation = enc.decode([best])
    assert enc.encode(context + continuation)[len(enc.encode(context)):] == [best]  # survives re-tokenization
    return context, continuation


def tiny_model(recipe):
    """A tiny model of either recipe, sharper than its init, so that every token of a continuation weighs in its
    score (the modern recipe's zero-initialised projections and head would give uniform logits)."""
    torch.manual_seed(0)
    model = RECIPES[recipe](CONFIG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # (the gpt2 recipe's head is the tied wte: named so)
            if p is model.lm_head.weight or (recipe == "modern" and name.endswith("c_proj.weight")):
                torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])  # exported as GPT2LMHeadModel and as NanoChatForCausalLM
def test_lm_eval_log_likelihoods_equal_ours(tmp_path, monkeypatch, recipe):
    from lm_eval.tasks import TaskManager

    model = tiny_model(recipe)
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        pairs = PAIRS + [greedy_pair(model, "The capital of France is")]

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": x}) + "\n" for c, x in pairs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_pairs.yaml").write_text(TASK.format(data=data, cache=tmp_path / "datasets"))

    def no_network(*args, **kwargs):
        raise OSError("lm-eval must run from the exported directory and the local task alone: no network")

    # Closed sockets, not HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1: those are read when huggingface_hub and
    # datasets are imported, which other tests in this process may already have done
    monkeypatch.setattr(socket.socket, "connect", no_network)
    # include_defaults=False: indexing lm-eval's thousands of built-in tasks would take most of a minute
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "model")},
                                      tasks=["tiny_pairs"], task_manager=tasks, device="cpu", batch_size=4,
                                      log_samples=True, bootstrap_iters=0)

    samples = sorted(results["samples"]["tiny_pairs"], key=lambda s: s["doc_id"])
    assert [tuple(s["arguments"][0]) for s in samples] == pairs  # the requests are exactly our pairs
    theirs = [tuple(s["resps"][0][0]) for s in samples]  # (log-likelihood, is_greedy) per request
    with torch.no_grad():
        ours = [lm_eval_loglikelihood(model, c, x) for c, x in pairs]
    assert [greedy for _, greedy in theirs] == [greedy for _, greedy in ours] == [False] * len(PAIRS) + [True]
    differences = [abs(t - o) for (t, _), (o, _) in zip(theirs, ours)]
    assert max(differences) < 1e-4, list(zip(pairs, theirs, ours))  # 7.6e-6 measured (float32 sums)
    assert len({round(o, 1) for o, _ in ours}) == len(pairs)  # the scores differ: a wrong split would show
