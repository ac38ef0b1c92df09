"""
What a training run keeps in memory, and the modes that shrink it, for train_gpt2.py: activation checkpointing, FSDP2
sharding, the memory check before any work and the -B search.

Per rank, training keeps two things:
- the weights, their gradients and the optimizer's state: 16 bytes per parameter with AdamW (float32 weights and
  gradients, two float32 moments), 12 under Muon (one momentum). DDP keeps all of it on every rank. --fsdp (FSDP2,
  torch.distributed.fsdp.fully_shard) keeps 1/W of it on each of W ranks and all-gathers one block's weights at a
  time, for its forward and again for its backward, where the gradients are reduce-scattered: each rank ends with
  the sum of its shard only.
- the activations: what the forward pass saves for the backward, per token, layer and channel. With
  --activation_checkpointing a block keeps only its input and computes the rest again in the backward pass (one
  more forward of the blocks: about a third more compute). bench.py --only memory measures both (results/README.md).

How each mode is applied, in torchtitan's order: activation checkpointing (checkpoint_blocks), then compilation (per
block under FSDP, else the whole model), then fully_shard per block and at the root (shard). Neither changes the
module tree or a parameter's name, so state_dict keys, checkpoints and exports are the same in every mode, and a
checkpoint resumes in any mode on any number of ranks (full_state and load_optimizer_state).

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
# The modes

def checkpoint_blocks(raw_model):
    """--activation_checkpointing: each block's forward runs under torch.utils.checkpoint, which keeps the block's
    input and recomputes its activations when the backward pass reaches it. Set on the instances' forward rather than
    by wrapping the blocks in another module, so parameter names (state_dict keys) stay as they are."""
    for block in raw_model.transformer.h:
        block.forward = recomputed_in_backward(block.forward)


def recomputed_in_backward(forward):
    def forward_checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation, sampling: nothing is kept for a backward anyway
            return forward(*args, **kwargs)
        # use_reentrant=False: the variant that torch.compile traces and that keeps gradients for every input
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward_checkpointed


def shard(raw_model, world, dtype, use_compile):
    """--fsdp: each block, then the root (embeddings, final norm, head), becomes an FSDP2 unit whose parameters are
    sharded over the ranks, in place (raw_model is returned: it is the module to train, and its parameters are now
    DTensor shards, so the optimizers must be made after this). The root owns GPT-2's tied wte/lm_head matrix, which
    stays one parameter. Parameters stay float32; with --dtype bfloat16 the gathered copies are bf16 (what autocast
    would compute in) and gradients are reduced in float32. The blocks are compiled one by one, before sharding."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device_type, (world.world_size,))  # all ranks, on this run's device type
    bf16 = dtype == "bfloat16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in raw_model.transformer.h:
        if use_compile:
            block.compile()  # in place: no _orig_mod. in the parameters' names
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)  # gathered again for backward
    # the root's weights are needed again as soon as the backward starts (the head): kept gathered in between
    fully_shard(raw_model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return raw_model


def fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def whole_weights(raw_model):
    """Under --fsdp, every rank holds all the weights while inside (one all-gather; every rank must enter), so that
    evaluations run on each rank alone: ranks score different numbers of batches, sampling runs on rank 0 only, and a
    stop request may cut one rank's evaluation short, none of which the per-block all-gathers would survive. Costs
    the whole model in the compute dtype for the duration. Without --fsdp, nothing."""
    modules = fsdp_modules(raw_model)
    if modules:  # (FSDP's own lazy set-up, which the root's first forward does: a block's would make it the root)
        raw_model._get_fsdp_state()._lazy_init()
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not raw_model, recurse=False)  # as shard() set them


def full_state(raw_model, optimizers):
    """(model state, [optimizer states]) for a checkpoint, the same in every mode: full tensors under the module's
    own names, and each optimizer's state as torch.optim's state_dict() numbers it (ids 0, 1, ... in param_groups
    order), so that a run saved under --fsdp resumes without it and the other way round. Every rank calls this; under
    --fsdp it gathers one tensor at a time onto rank 0's CPU (no rank holds two full copies), and only rank 0's
    answer is complete."""
    if not fsdp_modules(raw_model):
        return raw_model.state_dict(), [o.state_dict() for o in optimizers]
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    states = [numbered(get_optimizer_state_dict(raw_model, o, options=options)) for o in optimizers]
    return get_model_state_dict(raw_model, options=options), states


def numbered(state):
    """An optimizer state keyed by parameter names (torch.distributed.checkpoint's) keyed by numbers instead, as
    torch.optim numbers them: the parameters of all groups, in order."""
    if not state:  # a rank other than 0
        return state
    ids = {name: i for i, name in enumerate(n for group in state["param_groups"] for n in group["params"])}
    return {"state": {ids[name]: s for name, s in state["state"].items()},
            "param_groups": [{**group, "params": [ids[n] for n in group["params"]]} for group in state["param_groups"]]}


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state) in any mode. Under --fsdp every rank read the whole checkpoint: each keeps
    its own shard of every tensor shaped like its parameter (torch.optim would keep the full tensors)."""
    optimizer.load_state_dict(state)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):  # one process: no shards
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, DTensor):
                for key, value in optimizer.state.get(p, {}).items():
                    if not isinstance(value, DTensor) and value.shape == p.shape:  # not AdamW's scalar step count
                        # src_data_rank=None: each rank cuts its shard from its own copy, no communication
                        optimizer.state[p][key] = distribute_tensor(value, p.device_mesh, p.placements,
                                                                    src_data_rank=None)


# -----------------------------------------------------------------------------
# Before any work: the modes' flags, and a model too big for the machine

def check_memory(model_class, config, cfg, world, lrs):
    """One line before anything is allocated when the memory modes cannot run here, or when the run cannot fit in
    this machine's memory (a traceback of a 6 TB allocation says nothing of --block_size), naming the flag to change
    and the modes that would make it fit. model_class(config): the model to be built; lrs: its optimizers' learning
    rates (configure_optimizers' arguments)."""
    training, problems = cfg.sample is None, []
    if training and cfg.fsdp == "true" and cfg.recipe == "modern":
        problems.append("--fsdp true with --recipe modern: Muon orthogonalises whole matrices, which FSDP shards: use "
                        "--recipe gpt2 with --fsdp, or --activation_checkpointing true with DDP")
    if training and cfg.fsdp == "true" and world.world_size == 1:
        problems.append("--fsdp true shards the model over torchrun's ranks, and this is one process: run it under "
                        "torchrun --nproc_per_node=N, or use --activation_checkpointing true")
    if problems:
        raise UserError("; ".join(problems))
    need = needs(model_class, config, cfg, world, lrs)
    available, where = memory_of(world)
    if sum(need.values()) <= available:
        return
    label = max(need, key=need.get)
    helps = [*what_would_fit(model_class, config, cfg, world, lrs, available), "a smaller " + " or ".join(
        word for word in label.split() if word.startswith("-"))]
    raise UserError(f"{label}: the run needs at least {sum(need.values()) / 1e9:,.1f} GB (" +
                    (f"weights, gradients, optimizer state and activations{' per rank' if cfg.fsdp == 'true' else ''}"
                     if training else "weights") +
                    f"), more than this machine's {available / 1e9:,.1f} GB of {where}: use " + ", or ".join(helps))


# the flag that sets the size of each of the model's parameters, by where the parameter is
SIZED_BY = {"transformer.wpe": "--block_size", "transformer.wte": "--vocab_size", "lm_head": "--vocab_size"}


def needs(model_class, config, cfg, world, lrs):
    """{the flags that set them: bytes} this run needs on each rank, at least. A lower bound, so that it never refuses
    a run that fits: training keeps float32 weights and gradients and the optimizers' state (each optimizer's own
    count), 1/W of it under --fsdp, which also holds the root's and one block's weights whole, in the compute dtype;
    activations: at least each block's input and, unless recomputed, one (B, T, 4C) tensor of its MLP, in the compute
    dtype. Sampling needs the weights alone. Parameter shapes come from a copy with one block, built on the meta
    device (shapes without memory: an instant even for a model of a million blocks)."""
    c, training, sharded = config, cfg.sample is None, cfg.fsdp == "true" and cfg.sample is None
    with torch.device("meta"):
        one_layer = model_class(dataclasses.replace(config, n_layer=1))
        optimizers = one_layer.configure_optimizers(cfg.weight_decay, device_type="meta", **lrs) if training else []
    floats = {p: STATE_FLOATS.get(type(o).__name__, 2) for o in optimizers for g in o.param_groups for p in g["params"]}
    s = 4 if cfg.dtype == "float32" else 2  # bytes per number in the compute dtype (at least: auto may mean bf16)
    blocks = f"--n_layer {c.n_layer} and --n_embd {c.n_embd}"
    need = {blocks: 0}
    for name, p in one_layer.named_parameters():  # a tied matrix counts once
        flag = next((f for prefix, f in SIZED_BY.items() if name.startswith(prefix + ".")), None)
        label = f"{flag} {getattr(c, flag[2:])}" if flag else blocks
        copies = c.n_layer if name.startswith("transformer.h.") else 1
        kept = p.numel() * ((8 + 4 * floats.get(p, 0)) if training else 4)
        need[label] = need.get(label, 0) + copies * kept / (world.world_size if sharded else 1)
        if sharded:  # the root's weights whole for the whole micro-step, one block's while it computes
            need[label] += p.numel() * s
    if training:
        B, T, recomputed = cfg.micro_batch_size, cfg.seq_len, cfg.activation_checkpointing == "true"
        per_layer = s * B * T * c.n_embd  # each block's input
        need[f"-B {B} with -T {T}"] = per_layer * (c.n_layer + 4 if recomputed else 5 * c.n_layer)
    return need


def what_would_fit(model_class, config, cfg, world, lrs, available):
    """The memory modes that would make a run fit that does not: --activation_checkpointing, --fsdp on N GPUs."""
    def fits(**modes):
        ranks = modes.pop("ranks", world.world_size)
        return sum(needs(model_class, config, dataclasses.replace(cfg, **modes), dataclasses.replace(
            world, world_size=ranks), lrs).values()) <= available

    if cfg.sample is not None:
        return []
    recomputed = cfg.activation_checkpointing == "true"
    helps = [] if recomputed or not fits(activation_checkpointing="true") else ["--activation_checkpointing true"]
    if world.device_type != "cuda" or cfg.recipe == "modern":  # more GPUs add memory; CPU ranks share one RAM
        return helps
    low = world.world_size + 1 if cfg.fsdp == "true" else 2
    plain = fewest_gpus(fits, low, cfg.activation_checkpointing)
    with_ac = plain if recomputed else fewest_gpus(fits, low, "true")  # never more GPUs than without
    if plain is not None:
        fewer = f" ({with_ac} with --activation_checkpointing true)" if with_ac < plain else ""
        return [f"--fsdp true on {plain} GPUs{fewer}", *helps]
    if with_ac is not None:
        return [f"--fsdp true on {with_ac} GPUs with --activation_checkpointing true", *helps]
    return helps


def fewest_gpus(fits, low, ac, high=1024):
    """The fewest GPUs from `low` on that the run fits on under --fsdp (more of them only ever need less each), or
    None beyond `high`."""
    if not fits(fsdp="true", activation_checkpointing=ac, ranks=high):
        return None
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(fsdp="true", activation_checkpointing=ac, ranks=mid) else (mid + 1, high)
    return low


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
                            f"optimizer's {reserve / 1e9:.1f} GB: use --activation_checkpointing true, --fsdp true, a "
                            f"smaller model or a smaller -T")
        torch._dynamo.reset()  # the next B compiles afresh for its own shape (not a graph dynamic in B)
        B //= 2
    if tried:
        print0(f"-B {B}: the largest micro-batch that fits in GPU memory (-B {', '.join(map(str, tried))} ran out)")
    return B


def optimizer_state_bytes(optimizers):
    """Bytes of state the optimizers will allocate on this rank at their first step and have not yet: each one's
    float32 numbers per parameter (STATE_FLOATS), for this rank's shard of each parameter under --fsdp."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731 -- a DTensor shard, or p
    return sum(4 * STATE_FLOATS.get(type(o).__name__, 2) * local(p).numel()
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
        if fsdp_modules(raw_model):
            raw_model.reset_iter_state()  # FSDP's state of the aborted pass, undone
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
    with torch.no_grad(), whole_weights(raw_model), autocast(world.device_type, dtype):
        raw_model.lm_head(raw_model.hidden_states(idx, attn_mask=mask)[:, -1])
