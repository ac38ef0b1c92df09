"""GPT.save_pretrained writes a directory the Hugging Face ecosystem uses alone: AutoTokenizer gives tiktoken's ids,
pipeline("text-generation") samples from it offline and never emits a padded id."""
import json
import os
import random
import shutil
import socket
import stat

import pytest
import torch

from common import EOT, UserError, get_tokenizer
from train_gpt2 import GPT, GPTConfig

# the vocabulary padded to 50,304 as training from scratch does: 47 ids the tokenizer does not know
CONFIG = GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)

# Pieces of text where a tokenizer conversion goes wrong if it does: accents (composed and combining), scripts
# without spaces, multi-codepoint emoji, every kind of whitespace and runs of it (GPT-2's pattern treats the last
# space of a run apart), contractions, digits, code, and the special token's text.
PIECES = ["Hello", " world", "naïve café", " Ünïcödé", "e\u0301", "déjà vu", "日本語のテキスト", " 中文字符", "한국어",
          "Ελληνικά", " русский текст", "עברית", "مرحبا", "🎉", " 👩‍👩‍👧", "🤖🤖", "\u00a0", "\u200b", "\u3000",
          " ", "  ", "     ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "<|endoftext|>", "<|endoftext", "'s",
          "'ll", " don't", "I'M", "123", " 4567890", "3.14159", "1,000,000", "—", "...", "!!!", "def f(x):",
          "    return x", '{"key": [1, 2]}', "https://example.com/a?b=c", "UPPER lower MiXeD", "x" * 40]


def varied_texts():
    """Each piece alone, a slice of the vocabulary's own strings, and 300 random mixes of the pieces."""
    rng = random.Random(0)
    vocabulary = [get_tokenizer().decode([i]) for i in range(0, EOT, 97)]  # partial UTF-8 decodes to U+FFFD
    mixes = ["".join(rng.choices(PIECES, k=rng.randint(2, 8))) for _ in range(300)]
    return PIECES + vocabulary + mixes


def encode_special(text):
    """tiktoken's ids as transformers tokenizes by default (pipeline(), lm-eval): <|endoftext|> in the text is the
    special id 50256, not the 7 tokens of its characters."""
    return get_tokenizer().encode(text, allowed_special="all")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny GPT exported once for the module; its padded ids are made the ones it likes most, so that only
    generation_config.json's suppress_tokens keeps them out of what transformers samples."""
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    with torch.no_grad():
        # logit of id i = ln_f(x) . w_i. ln_f's normalised output sums to 0 over channels, so with bias b = 1 and
        # the padded rows w = 3b every padded logit is 3 * |b|^2 = 96, far above the others (about +-0.2).
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[EOT + 1:] = 3.0
    directory = tmp_path_factory.mktemp("export")
    model.save_pretrained(directory)
    return model, directory


def test_directory_holds_the_tokenizer_files(exported):
    _, directory = exported
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "vocab.json", "merges.txt"]:
        assert (directory / name).is_file(), name
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "GPT2Tokenizer"  # a name transformers 4 and 5 both load
    assert tokenizer_config["model_max_length"] == CONFIG.block_size
    vocab = json.loads((directory / "vocab.json").read_text())
    assert len(vocab) == EOT and vocab["Ġthe"] == 262 and vocab["!"] == 0  # GPT-2's ids, Ġ standing for a space
    suppressed = json.loads((directory / "generation_config.json").read_text())["suppress_tokens"]
    assert suppressed == list(range(EOT + 1, CONFIG.vocab_size))


def test_auto_tokenizer_encodes_and_decodes_like_tiktoken(exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported[1])
    enc = get_tokenizer()
    texts = varied_texts()
    assert len(texts) > 400 and sum("<|endoftext|>" in t for t in texts) > 20
    # As text: <|endoftext|> written in a document is 7 ordinary tokens, as fineweb.py's encode_ordinary makes it
    ordinary = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ordinary == enc.encode_ordinary_batch(texts)
    assert tokenizer(texts)["input_ids"] == [encode_special(t) for t in texts]  # the default: no bos added
    assert [tokenizer.decode(ids) for ids in ordinary] == texts


def test_end_of_text_is_bos_eos_and_unk(exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported[1])
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.unk_token_id == EOT
    assert len(tokenizer) == EOT + 1 and tokenizer.pad_token is None  # GPT-2's 50,257 ids, no padding token
    assert tokenizer("<|endoftext|>Hi")["input_ids"] == [EOT, 17250]  # nothing added around the text


def test_vocab_and_merges_alone_give_the_same_ids(exported, tmp_path):
    """Tools that read GPT-2's classic pair (vocab.json + merges.txt) instead of tokenizer.json agree too."""
    from transformers import AutoTokenizer

    for name in ["vocab.json", "merges.txt", "tokenizer_config.json"]:
        shutil.copy(exported[1] / name, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    texts = varied_texts()
    assert tokenizer(texts, add_special_tokens=False)["input_ids"] == [encode_special(t) for t in texts]


def test_pipeline_generates_offline_and_never_a_padded_id(exported, monkeypatch):
    from transformers import pipeline

    model, directory = exported

    def no_network(*args, **kwargs):
        raise OSError("the exported directory must be enough: no network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    generator = pipeline("text-generation", model=str(directory), device="cpu")
    prompt = "Hello world"
    prompt_ids = get_tokenizer().encode_ordinary(prompt)
    ids = torch.tensor([prompt_ids])

    # The transformers model loaded from the directory is ours: same logits, padded ids included, and (the
    # fixture's doing) a padded id is its first choice, so what follows tests suppress_tokens.
    ours = model(ids)[0]
    theirs = generator.model(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert theirs[0, -1].argmax() > EOT

    out = generator(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=True, num_return_sequences=4,
                    return_tensors=True)
    for sample in out:
        generated = sample["generated_token_ids"]
        assert generated[:len(prompt_ids)] == prompt_ids and len(generated) == len(prompt_ids) + 12
        assert max(generated) <= EOT
    text = generator(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt)


# -- the directory an export writes into ----------------------------------------------------------------------

def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=EOT + 1, n_layer=1, n_head=2, n_embd=16))


def test_a_link_planted_in_the_directory_is_never_followed(tmp_path):
    """transformers wrote config.json in place: a link planted at DIR/config.json made it overwrite its target."""
    victim, directory = tmp_path / "victim.txt", tmp_path / "hf"
    victim.write_text("precious")
    directory.mkdir()
    (directory / "config.json").symlink_to(victim)
    with pytest.raises(UserError, match="is not a model exported by save_pretrained"):
        small_model().save_pretrained(directory)
    assert victim.read_text() == "precious"


def test_an_earlier_export_is_replaced_whole_and_anything_else_refused(tmp_path):
    import transformers

    directory = tmp_path / "hf"
    small_model().save_pretrained(directory)
    model = small_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(directory)  # one of our exports: replaced
    again = transformers.GPT2LMHeadModel.from_pretrained(directory)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert not [p for p in tmp_path.iterdir() if p.name != "hf"]  # no temp directory left beside it
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError, match="exists and is not a directory"):
        model.save_pretrained(tmp_path / "file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"not a model exported by save_pretrained \(it holds notes.txt\)"):
        model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_every_exported_file_has_the_same_mode(tmp_path):
    """safetensors wrote model.safetensors readable by its owner only, the other files followed the umask."""
    old = os.umask(0o022)
    try:
        small_model().save_pretrained(tmp_path / "hf")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o755


def test_an_export_without_its_tokenizer_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    """Offline without tiktoken's files, config and weights were written and no tokenizer: AutoTokenizer then
    built an empty one. An export is complete or absent."""
    import huggingface

    def offline():
        raise UserError("could not load GPT-2's tokenizer: tiktoken fetches it on first use")

    monkeypatch.setattr(huggingface, "get_tokenizer", offline)
    with pytest.raises(UserError, match="tokenizer"):
        small_model().save_pretrained(tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
