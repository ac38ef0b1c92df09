"""
Throughput and memory figures for this machine: a table on stdout and the same numbers in bench.json.

    python bench.py                          # every section, sized for this machine's device
    python bench.py --only train --steps 20  # one section
    python bench.py --only train --n_layer 12 --n_head 12 --n_embd 768 -B 64 -T 1024   # GPT-2 124M

Sections:
  train      tokens/s (and MFU on CUDA) of a training step on synthetic data, compile off and on, against
             the plain computation of the loss (full logits, then F.cross_entropy, as build-nanogpt does)
  loader     batches/s and anonymous memory while ShardedLoader reads through two shards
  hellaswag  examples/s of hellaswag.evaluate against one example per forward pass (build-nanogpt's loop)
  tokenize   fineweb.py's end-to-end tokens/s against tiktoken's single-core rate x the cores
Medians of repeated measurements, warm-up (and compilation) excluded.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import train_gpt2
from train_gpt2 import GPT, GPTConfig


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


# -----------------------------------------------------------------------------
# Training step

def plain_loss(model, x, y):
    """build-nanogpt's loss: the full (B, T, vocab) logits, upcast by autocast, then F.cross_entropy."""
    logits = model.lm_head(model.hidden_states(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def bench_train(args, dist, dtype):
    config = GPTConfig(block_size=args.T, vocab_size=50304, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    torch.manual_seed(0)
    raw_model = GPT(config).to(dist.device)
    optimizer = raw_model.configure_optimizers(0.1, 1e-4, dist.device_type)
    x = torch.randint(0, 50257, (args.B, args.T), device=dist.device)
    y = torch.randint(0, 50257, (args.B, args.T), device=dist.device)
    flops, peak = train_gpt2.flops_per_token(raw_model, args.T), train_gpt2.peak_flops(dist)
    rows = []
    for use_compile in args.compile:
        for loss_kind in ("ours", "plain"):
            forward = raw_model if loss_kind == "ours" else (lambda x, y: (None, plain_loss(raw_model, x, y)))
            forward = torch.compile(forward) if use_compile else forward

            def step(forward=forward):
                with train_gpt2.autocast(dist, dtype):
                    loss = forward(x, y)[1]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            step()  # the first step compiles
            first = time.perf_counter() - t0
            seconds = median_time(step, args.steps, warmup=2, sync=dist.synchronize)
            tokens_per_s = args.B * args.T / seconds
            rows.append({"section": "train", "compile": use_compile, "loss": loss_kind, "dtype": dtype,
                         "shape": f"{args.n_layer}x{args.n_embd} B={args.B} T={args.T}",
                         "tokens_per_s": round(tokens_per_s), "first_step_s": round(first, 1),
                         "mfu": round(100 * flops * tokens_per_s / peak, 1) if peak else None})
            print(rows[-1])
    return rows


# -----------------------------------------------------------------------------
# Loader

def anonymous_memory_mb():
    """Resident anonymous memory (heap, not file-backed pages such as memory maps): Linux only."""
    try:
        line = next(s for s in open("/proc/self/status") if s.startswith("RssAnon"))
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
        train_gpt2.download_moliere(path)
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
        logits = model(tokens)[0]
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        losses = losses.view(4, -1) * mask[:, 1:]
        correct += int((losses.sum(1) / mask[:, 1:].sum(1)).argmin() == label)
    return correct


def bench_hellaswag(args, dist):
    import hellaswag

    real = hellaswag.DATA_DIR / "hellaswag_val.jsonl"
    examples = list(hellaswag.iterate_examples("val"))[:args.examples] if real.exists() else \
        synthetic_examples(args.examples)
    rendered = [hellaswag.render_example(e) for e in examples]
    torch.manual_seed(0)
    config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    model = GPT(config).to(dist.device).eval()
    rows = []
    for method in ("one example per forward", "hellaswag.evaluate"):
        t0 = time.perf_counter()
        with train_gpt2.autocast(dist, "bfloat16" if dist.device_type == "cuda" else "float32"):
            if method == "hellaswag.evaluate":
                correct = hellaswag.evaluate(model, rendered, dist.device)["correct_norm"]
            else:
                correct = one_example_per_forward(model, rendered, dist.device)
        dist.synchronize()
        seconds = time.perf_counter() - t0
        rows.append({"section": "hellaswag", "method": method, "examples": len(rendered),
                     "data": "val" if real.exists() else "synthetic", "params_M": round(
                         sum(p.numel() for p in model.parameters()) / 1e6, 1),
                     "examples_per_s": round(len(rendered) / seconds, 1), "correct_norm": correct})
        print(rows[-1])
    return rows


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

SECTIONS = {"train": lambda a, d, t: bench_train(a, d, t), "loader": lambda a, d, t: bench_loader(a),
            "hellaswag": lambda a, d, t: bench_hellaswag(a, d), "tokenize": lambda a, d, t: bench_tokenize(a)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Throughput and memory figures for this machine.")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument("--compile", default="both", choices=("both", "true", "false"))
    parser.add_argument("--n_layer", type=int, help="(default: 12 on CUDA, 4 elsewhere)")
    parser.add_argument("--n_head", type=int, help="(default: 12 on CUDA, 4 elsewhere)")
    parser.add_argument("--n_embd", type=int, help="(default: 768 on CUDA, 256 elsewhere)")
    parser.add_argument("-B", type=int, help="micro-batch (default: 64 on CUDA, 8 elsewhere)")
    parser.add_argument("-T", type=int, help="sequence length (default: 1024 on CUDA, 256 elsewhere)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="loader: tokens per train shard")
    parser.add_argument("--examples", type=int, default=200, help="hellaswag: synthetic examples")
    parser.add_argument("--tokenize_mb", type=int, default=100, help="tokenize: MB of jsonl")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenize: worker processes")
    parser.add_argument("--json", default="bench.json", help="write the figures here")
    args = parser.parse_args(argv)
    dist = train_gpt2.setup_distributed(args.device)
    gpu = dist.device_type == "cuda"
    for name, on_gpu, elsewhere in (("n_layer", 12, 4), ("n_head", 12, 4), ("n_embd", 768, 256), ("B", 64, 8),
                                    ("T", 1024, 256)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else elsewhere)
    args.compile = {"both": [False, True], "true": [True], "false": [False]}[args.compile]
    dtype = train_gpt2.resolve_dtype(args.dtype, dist)
    if gpu:
        torch.set_float32_matmul_precision("high")
    machine = {"device": device_name(dist.device_type), "torch": str(torch.__version__), "dtype": dtype}
    print(machine)
    rows = [row for name in args.only for row in SECTIONS[name](args, dist, dtype)]
    print_table(machine, rows)
    with open(args.json, "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=1)


def print_table(machine, rows):
    print(f"\n{machine['device']} | torch {machine['torch']} | {machine['dtype']}")
    for row in rows:
        print(" | ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
