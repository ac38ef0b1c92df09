"""fineweb.py: exact token streams, shard names and sizes, worker-independence, resume, bad inputs and flags, inputs
too small to train on, one run per --out, full disks, damaged output directories, and nothing left by a failed start."""
import errno
import json
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import common
import fineweb
from conftest import ROOT

EOT = 50256
SHARD = 1000  # tokens per shard in these tests: the documents below fill 25 shards
WORKERS = min(2, os.cpu_count())  # two tokenizer processes where the machine has two cores (more are refused)


def make_docs(n=80, seed=0):
    rng = random.Random(seed)
    words = ["the", "a", "of", "and", "tokens", "GPT-2", "café", "naïve", "東京", "😀", "\n", "  ", "don't", "42"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 300))) for _ in range(n)]
    docs[3] = ""  # still a document: a lone <|endoftext|>
    docs[5] = "a literal <|endoftext|> inside a document is ordinary text"
    docs[7] = "long " * 2500  # one document spanning more than two shards
    return docs


def expected_tokens(docs):
    enc = tiktoken.get_encoding("gpt2")
    return np.array([t for doc in docs for t in [EOT] + enc.encode_ordinary(doc)], dtype=np.uint16)


def write_documents(path, docs, field="text"):
    Path(path).write_text("".join(json.dumps({"id": i, field: doc}, ensure_ascii=False) + "\n"
                                  for i, doc in enumerate(docs)), encoding="utf-8")
    return str(path)


def write_parquet(path, docs):
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=7)
    return str(path)


def run(inputs, out, *extra, workers=1, shard_size=SHARD):
    fineweb.main(["--input", *inputs, "--out", str(out), "--shard_size", str(shard_size), "--workers", str(workers),
                  *extra])


def shard_files(out):
    """The shards in index order (by name, train would come before val)."""
    return sorted((p.name for p in Path(out).glob("*.npy")), key=lambda name: name.split("_")[-1])


def read_dir(out):
    """Every file in `out` (shards, manifest, any leftover temp file) -> its bytes, to compare whole runs byte for
    byte; not the lock, whose text names the process that last held it."""
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir()) if p.name != ".lock"}


def npy_file(tokens):
    """The bytes of a .npy file of uint16 tokens built from the format's specification (version 1.0), not by numpy:
    magic, version, header length, a header dict padded with spaces to a multiple of 64 bytes, then the data."""
    header = f"{{'descr': '<u2', 'fortran_order': False, 'shape': ({len(tokens)},), }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + tokens.astype("<u2").tobytes()


def concatenated(out):
    return np.concatenate([np.load(Path(out) / name) for name in shard_files(out)])


@pytest.fixture(scope="module", autouse=True)
def small_batches():
    """~500 characters per worker task instead of 1 MB, so that these small inputs make many tasks."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fineweb, "BATCH_CHARS", 500)
        yield


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def reference(docs, tmp_path_factory):
    """An uninterrupted run on the jsonl file: the output every other way of making these shards must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    path = write_documents(tmp / "docs.jsonl", docs)
    run([path], tmp / "out", workers=WORKERS)
    return path, read_dir(tmp / "out")


def test_tokenize_is_eot_then_encode_ordinary():
    enc = tiktoken.get_encoding("gpt2")
    tokens = fineweb.tokenize("Hello world <|endoftext|>")
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [EOT] + enc.encode_ordinary("Hello world <|endoftext|>")


def test_jsonl_shards_hold_every_document_in_order(docs, reference):
    path, files = reference
    out = Path(path).parent / "out"
    tokens = expected_tokens(docs)
    n_shards = -(-len(tokens) // SHARD)
    assert shard_files(out) == [f"edufineweb_val_{0:06d}.npy"] + [f"edufineweb_train_{i:06d}.npy"
                                                                  for i in range(1, n_shards)]
    sizes = [np.load(out / name).size for name in shard_files(out)]
    assert sizes == [SHARD] * (n_shards - 1) + [len(tokens) - SHARD * (n_shards - 1)]
    assert np.load(out / "edufineweb_val_000000.npy").dtype == np.uint16
    assert np.array_equal(concatenated(out), tokens)
    # byte for byte the .npy format (version 1.0, little-endian uint16) that build-nanogpt's np.save(filename,
    # tokens_np) writes: its shards and ours are interchangeable
    for i, name in enumerate(shard_files(out)):
        assert files[name] == npy_file(tokens[i * SHARD:(i + 1) * SHARD])
    # the manifest's resume points: shard i ends next_doc_offset tokens into document next_doc
    manifest = json.loads(files["manifest.json"])
    assert manifest["complete"] and manifest["tokens"] == len(tokens) and manifest["documents"] == len(docs)
    starts = np.cumsum([0] + [len(fineweb.tokenize(doc)) for doc in docs])
    for i, shard in enumerate(manifest["shards"]):
        assert starts[shard["next_doc"]] + shard["next_doc_offset"] == min(SHARD * (i + 1), len(tokens))


def test_workers_do_not_change_the_output(reference, tmp_path, monkeypatch):
    path, files = reference
    monkeypatch.setattr(os, "cpu_count", lambda: 3)  # --workers 3 is refused on a machine with fewer cores
    run([path], tmp_path / "one", workers=1)
    run([path], tmp_path / "three", workers=3)
    assert read_dir(tmp_path / "one") == files
    assert read_dir(tmp_path / "three") == files


def test_parquet_gives_the_same_shards_as_jsonl(docs, reference, tmp_path):
    _, files = reference
    run([write_parquet(tmp_path / "docs.parquet", docs)], tmp_path / "out", workers=WORKERS)
    shards = {name: data for name, data in read_dir(tmp_path / "out").items() if name.endswith(".npy")}
    assert shards == {name: data for name, data in files.items() if name.endswith(".npy")}


def test_txt_files_are_one_document_each_and_inputs_chain_in_order(docs, tmp_path):
    paths = []
    for i, doc in enumerate(docs[:10]):
        paths.append(str(tmp_path / f"doc{i}.txt"))
        Path(paths[-1]).write_text(doc, encoding="utf-8")
    jsonl = write_documents(tmp_path / "rest.jsonl", docs[10:20])
    run(paths + [jsonl], tmp_path / "out")
    assert np.array_equal(concatenated(tmp_path / "out"), expected_tokens(docs[:20]))


def test_shards_ending_on_document_boundaries(tmp_path):
    # "hello world" is 2 tokens, 3 with <|endoftext|>: shards of 600 hold exactly 200 documents, and no empty
    # shard follows the last full one
    path = write_documents(tmp_path / "docs.jsonl", ["hello world"] * 600)
    run([path], tmp_path / "out", shard_size=600)
    assert [np.load(tmp_path / "out" / name).size for name in shard_files(tmp_path / "out")] == [600] * 3
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["next_doc"], s["next_doc_offset"]) for s in manifest["shards"]] == [(200, 0), (400, 0), (600, 0)]


def test_shard_names_are_build_nanogpts(reference):
    # the names fineweb.py writes, as build-nanogpt's loader globs them, and as train_gpt2.py reads them
    out = Path(reference[0]).parent / "out"
    names = ["edufineweb_val_000000.npy"] + [f"edufineweb_train_{i:06d}.npy" for i in range(1, 25)]
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(names)
    assert [(split, p.name) for split, p in common.list_shards(out)] == [(n.split("_")[1], n) for n in names]


def test_a_corpus_smaller_than_one_shard_warns_and_suggests_a_shard_size(tmp_path, capsys):
    # 15,000 tokens ("hello world" is 3 with its <|endoftext|>) and the default 10**8 tokens a shard: only the val
    # shard, which train_gpt2.py cannot train on. Valid shards all the same: a warning, exit status 0.
    path = write_documents(tmp_path / "docs.jsonl", ["hello world"] * 5000)
    capsys.readouterr()
    fineweb.main(["--input", path, "--out", str(tmp_path / "out"), "--workers", "1"])
    assert shard_files(tmp_path / "out") == ["edufineweb_val_000000.npy"]
    warning = ("fineweb.py: warning: only the val shard (15,000 tokens), and train_gpt2.py needs a train shard too: "
               "run again with --shard_size 1500 and another --out")
    assert warning in capsys.readouterr().err.splitlines()
    fineweb.main(["--input", path, "--out", str(tmp_path / "out"), "--workers", "1"])  # complete: said again
    assert warning in capsys.readouterr().err.splitlines()
    # the suggestion: a tenth of the tokens for val, the rest train
    fineweb.main(["--input", path, "--out", str(tmp_path / "out2"), "--workers", "1", "--shard_size", "1500"])
    assert "warning" not in capsys.readouterr().err
    assert [split for split, _ in common.list_shards(tmp_path / "out2")] == ["val"] + ["train"] * 9


def test_a_corpus_mostly_in_the_val_shard_warns(tmp_path, capsys):
    """~1 MB of text with --shard_size 200000 put 75% of its tokens in val, without a word: the val shard is filled
    first. More than half in val gets the warning and the --shard_size that leaves ~90% to train on."""
    path = write_documents(tmp_path / "docs.jsonl", ["hello world"] * 5000)  # 15,000 tokens
    capsys.readouterr()
    run([path], tmp_path / "out", shard_size=10000)
    assert [np.load(tmp_path / "out" / name).size for name in shard_files(tmp_path / "out")] == [10000, 5000]
    warning = ("fineweb.py: warning: the val shard (shard 0, filled first) holds 10,000 of the corpus's 15,000 tokens "
               "(67%), leaving 5,000 to train on: run again with --shard_size 1500 and another --out")
    assert capsys.readouterr().err.splitlines()[-1] == warning
    run([path], tmp_path / "out", shard_size=10000)  # complete: said again
    assert capsys.readouterr().err.splitlines() == [warning]
    run([path], tmp_path / "half", shard_size=7500)  # half in val, half to train: no warning
    assert "warning" not in capsys.readouterr().err


def test_an_input_inside_out_is_refused_before_any_work(tmp_path, capsys):
    """--out is fineweb.py's: its messages say to delete it to start over; an input in it would go with it."""
    (tmp_path / "out").mkdir()
    path = write_documents(tmp_path / "out" / "docs.jsonl", ["hello world"] * 500)
    (tmp_path / "link").symlink_to(tmp_path / "out")
    for out in (tmp_path / "out", tmp_path / "link", tmp_path):
        message = error_of(capsys, ["--input", path, "--out", str(out), "--shard_size", "100", "--workers", "1"])
        assert message == (f"fineweb.py: error: --input {path} is inside --out {out}, which this program writes "
                           f"into; choose another --out")
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["docs.jsonl"]  # no lock, manifest, shard
    message = error_of(capsys, ["--input", path, "--out", path, "--workers", "1"])  # the file itself as --out
    assert f"--out {path} is the same file as --input {path}" in message


def interrupt_after(monkeypatch, n_shards):
    """Makes the next run stop like Ctrl-C right after its n-th finished shard."""
    finish_shard = fineweb.finish_shard

    def finish_then_interrupt(out, manifest, *rest):
        finish_shard(out, manifest, *rest)
        if len(manifest["shards"]) == n_shards:
            raise KeyboardInterrupt
    monkeypatch.setattr(fineweb, "finish_shard", finish_then_interrupt)


@pytest.mark.parametrize("n_shards", [1, 8])
def test_resume_after_interrupt_gives_identical_files(docs, reference, tmp_path, monkeypatch, capsys, n_shards):
    path, files = reference
    with monkeypatch.context() as patch:
        interrupt_after(patch, n_shards)
        message = error_of(capsys, ["--input", path, "--out", str(tmp_path / "out"), "--shard_size", str(SHARD),
                                    "--workers", str(WORKERS)])
    assert f"interrupted with {n_shards} shards finished; run the same command again to continue" in message
    assert len(shard_files(tmp_path / "out")) == n_shards
    # what a crash leaves: atomic_write's temp files of a partial shard and manifest
    (tmp_path / "out" / f".edufineweb_train_{n_shards:06d}.npy.k3v9x_q1.tmp").write_bytes(b"torn")
    (tmp_path / "out" / ".manifest.json.0ab_cd12.tmp").write_bytes(b"{")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    first_texts = []
    batches = fineweb.batches
    monkeypatch.setattr(fineweb, "batches", lambda documents: batches(first_texts.append(d) or d for d in documents))
    run([path], tmp_path / "out", workers=WORKERS)
    assert read_dir(tmp_path / "out") == files
    # the finished shards' documents were skipped, not tokenized again
    assert first_texts[0] == docs[manifest["shards"][-1]["next_doc"]]


def test_an_interrupt_lets_the_workers_finish_instead_of_killing_them(reference, tmp_path, monkeypatch, capsys):
    """Pool.terminate kills workers that may be sending a result, and then can wait forever on the lock such a
    worker held (CPython issue 96995): a test of Ctrl-C hung so in CI. The pool is closed and joined instead."""
    import multiprocessing.pool

    path, _ = reference
    terminated = []
    monkeypatch.setattr(multiprocessing.pool.Pool, "terminate", lambda pool: terminated.append(pool))
    interrupt_after(monkeypatch, 2)
    message = error_of(capsys, ["--input", path, "--out", str(tmp_path / "out"), "--shard_size", str(SHARD),
                                "--workers", str(WORKERS)])
    assert "interrupted with 2 shards finished" in message
    assert terminated == [] and multiprocessing.active_children() == []  # every worker exited by itself


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_resume_after_a_hard_kill(reference, tmp_path):
    # the process and its workers die with SIGKILL half-way through writing the fourth shard: no clean-up runs
    path, files = reference
    script = """if True:
        import os, signal, sys, fineweb
        fineweb.BATCH_CHARS = 500
        atomic_write = fineweb.atomic_write
        def write_or_die(path, write, **kwargs):
            def torn(f):
                f.write(b"torn")
                f.flush()
                os.killpg(0, signal.SIGKILL)
            return atomic_write(path, torn if path.name == "edufineweb_train_000003.npy" else write, **kwargs)
        fineweb.atomic_write = write_or_die
        fineweb.main(sys.argv[1:])
    """
    args = ["--input", path, "--out", str(tmp_path / "out"), "--shard_size", str(SHARD), "--workers", str(WORKERS)]
    killed = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, start_new_session=True,
                            capture_output=True, check=False)
    assert killed.returncode == -9
    assert len(shard_files(tmp_path / "out")) == 3
    assert len(list((tmp_path / "out").glob(".edufineweb_train_000003.npy.*.tmp"))) == 1  # the torn temp file
    # the lock died with the processes: the rerun is not refused
    subprocess.run([sys.executable, "fineweb.py", *args], cwd=ROOT, check=True, capture_output=True)
    assert read_dir(tmp_path / "out") == files


def test_rerun_of_a_complete_run_changes_nothing(reference, tmp_path, capsys):
    path, _ = reference
    run([path], tmp_path / "out")
    times = {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in read_dir(tmp_path / "out")}
    run([path], tmp_path / "out")
    assert "already complete" in capsys.readouterr().out
    assert {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in read_dir(tmp_path / "out")} == times


@pytest.mark.slow
def test_spawn_start_method_gives_the_same_shards(reference, tmp_path):
    # macOS and Windows start workers with spawn: they import fineweb afresh and must find everything they need
    path, files = reference
    code = ("import multiprocessing as mp, sys, fineweb; mp.set_start_method('spawn'); fineweb.BATCH_CHARS = 500; "
            "fineweb.main(sys.argv[1:])")
    subprocess.run([sys.executable, "-c", code, "--input", path, "--out", str(tmp_path / "out"),
                    "--shard_size", str(SHARD), "--workers", str(WORKERS)], cwd=ROOT, check=True, capture_output=True)
    assert read_dir(tmp_path / "out") == files


def test_ordered_map_keeps_order_and_reads_ahead_at_most_depth_tasks():
    # pool.imap would read the whole input at once: with a 10B-token stream memory would grow without bound
    pulled = []

    def tasks():
        for i in range(50):
            pulled.append(i)
            yield i
    with multiprocessing.Pool(2) as pool:
        results = fineweb.ordered_map(pool, abs, tasks(), depth=4)
        assert next(results) == 0 and len(pulled) == 4
        assert list(results) == list(range(1, 50))


def test_benchmark_times_a_run_over_every_token_of_the_input(reference):
    """Its rates are figures for the README, not tests; what it timed can be checked: a run over all the input."""
    path, _ = reference
    result = fineweb.benchmark([path], workers=WORKERS)
    assert result["tokens"] == json.loads(reference[1]["manifest.json"])["tokens"]


def test_default_out_is_beside_the_script(tmp_path, monkeypatch, capsys):
    seen = []

    def lock_directory(out, program):  # the first thing done with `out`: stop there, before the directory is made
        seen.append(out)
        raise common.UserError("stop")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fineweb, "lock_directory", lock_directory)
    assert error_of(capsys, ["--input", write_documents(tmp_path / "d.jsonl", ["x"])]) == "fineweb.py: error: stop"
    assert seen == [ROOT / "edu_fineweb10B"]


# -----------------------------------------------------------------------------
# the hub code path, with datasets.load_dataset replaced by an in-memory dataset


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_dataset_and_its_resume(docs, reference, tmp_path, monkeypatch, capsys, streaming):
    datasets = pytest.importorskip("datasets")
    _, files = reference
    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        ds = datasets.Dataset.from_list([{"text": doc, "id": i} for i, doc in enumerate(docs)])
        return ds.to_iterable_dataset(num_shards=3) if kwargs["streaming"] else ds
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    argv = ["--out", str(tmp_path / "out"), "--shard_size", str(SHARD), "--workers", str(WORKERS)]
    argv += ["--streaming"] if streaming else []
    with monkeypatch.context() as patch:
        interrupt_after(patch, 5)
        assert "run the same command again" in error_of(capsys, argv)
    fineweb.main(argv)
    assert calls[0] == ("HuggingFaceFW/fineweb-edu", {"name": "sample-10BT", "split": "train",
                                                      "streaming": streaming})
    assert {n: d for n, d in read_dir(tmp_path / "out").items() if n.endswith(".npy")} == \
        {n: d for n, d in files.items() if n.endswith(".npy")}
    message = error_of(capsys, argv[:1] + [str(tmp_path / "other")] + argv[2:] + ["--text_field", "body"])
    assert "no column 'body' (columns: text, id)" in message


def test_hub_failure_is_one_line(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")

    def load_dataset(path, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}'\non the Hub")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    message = error_of(capsys, ["--out", str(tmp_path / "out")])
    assert message.endswith("cannot load HuggingFaceFW/fineweb-edu (--name sample-10BT): ConnectionError: "
                            "Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub")
    assert not (tmp_path / "out").exists()  # the folder this run made (and its lock) is gone again


# -----------------------------------------------------------------------------
# bad inputs: one line saying what is wrong and what to do


def error_of(capsys, argv):
    """main(argv) fails as the user sees it: exit status 1 and one line on stderr (after the progress bar, if any)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as error:
        fineweb.main(argv)
    err = capsys.readouterr().err
    assert error.value.code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]  # tqdm ends its bar with a newline
    assert line.startswith("fineweb.py: error: ")
    return line


def test_missing_text_field_names_the_fields(tmp_path, capsys):
    jsonl = write_documents(tmp_path / "d.jsonl", ["a", "b"], field="content")
    message = error_of(capsys, ["--input", jsonl, "--out", str(tmp_path / "o")])
    assert "d.jsonl:1: no field 'text' (fields: id, content); pick one with --text_field" in message
    parquet = write_parquet(tmp_path / "d.parquet", ["a"])
    message = error_of(capsys, ["--input", parquet, "--text_field", "body", "--out", str(tmp_path / "o")])
    assert "no column 'body' (columns: id, text)" in message


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", b'{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n', "bad.jsonl:4: not valid JSON"),
    ("bad.jsonl", b'{"text": "a"}\n["a list"]\n', "bad.jsonl:2: no field 'text' (fields: none, a list)"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": null}\n', "bad.jsonl:2: 'text' is null, not a string; pick the text's"),
    ("bad.jsonl", b'{"text": ["a"]}\n', "bad.jsonl:1: 'text' is list, not a string"),
    ("bad.jsonl", b'{"text": "\xff"}\n', "bad.jsonl:1: not valid JSON"),
    ("bad.txt", b"caf\xe9", "bad.txt: not UTF-8 text"),
    ("bad.parquet", b"not parquet at all", "bad.parquet: not a readable parquet file"),
    ("empty.jsonl", b"\n\n", "the input holds no documents: nothing to train on"),
    ("notes.csv", b"text\nhello\n", "unknown file type; use .txt (one document), .jsonl or .parquet"),
])
def test_bad_files(tmp_path, capsys, name, content, expected):
    (tmp_path / name).write_bytes(content)
    assert expected in error_of(capsys, ["--input", str(tmp_path / name), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # checked before anything is done, or the folder made is gone again


@pytest.mark.parametrize("flags, expected", [
    (["--workers", "5"], "--workers 5: this machine has 4 cores: use --workers 4 or fewer"),
    (["--workers", "0"], "--workers 0: this machine has 4 cores"),
    (["--shard_size", "0"], "--shard_size 0: use 1 to 1,000,000,000 tokens"),
    (["--shard_size", str(10**12)], f"--shard_size {10**12}: use 1 to 1,000,000,000 tokens"),  # 2 TB of buffer
    (["--prefix", "a/b"], "--prefix 'a/b': use a short file name, without /"),
    (["--prefix", ""], "--prefix '': use a short file name"),  # "_val_000000.npy" is no shard to train_gpt2.py
    (["--prefix", "a\nb"], "--prefix 'a\\nb': use a short file name"),
    (["--prefix", "x" * 225], "use a short file name"),  # its temp files' names would not fit in 255 bytes
    (["--text_field", ""], "--text_field is empty: name the field that holds each document's text"),
    (["--text_field", "", "--workers", "5"], "use --workers 4 or fewer; --text_field is empty"),  # all at once
])
def test_bad_flags_are_refused_before_any_work(reference, tmp_path, monkeypatch, capsys, flags, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert expected in error_of(capsys, ["--input", reference[0], "--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_the_longest_prefix_allowed_works(tmp_path):
    run([write_documents(tmp_path / "d.jsonl", ["hello world"] * 400)], tmp_path / "out", "--prefix", "x" * 224)
    assert [split for split, _ in common.list_shards(tmp_path / "out")] == ["val", "train"]


def test_an_empty_text_file_is_refused_and_leaves_nothing(tmp_path, capsys):
    # one document, a lone <|endoftext|>: nothing to train on
    (tmp_path / "empty.txt").write_text("")
    message = error_of(capsys, ["--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "new" / "out"),
                                "--workers", "1"])
    assert message.endswith("the input holds 1 tokens (1 documents), fewer than one training window of 1,025 "
                            "(T+1 = 1024+1): give it more text")
    assert not (tmp_path / "new").exists()  # nor the folders this run made


@pytest.mark.parametrize("n_tokens", [1024, 1025])
def test_an_input_needs_one_training_window(tmp_path, capsys, n_tokens):
    # "hello world" is 3 tokens with its <|endoftext|>, "" is 1: 341 * 3 + 1 = 1,024 tokens, one short of T+1
    path = write_documents(tmp_path / "docs.jsonl", ["hello world"] * 341 + [""] * (n_tokens - 1023))
    (tmp_path / "out").mkdir()  # the user's folder: kept, and left as it was found
    argv = ["--input", path, "--out", str(tmp_path / "out"), "--shard_size", "100", "--workers", "1"]
    if n_tokens == 1024:  # its shards were written (100 tokens each), then removed
        assert error_of(capsys, argv).endswith("the input holds 1,024 tokens (342 documents), fewer than one "
                                               "training window of 1,025 (T+1 = 1024+1): give it more text")
        assert list((tmp_path / "out").iterdir()) == []
    else:
        fineweb.main(argv)
        assert concatenated(tmp_path / "out").size == 1025 and len(shard_files(tmp_path / "out")) == 11


def test_parquet_problems_name_the_file_and_row(tmp_path, capsys):
    parquet = write_parquet(tmp_path / "d.parquet", ["a", "b", None, "d"])
    message = error_of(capsys, ["--input", parquet, "--out", str(tmp_path / "o")])
    assert message.endswith(f"{parquet}: row 3: 'text' is null, not a string; pick the text's field with --text_field")
    assert f"{parquet}: row 1: 'id' is int" in error_of(capsys, ["--input", parquet, "--text_field", "id", "--out",
                                                                 str(tmp_path / "o")])
    # a damaged page in the middle of a file whose footer is intact: pyarrow fails there, with a two-line message
    parquet = write_parquet(tmp_path / "damaged.parquet", make_docs())
    data = bytearray(Path(parquet).read_bytes())
    page = pq.ParquetFile(parquet).metadata.row_group(5).column(1).data_page_offset
    data[page:page + 64] = b"\xab" * 64
    Path(parquet).write_bytes(data)
    assert f"{parquet}: not a readable parquet file (" in error_of(capsys, ["--input", parquet, "--out",
                                                                            str(tmp_path / "o")])


def test_missing_files_and_directories_are_all_named(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    message = error_of(capsys, ["--input", str(tmp_path / "nowhere.jsonl"), str(tmp_path / "docs"), "--out",
                                str(tmp_path / "o")])
    assert f"--input {tmp_path}/nowhere.jsonl: no such file; --input {tmp_path}/docs: a directory" in message
    assert not (tmp_path / "o").exists()


def test_out_dir_of_another_configuration_is_refused(reference, tmp_path, capsys):
    path, _ = reference
    run([path], tmp_path / "out")
    message = error_of(capsys, ["--input", path, "--out", str(tmp_path / "out"), "--shard_size", "2000"])
    assert "holds shards of another configuration (shard_size 1000 there, 2000 now)" in message
    assert "use another --out, or delete" in message
    other = write_documents(tmp_path / "other.jsonl", ["x"])
    assert "input [[" in error_of(capsys, ["--input", other, "--out", str(tmp_path / "out"), "--shard_size", "1000"])


def test_out_dir_with_foreign_shards_is_refused(reference, tmp_path, capsys):
    path, _ = reference
    (tmp_path / "out").mkdir()
    np.save(tmp_path / "out" / "edufineweb_val_000000.npy", np.zeros(10, dtype=np.uint16))
    message = error_of(capsys, ["--input", path, "--out", str(tmp_path / "out")])
    assert "holds .npy files but no manifest.json from fineweb.py" in message


def test_unreadable_manifest_is_one_line(reference, tmp_path, capsys):
    path, _ = reference
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text('{"config": ')
    message = error_of(capsys, ["--input", path, "--out", str(tmp_path / "out")])
    assert f"cannot read {tmp_path}/out/manifest.json (Expecting value" in message
    assert message.endswith(f"delete {tmp_path}/out to start over, or use another --out")


def tokenize_batch_failing(texts):
    raise common.UserError("raised in a worker")


def test_an_error_raised_in_a_worker_is_one_line(reference, tmp_path, monkeypatch, capsys):
    path, _ = reference
    monkeypatch.setattr(fineweb, "tokenize_batch", tokenize_batch_failing)  # forked workers see the patch
    message = error_of(capsys, ["--input", path, "--out", str(tmp_path / "out"), "--workers", str(WORKERS)])
    assert message == "fineweb.py: error: raised in a worker"

# -----------------------------------------------------------------------------
# the output directory: one run at a time, temp files, full or unwritable disks, shards deleted afterwards


def test_a_second_run_into_the_same_out_is_refused(reference, tmp_path, capsys):
    path, files = reference
    out = tmp_path / "out"
    # flock locks belong to an open file description: this process's own second open is refused like another's
    held = common.lock_directory(out, "the-test")
    try:
        message = error_of(capsys, ["--input", path, "--out", str(out), "--shard_size", str(SHARD)])
    finally:
        os.close(held)
    assert f"{out} is in use by the-test (pid {os.getpid()} on " in message
    assert message.endswith("wait for it to finish, or write elsewhere")
    assert read_dir(out) == {}  # nothing written
    run([path], out)  # released: the run goes ahead, and releases the lock in turn
    run([path], out)
    assert read_dir(out) == files


def test_temp_files_never_follow_links(reference, tmp_path):
    # links planted where the temp files of earlier versions went (predictable names) lead nowhere now
    path, files = reference
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "out").mkdir()
    planted = ["manifest.json.tmp", "edufineweb_val_000000.npy.tmp", "edufineweb_train_000001.npy.tmp"]
    for name in planted:
        (tmp_path / "out" / name).symlink_to(victim)
    run([path], tmp_path / "out")
    assert victim.read_bytes() == b"precious"
    assert {name: data for name, data in read_dir(tmp_path / "out").items() if name not in planted} == files


def test_unwritable_out_is_one_line(reference, tmp_path, capsys):
    # a path under a regular file: unwritable even for root (a chmod 0o500 directory does not stop root)
    path, _ = reference
    (tmp_path / "file").write_text("")
    message = error_of(capsys, ["--input", path, "--out", str(tmp_path / "file" / "out")])
    assert message.endswith(f"cannot write into {tmp_path}/file/out (Not a directory): choose a writable directory")


def test_output_path_errors_are_one_line(reference, tmp_path, monkeypatch, capsys):
    path, _ = reference
    (tmp_path / "file").write_text("")
    message = error_of(capsys, ["--input", path, "--out", str(tmp_path / "file")])
    assert message.endswith(f"--out {tmp_path}/file is a file, not a directory: choose another --out")
    long = "x" * 300  # a name over the file system's 255 bytes (ENAMETOOLONG)
    assert "File name too long" in error_of(capsys, ["--input", path, "--out", str(tmp_path / "new" / long / "out")])
    assert not (tmp_path / "new").exists()  # made before mkdir failed on the long name, then removed
    assert "File name too long" in error_of(capsys, ["--input", str(tmp_path / f"{long}.jsonl"), "--out",
                                                     str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()

    def run_config(args):  # any other OSError that no check foresaw: one line too
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere")
    monkeypatch.setattr(fineweb, "run_config", run_config)
    message = error_of(capsys, ["--input", path, "--out", str(tmp_path / "out")])
    assert message == "fineweb.py: error: /somewhere: Permission denied"


def test_a_failure_before_the_first_shard_leaves_nothing_this_run_made(reference, tmp_path, monkeypatch, capsys):
    path, files = reference
    argv = ["--input", path, "--shard_size", str(SHARD), "--workers", "1", "--out"]

    def interrupt(*args):  # Ctrl-C after the manifest is written, before the first shard
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(fineweb, "write_shards", interrupt)
        assert "interrupted with 0 shards finished" in error_of(capsys, argv + [str(tmp_path / "new" / "out")])
        assert not (tmp_path / "new").exists()  # the folders, the lock and the manifest are gone
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("kept")
        error_of(capsys, argv + [str(tmp_path / "mine")])
        assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # as it was found
    # what an earlier run made is never removed: its shard, manifest and lock stay through a failure before the next
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        error_of(capsys, argv + [str(tmp_path / "out")])
    before = read_dir(tmp_path / "out")
    with monkeypatch.context() as patch:
        patch.setattr(fineweb, "write_shards", interrupt)
        error_of(capsys, argv + [str(tmp_path / "out")])
    assert read_dir(tmp_path / "out") == before and (tmp_path / "out" / ".lock").exists()
    fineweb.main(argv + [str(tmp_path / "out")])
    assert read_dir(tmp_path / "out") == files


@pytest.mark.parametrize("full_at", ["manifest.json", "edufineweb_train_000003.npy", "manifest.json after shard 3"])
def test_full_disk_keeps_what_is_finished_and_the_rerun_completes(reference, tmp_path, monkeypatch, capsys, full_at):
    # the disk fills up part-way through writing the first manifest, the fourth shard, or the manifest listing it
    path, files = reference
    out = tmp_path / "out"
    atomic_write = fineweb.atomic_write

    def write_until_full(target, write, **kwargs):
        def fill(f):
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        name = target.name + (" after shard 3" if (out / "edufineweb_train_000003.npy").exists() else "")
        return atomic_write(target, fill if name == full_at else write, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(fineweb, "atomic_write", write_until_full)
        message = error_of(capsys, ["--input", path, "--out", str(out), "--shard_size", str(SHARD)])
    assert f"could not write {out}/{full_at.split()[0]} (No space left on device; " in message
    assert message.endswith("GB free there). Free some space and run the same command again: finished shards are kept")
    assert not list(out.glob("*.tmp"))  # no temp file left
    if full_at == "manifest.json":  # before the first shard: the folder this run made is gone again
        assert not out.exists()
    # the manifest on disk is whole and lists whole shards: those finished before the disk filled up
    listed = json.loads(files["manifest.json"])["shards"][:0 if full_at == "manifest.json" else 3]
    if listed:
        assert json.loads((out / "manifest.json").read_text())["shards"] == listed
    assert all((out / shard["file"]).read_bytes() == files[shard["file"]] for shard in listed)
    run([path], out)  # space freed
    assert read_dir(out) == files


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_deleted_or_truncated_shard_is_made_again(reference, tmp_path, capsys, damage):
    path, files = reference
    out = tmp_path / "out"
    run([path], out)
    shard = out / "edufineweb_train_000005.npy"
    if damage == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:1000])  # an interrupted copy, say
    before = {name: (out / name).stat().st_mtime_ns for name in shard_files(out)[:5]}
    capsys.readouterr()
    run([path], out)
    problem = "is missing" if damage == "deleted" else f"has 1,000 bytes, not {fineweb.npy_size(SHARD):,}"
    assert f"{shard} {problem}: making shards 5 to the end again" in capsys.readouterr().out
    assert read_dir(out) == files
    assert {name: (out / name).stat().st_mtime_ns for name in shard_files(out)[:5]} == before  # not rewritten


def test_npy_size_is_the_size_of_np_saves_file():
    for n in [0, 1, 999, 1000, 10**8]:
        assert fineweb.npy_size(n) == len(npy_file(np.zeros(min(n, 1000), np.uint16))) + 2 * (n - min(n, 1000))
