"""
Checkpoints and exact resume for train_gpt2.py: what its training loop saves and restores, which a reader of the
lesson need not see inline.

A checkpoint holds everything needed to continue a run exactly: the model (no `_orig_mod.`/`module.` prefixes),
its config, the step, the optimizer, every rank's data position and random generators, the run's flags, and a
checksum of all of it, tensors and metadata (a flipped byte on disk is refused, not trained on or obeyed). It is
written under a temporary name and renamed (common.atomic_write), so a crash never leaves a torn file under a real
name. Restoring a checkpoint into a run is here too; the rest of resuming is bookkeeping.py's.
"""

import dataclasses
import pickle
import random
import re
import subprocess
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

import memory
from common import UserError, atomic_write, first_line, print0

CHECKPOINT_NAME = re.compile(r"^model_(\d+)\.pt$")


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, check=False)
        return out.stdout.strip() or "unknown"
    except OSError:  # no git on this machine
        return "unknown"


# -----------------------------------------------------------------------------
# What goes into a checkpoint

def rng_state(world):
    """This rank's random generators (training itself draws no random numbers, but user changes might)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached), "torch": torch.get_rng_state()}
    if world.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(world.device)
    return state


def set_rng_state(state, world):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if world.device_type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], world.device)


def checksum(obj):
    """CRC32 of a nested dict/list of tensors and plain values: every tensor's bytes (about 1 GB/s: a second for
    GPT-2 124M), every other value's repr and every key, so that flags and steps are covered as well as weights."""
    if isinstance(obj, torch.Tensor):
        return zlib.crc32(obj.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy())
    if isinstance(obj, dict):
        items = [(repr(k), v) for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0]))]
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    else:
        return zlib.crc32(f"{type(obj).__name__}:{obj!r}".encode())
    crc = zlib.crc32(type(obj).__name__.encode())
    for key, value in items:
        crc = zlib.crc32(f"{key}={checksum(value)};".encode(), crc)
    return crc


def non_finite(obj, where=""):
    """The names of the floating-point tensors in a nested dict/list that hold a nan or an inf."""
    if isinstance(obj, torch.Tensor):
        return [where] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [name for k, v in items for name in non_finite(v, f"{where}.{k}" if where else str(k))]


def gather_objects(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world.world_size == 1:
        return [obj]
    out = [None] * world.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def save_checkpoint(log_dir, step, raw_model, optimizers, train_loader, record, cfg, world):
    """model_{step:05d}.pt: the state after `step` updates. Every rank calls this (it gathers their states). record:
    what the run says of itself, {"val_loss": the latest val loss, "run": the run's id} (checkpoint_identity)."""
    ranks = gather_objects({"loader": train_loader.state_dict(), "rng": rng_state(world)}, world)
    path = Path(log_dir) / f"model_{step:05d}.pt"
    failed = None
    model_state, optimizer_state = memory.full_state(raw_model, optimizers)  # every rank: --fsdp gathers
    if world.is_master:
        if bad := non_finite({"model": model_state, "optimizer": optimizer_state}):
            # a run resumed from such a file would only train nan further: the earlier checkpoints are worth more
            failed = UserError(f"not saving step {step}: {', '.join(bad[:3])} hold nan or inf. Earlier checkpoints "
                               f"are intact; lower the learning rate in a new run")
    if world.is_master and failed is None:
        checkpoint = {
            "model": model_state,  # the uncompiled module: no _orig_mod. or module. prefixes
            "config": dataclasses.asdict(raw_model.config), "revision": raw_model.revision, "step": step, **record,
            "optimizer": optimizer_state, "loaders": [r["loader"] for r in ranks],
            "rng": [r["rng"] for r in ranks], "args": dataclasses.asdict(cfg),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_commit(), "torch": str(torch.__version__),
        }
        checkpoint["checksum"] = checksum(checkpoint)  # of everything above
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f),
                         hint=". Earlier checkpoints are intact: free some space, then continue with --resume")
            prune_checkpoints(log_dir, cfg.keep_checkpoints, step, record["run"])
        except UserError as e:
            failed = e
    # every rank learns whether rank 0 succeeded (this also holds them until the file is complete)
    if any(gather_objects(failed is not None, world)):
        raise failed or UserError("rank 0 could not write a checkpoint")
    return path


# -----------------------------------------------------------------------------
# Finding and reading checkpoints

def list_checkpoints(log_dir):
    """Complete checkpoints in log_dir, oldest first (a temp file from a crash never matches the name)."""
    found = [(int(m[1]), p) for p in Path(log_dir).glob("model_*.pt") if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path):
    """The step in a checkpoint's name: model_00120.pt -> 120."""
    return int(CHECKPOINT_NAME.match(Path(path).name)[1])


def prune_checkpoints(log_dir, keep, step, run):
    """Keep this run's newest `keep` checkpoints up to `step`, the one just written. Only files that are what their
    names say, checkpoints of this run (checkpoint_identity), are ever deleted: a later step (a file --resume skipped
    as corrupt, say) or another run's file copied in is neither pruned nor counted."""
    if keep > 0:
        ours = [p for p in list_checkpoints(log_dir) if checkpoint_step(p) <= step
                and checkpoint_identity(p) == (run, checkpoint_step(p))]
        for path in ours[:-keep]:
            path.unlink()


def checkpoint_identity(path):
    """(run id, step) read from a checkpoint file without reading its tensors (memory-mapped), or None when it cannot
    be read. The run id is made at a run's first start and kept by every resume (None in files older than it)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return checkpoint.get("run"), checkpoint.get("step")
    except Exception:  # noqa: BLE001 -- torn, foreign: not a checkpoint whose identity can be told
        return None


def name_problem(path, checkpoint):
    """Why a checkpoint's file name and its content disagree (model_00020.pt holding step 5: a copy renamed), or None.
    Files named otherwise (best.pt) are not told by their names."""
    m = CHECKPOINT_NAME.match(Path(path).name)
    if m and int(m[1]) != checkpoint["step"]:
        return (f"{path} holds step {checkpoint['step']}, not the step {int(m[1])} its name says: a copy of another "
                f"checkpoint under another name? Rename it model_{checkpoint['step']:05d}.pt, or move it out of "
                f"{Path(path).parent}")
    return None


MODEL_KEYS = {"model": dict, "config": dict, "step": int}  # what from_checkpoint needs
RESUME_KEYS = {"optimizer": list, "loaders": list, "rng": list, "args": dict}  # and what --resume needs


def load_checkpoint(path, map_location="cpu", for_resume=False):
    """A checkpoint's contents, checked: its structure, and its tensors against the checksum saved with them.
    weights_only: plain tensors and containers, so no code in the file runs on load."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip: anything else (torn, foreign) never reaches torch
        raise UserError(f"{path} is not a readable checkpoint (not a complete torch.save file: a torn write, or "
                        f"another kind of file)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object (torch's message advises weights_only=False)
        raise UserError(f"{path} is not a checkpoint of train_gpt2.py (it holds Python objects other than tensors, "
                        f"never loaded: loading them would run code from the file)") from None
    except Exception as e:  # noqa: BLE001 -- a damaged zip: torch raises several kinds
        raise UserError(f"{path} is not a readable checkpoint ({first_line(e)})") from None
    expected = {**MODEL_KEYS, **(RESUME_KEYS if for_resume else {})}
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a checkpoint of train_gpt2.py (it holds a {type(checkpoint).__name__})")
    wrong = [k for k, kind in expected.items() if not isinstance(checkpoint.get(k), kind)]
    if wrong:
        raise UserError(f"{path} is not a checkpoint of train_gpt2.py (missing or malformed: {', '.join(wrong)})")
    saved = checkpoint.pop("checksum", None)  # (files of older versions hold a dict here, of their tensors only)
    if isinstance(saved, int) and checksum(checkpoint) != saved:
        raise UserError(f"{path} is corrupt: its contents do not match the checksum saved with them; use an "
                        f"earlier checkpoint")
    if problem := name_problem(path, checkpoint):
        raise MisnamedCheckpoint(problem)
    return checkpoint


class MisnamedCheckpoint(UserError):
    """A readable checkpoint under a name that says another step: refused, never passed over as a torn file is."""


def find_resume_checkpoint(log_dir, resume):
    """(path, checkpoint) for --resume: the given file, or the newest readable checkpoint in log_dir. A torn or
    corrupt newest file is passed over (a crash while saving); one that is not what its name says, or belongs to
    another run than the directory's log.txt names, is refused: resuming it would adopt that run's flags and
    overwrite this run's checkpoints."""
    if resume != "latest":
        return Path(resume), load_checkpoint(resume, for_resume=True)
    candidates = list_checkpoints(log_dir)
    if not candidates:
        raise UserError(f"--resume: no checkpoint (model_NNNNN.pt) in {log_dir}; start without --resume, "
                        f"or point --log_dir at the run's directory")
    for path in reversed(candidates):
        try:
            checkpoint = load_checkpoint(path, for_resume=True)
        except MisnamedCheckpoint:
            raise
        except UserError as e:
            print0(f"skipping {e}")  # every rank reads the checkpoint: one of them says so
            continue
        directory_run = run_of_log(Path(log_dir) / "log.txt")
        if directory_run is not None and checkpoint.get("run") != directory_run:
            raise UserError(f"--resume: {path} belongs to another run (id {checkpoint.get('run')}) than the one "
                            f"{Path(log_dir) / 'log.txt'} records (id {directory_run}): move it out of {log_dir}, "
                            f"or continue it on purpose with --resume {path} --log_dir EMPTY_DIR")
        return path, checkpoint
    raise UserError(f"--resume: none of the checkpoints in {log_dir} is readable")


def run_of_log(log_path):
    """The run id the newest '# run' or '# resume' line of a log.txt names ("| run <id>"), or None."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    ids = [m[1] for line in lines if line.startswith("#") and (m := RUN_ID.search(line))]
    return ids[-1] if ids else None


RUN_ID = re.compile(r"\| run ([0-9a-f]+)\b")


def restore_checkpoint(checkpoint, optimizers, train_loader, world):
    """Optimizer moments, the data position and this rank's random generators, as the checkpoint left them."""
    for optimizer, state in zip(optimizers, checkpoint["optimizer"]):
        # fused AdamW is this device's choice (configure_optimizers), not the saved one's, and it must be set before
        # load_state_dict, which places each `step` counter by it: on the parameters' device when fused. Set after,
        # a CPU checkpoint resumed on CUDA handed the fused kernel CPU counters.
        for saved, group in zip(state["param_groups"], optimizer.param_groups):
            if "fused" in group:
                saved["fused"] = group["fused"]
        memory.load_optimizer_state(optimizer, state)  # optimizer.load_state_dict, sharded under --fsdp
    train_loader.load_state_dict(checkpoint["loaders"][0])  # a global position: the same for every rank
    rng = checkpoint["rng"]  # one state per rank; a run resumed on another number of ranks gives each rank 0's
    set_rng_state(rng[world.rank] if len(rng) == world.world_size else rng[0], world)


def check_resume_flags(saved, cfg, math_flags, other_flags):
    """Refuse flags that would change the run's math; return a note naming the others that changed (or None)."""
    saved = {k: getattr(type(cfg), k) for k in math_flags + other_flags} | saved  # flags newer than the checkpoint
    changed = [f"--{k} {saved.get(k)} -> {getattr(cfg, k)}" for k in math_flags if saved.get(k) != getattr(cfg, k)]
    if changed:
        raise UserError("--resume: these flags differ from the checkpoint's run and would change its math: "
                        + ", ".join(changed) + ". Rerun with the checkpoint's values, or start a new --log_dir")
    notes = [f"--{k} {saved[k]} -> {getattr(cfg, k)}" for k in other_flags if saved[k] != getattr(cfg, k)]
    return f"resuming with changed {', '.join(notes)}" if notes else None
