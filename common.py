"""
What train_gpt2.py, fineweb.py and hellaswag.py share, kept out of the lessons: one error type, one way to write
a file so that it is never seen half-written, a lock that keeps two runs out of one output directory, downloads,
the shards' names, GPT-2's tokenizer and sizes, and the choice of device and dtype.

Importing this file does nothing: the tokenizer, torch and the network are touched only when a function is called.
"""

import errno
import fcntl
import functools
import hashlib
import os
import re
import shlex
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

GPT2_VOCAB = 50257  # GPT-2's tokenizer: 50,000 merges + 256 bytes + <|endoftext|>
EOT = 50256  # GPT-2's <|endoftext|>, its last id: starts every document
GPT2_124M_CORE = 0.1139  # OpenAI's GPT-2 124M's CORE, as nanochat measured it (core.py prints it, plot.py draws it)


class UserError(Exception):
    """Something the user must fix (data, flags, disk space, network): each main() prints it as one line."""


def first_line(error):
    """The first line of an exception's message for a one-line error, or its type's name when the message is empty
    (str(KeyError()) is "", so an error path that took splitlines()[0] would raise while reporting)."""
    return next(iter(str(error).splitlines()), "") or type(error).__name__


def all_reduce(value, world, op="sum"):
    """A number combined over all ranks ("sum", "max" or "min"), the same on every rank; one process: the value
    itself. In float64, so counts stay exact (to 2**53)."""
    if world.world_size == 1:
        return value
    import torch

    t = torch.tensor(value, dtype=torch.float64, device=world.device)
    torch.distributed.all_reduce(t, op={"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
                                        "min": torch.distributed.ReduceOp.MIN}[op])
    return t.tolist()


def print0(*text, **kwargs):
    """print() on rank 0 only (nanochat's print0): under torchrun every rank runs the same code, and a message
    printed by each of them says the same thing eight times. RANK is torchrun's; a plain process is rank 0."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*text, **kwargs)


# -----------------------------------------------------------------------------
# Files: written under a fresh temporary name, synced, then renamed, so a crash never leaves a torn file under
# the real name; an output directory is locked while a program writes into it.

PATH_KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def path_kind(path):
    """"a file", "a directory", "a FIFO (named pipe)", ... for what is at `path`; None where nothing is. Found by
    stat, never by opening it: opening a FIFO waits for a writer, forever if none comes. A path the OS refuses (a
    name over 255 bytes, a file used as a folder, no permission) raises its OSError."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    return next((kind for is_kind, kind in PATH_KINDS if is_kind(mode)), "not a regular file")


def what_is(path):
    """path_kind worded to follow "PATH is", for messages about a path that is not what was expected."""
    try:
        return path_kind(path) or "missing (no such file or directory)"
    except NotADirectoryError:
        return "missing (no such file or directory)"
    except OSError as e:  # a name too long, no permission, a loop of links, ...
        return f"unusable ({e.strerror or e})"


def free_gb(path):
    try:
        return shutil.disk_usage(Path(path).parent).free / 1e9
    except OSError:
        return float("nan")


@functools.cache
def umask():
    """This process's umask, read once (reading it means setting it, then setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write, hint="", action="write"):
    """Call write(f) on a new temp file beside `path`, fsync it, then rename it to `path`.

    The temp file is created by mkstemp (O_CREAT | O_EXCL, a random name), so a file or link planted under a
    predictable name is never followed or overwritten. Any failure (a full disk shows up as OSError, or as a
    RuntimeError from torch.save) removes the temp file and becomes one UserError that says how much is free.
    """
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600 files: give it the mode open(path, "wb") would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk, not just in the page cache, before it gets its name
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        if not isinstance(e, OSError) or e.errno in (errno.ENOSPC, errno.EDQUOT):  # torch.save: RuntimeError
            reason += f"; {free_gb(path):.2f} GB free there"
        raise UserError(f"could not {action} {path} ({reason}){hint}") from None
    return path


def lock_directory(directory, program):
    """Take an exclusive lock on directory/.lock for as long as this process lives (the OS drops it when the
    process ends, however it ends). A second run into the same directory is refused, naming the holder."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise UserError(f"cannot write into {directory} ({e.strerror}): choose a writable directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{directory} is in use by {holder}: wait for it to finish, or write elsewhere") from None
    try:  # who holds it, for the message a second run gets
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{program} (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')})"
                  .encode(), 0)
    except OSError as e:
        os.close(fd)
        raise UserError(f"cannot write into {directory} ({e.strerror}): free some space or choose another "
                        f"directory") from None
    return fd  # keep it: closing the descriptor releases the lock


def new_directories(directory):
    """The directories that mkdir(parents=True) would create for `directory`, outermost first."""
    missing = []
    for d in [Path(directory), *Path(directory).parents]:
        if d.exists():
            break
        missing.append(d)
    return missing[::-1]


def remove_if_empty(directories):
    """Remove the directories this program created (new_directories), innermost first, where nothing is in them."""
    for d in reversed(directories):
        try:
            d.rmdir()
        except OSError:  # not empty (then neither are the ones outside it), never made, or already gone
            continue


def real_path(path):
    """The path with every symlink, `..` and `./` resolved, as far as it exists (a file still to be written has none
    of its own). os.path.realpath, not Path.resolve: a loop of links or a name too long gives a path, not an error."""
    return Path(os.path.realpath(path))


def same_file(a, b):
    """Whether two paths name one file or directory: by device and inode where both exist (hard links, bind
    mounts), else by their real paths."""
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:  # one is still to be written (or unreadable): compare what the names resolve to
        return real_path(a) == real_path(b)


def output_conflicts(outputs, inputs, fix=None):
    """Every place where an output of a program meets one of its inputs, as one problem each (a list of strings).

    outputs and inputs: {flag: path, or a list of paths, or None}; a directory stands for everything in it: a
    directory an output writes into (fineweb.py's --out), or one an input is read from (a model directory, CORE's
    bundle). An output is refused where it is an input, is inside an input's directory, or holds an input: written,
    it would destroy what the program reads, or plant a file among it. Paths are compared resolved, so a symlink,
    a hard link or a ./ form of the same file is caught. fix: what to do (default: choose another <output flag>)."""
    def listed(paths):
        return [(flag, p) for flag, ps in paths.items() if ps
                for p in ([ps] if isinstance(ps, (str, os.PathLike)) else ps)]

    problems = []
    for out_flag, out in listed(outputs):
        todo = fix or f"choose another {out_flag}"
        for in_flag, path in listed(inputs):
            o, i = real_path(out), real_path(path)
            if same_file(out, path):
                problems.append(f"{out_flag} {out} is the same file as {in_flag} {path}: writing it would destroy "
                                f"that input; {todo}")
            elif o.is_relative_to(i):
                problems.append(f"{out_flag} {out} is inside {in_flag} {path}: outputs never go among the inputs; "
                                f"{todo}")
            elif i.is_relative_to(o):
                problems.append(f"{in_flag} {path} is inside {out_flag} {out}, which this program writes into; {todo}")
    return problems


def check_outputs(outputs, inputs, fix=None):
    """One UserError naming every output that would overwrite or land among the inputs (output_conflicts), raised
    before any work: a result written last would otherwise replace, say, the checkpoint it scored."""
    if problems := output_conflicts(outputs, inputs, fix):
        raise UserError("; ".join(problems))


def download(url, path, sha256=None, timeout=60):
    """Fetch url into path once (checked against its Content-Length and, if given, its sha256); a failed or
    interrupted download leaves nothing behind: no file under the real name, and no folder it created."""
    import http.client
    import urllib.request

    path = Path(path)
    created = new_directories(path.parent)
    print(f"downloading {url} -> {path}")

    def fetch(f):
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                # urllib ends quietly when a connection drops early, so compare with the announced size
                expected = response.headers.get("Content-Length")
        except http.client.HTTPException as e:  # a malformed answer is not an OSError
            raise OSError(str(e)) from None
        if expected is not None and f.tell() != int(expected):
            raise OSError(f"connection closed after {f.tell()} of {expected} bytes")
        if sha256 and digest.hexdigest() != sha256:
            raise OSError(f"sha256 {digest.hexdigest()} differs from the expected {sha256}")

    # two commands, each runnable as printed (quoted for a shell), rather than one line to take apart
    hint = f". Fetch it by hand: `curl -L --create-dirs -o {shlex.quote(str(path))} {shlex.quote(url)}`"
    if sha256:
        hint += f", then check it: `echo {shlex.quote(f'{sha256}  {path}')} | sha256sum -c`"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, fetch, action=f"download {url} to", hint=hint)
    except (OSError, UserError) as e:
        remove_if_empty(created)
        if isinstance(e, OSError):
            raise UserError(f"could not create {path.parent} ({e.strerror or e}){hint}") from None
        raise
    return path


# The quick start's corpus: Moliere's plays, 2,241,957 bytes
MOLIERE_URL = "https://raw.githubusercontent.com/NoeFlandre/GPT2-From-Scratch/main/data/moliere.txt"
MOLIERE_SHA256 = "8cd86b64cf6dc641b4e12f6cbca92c546eaf0342db86d3c489cb5b9be37be0ea"


def download_moliere(path):
    return download(MOLIERE_URL, path, sha256=MOLIERE_SHA256)


# -----------------------------------------------------------------------------
# Token shards: fineweb.py writes them and train_gpt2.py reads them, so their names are defined here, once.

SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d{6})\.npy$")
SHARD_HINT = "HINT: make shards with `python fineweb.py` (or pass --data PATH: a shard directory or a .txt file)"


def shard_name(prefix, index):
    """{prefix}_{split}_{index:06d}.npy, build-nanogpt's names: shard 0 is the validation split, the rest train."""
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def list_shards(directory):
    """[(split, path)] of a directory's shards in index order, checked as a set: one prefix, indices 0..N-1."""
    found = sorted((int(m["index"]), m["prefix"], m["split"], p) for p in Path(directory).iterdir()
                   if (m := SHARD_NAME.match(p.name)))
    if not found:
        raise UserError(f"no shards (*_val_000000.npy, *_train_000001.npy, ...) in {directory}. {SHARD_HINT}")
    prefixes = sorted({prefix for _, prefix, _, _ in found})
    if len(prefixes) > 1:
        raise UserError(f"{directory} mixes shards of several runs (prefixes {', '.join(prefixes)}): keep one")
    indices = [i for i, _, _, _ in found]
    if indices != list(range(len(found))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))[:5] or "duplicates"
        raise UserError(f"{directory}: shard indices have gaps (missing {missing}): a shard was lost; rerun fineweb.py")
    return [(split, p) for _, _, split, p in found]


def split_paths(directory, split):
    """The shard files of one split ("train" or "val") of a shard directory, checked as a set (list_shards)."""
    if not Path(directory).is_dir():
        raise UserError(f"--data {directory} is {what_is(directory)}, not a shard directory. {SHARD_HINT}")
    paths = [p for s, p in list_shards(directory) if s == split]
    if not paths:  # fineweb.py fills shard 0, the val shard, first: a small corpus gives no train shard
        raise UserError(f"no {split} shards (*_{split}_NNNNNN.npy) in {directory}" + (
            ": its corpus was smaller than fineweb.py's --shard_size, which fills the val shard first; run "
            "fineweb.py again with a smaller --shard_size (a tenth of the corpus's tokens)" if split == "train"
            else f". {SHARD_HINT}"))
    return paths


def read_text_file(path):
    """The text of a UTF-8 file given as --data, or one line saying what is wrong with it."""
    if not Path(path).is_file():
        raise UserError(f"--data {path} is {what_is(path)}, not a text file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read text file {path} ({e}): --data takes a UTF-8 .txt file") from None


def load_shard(path):
    """A shard as a memory map: 100M tokens cost no memory until their pages are read."""
    import numpy as np

    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # truncated, pickled objects, not .npy at all
        raise UserError(f"{path} is not a readable .npy shard ({first_line(e)}). "
                        f"HINT: regenerate it with `python fineweb.py`") from None


def check_tokens(array, name, T, vocab_size=None):
    """A token array fit for training, checked before step 0 (one pass over a memory map) rather than as an
    IndexError hours into the run: 1-D uint16, at least one window of T+1 tokens, every id in the vocabulary."""
    import numpy as np

    if array.dtype != np.uint16 or array.ndim != 1:
        raise UserError(f"{name}: expected a 1-D uint16 token array, found {array.dtype} {array.shape}. "
                        f"HINT: regenerate it with `python fineweb.py`")
    if len(array) < T + 1:
        raise UserError(f"{name}: {len(array)} tokens, fewer than one window of T+1 = {T + 1}")
    if vocab_size is not None and (top := int(array.max())) >= vocab_size:
        raise UserError(f"{name}: holds token id {top}, outside the model's vocabulary of {vocab_size}")


# -----------------------------------------------------------------------------
# GPT-2's tokenizer, device and dtype.

@functools.cache
def get_tokenizer():
    """GPT-2's BPE (tiktoken), created on first use: tiktoken downloads its two files once and caches them."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 -- offline, the first use is a network error of one kind or another
        raise UserError(f"could not load GPT-2's tokenizer: tiktoken fetches it on first use ({type(e).__name__}); "
                        f"connect once, or point TIKTOKEN_CACHE_DIR at a copy of its cache") from None


def pick_device(requested="auto"):
    """'auto' -> cuda, then mps, then cpu; an explicit choice must be available here."""
    import torch

    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if available[d])
    if not available.get(requested):
        raise UserError(f"--device {requested} is not available here; use --device auto or cpu")
    return requested


def cpu_has_native_bf16():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested, device_type, cuda_capability=None):
    """--dtype auto: bfloat16 where the hardware computes it natively, float32 elsewhere.

    CUDA: compute capability 8.0 and newer (A100, H100, RTX 30xx+); older GPUs (V100, T4) emulate bf16 slowly and
    torch.compile skips it there. CPUs: AVX-512 BF16 or AMX (1.3x faster than float32 on this project's CI machine).
    MPS and other CPUs: float32.
    """
    if requested != "auto":
        return requested
    if device_type == "cuda":
        if cuda_capability is None:
            import torch

            cuda_capability = torch.cuda.get_device_capability()
        return "bfloat16" if tuple(cuda_capability) >= (8, 0) else "float32"
    if device_type == "cpu":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return "float32"


def autocast(device_type, dtype):
    """bf16 autocast: matmuls in bfloat16, reductions (softmax, layernorm) in float32; off for float32 runs. dtype is
    the flag's name, "bfloat16" or "float32", as nanoGPT's `dtype`; ptdtype is the torch dtype it names."""
    import torch

    ptdtype = getattr(torch, dtype)
    return torch.autocast(device_type, dtype=ptdtype, enabled=ptdtype is torch.bfloat16)


# -----------------------------------------------------------------------------
# GPT-2's four sizes (their Hugging Face mappings and exports: huggingface.py)

GPT2_SHAPES = {  # (n_layer, n_head, n_embd) of OpenAI's four GPT-2 sizes, by their names on the Hugging Face hub
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600),
}
