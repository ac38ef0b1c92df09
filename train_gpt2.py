"""
Train GPT-2 from scratch, in one file that reads top to bottom.

    python train_gpt2.py --preset moliere                      # quick start: a tiny GPT on Moliere, CPU is fine
    python train_gpt2.py                                       # GPT-2 124M on edu_fineweb10B/, one GPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py     # the same on 8 GPUs (make shards: python fineweb.py)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --resume   # continue from the newest checkpoint in log/

Sections, in reading order: the model (exactly Hugging Face's GPT-2), what changed since GPT-2 (--recipe modern:
the same file's faster recipe, as a diff against the model), the data loader, the learning-rate schedule,
distributed set-up, evaluations, the hyperparameter table, then the training step and loop, train() and main. The
appendix at the end measures speed. The operations the loop calls live beside this file: bookkeeping.py (the command
line, flags checked before any work, resume, log.txt, locks, signals), memory.py (what fits in memory, -B, FSDP),
checkpoints.py (what a checkpoint holds), huggingface.py (both recipes' Hugging Face mappings and exports), cpu_loss.py
(a faster loss for CPUs) and common.py (errors, atomic writes, downloads, tokenizer, device, dtype).
"""

import codecs
import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

import bookkeeping
import core
import cpu_loss
import hellaswag
import huggingface
import memory
from bookkeeping import COMMAND, MACHINE, MATH, RUN
from checkpoints import load_checkpoint, restore_checkpoint
from common import (EOT, GPT2_SHAPES, GPT2_VOCAB, UserError, all_reduce, autocast, check_tokens, first_line,
                    get_tokenizer, load_shard, pick_device, print0, read_text_file, resolve_dtype, split_paths)

# -----------------------------------------------------------------------------
# The model: GPT-2 as OpenAI released it, module names as in Hugging Face so weights map one to one.

@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (context length)
    vocab_size: int = GPT2_VOCAB  # from scratch we pad this to 50304, a multiple of 64 (faster kernels)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class KVCache(dict):
    """What generation keeps, {attention layer: (k, v)}: the keys and values (B, nh, pos, hs) of the pos tokens so far,
    so that a new token is one position of work. Filled by one forward over the prompt, then one token at a time."""
    pos = 0  # tokens held: the next one's position

    def update(self, layer, k, v):  # -> the layer's keys and values of every token so far, the T new ones last
        if layer in self:  # (torch.cat copies, as transformers' DynamicCache does; expand: one prefill, n samples)
            k, v = (torch.cat((old.expand(len(new), -1, -1, -1), new), 2) for old, new in zip(self[layer], (k, v)))
        self[layer], self.pos = (k, v), k.size(2)
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # back into the residual stream
        self.n_head = config.n_head

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.size()  # batch, sequence length, embedding size (n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs): every head attends on its own slice of hs = C / nh channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        k, v = (k, v) if cache is None else cache.update(self, k, v)  # generating: the cached ones too (B, nh, pos, hs)
        # flash attention where the hardware has it: the (T, T) attention matrix is never stored. Causal (each token
        # sees itself and the tokens before it) unless a mask says otherwise; one new token sees every cached one.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1)
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

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)  # tokens talk to each other
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


class GPT(nn.Module):
    recipe = "gpt2"  # the --recipe that builds this class
    revision = 1  # what the class computes; raised when the same weights start to compute another function

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

    def hidden_states(self, idx, pos=None, attn_mask=None, cache=None):
        """(B, T) token ids -> (B, T, n_embd) final hidden states, before the vocabulary projection.

        pos (positions) and attn_mask (B, 1, T, T), True where a token may attend, default to 0..T-1 and causal
        attention; hellaswag.py passes its own to score four endings after one shared context in one row.
        """
        pos = self.positions(idx, pos, cache)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) broadcasts
        for block in self.transformer.h:
            x = block(x, attn_mask, cache)
        return self.transformer.ln_f(x)

    def positions(self, idx, pos, cache):
        """pos if given, else the positions of idx's T tokens: 0..T-1, or after a KVCache's tokens."""
        start = 0 if cache is None else cache.pos
        end = start + idx.size(1)
        if pos is None and end > self.config.block_size:
            raise ValueError(f"sequence of length {end} is longer than the model's block_size {self.config.block_size}")
        return torch.arange(start, end, device=idx.device) if pos is None else pos

    def forward(self, idx, targets=None):
        """(B, T) ids -> (logits, loss): the (B, T, vocab_size) scores of every next token, and with targets their
        mean cross-entropy (else None)."""
        x = self.hidden_states(idx)
        if targets is not None and x.device.type == "cpu" and not torch.compiler.is_compiling():
            # a CPU in eager mode: the same loss computed chunk by chunk, never storing the logits, which are then
            # None (cpu_loss.py; a GPU, or torch.compile, which fuses it, runs the plain loss below faster)
            return None, cpu_loss.vocab_cross_entropy(x.flatten(0, 1), self.lm_head, targets.flatten())
        logits = self.lm_head(x)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @classmethod
    def from_pretrained(cls, name_or_path):
        """OpenAI's GPT-2 from the hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl), or a local Hugging Face directory that
        one of our recipes computes exactly (a GPT-2, or an export of the modern recipe), as that recipe's model.
        huggingface.py translates their names and layouts to ours (their Conv1D stores each matrix transposed)."""
        recipe, shape, weights = huggingface.load(name_or_path)  # checked: a missing weight is an error, not random
        model = RECIPES[recipe](GPTConfig(**shape))
        model.load_state_dict(weights)
        return model

    def save_pretrained(self, directory):
        """A Hugging Face directory that works alone (config.json, model.safetensors, GPT-2's tokenizer files), which
        transformers loads as GPT2LMHeadModel, or NanoChatForCausalLM for the modern recipe: huggingface.save."""
        huggingface.save(self, directory)

    @classmethod
    def from_checkpoint(cls, path):
        """The model saved in one of our checkpoints (model_XXXXX.pt), for evaluation and sampling."""
        return model_of_checkpoint(load_checkpoint(path), path)

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

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, use_cache=True):
        """idx (B, T) followed by max_new_tokens sampled tokens: stream's, all at once."""
        return torch.cat((idx, *self.stream(idx, max_new_tokens, temperature, top_k, generator, use_cache)), dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, use_cache=True):
        """Yield the (B, 1) tokens that follow idx (B, T), one at a time: top-k sampling (GPT-2 paper), greedy at
        temperature 0. With a KVCache (nanochat's engine): one forward over the prompt, then one position per token.
        The context is a window of at most block_size tokens, as in training; once full it restarts at its last half,
        prefilled again at positions 0.. (a cached key holds its position; the tokens that left were in every kept
        one's context). use_cache=False runs the whole window for every token instead: the same tokens."""
        B, block, start, cache = idx.size(0), self.config.block_size, 0, None
        for _ in range(max_new_tokens):
            if idx.size(1) - start > block:  # the window is full: slide it
                start, cache = idx.size(1) - max(1, block // 2), None
            window = idx[:, -1:]  # the newest token, attending to the cached ones
            if cache is None or not use_cache:  # or the prefill: the whole window (one row for n samples of a prompt)
                cache, window = KVCache() if use_cache else None, idx[:, start:]
                window = window[:1] if bool((window == window[:1]).all()) else window
            logits = self.lm_head(self.hidden_states(window, cache=cache)[:, -1, :]).expand(B, -1)  # (B, vocab)
            logits = logits[:, :GPT2_VOCAB].float()  # ids past 50,257 are padding (vocab 50304): never trained
            if temperature == 0:  # greedy: the likeliest token
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:  # drawn among the top_k likeliest (None: all), in proportion to exp(logit / temperature)
                top_logits, top_ids = torch.topk(logits, min(top_k or logits.size(-1), logits.size(-1)))  # (B, k)
                top_ids, order = top_ids.sort(dim=-1)  # in id order, which float rounding cannot shuffle
                probs = F.softmax(top_logits.gather(1, order) / temperature, dim=-1)
                next_id = top_ids.gather(1, torch.multinomial(probs, 1, generator=generator))  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
            yield next_id


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

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # QK-norm (Henry et al. 2020; Dehghani et al. 2023): q and k at unit RMS, so attention logits cannot grow
        # without bound and saturate the softmax, the instability that otherwise caps the learning rate
        q, k = rotary(rms_norm(q), cos, sin), rotary(rms_norm(k), cos, sin)
        k, v = (k, v) if cache is None else cache.update(self, k, v)  # keys cached as turned at their positions
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1)
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

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        x = x + self.attn(rms_norm(x), cos, sin, attn_mask, cache)  # pre-norm as before, RMSNorm for LayerNorm
        return x + self.mlp(rms_norm(x))


class SoftCappedLinear(nn.Linear):
    """The head with logit soft-capping (Gemma 2, 2024): logits = cap * tanh(z / cap) stay within (-cap, cap),
    so the model cannot win loss by making logits ever larger and overconfident. lm_head(h) gives the capped
    logits, so sampling and hellaswag.py's scorer need no change."""

    cap = 15.0  # modded-nanogpt's value (Gemma 2 uses 30)

    def forward(self, x):
        return self.cap * torch.tanh(super().forward(x) / self.cap)


class ModernGPT(GPT):
    """GPT with the changes above; from GPT it keeps forward, generate and stream, from_checkpoint, the init helper."""

    recipe = "modern"
    revision = 2  # 2: the RMSNorm after the token embedding (a revision-1 checkpoint was trained without it)
    rope_theta = 10000.0  # rotary's base: channel pair i turns by pos * rope_theta ** (-2i / head_size)

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

    def hidden_states(self, idx, pos=None, attn_mask=None, cache=None):
        pos = self.positions(idx, pos, cache)  # generating: rotary turns the new q and k by their positions
        hs = self.config.n_embd // self.config.n_head
        theta = self.rope_theta ** (-torch.arange(0, hs, 2, device=idx.device, dtype=torch.float32) / hs)  # (hs/2,)
        angles = pos.view(-1, 1, pos.size(-1), 1).float() * theta  # (B or 1, 1, T, hs/2): broadcast over heads
        # RMSNorm of the embedding too (nanochat, modded-nanogpt): the blocks start from a unit-scale stream whatever
        # scale the embedding's own learning rate gives its rows, and transformers' NanoChat computes the same
        x = rms_norm(self.transformer.wte(idx))
        cos, sin = angles.cos(), angles.sin()  # float32; rotary() applies them in q's and k's dtype
        for block in self.transformer.h:
            x = block(x, cos, sin, attn_mask, cache)
        return rms_norm(x)

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

def read_text_tokens(path):
    return np.array([EOT] + get_tokenizer().encode_ordinary(read_text_file(path)), np.uint16)


def load_token_arrays(source, split, T, vocab_size=None):
    """The token arrays of one split: memory-mapped shards of a directory, or 90/10 of a text file. Each one is
    checked now (common.check_tokens), so that a bad shard is one line before step 0, not a crash hours later."""
    source = Path(source)
    if source.suffix == ".txt":
        tokens = read_text_tokens(source)
        cut = int(0.9 * len(tokens))  # first 90% train, last 10% val
        arrays, names = [tokens[:cut] if split == "train" else tokens[cut:]], [f"{source} ({split})"]
    else:
        paths = split_paths(source, split)
        arrays, names = [load_shard(p) for p in paths], [str(p) for p in paths]
        # fineweb.py's last shard holds what is left: when shorter than one window it has nothing to give
        if len(arrays) > 1 and len(arrays[-1]) < T + 1:
            print0(f"note: skipping {names[-1]}: {len(arrays[-1])} tokens, fewer than one window of T+1 = {T + 1}")
            arrays, names = arrays[:-1], names[:-1]
    for array, name in zip(arrays, names):
        check_tokens(array, name, T, vocab_size)
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



def lr_multiplier(cfg):
    """The run's schedule as a function (step, horizon) -> a multiplier from 0 to 1: each parameter group's learning
    rate is its peak (base_lr) times this. The horizon is fixed for the whole run, resumes included (bookkeeping.py)."""
    if cfg.recipe == "modern":
        return lambda step, horizon: get_lr_wsd(step, 1.0, cfg.warmup_steps, horizon, cfg.cooldown_frac)
    return lambda step, horizon: get_lr(step, 1.0, cfg.min_lr_ratio, cfg.warmup_steps, horizon)


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

    if not 0 < timeout_s <= 7 * 86400:  # (checked here, as it is used before the other flags are checked)
        raise UserError(f"--dist_timeout must be between 1 and 604800 seconds (a week), not {timeout_s}")
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


# -----------------------------------------------------------------------------
# Evaluations: validation loss, HellaSwag (scored by hellaswag.py) and text samples. Each takes a `stop`
# callable: a stop request (SIGTERM) cuts an evaluation short, so that the checkpoint is saved in time.

def evaluate_val(model, loader, steps, world, dtype, stop):
    """Mean loss over `steps` micro-batches of this rank's share of the val split (callers average ranks), or
    None if a stop request cut it short."""
    model.eval()
    loader.reset()  # the same val tokens every time
    total = 0.0
    with torch.no_grad(), memory.whole_weights(model):  # --fsdp: each rank holds all the weights (memory.py)
        for _ in range(steps):
            if stop():
                return None
            x, y = loader.next_batch()
            with autocast(world.device_type, dtype):
                _, loss = model(x.to(world.device), y.to(world.device))
            total += loss.item()
    model.train()
    return total / steps


def evaluate_hellaswag(raw_model, examples, world, batch_size, dtype, stop):
    """acc_norm over all examples, each rank scoring its share; returns (n, acc_norm)."""
    with memory.whole_weights(raw_model):  # each rank goes at its own pace, even under --fsdp
        result = hellaswag.evaluate(raw_model, examples[world.rank::world.world_size], world.device,
                                    batch_size=batch_size, dtype=dtype, stop=stop)
    n, correct = (int(all_reduce(result[k], world)) for k in ("n", "correct_norm"))
    return n, correct / max(n, 1)  # n is 0 only when a stop request cut it short


def evaluate_core(raw_model, tasks, items, world, batch_size, dtype, stop):
    """CORE, each rank scoring its share of every task's items; returns core.summarize's dict."""
    with memory.whole_weights(raw_model):
        counts = core.evaluate(raw_model, tasks, items, world.device, dtype, batch_size, world.rank,
                               world.world_size, stop)
    return core.summarize(tasks, [[int(all_reduce(c, world)) for c in pair] for pair in counts])


def print_samples(raw_model, prompt, max_new_tokens, seed, world, dtype, num_samples=4, **sampling):
    """num_samples continuations of prompt (sampling: stream's temperature, top_k), decoded together after one prefill,
    the first printed as its tokens come, the rest when done; their generator is their own (training RNG untouched)."""
    enc = get_tokenizer()
    ids = enc.encode_ordinary(prompt)
    if not ids or max(ids) >= raw_model.config.vocab_size:
        raise UserError(f"the prompt {prompt!r} is empty or has tokens outside the model's vocabulary of "
                        f"{raw_model.config.vocab_size}")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=world.device)
    generator = torch.Generator(device=world.device).manual_seed(seed)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # bytes -> text, a character split over tokens whole
    print("> " + decoder.decode(enc.decode_bytes(ids)), end="", flush=True)
    was_training, new = raw_model.training, []
    raw_model.eval()
    with autocast(world.device_type, dtype):
        for next_id in raw_model.stream(idx, max_new_tokens, generator=generator, **sampling):  # (num_samples, 1)
            new.append(next_id)
            print(decoder.decode(enc.decode_bytes(next_id[0].tolist())), end="", flush=True)
    raw_model.train(was_training)
    print(decoder.decode(b"", final=True))
    for row in torch.cat((idx, *new), dim=1)[1:]:
        print(f"> {enc.decode(row.tolist())}")


# -----------------------------------------------------------------------------
# Hyperparameters: one table. Each field is a command-line flag (--name) with its help text; a preset is a
# dict of overrides, and flags given on the command line win over the preset. Each field also says what --resume
# does with it, so that this table is the one list of which flags are the run's and which the machine's: MATH
# (what the run computes: the checkpoint's value, a change is refused), RUN (how it goes: the checkpoint's unless
# given), MACHINE (this machine's, never the checkpoint's) and COMMAND (what this command line asks for).


def flag(default, help_text, on_resume, **argparse_kwargs):
    """A field of the table: its default, its --help text, what --resume does with it, and argparse's extras."""
    return field(default=default, metadata=dict(help=help_text, on_resume=on_resume, **argparse_kwargs))


@dataclass
class TrainConfig:
    # the run
    preset: str = flag("gpt2-124M", "group of defaults", RUN, choices=("gpt2-124M", "moliere"))
    data: str = flag("edu_fineweb10B", "shard directory (python fineweb.py) or a .txt file; relative paths are "
                     "looked up in the current directory, then beside train_gpt2.py", RUN)
    log_dir: str = flag("log", "log.txt and checkpoints go here (with --resume PATH: PATH's directory)", COMMAND)
    resume: str = flag(None, "continue from this checkpoint, or without PATH the newest in --log_dir; the flags you "
                       "do not give are the checkpoint's (but the machine's: --device, --dtype, --compile, -B, "
                       "--dist_timeout, the memory modes)", COMMAND, nargs="?", const="latest", metavar="PATH")
    sample: str = flag(None, "print samples of this prompt from the initialised (or resumed) model, then exit",
                       COMMAND, metavar="PROMPT")
    temperature: float = flag(1.0, "--sample: divides the logits; 0: greedy (the likeliest token)", COMMAND)
    top_k: int = flag(50, "--sample: draw from the k likeliest tokens", COMMAND)
    num_samples: int = flag(4, "--sample: continuations, decoded together after one prefill of the prompt", COMMAND)
    max_new_tokens: int = flag(64, "--sample: tokens per continuation", COMMAND)
    wandb: str = flag(None, "log to this Weights & Biases project (WANDB_MODE=offline works without an account)",
                      RUN, metavar="PROJECT")
    init_from: str = flag("scratch", "scratch, a GPT-2 from the hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl), "
                          "a Hugging Face directory (a GPT-2, or an export of the modern recipe) or one of our .pt "
                          "checkpoints (fine-tuning; it gives --recipe)", MATH)
    recipe: str = flag("gpt2", "gpt2: GPT-2 exactly (AdamW, cosine schedule); modern: the section 'What changed since "
                       "GPT-2' (rotary, RMSNorm, QK-norm, ReLU², untied soft-capped head, Muon, warmup-stable-decay)",
                       MATH, choices=tuple(RECIPES))
    seed: int = flag(1337, "seeds the initialisation and the data order", MATH)
    # the model: a GPT-2 shape, each dimension overridable (0 = the shape's own)
    model: str = flag("gpt2", "GPT-2 shape to start from", MATH, choices=tuple(GPT2_SHAPES))
    n_layer: int = flag(0, "transformer blocks; 0: the --model shape's", MATH)
    n_head: int = flag(0, "attention heads; 0: the --model shape's", MATH)
    n_embd: int = flag(0, "embedding size; 0: the --model shape's", MATH)
    block_size: int = flag(0, "longest context; 0: 1024", MATH)
    vocab_size: int = flag(0, "vocabulary; 0: 50304, GPT-2's 50257 padded to a multiple of 64", MATH)
    # the batch: total_batch_size = micro_batch_size * seq_len * world_size * gradient accumulation steps. The
    # recipe's 2**19 tokens per step is about GPT-3 Small's 0.5M (GPT-3 paper, table 2.1).
    total_batch_size: int = flag(524288, "tokens per optimizer step", MATH)
    micro_batch_size: int = flag(64, "sequences per forward pass on each GPU; not given, a GPU takes the largest "
                                 "of this, half of it, ... that fits in its memory", MACHINE, short="-B")
    seq_len: int = flag(1024, "tokens per sequence", MATH, short="-T")
    # optimization (GPT-3 paper, table 2.1 and appendix B): 375M tokens of warmup and 10B tokens in all, at 2**19
    # tokens per step, are the recipe's 715 and 19073 steps
    max_lr: float = flag(6e-4, "peak learning rate (gpt2 recipe)", MATH)
    min_lr_ratio: float = flag(0.1, "the final learning rate as a fraction of max_lr (0 to 1; gpt2 recipe)", MATH)
    # the modern recipe: a peak learning rate per optimizer group. Muon's and modded-nanogpt's published values,
    # and the best of a sweep (each one 2x and 0.5x, 4x and 0.25x) on Moliere and on a second corpus, rechecked
    # after the embedding norm: results/README.md
    muon_lr: float = flag(0.05, "Muon's peak learning rate, for the blocks' matrices (modern recipe)", MATH)
    embed_lr: float = flag(0.2, "AdamW's peak learning rate for the token embedding (modern recipe)", MATH)
    head_lr: float = flag(0.008, "AdamW's peak learning rate for the head (modern recipe)", MATH)
    cooldown_frac: float = flag(0.3, "the LR decays linearly to 0 over this last fraction of the steps (modern "
                                "recipe)", MATH)
    warmup_steps: int = flag(715, "steps of linear warmup", MATH)
    max_steps: int = flag(19073, "optimizer steps", RUN)
    lr_horizon: int = flag(0, "step at which the cosine reaches min_lr; 0: --max_steps of the run's first "
                           "start. Kept on --resume, so a larger --max_steps continues at min_lr", RUN)
    weight_decay: float = flag(0.1, "weight decay on the matrices (AdamW; Muon's in the modern recipe)", MATH)
    grad_clip: float = flag(1.0, "clip the gradient's global norm to this (0: no clipping)", MATH)
    # evaluation and checkpoints (0 turns any of them off)
    eval_every: int = flag(250, "steps between val loss measurements", RUN)
    val_tokens: int = flag(10485760, "val tokens per measurement, in total across ranks", RUN)
    hellaswag_every: int = flag(250, "steps between HellaSwag evaluations", RUN)
    hellaswag_data: str = flag(None, "a local HellaSwag jsonl instead of the download", RUN)
    core_every: int = flag(0, "steps between CORE evaluations (core.py: DCLM's 22 in-context tasks, centered)", RUN)
    core_bundle: str = flag(None, "an unzipped CORE eval_bundle/ instead of the download", RUN)
    core_max_per_task: int = flag(500, "rows of each CORE task in training (0: all; nanochat's training uses 500)",
                                  RUN)
    sample_every: int = flag(250, "steps between printed samples", RUN)
    prompt: str = flag("Hello, I'm a language model,", "the samples' prompt", RUN)
    checkpoint_every: int = flag(5000, "steps between checkpoints; one is always saved after the last update (0: only "
                                 "that one)", RUN)
    keep_checkpoints: int = flag(3, "keep the newest N checkpoints (0: keep all)", RUN)
    # the machine
    compile: str = flag("auto", "torch.compile the model (auto: on CUDA)", MACHINE, choices=("auto", "true", "false"))
    device: str = flag("auto", "auto: cuda, then mps, then cpu", MACHINE, choices=("auto", "cuda", "mps", "cpu"))
    dtype: str = flag("auto", "auto: bfloat16 on CUDA GPUs of compute capability 8.0+ and CPUs with native bf16",
                      MACHINE, choices=("auto", "bfloat16", "float32"))
    dist_timeout: int = flag(600, "seconds a rank waits for the others in a collective before failing", MACHINE)
    activation_checkpointing: str = flag("false", "recompute each block's activations in the backward pass instead of "
                                         "keeping them (about 1/3 more compute)", MACHINE, choices=("true", "false"))
    fsdp: str = flag("false", "under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2) "
                     "instead of a copy on each (DDP)", MACHINE, choices=("true", "false"))


PRESETS = {
    "gpt2-124M": {},  # the defaults above are the recipe
    # Quick start: a small GPT on Moliere's plays (0.9M tokens), 8 minutes on a 2-core CPU with native bf16. The
    # vocabulary projection (50304 x n_embd) is most of a small model's work, so n_embd stays small.
    "moliere": dict(data="input/moliere.txt", log_dir="log_moliere", n_layer=4, n_head=4, n_embd=128,
                    block_size=128, seq_len=128, micro_batch_size=32, total_batch_size=8192, max_lr=3e-3,
                    warmup_steps=20, max_steps=200, eval_every=25, val_tokens=65536, hellaswag_every=0,
                    sample_every=100, prompt="sganarelle: \n", checkpoint_every=100),
}


# =============================================================================
# Training: one optimizer step, the loop that repeats it between evaluations, and train(), which builds what the
# loop needs and runs it. Everything above is what they use.
# =============================================================================

def train_step(model, optimizers, train_loader, step, grad_accum_steps, cfg, world, dtype):
    """One optimizer update over total_batch_size tokens; returns (loss averaged over ranks, grad norm, lr)."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=world.device)  # on the device: no host-device sync per micro-step
    for micro_step in range(grad_accum_steps):
        x, y = train_loader.next_batch()
        if world.device_type == "cuda":  # pinned memory: the copy runs asynchronously, overlapping compute
            x = x.pin_memory().to(world.device, non_blocking=True)
            y = y.pin_memory().to(world.device, non_blocking=True)
        # DDP all-reduces gradients during backward; only the last micro-step needs it, no_sync() skips the rest.
        # (--fsdp reduce-scatters every micro-step: each rank then keeps only its shard of the gradient)
        last = micro_step == grad_accum_steps - 1
        with contextlib.nullcontext() if world.world_size == 1 or last or cfg.fsdp == "true" else model.no_sync():
            with autocast(world.device_type, dtype):
                _, loss = model(x, y)
            # Each micro-batch's loss is a mean over its B*T tokens and gradients add up over micro-steps, so
            # dividing by grad_accum_steps makes their sum the gradient of the mean over the whole batch.
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            loss.backward()
    loss_mean = all_reduce(loss_accum.item(), world) / world.world_size  # the loss of the whole batch, all ranks
    bookkeeping.check_finite("loss", loss_mean, step)  # every rank sees the same mean, so every rank stops here
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    bookkeeping.check_finite("gradient norm", norm.item(), step)  # an update by an inf gradient makes weights nan
    multiplier = lr_multiplier(cfg)(step, cfg.lr_horizon)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier  # each group's peak, scaled by the schedule
        optimizer.step()
    world.synchronize()
    return loss_mean, norm.item(), optimizers[0].param_groups[0]["lr"]  # the matrices' learning rate


def due(every, step, last_step):
    return every > 0 and (step % every == 0 or last_step)


def loop(cfg, run, model, raw_model, optimizers, train_loader, val_loader, evals):
    """build-nanogpt's loop: at the start of a step the evaluations that are due, then one optimizer update. A stop
    request (SIGTERM when a machine is reclaimed, Ctrl-C) saves a checkpoint at the next safe point: after the
    update, or at once during an evaluation, which it cuts short. evals: HellaSwag's examples and CORE's (tasks,
    items), loaded before the run started (None where not evaluated)."""
    world, B, T, W, dtype = run.world, cfg.micro_batch_size, cfg.seq_len, run.world.world_size, run.dtype
    grad_accum_steps = cfg.total_batch_size // (B * T * W)
    val_steps = max(1, cfg.val_tokens // (B * T * W))  # the same val tokens for any world size
    hella_examples, core_items = evals
    val_loss = run.start.val_loss  # the latest val loss, which each checkpoint records
    for step in range(run.start.step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps  # evaluations and a checkpoint once more after the last update
        # -- the evaluations due at the start of this step, then the checkpoint ----------------------------------
        if due(cfg.eval_every, step, last_step):
            loss = evaluate_val(model, val_loader, val_steps, world, dtype, run.stop_signalled)
            if run.stop_on_any_rank():  # every rank saves the state as it is, before this step's update
                return run.save_and_stop(step, raw_model, optimizers, train_loader, val_loss)
            val_loss = all_reduce(loss, world) / W
            bookkeeping.check_finite("val loss", val_loss, step)  # before a checkpoint of this state
            run.record(step, "val", val_loss)
        if due(cfg.hellaswag_every, step, last_step):
            n, acc_norm = evaluate_hellaswag(raw_model, hella_examples, world, max(1, B // 4), dtype,
                                             run.stop_signalled)
            if run.stop_on_any_rank():
                return run.save_and_stop(step, raw_model, optimizers, train_loader, val_loss)
            run.record(step, "hella", acc_norm, examples=n)
        if due(cfg.core_every, step, last_step):
            score = evaluate_core(raw_model, *core_items, world, max(1, B // 4), dtype, run.stop_signalled)
            if run.stop_on_any_rank():
                return run.save_and_stop(step, raw_model, optimizers, train_loader, val_loss)
            run.record(step, "core", score["core"])
        if due(cfg.sample_every, step, last_step):
            with memory.whole_weights(raw_model):  # (every rank: under --fsdp all of them gather the weights)
                if world.is_master and not run.stop_signalled():
                    print_samples(raw_model, cfg.prompt, 32, cfg.seed, world, dtype)
        if run.checkpoint_due(step, last_step):
            run.save(step, raw_model, optimizers, train_loader, val_loss)
        if last_step:
            return run.finished()
        # -- the update -------------------------------------------------------------------------------------------
        t0 = time.time()  # the update alone: evaluations are not part of the throughput
        loss, norm, lr = train_step(model, optimizers, train_loader, step, grad_accum_steps, cfg, world, dtype)
        dt = time.time() - t0
        # -- after the update: its line on stdout and in log.txt, and a stop request saves here --------------------
        tokens_per_sec = cfg.total_batch_size / dt
        run.report_step(step, loss, lr, norm, dt, tokens_per_sec, estimate_mfu(raw_model, T, tokens_per_sec, world))
        if run.stop_on_any_rank():
            return run.save_and_stop(step + 1, raw_model, optimizers, train_loader, val_loss)


def parallel_model(raw_model, cfg, world, dtype, use_compile):
    """The model the training step runs: raw_model compiled, and under torchrun wrapped by DDP, which all-reduces
    the gradients during backward; or, with the memory modes (memory.py), its blocks recomputed in the backward and
    its weights sharded across the ranks (FSDP2)."""
    if cfg.activation_checkpointing == "true":  # keep each block's input only, recompute the rest in the backward
        memory.checkpoint_blocks(raw_model)
    if cfg.fsdp == "true":  # each rank keeps 1/W of the weights, gradients and optimizer state
        return memory.shard(raw_model, world, dtype, use_compile)
    model = torch.compile(raw_model) if use_compile else raw_model
    if world.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[world.local_rank] if world.device_type == "cuda" else None,
            gradient_as_bucket_view=True)  # gradients live in DDP's buckets: no copy in and out of them
    return model


def create_model(cfg, config, checkpoint, start):
    """A checkpoint's model (resumed, or a .pt to fine-tune), a Hugging Face model, or a fresh one."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    if checkpoint is not None:
        return model_of_checkpoint(checkpoint, start.resumed_from or cfg.init_from)
    if cfg.init_from == "scratch":
        return RECIPES[cfg.recipe](config)
    return GPT.from_pretrained(cfg.init_from)


def train(cfg, world, given=()):
    """A run: where it starts settled and every flag checked before any work (bookkeeping.py), then the model, the
    optimizers, the data and the loop. given: the flags given on the command line (on --resume the others are the
    checkpoint's)."""
    cfg, start, checkpoint = bookkeeping.settle(cfg, given, world)  # a new cfg: what a resume takes from its checkpoint
    config = planned_config(cfg, checkpoint)  # the model's shape, before any weights are built
    bookkeeping.check_flags(cfg, world, start, config, lr_multiplier(cfg))
    lrs = {"learning_rate": cfg.max_lr} if cfg.recipe == "gpt2" else \
        {"learning_rate": cfg.muon_lr, "embed_lr": cfg.embed_lr, "head_lr": cfg.head_lr}
    memory.check_memory(RECIPES[cfg.recipe], config, cfg, world, lrs)  # too big: one line, not a traceback
    dtype = resolve_dtype(cfg.dtype, world.device_type)
    raw_model = create_model(cfg, config, checkpoint, start).to(world.device)
    if cfg.sample is not None:  # --sample PROMPT: continuations of the prompt, then exit (no data, nothing written)
        return print_samples(raw_model, cfg.sample, cfg.max_new_tokens, cfg.seed, world, dtype, cfg.num_samples,
                             temperature=cfg.temperature, top_k=cfg.top_k) if world.is_master else None
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere and newer for what stays in float32
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and world.device_type == "cuda")
    model = parallel_model(raw_model, cfg, world, dtype, use_compile)  # compiled; DDP (or FSDP) under torchrun
    # the optimizers after sharding, which replaces each parameter by this rank's shard of it
    optimizers = raw_model.configure_optimizers(cfg.weight_decay, device_type=world.device_type, **lrs)
    if "micro_batch_size" not in given and memory.out_of_memory_is_an_error(world):  # the largest B, B/2, ... that fits
        B = memory.fit_micro_batch(model, raw_model, optimizers, cfg.micro_batch_size, cfg.seq_len, world, dtype)
        cfg = dataclasses.replace(cfg, micro_batch_size=B)  # the same on every GPU
    # data: every rank reads its own share of one global order of windows, B sequences of T tokens at a time
    data, B, T, W = bookkeeping.fetch_data(cfg, world), cfg.micro_batch_size, cfg.seq_len, world.world_size
    train_loader = ShardedLoader(data, B, T, "train", world.rank, W, cfg.seed, config.vocab_size)
    val_loader = ShardedLoader(data, B, T, "val", world.rank, W, vocab_size=config.vocab_size)
    bookkeeping.check_epochs(cfg, start, train_loader)  # a run that would read a small corpus 1,000s of times
    if start.resumed_from is not None:  # optimizer moments, data position, random generators as the run left them
        restore_checkpoint(checkpoint, optimizers, train_loader, world)
    del checkpoint  # loaded: a 124M checkpoint is 1.5 GB, not to be kept for the whole run
    evals = (bookkeeping.load_hellaswag(cfg, world, raw_model) if cfg.hellaswag_every > 0 else None,  # before any
             bookkeeping.load_core(cfg, world, raw_model) if cfg.core_every > 0 else None)  # file is written

    def probe():  # the loss of one val micro-batch: it must be finite before any checkpoint is written (Run.save)
        return evaluate_val(raw_model, val_loader, 1, world, dtype, stop=lambda: False)

    with bookkeeping.Run(cfg, world, start, dtype, probe) as run:  # the --log_dir lock, log.txt (and W&B), signals
        run.announce(raw_model, train_loader, use_compile, lr_multiplier(cfg))
        try:
            loop(cfg, run, model, raw_model, optimizers, train_loader, val_loader, evals)
        except Exception as e:  # noqa: BLE001 -- out of memory, torch.compile without a C compiler: one line
            raise run.as_user_error(e) from None


def planned_config(cfg, checkpoint):
    """The GPTConfig the run will train, known before any weights are built: the checkpoint's (resumed or fine-tuned),
    the --model shape with its overrides, or the Hugging Face model's (its config.json, or a hub name's size)."""
    if checkpoint is not None:
        return GPTConfig(**checkpoint["config"])
    n_layer, n_head, n_embd = GPT2_SHAPES.get(cfg.model if cfg.init_from == "scratch" else cfg.init_from,
                                              GPT2_SHAPES["gpt2"])
    if cfg.init_from == "scratch":
        return GPTConfig(block_size=cfg.block_size or 1024, vocab_size=cfg.vocab_size or 50304,
                         n_layer=cfg.n_layer or n_layer, n_head=cfg.n_head or n_head, n_embd=cfg.n_embd or n_embd)
    if (Path(cfg.init_from) / "config.json").is_file():  # a local Hugging Face directory
        return GPTConfig(**huggingface.local_shape(cfg.init_from))
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)  # a hub name: GPT-2's context and vocabulary


def model_of_checkpoint(checkpoint, path):
    """The model in a loaded checkpoint, built by the recipe (gpt2 or modern) that trained it. Refused when that
    recipe's model has changed what it computes since (its revision): the weights would load and mean nothing."""
    recipe = checkpoint.get("args", {}).get("recipe", "gpt2")
    model_class, saved = RECIPES.get(recipe, GPT), checkpoint.get("revision", 1)  # files before revisions: 1
    if saved != model_class.revision:
        made_by = f" (git {checkpoint['git']})" if checkpoint.get("git") else ""
        raise UserError(f"{path} holds revision {saved} of the {recipe} recipe's model; this train_gpt2.py computes "
                        f"revision {model_class.revision} ({model_class.__name__}.revision), another function of the "
                        f"same weights: train it again, or use the train_gpt2.py that made it{made_by}")
    try:
        model = model_class(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError, KeyError) as e:  # other keys or shapes than our GPT's, another recipe
        raise UserError(f"{path} is not a checkpoint of train_gpt2.py's GPT ({first_line(e)})") from None
    return model


# =============================================================================
# end of training


def main(argv=None):
    cfg, given = bookkeeping.parse_args(TrainConfig, PRESETS, argv)
    world = None
    try:
        world = setup_distributed(cfg.device, cfg.dist_timeout)
        train(cfg, world, given)
        if world.world_size > 1:
            torch.distributed.barrier()  # leave together: gloo can abort a rank whose peer has already gone
    except (UserError, OSError) as e:  # OSError: a path the system refuses (a name too long, ...), also one line
        bookkeeping.report_error("train_gpt2.py", e, world)  # once, or by the rank that alone met it
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before training, or a second one in it: stop now, without a checkpoint
        print0("\ntrain_gpt2.py: interrupted, without saving; --resume continues from the newest checkpoint",
               file=sys.stderr)
        sys.exit(130)
    finally:
        if world is not None and world.world_size > 1:
            torch.distributed.destroy_process_group()

# -----------------------------------------------------------------------------
# Appendix: measuring speed. (The faster loss for CPUs that forward calls is cpu_loss.py.)

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


def flops_per_token(model, T):
    """Training FLOPs per token (PaLM, appendix B): 6 per parameter that multiplies, plus attention's 12*L*C*T."""
    c = model.config
    # embeddings are lookups, not products: wpe, and wte unless it is tied to the head (GPT-2)
    lookups = [m.weight for m in model.transformer.values() if isinstance(m, nn.Embedding)]
    n = sum(p.numel() for p in model.parameters()) - sum(w.numel() for w in lookups if w is not model.lm_head.weight)
    return 6 * n + 12 * c.n_layer * c.n_embd * T


def estimate_mfu(model, T, tokens_per_sec, world):
    """Model FLOPs utilisation: the share of the GPUs' bf16 peak that training at tokens_per_sec (all ranks) uses,
    in percent; None where the peak is unknown (CPUs, unlisted GPUs)."""
    peak = peak_flops(world)
    return 100 * flops_per_token(model, T) * tokens_per_sec / (peak * world.world_size) if peak else None


if __name__ == "__main__":
    main()
