"""
What a training run keeps in memory, for train_gpt2.py: the memory check before any work (a model too big for the
machine is one line naming the flag) and the -B search (the largest micro-batch that fits the GPU beside the
optimizer's state, which the first update allocates, and an evaluation).

Importing this file does nothing; this module imports nothing of train_gpt2.py.
"""

import contextlib
import dataclasses
import os

import torch

from common import UserError, all_reduce, autocast, print0

# the optimizer's state per parameter, in float32 numbers: AdamW's two moments, Muon's (and SGD's) momentum
STATE_FLOATS = {"AdamW": 2, "Adam": 2, "Muon": 1, "SGD": 1}

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


def fit_micro_batch(model, raw_model, optimizers, B, T, world, dtype):
    """The largest of B, B/2, B/4, ... with which a micro-step and then an evaluation fit in memory on every rank,
    beside the optimizers' state (which the first update allocates: AdamW's 8 bytes per parameter, 1 GB at 124M).
    The total batch stays the same (more accumulation steps), so the run computes the same updates at any B. Each
    try is one micro-step on a batch of zeros (no random numbers drawn, no gradient all-reduce); the ranks then agree
    on the smallest B that fits on all of them. Under torch.compile each B tried is compiled once, and the one chosen
    is the graph the training steps use."""
    reserve = optimizer_state_bytes(optimizers)
    tried = []
    while True:
        if all_reduce(int(fits_in_memory(model, raw_model, B, T, world, dtype, reserve)), world, "min"):
            break
        tried.append(B)
        if B == 1:
            raise UserError(f"even -B 1 (one sequence of {T} tokens) does not fit in GPU memory beside the "
                            f"optimizer's {reserve / 1e9:.1f} GB: use a smaller model or a smaller -T")
        torch._dynamo.reset()  # the next B compiles afresh for its own shape (not a graph dynamic in B)
        B //= 2
    if tried:
        print0(f"-B {B}: the largest micro-batch that fits in GPU memory (-B {', '.join(map(str, tried))} ran out)")
    return B


def optimizer_state_bytes(optimizers):
    """Bytes of state the optimizers will allocate on this rank at their first step and have not yet: each one's
    float32 numbers per parameter (STATE_FLOATS)."""
    return sum(4 * STATE_FLOATS.get(type(o).__name__, 2) * p.numel()
               for o in optimizers for g in o.param_groups for p in g["params"] if not o.state.get(p))


@contextlib.contextmanager
def set_aside(nbytes, device):
    """nbytes of device memory held for the duration: room a try must leave free."""
    held = torch.empty(nbytes, dtype=torch.uint8, device=device)
    try:
        yield
    finally:
        del held


def fits_in_memory(model, raw_model, B, T, world, dtype, reserve=0):
    """Whether a forward and backward pass of B sequences, then an evaluation batch with the gradients still held (as
    at the start of a step), fit beside `reserve` bytes set aside."""
    from bookkeeping import compile_failed  # (imported here: bookkeeping.py imports this module)

    # input and target: two tensors, typed and shaped as the training step's. The same tensor twice would make
    # torch.compile guard on the two being one, and compile again at the first real step (a minute at 124M)
    x = torch.zeros((B, T), dtype=torch.long, device=world.device)
    y = torch.zeros((B, T), dtype=torch.long, device=world.device)
    try:
        with set_aside(reserve, world.device):
            with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():  # DDP: no all-reduce
                with autocast(world.device_type, dtype):
                    _, loss = model(x, y)
                loss.backward()
            evaluation_batch(raw_model, B, world, dtype)
        return True
    except Exception as e:  # noqa: BLE001 -- out of memory, or the compiler's failure (the first try compiles)
        if not is_out_of_memory(e):
            raise compile_failed(e) or e from None
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if world.device_type == "cuda":
            torch.cuda.empty_cache()


def evaluation_batch(raw_model, B, world, dtype):
    """A forward pass as large as the evaluations' (HellaSwag and CORE score max(1, B // 4) examples per pass, up to
    4 rows each, up to block_size tokens, with an attention mask), without gradients, on the model they use."""
    rows, L = 4 * max(1, B // 4), raw_model.config.block_size
    idx = torch.zeros((rows, L), dtype=torch.long, device=world.device)
    mask = torch.ones((rows, 1, L, L), dtype=torch.bool, device=world.device).tril()  # as the scorers make theirs
    with torch.no_grad(), autocast(world.device_type, dtype):
        raw_model.lm_head(raw_model.hidden_states(idx, attn_mask=mask)[:, -1])
