"""
Train GPT-2 from scratch, in one file that reads top to bottom.

    python train_gpt2.py --preset moliere                      # quick start: a tiny GPT on Moliere, CPU is fine
    python train_gpt2.py                                       # GPT-2 124M on edu_fineweb10B/, one GPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py     # the same on 8 GPUs (make shards: python fineweb.py)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --resume   # continue from the newest checkpoint in log/

Sections, in reading order: the model (exactly Hugging Face's GPT-2), what changed since GPT-2 (--recipe modern:
the same file's faster recipe, as a diff against the model), the data loader, the learning-rate schedule,
distributed set-up, evaluations, the hyperparameter table, the training step and loop. Operations code lives beside
this file: checkpoints.py (checkpoints, resume, preemption) and common.py (errors, atomic writes,
downloads, tokenizer, device and dtype). The appendix at the end holds a faster loss for CPUs.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

import hellaswag
from checkpoints import (StopSignals, check_resume_flags, find_resume_checkpoint, git_commit, list_checkpoints,
                         load_checkpoint, save_checkpoint, set_rng_state)
from common import (EOT, UserError, atomic_write, autocast, download_moliere, get_tokenizer, lock_directory,
                    pick_device, resolve_dtype, save_hf_tokenizer)

HERE = Path(__file__).resolve().parent  # default data and downloads live beside this file

# -----------------------------------------------------------------------------
# The model: GPT-2 as OpenAI released it, module names as in Hugging Face so weights map one to one.

GPT2_VOCAB = 50257  # GPT-2's tokenizer: 50,000 merges + 256 bytes + <|endoftext|>


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (context length)
    vocab_size: int = GPT2_VOCAB  # from scratch we pad this to 50304, a multiple of 64 (faster kernels)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # back into the residual stream
        self.n_head = config.n_head

    def forward(self, x, attn_mask=None):
        B, T, C = x.size()  # batch, sequence length, embedding size (n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs): every head attends on its own slice of hs = C / nh channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # flash attention where the hardware has it: the (T, T) attention matrix is never stored.
        # Causal (each token sees itself and the tokens before it) unless a mask says otherwise.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: the residual stream x only ever gets things added to it."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask)  # tokens talk to each other
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (as GPT-2): the same matrix maps tokens to vectors and vectors back to token scores.
        # It saves 38M parameters at 124M and each use of the matrix trains the other.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # Every block adds two projections (c_proj) into the residual stream, so its variance grows with
        # 2 * n_layer additions; scaling their init by (2 * n_layer) ** -0.5 keeps the stream's scale at
        # the output independent of depth (GPT-2 paper, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 * (2 * config.n_layer) ** -0.5)

    def _init_weights(self, module):
        # GPT-2's init: normal(0, 0.02) weights, zero biases (about 1/sqrt(768), as Xavier would give)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx, pos=None, attn_mask=None):
        """(B, T) token ids -> (B, T, n_embd) final hidden states, before the vocabulary projection.

        pos (positions) and attn_mask (B, 1, T, T), True where a token may attend, default to 0..T-1 and causal
        attention; hellaswag.py passes its own to score four endings after one shared context in one row.
        """
        B, T = idx.size()
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than the model's block_size "
                                 f"{self.config.block_size}")
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) broadcasts
        for block in self.transformer.h:
            x = block(x, attn_mask)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """(B, T) ids -> (logits, loss): logits (B, T, vocab_size) and loss None, or with targets the loss."""
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x), None
        # The loss equals F.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten()). On a CPU it is
        # computed chunk by chunk without storing the (B, T, vocab_size) logits (see the appendix), so training
        # returns logits None.
        return None, vocab_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())

    # -- Hugging Face interop: our module names equal theirs; their Conv1D stores weights as (in, out)
    HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, name_or_path):
        """GPT-2 weights from the hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local HF directory."""
        from transformers import GPT2LMHeadModel  # imported here: heavy, and only this path needs it

        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        except OSError as e:  # not on the hub, not cached and offline, or not a model directory
            raise UserError(f"could not load {name_or_path} ({(str(e).splitlines() or ['?'])[0]}); "
                            f"offline, set HF_HUB_OFFLINE=1 to use a cached copy") from None
        c = hf.config
        different = [k for k, ok in {
            "activation_function": c.activation_function in ("gelu_new", "gelu_pytorch_tanh"),
            "n_inner": c.n_inner in (None, 4 * c.n_embd), "layer_norm_epsilon": c.layer_norm_epsilon == 1e-5,
            "scale_attn_by_inverse_layer_idx": not c.scale_attn_by_inverse_layer_idx,
            "tie_word_embeddings": c.tie_word_embeddings}.items() if not ok]
        if different:  # a GPT-2 variant: loading it here would silently compute something else
            raise UserError(f"{name_or_path}: a GPT-2 variant this GPT does not compute exactly: "
                            f"{', '.join(different)}")
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                              n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd))
        ours = model.state_dict()
        # older transformers versions also keep causal-mask buffers (attn.bias): not weights, skipped
        theirs = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if set(ours) != set(theirs):
            different = sorted(set(ours) ^ set(theirs))[:5]
            raise UserError(f"{name_or_path}: weights do not match GPT-2's layout: {different}")
        with torch.no_grad():
            for k, v in theirs.items():
                ours[k].copy_(v.t() if k.endswith(cls.HF_TRANSPOSED) else v)
        return model

    def save_pretrained(self, directory):
        """A self-contained Hugging Face directory: config.json, model.safetensors and GPT-2's tokenizer files,
        so transformers' AutoTokenizer, pipeline(), lm-eval-harness and the hub work from it alone."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        hf_config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                               n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # we train without dropout
                               bos_token_id=EOT, eos_token_id=EOT, tie_word_embeddings=True)
        hf = GPT2LMHeadModel(hf_config)
        theirs = hf.state_dict()
        with torch.no_grad():
            for k, v in self.state_dict().items():
                theirs[k].copy_(v.t() if k.endswith(self.HF_TRANSPOSED) else v)
        hf.save_pretrained(directory)
        # GPT-2's tokenizer beside the weights (transformers 5 builds an empty one when the files are missing), and
        # suppress_tokens for the padded ids in generation_config.json, so that transformers never samples them
        save_hf_tokenizer(directory, vocab_size=c.vocab_size, model_max_length=c.block_size)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """The model saved in one of our checkpoints (model_XXXXX.pt), for evaluation and sampling."""
        checkpoint = load_checkpoint(path, map_location)
        try:  # the recipe (gpt2 or modern) that trained it picks the class
            model = RECIPES[checkpoint.get("args", {}).get("recipe", "gpt2")](GPTConfig(**checkpoint["config"]))
            model.load_state_dict(checkpoint["model"])
        except (TypeError, RuntimeError, KeyError) as e:  # other keys or shapes than our GPT's, another recipe
            raise UserError(f"{path} is not a checkpoint of train_gpt2.py's GPT ({str(e).splitlines()[0]})") from None
        return model

    def configure_optimizers(self, weight_decay, learning_rate, device_type):
        """[AdamW], with weight decay on matrices only: decaying biases and LayerNorm gains helps nothing.

        A list, because the modern recipe trains with two optimizers; each group's base_lr is its peak learning
        rate, which the schedule scales step by step."""
        params = [p for p in self.parameters() if p.requires_grad]  # the tied wte/lm_head appears once
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "base_lr": learning_rate},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "base_lr": learning_rate},
        ]
        # fused: one kernel for all parameters instead of a dozen per tensor (CUDA only)
        return [torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=device_type == "cuda")]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T); top-k sampling as in the GPT-2 paper's samples."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]  # the model sees at most block_size tokens
            logits = self.lm_head(self.hidden_states(context)[:, -1, :])  # (B, vocab): only the last position
            # ids past GPT-2's 50,257 are padding (vocab 50304): never trained, and the tokenizer cannot decode them
            logits = logits[:, :GPT2_VOCAB].float() / temperature
            if top_k is not None:
                top_logits, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < top_logits[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


# -----------------------------------------------------------------------------
# What changed since GPT-2 (--recipe modern): the same transformer with the changes that later models and the
# nanoGPT speedrun (modded-nanogpt) found to reach GPT-2's loss in a fraction of the compute. Each class reads as a
# diff against its GPT-2 twin above; module names stay Hugging Face's where a module has a twin.

def rms_norm(x):
    """RMSNorm (Zhang & Sennrich 2019): LayerNorm without the mean subtraction and the bias, and here without a
    gain (the matrix that reads the result can learn any scale): x / sqrt(mean(x**2)). Cheaper, as good."""
    return F.rms_norm(x, (x.size(-1),))


def rotary(x, cos, sin):
    """Rotary position embeddings (RoFormer, Su et al. 2021) replace GPT-2's learned wpe: each pair of channels
    (i, i + hs/2) of q and k is rotated by the angle pos * theta_i, so the score q.k depends on the two tokens'
    relative offset only, and no position table limits the context. x (B, nh, T, hs); cos, sin (B or 1, 1, T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # computed in float32, applied in the compute dtype
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class ModernSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # no biases anywhere (PaLM 2022):
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)  # they add nothing at this scale
        self.n_head = config.n_head

    def forward(self, x, cos, sin, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # QK-norm (Henry et al. 2020; Dehghani et al. 2023): q and k at unit RMS, so attention logits cannot grow
        # without bound and saturate the softmax, the instability that otherwise caps the learning rate
        q, k = rotary(rms_norm(q), cos, sin), rotary(rms_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class ModernMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        # ReLU² (Primer, So et al. 2021) instead of GELU: relu(x)**2, cheaper and better in their architecture search
        return self.c_proj(F.relu(self.c_fc(x)).square())


class ModernBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn, self.mlp = ModernSelfAttention(config), ModernMLP(config)

    def forward(self, x, cos, sin, attn_mask=None):
        x = x + self.attn(rms_norm(x), cos, sin, attn_mask)  # pre-norm as before, RMSNorm for LayerNorm
        return x + self.mlp(rms_norm(x))


class SoftCappedLinear(nn.Linear):
    """The head with logit soft-capping (Gemma 2, 2024): logits = cap * tanh(z / cap) stay within (-cap, cap),
    so the model cannot win loss by making logits ever larger and overconfident. lm_head(h) gives the capped
    logits, so sampling and hellaswag.py's scorer need no change."""

    cap = 15.0  # modded-nanogpt's value (Gemma 2 uses 30)

    def forward(self, x):
        return self.cap * torch.tanh(super().forward(x) / self.cap)


class ModernGPT(GPT):
    """GPT with the changes above; from GPT it keeps generate, from_checkpoint and the weight init helper."""

    def __init__(self, config):
        nn.Module.__init__(self)  # not GPT.__init__: none of GPT-2's modules are built
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # no wpe: positions enter as rotations of q, k
            h=nn.ModuleList([ModernBlock(config) for _ in range(config.n_layer)]),
        ))
        # Untied: the embedding and the head are separate matrices (the tie costs quality once compute is cheap
        # next to parameters), so each gets its own optimizer and learning rate.
        self.lm_head = SoftCappedLinear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)  # GPT-2's normal(0, 0.02) for the block matrices, then:
        nn.init.normal_(self.transformer.wte.weight, std=1.0)  # unit scale, as RMSNorm would make it anyway
        # Zero-initialised output projections and head (modded-nanogpt; cf. "ReZero", Bachlechner et al. 2020):
        # every block starts as the identity and the first logits are uniform (loss ln(vocab)), at any depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                nn.init.zeros_(p)

    def hidden_states(self, idx, pos=None, attn_mask=None):
        T = idx.size(1)
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than the model's block_size "
                                 f"{self.config.block_size}")
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        hs = self.config.n_embd // self.config.n_head
        theta = 10000.0 ** (-torch.arange(0, hs, 2, device=idx.device, dtype=torch.float32) / hs)  # (hs/2,)
        angles = pos.view(-1, 1, pos.size(-1), 1).float() * theta  # (B or 1, 1, T, hs/2): broadcast over heads
        x = self.transformer.wte(idx)
        cos, sin = angles.cos(), angles.sin()  # float32; rotary() applies them in q's and k's dtype
        for block in self.transformer.h:
            x = block(x, cos, sin, attn_mask)
        return rms_norm(x)

    def forward(self, idx, targets=None):
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x), None
        # = F.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten()), soft-cap included (appendix)
        return None, vocab_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.lm_head.cap)

    def save_pretrained(self, directory):
        raise UserError("save_pretrained: the modern recipe's model (rotary, RMSNorm, QK-norm, ReLU², soft-capped "
                        "logits) matches no transformers architecture exactly; use its .pt checkpoint instead")

    def configure_optimizers(self, weight_decay, learning_rate, device_type, *, embed_lr, head_lr):
        """[Muon, AdamW]. Muon (Keller Jordan, 2024) for the blocks' matrices: SGD-momentum whose update is
        orthogonalised (all singular values ~1, by a Newton-Schulz iteration), so every direction of a matrix
        learns at the same rate. AdamW for the embedding (a lookup, not a matrix product) and the head, each at
        its own rate. (No 1-D parameters: no biases, no norm gains.) Muon's weight decay is decoupled, lr * wd."""
        muon = [p for p in self.transformer.h.parameters() if p.dim() == 2]
        assert len(muon) == sum(1 for _ in self.transformer.h.parameters())  # nothing else in the blocks
        return [
            torch.optim.Muon([{"params": muon, "base_lr": learning_rate}], lr=learning_rate,
                             weight_decay=weight_decay, momentum=0.95, nesterov=True),
            torch.optim.AdamW([{"params": [self.transformer.wte.weight], "base_lr": embed_lr, "lr": embed_lr},
                               {"params": [self.lm_head.weight], "base_lr": head_lr, "lr": head_lr}],
                              betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=device_type == "cuda"),
        ]


RECIPES = {"gpt2": GPT, "modern": ModernGPT}  # --recipe -> model class


# -----------------------------------------------------------------------------
# Data: token shards (uint16 .npy, written by fineweb.py) or one text file, read as T+1-token windows.

SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d{6})\.npy$")
HINT = "HINT: make shards with `python fineweb.py` (or pass --data PATH: a shard directory or a .txt file)"


def list_shards(source):
    """The shard files of a directory, checked as a set: one prefix, indices 0..N-1 without gaps, shard 0 val."""
    found = sorted((int(m["index"]), m["prefix"], m["split"], p) for p in source.iterdir()
                   if (m := SHARD_NAME.match(p.name)))
    if not found:
        raise UserError(f"no shards (*_val_000000.npy, *_train_000001.npy, ...) in {source}. {HINT}")
    prefixes = sorted({prefix for _, prefix, _, _ in found})
    if len(prefixes) > 1:
        raise UserError(f"{source} mixes shards of several runs (prefixes {', '.join(prefixes)}): keep one")
    indices = [i for i, _, _, _ in found]
    if indices != list(range(len(found))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))[:5] or "duplicates"
        raise UserError(f"{source}: shard indices have gaps (missing {missing}): a shard was lost; rerun fineweb.py")
    return [(split, p) for _, _, split, p in found]


def read_text_tokens(path):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read text file {path} ({e}): --data takes a UTF-8 .txt file") from None
    return np.array([EOT] + get_tokenizer().encode_ordinary(text), np.uint16)


def load_shard(path):
    # a memory map: a 100M-token shard costs no memory until its pages are read
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # truncated, pickled objects, not .npy at all
        raise UserError(f"{path} is not a readable .npy shard ({str(e).splitlines()[0]}). "
                        f"HINT: regenerate it with `python fineweb.py`") from None


def load_token_arrays(source, split, T, vocab_size=None):
    """The token arrays of one split: memory-mapped shards of a directory, or 90/10 of a text file."""
    source = Path(source)
    if source.suffix == ".txt":
        if not source.is_file():
            raise UserError(f"text file {source} not found")
        tokens = read_text_tokens(source)
        cut = int(0.9 * len(tokens))  # first 90% train, last 10% val
        arrays, names = [tokens[:cut] if split == "train" else tokens[cut:]], [f"{source} ({split})"]
    else:
        if not source.is_dir():
            raise UserError(f"data directory {source} not found. {HINT}")
        paths = [p for s, p in list_shards(source) if s == split]
        if not paths:
            raise UserError(f"no {split} shards (*_{split}_NNNNNN.npy) in {source}. {HINT}")
        arrays, names = [load_shard(p) for p in paths], [str(p) for p in paths]
        # fineweb.py's last shard holds what is left: when shorter than one window it has nothing to give
        if len(arrays) > 1 and len(arrays[-1]) < T + 1:
            print(f"note: skipping {names[-1]}: {len(arrays[-1])} tokens, fewer than one window of T+1 = {T + 1}")
            arrays, names = arrays[:-1], names[:-1]
    for array, name in zip(arrays, names):
        if array.dtype != np.uint16 or array.ndim != 1:
            raise UserError(f"{name}: expected a 1-D uint16 token array, found {array.dtype} {array.shape}. "
                            f"HINT: regenerate it with `python fineweb.py`")
        if len(array) < T + 1:
            raise UserError(f"{name}: {len(array)} tokens, fewer than one window of T+1 = {T + 1}")
        # one pass over the memory map now, rather than an IndexError hours into the run
        if vocab_size is not None and (top := int(array.max())) >= vocab_size:
            raise UserError(f"{name}: holds token id {top}, outside the model's vocabulary of {vocab_size}")
    return arrays


class ShardedLoader:
    """Serves (B, T) micro-batches of T+1-token windows, in one global order shared by every rank.

    Window i of a shard is tokens[i*T : i*T + T + 1] (x = the first T, y = the last T), so every token
    of a shard is predicted once per epoch. Train order: each epoch permutes the shards and the windows
    inside each shard (a seeded numpy generator: the same on every rank). The windows of all epochs form
    one endless stream; micro-batch j is windows [j*B, (j+1)*B) of it, and rank r of W takes micro-batches
    r, r+W, r+2W, ... So W ranks with accumulation A see exactly what 1 process with accumulation W*A sees,
    and the state is a single global position, valid for any world size. Val is read in order.
    """

    def __init__(self, source, B, T, split, rank=0, world_size=1, seed=1337, vocab_size=None):
        self.B, self.T, self.split, self.rank, self.world_size, self.seed = B, T, split, rank, world_size, seed
        self.arrays = load_token_arrays(source, split, T, vocab_size)
        self.windows = np.array([(len(a) - 1) // T for a in self.arrays])  # windows per shard
        self.epoch_windows = int(self.windows.sum())
        self.epoch, self.shard_window_order = None, (None, None)  # computed when first needed
        self.reset()

    def reset(self):
        self.position = self.rank * self.B  # window index (in the endless stream) of our next micro-batch

    def permutation(self, n, *seeds):
        # val is read in order (its loss always measures the same tokens); train is shuffled by seed and epoch
        if self.split == "val":
            return np.arange(n)
        return np.random.default_rng([self.seed, *seeds]).permutation(n)

    def window(self, k):
        """Tokens of window k of the endless stream, widened to int64 (only these T+1 tokens)."""
        epoch, k = divmod(k, self.epoch_windows)
        if epoch != self.epoch:  # a new epoch: a new shard order, and where each shard starts in the stream
            self.epoch, self.shard_order = epoch, self.permutation(len(self.arrays), epoch)
            self.shard_starts = np.cumsum(self.windows[self.shard_order]) - self.windows[self.shard_order]
        j = int(np.searchsorted(self.shard_starts, k, side="right")) - 1  # the j-th shard of the epoch has k
        shard = self.shard_order[j]
        # each shard's windows are permuted on their own: memory for one shard's order, not the dataset's
        if self.shard_window_order[0] != (epoch, shard):
            self.shard_window_order = (epoch, shard), self.permutation(self.windows[shard], epoch, shard)
        i = int(self.shard_window_order[1][k - self.shard_starts[j]]) * self.T
        return self.arrays[shard][i: i + self.T + 1]

    def next_batch(self):
        rows = np.stack([self.window(self.position + b) for b in range(self.B)]).astype(np.int64)  # (B, T+1)
        self.position += self.world_size * self.B  # skip the other ranks' micro-batches
        # inputs, and targets shifted by one: (B, T) each, contiguous (pinned and copied to a GPU as they are)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def state_dict(self):
        # the global position: the same on every rank, so a checkpoint resumes on any world size
        return {"position": self.position - self.rank * self.B, "T": self.T, "seed": self.seed,
                "shards": len(self.arrays), "windows": self.epoch_windows}

    def load_state_dict(self, state):
        """Continue from a saved position; the data must be the same (shard and window counts tell)."""
        ours = self.state_dict()
        different = [f"{k} {state[k]} -> {ours[k]}" for k in ("T", "seed", "shards", "windows") if state[k] != ours[k]]
        if different:
            raise UserError(f"the data loader's state does not fit this data: {', '.join(different)}")
        self.position = state["position"] + self.rank * self.B


# -----------------------------------------------------------------------------
# Learning-rate schedule: linear warmup, then cosine decay to min_lr (GPT-3 paper, appendix B).

def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    if step < warmup_steps:  # from max_lr / warmup_steps at step 0 up to max_lr
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def get_lr_wsd(step, max_lr, warmup_steps, max_steps, cooldown_frac):
    """The modern recipe's warmup-stable-decay (e.g. Hägele et al. 2024): the same warmup, max_lr constant, then a
    linear decay to 0 over the last cooldown_frac of the steps. As good as cosine at the end, and a run can be
    extended from any checkpoint before the decay (the constant part does not depend on where the run ends)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    cooldown = int(cooldown_frac * max_steps)
    if step < max_steps - cooldown:
        return max_lr
    return max_lr * max(0, max_steps - step) / max(cooldown, 1)  # 1/cooldown at the last step, 0 at max_steps


# -----------------------------------------------------------------------------
# Distributed set-up: torchrun starts one process per GPU and tells each its place in the environment.

@dataclass
class DistInfo:
    rank: int  # this process among all of them (all nodes): picks its share of the data
    local_rank: int  # this process on its node: picks its GPU
    world_size: int
    device: str  # e.g. "cuda:3", "mps", "cpu"
    device_type: str  # "cuda", "mps" or "cpu": what autocast and the optimizer want
    is_master: bool  # rank 0 prints, writes the log and checkpoints

    def synchronize(self):
        """Wait for queued GPU work, so that timings measure it."""
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        elif self.device_type == "mps":
            torch.mps.synchronize()


def setup_distributed(device="auto", timeout_s=600):
    """DistInfo for this process; under torchrun also joins the process group (nccl on CUDA, gloo on CPU).

    timeout_s bounds every collective: a rank that stopped (a hung GPU, SIGSTOP) makes the others fail after it
    instead of holding them for the backends' default of 30 minutes.
    """
    import datetime

    device_type = pick_device(device)
    if "RANK" not in os.environ:  # a plain `python train_gpt2.py`
        return DistInfo(0, 0, 1, device_type, device_type, True)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    timeout = datetime.timedelta(seconds=timeout_s)
    if device_type == "mps":
        raise UserError("MPS runs single-process: use `python train_gpt2.py`, not torchrun")
    # DDP imports torch.distributed.nn, whose functions take `group=group.WORLD` as a default argument: imported
    # after init_process_group, those defaults keep the process group alive for good, destroy_process_group()
    # cannot free it, and its gloo threads run on while the interpreter shuts down (a rank then aborted, now and
    # then, with "terminate called without an active exception"). Imported first, the defaults are None.
    import torch.distributed.nn  # noqa: F401
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"--nproc_per_node is larger than this machine's {torch.cuda.device_count()} GPUs: "
                            f"use --nproc_per_node={torch.cuda.device_count()}")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=torch.device(device), timeout=timeout)
    else:
        device = "cpu"
        torch.distributed.init_process_group("gloo", timeout=timeout)
    return DistInfo(rank, local_rank, world_size, device, device_type, rank == 0)


def all_reduce_mean(value, world):
    """The mean of a float over all ranks (gloo has no ReduceOp.AVG, so SUM / world_size)."""
    if world.world_size == 1:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=world.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.item() / world.world_size


def on_master(world, fn, *args):
    """Run fn on rank 0 alone while the others wait; every rank learns whether it failed, so that a download
    error stops all of them at once rather than leaving the others in a barrier until the timeout."""
    error = None
    if world.is_master:
        try:
            fn(*args)
        except UserError as e:
            error = e
    if world.world_size > 1:
        failed = torch.tensor(int(error is not None), device=world.device)
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if failed.item() and error is None:
            raise UserError("rank 0 failed (see its message)")
    if error is not None:
        raise error


# -----------------------------------------------------------------------------
# Evaluations: validation loss, HellaSwag (scored by hellaswag.py) and text samples. Each takes a `stop`
# callable: a stop request (SIGTERM) cuts an evaluation short, so that the checkpoint is saved in time.

def evaluate_val(model, loader, steps, world, dtype, stop=lambda: False):
    """Mean loss over `steps` micro-batches of this rank's share of the val split (callers average ranks), or
    None if a stop request cut it short."""
    model.eval()
    loader.reset()  # the same val tokens every time
    total = 0.0
    with torch.no_grad():
        for _ in range(steps):
            if stop():
                return None
            x, y = loader.next_batch()
            with autocast(world.device_type, dtype):
                _, loss = model(x.to(world.device), y.to(world.device))
            total += loss.item()
    model.train()
    return total / steps


def load_hellaswag(cfg, world, raw_model):
    """The val examples, tokenized once per run (rank 0 downloads them while the others wait)."""
    if cfg.hellaswag_data is None:
        on_master(world, hellaswag.download, "val")
    examples = [hellaswag.render_example(e) for e in hellaswag.iterate_examples("val", cfg.hellaswag_data)]
    try:
        hellaswag.check_fits(raw_model, examples)  # within the model's block_size and vocabulary
    except UserError as e:
        raise UserError(f"{e}: use --hellaswag_every 0") from None
    return examples


def evaluate_hellaswag(raw_model, examples, world, batch_size, dtype, stop=lambda: False):
    """acc_norm over all examples, each rank scoring its share; returns (n, acc_norm)."""
    result = hellaswag.evaluate(raw_model, examples[world.rank::world.world_size], world.device,
                                batch_size=batch_size, dtype=dtype, stop=stop)
    counts = torch.tensor([result["n"], result["correct_norm"]], dtype=torch.long, device=world.device)
    if world.world_size > 1:
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
    n, correct = counts.tolist()
    return n, correct / max(n, 1)  # n is 0 only when a stop request cut it short


def sample_text(raw_model, prompt, num_samples, max_new_tokens, seed, device):
    """num_samples continuations of prompt, drawn with a generator of their own (training RNG untouched)."""
    enc = get_tokenizer()
    ids = enc.encode_ordinary(prompt)
    if not ids or max(ids) >= raw_model.config.vocab_size:
        raise UserError(f"the prompt {prompt!r} is empty or has tokens outside the model's vocabulary of "
                        f"{raw_model.config.vocab_size}")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = raw_model.training
    raw_model.eval()
    out = raw_model.generate(idx, max_new_tokens, generator=generator)
    raw_model.train(was_training)
    return [enc.decode(row.tolist()) for row in out]


# -----------------------------------------------------------------------------
# Hyperparameters: one table. Each field is a command-line flag (--name) with its help text; a preset is a
# dict of overrides, and flags given on the command line win over the preset.

GPT2_SHAPES = {  # (n_layer, n_head, n_embd) of OpenAI's four GPT-2 sizes
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600),
}


def knob(default, help_text, **argparse_kwargs):
    return field(default=default, metadata=dict(help=help_text, **argparse_kwargs))


@dataclass
class TrainConfig:
    # the run
    preset: str = knob("gpt2-124M", "group of defaults", choices=("gpt2-124M", "moliere"))
    data: str = knob("edu_fineweb10B", "shard directory (python fineweb.py) or a .txt file; relative paths are "
                     "looked up in the current directory, then beside train_gpt2.py")
    log_dir: str = knob("log", "log.txt and checkpoints go here")
    resume: str = knob(None, "continue from this checkpoint, or without PATH the newest in --log_dir",
                       nargs="?", const="latest", metavar="PATH")
    init_from: str = knob("scratch", "scratch, a GPT-2 from the hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl), "
                          "a Hugging Face directory or one of our .pt checkpoints (fine-tuning)")
    recipe: str = knob("gpt2", "gpt2: GPT-2 exactly (AdamW, cosine schedule); modern: the section 'What changed since "
                       "GPT-2' (rotary, RMSNorm, QK-norm, ReLU², untied soft-capped head, Muon, warmup-stable-decay)",
                       choices=tuple(RECIPES))
    # the model: a GPT-2 shape, each dimension overridable (0 = the shape's own)
    model: str = knob("gpt2", "GPT-2 shape to start from", choices=tuple(GPT2_SHAPES))
    n_layer: int = knob(0, "transformer blocks; 0: the --model shape's")
    n_head: int = knob(0, "attention heads; 0: the --model shape's")
    n_embd: int = knob(0, "embedding size; 0: the --model shape's")
    block_size: int = knob(0, "longest context; 0: 1024")
    vocab_size: int = knob(0, "vocabulary; 0: 50304, GPT-2's 50257 padded to a multiple of 64")
    # the batch: total_batch_size = micro_batch_size * seq_len * world_size * gradient accumulation steps
    total_batch_size: int = knob(524288, "tokens per optimizer step (2**19, about GPT-3 Small's 0.5M)")
    micro_batch_size: int = knob(64, "sequences per forward pass on each GPU", flags=("-B",))
    seq_len: int = knob(1024, "tokens per sequence", flags=("-T",))
    # optimization (GPT-3 paper, table 2.1 and appendix B)
    max_lr: float = knob(6e-4, "peak learning rate (gpt2 recipe)")
    min_lr_ratio: float = knob(0.1, "the final learning rate as a fraction of max_lr (0 to 1; gpt2 recipe)")
    # the modern recipe: a peak learning rate per optimizer group. Muon's and modded-nanogpt's published values,
    # and the best of a sweep (each one 2x and 0.5x, 4x and 0.25x) on Moliere and on a second corpus: README
    muon_lr: float = knob(0.05, "Muon's peak learning rate, for the blocks' matrices (modern recipe)")
    embed_lr: float = knob(0.2, "AdamW's peak learning rate for the token embedding (modern recipe)")
    head_lr: float = knob(0.008, "AdamW's peak learning rate for the head (modern recipe)")
    cooldown_frac: float = knob(0.3, "the LR decays linearly to 0 over this last fraction of the steps (modern recipe)")
    warmup_steps: int = knob(715, "linear warmup (375M tokens / 2**19 tokens per step)")
    max_steps: int = knob(19073, "optimizer steps (10B tokens / 2**19 tokens per step)")
    lr_horizon: int = knob(0, "step at which the cosine reaches min_lr; 0: --max_steps of the run's first "
                           "start. Kept on --resume, so a larger --max_steps continues at min_lr")
    weight_decay: float = knob(0.1, "weight decay on the matrices (AdamW; Muon's in the modern recipe)")
    grad_clip: float = knob(1.0, "clip the gradient's global norm to this (0: no clipping)")
    # evaluation and checkpoints (0 turns any of them off)
    eval_every: int = knob(250, "steps between val loss measurements")
    val_tokens: int = knob(10485760, "val tokens per measurement, in total across ranks")
    hellaswag_every: int = knob(250, "steps between HellaSwag evaluations")
    hellaswag_data: str = knob(None, "a local HellaSwag jsonl instead of the download")
    sample_every: int = knob(250, "steps between printed samples")
    prompt: str = knob("Hello, I'm a language model,", "the samples' prompt")
    checkpoint_every: int = knob(5000, "steps between checkpoints (also one at the end)")
    keep_checkpoints: int = knob(3, "keep the newest N checkpoints (0: keep all)")
    # the machine
    compile: str = knob("auto", "torch.compile the model (auto: on CUDA)", choices=("auto", "true", "false"))
    device: str = knob("auto", "auto: cuda, then mps, then cpu", choices=("auto", "cuda", "mps", "cpu"))
    dtype: str = knob("auto", "auto: bfloat16 on CUDA GPUs of compute capability 8.0+ and CPUs with native bf16",
                      choices=("auto", "bfloat16", "float32"))
    dist_timeout: int = knob(600, "seconds a rank waits for the others in a collective before failing")
    seed: int = knob(1337, "seeds the initialisation and the data order")
    sample: str = knob(None, "print samples of this prompt from the initialised (or resumed) model, then exit",
                       metavar="PROMPT")
    wandb: str = knob(None, "log to this Weights & Biases project (WANDB_MODE=offline works without an account)",
                      metavar="PROJECT")


PRESETS = {
    "gpt2-124M": {},  # the defaults above are the recipe
    # Quick start: a small GPT on Moliere's plays (0.9M tokens), 8 minutes on a 2-core CPU with native bf16. The
    # vocabulary projection (50304 x n_embd) is most of a small model's work, so n_embd stays small.
    "moliere": dict(data="input/moliere.txt", log_dir="log_moliere", n_layer=4, n_head=4, n_embd=128,
                    block_size=128, seq_len=128, micro_batch_size=32, total_batch_size=8192, max_lr=3e-3,
                    warmup_steps=20, max_steps=200, eval_every=25, val_tokens=65536, hellaswag_every=0,
                    sample_every=100, prompt="sganarelle: \n", checkpoint_every=100),
}

# flags that change what the run computes: a resumed run must keep them (max_steps, -B, the data's path and
# the dtype may change and are said; the loader checks that the data's shards are the same)
MATH_FLAGS = ("recipe", "muon_lr", "embed_lr", "head_lr", "cooldown_frac", "init_from", "model", "n_layer", "n_head",
              "n_embd", "block_size", "vocab_size",
              "total_batch_size", "seq_len", "max_lr", "min_lr_ratio", "warmup_steps", "weight_decay",
              "grad_clip", "seed")


def parse_args(argv=None):
    """TrainConfig from the command line; --help shows the defaults of the chosen --preset."""
    preset_parser = argparse.ArgumentParser(prog="train_gpt2.py", add_help=False)
    preset_parser.add_argument("--preset", choices=tuple(PRESETS), default=TrainConfig.preset)
    preset = PRESETS[preset_parser.parse_known_args(argv)[0].preset]
    parser = argparse.ArgumentParser(prog="train_gpt2.py", description="Train GPT-2 from scratch.")
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        flags = meta.pop("flags", ())
        default = preset.get(f.name, f.default)
        kind = {} if "nargs" in meta else {"type": f.type}
        meta["help"] += "" if default is None else f" (default: {default})"
        parser.add_argument(f"--{f.name}", *flags, dest=f.name, default=default, **kind, **meta)
    return TrainConfig(**vars(parser.parse_args(argv)))


def resolve_path(path):
    """A relative path from the current directory if it exists there, else beside this file (where fineweb.py
    writes edu_fineweb10B/ and the quick start keeps input/moliere.txt)."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else HERE / path


def model_config(cfg):
    """GPTConfig for a run from scratch: the --model shape with any overrides."""
    n_layer, n_head, n_embd = GPT2_SHAPES[cfg.model]
    return GPTConfig(block_size=cfg.block_size or 1024, vocab_size=cfg.vocab_size or 50304,
                     n_layer=cfg.n_layer or n_layer, n_head=cfg.n_head or n_head, n_embd=cfg.n_embd or n_embd)


def validate(cfg, world, model_cfg, start_step=0):
    """Every problem with the flags at once, before any work starts. model_cfg: the GPTConfig the run trains."""
    problems = []
    B, T, W = cfg.micro_batch_size, cfg.seq_len, world.world_size
    if min(B, T, cfg.total_batch_size, cfg.max_steps) <= 0:
        problems.append("-B, -T, --total_batch_size and --max_steps must be positive")
    elif cfg.total_batch_size % (B * T * W) and cfg.sample is None:  # sampling needs no batch
        tokens = cfg.total_batch_size // (T * W)  # sequences per step on each rank, if T*W divides the total
        valid = [b for b in range(1, tokens + 1) if tokens % b == 0] if cfg.total_batch_size % (T * W) == 0 else []
        problems.append(f"--total_batch_size {cfg.total_batch_size} is not divisible by B*T*world_size = "
                        f"{B}*{T}*{W} = {B * T * W}; " + (f"valid -B values: {valid}" if valid else
                        f"use a --total_batch_size that is a multiple of {B * T * W}"))
    shape = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    if any(getattr(cfg, k) < 0 for k in shape):
        problems.append("--n_layer, --n_head, --n_embd, --block_size and --vocab_size cannot be negative")
    elif cfg.init_from != "scratch" and any(getattr(cfg, k) for k in shape):
        problems.append(f"--init_from {cfg.init_from} fixes the model's shape: drop --n_layer/--n_head/--n_embd/"
                        f"--block_size/--vocab_size")
    elif model_cfg is not None:
        if T > model_cfg.block_size and cfg.sample is None:
            problems.append(f"-T {T} is longer than the model's block_size {model_cfg.block_size}")
        if model_cfg.n_embd % model_cfg.n_head:
            problems.append(f"--n_embd {model_cfg.n_embd} is not a multiple of --n_head {model_cfg.n_head}")
    if not (math.isfinite(cfg.max_lr) and cfg.max_lr > 0):
        problems.append(f"--max_lr must be a positive number, not {cfg.max_lr}")
    if not all(math.isfinite(lr) and lr > 0 for lr in (cfg.muon_lr, cfg.embed_lr, cfg.head_lr)):
        problems.append("--muon_lr, --embed_lr and --head_lr must be positive numbers")
    if cfg.recipe == "modern" and not (0 <= cfg.cooldown_frac <= 1 and cfg.warmup_steps <= (cfg.lr_horizon or
                                       cfg.max_steps) * (1 - cfg.cooldown_frac)):
        problems.append(f"--cooldown_frac {cfg.cooldown_frac} must be between 0 and 1, and the decay must start "
                        f"after --warmup_steps {cfg.warmup_steps}")
    if cfg.recipe == "modern" and cfg.init_from != "scratch" and not cfg.init_from.endswith(".pt"):
        problems.append(f"--recipe modern cannot start from {cfg.init_from}: GPT-2's weights do not fit its "
                        f"architecture (start from scratch or from a modern .pt checkpoint)")
    if not 0 <= cfg.min_lr_ratio <= 1:  # (nan fails too) a negative floor would train by gradient ascent
        problems.append(f"--min_lr_ratio must be between 0 and 1, not {cfg.min_lr_ratio}")
    if not (cfg.weight_decay >= 0 and cfg.grad_clip >= 0 and math.isfinite(cfg.weight_decay + cfg.grad_clip)):
        problems.append("--weight_decay and --grad_clip must be finite and not negative")
    if min(cfg.eval_every, cfg.hellaswag_every, cfg.sample_every, cfg.checkpoint_every, cfg.keep_checkpoints,
           cfg.warmup_steps, cfg.val_tokens, cfg.lr_horizon) < 0 or cfg.dist_timeout <= 0:
        problems.append("the --*_every, --keep_checkpoints, --warmup_steps, --val_tokens and --lr_horizon flags "
                        "cannot be negative, and --dist_timeout must be positive")
    horizon = cfg.lr_horizon or cfg.max_steps
    if 0 < cfg.max_steps <= cfg.warmup_steps or 0 < horizon <= cfg.warmup_steps:
        problems.append(f"--warmup_steps {cfg.warmup_steps} must be fewer than --max_steps {cfg.max_steps} (and "
                        f"--lr_horizon): the LR would never reach --max_lr. Pass a smaller --warmup_steps")
    if cfg.max_steps < start_step:
        problems.append(f"--max_steps {cfg.max_steps} is below the checkpoint's step {start_step}: nothing to do")
    if world.device_type == "mps" and cfg.dtype == "bfloat16":
        problems.append("--dtype bfloat16 is not supported on MPS: use float32")
    if cfg.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            problems.append("--wandb needs the wandb package: pip install wandb")
    if problems:
        raise UserError("; ".join(problems))


def resolve_schedule(cfg, saved_args, start_step):
    """Fix the LR schedule's horizon for the whole run, so that resuming never makes the learning rate jump.

    A fresh run's horizon is --lr_horizon or its --max_steps. A resumed run keeps the horizon it started with: a
    larger --max_steps then continues at min_lr. An explicit new --lr_horizon is taken only if it leaves the
    learning rate of every step so far unchanged (during warmup, say)."""
    lr = schedule(cfg)
    if saved_args is None:
        cfg.lr_horizon = cfg.lr_horizon or cfg.max_steps
    else:
        saved = saved_args.get("lr_horizon") or saved_args["max_steps"]
        new = cfg.lr_horizon or saved
        if new != saved and any(lr(s, saved) != lr(s, new) for s in range(start_step + 1)):
            raise UserError(f"--lr_horizon {new} would change the learning rate of the steps already taken (this "
                            f"run's schedule ends at step {saved}): drop --lr_horizon to keep it; a larger "
                            f"--max_steps then continues at " + ("min_lr" if cfg.recipe == "gpt2" else
                            "0, which the modern recipe refuses: resume from a checkpoint before the decay"))
        cfg.lr_horizon = new
    horizon = cfg.lr_horizon
    if cfg.recipe == "modern":  # WSD ends at LR 0: steps past the horizon would not learn
        decay = horizon - int(cfg.cooldown_frac * horizon)
        if cfg.max_steps > horizon:
            raise UserError(f"--max_steps {cfg.max_steps} goes past the schedule's end at step {horizon}, where the "
                            f"learning rate is 0: resume from a checkpoint before the decay (step <= {decay}) "
                            f"with --lr_horizon {cfg.max_steps} --max_steps {cfg.max_steps}")
        return None if saved_args is None else (
            f"LR schedule: warmup {cfg.warmup_steps} steps, constant until step {decay}, linear decay to 0 at step "
            f"{horizon}; step {start_step} runs at {lr(start_step, horizon):.4f} x the peak learning rates")
    if saved_args is None:
        return None
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    after = f", then {min_lr:.2e} until step {cfg.max_steps}" if cfg.max_steps > horizon else ""
    return (f"LR schedule: warmup {cfg.warmup_steps} steps to {cfg.max_lr:.2e}, cosine to {min_lr:.2e} at step "
            f"{horizon}{after}; step {start_step} runs at {cfg.max_lr * lr(start_step, horizon):.4e}")


def schedule(cfg):
    """The run's LR multiplier (0 to 1) as a function of (step, horizon): each parameter group's learning rate is
    its base_lr (the peak) times this."""
    if cfg.recipe == "modern":
        return lambda step, horizon: get_lr_wsd(step, 1.0, cfg.warmup_steps, horizon, cfg.cooldown_frac)
    return lambda step, horizon: get_lr(step, 1.0, cfg.min_lr_ratio, cfg.warmup_steps, horizon)


# -----------------------------------------------------------------------------
# The training step and loop.

def flops_per_token(model, T):
    """Training FLOPs per token (PaLM, appendix B): 6 per parameter that multiplies, plus attention's 12*L*C*T."""
    c = model.config
    # embeddings are lookups, not products: wpe, and wte unless it is tied to the head (GPT-2)
    lookups = [m.weight for m in model.transformer.values() if isinstance(m, nn.Embedding)]
    n = sum(p.numel() for p in model.parameters()) - sum(w.numel() for w in lookups if w is not model.lm_head.weight)
    return 6 * n + 12 * c.n_layer * c.n_embd * T


def train_step(model, optimizers, train_loader, step, grad_accum_steps, cfg, world, dtype):
    """One optimizer update over total_batch_size tokens; returns (loss averaged over ranks, grad norm, lr)."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=world.device)
    for micro_step in range(grad_accum_steps):
        x, y = train_loader.next_batch()
        if world.device_type == "cuda":  # pinned memory: the copy runs asynchronously, overlapping compute
            x = x.pin_memory().to(world.device, non_blocking=True)
            y = y.pin_memory().to(world.device, non_blocking=True)
        # DDP all-reduces gradients during backward; only the last micro-step needs it, no_sync() skips the rest
        last = micro_step == grad_accum_steps - 1
        with contextlib.nullcontext() if world.world_size == 1 or last else model.no_sync():
            with autocast(world.device_type, dtype):
                _, loss = model(x, y)
            # Each micro-batch's loss is a mean over its B*T tokens and gradients add up over micro-steps, so
            # dividing by grad_accum_steps makes their sum the gradient of the mean over the whole batch.
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            loss.backward()
    loss_mean = all_reduce_mean(loss_accum.item(), world)
    if not math.isfinite(loss_mean):  # every rank sees the same mean, so every rank stops here
        raise UserError(f"the loss is {loss_mean} at step {step}: stopping without saving. The checkpoints in "
                        f"--log_dir are untouched: --resume from one with a lower --max_lr")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    multiplier = schedule(cfg)(step, cfg.lr_horizon)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier  # each group's peak, scaled by the schedule
        optimizer.step()
    world.synchronize()
    return loss_mean, norm.item(), optimizers[0].param_groups[0]["lr"]  # the matrices' learning rate


class RunLog:
    """log.txt (rank 0): what made the run, then one build-nanogpt-compatible line per record; also sent to
    Weights & Biases with --wandb. A full disk or an unwritable --log_dir is one clear error."""

    def __init__(self, log_dir, cfg, world, dtype, resumed_from):
        self.path, self.enabled, self.wandb = log_dir / "log.txt", world.is_master, None
        if not self.enabled:
            return
        device = torch.cuda.get_device_name(world.device) if world.device_type == "cuda" else world.device_type
        about = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} | git {git_commit()} | torch {torch.__version__} | "
                 f"{device} x {world.world_size} | {dtype}")
        if resumed_from:
            self.write(f"# resume {resumed_from} | {about}")
        else:
            if self.path.exists():  # a fresh run never destroys an earlier log
                os.replace(self.path, self.path.with_suffix(".prev.txt"))
                print(f"moved the earlier {self.path} to {self.path.with_suffix('.prev.txt')}")
            self.write(f"# run {about}\n# config {json.dumps(dataclasses.asdict(cfg))}")
        if cfg.wandb:
            self.wandb = start_wandb(cfg, log_dir, resumed_from is not None)

    def write(self, text):
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(text + "\n")
            except OSError as e:
                raise UserError(f"could not write {self.path} ({e.strerror}): free some space or fix the "
                                f"directory's permissions, then continue with --resume") from None

    def record(self, step, kind, value, **extra):
        """One `{step} {kind} {value}` line (train 6 decimals, val/hella 4), plus extra figures for W&B."""
        self.write(f"{step} {kind} {value:.6f}" if kind == "train" else f"{step} {kind} {value:.4f}")
        if self.wandb is not None:
            names = {"train": "train/loss", "val": "val/loss", "hella": "hellaswag/acc_norm"}
            self.wandb.log({names[kind]: value, **extra}, step=step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(cfg, log_dir, resumed):
    """A W&B run named after log_dir with the whole config; a resumed run continues the same W&B run."""
    import uuid

    import wandb

    id_file = log_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if resumed and id_file.exists() else uuid.uuid4().hex[:8]
    atomic_write(id_file, lambda f: f.write(run_id.encode()))
    return wandb.init(project=cfg.wandb, name=log_dir.name, id=run_id, resume="allow", dir=str(log_dir),
                      config=dataclasses.asdict(cfg))


def due(every, step, last_step):
    return every > 0 and (step % every == 0 or last_step)


def create_model(cfg, checkpoint, init_checkpoint):
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    if checkpoint is not None or init_checkpoint is not None:
        source = checkpoint if checkpoint is not None else init_checkpoint
        model = RECIPES[cfg.recipe](GPTConfig(**source["config"]))
        model.load_state_dict(source["model"])
    elif cfg.init_from == "scratch":
        model = RECIPES[cfg.recipe](model_config(cfg))
    else:
        model = GPT.from_pretrained(cfg.init_from)
    return model


def planned_model_config(cfg, checkpoint, init_checkpoint):
    """The shape the run will train, known before any weights are built (for validate)."""
    if checkpoint is not None or init_checkpoint is not None:
        return GPTConfig(**(checkpoint or init_checkpoint)["config"])
    if cfg.init_from == "scratch":
        return model_config(cfg) if min(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) >= 0 else None
    config_file = Path(cfg.init_from) / "config.json"
    if config_file.is_file():  # a local HF directory
        c = json.loads(config_file.read_text())
        return GPTConfig(c.get("n_positions", 1024), c.get("vocab_size", GPT2_VOCAB), c.get("n_layer", 12),
                         c.get("n_head", 12), c.get("n_embd", 768))
    return GPTConfig(1024, GPT2_VOCAB, *GPT2_SHAPES.get(cfg.init_from, GPT2_SHAPES["gpt2"]))


def sample_only(cfg, world, dtype, checkpoint, init_checkpoint):
    """--sample: print continuations of a prompt from the initialised or resumed model; needs no data."""
    raw_model = create_model(cfg, checkpoint, init_checkpoint).to(world.device)
    with autocast(world.device_type, dtype):
        for text in sample_text(raw_model, cfg.sample, 4, 64, cfg.seed, world.device) if world.is_master else []:
            print(f"> {text}")


def compile_failed(e):
    """torch.compile needs a C compiler and Triton at run time; slim CUDA images lack them."""
    return UserError(f"torch.compile failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}): "
                     f"rerun with --compile false, or install a C compiler (e.g. apt install build-essential)")


def train(cfg, world):
    log_dir, say = Path(cfg.log_dir), print if world.is_master else (lambda *args: None)
    # a checkpoint to resume (or to fine-tune from) is read first: its shape and step take part in validation
    checkpoint_path, checkpoint = find_resume_checkpoint(cfg.log_dir, cfg.resume) if cfg.resume else (None, None)
    init_checkpoint = load_checkpoint(cfg.init_from) if cfg.init_from.endswith(".pt") and not cfg.resume else None
    start_step = checkpoint["step"] if checkpoint is not None else 0
    if init_checkpoint is not None and (recipe := init_checkpoint.get("args", {}).get("recipe", "gpt2")) != cfg.recipe:
        raise UserError(f"{cfg.init_from} was trained with --recipe {recipe}: fine-tune it with --recipe {recipe}")
    planned = planned_model_config(cfg, checkpoint, init_checkpoint)
    validate(cfg, world, planned, start_step)
    dtype = resolve_dtype(cfg.dtype, world.device_type)
    if checkpoint is not None and (note := check_resume_flags(checkpoint["args"], cfg, MATH_FLAGS)):
        say(note)
    elif checkpoint is None and cfg.sample is None and list_checkpoints(log_dir):
        raise UserError(f"{log_dir} holds checkpoints of an earlier run: continue it with --resume, "
                        f"or start a new run with another --log_dir")
    schedule_note = resolve_schedule(cfg, checkpoint["args"] if checkpoint is not None else None, start_step)
    if cfg.sample is not None:
        return sample_only(cfg, world, dtype, checkpoint, init_checkpoint)
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere and newer for what stays in float32

    # data: every rank reads its own share of one global order of windows
    B, T = cfg.micro_batch_size, cfg.seq_len
    grad_accum_steps = cfg.total_batch_size // (B * T * world.world_size)
    data = resolve_path(cfg.data)
    if data.name == "moliere.txt" and not data.exists():  # the quick start's corpus, fetched on first use
        on_master(world, download_moliere, data)
    vocab_size = planned.vocab_size
    train_loader = ShardedLoader(data, B, T, "train", world.rank, world.world_size, cfg.seed, vocab_size)
    val_loader = ShardedLoader(data, B, T, "val", world.rank, world.world_size, vocab_size=vocab_size)
    val_steps = max(1, cfg.val_tokens // (B * T * world.world_size))  # the same val tokens for any world size

    # model and optimizer, fresh or as the checkpoint left them
    raw_model = create_model(cfg, checkpoint, init_checkpoint).to(world.device)
    hella_examples = load_hellaswag(cfg, world, raw_model) if cfg.hellaswag_every > 0 else None
    lrs = {"learning_rate": cfg.max_lr} if cfg.recipe == "gpt2" else \
        {"learning_rate": cfg.muon_lr, "embed_lr": cfg.embed_lr, "head_lr": cfg.head_lr}
    optimizers = raw_model.configure_optimizers(cfg.weight_decay, device_type=world.device_type, **lrs)
    val_loss = None
    if checkpoint is not None:
        saved = checkpoint["optimizer"]
        for optimizer, state in zip(optimizers, [saved] if isinstance(saved, dict) else saved):  # dict: older files
            optimizer.load_state_dict(state)
            for group in optimizer.param_groups:  # fused AdamW is for CUDA: set it for this device, not the saved one
                if "fused" in group:
                    group["fused"] = world.device_type == "cuda"
        train_loader.load_state_dict(checkpoint["loaders"][0])  # a global position: the same for every rank
        rng = checkpoint["rng"]
        set_rng_state(rng[world.rank] if len(rng) == world.world_size else rng[0], world)
        val_loss = checkpoint["val_loss"]
        say(f"resumed from {checkpoint_path} at step {start_step}\n{schedule_note}")
    del checkpoint, init_checkpoint  # a 124M checkpoint is 1.5 GB: not kept for the whole run
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and world.device_type == "cuda")
    model = torch.compile(raw_model) if use_compile else raw_model
    if world.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[world.local_rank] if world.device_type == "cuda" else None,
            gradient_as_bucket_view=True)  # gradients live in DDP's buckets: no copy in and out of them
    n_params = sum(p.numel() for p in raw_model.parameters())
    say(f"{n_params:,} parameters | {world.device} x {world.world_size} | {dtype} | compile {use_compile} | "
        f"{cfg.total_batch_size:,} tokens per step = {B} x {T} x {world.world_size} ranks x {grad_accum_steps} "
        f"accumulation steps | {train_loader.epoch_windows * T:,} train tokens per epoch")
    lock = lock_directory(log_dir, "train_gpt2.py") if world.is_master else None  # one run per --log_dir
    try:
        log = RunLog(log_dir, cfg, world, dtype, checkpoint_path)
        with StopSignals() as stop:
            loop(cfg, world, dtype, model, raw_model, optimizers, train_loader, val_loader, val_steps,
                 hella_examples, grad_accum_steps, start_step, val_loss, log, stop)
        log.close()
    finally:
        if lock is not None:
            os.close(lock)


def loop(cfg, world, dtype, model, raw_model, optimizers, train_loader, val_loader, val_steps, hella_examples,
         grad_accum_steps, start_step, val_loss, log, stop):
    say, log_dir, B, T = print if world.is_master else (lambda *args: None), Path(cfg.log_dir), \
        cfg.micro_batch_size, cfg.seq_len
    flops, peak = flops_per_token(raw_model, T), peak_flops(world)
    def stopping():  # a stop request cuts evaluations short
        return stop.received is not None

    def save(step):
        return save_checkpoint(log_dir, step, raw_model, optimizers, train_loader, val_loss, cfg, world)

    for step in range(start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps  # evals and a checkpoint once more after the last update
        # A stop request cuts an evaluation short on the rank that got it; all ranks then agree (any_rank) to save
        # the state as it is, before this step's update, and skip the rest.
        if due(cfg.eval_every, step, last_step):
            loss = evaluate_val(model, val_loader, val_steps, world, dtype, stopping)
            if stop.any_rank(world):
                return stopped(stop, save(step), step, say)
            val_loss = all_reduce_mean(loss, world)
            say(f"step {step:5d} | val loss {val_loss:.4f}")
            log.record(step, "val", val_loss)
        if due(cfg.hellaswag_every, step, last_step):
            n, acc_norm = evaluate_hellaswag(raw_model, hella_examples, world, max(1, B // 4), dtype, stopping)
            if stop.any_rank(world):
                return stopped(stop, save(step), step, say)
            say(f"step {step:5d} | HellaSwag {acc_norm:.4f} ({n} examples)")
            log.record(step, "hella", acc_norm)
        if due(cfg.sample_every, step, last_step) and world.is_master and not stopping():
            with autocast(world.device_type, dtype):
                for text in sample_text(raw_model, cfg.prompt, 4, 32, cfg.seed, world.device):
                    print(f"> {text}")
        if cfg.checkpoint_every > 0 and step > start_step and (step % cfg.checkpoint_every == 0 or last_step):
            path = save(step)
            if last_step:
                say(f"saved {path}. Next: curves with `python plot.py {log_dir / 'log.txt'}`; samples with this "
                    f"command plus `--resume --sample PROMPT`; HellaSwag with `python hellaswag.py -m {path}`")
        if last_step:
            break

        t0 = time.time()  # the update alone: evals above are not part of the throughput
        model.train()
        try:
            loss, norm, lr = train_step(model, optimizers, train_loader, step, grad_accum_steps, cfg, world, dtype)
        except Exception as e:
            if step == start_step and type(e).__module__.startswith(("torch._dynamo", "torch._inductor", "triton")):
                raise compile_failed(e) from None
            raise
        dt = time.time() - t0
        tokens_per_sec = cfg.total_batch_size / dt
        mfu = 100 * flops * tokens_per_sec / (peak * world.world_size) if peak else None
        say(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {1000 * dt:.1f}ms | "
            f"tok/sec {tokens_per_sec:,.0f}" + (f" | MFU {mfu:.1f}%" if mfu else ""))
        log.record(step, "train", loss, lr=lr, grad_norm=norm, tokens_per_sec=tokens_per_sec,
                   tokens=(step + 1) * cfg.total_batch_size, **({"mfu": mfu} if mfu else {}))
        if stop.any_rank(world):
            return stopped(stop, save(step + 1), step + 1, say)


def stopped(stop, path, step, say):
    say(f"stopped by {stop.received or 'a signal on another rank'} at step {step}: saved {path}. "
        f"Continue with the same command plus --resume")


def main(argv=None):
    cfg = parse_args(argv)
    world = None
    try:
        world = setup_distributed(cfg.device, cfg.dist_timeout)
        train(cfg, world)
        if world.world_size > 1:
            torch.distributed.barrier()  # leave together: gloo can abort a rank whose peer has already gone
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # one message, not one per rank
            print(f"train_gpt2.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if world is not None and world.world_size > 1:
            torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# Appendix: measuring speed, and a faster loss for CPUs.

PEAK_BF16_FLOPS = [  # dense bf16 tensor-core peaks from the vendors' data sheets; first match wins, so the
    # variants (PCIe, NVL) come before the names they contain
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12),
]


def peak_flops(world):
    if world.device_type != "cuda":
        return None
    name = torch.cuda.get_device_name(world.device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


class VocabCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T against targets, for eager mode on a CPU.

    The vocabulary projection and its softmax are most of a small GPT's work. The usual chain (bf16 logits,
    upcast to float32, log_softmax, nll, and the same again backwards) writes and reads several (N, vocab)
    float32 tensors: 412 MB each at N = B*T = 2048, and on a CPU memory traffic and page faults, not FLOPs,
    then set the pace. Here the logits of `chunk_rows` rows at a time become probabilities in place, in the
    compute dtype (bf16 under autocast: as precise as the bf16 logits they come from; the softmax itself
    sums in float32). Since the loss is the last thing computed, the gradient is formed at once:
    d loss / d logits = (softmax - onehot(target)) / N, and each chunk adds its part of d weight at once, so only
    one chunk of (rows, vocab) exists at a time. Backward only scales what forward kept.
    With a soft-cap (the modern recipe) the logits are cap * tanh(z / cap) of z = x @ weight.T. Computed as
    2 * cap * sigmoid(2 * z / cap) - cap, the same function (tanh(u) = 2 sigmoid(2u) - 1) at half the cost on a CPU
    (a sigmoid is one exp, a tanh two); the softmax ignores the constant - cap. The chain rule adds one factor,
    1 - tanh**2 = 4 sigmoid (1 - sigmoid): d loss / d z = (softmax - onehot(target)) * 4 sigmoid (1 - sigmoid) / N.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, chunk_rows, need_grad, softcap=None):
        N, V = x.size(0), weight.size(0)
        xc, wc = x.to(dtype), weight.to(dtype)
        wz = wc if softcap is None else wc * (2 / softcap)  # rows @ wz.T: z, or 2 z / cap for the sigmoid
        chunk = torch.empty(min(N, chunk_rows), V, dtype=dtype, device=x.device)  # reused for every chunk
        dx = torch.empty_like(xc) if need_grad else None
        dw = torch.zeros(V, x.size(1), dtype=torch.float32, device=x.device) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, N, chunk_rows):
            rows, tgt = xc[start:start + chunk_rows], targets[start:start + chunk_rows, None]
            p = chunk[:len(rows)]
            torch.mm(rows, wz.t(), out=p)  # logits (rows, V)
            if softcap is None:
                p.copy_(torch.softmax(p, dim=1))
                s = p
            else:  # p keeps sigmoid(2 z / cap) for the gradient, s the softmax of the capped logits
                s = torch.softmax(p.sigmoid_() * (2 * softcap), dim=1)
            p_target = s.gather(1, tgt).float()
            loss -= p_target.clamp_min(1e-38).log().sum()  # clamp: a p that underflowed to 0 costs 87, not inf
            if need_grad:
                s.scatter_(1, tgt, (p_target - 1).to(dtype))  # softmax - onehot: the gradient, times N
                if softcap is not None:  # times sigmoid (1 - sigmoid), into p; the 4 comes in backward
                    torch.addcmul(p, p, p, value=-1, out=p).mul_(s)
                torch.mm(p, wc, out=dx[start:start + len(rows)])
                if dtype == torch.float32:
                    dw.addmm_(p.t(), rows)  # in place, no temporary
                else:  # a bf16 product, summed in float32 over the chunks
                    dw.add_(p.t() @ rows)
        if need_grad:
            ctx.save_for_backward(dx, dw)
            ctx.x_dtype, ctx.chain = x.dtype, 1.0 if softcap is None else 4.0
        return loss / N

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        # the 1/N of the mean, whatever scaled the loss (accumulation), and the soft-cap's 4
        scale = grad_loss * ctx.chain / dx.size(0)
        return (dx * scale).to(ctx.x_dtype), dw * scale, None, None, None, None, None


def vocab_cross_entropy(x, weight, targets, softcap=None, chunk_rows=128):
    """Loss of the lm_head on (N, C) hidden states x, its logits soft-capped at softcap if given; follows
    autocast's dtype like an nn.Linear would."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        # GPUs run the plain loss fast (and torch.compile fuses it); chunks of 128 rows would mean thousands of
        # small kernel launches per micro-batch there
        logits = F.linear(x, weight)
        return F.cross_entropy(logits if softcap is None else softcap * torch.tanh(logits / softcap), targets)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
    with torch.autocast("cpu", enabled=False):  # dtypes are chosen explicitly inside
        return VocabCrossEntropy.apply(x, weight, targets, dtype, chunk_rows, torch.is_grad_enabled(), softcap)


if __name__ == "__main__":
    main()
