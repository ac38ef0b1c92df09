"""
HellaSwag: does our GPT-2 pick the right ending as often as OpenAI's? Download, render, batched scoring, CLI.

    python hellaswag.py -m gpt2                         # OpenAI's GPT-2 124M from the hub: acc_norm 0.2955
    python hellaswag.py -m log/model_19073.pt -d cuda   # one of our checkpoints
    python hellaswag.py -m some/hf_dir --limit 200      # a Hugging Face directory, quick look at 200 examples

Each example is a context and 4 endings. Every ending is scored by the model's cross-entropy on the ending's
tokens given the context ("completion style", as in build-nanogpt): acc picks the ending with the lowest summed
loss, acc_norm the lowest mean loss per token. train_gpt2.py imports this file's functions to run the same
scorer during training.
"""

import argparse
import json
import os
import shutil
from itertools import islice
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from train_gpt2 import GPT, GPT2_SHAPES, UserError, get_tokenizer, pick_device  # importing it does no work

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
DATA_DIR = Path(__file__).resolve().parent / "hellaswag"  # the download cache, beside this script
GPT2_NAMES = tuple(GPT2_SHAPES)  # OpenAI's checkpoints on the hub: gpt2 ... gpt2-xl

# -----------------------------------------------------------------------------
# Data: the jsonl files of the HellaSwag repository, one example per line.


def download(split):
    """Path of hellaswag_{split}.jsonl in DATA_DIR, downloaded first if it is not there yet."""
    import http.client
    import urllib.request

    path = DATA_DIR / f"hellaswag_{split}.jsonl"
    if path.exists():
        return path
    url = URL.format(split=split)
    print(f"downloading {url} -> {path}")
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed when complete: an interrupted download never looks like data.
    # The pid in the name keeps two processes that download at once out of each other's way.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
            # urllib ends quietly when the connection drops early, so compare with the announced size
            expected = response.headers.get("Content-Length")
            if expected is not None and f.tell() != int(expected):
                raise OSError(f"connection closed after {f.tell()} of {expected} bytes")
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:  # HTTP errors (404, ...) are OSErrors too
        raise OSError(f"could not download {url}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def example_problem(example):
    """What keeps an example from being scored, or None: it needs a context, 4 endings and a label 0-3."""
    if not isinstance(example, dict):
        return f"expected a JSON object, got {type(example).__name__}"
    if not isinstance(example.get("ctx"), str) or not example["ctx"]:
        return "'ctx' must be a non-empty string"
    endings = example.get("endings")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        n = len(endings) if isinstance(endings, list) else "no"
        return f"'endings' must be a list of 4 strings, got {n} endings"
    label = example.get("label")
    if type(label) is not int or not 0 <= label <= 3:  # type(): True is an int but not a label
        return f"'label' must be 0, 1, 2 or 3, got {label!r}"
    return None


def iterate_examples(split, data_file=None):
    """Yield the example dicts of a split (downloaded if needed), or of a local jsonl file."""
    path = Path(data_file) if data_file else download(split)
    count = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # a blank line (often the last) is not an example
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            problem = example_problem(example)
            if problem:
                raise ValueError(f"{path}, line {lineno}: {problem}")
            count += 1
            yield example
    if count == 0:
        raise ValueError(f"{path}: no examples in the file")


def render_example(example):
    """Example dict -> (data, tokens, mask, label), as build-nanogpt renders it.

    tokens (4, L): context + ending for each of the 4 endings, right-padded with zeros to the longest.
    mask (4, L): 1 on the ending's tokens, the only ones scored. data holds the label and the token lists.
    """
    problem = example_problem(example)
    if problem:
        raise ValueError(problem)
    enc = get_tokenizer()
    ctx_tokens = enc.encode_ordinary(example["ctx"])
    # the space belongs to the ending: GPT-2's tokens start with their leading space (" the")
    ending_tokens = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    L = len(ctx_tokens) + max(len(e) for e in ending_tokens)
    tokens = torch.zeros((4, L), dtype=torch.long)
    mask = torch.zeros((4, L), dtype=torch.long)
    for i, end in enumerate(ending_tokens):
        row = ctx_tokens + end
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(ctx_tokens):len(row)] = 1
    data = {"label": example["label"], "ctx_tokens": ctx_tokens, "ending_tokens": ending_tokens}
    return data, tokens, mask, example["label"]

# -----------------------------------------------------------------------------
# Scoring: many examples per forward pass, and the vocabulary projection only where a loss is needed.


def pack_example(data):
    """One row per example for our GPT: the context once, then each distinct ending, with positions and segment
    ids such that every ending sees the context and itself only. The 4 padded rows of build-nanogpt's layout
    repeat the context 4 times; here it is computed once (the context is most of an example's tokens).

    Returns tokens, pos, seg (0 = context, k = k-th distinct ending), and for every scored token: the row index
    of the position that predicts it, its id, and the distinct ending it belongs to; plus, for each of the 4
    endings, which distinct ending it is (equal endings are scored once: their tie is exact).
    """
    ctx, endings = data["ctx_tokens"], data["ending_tokens"]
    distinct = list(dict.fromkeys(map(tuple, endings)))
    tokens, pos, seg = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    where, targets, owner = [], [], []
    for k, ending in enumerate(distinct):
        start = len(tokens)
        tokens += ending
        pos += range(len(ctx), len(ctx) + len(ending))
        seg += [k + 1] * len(ending)
        for j, token in enumerate(ending):
            predictor = start + j - 1 if j > 0 else len(ctx) - 1  # the first token follows the context's last
            if predictor >= 0:
                where.append(predictor)
                targets.append(token)
                owner.append(k)
    slot = [distinct.index(tuple(ending)) for ending in endings]
    return tokens, pos, seg, where, targets, owner, slot


def score_packed(model, batch, device):
    """score_batch for our GPT: one packed row per example (pack_example), right-padded to the longest."""
    packed = [pack_example(data) for data, _, _, _ in batch]
    L = max(len(p[0]) for p in packed)
    B = len(batch)
    tokens = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    seg = -1 - torch.arange(L).repeat(B, 1)  # padding: a segment of its own, so no row is fully masked
    where, targets, owner = [], [], []
    for b, (t, p, s, w, y, o, _) in enumerate(packed):
        tokens[b, :len(t)], pos[b, :len(p)], seg[b, :len(s)] = torch.tensor(t), torch.tensor(p), torch.tensor(s)
        where += [b * L + i for i in w]
        targets += y
        owner += [b * 4 + k for k in o]  # at most 4 distinct endings per example
    # token q may attend to token k if k comes first (causal) and k is context or in q's own segment
    causal = torch.ones((L, L), dtype=torch.bool).tril()
    attn_mask = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))  # (B, L, L)
    tokens, pos, attn_mask = tokens.to(device), pos.to(device), attn_mask[:, None].to(device)
    device_type = torch.device(device).type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        h = model.hidden_states(tokens, pos, attn_mask).flatten(0, 1)[torch.tensor(where, device=device)]
        logits = model.lm_head(h)  # (N, vocab_size): only at the N positions that predict an ending token
    losses = F.cross_entropy(logits.float(), torch.tensor(targets, device=device), reduction="none")
    owner = torch.tensor(owner, device=device)
    sums = torch.zeros(B * 4, device=device).index_add_(0, owner, losses)
    counts = torch.zeros(B * 4, device=device).index_add_(0, owner, torch.ones_like(losses))
    slots = torch.tensor([[b * 4 + k for k in p[6]] for b, p in enumerate(packed)], device=device)  # (B, 4)
    return sums[slots], counts[slots]


def score_batch(model, batch, device):
    """Rendered examples -> (summed loss, number of ending tokens), both (len(batch), 4).

    Our GPT takes one packed row per example (score_packed). A transformers model takes build-nanogpt's 4 rows
    per example, right-padded to the longest: attention is causal, so the padding never changes the positions
    before it. Either way the lm_head (n_embd x 50257, most of a small model's work) runs only at the positions
    that predict an ending token.
    """
    if hasattr(model, "hidden_states"):  # our GPT (not isinstance: under torchrun its class is __main__.GPT)
        return score_packed(model, batch, device)
    L = max(tokens.size(1) for _, tokens, _, _ in batch)
    tokens = torch.cat([F.pad(t, (0, L - t.size(1))) for _, t, _, _ in batch]).to(device)  # (4B, L)
    mask = torch.cat([F.pad(m, (0, L - m.size(1))) for _, _, m, _ in batch]).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]  # position t predicts token t + 1, as in training
    rows, cols = mask[:, 1:].nonzero(as_tuple=True)  # the (row, t) pairs whose target belongs to an ending
    device_type = torch.device(device).type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        h = model.transformer(x, use_cache=False).last_hidden_state[rows, cols]  # (N, n_embd)
        logits = model.lm_head(h)  # (N, vocab_size)
    losses = F.cross_entropy(logits.float(), y[rows, cols], reduction="none")  # in float32, (N,)
    # back to (4B, L - 1), zero off the endings, and summed per row (a plain sum: deterministic on CUDA too,
    # so equal endings get exactly equal losses and the tie goes to the first, as with argmin in build-nanogpt)
    per_token = torch.zeros(x.shape, device=device)
    per_token[rows, cols] = losses
    return per_token.sum(dim=1).view(-1, 4), mask[:, 1:].sum(dim=1).view(-1, 4)


@torch.no_grad()
def evaluate(model, examples, device, batch_size=16, progress=False):
    """Score example dicts, or tuples from render_example, -> dict(n, correct, correct_norm, acc, acc_norm).

    batch_size counts examples (4 rows each). The counts are exact integers, for all_reduce across ranks.
    """
    rendered = [ex if isinstance(ex, tuple) else render_example(ex) for ex in examples]
    # Batches of similar lengths waste little on padding; the metrics do not depend on the order.
    rendered.sort(key=lambda ex: ex[1].size(1))
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    with tqdm(total=len(rendered), unit="ex", disable=not progress) as bar:
        for start in range(0, len(rendered), batch_size):
            batch = rendered[start:start + batch_size]
            sum_loss, n_tokens = score_batch(model, batch, device)
            labels = torch.tensor([label for _, _, _, label in batch], device=sum_loss.device)
            # argmin takes the first of equal losses, as build-nanogpt's per-example argmin does
            correct += (sum_loss.argmin(dim=1) == labels).sum().item()
            correct_norm += ((sum_loss / n_tokens).argmin(dim=1) == labels).sum().item()
            bar.update(len(batch))
    model.train(was_training)
    n = len(rendered)
    return dict(n=n, correct=correct, correct_norm=correct_norm,
                acc=correct / max(n, 1), acc_norm=correct_norm / max(n, 1))

# -----------------------------------------------------------------------------
# Command line


def load_model(name):
    """One of our checkpoints (a file), a Hugging Face directory, or one of OpenAI's GPT-2s from the hub."""
    if Path(name).is_file():
        try:
            return GPT.from_checkpoint(name)
        except UserError as e:  # not found, or not readable by torch.load
            raise ValueError(str(e)) from None
        except (KeyError, RuntimeError) as e:  # readable, but other keys or other shapes than our GPT's
            raise ValueError(f"{name} is not a checkpoint of train_gpt2.py ({e})") from None
    from transformers import GPT2LMHeadModel  # heavy: imported only when needed

    return GPT2LMHeadModel.from_pretrained(name)


def main(argv=None):
    parser = argparse.ArgumentParser(description="HellaSwag accuracy of a GPT-2 (completion style).")
    parser.add_argument("-m", "--model", default="gpt2",
                        help=f"one of {', '.join(GPT2_NAMES)}, a Hugging Face directory, or our .pt checkpoint")
    parser.add_argument("-d", "--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--data_file", help="a local HellaSwag jsonl instead of the downloaded split")
    parser.add_argument("--limit", type=int, help="score only the first N examples (a quick look)")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per forward pass (4 rows each)")
    parser.add_argument("--json", help="also write {n, acc, acc_norm} to this file")
    args = parser.parse_args(argv)
    # check everything cheap before the download and the model load
    if not (Path(args.model).exists() or args.model in GPT2_NAMES):
        parser.error(f"-m {args.model}: no such file or directory, and not one of {', '.join(GPT2_NAMES)}")
    if args.data_file and not Path(args.data_file).is_file():
        parser.error(f"--data_file {args.data_file}: no such file")
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1:
        parser.error("--limit and --batch_size must be at least 1")
    try:
        device = pick_device(args.device)
        examples = list(islice(iterate_examples(args.split, args.data_file), args.limit))
        model = load_model(args.model)
    except (OSError, ValueError, UserError) as e:  # failed downloads, bad data, unreadable models: one line
        raise SystemExit(f"hellaswag.py: error: {e}") from None
    result = evaluate(model.to(device), examples, device, args.batch_size, progress=True)
    print(f"{args.model} hellaswag {args.split}: n {result['n']}  acc {result['acc']:.4f}  "
          f"acc_norm {result['acc_norm']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: result[k] for k in ("n", "acc", "acc_norm")}, f, indent=2)


if __name__ == "__main__":
    main()
