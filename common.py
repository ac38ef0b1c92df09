"""
What train_gpt2.py, fineweb.py and hellaswag.py share, kept out of the lessons: one error type, one way to write
a file so that it is never seen half-written, downloads, GPT-2's tokenizer, the choice of device and dtype, and
a lock that keeps two runs out of one output directory.

Importing this file does nothing: the tokenizer, torch and the network are touched only when a function is called.
"""

import errno
import fcntl
import functools
import hashlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

EOT = 50256  # GPT-2's <|endoftext|>: starts every document


class UserError(Exception):
    """Something the user must fix (data, flags, disk space, network): each main() prints it as one line."""


# -----------------------------------------------------------------------------
# Files: written under a fresh temporary name, synced, then renamed, so a crash never leaves a torn file under
# the real name; an output directory is locked while a program writes into it.

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
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [repr(e)])[0]
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


def download(url, path, sha256=None, timeout=60):
    """Fetch url into path once (checked against its Content-Length and, if given, its sha256); a failed or
    interrupted download leaves nothing under the real name."""
    import http.client
    import urllib.request

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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

    check = f"sha256sum {path} -> {sha256}" if sha256 else ""
    hint = f". Fetch it by hand: curl -L {url} -o {path} {check}".rstrip()
    atomic_write(path, fetch, action=f"download {url} to", hint=hint)
    return path


# The quick start's corpus: Moliere's plays, 2,241,957 bytes
MOLIERE_URL = "https://raw.githubusercontent.com/NoeFlandre/GPT2-From-Scratch/main/data/moliere.txt"
MOLIERE_SHA256 = "8cd86b64cf6dc641b4e12f6cbca92c546eaf0342db86d3c489cb5b9be37be0ea"


def download_moliere(path):
    return download(MOLIERE_URL, path, sha256=MOLIERE_SHA256)


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
    """bf16 autocast: matmuls in bfloat16, reductions (softmax, layernorm) in float32; off for float32 runs."""
    import torch

    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


# -----------------------------------------------------------------------------
# Hugging Face export: GPT-2's tokenizer goes beside the weights, so that AutoTokenizer, pipeline() and
# lm-eval-harness work from the directory alone. Without tokenizer files transformers 5 quietly builds an EMPTY
# GPT-2 tokenizer, and pipeline("text-generation") then hands back the prompt unchanged.

def save_hf_tokenizer(directory, vocab_size=EOT + 1, model_max_length=None):
    """Write GPT-2's tokenizer, converted from the tiktoken encoding we train with, into an exported model's
    directory: tokenizer.json + tokenizer_config.json (what transformers loads) and vocab.json + merges.txt (the
    classic pair other tools read). <|endoftext|> (50256) is bos, eos and unk, as in the hub's gpt2.

    vocab_size: the model's. Past GPT-2's 50,257 ids (a vocabulary padded to 50,304 for speed) the extra ids are
    listed in generation_config.json's suppress_tokens, so transformers' sampling never emits an id the tokenizer
    cannot decode. model_max_length: the model's block_size (tokenizer_config.json; None leaves it unset).
    """
    from transformers import GenerationConfig, GPT2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = get_tokenizer()
    # transformers' own tiktoken -> tokenizers conversion, handed the ranks in memory (its file reader would copy a
    # .tiktoken file into tiktoken's cache). tokenizer.json keeps tiktoken's split pattern; transformers 5 rebuilds
    # a GPT2Tokenizer from its vocabulary and merges with GPT-2's original pattern, which splits text the same way.
    # Either way the ids equal tiktoken's (tests/test_export.py).
    converter = TikTokenConverter(pattern=encoding._pat_str, extra_special_tokens=encoding._special_tokens)
    converter.load_tiktoken_bpe = lambda _: encoding._mergeable_ranks
    backend = converter.converted()
    # GPT2TokenizerFast saves "tokenizer_class": "GPT2Tokenizer", the hub gpt2's class, which transformers 4 loads
    # too (the generic class would save "TokenizersBackend", a name only transformers 5 knows)
    tokenizer = GPT2TokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", model_max_length=model_max_length)
    tokenizer.save_pretrained(directory)
    backend.model.save(str(directory))  # vocab.json + merges.txt

    if vocab_size > EOT + 1:
        path = Path(directory) / "generation_config.json"  # written by GPT2LMHeadModel.save_pretrained
        generation = (GenerationConfig.from_pretrained(directory) if path.exists()
                      else GenerationConfig(bos_token_id=EOT, eos_token_id=EOT))
        generation.suppress_tokens = list(range(EOT + 1, vocab_size))
        generation.save_pretrained(directory)
