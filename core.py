"""
CORE: where a base model stands, by the yardstick the field now uses (DCLM, Li et al. 2024, arXiv 2406.11794; the
metric of nanochat's time-to-GPT-2 leaderboard). 22 in-context tasks (ARC, HellaSwag, PIQA, Winograd, LAMBADA,
SQuAD, ...); each task's accuracy is centered by its random baseline, (acc - b) / (1 - b), and CORE is their mean.

    python core.py -m gpt2                        # OpenAI's GPT-2 124M: 0.1139 (355M 0.1849, 774M 0.2146, 1558M 0.2565)
    python core.py -m log/model_19073.pt -d cuda  # one of our checkpoints (either recipe)
    python core.py -m my-gpt --max_per_task 100   # a Hugging Face directory; a quick look at 100 rows per task
    torchrun --standalone --nproc_per_node=8 core.py -m gpt2     # the items shared by 8 GPUs

The eval bundle (core.yaml, eval_data/*.jsonl, eval_meta_data.csv) is downloaded once into eval_bundle/ beside this
file (network), or read from --bundle_dir. Every task is scored as nanochat's core_eval.py scores it, which made the
published figures: the rows shuffled with random.Random(1337) (so --max_per_task N takes the same first N), k
few-shot examples for row i drawn with random.Random(1234 + i) from the other rows, GPT-2's tokenizer with
<|endoftext|> first, the last block_size tokens of a longer sequence. Multiple choice and schema: the option whose
continuation has the lowest mean loss; language modeling: right only if every continuation token is the argmax.
"""

import argparse
import csv
import io
import json
import random
import shlex
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

import common
import hellaswag  # importing it does no work; its model loading, path checks and positions-only logits are ours too

URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_DIR = Path(__file__).resolve().parent / "eval_bundle"  # the download, beside this script
KINDS = ("multiple_choice", "schema", "language_modeling")
FIELDS = {"multiple_choice": {"query": str, "choices": list, "gold": int},  # what each kind of row holds
          "schema": {"context_options": list, "continuation": str, "gold": int},
          "language_modeling": {"context": str, "continuation": str}}


# -----------------------------------------------------------------------------
# The bundle: core.yaml lists the tasks, eval_data/ holds their rows, eval_meta_data.csv their random baselines.

@dataclass
class Task:
    label: str
    kind: str  # multiple_choice, schema or language_modeling
    shots: int  # few-shot examples before each item
    delimiter: str  # between a context and its continuation (default one space)
    baseline: float  # the accuracy of random guessing, in percent
    rows: list  # shuffled with random.Random(1337), the first --max_per_task of them


def download(directory=BUNDLE_DIR):
    """The bundle in `directory`, downloaded and unzipped first if it is not there: all or nothing (the zip is
    checked against its announced size, unpacked into a temp directory, its tasks read, and only then renamed into
    place; a failure leaves neither the zip nor a folder it made)."""
    if (directory / "core.yaml").is_file():
        return directory
    created = common.new_directories(directory.parent)
    archive = directory.parent / "eval_bundle.zip"
    unzip = f"`unzip {shlex.quote(str(archive))} -d {shlex.quote(str(directory.parent))}`"
    try:
        common.download(URL, archive)
    except common.UserError as e:
        raise common.UserError(f"{e}, then unzip it: {unzip} (or pass --bundle_dir)") from None
    try:
        with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".eval_bundle.") as tmp:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
            unpacked = Path(tmp) / "eval_bundle"
            load_tasks(unpacked)  # every task readable, before it takes the real name
            unpacked.rename(directory)
    except (zipfile.BadZipFile, OSError, common.UserError) as e:
        archive.unlink(missing_ok=True)
        common.remove_if_empty(created)
        raise common.UserError(f"{URL} did not unpack to a CORE eval bundle ({common.first_line(e)}): fetch it by "
                               f"hand with `curl -L -o eval_bundle.zip {URL}`, then {unzip}") from None
    finally:
        archive.unlink(missing_ok=True)
    return directory


def load_tasks(bundle_dir, max_per_task=None):
    """The tasks of core.yaml, in its order, each with its rows; one UserError naming the file (and line) of the first
    problem, before any model is loaded."""
    import yaml  # (a dependency of transformers, and in requirements.txt)

    bundle_dir = Path(bundle_dir)
    try:
        config = yaml.safe_load(bundle_text(bundle_dir / "core.yaml"))
        rows = csv.DictReader(io.StringIO(bundle_text(bundle_dir / "eval_meta_data.csv"), newline=""))
        baselines = {row["Eval Task"]: row["Random baseline"] for row in rows}  # each checked where its task is
    except (OSError, yaml.YAMLError, KeyError, ValueError) as e:
        raise common.UserError(f"{bundle_dir} is not a CORE eval bundle ({type(e).__name__}: {common.first_line(e)}): "
                               f"it needs core.yaml and eval_meta_data.csv (Eval Task, Random baseline)") from None
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise common.UserError(f"{bundle_dir / 'core.yaml'}: no list of icl_tasks")
    return [load_task(bundle_dir, entry, baselines, max_per_task) for entry in entries]


def bundle_text(path):
    """A file of the bundle as text, or one line naming it when it is not UTF-8 (a decoding error names no file)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise common.UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): fetch the eval bundle "
                               f"again") from None


def load_task(bundle_dir, entry, baselines, max_per_task):
    where = f"{bundle_dir / 'core.yaml'}, task {entry.get('label', '?') if isinstance(entry, dict) else '?'}"
    try:
        label, kind, uri = entry["label"], entry["icl_task_type"], entry["dataset_uri"]
        shots, delimiter = entry["num_fewshot"][0], entry.get("continuation_delimiter", " ")
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise common.UserError(f"{where}: missing or malformed {common.first_line(e)} (each task needs label, "
                               f"icl_task_type, dataset_uri and num_fewshot: [k])") from None
    if kind not in KINDS:
        raise common.UserError(f"{where}: icl_task_type {kind!r} is not one of {', '.join(KINDS)}")
    # checked here, not where they are used: a negative k fails in random.sample while the prompts are built, a
    # baseline of 100% divides by zero after all the scoring (and training loads its tasks here too)
    if type(shots) is not int or shots < 0:  # type(): True is no number of examples
        raise common.UserError(f"{where}: num_fewshot [{shots!r}] must hold a whole number of examples, 0 or more")
    if not isinstance(uri, str) or not isinstance(delimiter, str):
        raise common.UserError(f"{where}: dataset_uri and continuation_delimiter must be strings")
    if label not in baselines:
        raise common.UserError(f"{where}: no random baseline for it in eval_meta_data.csv")
    baseline = percent(baselines[label])
    if baseline is None:
        raise common.UserError(f"{bundle_dir / 'eval_meta_data.csv'}, task {label}: random baseline "
                               f"{baselines[label]!r} must be a percentage from 0 to below 100")
    rows = read_rows(bundle_dir / "eval_data" / uri, kind)
    random.Random(1337).shuffle(rows)  # in the published order, so that the first N are the same N everywhere
    rows = rows[:max_per_task] if max_per_task else rows
    if shots >= len(rows):
        raise common.UserError(f"{where}: {shots}-shot needs more than {len(rows)} rows" +
                               (": raise --max_per_task" if max_per_task else ""))
    return Task(label, kind, shots, delimiter, baseline, rows)


def percent(text):
    """A random baseline as a float in [0, 100), or None: centering divides by 100 minus it."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if 0 <= value < 100 else None  # (nan fails both comparisons)


def read_rows(path, kind):
    if common.path_kind(path) != "a file":
        raise common.UserError(f"{path} is {common.what_is(path)}, not a task's jsonl file")
    rows = []
    with open(path, "rb") as f:  # bytes, decoded line by line, so that a line that is not UTF-8 is named
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise common.UserError(f"{path}, line {lineno}: not UTF-8 text ({e.reason} at byte {e.start}); "
                                       f"fetch the eval bundle again") from None
            except json.JSONDecodeError as e:
                raise common.UserError(f"{path}, line {lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            if problem := row_problem(row, kind):
                raise common.UserError(f"{path}, line {lineno}: {problem}")
            rows.append(row)
    return rows


def row_problem(row, kind):
    """What keeps a row from being scored as `kind`, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    wrong = [k for k, t in FIELDS[kind].items() if type(row.get(k)) is not t]  # type(): True is not a gold index
    if wrong:
        return f"a {kind} row needs {', '.join(f'{k} ({FIELDS[kind][k].__name__})' for k in wrong)}"
    options = row.get("choices", row.get("context_options"))
    if options is not None and not (options and all(isinstance(o, str) for o in options)
                                    and 0 <= row["gold"] < len(options)):
        return f"gold {row['gold']} is not the index of one of {len(options)} options (strings)"
    return None


# -----------------------------------------------------------------------------
# Prompts and token spans, as nanochat's core_eval.py renders them

def prompts(task, i):
    """The texts of row i, one per option (language modeling: the prompt without, then with, its continuation).
    Few-shot examples first, each followed by a blank line and rendered like the item, with its right answer."""
    row, d = task.rows[i], task.delimiter
    others = [j for j in range(len(task.rows)) if j != i]
    shots = [task.rows[j] for j in random.Random(1234 + i).sample(others, task.shots)] if task.shots else []
    if task.kind == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{row['query']}{d}{choice}" for choice in row["choices"]]
    if task.kind == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{option}{d}{row['continuation']}" for option in row["context_options"]]
    head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    without = f"{head}{row['context'].strip()}{d}"
    # stripped, so that a trailing space of the delimiter is not a token of its own here while " word" is one
    # token in the prompt with the continuation: the prompt without is then a prefix of it in tokens too
    return [without.strip(), without + row["continuation"]]


def common_length(sequences, from_end=False):
    """How many tokens all the sequences share at their start (or end)."""
    n = 0
    for tokens in zip(*(reversed(s) if from_end else s for s in sequences)):
        if any(t != tokens[0] for t in tokens):
            break
        n += 1
    return n


def spans(task, i):
    """Row i as token sequences, one per option, with the [start, end) of the tokens each is scored on: multiple
    choice, the tokens after the options' common prefix; schema, their common suffix; language modeling, the
    continuation (one sequence)."""
    enc = common.get_tokenizer()
    sequences = [[common.EOT] + enc.encode_ordinary(text) for text in prompts(task, i)]
    if task.kind == "multiple_choice":
        start = common_length(sequences)
        return [(s, start, len(s)) for s in sequences]
    if task.kind == "schema":
        n = common_length(sequences, from_end=True)
        return [(s, len(s) - n, len(s)) for s in sequences]
    without, with_continuation = sequences
    if with_continuation[:len(without)] != without or len(with_continuation) == len(without):
        raise common.UserError(f"task {task.label}, row {i}: the prompt without its continuation does not tokenize "
                               f"as a prefix of the prompt with it")
    return [(with_continuation, len(without), len(with_continuation))]


def cropped(span, block_size):
    """A sequence longer than the model's context keeps its last block_size tokens, the span shifted with them."""
    tokens, start, end = span
    cut = max(0, len(tokens) - block_size)
    if start - cut < 1:  # the token before the span predicts its first: it must be kept
        raise common.UserError(f"a scored continuation of {end - start} tokens does not fit the model's context of "
                               f"{block_size} tokens")
    return tokens[cut:], start - cut, end - cut


@dataclass
class Item:
    task: int  # index into the task list
    spans: list  # [(tokens, start, end)], one per option
    gold: int  # the right option (language modeling: None)


def render(tasks):
    """Every row of every task as token spans: done once (training scores the same items again and again)."""
    return [Item(t, spans(task, i), task.rows[i].get("gold")) for t, task in enumerate(tasks)
            for i in range(len(task.rows))]


# -----------------------------------------------------------------------------
# Scoring: the options of several items as right-padded rows of one forward pass

def score_batch(model, items, device, block_size):
    """Items -> whether each is right. Attention is causal, so the padding after a row changes nothing before it,
    and the vocabulary projection runs only at the positions that predict a scored token."""
    rows = [cropped(span, block_size) for item in items for span in item.spans]
    L = max(len(tokens) for tokens, _, _ in rows)
    batch = torch.full((len(rows), L), common.EOT, dtype=torch.long)
    for r, (tokens, _, _) in enumerate(rows):
        batch[r, :len(tokens)] = torch.tensor(tokens)
    # position p predicts token p + 1: a span [start, end) is predicted at start - 1 .. end - 2
    which = torch.tensor([r for r, (_, s, e) in enumerate(rows) for _ in range(s, e)])
    where = torch.tensor([p for _, s, e in rows for p in range(s - 1, e - 1)])
    batch = batch.to(device)
    logits = hellaswag.logits_at(model, batch, which.to(device), where.to(device)).float()
    targets = batch[which.to(device), where.to(device) + 1]
    losses = F.cross_entropy(logits, targets, reduction="none").cpu()
    hellaswag.check_finite(losses)  # a diverged model: refused, not scored by argmin over nan
    hits = (logits.argmax(dim=-1) == targets).cpu()
    mean = torch.zeros(len(rows)).index_add_(0, which, losses) / torch.bincount(which, minlength=len(rows))
    all_hit = torch.zeros(len(rows), dtype=torch.long).index_add_(0, which, (~hits).long()) == 0
    right, r = [], 0
    for item in items:
        k = len(item.spans)
        # the lowest mean loss wins, the first of equal ones (nanochat: list.index(min))
        right.append(bool(all_hit[r]) if item.gold is None else int(mean[r:r + k].argmin()) == item.gold)
        r += k
    return right


def check_fits(model, items):
    """UserError unless the model has an embedding for every id (GPT-2's tokenizer); longer sequences are cropped."""
    top = max(t for item in items for tokens, _, _ in item.spans for t in tokens)
    if top >= model.config.vocab_size:
        raise common.UserError(f"CORE is tokenized with GPT-2's tokenizer (ids up to {top}), the model's vocabulary "
                               f"has {model.config.vocab_size} ids")


@torch.no_grad()
def evaluate(model, tasks, items, device, dtype="float32", batch_size=8, rank=0, world_size=1, stop=None,
             progress=False):
    """[(correct, n)] per task, over this rank's share of the items (items[rank::world_size]): exact integers, to be
    summed over ranks. dtype and stop as hellaswag.evaluate's: a stop request ends the scoring early."""
    mine = items[rank::world_size]
    order = sorted(range(len(mine)), key=lambda j: max(len(s[0]) for s in mine[j].spans))  # similar lengths batched
    device_type = torch.device(device).type
    dtype, block_size = common.resolve_dtype(dtype, device_type), hellaswag.block_size_of(model)
    was_training = model.training
    model.eval()
    counts = [[0, 0] for _ in tasks]
    with tqdm(total=len(mine), unit="item", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            if stop is not None and stop():
                break
            batch = [mine[j] for j in order[start:start + batch_size]]
            with common.autocast(device_type, dtype):
                right = score_batch(model, batch, device, block_size)
            for item, ok in zip(batch, right):
                counts[item.task][0] += ok
                counts[item.task][1] += 1
            bar.update(len(batch))
    model.train(was_training)
    return counts


def summarize(tasks, counts):
    """{"core": ..., "tasks": {label: {"accuracy", "centered", "n"}}} of the counts summed over ranks. Centered:
    (accuracy - baseline) / (1 - baseline), 0 for guessing and 1 for all right; CORE is the mean over the tasks."""
    results = {}
    for task, (correct, n) in zip(tasks, counts):
        accuracy, baseline = correct / max(n, 1), 0.01 * task.baseline
        results[task.label] = {"accuracy": accuracy, "centered": (accuracy - baseline) / (1 - baseline), "n": n}
    return {"core": sum(r["centered"] for r in results.values()) / len(results), "tasks": results}


# -----------------------------------------------------------------------------
# Command line

def check_paths(args):
    """-m and --json as hellaswag.py checks them, and --bundle_dir, in one line before any work; --json may be
    neither the model nor inside it or the bundle."""
    if args.bundle_dir and common.path_kind(args.bundle_dir) != "a directory":
        raise common.UserError(f"--bundle_dir {args.bundle_dir} is {common.what_is(args.bundle_dir)}, not the "
                               f"unzipped eval_bundle directory")
    bundle = {"--bundle_dir": args.bundle_dir} if args.bundle_dir else {"the downloaded eval bundle": BUNDLE_DIR}
    hellaswag.check_paths(argparse.Namespace(model=args.model, data_file=None, json=args.json),
                          inputs={"-m": args.model, **bundle})


def print_table(tasks, summary):
    print(f"{'task':<32} {'shots':>5}  {'type':<17} {'accuracy':>8} {'centered':>8}")
    for task in tasks:
        r = summary["tasks"][task.label]
        print(f"{task.label:<32} {task.shots:>5}  {task.kind:<17} {r['accuracy']:>8.4f} {r['centered']:>8.4f}")
    print(f"CORE {summary['core']:.4f} ({len(tasks)} tasks; OpenAI's GPT-2 124M: {common.GPT2_124M_CORE})")


def main(argv=None):
    parser = argparse.ArgumentParser(description="CORE (DCLM's 22 in-context tasks, centered) of a model.")
    parser.add_argument("-m", "--model", default="gpt2",
                        help=f"one of {', '.join(hellaswag.GPT2_NAMES)}, a Hugging Face directory, or our .pt")
    parser.add_argument("--bundle_dir", help="an unzipped eval_bundle/ instead of the download")
    parser.add_argument("--max_per_task", type=int, help="score only the first N rows of each task (a quick look)")
    parser.add_argument("--batch_size", type=int, default=8, help="items per forward pass (all their options)")
    parser.add_argument("--json", help='also write {"core", "tasks": {label: {accuracy, centered, n}}} to this file')
    parser.add_argument("-d", "--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                        help="float32 (default), as the published figures; bfloat16: autocast, faster")
    args = parser.parse_args(argv)
    if (args.max_per_task is not None and args.max_per_task < 1) or args.batch_size < 1:
        parser.error("--max_per_task and --batch_size must be at least 1")
    try:
        check_paths(args)
        tasks = load_tasks(args.bundle_dir or download(), args.max_per_task)
        items = render(tasks)
        summary = score(args, tasks, items)
        if summary is not None:  # rank 0
            print_table(tasks, summary)
            if args.json:
                common.atomic_write(args.json, lambda f: f.write(json.dumps(summary, indent=2).encode()))
    except (common.UserError, OSError) as e:  # OSError: whatever else the OS refuses, one line too
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        common.print0(f"core.py: error: {where}{(e.strerror or e) if isinstance(e, OSError) else e}", file=sys.stderr)
        sys.exit(1)  # (under torchrun rank 0 says it, once)


def score(args, tasks, items):
    """The summary (on rank 0; None on the others): under torchrun every rank scores its share of the items."""
    import train_gpt2  # (lazily, as hellaswag.load_model: train_gpt2 imports hellaswag, which core.py imports)

    world = train_gpt2.setup_distributed(args.device)
    if world.device_type == "cuda":  # float32 matmuls in TF32, as hellaswag.py
        torch.set_float32_matmul_precision("high")
    try:
        model = hellaswag.load_model(args.model).to(world.device)
        check_fits(model, items)
        counts = evaluate(model, tasks, items, world.device, args.dtype, args.batch_size, world.rank,
                          world.world_size, progress=world.is_master)
        counts = [[int(common.all_reduce(c, world)) for c in pair] for pair in counts]
    finally:
        if world.world_size > 1:
            torch.distributed.destroy_process_group()
    return summarize(tasks, counts) if world.is_master else None


if __name__ == "__main__":
    main()
