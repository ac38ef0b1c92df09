"""fineweb.py: exact token streams, shard names and sizes, worker-independence, resume, bad inputs."""
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

import fineweb

ROOT = Path(fineweb.__file__).resolve().parent
EOT = 50256
SHARD = 1000  # tokens per shard in these tests: the documents below fill 25 shards


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


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}, ensure_ascii=False) + "\n")
    return str(path)


def write_parquet(path, docs):
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=7)
    return str(path)


def run(inputs, out, *extra, workers=1, shard_size=SHARD):
    fineweb.main(["--input", *inputs, "--out", str(out), "--shard_size", str(shard_size), "--workers", str(workers),
                  *extra])


def shard_files(out):
    """The shards in index order (by name, train would come before val)."""
    return sorted((p for p in os.listdir(out) if p.endswith(".npy")), key=lambda name: name.split("_")[-1])


def read_dir(out):
    """Every file in `out` (shards and manifest) -> its bytes, to compare whole runs byte for byte."""
    return {name: (Path(out) / name).read_bytes() for name in sorted(os.listdir(out))}


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
    path = write_jsonl(tmp / "docs.jsonl", docs)
    run([path], tmp / "out", workers=2)
    return path, read_dir(tmp / "out")


def test_tokenize_is_eot_then_encode_ordinary():
    enc = tiktoken.get_encoding("gpt2")
    tokens = fineweb.tokenize("Hello world <|endoftext|>")
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [EOT] + enc.encode_ordinary("Hello world <|endoftext|>")


def test_import_does_no_work():
    code = "import sys, fineweb; assert fineweb._encoder is None; assert 'datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_jsonl_shards_hold_every_document_in_order(docs, reference, tmp_path):
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
    # byte for byte what build-nanogpt's np.save(filename, tokens_np) writes: its shards and ours are interchangeable
    np.save(tmp_path / "edufineweb_val_000000", tokens[:SHARD])
    assert (tmp_path / "edufineweb_val_000000.npy").read_bytes() == files["edufineweb_val_000000.npy"]
    # the manifest's resume points: shard i ends next_doc_offset tokens into document next_doc
    manifest = json.loads(files["manifest.json"])
    assert manifest["complete"] and manifest["tokens"] == len(tokens) and manifest["documents"] == len(docs)
    starts = np.cumsum([0] + [len(fineweb.tokenize(doc)) for doc in docs])
    for i, shard in enumerate(manifest["shards"]):
        assert starts[shard["next_doc"]] + shard["next_doc_offset"] == min(SHARD * (i + 1), len(tokens))


def test_workers_do_not_change_the_output(reference, tmp_path):
    path, files = reference
    run([path], tmp_path / "one", workers=1)
    run([path], tmp_path / "three", workers=3)
    assert read_dir(tmp_path / "one") == files
    assert read_dir(tmp_path / "three") == files


def test_parquet_gives_the_same_shards_as_jsonl(docs, reference, tmp_path):
    _, files = reference
    run([write_parquet(tmp_path / "docs.parquet", docs)], tmp_path / "out", workers=2)
    shards = {name: data for name, data in read_dir(tmp_path / "out").items() if name.endswith(".npy")}
    assert shards == {name: data for name, data in files.items() if name.endswith(".npy")}


def test_txt_files_are_one_document_each_and_inputs_chain_in_order(docs, tmp_path):
    paths = []
    for i, doc in enumerate(docs[:10]):
        paths.append(str(tmp_path / f"doc{i}.txt"))
        Path(paths[-1]).write_text(doc, encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "rest.jsonl", docs[10:20])
    run(paths + [jsonl], tmp_path / "out")
    assert np.array_equal(concatenated(tmp_path / "out"), expected_tokens(docs[:20]))


def test_shards_ending_on_document_boundaries(tmp_path):
    # "hello world" is 2 tokens, 3 with <|endoftext|>: shards of 6 hold exactly two documents, and no empty
    # shard follows the last full one
    path = write_jsonl(tmp_path / "docs.jsonl", ["hello world"] * 10)
    run([path], tmp_path / "out", shard_size=6)
    assert [np.load(tmp_path / "out" / name).size for name in shard_files(tmp_path / "out")] == [6] * 5
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["next_doc"], s["next_doc_offset"]) for s in manifest["shards"]] == [(2, 0), (4, 0), (6, 0), (8, 0),
                                                                                   (10, 0)]


def interrupt_after(monkeypatch, n_shards):
    """Makes the next run stop like Ctrl-C right after its n-th finished shard."""
    finish_shard = fineweb.finish_shard

    def finish_then_interrupt(out, manifest, *rest):
        finish_shard(out, manifest, *rest)
        if len(manifest["shards"]) == n_shards:
            raise KeyboardInterrupt
    monkeypatch.setattr(fineweb, "finish_shard", finish_then_interrupt)


@pytest.mark.parametrize("n_shards", [1, 8])
def test_resume_after_interrupt_gives_identical_files(docs, reference, tmp_path, monkeypatch, n_shards):
    path, files = reference
    with monkeypatch.context() as patch:
        interrupt_after(patch, n_shards)
        with pytest.raises(SystemExit, match=f"{n_shards} shards finished; run the same command again"):
            run([path], tmp_path / "out", workers=2)
    assert len(shard_files(tmp_path / "out")) == n_shards
    (tmp_path / "out" / f"edufineweb_train_{n_shards:06d}.npy.tmp").write_bytes(b"torn")  # a crash's partial shard
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    first_texts = []
    batches = fineweb.batches
    monkeypatch.setattr(fineweb, "batches", lambda documents: batches(first_texts.append(d) or d for d in documents))
    run([path], tmp_path / "out", workers=2)
    assert read_dir(tmp_path / "out") == files
    # the finished shards' documents were skipped, not tokenized again
    assert first_texts[0] == docs[manifest["shards"][-1]["next_doc"]]


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_resume_after_a_hard_kill(reference, tmp_path):
    # the process and its workers die with SIGKILL while writing the fourth shard: no clean-up runs at all
    path, files = reference
    script = """if True:
        import os, signal, sys, fineweb
        fineweb.BATCH_CHARS = 500
        finish_shard = fineweb.finish_shard
        def finish_or_die(out, manifest, tokens, *rest):
            if len(manifest["shards"]) == 3:
                with open(os.path.join(out, "edufineweb_train_000003.npy.tmp"), "wb") as f:
                    f.write(tokens[:10].tobytes())
                os.killpg(0, signal.SIGKILL)
            finish_shard(out, manifest, tokens, *rest)
        fineweb.finish_shard = finish_or_die
        fineweb.main(sys.argv[1:])
    """
    args = ["--input", path, "--out", str(tmp_path / "out"), "--shard_size", str(SHARD), "--workers", "2"]
    killed = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, start_new_session=True,
                            capture_output=True, check=False)
    assert killed.returncode == -9
    assert len(shard_files(tmp_path / "out")) == 3
    subprocess.run([sys.executable, "fineweb.py", *args], cwd=ROOT, check=True, capture_output=True)
    assert read_dir(tmp_path / "out") == files


def test_rerun_of_a_complete_run_changes_nothing(reference, tmp_path, capsys):
    path, _ = reference
    run([path], tmp_path / "out")
    times = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    run([path], tmp_path / "out")
    assert "already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == times


def test_spawn_start_method_gives_the_same_shards(reference, tmp_path):
    # macOS and Windows start workers with spawn: they import fineweb afresh and must find everything they need
    path, files = reference
    code = ("import multiprocessing as mp, sys, fineweb; mp.set_start_method('spawn'); fineweb.BATCH_CHARS = 500; "
            "fineweb.main(sys.argv[1:])")
    subprocess.run([sys.executable, "-c", code, "--input", path, "--out", str(tmp_path / "out"),
                    "--shard_size", str(SHARD), "--workers", "2"], cwd=ROOT, check=True, capture_output=True)
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


def test_benchmark_reports_our_rate_and_the_ceiling(reference):
    path, _ = reference
    result = fineweb.benchmark([path], workers=2)
    assert result["tokens"] == json.loads(reference[1]["manifest.json"])["tokens"]
    assert result["ceiling_tokens_per_s"] > 0 and result["tokens_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["tokens_per_s"] / result["ceiling_tokens_per_s"], abs=1e-3)


def test_default_out_is_beside_the_script(tmp_path, monkeypatch):
    seen = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fineweb, "load_manifest", lambda out, config: seen.append(out) or fineweb.fail("stop"))
    with pytest.raises(SystemExit):
        fineweb.main(["--input", write_jsonl(tmp_path / "d.jsonl", ["x"])])
    assert seen == [str(ROOT / "edu_fineweb10B")]


# -----------------------------------------------------------------------------
# the hub code path, with datasets.load_dataset replaced by an in-memory dataset


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_dataset_and_its_resume(docs, reference, tmp_path, monkeypatch, streaming):
    datasets = pytest.importorskip("datasets")
    _, files = reference
    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        ds = datasets.Dataset.from_list([{"text": doc, "id": i} for i, doc in enumerate(docs)])
        return ds.to_iterable_dataset(num_shards=3) if kwargs["streaming"] else ds
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    argv = ["--out", str(tmp_path / "out"), "--shard_size", str(SHARD), "--workers", "2"]
    argv += ["--streaming"] if streaming else []
    with monkeypatch.context() as patch:
        interrupt_after(patch, 5)
        with pytest.raises(SystemExit, match="run the same command again"):
            fineweb.main(argv)
    fineweb.main(argv)
    assert calls[0] == ("HuggingFaceFW/fineweb-edu", {"name": "sample-10BT", "split": "train",
                                                      "streaming": streaming})
    assert {n: d for n, d in read_dir(tmp_path / "out").items() if n.endswith(".npy")} == \
        {n: d for n, d in files.items() if n.endswith(".npy")}
    with pytest.raises(SystemExit, match=r"no column 'body' \(columns: text, id\)"):
        fineweb.main(argv[:1] + [str(tmp_path / "other")] + argv[2:] + ["--text_field", "body"])


def test_hub_failure_is_one_line(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def load_dataset(path, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(SystemExit, match="cannot load HuggingFaceFW/fineweb-edu .--name sample-10BT.: ConnectionError"):
        fineweb.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# bad inputs: one line saying what is wrong and what to do


def error_of(capsys, argv):
    with pytest.raises(SystemExit) as error:
        fineweb.main(argv)
    message = str(error.value.code) if isinstance(error.value.code, str) else capsys.readouterr().err
    assert "Traceback" not in message
    return message.strip().splitlines()[-1]


def test_missing_text_field_names_the_fields(tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "d.jsonl", ["a", "b"], field="content")
    message = error_of(capsys, ["--input", jsonl, "--out", str(tmp_path / "o")])
    assert "d.jsonl:1: no field 'text' (fields: id, content); pick one with --text_field" in message
    parquet = write_parquet(tmp_path / "d.parquet", ["a"])
    message = error_of(capsys, ["--input", parquet, "--text_field", "body", "--out", str(tmp_path / "o")])
    assert "no column 'body' (columns: id, text)" in message


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", b'{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n', "bad.jsonl:4: not valid JSON"),
    ("bad.jsonl", b'{"text": "a"}\n["a list"]\n', "bad.jsonl:2: no field 'text' (fields: none, a list)"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": null}\n', "a document's text is NoneType, not a string"),
    ("bad.jsonl", b'{"text": "\xff"}\n', "bad.jsonl:1: not valid JSON"),
    ("bad.txt", b"caf\xe9", "bad.txt: not UTF-8 text"),
    ("bad.parquet", b"not parquet at all", "bad.parquet: not a readable parquet file"),
    ("empty.jsonl", b"\n\n", "the input holds no documents"),
    ("notes.csv", b"text\nhello\n", "unknown file type; use .txt (one document), .jsonl or .parquet"),
])
def test_bad_files(tmp_path, capsys, name, content, expected):
    (tmp_path / name).write_bytes(content)
    assert expected in error_of(capsys, ["--input", str(tmp_path / name), "--out", str(tmp_path / "out")])
    if name in ("empty.jsonl", "notes.csv"):
        assert not (tmp_path / "out").exists()  # checked before anything is written


def test_missing_file(tmp_path, capsys):
    message = error_of(capsys, ["--input", str(tmp_path / "nowhere.jsonl"), "--out", str(tmp_path / "o")])
    assert "nowhere.jsonl: no such file" in message


def test_out_dir_of_another_configuration_is_refused(reference, tmp_path, capsys):
    path, _ = reference
    run([path], tmp_path / "out")
    message = error_of(capsys, ["--input", path, "--out", str(tmp_path / "out"), "--shard_size", "2000"])
    assert "holds shards of another configuration (shard_size 1000 there, 2000 now)" in message
    assert "use another --out, or delete" in message
    other = write_jsonl(tmp_path / "other.jsonl", ["x"])
    assert "input [[" in error_of(capsys, ["--input", other, "--out", str(tmp_path / "out"), "--shard_size", "1000"])


def test_out_dir_with_foreign_shards_is_refused(reference, tmp_path, capsys):
    path, _ = reference
    (tmp_path / "out").mkdir()
    np.save(tmp_path / "out" / "edufineweb_val_000000.npy", np.zeros(10, dtype=np.uint16))
    message = error_of(capsys, ["--input", path, "--out", str(tmp_path / "out")])
    assert "holds .npy files but no manifest.json from fineweb.py" in message
