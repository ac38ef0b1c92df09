"""
HellaSwag: does our GPT-2 pick the right ending as often as OpenAI's? Download, render, batched scoring, CLI.

    python hellaswag.py -m gpt2                         # OpenAI's GPT-2 124M from the hub: acc_norm 0.2955
    python hellaswag.py -m log/model_19073.pt -d cuda   # one of our checkpoints
    python hellaswag.py -m some/hf_dir --limit 200      # a Hugging Face directory, quick look at 200 examples
    python hellaswag.py -m gpt2 --dtype bfloat16        # faster; a few examples may pick another ending

Each example is a context and 4 endings. Every ending is scored by the model's cross-entropy on the ending's
tokens given the context ("completion style", as in build-nanogpt): acc picks the ending with the lowest summed
loss, acc_norm the lowest mean loss per token. train_gpt2.py imports this file's functions to run the same
scorer during training, so this file imports nothing of train_gpt2.py (only the CLI does, to load a model).
"""

import argparse
import json
import os
import tempfile
from itertools import islice
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

import common  # importing it does no work
import huggingface

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
DATA_DIR = Path(__file__).resolve().parent / "hellaswag"  # the download cache, beside this script
GPT2_NAMES = tuple(common.GPT2_SHAPES)  # OpenAI's checkpoints on the hub

# -----------------------------------------------------------------------------
# Data: the jsonl files of the HellaSwag repository, one example per line.

def data_file_problem(path):
    """Why `path` cannot be read as a jsonl file, or None."""
    kind = common.path_kind(path)
    return None if kind == "a file" else f"{kind}, not a jsonl file" if kind else "no such file"


def download(split):
    """Path of hellaswag_{split}.jsonl in DATA_DIR, downloaded first if it is not there yet."""
    path = DATA_DIR / f"hellaswag_{split}.jsonl"
    if not path.exists():
        common.download(URL.format(split=split), path)  # all or nothing: a failure leaves no file
    return path


def example_problem(example):
    """What keeps an example from being scored, or None: it needs a context, 4 endings and a label 0-3."""
    if not isinstance(example, dict):
        return f"expected a JSON object, got {type(example).__name__}"
    if not isinstance(example.get("ctx"), str) or not example["ctx"].strip():
        return "'ctx' must be a non-empty string"
    endings = example.get("endings")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        n = len(endings) if isinstance(endings, list) else "no"
        return f"'endings' must be a list of 4 strings, got {n} endings"
    # an empty ending scores the lone space before it: one cheap token, the lowest summed loss nearly always
    if blank := [i for i, e in enumerate(endings) if not e.strip()]:
        return f"'endings' must be 4 non-empty strings, ending {blank[0]} is {endings[blank[0]]!r}"
    label = example.get("label")
    if type(label) is not int or not 0 <= label <= 3:  # type(): True is an int but not a label
        return f"'label' must be 0, 1, 2 or 3, got {label!r}"
    return None


def iterate_examples(split, data_file=None):
    """Yield the example dicts of a split (downloaded if needed), or of a local jsonl file."""
    path = Path(data_file) if data_file else download(split)
    count = 0
    try:
        problem = data_file_problem(path)  # here too for training's --hellaswag_data: a FIFO must not block it
        if problem:
            raise common.UserError(f"{path}: {problem}")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # a blank line (often the last) is not an example
                try:
                    example = json.loads(line)
                except json.JSONDecodeError as e:
                    problem = f"malformed JSON ({e.msg}, column {e.colno})"
                else:
                    problem = example_problem(example)
                if problem:
                    raise common.UserError(f"{path}, line {lineno}: {problem}")
                count += 1
                yield example
    except (OSError, UnicodeDecodeError) as e:  # unreadable, or not text at all
        raise common.UserError(f"{path}: cannot read it as a jsonl file ({e})") from None
    if count == 0:
        raise common.UserError(f"{path}: no examples in the file")


def render_example(example):
    """Example dict -> (data, tokens, mask, label), as build-nanogpt renders it.

    tokens (4, L): context + ending for each of the 4 endings, right-padded with zeros to the longest.
    mask (4, L): 1 on the ending's tokens, the only ones scored. data holds the label and the token lists.
    """
    problem = example_problem(example)
    if problem:
        raise ValueError(problem)  # a caller's bug: iterate_examples has checked every example of a file
    enc = common.get_tokenizer()
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


def block_size_of(model):
    """The longest sequence the model takes: our GPTConfig's block_size, transformers' max_position_embeddings."""
    config = model.config
    return getattr(config, "block_size", None) or getattr(config, "max_position_embeddings", None)


def check_fits(model, rendered):
    """UserError unless the model has a position for every token and an embedding for every id of the examples:
    past them, an embedding lookup fails with an IndexError deep in the forward pass."""
    config, block_size = model.config, block_size_of(model)
    longest = max((tokens.size(1) for _, tokens, _, _ in rendered), default=0)
    if block_size and longest > block_size:
        raise common.UserError(f"HellaSwag examples are up to {longest} tokens, more than the model's block_size "
                               f"{block_size}")
    top = max((int(tokens.max()) for _, tokens, _, _ in rendered), default=0)
    if top >= config.vocab_size:
        raise common.UserError(f"HellaSwag is tokenized with GPT-2's tokenizer (ids up to {top}), the model's "
                               f"vocabulary has {config.vocab_size} ids")

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
    h = model.hidden_states(tokens, pos, attn_mask).flatten(0, 1)[torch.tensor(where, device=device)]
    logits = model.lm_head(h)  # (N, vocab_size): only at the N positions that predict an ending token
    losses = F.cross_entropy(logits.float(), torch.tensor(targets, device=device), reduction="none")
    owner = torch.tensor(owner, device=device)
    sums = torch.zeros(B * 4, device=device).index_add_(0, owner, losses)
    counts = torch.zeros(B * 4, device=device).index_add_(0, owner, torch.ones_like(losses))
    slots = torch.tensor([[b * 4 + k for k in p[6]] for b, p in enumerate(packed)], device=device)  # (B, 4)
    return sums[slots], counts[slots]


def logits_at(model, tokens, rows, cols):
    """The logits (N, vocab_size) at the N positions (rows[i], cols[i]) of tokens (B, L) under causal attention: the
    vocabulary projection (n_embd x 50257, most of a small model's work) runs only there. Our GPT (hidden_states and
    its lm_head), or a transformers model: base_model is the transformer without its head (GPT-2's .transformer,
    Llama's .model), then the output embeddings and the final soft-cap of models that have one (NanoChat, Gemma 2).
    core.py scores with it too."""
    if hasattr(model, "hidden_states"):  # recognised by what it can do: this file must not import train_gpt2.py
        return model.lm_head(model.hidden_states(tokens)[rows, cols])
    h = model.base_model(tokens, use_cache=False).last_hidden_state[rows, cols]  # (N, n_embd)
    logits = model.get_output_embeddings()(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else cap * torch.tanh(logits / cap)


def score_batch(model, batch, device):
    """Rendered examples -> (summed loss, number of ending tokens), both (len(batch), 4).

    Our GPT takes one packed row per example (score_packed). A transformers model takes build-nanogpt's 4 rows
    per example, right-padded to the longest: attention is causal, so the padding never changes the positions
    before it. Either way the vocabulary projection (n_embd x 50257, most of a small model's work) runs only at
    the positions that predict an ending token.
    """
    # Our GPT is recognised by what it can do, not by its class: this file must not import train_gpt2.py (it
    # imports us), and under `python train_gpt2.py` the class would be __main__.GPT anyway.
    if hasattr(model, "hidden_states"):
        return score_packed(model, batch, device)
    L = max(tokens.size(1) for _, tokens, _, _ in batch)
    tokens = torch.cat([F.pad(t, (0, L - t.size(1))) for _, t, _, _ in batch]).to(device)  # (4B, L)
    mask = torch.cat([F.pad(m, (0, L - m.size(1))) for _, _, m, _ in batch]).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]  # position t predicts token t + 1, as in training
    rows, cols = mask[:, 1:].nonzero(as_tuple=True)  # the (row, t) pairs whose target belongs to an ending
    logits = logits_at(model, x, rows, cols)  # (N, vocab_size)
    losses = F.cross_entropy(logits.float(), y[rows, cols], reduction="none")  # in float32, (N,)
    # back to (4B, L - 1), zero off the endings, and summed per row (a plain sum: deterministic on CUDA too,
    # so equal endings get exactly equal losses and the tie goes to the first, as with argmin in build-nanogpt)
    per_token = torch.zeros(x.shape, device=device)
    per_token[rows, cols] = losses
    return per_token.sum(dim=1).view(-1, 4), mask[:, 1:].sum(dim=1).view(-1, 4)


def check_finite(losses):
    """UserError if a loss is nan or inf: a diverged model, whose argmin would pick an ending at random (the first),
    and whose score would look like a weak model's. core.py checks its losses here too."""
    if not torch.isfinite(losses).all():
        kind = "nan" if losses.isnan().any() else "inf"
        raise common.UserError(f"the model's losses are not finite ({kind}): it diverged; score an earlier "
                               f"checkpoint")


@torch.no_grad()
def evaluate(model, examples, device, batch_size=16, dtype="float32", progress=False, stop=None):
    """Score example dicts, or tuples from render_example, -> dict(n, correct, correct_norm, acc, acc_norm).

    batch_size counts examples (4 rows each). dtype: "float32" (published scores are float32 ones), "bfloat16"
    (autocast) or "auto" (common.resolve_dtype's choice for the device); training passes its run's dtype, so its
    log's score is the one the model computes in training. The counts are exact integers, for
    all_reduce across ranks. stop: a callable; when it returns True the scoring ends early (training uses it to
    save a checkpoint in time when the machine is being reclaimed) and the counts cover the examples scored.
    A nan or inf loss (a diverged model) raises a UserError instead of a score (check_finite).
    """
    rendered = [ex if isinstance(ex, tuple) else render_example(ex) for ex in examples]
    check_fits(model, rendered)
    # Batches of similar lengths waste little on padding; the metrics do not depend on the order.
    rendered.sort(key=lambda ex: ex[1].size(1))
    device_type = torch.device(device).type
    dtype = common.resolve_dtype(dtype, device_type)
    was_training = model.training
    model.eval()
    n = correct = correct_norm = 0
    try:  # (a refused model goes back to the mode it came in, as after a finished scoring)
        with tqdm(total=len(rendered), unit="ex", disable=not progress) as bar:
            for start in range(0, len(rendered), batch_size):
                if stop is not None and stop():
                    break
                batch = rendered[start:start + batch_size]
                with common.autocast(device_type, dtype):
                    sum_loss, n_tokens = score_batch(model, batch, device)
                check_finite(sum_loss)
                labels = torch.tensor([label for _, _, _, label in batch], device=sum_loss.device)
                # argmin takes the first of equal losses, as build-nanogpt's per-example argmin does
                correct += (sum_loss.argmin(dim=1) == labels).sum().item()
                correct_norm += ((sum_loss / n_tokens).argmin(dim=1) == labels).sum().item()
                n += len(batch)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return {"n": n, "correct": correct, "correct_norm": correct_norm,
            "acc": correct / max(n, 1), "acc_norm": correct_norm / max(n, 1)}

# -----------------------------------------------------------------------------
# Command line


def model_problem(name):
    kind = common.path_kind(name)
    if kind is None and name not in GPT2_NAMES:
        return f"no such file or directory, and not one of {', '.join(GPT2_NAMES)}"
    if kind not in (None, "a file", "a directory"):
        return f"{kind}, not a checkpoint file or a model directory"
    return None


def json_problem(path):
    """The result is written last: whatever would stop the write must show before the scoring, not after it."""
    path = Path(path)
    kind = common.path_kind(path)
    if kind not in (None, "a file"):
        return f"{kind}, not a file"
    if common.path_kind(path.parent) != "a directory":
        return f"{path.parent} is not an existing directory"
    # a trial write: a temp file named as common.atomic_write names its own (.NAME.XXXXXXXX.tmp, 14 bytes longer
    # than the name), so a read-only directory or a name too long shows now
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    return None


def check_paths(args, inputs=None):
    """One UserError naming every problem of -m, --data_file and --json, before the download, the model load and
    the scoring. An OSError (a name over 255 bytes, a file used as a folder, no permission) is a problem too.
    inputs: {flag: path} of what the program reads, none of which --json may overwrite or land in (default
    hellaswag.py's: -m, and --data_file or the downloaded split)."""
    checks = {"-m": (args.model, model_problem), "--data_file": (args.data_file, data_file_problem),
              "--json": (args.json, json_problem)}
    problems = []
    for flag, (path, problem_of) in checks.items():
        if path is None:
            continue
        try:
            problem = problem_of(path)
        except OSError as e:
            problem = e.strerror or str(e)
        if problem:
            problems.append(f"{flag} {path}: {problem}")
    if problems:
        raise common.UserError("; ".join(problems))
    if inputs is None:
        data = {"--data_file": args.data_file} if args.data_file else {
            "the downloaded split": DATA_DIR / f"hellaswag_{args.split}.jsonl"}
        inputs = {"-m": args.model, **data}
    common.check_outputs({"--json": args.json}, inputs)


def load_model(name):
    """One of our checkpoints (a file), a Hugging Face directory, or one of OpenAI's GPT-2s from the hub.

    What one of our recipes computes exactly (huggingface.hf_differences: GPT-2s, ours or Hugging Face's, and exports
    of the modern recipe) loads into train_gpt2's model, the same logits, for its packed rows: on a CPU 1.5x
    transformers' model with 4 rows per example, 5-6x build-nanogpt's one example per forward (bench.py). Other
    architectures (and GPT-2 variants such as Cerebras-GPT) load through transformers.
    """
    # The one import of train_gpt2 from below it, and a lazy one: train_gpt2.py imports this file (at the top it
    # would be loaded twice under `python train_gpt2.py`, with two UserError classes); the CLI is the one user.
    import train_gpt2

    if Path(name).is_file():
        try:
            return train_gpt2.GPT.from_checkpoint(name)  # its UserErrors name the file and the fault: let through
        except (LookupError, TypeError, ValueError, RuntimeError, AssertionError, ArithmeticError) as e:
            # what the loader may not foresee in a file holding something else: other keys, a bare tensor, a
            # config that GPT's own asserts refuse (n_embd % n_head), ... (KeyError and IndexError: LookupErrors)
            reason = common.first_line(e)
            raise common.UserError(f"{name} is not a checkpoint of train_gpt2.py ({reason})") from None
    # heavy: imported only when needed
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if name in GPT2_NAMES or not huggingface.hf_differences(AutoConfig.from_pretrained(name)):
            return train_gpt2.GPT.from_pretrained(name)
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)  # autocast decides the compute
    # offline, no config.json, an architecture transformers lacks; a config field of the wrong type (the hub's
    # dataclass check), a damaged model.safetensors: neither is an OSError or a ValueError
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError, SafetensorError) as e:
        reason = common.first_line(e)
        raise common.UserError(f"could not load the Hugging Face model {name} ({reason})") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description="HellaSwag accuracy of a GPT-2 (completion style).")
    parser.add_argument("-m", "--model", default="gpt2",
                        help=f"one of {', '.join(GPT2_NAMES)}, a Hugging Face directory, or our .pt checkpoint")
    parser.add_argument("-d", "--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                        help="float32 (default) reproduces published scores, all measured in float32 (GPT-2 124M: "
                             "acc_norm 0.2955), with TF32 matmuls on CUDA as there; bfloat16: autocast, faster, and "
                             "a few examples may pick another ending; auto: train_gpt2.py's --dtype auto "
                             "(bfloat16 on CUDA and on CPUs with native bf16), to reproduce a run's logged score")
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--data_file", help="a local HellaSwag jsonl instead of the downloaded split")
    parser.add_argument("--limit", type=int, help="score only the first N examples (a quick look)")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per forward pass (4 rows each)")
    parser.add_argument("--json", help="also write {n, acc, acc_norm} to this file")
    args = parser.parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1:
        parser.error("--limit and --batch_size must be at least 1")
    try:
        check_paths(args)  # everything cheap before the download and the model load
        device = common.pick_device(args.device)
        if device == "cuda":  # float32 matmuls in TF32, as the published scores were measured (build-nanogpt)
            torch.set_float32_matmul_precision("high")
        examples = [render_example(e) for e in islice(iterate_examples(args.split, args.data_file), args.limit)]
        model = load_model(args.model).to(device)
        result = evaluate(model, examples, device, args.batch_size, args.dtype, progress=True)
        print(f"{args.model} hellaswag {args.split}: n {result['n']}  acc {result['acc']:.4f}  "
              f"acc_norm {result['acc_norm']:.4f}")
        if args.json:
            summary = json.dumps({k: result[k] for k in ("n", "acc", "acc_norm")}, indent=2)
            common.atomic_write(args.json, lambda f: f.write(summary.encode()))
    except common.UserError as e:  # the one error type of all our programs: bad data, models, network
        raise SystemExit(f"hellaswag.py: error: {e}") from None
    except OSError as e:  # whatever else the OS refuses (an unreadable file, a vanished disk): one line too
        where = f"{e.filename}: " if e.filename else ""
        raise SystemExit(f"hellaswag.py: error: {where}{e.strerror or e}") from None


if __name__ == "__main__":
    main()
