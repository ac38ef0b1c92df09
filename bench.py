"""
Throughput and memory figures for this machine: a table on stdout and the same numbers in bench.json.

    python bench.py                          # every section, sized for this machine's device
    python bench.py --only train --steps 20  # one section
    python bench.py --only train --step_kind real --attention default flash cudnn   # attention kernels compared
    python bench.py --only train --n_layer 2 --n_embd 32 --vocab_size 128 -B 4 -T 32   # a tiny GPT: seconds on a CPU

Sections:
  train      tokens/s, MFU (CUDA) and peak memory of training steps on random tokens, for each recipe. Two kinds
             of rows, told apart by their "step" field. "one micro-step + optimizer": one B x T forward and
             backward, clipping and the optimizer step, compile off and on. "real step": train_gpt2.train_step
             itself, as train_gpt2.py runs it: one update over --total_batch_size tokens with its gradient
             accumulation, compiled on CUDA only (train_gpt2.py's --compile auto). On a CPU in eager mode the
             model's loss is chunked (never the full logits): timed against the plain loss (full logits, then
             F.cross_entropy, as build-nanogpt does). On GPUs and under torch.compile the model computes the plain
             loss itself, so that is what its row says. --attention picks the scaled_dot_product_attention kernel.
  loader     batches/s and anonymous memory while ShardedLoader reads through two shards
  hellaswag  examples/s of `python hellaswag.py -m HF_DIR` on a GPT-2 in Hugging Face format (loaded into our
             GPT, packed rows) against transformers' model, one example per forward (build-nanogpt's loop)
  core       items/s of core.py's scorer (the options of several items as rows of one forward) against one
             sequence per forward with full logits (nanochat's loop), on the same items: the accuracies must agree
  tokenize   fineweb.py's end-to-end tokens/s against tiktoken's single-core rate x the cores
  memory     what each memory mode keeps (the gpt2 recipe, AdamW). Per rank, the bytes of parameters, gradients and
             optimizer state after one update under DDP and under --fsdp on --ranks ranks (gloo on a CPU, nccl on
             GPUs; counted from the tensors each rank holds); and the peak memory of one B x T micro-step (forward and
             backward, the gradients already allocated) with and without --activation_checkpointing, with its time (and
             on a CPU the process's CPU seconds, which other work on a shared machine disturbs less than the wall).
             Each micro-step row runs in a fresh process: on CUDA the allocator's peak, elsewhere the rise of the
             process's peak RSS (Linux VmHWM, reset before the step; glibc told to return freed blocks of 64 KB and
             more to the system at once, so that RSS follows the live tensors).
  sample     tokens/s of what `--sample` runs (GPT.generate: --num_samples rows of one prompt, top-k 50) for
             --new_tokens after a --prompt_tokens prompt, on a model of block_size -T, each recipe: with the KV cache,
             without it (the whole window again per token), as before the cache (the last block_size tokens again
             per token), and transformers' generate() on the export

Defaults: on CUDA, GPT-2 124M (12 layers, 768 wide) at B=64, T=1024, and a real step of 2**19 tokens (8
micro-steps), as train_gpt2.py trains it; elsewhere a 4-layer, 256-wide GPT at B=8, T=256, and a real step of 4
micro-batches (2**13 tokens); 200 HellaSwag examples; 100 CORE rows per task; 100 MB of text to tokenize. Medians
of --steps repeated measurements, warm-up (and compilation) excluded. bench.json is rewritten after every section;
a row that runs out of memory is recorded as "OOM", one whose attention backend is unavailable gets an "error" note,
and the others go on.
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import bookkeeping
import common
import memory
import train_gpt2
from train_gpt2 import GPTConfig


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores" if device == "cpu" else device


def median_time(fn, steps, warmup, sync):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def no_attention_kernel(e):
    """torch's words saying that the forced --attention backend has no kernel for this device, dtype or shape (under
    torch.compile they come quoted inside Dynamo's message), or None."""
    found = re.search(r"No (viable backend|available kernel)[^'\"\n]*", str(e))
    return found and found.group()


def guarded(row, metric, measure):
    """row + what measure() returns. A measurement that runs out of memory becomes row + {metric: "OOM"}, one whose
    attention backend is unavailable row + {metric: None, "error": why}, so the sections and rows after it still run
    (GPU memory is given back first)."""
    try:
        row = {**row, **measure()}
    except RuntimeError as e:
        if memory.is_out_of_memory(e):
            row = {**row, metric: "OOM"}
        elif no_attention_kernel(e):
            row = {**row, metric: None, "error": f"attention backend unavailable here: {no_attention_kernel(e)}"}
        else:
            raise
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(row)
    return row


def reset_peak_memory(world):
    """Start a new peak: CUDA's allocator statistics, or Linux's peak RSS of this process (clear_refs 5)."""
    if world.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # not Linux: the peak since the process started
        return False


def peak_memory(world, was_reset):
    """{'peak_gpu_mb': ...} on CUDA (tensors allocated), else {'peak_rss_mb': ...} (the whole process)."""
    if world.device_type == "cuda":
        return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated(world.device) / 2**20)}
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)  # bytes
    return {"peak_rss_mb" if was_reset else "peak_rss_mb_since_start": round(kb / 1024)}


# -----------------------------------------------------------------------------
# Training step

# --attention -> torch.nn.attention.SDPBackend member; "default" leaves torch to choose on each call, by its own
# priority order, among the kernels that support the device, dtype and shape
ATTENTION = {"default": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def attention_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return contextlib.nullcontext() if ATTENTION[name] is None else sdpa_kernel(getattr(SDPBackend, ATTENTION[name]))


def compile_fresh(fn):
    """torch.compile(fn) after forgetting every earlier compilation: graphs are cached per function and keep the
    attention kernel chosen when they were traced, so a row could otherwise run an earlier row's graph (and its
    first_step_s would not include compiling)."""
    torch.compiler.reset()
    return torch.compile(fn)


class SyntheticLoader:
    """ShardedLoader's next_batch() on random tokens: (x, y) int64 CPU tensors of shape (B, T), what
    train_gpt2.train_step draws each micro-step (and copies to the device itself, as in training)."""

    def __init__(self, B, T, vocab_size, seed=0):
        self.B, self.T = B, T
        self.vocab_size = min(vocab_size, common.GPT2_VOCAB)  # GPT-2's ids: a padded id is never a target
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        tokens = torch.randint(0, self.vocab_size, (self.B, self.T + 1), generator=self.generator)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # y: the token after each of x's


def plain_loss(model, x, y):
    """build-nanogpt's loss: the full (B, T, vocab) logits, upcast by autocast, then F.cross_entropy."""
    logits = model.lm_head(model.hidden_states(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def loss_kind(device_type, use_compile):
    """model(x, y) chunks its loss (cpu_loss.vocab_cross_entropy) only on a CPU in eager mode."""
    return "plain" if use_compile or device_type != "cpu" else "chunked"


def losses_to_time(raw_model, device_type, use_compile):
    """(forward, loss, fn) rows; where model(x, y) computes the plain loss, a plain row would time the same thing."""
    ours = [("model(x, y)", loss_kind(device_type, use_compile), raw_model)]
    if ours[0][1] == "plain":
        return ours
    return ours + [("lm_head + F.cross_entropy", "plain", lambda x, y: (None, plain_loss(raw_model, x, y)))]


def bench_train(args, world, dtype):
    rows = []
    for attention in args.attention:
        with attention_backend(attention):  # around compilation too: the compiled graph takes the kernel it traced
            rows += [row for recipe in args.recipe for row in bench_recipe(args, world, dtype, recipe, attention)]
    return rows


def bench_recipe(args, world, dtype, recipe, attention):
    """Training rows of one recipe, gpt2 (AdamW) or modern (Muon + AdamW, soft-capped loss): one micro-step, then
    the real step. Both share the model and its optimizers."""
    config = GPTConfig(block_size=args.T, vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    torch.manual_seed(0)
    raw_model = train_gpt2.RECIPES[recipe](config).to(world.device)
    cfg = train_gpt2.TrainConfig()  # the recipe's learning rates (the step rows set each group's lr from them)
    lrs = {"embed_lr": cfg.embed_lr, "head_lr": cfg.head_lr} if recipe == "modern" else {}
    optimizers = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr if recipe == "gpt2" else cfg.muon_lr,
                                                world.device_type, **lrs)  # [AdamW] or [Muon, AdamW]
    base = {"recipe": recipe, "attention": attention, "dtype": dtype,
            "shape": f"{args.n_layer}x{args.n_embd} B={args.B} T={args.T}"}
    rows = []
    if args.step_kind in ("micro", "both"):
        rows += micro_step_rows(args, world, dtype, raw_model, optimizers, base)
    if args.step_kind in ("real", "both"):
        rows += real_step_rows(args, world, dtype, raw_model, optimizers, base)
    return rows


def measure_step(step, tokens, raw_model, args, world):
    """Time step(), which trains on `tokens` tokens: the first call (compilation) apart, then the median of
    args.steps after 2 warm-up calls. MFU counts the model's training FLOPs against the GPU's bf16 peak."""
    raw_model.zero_grad(set_to_none=True)  # nothing left over from a row that failed
    was_reset = reset_peak_memory(world)
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    seconds = median_time(step, args.steps, warmup=2, sync=world.synchronize)
    tokens_per_s = tokens / seconds
    mfu = train_gpt2.estimate_mfu(raw_model, args.T, tokens_per_s, world)
    return {"tokens_per_s": round(tokens_per_s), "step_s": float(f"{seconds:.4g}"), "first_step_s": round(first, 1),
            "mfu": round(mfu, 1) if mfu else None, **peak_memory(world, was_reset)}


def micro_step_rows(args, world, dtype, raw_model, optimizers, base):
    """One B x T forward and backward, clipping and the optimizer step: what a micro-batch costs, for each
    --compile and loss computation."""
    x, y = (t.to(world.device) for t in SyntheticLoader(args.B, args.T, args.vocab_size).next_batch())
    rows = []
    for use_compile in args.compile:
        for forward_name, kind, forward in losses_to_time(raw_model, world.device_type, use_compile):
            forward = compile_fresh(forward) if use_compile else forward

            def step(forward=forward):
                with common.autocast(world.device_type, dtype):
                    loss = forward(x, y)[1]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
                for optimizer in optimizers:
                    optimizer.step()
                raw_model.zero_grad(set_to_none=True)

            row = {"section": "train", "step": "one micro-step + optimizer", **base, "compile": use_compile,
                   "forward": forward_name, "loss": kind}
            rows.append(guarded(row, "tokens_per_s", lambda step=step: measure_step(
                step, args.B * args.T, raw_model, args, world)))
    return rows


def count_text(n):
    """2**19 rather than 524,288 where n is a power of two: how batch sizes are chosen and spoken of."""
    return f"2**{n.bit_length() - 1}" if n & (n - 1) == 0 else f"{n:,}"


def real_step_rows(args, world, dtype, raw_model, optimizers, base):
    """train_gpt2.train_step itself, as the training loop calls it: one optimizer update over --total_batch_size
    tokens, grad_accum_steps micro-batches drawn from a loader and copied to the device, the loss averaged, the
    gradient clipped, the LR set from the schedule. tokens/s = total_batch_size / the step's time."""
    B, T = args.B, args.T
    grad_accum_steps = args.total_batch_size // (B * T)
    cfg = train_gpt2.TrainConfig(recipe=base["recipe"], total_batch_size=args.total_batch_size, micro_batch_size=B,
                                 seq_len=T)
    cfg.lr_horizon = cfg.max_steps  # as a fresh run's (bookkeeping.settle)
    loader = SyntheticLoader(B, T, args.vocab_size)
    label = (f"real step: train_gpt2.train_step, {grad_accum_steps} micro-steps of {B}x{T} = "
             f"{count_text(args.total_batch_size)} tokens")
    rows = []
    for use_compile in args.real_compile:
        model = compile_fresh(raw_model) if use_compile else raw_model  # train_gpt2.py compiles the module

        def step(model=model):
            # step = the end of warmup: the peak learning rate, as for most of a run (the step number only sets the LR)
            train_gpt2.train_step(model, optimizers, loader, cfg.warmup_steps, grad_accum_steps, cfg, world, dtype)

        row = {"section": "train", "step": label, **base, "compile": use_compile, "forward": "model(x, y)",
               "loss": loss_kind(world.device_type, use_compile)}
        rows.append(guarded(row, "tokens_per_s", lambda step=step: measure_step(
            step, args.total_batch_size, raw_model, args, world)))
    return rows


# -----------------------------------------------------------------------------
# Loader

def anonymous_memory_mb():
    """Resident anonymous memory (heap, not file-backed pages such as memory maps): Linux only."""
    try:
        with open("/proc/self/status") as f:
            line = next(s for s in f if s.startswith("RssAnon"))
    except OSError:
        return float("nan")
    return int(line.split()[1]) / 1024


def bench_loader(args):
    with tempfile.TemporaryDirectory() as directory:
        for i in range(3):  # a small val shard and two train shards of --shard_tokens each
            n = 1_000_000 if i == 0 else args.shard_tokens
            np.save(Path(directory) / f"bench_{'val' if i == 0 else 'train'}_{i:06d}.npy",
                    np.random.default_rng(i).integers(0, common.GPT2_VOCAB, n, dtype=np.uint16))
        loader = train_gpt2.ShardedLoader(directory, 64, 1024, "train")
        loader.next_batch()
        start, peak = anonymous_memory_mb(), 0.0
        batches = loader.epoch_windows // 64
        t0 = time.perf_counter()
        for i in range(batches):
            loader.next_batch()
            if i % 100 == 0:
                peak = max(peak, anonymous_memory_mb() - start)
        seconds = time.perf_counter() - t0
    row = {"section": "loader", "tokens_read": batches * 64 * 1024, "batches_per_s": round(batches / seconds),
           "anon_mb_growth": round(peak, 1)}
    print(row)
    return [row]


# -----------------------------------------------------------------------------
# HellaSwag

def moliere_paragraphs():
    path = bookkeeping.resolve_path("input/moliere.txt")
    if not path.exists():
        common.download_moliere(path)
    return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def synthetic_examples(n):
    """HellaSwag-shaped examples cut from Moliere (contexts of 20-60 tokens, endings of 10-30), for offline use."""
    words = " ".join(moliere_paragraphs()).split()
    rng = np.random.default_rng(0)

    def phrase(lo, hi):
        start = int(rng.integers(0, len(words) - hi))
        return " ".join(words[start:start + int(rng.integers(lo, hi))])

    return [{"ctx": phrase(15, 45), "endings": [phrase(7, 22) for _ in range(4)], "label": int(rng.integers(4))}
            for _ in range(n)]


@torch.no_grad()
def one_example_per_forward(model, rendered, device):
    """build-nanogpt's loop: the 4 rows of one example per forward pass, full logits, masked losses."""
    correct = 0
    for _, tokens, mask, label in rendered:
        tokens, mask = tokens.to(device), mask.to(device)
        logits = model(tokens).logits  # (4, L, vocab)
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
        losses = losses.view(4, -1) * mask[:, 1:]
        correct += int((losses.sum(1) / mask[:, 1:].sum(1)).argmin() == label)
    return correct


def bench_hellaswag(args, world, dtype):
    """`python hellaswag.py -m HF_DIR` on a GPT-2 saved by transformers (random weights of the --n_layer/--n_embd
    shape): hellaswag.load_model puts it into our GPT (packed rows), against transformers' own model scoring one
    example per forward and 4 rows per example. All three must agree on acc_norm."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import hellaswag

    real = hellaswag.DATA_DIR / "hellaswag_val.jsonl"
    examples = list(hellaswag.iterate_examples("val"))[:args.examples] if real.exists() else \
        synthetic_examples(args.examples)
    rendered = [hellaswag.render_example(e) for e in examples]
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=1024, vocab_size=common.GPT2_VOCAB, n_layer=args.n_layer,
                                    n_head=args.n_head, n_embd=args.n_embd))
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        cli_model = hellaswag.load_model(directory)  # what `hellaswag.py -m DIR` scores with
    assert hasattr(cli_model, "hidden_states"), "a GPT-2 directory should load into our GPT"
    hf, cli_model = hf.to(world.device).eval(), cli_model.to(world.device).eval()

    def baseline():
        with common.autocast(world.device_type, dtype):
            return one_example_per_forward(hf, rendered, world.device)

    methods = {"transformers, one example per forward": baseline,
               "transformers, 4 rows per example (hellaswag.evaluate)":
                   lambda: hellaswag.evaluate(hf, rendered, world.device, dtype=dtype)["correct_norm"],
               "hellaswag.py -m HF_DIR: our GPT, packed rows":
                   lambda: hellaswag.evaluate(cli_model, rendered, world.device, dtype=dtype)["correct_norm"]}
    rows = []
    for method, score in methods.items():
        def measure(score=score):
            score()  # warm-up: first-call allocations, kernel selection
            world.synchronize()
            t0 = time.perf_counter()
            correct = score()
            world.synchronize()
            seconds = time.perf_counter() - t0
            return {"examples_per_s": round(len(rendered) / seconds, 2), "seconds": round(seconds, 1),
                    "correct_norm": correct}

        row = guarded({"section": "hellaswag", "method": method, "examples": len(rendered), "dtype": dtype,
                       "data": "val" if real.exists() else "synthetic",
                       "params_M": round(sum(p.numel() for p in hf.parameters()) / 1e6, 1)}, "examples_per_s", measure)
        rows.append(row)
        base = rows[0]["examples_per_s"]  # the one-example loop
        if isinstance(base, float) and isinstance(row["examples_per_s"], float):
            row["speedup"] = round(row["examples_per_s"] / base, 2)
    counts = [row.get("correct_norm") for row in rows]
    if methods_disagree(counts, dtype, len(rendered)):
        print("warning: the methods disagree on acc_norm:", counts)
    return rows


def methods_disagree(counts, dtype, examples):
    """Random weights score the four endings almost alike, so in bf16 rounding alone flips an example now and then
    (seen on an H200: 60, 60 and 61 of 200): allow 1% there. float32 must agree exactly. None: a row that failed."""
    counts = [c for c in counts if c is not None]
    allowed = 0 if dtype == "float32" else examples // 100
    return bool(counts) and max(counts) - min(counts) > allowed


# -----------------------------------------------------------------------------
# CORE

def synthetic_bundle(directory, rows):
    """An eval bundle in the published format cut from Moliere, for offline use: a 3-shot multiple-choice task
    (4 choices), a 1-shot schema task and a 1-shot language-modeling task, `rows` rows each."""
    words = " ".join(moliere_paragraphs()).split()
    rng = np.random.default_rng(0)

    def phrase(lo, hi):
        start = int(rng.integers(0, len(words) - hi))
        return " ".join(words[start:start + int(rng.integers(lo, hi))])

    made = {"mc": ("multiple_choice", 3, lambda: {"query": phrase(20, 60), "choices": [phrase(2, 8) for _ in "abcd"],
                                                   "gold": int(rng.integers(4))}),
            "schema": ("schema", 1, lambda: {"context_options": [phrase(10, 30) for _ in "ab"],
                                              "continuation": phrase(5, 15), "gold": int(rng.integers(2))}),
            "lm": ("language_modeling", 1, lambda: {"context": phrase(20, 60), "continuation": phrase(1, 3)})}
    (directory / "eval_data").mkdir(parents=True)
    yaml = ["icl_tasks:"]
    for label, (kind, shots, row) in made.items():
        (directory / "eval_data" / f"{label}.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(rows)))
        yaml.append(f"- {{label: {label}, dataset_uri: {label}.jsonl, num_fewshot: [{shots}], icl_task_type: {kind}}}")
    (directory / "core.yaml").write_text("\n".join(yaml) + "\n")
    (directory / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,25\nschema,50\nlm,0\n")
    return directory


@torch.no_grad()
def one_sequence_per_forward(model, tasks, items, device):
    """nanochat's loop: each option alone through the model, logits at every position, mean loss over its span (the
    argmax of every span token for language modeling); [(correct, n)] per task, as core.evaluate counts."""
    import core

    counts, block_size = [[0, 0] for _ in tasks], core.hellaswag.block_size_of(model)
    for item in items:
        means, all_right = [], True
        for span in item.spans:
            tokens, start, end = core.cropped(span, block_size)
            idx = torch.tensor([tokens], device=device)
            logits = model.lm_head(model.hidden_states(idx))[0, start - 1:end - 1].float()
            means.append(F.cross_entropy(logits, idx[0, start:end]).item())
            all_right = all_right and bool((logits.argmax(-1) == idx[0, start:end]).all())
        counts[item.task][0] += all_right if item.gold is None else means.index(min(means)) == item.gold
        counts[item.task][1] += 1
    return counts


def bench_core(args, world, dtype):
    """core.py's scorer on a GPT-2 saved by transformers (random weights of the --n_layer/--n_embd shape) and loaded
    as `core.py -m HF_DIR` loads it, against one sequence per forward: the downloaded bundle if there, else a
    synthetic one of the same format."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import core
    import hellaswag

    with tempfile.TemporaryDirectory() as directory:
        bundle = core.BUNDLE_DIR if (core.BUNDLE_DIR / "core.yaml").is_file() else \
            synthetic_bundle(Path(directory) / "bundle", args.core_rows)
        tasks = core.load_tasks(bundle, args.core_rows)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_positions=1024, vocab_size=common.GPT2_VOCAB, n_layer=args.n_layer,
                                   n_head=args.n_head, n_embd=args.n_embd)).save_pretrained(Path(directory) / "hf")
        model = hellaswag.load_model(str(Path(directory) / "hf")).to(world.device).eval()
    items = core.render(tasks)
    methods = {"core.py: options of 8 items per forward": lambda: core.evaluate(model, tasks, items, world.device,
                                                                                 dtype, batch_size=8),
               "one sequence per forward, full logits": lambda: one_sequence_per_forward(model, tasks, items,
                                                                                          world.device)}
    rows = []
    for method, score in methods.items():
        def measure(score=score):
            world.synchronize()
            t0 = time.perf_counter()
            with common.autocast(world.device_type, dtype):
                counts = score()
            world.synchronize()
            seconds = time.perf_counter() - t0
            return {"items_per_s": round(len(items) / seconds, 2), "seconds": round(seconds, 1),
                    "correct": [c for c, _ in counts]}

        rows.append(guarded({"section": "core", "method": method, "items": len(items), "dtype": dtype,
                             "data": "eval_bundle" if bundle == core.BUNDLE_DIR else "synthetic"},
                            "items_per_s", measure))
    if isinstance(rows[0]["items_per_s"], float) and isinstance(rows[1]["items_per_s"], float):
        rows[0]["speedup"] = round(rows[0]["items_per_s"] / rows[1]["items_per_s"], 2)
    if rows[0].get("correct") != rows[1].get("correct"):
        print("warning: the two methods disagree on the accuracies:", rows[0].get("correct"), rows[1].get("correct"))
    return rows


# -----------------------------------------------------------------------------
# Sampling

def bench_sample(args, world, dtype):
    """tokens/s (all rows) of GPT.generate as `--sample` runs it (temperature 1, top-k 50, --num_samples rows of one
    prompt of random ids), with its KV cache and with use_cache=False (the same tokens: the whole window again for
    every token); of GPT.generate as it was before the cache; and of transformers' generate() on the export of the
    same model (its own KV cache, sampling with the same top-k and rows, not stopping at <|endoftext|>). Past
    block_size (-T) our window slides; transformers' NanoChat attends to every token instead, and its GPT-2 has no
    position there (a row says so). Medians of --sample_repeats runs after a warm-up of 2 tokens."""
    config = GPTConfig(block_size=args.T, vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    P, rows = args.prompt_tokens, args.num_samples
    prompt = torch.randint(0, common.GPT2_VOCAB, (1, P), generator=torch.Generator().manual_seed(0)).to(world.device)
    base = {"section": "sample", "dtype": dtype, "shape": f"{args.n_layer}x{args.n_embd} block_size={args.T}",
            "prompt_tokens": P, "rows": rows}
    results = []
    for recipe in args.recipe:
        torch.manual_seed(0)
        model = train_gpt2.RECIPES[recipe](config).to(world.device).eval()
        measured = []
        for method, n, generate in sampling_methods(model, prompt, args, world):
            row = {**base, "recipe": recipe, "method": method, "new_tokens": n}
            if method.startswith("transformers") and recipe == "gpt2" and P + n > args.T:
                measured.append({**row, "tokens_per_s": None, "error": f"GPT2LMHeadModel has {args.T} positions "
                                 f"(n_positions = block_size), fewer than {P} + {n}"})
                print(measured[-1])
                continue
            measured.append(guarded(row, "tokens_per_s", lambda n=n, generate=generate: time_generation(
                generate, n, rows, P, args.sample_repeats, world, dtype)))
        speed = [row.get("tokens_per_s") for row in measured]
        for i, key in ((1, "x_uncached"), (2, "x_before"), (3, "x_transformers")):
            if isinstance(speed[0], float) and isinstance(speed[i], float):
                measured[0][key] = round(speed[0] / speed[i], 2)
        results += measured
    return results


def sampling_methods(model, prompt, args, world):
    """[(method, new tokens, generate(n) -> (rows, P + n) ids)]: ours with and without the cache, as before it, and
    transformers' on the export of the same model."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        hf = AutoModelForCausalLM.from_pretrained(directory).to(world.device).eval()
    rows, idx = args.num_samples, prompt.expand(args.num_samples, -1)

    def seeded():
        return torch.Generator(world.device).manual_seed(0)

    def theirs(n):
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=True,
                           top_k=50, temperature=1.0, num_return_sequences=rows, eos_token_id=None)

    uncached_n = args.uncached_new_tokens or args.new_tokens
    return [("GPT.generate, KV cache", args.new_tokens, lambda n: model.generate(idx, n, generator=seeded())),
            ("GPT.generate(use_cache=False)", uncached_n,
             lambda n: model.generate(idx, n, generator=seeded(), use_cache=False)),
            ("before the cache: the last block_size tokens again per token", uncached_n,
             lambda n: generate_before_the_cache(model, idx, n, 50, seeded())),
            ("transformers generate(), its KV cache", args.new_tokens, theirs)]


@torch.no_grad()
def generate_before_the_cache(model, idx, max_new_tokens, top_k, generator):
    """GPT.generate as it was before the KV cache (issue 34), for comparison: the last block_size tokens through the
    model again for every token, top-k by masking the other logits, a draw over the whole vocabulary."""
    for _ in range(max_new_tokens):
        logits = model.lm_head(model.hidden_states(idx[:, -model.config.block_size:])[:, -1, :])
        logits = logits[:, :common.GPT2_VOCAB].float()
        top_logits, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < top_logits[:, [-1]]] = -float("inf")
        idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)), dim=1)
    return idx


def time_generation(generate, n, rows, prompt_tokens, repeats, world, dtype):
    """{tokens_per_s, seconds}: the median of `repeats` timed generate(n) calls, rows * n tokens each."""
    with common.autocast(world.device_type, dtype):
        generate(2)  # warm-up: the first call's allocations and kernel choices
        seconds = []
        for _ in range(repeats):
            world.synchronize()
            t0 = time.perf_counter()
            out = generate(n)
            world.synchronize()
            seconds.append(time.perf_counter() - t0)
    assert out.shape == (rows, prompt_tokens + n), out.shape  # all n tokens, none cut short
    s = statistics.median(seconds)
    return {"tokens_per_s": round(rows * n / s, 1), "seconds": round(s, 2)}


# -----------------------------------------------------------------------------
# Tokenization

def bench_tokenize(args):
    """fineweb.py on ~args.tokenize_mb MB of jsonl made from Moliere's paragraphs (French; English is ~10% faster)."""
    import fineweb

    paragraphs = moliere_paragraphs()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "docs.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            while f.tell() < args.tokenize_mb * 2**20:  # documents of ~35 paragraphs (~5 KB), like web pages
                doc = "\n\n".join(paragraphs[i] for i in rng.integers(0, len(paragraphs), 35))
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        result = fineweb.benchmark([str(path)], workers=args.workers)
    row = {"section": "tokenize", **result}
    print(row)
    return [row]


# -----------------------------------------------------------------------------
# Memory modes

def bench_memory(args, world, dtype):
    """Per-rank state under DDP and FSDP, then a micro-step's peak memory and time with and without activation
    checkpointing (fresh processes for each row, so that one row's peak is not another's)."""
    rows = []
    for mode in ("ddp", "fsdp"):
        rows.append(guarded({"section": "memory", "what": "parameters + gradients + optimizer state per rank",
                             "mode": mode, "ranks": args.ranks, "shape": f"{args.n_layer}x{args.n_embd}"},
                            "state_mb_per_rank", lambda mode=mode: state_per_rank(args, world, mode)))
    for checkpointed in [False, True] * args.memory_repeats:  # alternated: load from other work affects both alike
        row = {"section": "memory", "what": "one micro-step", "activation_checkpointing": checkpointed,
               "shape": f"{args.n_layer}x{args.n_embd} B={args.B} T={args.T}", "dtype": dtype}
        rows.append(guarded(row, "peak_mb", lambda checkpointed=checkpointed: {
            **in_fresh_process(micro_step, vars(args), world.device, dtype, checkpointed, "time"),
            **in_fresh_process(micro_step, vars(args), world.device, dtype, checkpointed, "memory")}))
    return rows


def in_fresh_process(fn, *args):
    """fn(*args) in a new Python process (spawned), whose peak memory is its own. For a CPU's "memory" figures glibc
    returns every freed block of 64 KB or more to the system at once, so that RSS follows the live tensors; not for
    the "time" figures, as that makes each large tensor's pages fault in anew, which a run does not pay as much."""
    import multiprocessing

    os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    if args[-1] == "memory":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the new process starts
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, args)
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)


def state_per_rank(args, world, mode):
    """Rank 0's bytes of parameters, gradients and optimizer state after one update of a fresh GPT (gpt2 recipe,
    AdamW) under DDP or FSDP on args.ranks processes started here."""
    import socket

    import torch.multiprocessing

    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        result = Path(directory) / "rank0.json"
        torch.multiprocessing.spawn(state_worker, (args.ranks, port, mode, vars(args), world.device_type,
                                                   str(result)), nprocs=args.ranks)
        return json.loads(result.read_text())


def state_worker(rank, ranks, port, mode, args, device_type, result):
    import memory

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks))
    world = train_gpt2.setup_distributed(device_type)
    torch.manual_seed(0)
    raw_model = train_gpt2.GPT(GPTConfig(block_size=args["T"], vocab_size=args["vocab_size"],
                                         n_layer=args["n_layer"], n_head=args["n_head"],
                                         n_embd=args["n_embd"])).to(world.device)
    if mode == "fsdp":
        model = memory.shard(raw_model, world, "float32", use_compile=False)
    else:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[world.local_rank] if device_type == "cuda" else None, gradient_as_bucket_view=True)
    optimizers = raw_model.configure_optimizers(0.1, 6e-4, device_type)
    x = torch.zeros((1, min(64, args["T"])), dtype=torch.long, device=world.device)  # the state does not depend on it
    _, loss = model(x, x.clone())
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 -- this rank's shard of a DTensor
    size = lambda tensors: sum(local(t).numel() * local(t).element_size() for t in tensors)  # noqa: E731
    parameters = list(raw_model.parameters())
    figures = {"parameters": size(parameters), "gradients": size(p.grad for p in parameters),
               "optimizer_state": size(t for o in optimizers for s in o.state.values() for t in s.values())}
    if world.is_master:
        Path(result).write_text(json.dumps({"state_mb_per_rank": round(sum(figures.values()) / 2**20, 1),
                                            **{f"{k}_mb": round(v / 2**20, 1) for k, v in figures.items()},
                                            "parameters_counted": sum(p.numel() for p in parameters)}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def micro_step(args, device, dtype, checkpointed, measure):
    """The peak memory of one forward and backward above what was held before it, or its time (measure: "memory" or
    "time"), the median of args.steps. The gradients exist already (a first micro-step), as from the second on."""
    import memory

    args = argparse.Namespace(**args)
    world = train_gpt2.setup_distributed(device)
    torch.manual_seed(0)
    raw_model = train_gpt2.GPT(GPTConfig(block_size=args.T, vocab_size=args.vocab_size, n_layer=args.n_layer,
                                         n_head=args.n_head, n_embd=args.n_embd)).to(world.device)
    if checkpointed:
        memory.checkpoint_blocks(raw_model)
    x, y = (t.to(world.device) for t in SyntheticLoader(args.B, args.T, args.vocab_size).next_batch())

    def step():
        with common.autocast(world.device_type, dtype):
            loss = raw_model(x, y)[1]
        loss.backward()  # into the gradients of the first step: no new gradient memory

    step()
    times, cpu_times, peaks = [], [], []
    for _ in range(args.steps):
        world.synchronize()
        before = held_memory(world)
        was_reset = reset_peak_memory(world)
        t0, cpu0 = time.perf_counter(), time.process_time()
        step()
        world.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - cpu0)
        peaks.append(peak_held_memory(world, was_reset) - before)
    if measure == "time":  # (and this process's CPU seconds, all its threads: steadier on a shared CPU)
        return {"step_s": float(f"{statistics.median(times):.4g}"),
                "cpu_s": float(f"{statistics.median(cpu_times):.4g}")}
    per_token = statistics.median(peaks) / (args.B * args.T * args.n_layer * args.n_embd)
    return {"peak_mb": round(statistics.median(peaks) / 2**20), "bytes_per_token_layer_channel": round(per_token, 2),
            "memory_figure": "CUDA allocator" if world.device_type == "cuda" else "peak RSS rise (VmHWM)"}


def held_memory(world):
    """Bytes held now: CUDA's allocated tensors, or this process's resident set (Linux)."""
    if world.device_type == "cuda":
        return torch.cuda.memory_allocated(world.device)
    return proc_status_kb("VmRSS") * 1024


def peak_held_memory(world, was_reset):
    if world.device_type == "cuda":
        return torch.cuda.max_memory_allocated(world.device)
    if not was_reset:
        raise common.UserError("the memory section needs Linux's /proc/self/clear_refs to measure a CPU's peak")
    return proc_status_kb("VmHWM") * 1024


def proc_status_kb(field):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


# -----------------------------------------------------------------------------

SECTIONS = {"train": bench_train, "loader": lambda a, w, t: bench_loader(a),
            "hellaswag": bench_hellaswag, "core": bench_core, "tokenize": lambda a, w, t: bench_tokenize(a),
            "memory": bench_memory, "sample": bench_sample}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument("--compile", choices=("both", "true", "false"),
                        help="train (default: both for the micro-step rows; the real step as train_gpt2.py's "
                        "--compile auto: compiled on CUDA only)")
    parser.add_argument("--recipe", nargs="+", default=["gpt2", "modern"], choices=("gpt2", "modern"),
                        help="train: the recipes to time")
    parser.add_argument("--step_kind", default="both", choices=("micro", "real", "both"),
                        help="train: rows of one micro-step + optimizer, of the real step (train_gpt2.train_step "
                        "over --total_batch_size tokens), or both (default)")
    parser.add_argument("--attention", nargs="+", default=["default"], choices=list(ATTENTION),
                        help="train: time the rows under each of these scaled_dot_product_attention backends "
                        "(torch.nn.attention.sdpa_kernel; default: torch's own choice)")
    parser.add_argument("--n_layer", type=int, help="(default: 12 on CUDA, 4 elsewhere)")
    parser.add_argument("--n_head", type=int, help="(default: 12 on CUDA, 4 elsewhere)")
    parser.add_argument("--n_embd", type=int, help="(default: 768 on CUDA, 256 elsewhere)")
    parser.add_argument("--vocab_size", type=int, default=50304, help="train: vocabulary (default: 50304, GPT-2's "
                        "50257 padded to a multiple of 64, as train_gpt2.py trains from scratch)")
    parser.add_argument("-B", type=int, help="micro-batch (default: 64 on CUDA, 8 elsewhere)")
    parser.add_argument("-T", type=int, help="sequence length (default: 1024 on CUDA, 256 elsewhere)")
    parser.add_argument("--total_batch_size", type=int, help="train: tokens per real step, a multiple of B*T "
                        "(default: 2**19 = 524,288 on CUDA, as train_gpt2.py; 4 micro-batches elsewhere)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="loader: tokens per train shard")
    parser.add_argument("--examples", type=int, default=200, help="hellaswag: examples (val if downloaded)")
    parser.add_argument("--core_rows", type=int, default=100, help="core: rows per task (the bundle if downloaded)")
    parser.add_argument("--tokenize_mb", type=int, default=100, help="tokenize: MB of jsonl")
    parser.add_argument("--prompt_tokens", type=int, default=500, help="sample: tokens of the prompt")
    parser.add_argument("--new_tokens", type=int, default=500, help="sample: tokens generated per row")
    parser.add_argument("--uncached_new_tokens", type=int, help="sample: tokens generated per row without the cache "
                        "(default: --new_tokens; fewer for a large model, whose uncached rows take long)")
    parser.add_argument("--num_samples", type=int, default=4, help="sample: rows (--sample's --num_samples)")
    parser.add_argument("--sample_repeats", type=int, default=3, help="sample: timed runs of each row (median)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenize: worker processes")
    parser.add_argument("--ranks", type=int, default=2, help="memory: processes for the DDP and FSDP rows")
    parser.add_argument("--memory_repeats", type=int, default=1, help="memory: rows with and without activation "
                        "checkpointing, alternated")
    parser.add_argument("--json", default="bench.json", help="write the figures here (after every section)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except common.UserError as e:
        raise SystemExit(f"bench.py: error: {e}") from None


def resolve_defaults(args, device_type):
    """Fill in the defaults that depend on the device (a GPT-2 124M step on CUDA, a small one elsewhere) and check
    the batch before any work starts."""
    gpu = device_type == "cuda"
    for name, on_gpu, elsewhere in (("n_layer", 12, 4), ("n_head", 12, 4), ("n_embd", 768, 256), ("B", 64, 8),
                                    ("T", 1024, 256)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else elsewhere)
    if args.total_batch_size is None:
        args.total_batch_size = 2**19 if gpu else 4 * args.B * args.T
    if "train" in args.only and args.step_kind != "micro" and (
            args.total_batch_size <= 0 or args.total_batch_size % (args.B * args.T)):
        raise common.UserError(f"--total_batch_size {args.total_batch_size} is not a positive multiple of B*T = "
                               f"{args.B}*{args.T} = {args.B * args.T}")
    choices = {"both": [False, True], "true": [True], "false": [False]}
    args.real_compile = choices[args.compile] if args.compile else [gpu]  # train_gpt2.py's --compile auto
    args.compile = choices[args.compile or "both"]


def run(args):
    world = train_gpt2.setup_distributed(args.device)
    resolve_defaults(args, world.device_type)
    dtype = common.resolve_dtype(args.dtype, world.device_type)
    if world.device_type == "cuda":
        torch.set_float32_matmul_precision("high")
    machine = {"device": device_name(world.device_type), "torch": str(torch.__version__), "dtype": dtype}
    print(machine)
    rows = []
    for name in args.only:
        rows += SECTIONS[name](args, world, dtype)
        # after every section: a later crash or timeout keeps what was measured
        figures = json.dumps({"machine": machine, "results": rows}, indent=1)
        common.atomic_write(args.json, lambda f, figures=figures: f.write(figures.encode()))
    print_table(machine, rows)


def print_table(machine, rows):
    print(f"\n{machine['device']} | torch {machine['torch']} | {machine['dtype']}")
    for row in rows:
        print(" | ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
