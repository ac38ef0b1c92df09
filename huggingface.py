"""
Hugging Face interop for train_gpt2.py's two recipes, kept off the lesson's way to its training loop: which
transformers models each recipe computes exactly, the translation of their configs and weights to ours and back, and
the writing of an export that works alone (config.json, model.safetensors and GPT-2's tokenizer files).

- --recipe gpt2 is transformers' GPT2LMHeadModel: the same module names; their Conv1D stores a matrix as (in, out),
  our nn.Linear as (out, in), so four matrices per block are transposed.
- --recipe modern is transformers' NanoChatForCausalLM (built in since transformers 5, no remote code): c_attn is
  split into q, k and v, the MLP is fc1/fc2, and half of each head's q and k rows change sign (rotation_signs).

train_gpt2.GPT.from_pretrained calls load() and GPT.save_pretrained calls save(). Models come in as arguments: this
module never imports train_gpt2.py, so imports run one way. transformers is imported inside the functions (heavy).
"""

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from common import EOT, GPT2_VOCAB, UserError, first_line, get_tokenizer, umask

HF_RECIPES = {"gpt2": "gpt2", "nanochat": "modern"}  # a Hugging Face model_type -> the --recipe whose model computes it
FLOAT32_EPS = 2.0 ** -23  # torch.finfo(torch.float32).eps: the epsilon F.rms_norm adds in float32


def hf_differences(config):
    """The settings in which a transformers config differs from a model that train_gpt2.py computes; empty when it
    computes it exactly: GPT-2 (model_type "gpt2", train_gpt2.GPT: the same activation, MLP width, LayerNorm epsilon,
    attention scaling and tied head), or the modern recipe's model as save() writes it ("nanochat", ModernGPT: ReLU²,
    4x MLP, one key/value head per query head, F.rms_norm's epsilon, rotary theta 10000, soft-cap 15, untied head).
    Cerebras-GPT, for one, is a "gpt2" with another activation: loaded into our GPT it would compute something else,
    silently; a model of another type is ["model_type"]."""
    get = functools.partial(getattr, config)
    model_type, width = get("model_type", None), get("n_embd", None) or get("hidden_size", 0)
    if model_type == "gpt2":
        checks = {
            "activation_function": get("activation_function", None) in ("gelu_new", "gelu_pytorch_tanh"),
            "n_inner": get("n_inner", None) in (None, 4 * width),
            "layer_norm_epsilon": get("layer_norm_epsilon", None) == 1e-5,
            "scale_attn_weights": get("scale_attn_weights", True),
            "scale_attn_by_inverse_layer_idx": not get("scale_attn_by_inverse_layer_idx", False),
            "reorder_and_upcast_attn": not get("reorder_and_upcast_attn", False),
            "tie_word_embeddings": get("tie_word_embeddings", True),
            "add_cross_attention": not get("add_cross_attention", False),
        }
    elif model_type == "nanochat":
        heads, rope = get("num_attention_heads", 1), get("rope_parameters", None) or {}
        checks = {
            "hidden_act": get("hidden_act", None) == "relu2",
            "intermediate_size": get("intermediate_size", None) == 4 * width,
            "num_key_value_heads": get("num_key_value_heads", None) in (None, heads),
            "head_dim": get("head_dim", None) in (None, width // heads),
            "rms_norm_eps": get("rms_norm_eps", None) == FLOAT32_EPS,  # F.rms_norm's default in float32
            "rope_parameters": rope.get("rope_type", "default") == "default" and rope.get("rope_theta") == 10000.0,
            "final_logit_softcapping": get("final_logit_softcapping", None) == 15.0,  # SoftCappedLinear.cap
            "attention_bias": not get("attention_bias", False),
            "tie_word_embeddings": not get("tie_word_embeddings", False),
        }
    else:
        return ["model_type"]
    return [name for name, ok in checks.items() if not ok]


def shape_of(hf_config, name):
    """train_gpt2.GPTConfig's fields (a dict) of a transformers GPT2Config or NanoChatConfig, the same shape under
    Hugging Face's names; refused in one line when it is a model that ours would load and compute another function
    of."""
    c = hf_config
    if different := hf_differences(c):
        kind = "model" if different == ["model_type"] else f"{c.model_type} variant"
        raise UserError(f"{name}: a {kind} that train_gpt2.py does not compute exactly (it differs in "
                        f"{', '.join(different)}); GPT-2s and our own exports load")
    if c.model_type == "nanochat":
        return dict(block_size=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
                    n_head=c.num_attention_heads, n_embd=c.hidden_size)
    return dict(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)


def read_config(name_or_path):
    """transformers' config of a hub name or a local directory, or one line saying why it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # OSError: not on the hub, offline, not a model directory; ValueError:
        # a model type this transformers does not know (the offline hint would mislead there)
        hint = "; offline, set HF_HUB_OFFLINE=1 to use a cached copy" if isinstance(e, OSError) else ""
        raise UserError(f"could not load {name_or_path} ({first_line(e)}){hint}") from None
    except Exception as e:  # noqa: BLE001 -- a config.json whose fields have the wrong types, ...
        raise UserError(f"could not load {name_or_path}: its config.json cannot be used ({type(e).__name__}: "
                        f"{first_line(e)})") from None


def local_shape(directory):
    """shape_of a local Hugging Face directory, read from its config.json alone (no weights loaded)."""
    return shape_of(read_config(directory), directory)


# -----------------------------------------------------------------------------
# GPT-2: GPT2LMHeadModel

GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_config(model):
    from transformers import GPT2Config

    c = model.config
    return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                      n_head=c.n_head, activation_function="gelu_new",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # we train without dropout
                      bos_token_id=EOT, eos_token_id=EOT, tie_word_embeddings=True)


def transposed(weights):
    """Our weights under GPT2LMHeadModel's layout, and back: the same names, four matrices per block transposed."""
    return {k: v.t() if k.endswith(GPT2_TRANSPOSED) else v for k, v in weights.items()}


# -----------------------------------------------------------------------------
# The modern recipe: NanoChatForCausalLM

NANOCHAT_NAMES = {"attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.c_fc.weight": "mlp.fc1.weight",
                  "mlp.c_proj.weight": "mlp.fc2.weight"}  # per block; c_attn is split into q_proj, k_proj, v_proj


def nanochat_config(model):
    try:
        from transformers import NanoChatConfig
    except ImportError:  # transformers 4.x: its GPT-2 exports work, this one does not
        raise UserError("the modern recipe exports as transformers' NanoChat, new in transformers 5: "
                        "pip install -U transformers") from None
    c = model.config
    return NanoChatConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=4 * c.n_embd,
                          num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
                          max_position_embeddings=c.block_size, hidden_act="relu2",
                          rms_norm_eps=FLOAT32_EPS,  # what F.rms_norm adds in float32
                          rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
                          final_logit_softcapping=model.lm_head.cap, attention_bias=False,
                          tie_word_embeddings=False, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT)


def rotation_signs(n_embd, n_head):
    """(n_embd, 1): -1 on the second half of each head's rows, +1 elsewhere. NanoChat rotates q and k by -theta where
    train_gpt2's rotary() rotates by +theta; with those rows of W_q and W_k negated it computes our q and k with their
    second halves negated, which changes neither a head's q.k nor the RMS that QK-norm divides by."""
    hs = n_embd // n_head
    signs = torch.ones(n_head, hs)
    signs[:, hs // 2:] = -1
    return signs.view(-1, 1)


def to_nanochat(ours, n_embd, n_head):
    """Our weights under NanoChat's names: c_attn split into q, k and v, the rotation signs applied."""
    ours, signs = dict(ours), rotation_signs(n_embd, n_head)
    theirs = {"model.embed_tokens.weight": ours.pop("transformer.wte.weight"),
              "lm_head.weight": ours.pop("lm_head.weight")}
    for name, w in ours.items():  # "transformer.h.0.attn.c_attn.weight", ...
        i, name = name.removeprefix("transformer.h.").split(".", 1)
        layer = f"model.layers.{i}."
        if name == "attn.c_attn.weight":
            q, k, v = w.split(n_embd)
            theirs |= {layer + "self_attn.q_proj.weight": q * signs, layer + "self_attn.k_proj.weight": k * signs,
                       layer + "self_attn.v_proj.weight": v}
        else:
            theirs[layer + NANOCHAT_NAMES[name]] = w
    return theirs


def from_nanochat(theirs, n_embd, n_head, n_layer):
    """The inverse of to_nanochat (the signs undo themselves)."""
    signs = rotation_signs(n_embd, n_head)
    ours = {"transformer.wte.weight": theirs["model.embed_tokens.weight"], "lm_head.weight": theirs["lm_head.weight"]}
    for i in range(n_layer):
        layer = f"model.layers.{i}."
        q, k, v = (theirs[f"{layer}self_attn.{x}_proj.weight"] for x in "qkv")
        ours[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat((q * signs, k * signs, v))
        ours |= {f"transformer.h.{i}.{name}": theirs[layer + hf] for name, hf in NANOCHAT_NAMES.items()}
    return ours


# -----------------------------------------------------------------------------
# Loading and exporting

def hf_config(model):
    """The config of the transformers model that computes `model` (train_gpt2's GPT or ModernGPT) exactly."""
    return gpt2_config(model) if model.recipe == "gpt2" else nanochat_config(model)


def hf_weights(model):
    """`model`'s weights under that transformers model's names and layout."""
    c = model.config
    return transposed(model.state_dict()) if model.recipe == "gpt2" else to_nanochat(model.state_dict(), c.n_embd,
                                                                                        c.n_head)


def load(name_or_path):
    """(recipe, shape, weights) of a Hugging Face model that one of our recipes computes exactly: the --recipe, the
    GPTConfig fields and a state_dict under our names. One line for what cannot load: not on the hub, offline, not a
    model directory, another architecture, a weights file that is truncated or lacks a tensor."""
    from transformers import AutoModelForCausalLM

    config = read_config(name_or_path)
    shape = shape_of(config, name_or_path)  # refuses what no recipe computes exactly
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, output_loading_info=True)
    except OSError as e:  # not on the hub, offline, no weights file
        raise UserError(f"could not load {name_or_path} ({first_line(e)}); offline, set HF_HUB_OFFLINE=1 to use a "
                        f"cached copy") from None
    except Exception as e:  # noqa: BLE001 -- safetensors' own error type: a truncated or damaged weights file
        raise UserError(f"could not load {name_or_path}: its weights file is damaged ({first_line(e)}); export or "
                        f"download it again") from None
    # transformers fills a weight missing from the file with random numbers and only warns: that is not the model
    if missing := [k for k in info["missing_keys"] if not k.endswith((".attn.bias", ".attn.masked_bias"))]:
        raise UserError(f"could not load {name_or_path}: its weights file lacks {', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''}; export or download it again")
    # older transformers versions also keep causal-mask buffers (attn.bias): not weights, skipped
    theirs = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    recipe = HF_RECIPES[config.model_type]
    if recipe == "gpt2":
        return recipe, shape, transposed(theirs)
    return recipe, shape, from_nanochat(theirs, shape["n_embd"], shape["n_head"], shape["n_layer"])


def save(model, directory):
    """A self-contained Hugging Face directory for `model`: config.json, model.safetensors and GPT-2's tokenizer
    files, so transformers' AutoModelForCausalLM, AutoTokenizer, pipeline(), lm-eval-harness and the hub work from it
    alone, without remote code. Written into a temporary directory and renamed into place: an export is complete
    (tokenizer included) or not there."""
    from transformers import AutoModelForCausalLM

    if model.config.vocab_size < GPT2_VOCAB:
        raise UserError(f"the model's vocabulary has {model.config.vocab_size} ids, fewer than GPT-2's tokenizer's "
                        f"{GPT2_VOCAB:,} that an export carries: its tokens would name ids the model has no embedding "
                        f"for. Export models trained with GPT-2's vocabulary (--vocab_size 0)")
    hf = AutoModelForCausalLM.from_config(hf_config(model))
    theirs = hf.state_dict()
    with torch.no_grad():
        for k, v in hf_weights(model).items():
            theirs[k].copy_(v)

    def write(tmp):
        hf.save_pretrained(tmp)
        # GPT-2's tokenizer beside the weights (transformers 5 builds an empty one when the files are missing),
        # and suppress_tokens for the padded ids in generation_config.json, so transformers never samples them
        save_hf_tokenizer(tmp, vocab_size=model.config.vocab_size, model_max_length=model.config.block_size)
    export_directory(directory, write)


# what save writes: a directory holding these files and nothing else is one of our exports
EXPORT_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt"}


def export_directory(directory, write):
    """write(tmp) into a fresh temporary directory beside `directory`, then rename it into place: an export is
    complete or absent, and only files inside the new directory are ever written (a link planted under one of the
    names transformers writes is never followed). An existing `directory` is replaced only when it is one of our
    exports (EXPORT_FILES, regular files); anything else is refused. All files get the mode open() would give."""
    directory = Path(directory)
    if directory.is_symlink() or directory.exists():
        if not directory.is_dir() or directory.is_symlink():
            raise UserError(f"{directory} exists and is not a directory: choose another name for the export")
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in EXPORT_FILES or not p.is_file()
                         or p.is_symlink())
        if foreign:
            raise UserError(f"{directory} exists and is not a model exported by save_pretrained (it holds "
                            f"{', '.join(foreign[:3])}): choose another directory, or empty it")
    try:
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    except OSError as e:
        raise UserError(f"could not write {directory} ({e.strerror or e})") from None
    old = None
    try:
        write(tmp)
        for p in [tmp, *tmp.iterdir()]:  # mkdtemp and safetensors make owner-only files: one mode for all
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask())
        if directory.exists():  # an earlier export: moved aside, so the new one takes its name in one rename
            old = directory.with_name(f"{tmp.name}.old")
            os.replace(directory, old)
        os.replace(tmp, directory)
    except OSError as e:
        if old is not None and not directory.exists():
            os.replace(old, directory)
        raise UserError(f"could not write {directory} ({e.strerror or e}); nothing was changed there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def save_hf_tokenizer(directory, vocab_size=GPT2_VOCAB, model_max_length=None):
    """Write GPT-2's tokenizer, converted from the tiktoken encoding we train with, into an exported model's
    directory: tokenizer.json + tokenizer_config.json (what transformers loads) and vocab.json + merges.txt (the
    classic pair other tools read). <|endoftext|> (50256) is bos, eos and unk, as in the hub's gpt2. Without these
    files transformers 5 quietly builds an EMPTY GPT-2 tokenizer, and pipeline("text-generation") then hands back the
    prompt unchanged.

    vocab_size: the model's. Past GPT-2's 50,257 ids (a vocabulary padded to 50,304 for speed) the extra ids are
    listed in generation_config.json's suppress_tokens, so transformers' sampling never emits an id the tokenizer
    cannot decode. model_max_length: the model's block_size (tokenizer_config.json; None leaves it unset).
    """
    from transformers import GenerationConfig, GPT2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = get_tokenizer()
    # transformers' own tiktoken -> tokenizers conversion, handed the ranks in memory (its file reader would copy a
    # .tiktoken file into tiktoken's cache). tokenizer.json keeps tiktoken's split pattern; transformers 5 rebuilds
    # a GPT2Tokenizer from its vocabulary and merges with GPT-2's original pattern, which splits text the same way.
    # Either way the ids equal tiktoken's (tests/test_export.py).
    converter = TikTokenConverter(pattern=encoding._pat_str, extra_special_tokens=encoding._special_tokens)
    converter.load_tiktoken_bpe = lambda _: encoding._mergeable_ranks
    backend = converter.converted()
    # GPT2TokenizerFast saves "tokenizer_class": "GPT2Tokenizer", the hub gpt2's class, which transformers 4 loads
    # too (the generic class would save "TokenizersBackend", a name only transformers 5 knows)
    tokenizer = GPT2TokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", model_max_length=model_max_length)
    tokenizer.save_pretrained(directory)
    backend.model.save(str(directory))  # vocab.json + merges.txt

    if vocab_size > GPT2_VOCAB:
        path = Path(directory) / "generation_config.json"  # written by GPT2LMHeadModel.save_pretrained
        generation = (GenerationConfig.from_pretrained(directory) if path.exists()
                      else GenerationConfig(bos_token_id=EOT, eos_token_id=EOT))
        generation.suppress_tokens = list(range(GPT2_VOCAB, vocab_size))
        generation.save_pretrained(directory)


def model_type_of(directory):
    """The model_type in a local directory's config.json, or None (a hub name, no such file, not JSON)."""
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
