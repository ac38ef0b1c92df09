"""Shared test set-up: offline tokenizer files, the project root on sys.path, the `slow` marker, tiny runs."""
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def workplace_files():
    """The workplace's shared folder (tokenizer files, the Molière corpus), beside this checkout or beside the
    repository it was cloned from, as .ci/run looks for it; users' machines have none and download instead."""
    origin = subprocess.run(["git", "config", "--get", "remote.origin.url"], cwd=ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()
    for place in (ROOT.parent, Path(origin).parent if origin else None):
        if place is not None and (place / "shared").is_dir():
            return place / "shared"
    return ROOT.parent / "shared"


SHARED = workplace_files()

# GPT-2's tokenizer without network where the workplace provides its files (CI and development).
if (SHARED / "tiktoken").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


import numpy as np  # noqa: E402
import pytest  # noqa: E402

# A tiny GPT on a tiny vocabulary: every training test runs in seconds on a 2-core CPU. TINY_SHAPE is the model's
# shape, which a resumed or fine-tuned checkpoint fixes; TINY_RUN the rest of the run.
TINY_SHAPE = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--vocab_size", "128"]
TINY_RUN = ["-T", "32", "-B", "4", "--total_batch_size", "256", "--max_lr", "1e-2", "--warmup_steps", "2",
            "--max_steps", "10", "--eval_every", "5", "--val_tokens", "256", "--hellaswag_every", "0",
            "--sample_every", "0", "--checkpoint_every", "0", "--device", "cpu", "--dtype", "float32"]
TINY = TINY_SHAPE + TINY_RUN


def write_shards(directory, sizes, seed=0, prefix="edufineweb"):
    """uint16 shards as fineweb.py writes them (shard 0 val, the rest train) holding a learnable token stream:
    a random walk over 128 ids, each step +1 or +2, so a model can get well below the uniform loss."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(sizes):
        tokens = (np.cumsum(rng.integers(1, 3, size=n)) % 128).astype(np.uint16)
        np.save(directory / f"{prefix}_{'val' if i == 0 else 'train'}_{i:06d}.npy", tokens)
    return directory


@pytest.fixture(autouse=True)
def signal_handlers_back():
    """A run stopped by a signal ignores later signals until its process ends (bookkeeping.StopSignals); in-process
    tests get this process's handlers back after each test."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards", [4000, 6000, 5000])


def read_log(path):
    """{(step, kind): value} of a log.txt, the later line winning (a resumed run may log a step twice, and the
    README says readers keep the later line)."""
    records = {}
    for line in open(path):
        if not line.startswith("#"):
            step, kind, value = line.split()
            records[int(step), kind] = value
    return records


def train(shards, log_dir, *extra, base=TINY):
    """train_gpt2.main in-process on `base` (TINY) plus extra flags; returns the run's log.txt as read_log reads it."""
    import train_gpt2

    train_gpt2.main([*base, "--data", str(shards), "--log_dir", str(log_dir), *extra])
    return read_log(Path(log_dir) / "log.txt")


def lrs_of(out):
    """{step: lr} from train_gpt2's stdout."""
    import re

    return {int(m[1]): float(m[2]) for m in re.finditer(r"step +(\d+) \| loss \S+ \| lr (\S+)", out)}


def torchrun_cpu(args, log_dir, nproc=2):
    """train_gpt2.py under torchrun with `nproc` CPU ranks (gloo), one thread each on this small machine; returns the
    finished process (its stdout, stderr)."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                          str(ROOT / "train_gpt2.py"), *args, "--log_dir", str(log_dir)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out
