"""
FineWeb-Edu -> GPT-2 token shards for train_gpt2.py (https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu).

    python fineweb.py                  # sample-10BT (~10B tokens): downloads it all (~29 GB of parquet), then tokenizes
    python fineweb.py --streaming      # tokenizes while downloading: no copy of the dataset on disk
    python fineweb.py --input a.jsonl b.parquet --text_field text --out my_shards    # local files instead
    python fineweb.py --benchmark --input a.jsonl    # our tokens/s against tiktoken's single-core rate x workers

Writes {out}/{prefix}_{split}_{index:06d}.npy: numpy uint16 arrays of exactly --shard_size tokens (the last one
may be shorter), shard 0 "val", the others "train", every document preceded by <|endoftext|>. The names and
format are build-nanogpt's, so shards from either script work with either trainer.
Interrupted (crash, Ctrl-C)? Run the same command again: finished shards are kept and it picks up from there.
"""
import argparse
import collections
import glob
import itertools
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import tiktoken
from tqdm import tqdm

SAMPLE_10BT_TOKENS = 10**10  # sample-10BT is ~10B GPT-2 tokens: the progress bar's total, for an ETA
# ~1 MB of text (~250k tokens) per worker task: big enough that sending it between processes costs little next to
# tokenizing it, small enough that every worker stays busy and little memory is in flight
BATCH_CHARS = 2**20

# -----------------------------------------------------------------------------
# tokenizer: one per process, created on first use (importing this file does no work)

_encoder = None


def encoder():
    global _encoder
    if _encoder is None:
        _encoder = tiktoken.get_encoding("gpt2")
    return _encoder


def tokenize(text):
    """One document -> its uint16 tokens, <|endoftext|> first: the token that delimits documents in a shard."""
    enc = encoder()
    tokens = np.array([enc.eot_token] + enc.encode_ordinary(text), dtype=np.uint32)
    assert tokens.max() < 2**16, "a token id does not fit in uint16, the shards' dtype"
    return tokens.astype(np.uint16)


def tokenize_batch(texts):
    """Runs in a worker: many documents per task, so sending work between processes costs little next to
    tokenizing it. Returns all their tokens in one array (cheap to send back) and each document's length."""
    tokens = [tokenize(text) for text in texts]
    return np.concatenate(tokens), np.array([len(t) for t in tokens])


def init_worker():
    # Ctrl-C reaches every process of the terminal; only the main process handles it (and stops the pool)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    encoder()

# -----------------------------------------------------------------------------
# documents: local .txt / .jsonl / .parquet files, or a Hugging Face dataset; a stream of strings in a fixed order


def fail(message):
    """Errors meant for the user: one line saying what is wrong and what to do, no traceback."""
    raise SystemExit(f"fineweb.py: error: {message}")


def read_jsonl(path, text_field):
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            if line.isspace():
                continue  # blank lines are not documents
            try:
                record = json.loads(line)
            except ValueError as e:  # not JSON, or not UTF-8
                fail(f"{path}:{line_number}: not valid JSON ({e})")
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else f"none, a {type(record).__name__}"
                fail(f"{path}:{line_number}: no field '{text_field}' (fields: {fields}); pick one with --text_field")
            yield record[text_field]


def read_parquet(path, text_field):
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        fail(f"{path}: not a readable parquet file ({e})")
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        fail(f"{path}: no column '{text_field}' (columns: {', '.join(columns)}); pick one with --text_field")
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):  # only the text is read
        yield from batch.column(0).to_pylist()


def local_documents(paths, text_field, skip):
    """The documents of the files in order, less the first `skip` (a resumed run's finished ones)."""
    def all_documents():
        for path in paths:
            try:
                if path.endswith(".txt"):
                    with open(path, encoding="utf-8") as f:
                        yield f.read()  # the whole file is one document
                elif path.endswith(".jsonl"):
                    yield from read_jsonl(path, text_field)
                else:
                    yield from read_parquet(path, text_field)
            except OSError as e:
                fail(f"cannot read {path} ({e.strerror or e})")
            except UnicodeDecodeError as e:
                fail(f"{path}: not UTF-8 text ({e})")
    return itertools.islice(all_documents(), skip, None)


def hub_documents(args, skip):
    import datasets  # slow to import, and only this path needs it
    # not streaming: the whole dataset is downloaded and converted to Arrow first (resumable, cached on disk);
    # streaming: parquet files are read over the network as we go. Both give the documents in the same order.
    try:
        ds = datasets.load_dataset(args.dataset, name=args.name, split="train", streaming=args.streaming)
    except Exception as e:  # no network, no such dataset or configuration, ...: datasets' message says which
        fail(f"cannot load {args.dataset} (--name {args.name}): {type(e).__name__}: {e}".replace("\n", " "))
    if ds.column_names is not None and args.text_field not in ds.column_names:
        fail(f"{args.dataset} has no column '{args.text_field}' (columns: {', '.join(ds.column_names)}); "
             f"pick one with --text_field")
    # skip() on a stream still reads the skipped documents (not tokenizing them is what saves the time)
    ds = ds.select_columns([args.text_field]).skip(skip)
    for batch in ds.iter(batch_size=1024):
        yield from batch[args.text_field]


def batches(documents):
    """Lists of documents holding BATCH_CHARS of text: the workers' tasks."""
    batch, size = [], 0
    for text in documents:
        if not isinstance(text, str):
            fail(f"a document's text is {type(text).__name__}, not a string; check --text_field")
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def ordered_map(pool, fn, tasks, depth):
    """pool.imap(fn, tasks) but with at most `depth` tasks in flight: imap reads its whole input as fast as it
    can, which would pull all of a 10B-token stream into memory while the workers tokenize."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()

# -----------------------------------------------------------------------------
# output: shards and manifest, each written to a temp name and then renamed, so a crash never leaves a torn file


def atomic_write(path, write):
    with open(path + ".tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it visible, even across a power cut
    os.replace(path + ".tmp", path)


def save_manifest(out, manifest):
    atomic_write(os.path.join(out, "manifest.json"), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def run_config(args):
    """What decides the shards' bytes: resuming is only allowed with the same. (Not --workers: the output does
    not depend on it; not --streaming: both modes read the same documents in the same order.)"""
    if args.input:
        source = {"input": [[os.path.abspath(p), os.path.getsize(p)] for p in args.input]}
    else:
        source = {"dataset": args.dataset, "name": args.name}
    return {**source, "text_field": args.text_field, "prefix": args.prefix, "shard_size": args.shard_size,
            "tokenizer": "gpt2"}


def load_manifest(out, config):
    """The manifest of an earlier run of this configuration in `out`, or a new one; refuses to mix runs."""
    path = os.path.join(out, "manifest.json")
    if os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
        old = manifest.get("config", {})
        changed = [f"{key} {old.get(key)!r} there, {config.get(key)!r} now"
                   for key in sorted(set(old) | set(config)) if old.get(key) != config.get(key)]
        if not changed:
            return manifest
        if manifest.get("shards"):
            fail(f"{out} holds shards of another configuration ({'; '.join(changed)}): use another --out, "
                 f"or delete {out} to start over")
    elif glob.glob(os.path.join(out, "*.npy")):
        fail(f"{out} holds .npy files but no manifest.json from fineweb.py: use another --out, or delete them")
    return {"config": config, "shards": [], "complete": False}


def finish_shard(out, manifest, tokens, next_doc, next_doc_offset):
    index = len(manifest["shards"])
    split = "val" if index == 0 else "train"  # build-nanogpt's convention: the first shard is the validation set
    name = f"{manifest['config']['prefix']}_{split}_{index:06d}.npy"
    atomic_write(os.path.join(out, name), lambda f: np.save(f, tokens))
    manifest["shards"].append({"file": name, "tokens": len(tokens),
                               "next_doc": int(next_doc), "next_doc_offset": int(next_doc_offset)})
    save_manifest(out, manifest)  # the shard counts as finished only once the manifest says so


def write_shards(results, out, manifest, bar):
    """Copies the workers' (tokens, lengths) batches, in document order, into shards of exactly shard_size tokens;
    a document that does not fit is split, its remaining tokens start the next shard.

    The resume point: each finished shard records next_doc, the index of the first document not wholly in it
    or an earlier shard, and next_doc_offset, how many of that document's tokens it already holds (0 when the
    shard ends at a document boundary). A rerun skips next_doc documents without tokenizing them and drops the
    first next_doc_offset tokens of the next one, so no document is lost or repeated.
    """
    shards = manifest["shards"]
    doc = shards[-1]["next_doc"] if shards else 0  # index of the first document of the current batch
    pos = shards[-1]["next_doc_offset"] if shards else 0  # tokens of the current batch already in a shard
    buffer = np.empty(manifest["config"]["shard_size"], dtype=np.uint16)
    filled, first_doc, start = 0, doc, time.time()
    for tokens, lengths in results:
        bar.update(len(tokens) - pos)
        ends = np.cumsum(lengths)  # where each document of the batch ends in `tokens`
        while pos < len(tokens):
            n = min(len(tokens) - pos, len(buffer) - filled)
            buffer[filled:filled + n] = tokens[pos:pos + n]
            filled, pos = filled + n, pos + n
            if filled == len(buffer):
                whole = np.searchsorted(ends, pos, side="right")  # documents of the batch now wholly written
                finish_shard(out, manifest, buffer, doc + whole, pos - (ends[whole - 1] if whole else 0))
                filled = 0
        doc, pos = doc + len(lengths), 0
        docs_per_s = (doc - first_doc) / (time.time() - start)
        bar.set_postfix(shard=len(shards), docs_per_s=f"{docs_per_s:,.0f}", refresh=False)
    if filled:
        finish_shard(out, manifest, buffer[:filled], doc, 0)  # the last shard: whatever is left

# -----------------------------------------------------------------------------


def benchmark(files, text_field="text", workers=None):
    """`python fineweb.py --input files` end to end (start-up included) against its ceiling: tiktoken's single-core
    encode_ordinary rate on the same documents, times the number of workers, with no I/O at all."""
    workers = workers or os.cpu_count()
    texts = list(local_documents(files, text_field, 0))  # also puts the files in the OS cache for the run below
    enc = tiktoken.get_encoding("gpt2")

    def single_core_rate():
        start = time.perf_counter()
        tokens = sum(len(enc.encode_ordinary(text)) + 1 for text in texts)  # + 1: each document's <|endoftext|>
        return tokens, tokens / (time.perf_counter() - start)

    tokens, rate_before = single_core_rate()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.abspath(__file__), "--input", *files, "--text_field", text_field,
                        "--out", out, "--shard_size", str(10**7), "--workers", str(workers)], check=True)
        seconds = time.perf_counter() - start
    ceiling = max(rate_before, single_core_rate()[1]) * workers  # the better of two: shared machines are noisy
    return {"tokens": tokens, "workers": workers, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds),
            "ceiling_tokens_per_s": round(ceiling), "ratio": round(tokens / seconds / ceiling, 3)}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fineweb.py", description="Tokenize a corpus into GPT-2 uint16 shards.")
    parser.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="Hugging Face dataset")
    parser.add_argument("--name", default="sample-10BT", help="its configuration (sample-10BT, sample-100BT, ...)")
    parser.add_argument("--streaming", action="store_true", help="tokenize while downloading, store no dataset")
    parser.add_argument("--input", nargs="+", metavar="FILE",
                        help="local .txt (one document per file), .jsonl or .parquet files instead of the hub")
    parser.add_argument("--text_field", default="text", help="the field (column) holding each document's text")
    parser.add_argument("--out", help="output directory (default: edu_fineweb10B beside this script)")
    parser.add_argument("--prefix", default="edufineweb", help="shard names: {prefix}_{val|train}_{index:06d}.npy")
    parser.add_argument("--shard_size", type=int, default=10**8, help="tokens per shard (10**8: 200 MB files)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    parser.add_argument("--benchmark", action="store_true", help="with --input: print our tokens/s and the ceiling")
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.workers < 1:
        parser.error("--shard_size and --workers must be at least 1")
    if args.benchmark and not args.input:
        parser.error("--benchmark needs local files: --input FILE...")
    for path in args.input or []:
        if not os.path.isfile(path):
            parser.error(f"--input {path}: no such file")
        if not path.endswith((".txt", ".jsonl", ".parquet")):
            parser.error(f"--input {path}: unknown file type; use .txt (one document), .jsonl or .parquet")
    return args


def make_shards(pool, args, out, manifest):
    shards = manifest["shards"]
    skip = shards[-1]["next_doc"] if shards else 0  # documents already in finished shards
    documents = local_documents(args.input, args.text_field, skip) if args.input else hub_documents(args, skip)
    first = next(documents, None)  # an empty input fails here, before anything is written
    if first is None and not shards:
        fail("the input holds no documents")
    documents = itertools.chain([] if first is None else [first], documents)
    os.makedirs(out, exist_ok=True)
    for path in glob.glob(os.path.join(out, f"{args.prefix}_*.npy.tmp")):
        os.remove(path)  # the half-written shard of an interrupted run
    save_manifest(out, manifest)  # before any shard, so shards in `out` always come with their manifest
    total = SAMPLE_10BT_TOKENS if not args.input and args.name == "sample-10BT" else None
    done = sum(shard["tokens"] for shard in shards)
    with tqdm(total=total, initial=done, unit="tok", unit_scale=True, desc=os.path.basename(out)) as bar:
        # 4 tasks in flight per worker: enough that none waits while the main process reads the next batch
        results = ordered_map(pool, tokenize_batch, batches(documents), depth=4 * args.workers)
        write_shards(results, out, manifest, bar)


def main(argv=None):
    args = parse_args(argv)
    if args.benchmark:
        print(json.dumps(benchmark(args.input, args.text_field, args.workers)))
        return
    # the default lands beside this script, where train_gpt2.py looks; a --out of the user's is relative to the cwd
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "edu_fineweb10B")
    manifest = load_manifest(out, run_config(args))
    shards = manifest["shards"]
    if manifest["complete"]:
        print(f"{out} is already complete: {len(shards)} shards, {manifest['tokens']:,} tokens")
        return
    try:
        encoder()  # here first: the pool would restart, forever, workers that cannot load it (say, offline)
    except Exception as e:
        fail(f"could not load GPT-2's tokenizer ({type(e).__name__}): tiktoken fetches it on first use; connect "
             f"once, or point TIKTOKEN_CACHE_DIR at a copy of its cache")
    try:
        # the pool starts before any input is opened: forking once `datasets` runs download threads is unsafe
        with mp.Pool(args.workers, initializer=init_worker) as pool:
            make_shards(pool, args, out, manifest)
    except KeyboardInterrupt:
        fail(f"interrupted with {len(shards)} shards finished; run the same command again to continue")
    manifest["complete"], manifest["tokens"] = True, sum(shard["tokens"] for shard in shards)
    manifest["documents"] = shards[-1]["next_doc"]
    save_manifest(out, manifest)
    print(f"wrote {len(shards)} shards ({manifest['tokens']:,} tokens, {manifest['documents']:,} documents) to {out}")


if __name__ == "__main__":
    main()
