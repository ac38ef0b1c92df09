"""
Train GPT-2 from scratch, in one file that reads top to bottom.

    python train_gpt2.py --preset moliere                      # quick start: a tiny GPT on Moliere, CPU is fine
    python train_gpt2.py                                       # GPT-2 124M on edu_fineweb10B/, one GPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py     # the same on 8 GPUs (make shards: python fineweb.py)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --resume   # continue from the newest checkpoint in log/

Sections, in reading order: the model (exactly Hugging Face's GPT-2), the data loader, the learning-rate
schedule, distributed set-up, evaluations, checkpoints, the hyperparameter table, and the training loop.
"""

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent  # default data, downloads and caches live beside this file

# -----------------------------------------------------------------------------
# The model: GPT-2 as OpenAI released it, module names as in Hugging Face so weights map one to one.

GPT2_VOCAB = 50257  # GPT-2's tokenizer: 50,000 merges + 256 bytes + <|endoftext|>
EOT = 50256  # <|endoftext|>: starts every document


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
        """(B, T) ids -> (logits, loss).

        Without targets: logits (B, T, vocab_size) and loss None. With targets: the mean cross-entropy
        and logits None, because the loss is computed chunk by chunk without ever storing the
        (B, T, vocab_size) logits (see vocab_cross_entropy below).
        """
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x), None
        return None, vocab_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())

    # -- Hugging Face interop: our module names equal theirs; their Conv1D stores weights as (in, out)
    HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, name_or_path):
        """GPT-2 weights from the hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local HF directory."""
        from transformers import GPT2LMHeadModel  # imported here: heavy, and only this path needs it

        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        c = hf.config
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                              n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd))
        ours = model.state_dict()
        # older transformers versions also keep causal-mask buffers (attn.bias): not weights, skipped
        theirs = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if set(ours) != set(theirs):
            different = sorted(set(ours) ^ set(theirs))[:5]
            raise ValueError(f"{name_or_path}: weights do not match GPT-2's layout: {different}")
        with torch.no_grad():
            for k, v in theirs.items():
                ours[k].copy_(v.t() if k.endswith(cls.HF_TRANSPOSED) else v)
        return model

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors that transformers' GPT2LMHeadModel loads (lm-eval, the hub)."""
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

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """The model saved in one of our checkpoints (model_XXXXX.pt), for evaluation and sampling."""
        checkpoint = load_checkpoint(path, map_location)
        model = cls(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
        return model

    def configure_optimizers(self, weight_decay, learning_rate, device_type):
        """AdamW with weight decay on matrices only: decaying biases and LayerNorm gains helps nothing."""
        params = [p for p in self.parameters() if p.requires_grad]  # the tied wte/lm_head appears once
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # fused: one kernel for all parameters instead of a dozen per tensor (CUDA only)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                 fused=device_type == "cuda")

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


class VocabCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T against targets, for eager mode (CPU above all).

    The vocabulary projection and its softmax are most of a small GPT's work. The usual chain (bf16 logits,
    upcast to float32, log_softmax, nll, and the same again backwards) writes and reads several (N, vocab)
    float32 tensors: 412 MB each at N = B*T = 2048, and on a CPU memory traffic and page faults, not FLOPs,
    then set the pace. Here the logits of `chunk_rows` rows at a time become probabilities in place, in the
    compute dtype (bf16 under autocast: as precise as the bf16 logits they come from; the softmax itself
    sums in float32). Since the loss is the last thing computed, the gradient is formed at once:
    d loss / d logits = (softmax - onehot(target)) / N. Backward only scales what forward kept.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, chunk_rows, need_grad):
        N, V = x.size(0), weight.size(0)
        xc, wc = x.to(dtype), weight.to(dtype)
        # the probabilities of all N rows when training (they become the logits' gradient), else of one chunk
        probs = torch.empty(N if need_grad else min(N, chunk_rows), V, dtype=dtype, device=x.device)
        dx = torch.empty_like(xc) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, N, chunk_rows):
            rows, tgt = xc[start:start + chunk_rows], targets[start:start + chunk_rows, None]
            p = probs[start:start + len(rows)] if need_grad else probs[:len(rows)]
            torch.mm(rows, wc.t(), out=p)  # logits (rows, V)
            p.copy_(torch.softmax(p, dim=1))
            p_target = p.gather(1, tgt).float()
            loss -= p_target.clamp_min(1e-38).log().sum()  # clamp: a p that underflowed to 0 costs 87, not inf
            if need_grad:
                p.scatter_(1, tgt, (p_target - 1).to(dtype))  # softmax - onehot: the gradient, times N
                torch.mm(p, wc, out=dx[start:start + len(rows)])
        if need_grad:
            ctx.save_for_backward(dx, (probs.t() @ xc).float())  # d weight in one large matmul
            ctx.x_dtype = x.dtype
        return loss / N

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        scale = grad_loss / dx.size(0)  # the 1/N of the mean, and whatever scaled the loss (accumulation)
        return (dx * scale).to(ctx.x_dtype), dw * scale, None, None, None, None


def vocab_cross_entropy(x, weight, targets, chunk_rows=128):
    """Loss of the lm_head on (N, C) hidden states x; follows autocast's dtype like an nn.Linear would."""
    if torch.compiler.is_compiling():
        # torch.compile fuses the plain computation well (and would trace the chunks one by one)
        return F.cross_entropy(F.linear(x, weight), targets)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    with torch.autocast(device_type, enabled=False):  # dtypes are chosen explicitly inside
        return VocabCrossEntropy.apply(x, weight, targets, dtype, chunk_rows, torch.is_grad_enabled())


# -----------------------------------------------------------------------------
# Data: token shards (uint16 .npy, written by fineweb.py) or one text file, read as T+1-token windows.

MOLIERE_URL = "https://raw.githubusercontent.com/NoeFlandre/GPT2-From-Scratch/main/data/moliere.txt"
MOLIERE_SHA256 = "8cd86b64cf6dc641b4e12f6cbca92c546eaf0342db86d3c489cb5b9be37be0ea"
SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d{6})\.npy$")


class UserError(Exception):
    """Something the user must fix (data, flags, disk space): main() prints it as one line, no traceback."""


@functools.cache
def get_tokenizer():
    import tiktoken  # created on first use: importing this file must stay free of work

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its files once; offline, that is a network error
        raise UserError(f"could not load GPT-2's tokenizer: tiktoken fetches it on first use ({type(e).__name__}); "
                        f"connect once, or point TIKTOKEN_CACHE_DIR at a copy of its cache") from None


def download_moliere(path, url=MOLIERE_URL):
    """Fetch the quick start's corpus once, checking its sha256; a failed download leaves no file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if digest != MOLIERE_SHA256:
            raise UserError(f"sha256 {digest} differs from the expected {MOLIERE_SHA256}")
        os.replace(tmp, path)  # appears under its real name only once complete and verified
    except (OSError, UserError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({e}); fetch it by hand: curl -L {url} -o {path} "
                        f"and check: sha256sum {path} -> {MOLIERE_SHA256}") from None
    return path


def load_token_arrays(source, split, T):
    """The token arrays of one split: memory-mapped shards of a directory, or 90/10 of a text file."""
    source = Path(source)
    if source.suffix == ".txt":
        if not source.is_file():
            raise UserError(f"text file {source} not found")
        tokens = np.array([EOT] + get_tokenizer().encode_ordinary(source.read_text(encoding="utf-8")), np.uint16)
        cut = int(0.9 * len(tokens))  # first 90% train, last 10% val
        arrays, names = [tokens[:cut] if split == "train" else tokens[cut:]], [f"{source} ({split})"]
    else:
        hint = "HINT: make shards with `python fineweb.py` (or pass --data PATH: a shard directory or a .txt file)"
        if not source.is_dir():
            raise UserError(f"data directory {source} not found. {hint}")
        paths = sorted(p for p in source.iterdir() if (m := SHARD_NAME.match(p.name)) and m["split"] == split)
        if not paths:
            raise UserError(f"no {split} shards (*_{split}_NNNNNN.npy) in {source}. {hint}")
        # memory maps: a 100M-token shard costs no memory until its pages are read
        arrays, names = [np.load(p, mmap_mode="r") for p in paths], [str(p) for p in paths]
    for array, name in zip(arrays, names):
        if array.dtype != np.uint16 or array.ndim != 1:
            raise UserError(f"{name}: expected a 1-D uint16 token array, found {array.dtype} {array.shape}. "
                            f"HINT: regenerate it with `python fineweb.py`")
        if len(array) < T + 1:
            raise UserError(f"{name}: {len(array)} tokens, fewer than one window of T+1 = {T + 1}")
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

    def __init__(self, source, B, T, split, rank=0, world_size=1, seed=1337):
        self.B, self.T, self.split, self.rank, self.world_size, self.seed = B, T, split, rank, world_size, seed
        self.arrays = load_token_arrays(source, split, T)
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
        return torch.from_numpy(self.arrays[shard][i: i + self.T + 1].astype(np.int64))

    def next_batch(self):
        rows = torch.stack([self.window(self.position + b) for b in range(self.B)])  # (B, T+1)
        self.position += self.world_size * self.B  # skip the other ranks' micro-batches
        return rows[:, :-1], rows[:, 1:]  # inputs, and targets shifted by one: (B, T) each

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


def pick_device(requested):
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available[requested]:
        raise UserError(f"--device {requested} is not available here; use --device auto or cpu")
    return requested


def setup_distributed(device="auto"):
    """DistInfo for this process; under torchrun also joins the process group (nccl on CUDA, gloo on CPU)."""
    device_type = pick_device(device)
    if "RANK" not in os.environ:  # a plain `python train_gpt2.py`
        return DistInfo(0, 0, 1, device_type, device_type, True)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_type == "mps":
        raise UserError("MPS runs single-process: use `python train_gpt2.py`, not torchrun")
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=torch.device(device))
    else:
        device = "cpu"
        torch.distributed.init_process_group("gloo")
    return DistInfo(rank, local_rank, world_size, device, device_type, rank == 0)


def all_reduce_mean(value, dist):
    """The mean of a float over all ranks (gloo has no ReduceOp.AVG, so SUM / world_size)."""
    if dist.world_size == 1:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.item() / dist.world_size


# -----------------------------------------------------------------------------
# Evaluations: validation loss, HellaSwag (scored by hellaswag.py) and text samples.

def autocast(dist, dtype):
    """bf16 autocast: matmuls in bfloat16, reductions (softmax, layernorm) in float32; off for float32 runs."""
    return torch.autocast(dist.device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def evaluate_val(model, loader, steps, dist, dtype):
    """Mean loss over `steps` micro-batches of this rank's share of the val split (callers average ranks)."""
    model.eval()
    loader.reset()  # the same val tokens every time
    total = 0.0
    with torch.no_grad():
        for _ in range(steps):
            x, y = loader.next_batch()
            with autocast(dist, dtype):
                _, loss = model(x.to(dist.device), y.to(dist.device))
            total += loss.item()
    model.train()
    return total / steps


def evaluate_hellaswag(raw_model, examples, dist, batch_size):
    """acc_norm over all examples, each rank scoring its share; returns (n, acc_norm)."""
    import hellaswag  # (its scorer is the one used by `python hellaswag.py`)

    result = hellaswag.evaluate(raw_model, examples[dist.rank::dist.world_size], dist.device, batch_size=batch_size)
    counts = torch.tensor([result["n"], result["correct_norm"]], dtype=torch.long, device=dist.device)
    if dist.world_size > 1:
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
    n, correct = counts.tolist()
    return n, correct / n


def sample_text(raw_model, prompt, num_samples, max_new_tokens, seed, device):
    """num_samples continuations of prompt, drawn with a generator of their own (training RNG untouched)."""
    enc = get_tokenizer()
    idx = torch.tensor([enc.encode_ordinary(prompt)] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = raw_model.training
    raw_model.eval()
    out = raw_model.generate(idx, max_new_tokens, generator=generator)
    raw_model.train(was_training)
    return [enc.decode(row.tolist()) for row in out]


# -----------------------------------------------------------------------------
# Checkpoints: everything needed to continue a run exactly, written so that a crash never leaves a torn file.

CHECKPOINT_NAME = re.compile(r"^model_(\d+)\.pt$")


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:  # no git on this machine
        return "unknown"


def rng_state(dist):
    """This rank's random generators (training itself draws no random numbers, but user changes might)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached), "torch": torch.get_rng_state()}
    if dist.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dist.device)
    return state


def set_rng_state(state, dist):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if dist.device_type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dist.device)


def gather_objects(obj, dist):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if dist.world_size == 1:
        return [obj]
    out = [None] * dist.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def write_atomically(obj, path):
    """torch.save to a temp name, fsync, rename: the checkpoint's name appears only once it is whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk, not just in the page cache, before it gets its name
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 1e9
        raise UserError(f"could not write checkpoint {path} ({e.strerror}; {free:.2f} GB free). Earlier checkpoints "
                        f"are intact: free some space, then continue with --resume") from None


def save_checkpoint(log_dir, step, raw_model, optimizer, train_loader, val_loss, cfg, dist):
    """model_{step:05d}.pt: the state after `step` updates. Every rank calls this (it gathers their states)."""
    ranks = gather_objects({"loader": train_loader.state_dict(), "rng": rng_state(dist)}, dist)
    path = log_dir / f"model_{step:05d}.pt"
    failed = None
    if dist.is_master:
        checkpoint = {
            "model": raw_model.state_dict(),  # the uncompiled module: no _orig_mod. or module. prefixes
            "config": dataclasses.asdict(raw_model.config), "step": step, "val_loss": val_loss,
            "optimizer": optimizer.state_dict(), "loaders": [r["loader"] for r in ranks],
            "rng": [r["rng"] for r in ranks], "args": dataclasses.asdict(cfg),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_commit(), "torch": str(torch.__version__),
        }
        try:
            write_atomically(checkpoint, path)
            prune_checkpoints(log_dir, cfg.keep_checkpoints)
        except UserError as e:
            failed = e
    # every rank learns whether rank 0 succeeded (this also holds them until the file is complete)
    failures = gather_objects(failed is not None, dist)
    if any(failures):
        raise failed or UserError("rank 0 could not write a checkpoint")
    return path


def list_checkpoints(log_dir):
    """Complete checkpoints in log_dir, oldest first (a temp file from a crash never matches the name)."""
    found = [(int(m[1]), p) for p in Path(log_dir).glob("model_*.pt") if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(log_dir, keep):
    if keep > 0:
        for path in list_checkpoints(log_dir)[:-keep]:  # never the newest `keep`
            path.unlink()


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint's contents; weights_only: plain tensors and containers, no code runs on load."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises several kinds
        raise UserError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0]})") from None


def find_resume_checkpoint(cfg):
    """(path, checkpoint) for --resume: the given file, or the newest readable checkpoint in log_dir."""
    if cfg.resume != "latest":
        return Path(cfg.resume), load_checkpoint(cfg.resume)
    candidates = list_checkpoints(cfg.log_dir)
    if not candidates:
        raise UserError(f"--resume: no checkpoint (model_NNNNN.pt) in {cfg.log_dir}; start without --resume, "
                        f"or point --log_dir at the run's directory")
    for path in reversed(candidates):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            print(f"skipping {e}")
    raise UserError(f"--resume: none of the checkpoints in {cfg.log_dir} is readable")


# flags that change what the run computes: a resumed run must keep them (max_steps and -B may change;
# the data may move to another path: the loader checks that its shards are the same)
MATH_FLAGS = ("init_from", "model", "n_layer", "n_head", "n_embd", "block_size", "vocab_size",
              "total_batch_size", "seq_len", "max_lr", "min_lr_ratio", "warmup_steps", "weight_decay",
              "grad_clip", "seed")


def check_resume_flags(saved, cfg):
    changed = [f"--{k} {saved[k]} -> {getattr(cfg, k)}" for k in MATH_FLAGS if saved[k] != getattr(cfg, k)]
    if changed:
        raise UserError("--resume: these flags differ from the checkpoint's run and would change its math: "
                        + ", ".join(changed) + ". Rerun with the checkpoint's values, or start a new --log_dir")
    notes = [f"--{k} {saved[k]} -> {getattr(cfg, k)}" for k in ("max_steps", "micro_batch_size")
             if saved[k] != getattr(cfg, k)]
    return f"resuming with changed {', '.join(notes)}" if notes else None


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
    # the model: a GPT-2 shape, each dimension overridable (0 = the shape's own)
    model: str = knob("gpt2", "GPT-2 shape to start from", choices=tuple(GPT2_SHAPES))
    n_layer: int = knob(0, "transformer blocks")
    n_head: int = knob(0, "attention heads")
    n_embd: int = knob(0, "embedding size")
    block_size: int = knob(0, "longest context (default 1024)")
    vocab_size: int = knob(0, "vocabulary (default 50304: GPT-2's 50257 padded to a multiple of 64)")
    # the batch: total_batch_size = micro_batch_size * seq_len * world_size * gradient accumulation steps
    total_batch_size: int = knob(524288, "tokens per optimizer step (2**19, about GPT-3 Small's 0.5M)")
    micro_batch_size: int = knob(64, "sequences per forward pass on each GPU", flags=("-B",))
    seq_len: int = knob(1024, "tokens per sequence", flags=("-T",))
    # optimization (GPT-3 paper, table 2.1 and appendix B)
    max_lr: float = knob(6e-4, "peak learning rate")
    min_lr_ratio: float = knob(0.1, "the final learning rate as a fraction of max_lr")
    warmup_steps: int = knob(715, "linear warmup (375M tokens / 2**19 tokens per step)")
    max_steps: int = knob(19073, "optimizer steps (10B tokens / 2**19 tokens per step)")
    weight_decay: float = knob(0.1, "AdamW weight decay on matrices")
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
    dtype: str = knob("auto", "auto: bfloat16 on CUDA and CPUs with native bf16",
                      choices=("auto", "bfloat16", "float32"))
    seed: int = knob(1337, "seeds the initialisation and the data order")
    sample: str = knob(None, "print samples of this prompt from the initialised (or resumed) model, then exit",
                       metavar="PROMPT")


PRESETS = {
    "gpt2-124M": {},  # the defaults above are the recipe
    # Quick start: a small GPT on Moliere's plays (0.9M tokens), about 8 minutes on a 2-core CPU. The
    # vocabulary projection (50304 x n_embd) is most of a small model's work, so n_embd stays small.
    "moliere": dict(data="input/moliere.txt", log_dir="log_moliere", n_layer=4, n_head=4, n_embd=128,
                    block_size=128, seq_len=128, micro_batch_size=32, total_batch_size=8192, max_lr=3e-3,
                    warmup_steps=20, max_steps=200, eval_every=25, val_tokens=65536, hellaswag_every=0,
                    sample_every=100, prompt="sganarelle: \n", checkpoint_every=100),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train GPT-2 from scratch.", argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        flags = meta.pop("flags", ())
        kind = {} if "nargs" in meta else {"type": f.type}
        meta["help"] += f" (default: {f.default})"
        parser.add_argument(f"--{f.name}", *flags, dest=f.name, **kind, **meta)
    given = vars(parser.parse_args(argv))  # only the flags on the command line (SUPPRESS drops the rest)
    preset = PRESETS[given.get("preset", TrainConfig.preset)]
    return TrainConfig(**{**preset, **given})


def resolve_path(path):
    """A relative path from the current directory if it exists there, else beside this file (where fineweb.py
    writes edu_fineweb10B/ and the quick start keeps input/moliere.txt)."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else HERE / path


def resolve_dtype(requested, dist):
    """--dtype auto: bfloat16 on CUDA and on CPUs with AVX-512 BF16 or AMX (native bf16 matmuls, 1.3x faster
    than float32); float32 elsewhere (MPS, older CPUs), where bf16 is emulated and slow."""
    if requested != "auto":
        return requested
    if dist.device_type == "cuda":
        return "bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text() if dist.device_type == "cpu" else ""
    except OSError:  # not Linux
        flags = ""
    return "bfloat16" if "avx512_bf16" in flags or "amx_bf16" in flags else "float32"


def model_config(cfg):
    """GPTConfig for a run from scratch: the --model shape with any overrides."""
    n_layer, n_head, n_embd = GPT2_SHAPES[cfg.model]
    return GPTConfig(block_size=cfg.block_size or 1024, vocab_size=cfg.vocab_size or 50304,
                     n_layer=cfg.n_layer or n_layer, n_head=cfg.n_head or n_head, n_embd=cfg.n_embd or n_embd)


def validate(cfg, dist):
    """Every problem with the flags at once, before any work starts."""
    problems = []
    B, T, W = cfg.micro_batch_size, cfg.seq_len, dist.world_size
    if min(B, T, cfg.total_batch_size, cfg.max_steps) <= 0:
        problems.append("-B, -T, --total_batch_size and --max_steps must be positive")
    elif cfg.total_batch_size % (B * T * W):
        tokens = cfg.total_batch_size // (T * W)  # sequences per step on each rank, if T*W divides the total
        valid = [b for b in range(1, tokens + 1) if tokens % b == 0] if cfg.total_batch_size % (T * W) == 0 else []
        problems.append(f"--total_batch_size {cfg.total_batch_size} is not divisible by B*T*world_size = "
                        f"{B}*{T}*{W} = {B * T * W}; " + (f"valid -B values: {valid}" if valid else
                        f"use a --total_batch_size that is a multiple of {B * T * W}"))
    if cfg.init_from == "scratch":
        config = model_config(cfg)
        if T > config.block_size:
            problems.append(f"-T {T} is longer than the model's block_size {config.block_size}")
        if config.n_embd % config.n_head:
            problems.append(f"--n_embd {config.n_embd} is not a multiple of --n_head {config.n_head}")
    elif any((cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size)):
        problems.append(f"--init_from {cfg.init_from} fixes the model's shape: drop --n_layer/--n_head/--n_embd/"
                        f"--block_size/--vocab_size")
    if min(cfg.eval_every, cfg.hellaswag_every, cfg.sample_every, cfg.checkpoint_every, cfg.keep_checkpoints,
           cfg.warmup_steps, cfg.val_tokens) < 0:
        problems.append("the --*_every, --keep_checkpoints, --warmup_steps and --val_tokens flags cannot be negative")
    if dist.device_type == "mps" and cfg.dtype == "bfloat16":
        problems.append("--dtype bfloat16 is not supported on MPS: use float32")
    if problems:
        raise UserError("; ".join(problems))


# -----------------------------------------------------------------------------
# The training loop.

def prepare_data(cfg, dist):
    """The resolved --data path; the quick start's corpus is downloaded on first use (by rank 0)."""
    data = resolve_path(cfg.data)
    if data.name == "moliere.txt" and not data.exists():
        if dist.is_master:
            print(f"downloading {MOLIERE_URL} -> {data}")
            download_moliere(data)
        if dist.world_size > 1:
            torch.distributed.barrier()  # the others wait for the file
    return data


def load_hellaswag(cfg, dist, block_size):
    """The val examples, tokenized once per run (rank 0 downloads them while the others wait)."""
    import hellaswag

    if cfg.hellaswag_data is None:
        if dist.is_master:
            try:
                hellaswag.download("val")
            except OSError as e:
                raise UserError(f"HellaSwag download failed ({e}); pass --hellaswag_data FILE or "
                                f"--hellaswag_every 0") from None
        if dist.world_size > 1:
            torch.distributed.barrier()
    try:
        examples = [hellaswag.render_example(e) for e in hellaswag.iterate_examples("val", cfg.hellaswag_data)]
    except (OSError, ValueError) as e:
        raise UserError(f"HellaSwag data: {e}") from None
    longest = max(tokens.size(1) for _, tokens, _, _ in examples)
    if longest > block_size:
        raise UserError(f"HellaSwag examples are up to {longest} tokens, more than the model's block_size "
                        f"{block_size}: use --hellaswag_every 0")
    return examples


def create_model(cfg, checkpoint):
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    if checkpoint is not None:
        model = GPT(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    elif cfg.init_from == "scratch":
        model = GPT(model_config(cfg))
    elif cfg.init_from.endswith(".pt"):
        model = GPT.from_checkpoint(cfg.init_from)
    else:
        model = GPT.from_pretrained(cfg.init_from)
    return model


PEAK_BF16_FLOPS = [  # dense bf16 tensor-core peaks from the vendors' data sheets, first match wins
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12),
]


def flops_per_token(model, T):
    """Training FLOPs per token (PaLM, appendix B): 6 per parameter that multiplies, plus attention's 12*L*C*T."""
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()  # wpe is a lookup
    return 6 * n + 12 * c.n_layer * c.n_embd * T


def peak_flops(dist):
    if dist.device_type != "cuda":
        return None
    name = torch.cuda.get_device_name(dist.device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


class StopSignals:
    """SIGTERM (a spot instance being reclaimed) or SIGINT (Ctrl-C) asks the loop to finish the current update,
    save a checkpoint and exit 0; a second signal stops at once."""

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def any_rank(self, dist):
        """True on every rank if any rank got a signal (so that all of them stop at the same step)."""
        flag = torch.tensor(int(self.received is not None), device=dist.device)
        if dist.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def train_step(model, optimizer, train_loader, step, grad_accum_steps, cfg, dist, dtype):
    """One optimizer update over total_batch_size tokens; returns (loss averaged over ranks, grad norm, lr)."""
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=dist.device)
    for micro_step in range(grad_accum_steps):
        x, y = train_loader.next_batch()
        if dist.device_type == "cuda":  # pinned memory: the copy runs asynchronously, overlapping compute
            x, y = x.pin_memory().to(dist.device, non_blocking=True), y.pin_memory().to(dist.device, non_blocking=True)
        # DDP all-reduces gradients during backward; only the last micro-step needs it, no_sync() skips the rest
        last = micro_step == grad_accum_steps - 1
        with contextlib.nullcontext() if dist.world_size == 1 or last else model.no_sync():
            with autocast(dist, dtype):
                _, loss = model(x, y)
            # Each micro-batch's loss is a mean over its B*T tokens and gradients add up over micro-steps, so
            # dividing by grad_accum_steps makes their sum the gradient of the mean over the whole batch.
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            loss.backward()
    loss_mean = all_reduce_mean(loss_accum.item(), dist)
    if not math.isfinite(loss_mean):  # every rank sees the same mean, so every rank stops here
        raise UserError(f"the loss is {loss_mean} at step {step}: stopping without saving. The checkpoints in "
                        f"--log_dir are untouched: --resume from one with a lower --max_lr")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    lr = get_lr(step, cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    dist.synchronize()
    return loss_mean, norm.item(), lr


def start_log(log_file, cfg, dist, dtype, resumed_from):
    """log.txt starts with what made the run (a resume appends to it, with a line saying so)."""
    device = torch.cuda.get_device_name(dist.device) if dist.device_type == "cuda" else dist.device_type
    about = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} | git {git_commit()} | torch {torch.__version__} | "
             f"{device} x {dist.world_size} | {dtype}")
    if resumed_from:
        lines = [f"# resume {resumed_from} | {about}"]
    else:
        if log_file.exists():  # a fresh run never destroys an earlier log
            os.replace(log_file, log_file.with_suffix(".prev.txt"))
            print(f"moved the earlier {log_file} to {log_file.with_suffix('.prev.txt')}")
        lines = [f"# run {about}", f"# config {json.dumps(dataclasses.asdict(cfg))}"]
    with open(log_file, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def due(every, step, last_step):
    return every > 0 and (step % every == 0 or last_step)


def train(cfg, dist):
    validate(cfg, dist)
    dtype = resolve_dtype(cfg.dtype, dist)
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and dist.device_type == "cuda")
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere and newer for what stays in float32
    log_dir, say = Path(cfg.log_dir), print if dist.is_master else (lambda *args: None)
    checkpoint_path, checkpoint = find_resume_checkpoint(cfg) if cfg.resume else (None, None)
    if checkpoint is not None and (note := check_resume_flags(checkpoint["args"], cfg)):
        say(note)
    elif checkpoint is None and cfg.sample is None and list_checkpoints(log_dir):
        raise UserError(f"{log_dir} holds checkpoints of an earlier run: continue it with --resume, "
                        f"or start a new run with another --log_dir")

    # data: every rank reads its own share of one global order of windows
    B, T = cfg.micro_batch_size, cfg.seq_len
    grad_accum_steps = cfg.total_batch_size // (B * T * dist.world_size)
    data = prepare_data(cfg, dist)
    train_loader = ShardedLoader(data, B, T, "train", dist.rank, dist.world_size, cfg.seed)
    val_loader = ShardedLoader(data, B, T, "val", dist.rank, dist.world_size)
    val_steps = max(1, cfg.val_tokens // (B * T * dist.world_size))  # the same val tokens for any world size

    # model and optimizer, fresh or as the checkpoint left them
    raw_model = create_model(cfg, checkpoint).to(dist.device)
    hella_examples = None
    if cfg.hellaswag_every > 0 and cfg.sample is None:
        hella_examples = load_hellaswag(cfg, dist, raw_model.config.block_size)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr, dist.device_type)
    start_step, val_loss = 0, None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        train_loader.load_state_dict(checkpoint["loaders"][0])  # a global position: the same for every rank
        rng = checkpoint["rng"]
        set_rng_state(rng[dist.rank] if len(rng) == dist.world_size else rng[0], dist)
        start_step, val_loss = checkpoint["step"], checkpoint["val_loss"]
        say(f"resumed from {checkpoint_path} at step {start_step}")
    if cfg.sample is not None:
        with autocast(dist, dtype):
            for text in sample_text(raw_model, cfg.sample, 4, 64, cfg.seed, dist.device) if dist.is_master else []:
                print(f"> {text}")
        return
    model = torch.compile(raw_model) if use_compile else raw_model
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if
                                                          dist.device_type == "cuda" else None)
    n_params = sum(p.numel() for p in raw_model.parameters())
    say(f"{n_params:,} parameters | {dist.device} x {dist.world_size} | {dtype} | compile {use_compile} | "
        f"{cfg.total_batch_size:,} tokens per step = {B} x {T} x {dist.world_size} ranks x {grad_accum_steps} "
        f"accumulation steps | {train_loader.epoch_windows * T:,} train tokens per epoch")
    log_file = log_dir / "log.txt"
    if dist.is_master:
        log_dir.mkdir(parents=True, exist_ok=True)
        start_log(log_file, cfg, dist, dtype, checkpoint_path)

    def record(line):  # one build-nanogpt-compatible line in log.txt
        if dist.is_master:
            with open(log_file, "a") as f:
                f.write(line + "\n")

    flops, peak = flops_per_token(raw_model, T), peak_flops(dist)
    with StopSignals() as stop:
        for step in range(start_step, cfg.max_steps + 1):
            last_step = step == cfg.max_steps  # evals and a checkpoint once more after the last update
            if due(cfg.eval_every, step, last_step):
                val_loss = all_reduce_mean(evaluate_val(model, val_loader, val_steps, dist, dtype), dist)
                say(f"step {step:5d} | val loss {val_loss:.4f}")
                record(f"{step} val {val_loss:.4f}")
            if due(cfg.hellaswag_every, step, last_step):
                n, acc_norm = evaluate_hellaswag(raw_model, hella_examples, dist, batch_size=max(1, B // 4))
                say(f"step {step:5d} | HellaSwag {acc_norm:.4f} ({n} examples)")
                record(f"{step} hella {acc_norm:.4f}")
            if due(cfg.sample_every, step, last_step) and dist.is_master:
                with autocast(dist, dtype):
                    for text in sample_text(raw_model, cfg.prompt, 4, 32, cfg.seed, dist.device):
                        print(f"> {text}")
            if cfg.checkpoint_every > 0 and step > start_step and (step % cfg.checkpoint_every == 0 or last_step):
                save_checkpoint(log_dir, step, raw_model, optimizer, train_loader, val_loss, cfg, dist)
            if last_step:
                break

            t0 = time.time()  # the update alone: evals above are not part of the throughput
            model.train()
            loss, norm, lr = train_step(model, optimizer, train_loader, step, grad_accum_steps, cfg, dist, dtype)
            dt = time.time() - t0
            tokens_per_sec = cfg.total_batch_size / dt
            mfu = f" | MFU {100 * flops * tokens_per_sec / (peak * dist.world_size):.1f}%" if peak else ""
            say(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {1000 * dt:.1f}ms | "
                f"tok/sec {tokens_per_sec:,.0f}{mfu}")
            record(f"{step} train {loss:.6f}")
            if stop.any_rank(dist):
                path = save_checkpoint(log_dir, step + 1, raw_model, optimizer, train_loader, val_loss, cfg, dist)
                say(f"stopped by {stop.received or 'a signal on another rank'} after step {step}: saved {path}. "
                    f"Continue with the same command plus --resume")
                return


def main(argv=None):
    cfg = parse_args(argv)
    dist = None
    try:
        dist = setup_distributed(cfg.device)
        train(cfg, dist)
        if dist.world_size > 1:
            torch.distributed.barrier()  # leave together: gloo can abort a rank whose peer has already gone
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # one message, not one per rank
            print(f"train_gpt2.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist is not None and dist.world_size > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
