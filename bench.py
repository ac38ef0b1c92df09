"""
Throughput and memory figures for this machine: a table on stdout and the same numbers in bench.json.

    python bench.py                          # every section, sized for this machine's device
    python bench.py --only train --steps 20  # one section
    python bench.py --only train --n_layer 12 --n_head 12 --n_embd 768 -B 64 -T 1024   # GPT-2 124M

Sections:
  train      tokens/s, MFU (CUDA) and peak memory of a training step on synthetic data, compile off and on. On a
             CPU in eager mode the model's loss is chunked (never the full logits): timed against the plain loss
             (full logits, then F.cross_entropy, as build-nanogpt does). On GPUs and under torch.compile the model
             computes the plain loss itself, so that is what its row says.
  loader     batches/s and anonymous memory while ShardedLoader reads through two shards
  hellaswag  examples/s of `python hellaswag.py -m HF_DIR` on a GPT-2 in Hugging Face format (loaded into our
             GPT, packed rows) against transformers' model, one example per forward (build-nanogpt's loop)
  tokenize   fineweb.py's end-to-end tokens/s against tiktoken's single-core rate x the cores
Medians of repeated measurements, warm-up (and compilation) excluded. bench.json is rewritten after every
section; a row that runs out of memory is recorded as "OOM" and the others go on.
"""

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
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


def is_oom(e):
    """torch.cuda.OutOfMemoryError, or a RuntimeError saying the same (CPU allocator, MPS, older torch)."""
    text = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def guarded(row, metric, measure):
    """row + what measure() returns; a measurement that runs out of memory becomes row + {metric: "OOM"}, so the
    sections and rows after it still run (GPU memory is given back first)."""
    try:
        row = {**row, **measure()}
    except RuntimeError as e:
        if not is_oom(e):
            raise
        row = {**row, metric: "OOM"}
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

def plain_loss(model, x, y):
    """build-nanogpt's loss: the full (B, T, vocab) logits, upcast by autocast, then F.cross_entropy."""
    logits = model.lm_head(model.hidden_states(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def losses_to_time(raw_model, device_type, use_compile):
    """(forward, loss, fn) rows. model(x, y) chunks its loss (train_gpt2.VocabCrossEntropy) only on a CPU in eager
    mode; on GPUs and under torch.compile it computes the plain loss, and a plain row would time the same thing."""
    ours = [("model(x, y)", "plain" if use_compile or device_type != "cpu" else "chunked", raw_model)]
    if ours[0][1] == "plain":
        return ours
    return ours + [("lm_head + F.cross_entropy", "plain", lambda x, y: (None, plain_loss(raw_model, x, y)))]


def bench_train(args, world, dtype):
    return [row for recipe in args.recipe for row in bench_recipe(args, world, dtype, recipe)]


def bench_recipe(args, world, dtype, recipe):
    """Training-step rows of one recipe: gpt2 (AdamW) or modern (Muon + AdamW, soft-capped loss)."""
    config = GPTConfig(block_size=args.T, vocab_size=50304, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    torch.manual_seed(0)
    raw_model = train_gpt2.RECIPES[recipe](config).to(world.device)
    lrs = {"embed_lr": 0.2, "head_lr": 0.008} if recipe == "modern" else {}
    optimizers = raw_model.configure_optimizers(0.1, 1e-4, world.device_type, **lrs)  # [AdamW] or [Muon, AdamW]
    x = torch.randint(0, 50257, (args.B, args.T), device=world.device)
    y = torch.randint(0, 50257, (args.B, args.T), device=world.device)
    flops, peak = train_gpt2.flops_per_token(raw_model, args.T), train_gpt2.peak_flops(world)
    rows = []
    for use_compile in args.compile:
        for forward_name, loss_kind, forward in losses_to_time(raw_model, world.device_type, use_compile):
            forward = torch.compile(forward) if use_compile else forward

            def step(forward=forward):
                with common.autocast(world.device_type, dtype):
                    loss = forward(x, y)[1]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
                for optimizer in optimizers:
                    optimizer.step()
                raw_model.zero_grad(set_to_none=True)

            def measure(step=step):
                raw_model.zero_grad(set_to_none=True)  # nothing left over from a row that ran out of memory
                was_reset = reset_peak_memory(world)
                t0 = time.perf_counter()
                step()  # the first step compiles
                first = time.perf_counter() - t0
                seconds = median_time(step, args.steps, warmup=2, sync=world.synchronize)
                tokens_per_s = args.B * args.T / seconds
                return {"tokens_per_s": round(tokens_per_s), "first_step_s": round(first, 1),
                        "mfu": round(100 * flops * tokens_per_s / peak, 1) if peak else None,
                        **peak_memory(world, was_reset)}

            row = {"section": "train", "recipe": recipe, "compile": use_compile, "forward": forward_name,
                   "loss": loss_kind,
                   "dtype": dtype, "shape": f"{args.n_layer}x{args.n_embd} B={args.B} T={args.T}"}
            rows.append(guarded(row, "tokens_per_s", measure))
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
                    np.random.default_rng(i).integers(0, 50257, n, dtype=np.uint16))
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
    path = train_gpt2.resolve_path("input/moliere.txt")
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
    hf = GPT2LMHeadModel(GPT2Config(n_positions=1024, vocab_size=50257, n_layer=args.n_layer, n_head=args.n_head,
                                    n_embd=args.n_embd))
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

SECTIONS = {"train": bench_train, "loader": lambda a, w, t: bench_loader(a),
            "hellaswag": bench_hellaswag, "tokenize": lambda a, w, t: bench_tokenize(a)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Throughput and memory figures for this machine.")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument("--compile", default="both", choices=("both", "true", "false"))
    parser.add_argument("--recipe", nargs="+", default=["gpt2", "modern"], choices=("gpt2", "modern"),
                        help="train: the recipes to time")
    parser.add_argument("--n_layer", type=int, help="(default: 12 on CUDA, 4 elsewhere)")
    parser.add_argument("--n_head", type=int, help="(default: 12 on CUDA, 4 elsewhere)")
    parser.add_argument("--n_embd", type=int, help="(default: 768 on CUDA, 256 elsewhere)")
    parser.add_argument("-B", type=int, help="micro-batch (default: 64 on CUDA, 8 elsewhere)")
    parser.add_argument("-T", type=int, help="sequence length (default: 1024 on CUDA, 256 elsewhere)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="loader: tokens per train shard")
    parser.add_argument("--examples", type=int, default=200, help="hellaswag: examples (val if downloaded)")
    parser.add_argument("--tokenize_mb", type=int, default=100, help="tokenize: MB of jsonl")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenize: worker processes")
    parser.add_argument("--json", default="bench.json", help="write the figures here (after every section)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except common.UserError as e:
        raise SystemExit(f"bench.py: error: {e}") from None


def run(args):
    world = train_gpt2.setup_distributed(args.device)
    gpu = world.device_type == "cuda"
    for name, on_gpu, elsewhere in (("n_layer", 12, 4), ("n_head", 12, 4), ("n_embd", 768, 256), ("B", 64, 8),
                                    ("T", 1024, 256)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else elsewhere)
    args.compile = {"both": [False, True], "true": [True], "false": [False]}[args.compile]
    dtype = common.resolve_dtype(args.dtype, world.device_type)
    if gpu:
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
