"""
FineWeb-Edu -> GPT-2 token shards for train_gpt2.py (https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu).

    python fineweb.py                  # sample-10BT (~10B tokens): downloads it all (~29 GB of parquet), then tokenizes
    python fineweb.py --streaming      # tokenizes while downloading: no copy of the dataset on disk
    python fineweb.py --input a.jsonl b.parquet --text_field text --out my_shards    # local files instead
    python fineweb.py --benchmark --input a.jsonl    # our tokens/s against tiktoken's single-core rate x workers

Writes {out}/{prefix}_{split}_{index:06d}.npy: numpy uint16 arrays of exactly --shard_size tokens (the last one
may be shorter), shard 0 "val", the others "train", every document preceded by <|endoftext|>. The names and
format are build-nanogpt's, so shards from either script work with either trainer. Shard 0 is filled first, so a
corpus smaller than twice --shard_size would be validated on more than it is trained on: the run then ends with a
warning naming the --shard_size to use instead (a tenth of the corpus's tokens; ~1 MB of text is ~250k tokens).
Interrupted (crash, Ctrl-C, full disk)? Run the same command again: finished shards are kept and it picks up from
there. One run at a time per --out (a second is refused); a finished shard later deleted or cut short is made again.
"""
import argparse
import collections
import contextlib
import io
import itertools
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import (SHARD_NAME, UserError, atomic_write, get_tokenizer, lock_directory, new_directories,
                    output_conflicts, remove_if_empty, shard_name)

SAMPLE_10BT_TOKENS = 10**10  # sample-10BT is ~10B GPT-2 tokens: the progress bar's total, for an ETA
# ~1 MB of text (~250k tokens) per worker task: big enough that sending it between processes costs little next to
# tokenizing it, small enough that every worker stays busy and little memory is in flight
BATCH_CHARS = 2**20
TRAINING_WINDOW = 1024 + 1  # the least input worth shards: T+1 tokens, GPT-2's context of 1024 + its last target
# the largest --shard_size: a shard is built in memory (2 bytes a token) and is what a rerun makes again after a
# crash; 10**9 tokens (2 GB files, ten times build-nanogpt's 10**8) is past any use of bigger ones
MAX_SHARD_SIZE = 10**9

# -----------------------------------------------------------------------------
# tokenizer: common.get_tokenizer(), one per process, created on first use (importing this file does no work)


def tokenize(text):
    """One document -> its uint16 tokens, <|endoftext|> first: the token that delimits documents in a shard."""
    enc = get_tokenizer()
    tokens = np.array([enc.eot_token] + enc.encode_ordinary(text), dtype=np.uint32)
    assert tokens.max() < 2**16, "a token id does not fit in uint16, the shards' dtype"
    return tokens.astype(np.uint16)


def tokenize_batch(texts):
    """Runs in a worker: many documents per task, so sending work between processes costs little next to
    tokenizing it. Returns all their tokens in one array (cheap to send back) and each document's length."""
    tokens = [tokenize(text) for text in texts]
    return np.concatenate(tokens), np.array([len(t) for t in tokens])


def init_worker():
    # Ctrl-C reaches every process of the terminal; only the main process handles it (and stops the pool).
    # No tokenizer here: a pool restarts, forever, workers whose initializer fails. Forked workers inherit main's;
    # spawned ones load it in their first task, whose errors reach main() like any other.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

# -----------------------------------------------------------------------------
# documents: local .txt / .jsonl / .parquet files, or a Hugging Face dataset; a stream of strings in a fixed order


def text_of(value, where, field):
    """A document's text, checked: a wrong --text_field or a null shows up here, named by file and line or row."""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise UserError(f"{where}: '{field}' is {kind}, not a string; pick the text's field with --text_field")
    return value


def read_jsonl(path, field):
    with path.open("rb") as f:
        for line_number, line in enumerate(f, 1):
            if line.isspace():
                continue  # blank lines are not documents
            try:
                record = json.loads(line)
            except ValueError as e:  # not JSON, or not UTF-8
                raise UserError(f"{path}:{line_number}: not valid JSON ({e}); fix or remove the line") from None
            if not isinstance(record, dict) or field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else f"none, a {type(record).__name__}"
                raise UserError(f"{path}:{line_number}: no field '{field}' (fields: {fields}); "
                                f"pick one with --text_field")
            yield text_of(record[field], f"{path}:{line_number}", field)


def read_parquet(path, field):
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
        if field not in columns:
            raise UserError(f"{path}: no column '{field}' (columns: {', '.join(columns)}); pick one with --text_field")
        rows = itertools.count(1)
        for batch in parquet.iter_batches(batch_size=1024, columns=[field]):  # only the text is read
            for value in batch.column(0).to_pylist():
                yield text_of(value, f"{path}: row {next(rows)}", field)
    except (OSError, ValueError) as e:  # a damaged file can fail at any row group (pyarrow's ArrowInvalid: ValueError)
        raise UserError(f"{path}: not a readable parquet file ({e}); replace it with a good copy") from None


def local_documents(paths, field, skip):
    """The documents of the files in order, less the first `skip` (a resumed run's finished ones)."""
    def all_documents():
        for path in map(Path, paths):
            try:
                if path.suffix == ".txt":
                    yield path.read_text(encoding="utf-8")  # the whole file is one document
                elif path.suffix == ".jsonl":
                    yield from read_jsonl(path, field)
                else:
                    yield from read_parquet(path, field)
            except OSError as e:
                raise UserError(f"cannot read {path} ({e.strerror or e})") from None
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text ({e}); convert it to UTF-8") from None
    return itertools.islice(all_documents(), skip, None)


def hub_documents(args, skip):
    import datasets  # slow to import, and only this path needs it
    # not streaming: the whole dataset is downloaded and converted to Arrow first (resumable, cached on disk);
    # streaming: parquet files are read over the network as we go. Both give the documents in the same order.
    try:
        ds = datasets.load_dataset(args.dataset, name=args.name, split="train", streaming=args.streaming)
    except Exception as e:  # noqa: BLE001 -- no network, no such dataset or configuration...: its message says which
        raise UserError(f"cannot load {args.dataset} (--name {args.name}): {type(e).__name__}: {e}") from None
    if ds.column_names is not None and args.text_field not in ds.column_names:
        raise UserError(f"{args.dataset} has no column '{args.text_field}' (columns: {', '.join(ds.column_names)}); "
                        f"pick one with --text_field")
    # skip() on a stream still reads the skipped documents (not tokenizing them is what saves the time)
    ds = ds.select_columns([args.text_field]).skip(skip)
    index = itertools.count(skip)
    for batch in ds.iter(batch_size=1024):
        for value in batch[args.text_field]:
            yield text_of(value, f"{args.dataset} document {next(index)}", args.text_field)


def batches(documents):
    """Lists of documents holding BATCH_CHARS of text: the workers' tasks."""
    batch, size = [], 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def worker_pool(workers):
    """mp.Pool that, on the way out (done, an error, Ctrl-C), lets its workers finish the few batches in flight and
    exit (close, join) instead of killing them (what `with mp.Pool()` does: terminate). A worker killed while it
    sends a result holds the result queue's lock for good, and terminate then waits on that lock forever: CPython
    issue 96995, seen here as a test of Ctrl-C hanging in one CI run of four. ordered_map keeps at most 4 batches
    per worker in flight: seconds of work."""
    pool = mp.Pool(workers, initializer=init_worker)
    try:
        yield pool
    finally:
        pool.close()
        pool.join()


def ordered_map(pool, fn, tasks, depth):
    """pool.imap(fn, tasks) but with at most `depth` tasks in flight: imap reads its whole input as fast as it
    can, which would pull all of a 10B-token stream into memory while the workers tokenize."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= depth:
            yield pending.popleft().get()  # an exception raised in the worker is raised again here
    while pending:
        yield pending.popleft().get()

# -----------------------------------------------------------------------------
# output: shards and manifest, each written by common.atomic_write (a fresh temp name, synced, renamed), so a crash
# or a full disk never leaves a torn file; the manifest lists the finished shards and where the next one starts


def save(path, write):
    atomic_write(path, write, hint=". Free some space and run the same command again: finished shards are kept")


def save_manifest(out, manifest):
    save(out / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def npy_size(n_tokens):
    """Bytes of np.save's file of n uint16 tokens: its header (128 bytes here), then 2 bytes per token."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<u2", "fortran_order": False, "shape": (n_tokens,)})
    return header.tell() + 2 * n_tokens


def run_config(args):
    """What decides the shards' bytes: resuming is only allowed with the same. (Not --workers: the output does
    not depend on it; not --streaming: both modes read the same documents in the same order.)"""
    if args.input:
        source = {"input": [[str(path.absolute()), path.stat().st_size] for path in args.input]}
    else:
        source = {"dataset": args.dataset, "name": args.name}
    return {**source, "text_field": args.text_field, "prefix": args.prefix, "shard_size": args.shard_size,
            "tokenizer": "gpt2"}


def load_manifest(out, config):
    """The manifest of an earlier run of this configuration in `out`, or a new one; refuses to mix runs."""
    path = out / "manifest.json"
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({e}): delete {out} to start over, or use another --out") from None
        old = manifest.get("config", {})
        changed = [f"{key} {old.get(key)!r} there, {config.get(key)!r} now"
                   for key in sorted(set(old) | set(config)) if old.get(key) != config.get(key)]
        if not changed:
            return intact_part(out, manifest)
        if manifest.get("shards"):
            raise UserError(f"{out} holds shards of another configuration ({'; '.join(changed)}): use another --out, "
                            f"or delete {out} to start over")
    elif any(out.glob("*.npy")):
        raise UserError(f"{out} holds .npy files but no manifest.json from fineweb.py: use another --out, "
                        f"or delete them")
    return {"config": config, "shards": [], "complete": False}


def intact_part(out, manifest):
    """The manifest cut back before its first shard that is missing or of the wrong size (deleted, truncated): the
    run resumes there and makes it and the later ones again, byte for byte. Sizes only: checksums take minutes."""
    for index, shard in enumerate(manifest["shards"]):
        path, expected = out / shard["file"], npy_size(shard["tokens"])
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            problem = "is missing" if size is None else f"has {size:,} bytes, not {expected:,}"
            print(f"{path} {problem}: making shards {index} to the end again")
            return {"config": manifest["config"], "shards": manifest["shards"][:index], "complete": False}
    return manifest


def finish_shard(out, manifest, tokens, next_doc, next_doc_offset):
    name = shard_name(manifest["config"]["prefix"], len(manifest["shards"]))  # shard 0 val, the others train
    save(out / name, lambda f: np.save(f, tokens))
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
    enc = get_tokenizer()

    def single_core_rate():
        start = time.perf_counter()
        tokens = sum(len(enc.encode_ordinary(text)) + 1 for text in texts)  # + 1: each document's <|endoftext|>
        return tokens, tokens / (time.perf_counter() - start)

    tokens, rate_before = single_core_rate()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run = subprocess.run([sys.executable, Path(__file__).resolve(), "--input", *files, "--text_field", text_field,
                              "--out", out, "--shard_size", str(10**7), "--workers", str(workers)], check=False)
        if run.returncode:
            raise UserError("the benchmark's run of fineweb.py failed (its error is above)")
        seconds = time.perf_counter() - start
    ceiling = max(rate_before, single_core_rate()[1]) * workers  # the better of two: shared machines are noisy
    return {"tokens": tokens, "workers": workers, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds),
            "ceiling_tokens_per_s": round(ceiling), "ratio": round(tokens / seconds / ceiling, 3)}


def parse_args(argv):
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(prog="fineweb.py", description="Tokenize a corpus into GPT-2 uint16 shards.")
    parser.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="Hugging Face dataset")
    parser.add_argument("--name", default="sample-10BT", help="its configuration (sample-10BT, sample-100BT, ...)")
    parser.add_argument("--streaming", action="store_true", help="tokenize while downloading, store no dataset")
    parser.add_argument("--input", nargs="+", type=Path, metavar="FILE",
                        help="local .txt (one document per file), .jsonl or .parquet files instead of the hub")
    parser.add_argument("--text_field", default="text", help="the field (column) holding each document's text")
    parser.add_argument("--out", type=Path, help="output directory (default: edu_fineweb10B beside this script)")
    parser.add_argument("--prefix", default="edufineweb", help="shard names: {prefix}_{val|train}_{index:06d}.npy")
    parser.add_argument("--shard_size", type=int, default=10**8,
                        help="tokens per shard (10**8: 200 MB files); shard 0, val, is filled first: for a small "
                        "corpus, about a tenth of its tokens (a warning at the end says so)")
    parser.add_argument("--workers", type=int, default=cores, help="tokenizer processes (default: all cores)")
    parser.add_argument("--benchmark", action="store_true", help="with --input: print our tokens/s and the ceiling")
    args = parser.parse_args(argv)
    if args.benchmark and not args.input:
        parser.error("--benchmark needs local files: --input FILE...")
    problems = []  # every unusable flag and file at once, before any work
    if not 1 <= args.shard_size <= MAX_SHARD_SIZE:
        problems.append(f"--shard_size {args.shard_size}: use 1 to {MAX_SHARD_SIZE:,} tokens (default 10**8)")
    if not 1 <= args.workers <= cores:  # tokenizing is CPU-bound: more processes than cores only add memory
        problems.append(f"--workers {args.workers}: this machine has {cores} cores: use --workers {cores} or fewer")
    if not args.text_field:
        problems.append("--text_field is empty: name the field that holds each document's text")
    # shard names are files in --out (no folders) that train_gpt2.py recognises (common.SHARD_NAME), and short enough
    # for atomic_write's temp names, .{name}.XXXXXXXX.tmp, to fit in the usual 255 bytes
    if (not args.prefix.isprintable() or {os.sep, os.altsep} & set(args.prefix)
            or not SHARD_NAME.match(shard_name(args.prefix, 0))
            or len(f".{shard_name(args.prefix, 1)}.XXXXXXXX.tmp".encode()) > 255):
        problems.append(f"--prefix {args.prefix!r}: use a short file name, without {os.sep}")
    for path in args.input or []:
        if path.is_dir():
            problems.append(f"--input {path}: a directory; pass the files in it")
        elif not path.is_file():
            problems.append(f"--input {path}: no such file")
        elif path.suffix not in (".txt", ".jsonl", ".parquet"):
            problems.append(f"--input {path}: unknown file type; use .txt (one document), .jsonl or .parquet")
    if not problems:  # (an --input that is not a file has said so already)
        problems += output_conflicts({"--out": out_dir(args)}, {"--input": args.input})
    if problems:
        raise UserError("; ".join(problems))
    return args


def out_dir(args):
    """--out, or by default edu_fineweb10B beside this script, where train_gpt2.py looks (a --out of the user's is
    relative to the cwd)."""
    return args.out or Path(__file__).resolve().parent / "edu_fineweb10B"


def make_shards(pool, args, out, manifest):
    shards, resumed = manifest["shards"], len(manifest["shards"])
    skip = shards[-1]["next_doc"] if shards else 0  # documents already in finished shards
    documents = local_documents(args.input, args.text_field, skip) if args.input else hub_documents(args, skip)
    first = next(documents, None)  # an empty input fails here, before anything is written
    if first is None and not shards:
        raise UserError("the input holds no documents: nothing to train on")
    documents = itertools.chain([] if first is None else [first], documents)
    # the temp files (.{name}.XXXXXXXX.tmp) of a killed run: no other run writes here while we hold the lock
    for temp in [*out.glob(f".{args.prefix}_*.npy.*.tmp"), *out.glob(".manifest.json.*.tmp")]:
        temp.unlink()
    save_manifest(out, manifest)  # before any shard, so shards in `out` always come with their manifest
    total = SAMPLE_10BT_TOKENS if not args.input and args.name == "sample-10BT" else None
    done = sum(shard["tokens"] for shard in shards)
    with tqdm(total=total, initial=done, unit="tok", unit_scale=True, desc=out.name) as bar:
        # 4 tasks in flight per worker: enough that none waits while the main process reads the next batch
        results = ordered_map(pool, tokenize_batch, batches(documents), depth=4 * args.workers)
        write_shards(results, out, manifest, bar)
    tokens, documents = sum(shard["tokens"] for shard in shards), shards[-1]["next_doc"]
    if tokens < TRAINING_WINDOW:  # nothing to train on: this run's shards go (and make_dataset removes the rest)
        made, shards[resumed:] = shards[resumed:], []
        save_manifest(out, manifest)  # first, so that it never lists a missing shard
        for shard in made:
            (out / shard["file"]).unlink()
        raise UserError(f"the input holds {tokens:,} tokens ({documents:,} documents), fewer than one training window "
                        f"of {TRAINING_WINDOW:,} (T+1 = 1024+1): give it more text")
    manifest.update(complete=True, tokens=tokens, documents=documents)
    save_manifest(out, manifest)


def split_warning(manifest):
    """What to say when the val shard, filled first, holds more than half of a small corpus (None otherwise): the
    shards are valid, but train_gpt2.py would train on less than it validates on, or on nothing. The total is
    known only once everything is tokenized, so this comes at the end, with the --shard_size to run again with."""
    tokens, val = manifest["tokens"], manifest["shards"][0]["tokens"]
    if val <= tokens / 2:
        return None
    size = max(TRAINING_WINDOW, int(float(f"{tokens / 10:.2g}")))  # ~10% val, the rest train
    fix = f"run again with --shard_size {size} and another --out"
    if val == tokens:  # valid, but train_gpt2.py has nothing to train on
        return f"only the val shard ({tokens:,} tokens), and train_gpt2.py needs a train shard too: {fix}"
    return (f"the val shard (shard 0, filled first) holds {val:,} of the corpus's {tokens:,} tokens "
            f"({val / tokens:.0%}), leaving {tokens - val:,} to train on: {fix}")


def make_dataset(args):
    out = out_dir(args)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: choose another --out")
    config = run_config(args)
    # what this run adds to `out`: removed again if it fails before its first shard (`out` is left as it was found)
    created = new_directories(out)
    ours = [out / name for name in (".lock", "manifest.json") if not (out / name).exists()]
    # one run per directory: two would write the same shards and manifest. Taken before the manifest is read, and
    # held (by the workers too, which inherit it) until this run's processes end, however they end.
    try:
        lock = lock_directory(out, "fineweb.py")
    except UserError:  # unwritable: the folders made before mkdir failed go (a folder in use is no new one)
        remove_if_empty(created)
        raise
    manifest = {"shards": []}
    try:
        manifest = load_manifest(out, config)
        shards = manifest["shards"]
        if manifest["complete"]:
            print(f"{out} is already complete: {len(shards)} shards, {manifest['tokens']:,} tokens")
        else:
            get_tokenizer()  # here first: an offline machine fails now, and forked workers inherit it loaded
            try:
                # the pool starts before any input is opened: forking once `datasets` runs download threads is unsafe
                with worker_pool(args.workers) as pool:
                    make_shards(pool, args, out, manifest)
            except KeyboardInterrupt:
                raise UserError(f"interrupted with {len(shards)} shards finished; run the same command again to "
                                f"continue") from None
            print(f"wrote {len(shards)} shards ({manifest['tokens']:,} tokens, {manifest['documents']:,} documents) "
                  f"to {out}")
        if warning := split_warning(manifest):
            print(f"fineweb.py: warning: {warning}", file=sys.stderr)
    except BaseException:
        if not manifest["shards"]:  # nothing to resume from
            for path in ours:
                path.unlink(missing_ok=True)
            remove_if_empty(created)
        raise
    finally:
        os.close(lock)


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.benchmark:
            print(json.dumps(benchmark(args.input, args.text_field, args.workers)))
        else:
            make_dataset(args)
    # the one place an error becomes a line: UserErrors (workers' too), and OSErrors no check foresaw (ENAMETOOLONG)
    except (UserError, OSError) as e:
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print("fineweb.py: error:", " ".join(message.splitlines()), file=sys.stderr)  # some of pyarrow's span lines
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
