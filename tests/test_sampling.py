"""Sampling with a KV cache (GPT.generate and GPT.stream, `--sample`): the same tokens as the uncached model, for
both recipes, before and past block_size; the same greedy tokens as transformers' generate on our export; one
prefill for the rows of one prompt, then one position per token; streamed text, whole characters; bad flags in one
line; never a padded id.

"The uncached model" is defined as stream documents it: every token runs model(idx[:, start:]) again, positions
from 0, where the window idx[:, start:] starts at 0 and, once it would hold more than block_size tokens, restarts at
its last block_size // 2 tokens. Within block_size that is the whole context, as the old per-token loop had it.
"""
import pytest
import torch
from conftest import TINY, TINY_RUN, train

import train_gpt2
from common import GPT2_VOCAB, get_tokenizer
from train_gpt2 import GPT, DistInfo, GPTConfig

BLOCK = 16
CONFIG = GPTConfig(block_size=BLOCK, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)  # padded like from scratch


def random_model(recipe, seed=0):
    """Every matrix random and large (the modern recipe's zero-initialised head would make all logits equal), so that
    greedy decoding wanders over many tokens and a wrong position or key would change them."""
    torch.manual_seed(seed)
    model = train_gpt2.RECIPES[recipe](CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def draw(logits, temperature, top_k, generator):
    """The draw stream makes: greedy at temperature 0, else among the top_k likeliest in proportion to exp(logit/t)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    top_logits, top_ids = torch.topk(logits, min(top_k or logits.size(-1), logits.size(-1)))
    top_ids, order = top_ids.sort(dim=-1)
    probs = torch.softmax(top_logits.gather(1, order) / temperature, dim=-1)
    return top_ids.gather(1, torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def uncached(model, idx, n, temperature=0.0, top_k=None, generator=None):
    """The reference: the whole window through model() again for every token, no cache."""
    start = 0
    for _ in range(n):
        if idx.size(1) - start > model.config.block_size:
            start = idx.size(1) - model.config.block_size // 2
        logits = model.lm_head(model.hidden_states(idx[:, start:])[:, -1])[:, :GPT2_VOCAB].float()  # = model()'s last
        idx = torch.cat((idx, draw(logits, temperature, top_k, generator)), dim=1)
    return idx


def prompts(rows=3, length=5, seed=1):
    return torch.randint(0, GPT2_VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_cached_greedy_equals_the_uncached_model_before_and_past_block_size(recipe):
    model, idx = random_model(recipe), prompts()
    ours = model.generate(idx, 4 * BLOCK, temperature=0)  # the window slides 7 times
    assert torch.equal(ours, uncached(model, idx, 4 * BLOCK))
    assert torch.equal(ours, model.generate(idx, 4 * BLOCK, temperature=0, use_cache=False))
    assert len(set(ours[0, 5:].tolist())) > 10  # varied: a wrong key or position would show


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
@pytest.mark.parametrize("temperature, top_k", [(1.0, 50), (0.7, 300)])
def test_cached_sampling_draws_the_uncached_models_tokens(recipe, temperature, top_k):
    model, idx = random_model(recipe), prompts()

    def sample(method, seed):
        generator = torch.Generator().manual_seed(seed)
        return method(idx, 3 * BLOCK, temperature=temperature, top_k=top_k, generator=generator)

    ours = sample(model.generate, 7)
    assert torch.equal(ours, sample(lambda *a, **k: uncached(model, *a, **k), 7))
    assert torch.equal(ours, sample(lambda *a, **k: model.generate(*a, use_cache=False, **k), 7))
    assert not torch.equal(ours, sample(model.generate, 8))  # the seed matters: these are draws


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_rows_decode_together_as_each_alone(recipe):
    model, idx = random_model(recipe), prompts(rows=4)
    together = model.generate(idx, 3 * BLOCK, temperature=0)
    for row in range(4):
        assert torch.equal(together[row:row + 1], model.generate(idx[row:row + 1], 3 * BLOCK, temperature=0))
    # n samples of one prompt: one prefill shared by the rows, then draws that differ; the same as the uncached model
    same = prompts(rows=1).repeat(4, 1)
    drawn = model.generate(same, 3 * BLOCK, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, uncached(model, same, 3 * BLOCK, 1.0, 50, torch.Generator().manual_seed(0)))
    assert len({tuple(row) for row in drawn[:, 5:].tolist()}) == 4


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_a_prefill_then_one_position_per_token_and_a_prefill_per_slide(recipe, monkeypatch):
    model = random_model(recipe)
    shapes, hidden_states = [], model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda idx, *a, **k: shapes.append(tuple(idx.shape)) or
                        hidden_states(idx, *a, **k))
    model.generate(prompts(rows=1).repeat(4, 1), 30, temperature=0)  # 4 samples of one 5-token prompt
    # one row for the rows' shared prompt; the window holds 16 at most, then restarts at its last 8: 17 - 8 = 9, ...
    assert shapes == [(1, 5)] + [(4, 1)] * 11 + [(1, 8)] + [(4, 1)] * 8 + [(1, 8)] + [(4, 1)] * 8
    shapes.clear()
    model.generate(prompts(rows=2), 3)
    assert shapes == [(2, 5), (2, 1), (2, 1)]
    shapes.clear()
    model.generate(prompts(rows=2), 3, use_cache=False)
    assert shapes == [(2, 5), (2, 6), (2, 7)]


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_greedy_equals_transformers_generate_on_the_export_within_block_size(recipe, tmp_path):
    """transformers' own KV cache and ours give the same tokens up to block_size. Past it there is nothing to compare
    for GPT-2: transformers' GPT2LMHeadModel has n_positions = block_size position embeddings and fails (IndexError)."""
    from transformers import AutoModelForCausalLM

    model, idx = random_model(recipe), prompts()
    model.save_pretrained(tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    n = BLOCK - idx.size(1)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False,
                         eos_token_id=None)  # (not stopping at <|endoftext|>: generate never does)
    assert torch.equal(theirs, model.generate(idx, n, temperature=0))


@torch.no_grad()
def test_nanochat_past_block_size_attends_to_everything_where_generate_slides(tmp_path):
    """transformers' NanoChat has no position table: past max_position_embeddings (our block_size) it keeps attending
    to every token, rotary positions running on. Our model computes that too when given the positions (hidden_states'
    pos), which generate does not do: it slides a window, as the model was trained on block_size tokens at most."""
    from transformers import AutoModelForCausalLM

    model, idx = random_model("modern"), prompts()
    model.save_pretrained(tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    n = 3 * BLOCK
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False, eos_token_id=None)
    everything = idx
    for _ in range(n):
        h = model.hidden_states(everything, pos=torch.arange(everything.size(1)))
        everything = torch.cat((everything, model.lm_head(h[:, -1])[:, :GPT2_VOCAB].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(theirs, everything)
    assert torch.equal(theirs[:, :BLOCK], model.generate(idx, n, temperature=0)[:, :BLOCK])


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_greedy_never_emits_a_padded_id_even_where_the_model_prefers_them(recipe):
    model, idx = random_model(recipe), prompts()
    with torch.no_grad():  # the 47 padded ids' logits far above any other
        model.lm_head.weight[GPT2_VOCAB:] = 100 * model.hidden_states(idx)[0, -1].sign()
    assert model(idx)[0][0, -1].argmax() >= GPT2_VOCAB
    out = model.generate(idx, 2 * BLOCK, temperature=0)
    assert out.max() < GPT2_VOCAB


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import write_shards

    tmp = tmp_path_factory.mktemp("sampling")
    train(write_shards(tmp / "shards", [4000, 6000, 5000]), tmp / "log", "--max_steps", "4", "--checkpoint_every", "4")
    return tmp / "log" / "model_00004.pt"


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_sample_streams_what_generate_gives(checkpoint, tmp_path, monkeypatch, temperature):
    printed = []  # each print call's text: the first sample must come token by token
    monkeypatch.setattr(train_gpt2, "print", lambda *a, end="\n", **k: printed.append(" ".join(map(str, a)) + end),
                        raising=False)
    n = 20
    train_gpt2.main(TINY_RUN + ["--init_from", str(checkpoint), "--log_dir", str(tmp_path / "none"), "--sample", "A",
                                "--temperature", temperature, "--max_new_tokens", str(n), "--num_samples", "3",
                                "--top_k", "40", "--seed", "5"])
    model = GPT.from_checkpoint(checkpoint)  # TINY's vocabulary of 128: "A" is its id 32
    out = model.generate(torch.tensor([[32]] * 3), n, temperature=float(temperature), top_k=40,
                         generator=torch.Generator().manual_seed(5))
    expected = "".join(f"> {get_tokenizer().decode(row.tolist())}\n" for row in out)
    assert "".join(printed) == expected and len(printed) == (1 + n + 1) + 2  # prompt, n tokens, end; 2 rows whole
    assert len({line for line in expected.splitlines()}) == (1 if temperature == "0" else 3)


def test_streamed_text_keeps_characters_split_over_tokens_whole(monkeypatch):
    """GPT-2's tokens are bytes: "é" can come as two tokens, neither of them text. Printed as they come, each piece
    is whole characters, and together they are the text that decoding all the tokens gives."""
    enc = get_tokenizer()
    text = " é — 😀 ok"
    ids = [enc.encode_single_token(bytes([b])) for b in text.encode()]  # one token per byte: split characters

    class Model:  # what print_samples needs of a model
        config, training = CONFIG, False

        def eval(self):
            pass

        def train(self, mode):
            pass

        def stream(self, idx, max_new_tokens, generator=None, **sampling):
            yield from (torch.full((idx.size(0), 1), i) for i in ids[:max_new_tokens])

    printed = []
    monkeypatch.setattr(train_gpt2, "print", lambda *a, end="\n", **k: printed.append(" ".join(a) + end), raising=False)
    train_gpt2.print_samples(Model(), "Molière:", len(ids), 0, DistInfo(0, 0, 1, "cpu", "cpu", True), "float32", 1)
    assert "".join(printed) == f"> Molière:{text}\n" and not any("\ufffd" in piece for piece in printed)
    assert len(printed) > 4  # (streamed: not in one piece)


@pytest.mark.parametrize("flag, value", [("--temperature", "-0.5"), ("--temperature", "nan"), ("--top_k", "0"),
                                         ("--num_samples", "0"), ("--max_new_tokens", "-3")])
def test_bad_sampling_flags_are_one_line_naming_the_flag(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_gpt2.main(TINY + ["--log_dir", str(tmp_path), "--sample", "A", flag, value])
    err = capsys.readouterr().err
    assert f"{flag} {value}" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_bench_times_the_cache_without_it_and_transformers(tmp_path):
    """bench.py's sample rows (the timings are figures for results/README.md; here: the rows are there, each
    generation ran to its length, and transformers' GPT-2 is not asked for positions it does not have)."""
    import json

    import bench

    bench.main(["--only", "sample", "--device", "cpu", "--dtype", "float32", "--n_layer", "2", "--n_head", "2",
                "--n_embd", "32", "-T", "16", "--prompt_tokens", "10", "--new_tokens", "10", "--sample_repeats", "1",
                "--json", str(tmp_path / "bench.json")])
    rows = {(r["recipe"], r["method"]): r for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    assert len(rows) == 8 and all(r["section"] == "sample" for r in rows.values())
    cached, transformers = "GPT.generate, KV cache", "transformers generate(), its KV cache"
    assert rows["gpt2", transformers]["tokens_per_s"] is None and "n_positions" in rows["gpt2", transformers]["error"]
    assert rows["modern", transformers]["tokens_per_s"] > 0 and "x_transformers" in rows["modern", cached]
    assert all(isinstance(rows[recipe, cached]["x_uncached"], float) for recipe in ("gpt2", "modern"))
