"""
What a training run keeps in memory, for train_gpt2.py: the memory check before any work (a model too big for the
machine is one line naming the flag) and the -B search (the largest micro-batch that fits the GPU).

Importing this file does nothing; this module imports nothing of train_gpt2.py.
"""

import contextlib
import dataclasses
import os

import torch

from common import UserError, all_reduce, autocast, print0


# -----------------------------------------------------------------------------
# Before any work: a model too big for the machine

# the flag that sets the size of each of the model's parameters, by where the parameter is
SIZED_BY = {"transformer.wpe": "--block_size", "transformer.wte": "--vocab_size", "lm_head": "--vocab_size"}


def check_memory(model_class, config, cfg, world):
    """One line naming the flag, before anything is allocated, when the run cannot fit in this machine's memory (a
    traceback of a 6 TB allocation says nothing of --block_size). A lower bound, so that it never refuses a run that
    fits: training keeps 16 bytes per parameter (float32 weights, gradients, AdamW's two moments) and at least one
    float32 per channel of each layer's input for every token of a micro-batch; sampling needs the weights alone.
    model_class(config): the model to be built; here its parameters' shapes come from a copy with one block, built on
    the meta device (shapes without memory: an instant even for a model of a million blocks)."""
    c, training = config, cfg.sample is None
    with torch.device("meta"):
        one_layer = model_class(dataclasses.replace(config, n_layer=1))
    blocks = f"--n_layer {c.n_layer} and --n_embd {c.n_embd}"
    need = {blocks: 0}  # bytes, by the flags that set them
    for name, p in one_layer.named_parameters():  # a tied matrix counts once
        flag = next((f for prefix, f in SIZED_BY.items() if name.startswith(prefix + ".")), None)
        label = f"{flag} {getattr(c, flag[2:])}" if flag else blocks
        copies = c.n_layer if name.startswith("transformer.h.") else 1
        need[label] = need.get(label, 0) + copies * p.numel() * (16 if training else 4)
    if training:
        B, T = cfg.micro_batch_size, cfg.seq_len
        need[f"-B {B} with -T {T}"] = 4 * B * T * c.n_embd * c.n_layer
    available, where = memory_of(world)
    if sum(need.values()) > available:
        label = max(need, key=need.get)
        raise UserError(f"{label}: the run needs at least {sum(need.values()) / 1e9:,.1f} GB (" +
                        ("weights, gradients, optimizer state and activations" if training else "weights") +
                        f"), more than this machine's {available / 1e9:,.1f} GB of {where}: use a smaller "
                        + " or ".join(word for word in label.split() if word.startswith("-")))


def memory_of(world):
    """(bytes, what) of the memory the run's tensors live in: the GPU's, or the RAM shared by this node's ranks."""
    if world.device_type == "cuda":
        return torch.cuda.get_device_properties(world.device).total_memory, "GPU memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "RAM"


# -----------------------------------------------------------------------------
# A micro-batch that fits the GPU: GPT-2 124M at B=64, T=1024 takes 29 GB compiled, so a 24 GB card needs less.

def is_out_of_memory(e):
    """torch.cuda.OutOfMemoryError, or a RuntimeError saying the same (the CPU's and MPS's allocators, older torch)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and (
        "out of memory" in str(e) or "can't allocate memory" in str(e)))


def out_of_memory_is_an_error(world):
    """Only a GPU reports running out of memory as an exception; on a CPU the operating system ends the process."""
    return world.device_type == "cuda"


def fit_micro_batch(model, B, T, world, dtype):
    """The largest of B, B/2, B/4, ... whose forward and backward pass fit in memory on every rank. The total batch
    stays the same (more accumulation steps), so the run computes the same updates at any B. Each try is one
    micro-step on a batch of zeros (no random numbers drawn, no gradient all-reduce); the ranks then agree on the
    smallest B that fits on all of them."""
    tried = []
    while True:
        if all_reduce(int(fits_in_memory(model, B, T, world, dtype)), world, "min"):
            break
        tried.append(B)
        if B == 1:
            raise UserError(f"even -B 1 (one sequence of {T} tokens) does not fit in GPU memory: use a smaller "
                            f"model or a smaller -T")
        B //= 2
    if tried:
        torch._dynamo.reset()  # torch.compile: compile again for the chosen shape, not for shapes dynamic over tries
        print0(f"-B {B}: the largest micro-batch that fits in GPU memory (-B {', '.join(map(str, tried))} ran out)")
    return B


def fits_in_memory(model, B, T, world, dtype):
    from bookkeeping import compile_failed  # (bookkeeping.py imports this module)

    x = torch.zeros((B, T), dtype=torch.long, device=world.device)
    try:
        with model.no_sync() if world.world_size > 1 else contextlib.nullcontext():
            with autocast(world.device_type, dtype):
                _, loss = model(x, x)
            loss.backward()
        return True
    except Exception as e:  # noqa: BLE001 -- out of memory, or the compiler's failure (the first try compiles)
        if not is_out_of_memory(e):
            raise compile_failed(e) or e from None
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if world.device_type == "cuda":
            torch.cuda.empty_cache()
