"""ModernGPT.save_pretrained writes transformers' NanoChat architecture (model_type "nanochat", built into
transformers, no remote code): the same logits, the same greedy tokens through its KV cache, loaded back exactly,
scored by hellaswag.py and core.py as the .pt is; and a checkpoint of the recipe before its embedding norm is refused.
"""
import json
import socket

import pytest
import torch
from conftest import TINY, TINY_RUN, train
from test_core import write_bundle
from test_hellaswag import make_examples, write_examples

import checkpoints
import core
import hellaswag
import huggingface
import train_gpt2
from common import EOT, UserError, get_tokenizer
from train_gpt2 import GPT, GPTConfig, ModernGPT

# the vocabulary padded to 50,304 as from scratch; 4 heads of 16 channels, so each head's sign flip is its own
CONFIG = GPTConfig(block_size=48, vocab_size=50304, n_layer=2, n_head=4, n_embd=64)


def random_modern(seed=0):
    """A ModernGPT whose every weight is random and large enough to matter: the recipe's zero-initialised
    projections and head would make every block the identity and the logits uniform, hiding any wrong mapping."""
    torch.manual_seed(seed)
    model = ModernGPT(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_modern()
    directory = tmp_path_factory.mktemp("nanochat") / "export"
    model.save_pretrained(directory)
    return model, directory


def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the exported directory must be enough: no network")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_the_directory_is_a_nanochat_model_with_gpt2s_tokenizer(exported):
    _, directory = exported
    assert {p.name for p in directory.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                    "tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                    "merges.txt"}
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert "auto_map" not in config  # nothing for trust_remote_code to run
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (EOT, EOT, EOT)
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["max_position_embeddings"]) == \
        (64, 2, 4, 4, 256, 48)
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps and config["final_logit_softcapping"] == 15.0
    assert config["rope_parameters"]["rope_theta"] == 10000.0 and config["tie_word_embeddings"] is False
    suppressed = json.loads((directory / "generation_config.json").read_text())["suppress_tokens"]
    assert suppressed == list(range(EOT + 1, CONFIG.vocab_size))


def test_transformers_computes_our_logits(exported):
    from transformers import AutoModelForCausalLM

    model, directory = exported
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(hf).__name__ == "NanoChatForCausalLM"
    idx = torch.randint(0, EOT + 1, (3, CONFIG.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert ours.abs().max() > 5  # soft-capped at 15, far from uniform: a wrong weight would show
    assert ((ours - theirs).abs().max() / ours.abs().max()).item() <= 1e-5


def test_generate_with_its_kv_cache_gives_our_greedy_tokens(exported):
    from transformers import AutoModelForCausalLM

    model, directory = exported
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    prompt = torch.tensor([get_tokenizer().encode("Le malade imaginaire")])
    n = CONFIG.block_size - prompt.size(1)  # up to the block: every position of the rotary table
    theirs = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    ours = prompt
    with torch.no_grad():  # the whole context recomputed for every token
        for _ in range(n):
            logits = model(ours)[0][0, -1, :EOT + 1]
            logits[EOT] = -float("inf")  # min_new_tokens: transformers never ends on <|endoftext|> early
            ours = torch.cat((ours, logits.argmax().view(1, 1)), dim=1)
    assert theirs.tolist() == ours.tolist() and len(set(ours[0, prompt.size(1):].tolist())) > 3


def test_pipeline_and_tokenizer_work_offline_from_the_directory(exported, monkeypatch):
    from transformers import AutoTokenizer, pipeline

    _, directory = exported
    no_network(monkeypatch)
    text = "Monsieur Jourdain: Par ma foi! il y a plus de quarante ans que je dis de la prose."
    assert AutoTokenizer.from_pretrained(directory)(text)["input_ids"] == get_tokenizer().encode(text)
    generator = pipeline("text-generation", model=str(directory), device="cpu")
    out = generator(text, max_new_tokens=6, min_new_tokens=6, do_sample=True, return_tensors=True)[0]
    generated = out["generated_token_ids"]
    assert len(generated) == len(get_tokenizer().encode(text)) + 6 and max(generated) <= EOT  # no padded id


def test_from_pretrained_loads_the_export_back_exactly(exported):
    model, directory = exported
    back = GPT.from_pretrained(directory)
    assert type(back) is ModernGPT and back.config == CONFIG
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_what_no_recipe_computes_exactly_is_refused_by_name(exported, tmp_path):
    """A NanoChat with another norm epsilon or more shared key/value heads (nanochat's own models on the hub have
    both) would load into ModernGPT and compute another function: refused, naming the settings."""
    _, directory = exported
    for change, name in (({"rms_norm_eps": 1e-6}, "rms_norm_eps"), ({"num_key_value_heads": 2}, "num_key_value_heads"),
                         ({"final_logit_softcapping": 30.0}, "final_logit_softcapping")):
        variant = tmp_path / name
        variant.mkdir()
        for f in directory.iterdir():
            (variant / f.name).write_bytes(f.read_bytes())
        config = json.loads((directory / "config.json").read_text())
        (variant / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=f"nanochat variant .*{name}"):
            GPT.from_pretrained(variant)
        if name == "rms_norm_eps":  # hellaswag.py and core.py score it as transformers computes it instead
            assert type(hellaswag.load_model(str(variant))).__name__ == "NanoChatForCausalLM"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A modern checkpoint from a real (tiny) run, with GPT-2's vocabulary so that text scores."""
    from conftest import write_shards

    root = tmp_path_factory.mktemp("trained")
    shards = write_shards(root / "shards", [4000, 6000, 5000])
    train(shards, root / "log", "--recipe", "modern", "--vocab_size", "50304", "--block_size", "64", "-T", "32",
          "--max_steps", "3", "--checkpoint_every", "3", base=TINY)
    return shards, root / "log" / "model_00003.pt", root


@pytest.fixture(scope="module")
def trained(run):
    """That checkpoint with a sharper head (tuned.pt), its model, and its export."""
    shards, checkpoint, root = run
    saved = checkpoints.load_checkpoint(checkpoint)
    model = GPT.from_checkpoint(checkpoint)
    with torch.no_grad():  # three steps leave the zero-initialised head near zero: give the scores some spread
        model.lm_head.weight.normal_(0.0, 0.5)
    saved["model"] = model.state_dict()
    saved["checksum"] = checkpoints.checksum(saved)
    torch.save(saved, root / "tuned.pt")
    model.save_pretrained(root / "export")
    return shards, root / "tuned.pt", model, root


def test_hellaswag_scores_the_export_packed_as_it_scores_the_checkpoint(trained, tmp_path):
    _, checkpoint, _, root = trained
    loaded = hellaswag.load_model(str(root / "export"))
    assert type(loaded) is ModernGPT  # our model: one packed row per example
    data = write_examples(tmp_path / "hs.jsonl", make_examples(n=20, seed=5))
    results = []
    for source in (checkpoint, root / "export"):
        hellaswag.main(["-m", str(source), "--data_file", str(data), "-d", "cpu", "--json", str(tmp_path / "r")])
        results.append(json.loads((tmp_path / "r").read_text()))
    assert results[0] == results[1] and results[0]["n"] == 20
    assert 0 < results[0]["acc_norm"] < 1  # neither all right nor all wrong: a changed score would show


def test_core_scores_the_export_as_it_scores_the_checkpoint(trained, tmp_path):
    _, checkpoint, model, root = trained
    bundle = write_bundle(tmp_path / "bundle")
    results = []
    for source in (checkpoint, root / "export"):
        core.main(["-m", str(source), "--bundle_dir", str(bundle), "-d", "cpu", "--json", str(tmp_path / "c")])
        results.append(json.loads((tmp_path / "c").read_text()))
    tasks = core.load_tasks(bundle)
    assert results[0] == results[1] == core.summarize(tasks, core.evaluate(model, tasks, core.render(tasks), "cpu"))


def test_the_export_fine_tunes_as_the_modern_recipe(trained, tmp_path, capsys):
    shards, _, _, root = trained
    train_gpt2.main(TINY_RUN + ["--data", str(shards), "--log_dir", str(tmp_path / "tune"), "--init_from",
                                str(root / "export"), "--max_steps", "4", "--checkpoint_every", "4"])
    tuned = checkpoints.load_checkpoint(tmp_path / "tune" / "model_00004.pt")
    assert tuned["args"]["recipe"] == "modern" and len(tuned["optimizer"]) == 2  # Muon and AdamW
    assert tuned["config"] == vars(GPT.from_pretrained(root / "export").config)
    with pytest.raises(SystemExit):
        train_gpt2.main(TINY_RUN + ["--data", str(shards), "--log_dir", str(tmp_path / "refused"), "--init_from",
                                    str(root / "export"), "--recipe", "gpt2"])
    assert "is a model of --recipe modern: fine-tune it with --recipe modern" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # OpenAI's GPT-2 is the gpt2 recipe's: refused before any download
        train_gpt2.main(TINY_RUN + ["--data", str(shards), "--log_dir", str(tmp_path / "refused"), "--init_from",
                                    "gpt2", "--recipe", "modern"])
    assert "gpt2 is a model of --recipe gpt2: fine-tune it with --recipe gpt2" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def older_modern_checkpoint(checkpoint, path):
    """The checkpoint as the recipe before the embedding norm saved it: no revision (its weights have the same
    names and shapes, so only the record tells them apart)."""
    saved = checkpoints.load_checkpoint(checkpoint)
    saved.pop("revision", None)
    saved["checksum"] = checkpoints.checksum(saved)
    torch.save(saved, path)
    return path


def test_a_modern_checkpoint_from_before_the_embedding_norm_is_refused(run, tmp_path, capsys):
    shards, checkpoint, _ = run
    old = older_modern_checkpoint(checkpoint, tmp_path / "model_00003.pt")
    with pytest.raises(UserError, match="revision 1 of the modern recipe's model") as info:
        GPT.from_checkpoint(old)
    assert len(str(info.value).splitlines()) == 1
    for argv in (["--resume", str(old)], ["--init_from", str(old), "-T", "32", "--log_dir", str(tmp_path / "tune")],
                 ["--resume", str(old), "--sample", "Harpagon"]):
        with pytest.raises(SystemExit):
            train_gpt2.main(["--data", str(shards), "--device", "cpu", *argv])
        err = capsys.readouterr().err
        assert "revision 1 of the modern recipe's model" in err and err.count("\n") == 1, err
    data = write_examples(tmp_path / "hs.jsonl", make_examples())
    with pytest.raises(SystemExit, match="revision 1"):
        hellaswag.main(["-m", str(old), "--data_file", str(data), "-d", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hs.jsonl", "model_00003.pt"]  # nothing written on the way


def test_a_gpt2_checkpoint_without_a_revision_still_loads(tmp_path):
    """GPT-2's model has not changed: its checkpoints from before revisions were recorded are revision 1."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    path = tmp_path / "old.pt"
    torch.save({"model": model.state_dict(), "config": vars(model.config).copy(), "step": 0}, path)
    assert torch.equal(GPT.from_checkpoint(path).lm_head.weight, model.lm_head.weight)


def test_hf_differences_name_what_differs_for_either_recipe():
    from transformers import GPT2Config, LlamaConfig, NanoChatConfig

    exact = huggingface.hf_config(ModernGPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16)))
    assert huggingface.hf_differences(exact) == [] and huggingface.hf_differences(GPT2Config()) == []
    assert huggingface.hf_differences(NanoChatConfig()) == ["intermediate_size", "rms_norm_eps"]  # nanochat's defaults
    assert huggingface.hf_differences(GPT2Config(activation_function="gelu")) == ["activation_function"]
    assert huggingface.hf_differences(LlamaConfig()) == ["model_type"]


def test_a_transformers_without_nanochat_is_one_line(monkeypatch, tmp_path):
    """transformers 4.x (which requirements.txt allows for the gpt2 recipe) has no NanoChat: say what to install."""
    import sys
    import types

    import transformers

    old = types.ModuleType("transformers")
    old.AutoModelForCausalLM = transformers.AutoModelForCausalLM
    monkeypatch.setitem(sys.modules, "transformers", old)
    with pytest.raises(UserError, match="new in transformers 5: pip install -U transformers"):
        random_modern().save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()
