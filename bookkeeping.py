"""
A training run's bookkeeping, for train_gpt2.py: the operations its training section calls but a reader of the
lesson need not see inline. In the order a run meets them:

- settle(): before any work, the checkpoint to resume (or to fine-tune from) is read and the flags a resume keeps
  are taken from it. It returns a new config and Start, a small frozen record of where the run begins.
- check_flags(): every flag checked at once, so that a mistake costs seconds, not a GPU-hour (and memory.py's
  check_memory: a model too big for the machine). The learning-rate horizon of a resume is checked there.
- Run: the loop's side effects, as a context manager: the --log_dir lock, log.txt and W&B, stop signals (SIGTERM,
  Ctrl-C), the progress line, checkpoints, and one line instead of a traceback when memory or the compiler fails.

Everything here takes the config, the DistInfo (`world`) and the model as arguments: this module never imports
train_gpt2.py, so imports run one way.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

import core
import hellaswag
from checkpoints import (check_resume_flags, checkpoint_identity, checkpoint_step, find_resume_checkpoint, git_commit,
                         list_checkpoints, load_checkpoint, save_checkpoint)
from common import (UserError, all_reduce, atomic_write, download_moliere, first_line, lock_directory,
                    output_conflicts, path_kind, print0, what_is)
from huggingface import HF_RECIPES, model_type_of
from memory import is_out_of_memory

HERE = Path(__file__).resolve().parent  # train_gpt2.py's directory: default data and downloads live there

# What --resume does with each flag; train_gpt2.py's TrainConfig marks every field with one of these
MATH = "math"  # what the run computes (shape, batch, learning rates, seed): the checkpoint's; a change is refused
RUN = "run"  # how the run goes (data, steps, evaluations, checkpoints, W&B): the checkpoint's unless given
MACHINE = "machine"  # the machine it runs on (device, dtype, compile, -B, timeout): never the checkpoint's
COMMAND = "command"  # what this command line asks for (--resume, --sample; --log_dir: where the run is)


def flags_of_kind(cfg, *kinds):
    return [f.name for f in dataclasses.fields(cfg) if f.metadata["on_resume"] in kinds]


def resolve_path(path):
    """A relative path from the current directory if it exists there, else beside train_gpt2.py (where fineweb.py
    writes edu_fineweb10B/ and the quick start keeps input/moliere.txt)."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else HERE / path


# -----------------------------------------------------------------------------
# The command line

def parse_args(config_class, presets, argv=None):
    """(config, the names of the flags given on the command line): argparse made from the fields of train_gpt2.py's
    hyperparameter table (config_class, TrainConfig) with the --preset's defaults (presets: name -> overrides);
    --help shows the chosen preset's defaults. Which flags were given matters: on --resume the others are the
    checkpoint's, and -B not given may shrink."""
    preset_parser = argparse.ArgumentParser(prog="train_gpt2.py", add_help=False)
    preset_parser.add_argument("--preset", choices=tuple(presets), default=config_class.preset)
    preset = presets[preset_parser.parse_known_args(argv)[0].preset]
    parser = argparse.ArgumentParser(prog="train_gpt2.py", description="Train GPT-2 from scratch.")
    for f in dataclasses.fields(config_class):
        meta = dict(f.metadata)
        names = [f"--{f.name}", *([meta.pop("short")] if "short" in meta else [])]
        del meta["on_resume"]
        default = preset.get(f.name, f.default)
        kind = {} if "nargs" in meta else {"type": f.type}
        meta["help"] += "" if default is None else f" (default: {default})"
        parser.add_argument(*names, dest=f.name, default=None, **kind, **meta)  # None: not given
    args = vars(parser.parse_args(argv))
    given = {name for name, value in args.items() if value is not None}
    return config_class(**{f.name: args[f.name] if f.name in given else preset.get(f.name, f.default)
                           for f in dataclasses.fields(config_class)}), given


# -----------------------------------------------------------------------------
# Where a run starts: settled before any work

@dataclass(frozen=True)
class Start:
    """Where a run starts, settled before any work (settle); nothing in it changes during the run."""
    step: int = 0  # the first update to run: 0, or the resumed checkpoint's step
    val_loss: float = None  # the resumed checkpoint's val loss (the next checkpoints record it until a new one)
    resumed_from: Path = None  # the checkpoint --resume continues, if any
    saved_args: dict = None  # that checkpoint's flags
    notes: tuple = ()  # what a resume changed, said when the run starts
    run_id: str = None  # made at the run's first start, kept by its resumes: in log.txt and every checkpoint


def settle(cfg, given, world):
    """(cfg, start, checkpoint): a new TrainConfig with what a resume takes from its checkpoint (every MATH and RUN
    flag not given), the LR horizon fixed and a -B that divides the batch; the Start record; and the checkpoint
    whose model the run starts from (resumed, or a .pt to fine-tune; None otherwise), to be let go once loaded (a
    124M checkpoint is 1.5 GB). Refuses a flag that would change a resumed run's math, and a fresh run over another
    run's checkpoints."""
    checkpoint, start = None, Start(run_id=uuid.uuid4().hex[:12])
    if cfg.resume not in (None, "latest") and path_kind(cfg.resume) == "a directory":  # --resume DIR: its newest
        if "log_dir" in given and Path(cfg.log_dir).resolve() != Path(cfg.resume).resolve():
            raise UserError(f"--resume {cfg.resume} is a directory, and --log_dir names another: give the run's "
                            f"directory once (--resume --log_dir DIR), or a checkpoint file (--resume PATH)")
        cfg = dataclasses.replace(cfg, log_dir=cfg.resume, resume="latest")
    if cfg.resume:
        path, checkpoint = find_resume_checkpoint(cfg.log_dir, cfg.resume)
        saved = checkpoint["args"]
        cfg = dataclasses.replace(cfg, **{k: saved[k] for k in flags_of_kind(cfg, MATH, RUN)
                                          if k not in given and k in saved})
        if "micro_batch_size" not in given:  # the run's own -B (a machine flag): the same accumulation, so the same
            cfg = dataclasses.replace(cfg, micro_batch_size=saved.get("micro_batch_size", cfg.micro_batch_size))  # sums
        if cfg.resume != "latest":
            cfg = dataclasses.replace(cfg, log_dir=resume_directory(cfg, given, path, checkpoint["step"]))
        # the horizon of the run's first start, kept (checkpoints older than --lr_horizon saved 0: their max_steps)
        cfg = dataclasses.replace(cfg, lr_horizon=cfg.lr_horizon or saved["max_steps"])
        start = Start(checkpoint["step"], checkpoint["val_loss"], path, saved, run_id=checkpoint.get("run")
                      or start.run_id)  # (checkpoints older than run ids: the run gets one now)
    else:
        if cfg.init_from.endswith(".pt"):
            checkpoint = load_checkpoint(cfg.init_from)
        if cfg.init_from != "scratch":
            cfg = dataclasses.replace(cfg, recipe=fine_tuned_recipe(cfg, given, checkpoint))
        if cfg.sample is None and list_checkpoints(cfg.log_dir):
            raise UserError(f"{cfg.log_dir} holds checkpoints of an earlier run: continue it with --resume, or "
                            f"start a new run with another --log_dir")
        cfg = dataclasses.replace(cfg, lr_horizon=cfg.lr_horizon or cfg.max_steps)
    if "micro_batch_size" not in given:
        cfg = dataclasses.replace(cfg, micro_batch_size=dividing_micro_batch(cfg, world))
    if start.saved_args is not None:  # refuses a changed MATH flag; notes the others that changed
        note = check_resume_flags(start.saved_args, cfg, flags_of_kind(cfg, MATH), flags_of_kind(cfg, RUN, MACHINE))
        start = dataclasses.replace(start, notes=(note,) if note else ())
    return cfg, start, checkpoint


def fine_tuned_recipe(cfg, given, checkpoint):
    """The model to fine-tune gives --recipe: a .pt its own, a Hugging Face directory its model_type's (nanochat, the
    modern recipe's export: modern), a GPT-2 from the hub gpt2; another one given is refused (its weights would not
    fit, or would compute another function)."""
    if checkpoint is not None:
        recipe = checkpoint.get("args", {}).get("recipe", "gpt2")
    else:  # (a model type no recipe computes is refused with its shape: huggingface.shape_of)
        recipe = HF_RECIPES.get(model_type_of(cfg.init_from), "gpt2")
    if "recipe" in given and recipe != cfg.recipe:
        raise UserError(f"{cfg.init_from} is a model of --recipe {recipe}: fine-tune it with --recipe {recipe}")
    return recipe


def resume_directory(cfg, given, checkpoint_path, step):
    """--resume PATH continues in PATH's directory (or an empty --log_dir), never where it would mix with another
    run, nor over another line of the same run: the checkpoints of later steps that a resume from an older one
    would overwrite one by one, and its log.txt lines."""
    own_dir = Path(checkpoint_path).parent
    log_dir = cfg.log_dir if "log_dir" in given else str(own_dir)
    if Path(log_dir).resolve() != own_dir.resolve() and (list_checkpoints(log_dir) or
                                                         (Path(log_dir) / "log.txt").exists()):
        raise UserError(f"--log_dir {log_dir} holds another run: resuming {checkpoint_path} there would mix the two; "
                        f"drop --log_dir (the run continues in {own_dir}) or name an empty one")
    later = [p for p in list_checkpoints(log_dir) if checkpoint_step(p) > step]
    if later and cfg.sample is None:
        raise UserError(f"--resume {checkpoint_path}: {log_dir} also holds checkpoints of later steps "
                        f"({', '.join(p.name for p in later[:3])}{', ...' if len(later) > 3 else ''}), which "
                        f"continuing from step {step} would overwrite: resume the newest (--resume {later[-1]}), move "
                        f"them elsewhere, or continue from step {step} in an empty --log_dir")
    return log_dir


def dividing_micro_batch(cfg, world):
    """-B not given: the preset's, halved until B*T*world_size divides the total batch (a run on 3 GPUs, say)."""
    B = cfg.micro_batch_size
    while B > 1 and cfg.total_batch_size % (B * cfg.seq_len * world.world_size):
        B //= 2
    return B


def fetch_data(cfg, world):
    """--data as a path; the quick start's corpus is fetched on first use (rank 0 downloads it, the others wait)."""
    data = resolve_path(cfg.data)
    if data.name == "moliere.txt" and not data.exists():
        on_master(world, download_moliere, data)
    return data


# -----------------------------------------------------------------------------
# Every flag checked before any work

def check_flags(cfg, world, start, shape, lr):
    """Every problem with the flags at once, before any work starts (litgpt's validate_args); then, for a resumed
    run, that its learning rate schedule carries on as it was. shape: the model's GPTConfig; lr(step, horizon): the
    run's learning-rate multiplier."""
    problems = [*batch_problems(cfg, world), *shape_problems(cfg, shape),
                *(schedule_problems(cfg, start.step) if cfg.sample is None else [])]  # sampling trains nothing
    if not 0 <= cfg.seed < 2**64:  # numpy's generators refuse negative seeds, torch's anything past 64 bits
        problems.append(f"--seed must be between 0 and 2**64 - 1, not {cfg.seed}")
    if min(cfg.eval_every, cfg.hellaswag_every, cfg.core_every, cfg.sample_every, cfg.checkpoint_every,
           cfg.keep_checkpoints, cfg.val_tokens, cfg.core_max_per_task) < 0:
        problems.append("the --*_every, --keep_checkpoints, --val_tokens and --core_max_per_task flags cannot be "
                        "negative")
    if cfg.sample is not None:  # --sample's own flags (not >=: a nan temperature too)
        problems += [f"--{k} {getattr(cfg, k)}: must be {'0 (greedy) or more' if k == 'temperature' else 'at least 1'}"
                     for k in ("temperature", "top_k", "num_samples", "max_new_tokens")
                     if not getattr(cfg, k) >= (0 if k == "temperature" else 1)]
    if (cfg.sample_every > 0 and not cfg.prompt) or cfg.sample == "":
        problems.append("the samples' prompt is empty: give --prompt TEXT (or --sample_every 0)")
    if cfg.hellaswag_every > 0 and cfg.hellaswag_data and not Path(cfg.hellaswag_data).is_file():
        problems.append(f"--hellaswag_data {cfg.hellaswag_data} is {what_is(cfg.hellaswag_data)}, not a jsonl file")
    if cfg.core_every > 0 and cfg.core_bundle and what_is(cfg.core_bundle) != "a directory":
        problems.append(f"--core_bundle {cfg.core_bundle} is {what_is(cfg.core_bundle)}, not an unzipped eval_bundle "
                        f"directory")
    if cfg.sample is None:  # what the run writes never lands on or among what it reads (its checkpoints: settle)
        init_from = cfg.init_from if start.resumed_from is None and Path(cfg.init_from).exists() else None
        written = [Path(cfg.log_dir) / name for name in ("log.txt", "log.prev.txt", "wandb_id.txt", "wandb", ".lock")]
        problems += output_conflicts({"--log_dir": written}, {
            "--data": resolve_path(cfg.data), "--init_from": init_from, "--hellaswag_data": cfg.hellaswag_data,
            "--core_bundle": cfg.core_bundle}, fix="choose another --log_dir")
    if world.device_type == "mps" and cfg.dtype == "bfloat16":
        problems.append("--dtype bfloat16 is not supported on MPS: use float32")
    if cfg.wandb is not None and not cfg.wandb.strip():
        problems.append("--wandb needs a project name (leave the flag out to log without W&B)")
    elif cfg.wandb and importlib.util.find_spec("wandb") is None:
        problems.append("--wandb needs the wandb package: pip install wandb")
    if problems:
        raise UserError("; ".join(problems))
    if cfg.sample is None:
        check_horizon(cfg, start, lr)


def batch_problems(cfg, world):
    B, T, W = cfg.micro_batch_size, cfg.seq_len, world.world_size
    if min(B, T, cfg.total_batch_size, cfg.max_steps) <= 0:
        return ["-B, -T, --total_batch_size and --max_steps must be positive"]
    if cfg.total_batch_size % (B * T * W) and cfg.sample is None:  # sampling needs no batch
        tokens = cfg.total_batch_size // (T * W)  # sequences per step on each rank, if T*W divides the total
        valid = [b for b in range(1, tokens + 1) if tokens % b == 0] if cfg.total_batch_size % (T * W) == 0 else []
        return [f"--total_batch_size {cfg.total_batch_size} is not divisible by B*T*world_size = {B}*{T}*{W} = "
                f"{B * T * W}; " + (f"valid -B values: {valid}" if valid else
                                    f"use a --total_batch_size that is a multiple of {B * T * W}")]
    return []


def shape_problems(cfg, shape):
    names = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    if any(getattr(cfg, k) < 0 for k in names):
        return ["--n_layer, --n_head, --n_embd, --block_size and --vocab_size cannot be negative"]
    if cfg.init_from != "scratch" and any(getattr(cfg, k) for k in names):
        return [f"--init_from {cfg.init_from} fixes the model's shape: drop --n_layer/--n_head/--n_embd/"
                "--block_size/--vocab_size"]
    problems = []
    if cfg.seq_len > shape.block_size and cfg.sample is None:
        problems.append(f"-T {cfg.seq_len} is longer than the model's block_size {shape.block_size}")
    if shape.n_head and shape.n_embd % shape.n_head:
        problems.append(f"--n_embd {shape.n_embd} is not a multiple of --n_head {shape.n_head}")
    return problems


def schedule_problems(cfg, start_step):
    problems = []
    if not (math.isfinite(cfg.max_lr) and cfg.max_lr > 0):
        problems.append(f"--max_lr must be a positive number, not {cfg.max_lr}")
    if not all(math.isfinite(lr) and lr > 0 for lr in (cfg.muon_lr, cfg.embed_lr, cfg.head_lr)):
        problems.append("--muon_lr, --embed_lr and --head_lr must be positive numbers")
    if cfg.recipe == "modern" and not (0 <= cfg.cooldown_frac <= 1 and cfg.warmup_steps <= cfg.lr_horizon * (
            1 - cfg.cooldown_frac)):
        problems.append(f"--cooldown_frac {cfg.cooldown_frac} must be between 0 and 1, and the decay must start "
                        f"after --warmup_steps {cfg.warmup_steps}")
    if not 0 <= cfg.min_lr_ratio <= 1:  # (nan fails too) a negative floor would train by gradient ascent
        problems.append(f"--min_lr_ratio must be between 0 and 1, not {cfg.min_lr_ratio}")
    if not (cfg.weight_decay >= 0 and cfg.grad_clip >= 0 and math.isfinite(cfg.weight_decay + cfg.grad_clip)):
        problems.append("--weight_decay and --grad_clip must be finite and not negative")
    if min(cfg.warmup_steps, cfg.lr_horizon) < 0:
        problems.append("--warmup_steps and --lr_horizon cannot be negative")
    if 0 < cfg.max_steps <= cfg.warmup_steps or 0 < cfg.lr_horizon <= cfg.warmup_steps:
        problems.append(f"--warmup_steps {cfg.warmup_steps} must be fewer than --max_steps {cfg.max_steps} (and "
                        f"--lr_horizon): the LR would never reach --max_lr. Pass a smaller --warmup_steps")
    if cfg.max_steps < start_step:
        problems.append(f"--max_steps {cfg.max_steps} is below the checkpoint's step {start_step}: nothing to do")
    return problems


def check_horizon(cfg, start, lr):
    """The learning rate never jumps on resume: the schedule's horizon (--lr_horizon, at a fresh start its
    --max_steps) is the first start's, so a larger --max_steps continues at min_lr. A new --lr_horizon is taken only
    if it leaves the learning rate of every step so far unchanged (during warmup, say). lr(step, horizon): 0 to 1."""
    if start.saved_args is not None:
        saved = start.saved_args.get("lr_horizon") or start.saved_args["max_steps"]
        if cfg.lr_horizon != saved and any(lr(s, saved) != lr(s, cfg.lr_horizon) for s in range(start.step + 1)):
            raise UserError(f"--lr_horizon {cfg.lr_horizon} would change the learning rate of the steps already taken "
                            f"(this run's schedule ends at step {saved}): drop --lr_horizon to keep it; a larger "
                            f"--max_steps then continues at " + ("min_lr" if cfg.recipe == "gpt2" else
                            "0, which the modern recipe refuses: resume from a checkpoint before the decay"))
    horizon = cfg.lr_horizon
    if cfg.recipe == "modern" and cfg.max_steps > horizon:  # WSD ends at LR 0: steps past it would not learn
        raise UserError(f"--max_steps {cfg.max_steps} goes past the schedule's end at step {horizon}, where the "
                        f"learning rate is 0: continue from a checkpoint before the decay (step <= "
                        f"{horizon - int(cfg.cooldown_frac * horizon)}) in an empty --log_dir, with --lr_horizon "
                        f"{cfg.max_steps} --max_steps {cfg.max_steps}")


def describe_schedule(cfg, step, lr):
    """The schedule of a resumed run, in one line: where it ends, and the learning rate it continues at."""
    horizon = cfg.lr_horizon
    if cfg.recipe == "modern":
        return (f"LR schedule: warmup {cfg.warmup_steps} steps, constant until step "
                f"{horizon - int(cfg.cooldown_frac * horizon)}, linear decay to 0 at step {horizon}; step {step} "
                f"runs at {lr(step, horizon):.4f} x the peak learning rates")
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    after = f", then {min_lr:.2e} until step {cfg.max_steps}" if cfg.max_steps > horizon else ""
    return (f"LR schedule: warmup {cfg.warmup_steps} steps to {cfg.max_lr:.2e}, cosine to {min_lr:.2e} at step "
            f"{horizon}{after}; step {step} runs at {cfg.max_lr * lr(step, horizon):.4e}")


# -----------------------------------------------------------------------------
# The loop's side effects: lock, log.txt and W&B, stop signals, progress, checkpoints

class Run:
    """The training loop's view of its run, as a context manager: while inside, this process holds the --log_dir
    lock (rank 0), log.txt and W&B are open (rank 0) and SIGTERM / Ctrl-C ask for a stop instead of killing it."""

    def __init__(self, cfg, world, start, dtype, probe):
        """probe(): this rank's loss of the model on a val micro-batch, checked before every checkpoint."""
        self.cfg, self.world, self.start, self.dtype, self.probe = cfg, world, start, dtype, probe
        self.log_dir = Path(cfg.log_dir)
        self.step = start.step  # the update under way, for the out-of-memory message
        self.pace = self.last_saved = self.wandb = self.lock = None

    def __enter__(self):
        self.lock = lock_directory(self.log_dir, "train_gpt2.py") if self.world.is_master else None
        try:
            if self.world.is_master:
                self.start_log()
            self.stop = StopSignals().__enter__()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc):
        self.stop.__exit__(*exc)
        if self.wandb is not None:
            self.wandb.finish()
        self.release()

    def check_directory(self):
        """Refuse to write once log_dir is not the directory this run locked: deleted and made again (by a new run of
        the same name, say) it is another run's, even under the same path (rank 0, which holds the lock)."""
        try:
            here, mine = os.stat(self.log_dir / ".lock"), os.fstat(self.lock)
            ours = (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
        except OSError:
            ours = False
        if not ours:
            raise UserError(f"{self.log_dir} was deleted or replaced while this run was writing into it: stopping "
                            f"without writing there (it may be another run's now); this run's last checkpoint: "
                            f"{self.last_saved or 'none'}")

    def release(self):
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def start_log(self):
        """log.txt begins with what made the run (config, git commit, torch, device); a resumed run appends."""
        path, world, resumed = self.log_dir / "log.txt", self.world, self.start.resumed_from
        device = torch.cuda.get_device_name(world.device) if world.device_type == "cuda" else world.device_type
        about = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} | git {git_commit()} | torch {torch.__version__} | "
                 f"{device} x {world.world_size} | {self.dtype} | run {self.start.run_id}")
        if resumed is not None and path.exists():
            self.write(f"# resume {resumed} | {about}")
        else:
            if path.exists():  # a fresh run never destroys an earlier log
                os.replace(path, path.with_suffix(".prev.txt"))
                print(f"moved the earlier {path} to {path.with_suffix('.prev.txt')}")
            line = f"# resume {resumed}\n" if resumed else ""
            self.write(f"# run {about}\n{line}# config {json.dumps(dataclasses.asdict(self.cfg))}")
        if self.cfg.wandb:
            self.wandb = start_wandb(self.cfg, self.log_dir, resumed is not None)

    def write(self, text):
        if not self.world.is_master:
            return
        self.check_directory()
        path = self.log_dir / "log.txt"
        try:
            with open(path, "a") as f:
                f.write(text + "\n")
        except OSError as e:
            raise UserError(f"could not write {path} ({e.strerror}): free some space or fix the directory's "
                            f"permissions, then continue with --resume") from None

    def announce(self, raw_model, train_loader, use_compile, lr):
        """What the run is about to do: where it resumed and what changed, the model, the machine, the steps and
        tokens to come. lr(step, horizon): the run's learning-rate multiplier."""
        cfg, start, B, T, W = self.cfg, self.start, train_loader.B, train_loader.T, self.world.world_size
        if start.resumed_from is not None:
            print0(f"resumed from {start.resumed_from} at step {start.step}")
            print0(*start.notes, describe_schedule(cfg, start.step, lr), sep="\n")
        tokens, epoch = (cfg.max_steps - start.step) * cfg.total_batch_size, train_loader.epoch_windows * T
        print0(f"{sum(p.numel() for p in raw_model.parameters()):,} parameters | {self.world.device} x {W} | "
               f"{self.dtype} | compile {use_compile}\nsteps {start.step} to {cfg.max_steps}: {tokens:,} tokens, "
               f"{tokens / epoch:.2f} epochs of {epoch:,} | {cfg.total_batch_size:,} tokens per step = {B} x {T} x "
               f"{W} ranks x {cfg.total_batch_size // (B * T * W)} accumulation steps")

    def record(self, step, kind, value, **extra):
        """One `{step} {kind} {value}` line of log.txt (train 6 decimals, val/hella/core 4), and the same to W&B."""
        self.write(f"{step} {kind} {value:.6f}" if kind == "train" else f"{step} {kind} {value:.4f}")
        if kind != "train":
            print0(f"step {step:5d} | {({'val': 'val loss', 'hella': 'HellaSwag', 'core': 'CORE'})[kind]} {value:.4f}")
        if self.wandb is not None:
            names = {"train": "train/loss", "val": "val/loss", "hella": "hellaswag/acc_norm", "core": "core/metric"}
            self.wandb.log({names[kind]: value, **extra}, step=step)

    def report_step(self, step, loss, lr, norm, dt, tokens_per_sec, mfu):
        """The step's line on stdout, with the run's progress and the time left, and its record in log.txt."""
        self.step = step + 1
        print0(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {1000 * dt:.1f}ms | "
               f"tok/sec {tokens_per_sec:,.0f}" + (f" | MFU {mfu:.1f}%" if mfu else "") + f" | {self.progress(step)}")
        self.record(step, "train", loss, lr=lr, grad_norm=norm, tokens_per_sec=tokens_per_sec,
                    tokens=(step + 1) * self.cfg.total_batch_size, **({"mfu": mfu} if mfu else {}))

    def progress(self, step):
        """'12/200 (6%), 3m 20s left': the time left at the pace of the steps so far, evaluations included, the
        first step (which compiles) left out."""
        now, done, total = time.time(), step + 1, self.cfg.max_steps
        text = f"{done}/{total} ({100 * done / total:.0f}%)"
        if self.pace is None:
            self.pace = (done, now)
        elif done > self.pace[0]:
            seconds = (now - self.pace[1]) / (done - self.pace[0]) * (total - done)
            text += f", {format_seconds(seconds)} left"
        return text

    # -- stops and checkpoints ------------------------------------------------------------------------------------

    def stop_signalled(self):
        """Whether a stop request reached this rank; no communication (evaluations check it between batches and end
        early, so that the checkpoint is saved in time)."""
        return self.stop.received is not None

    def stop_on_any_rank(self):
        """Whether a stop request reached any rank: a collective (all ranks call it at the same point), so that all
        of them stop at the same step."""
        return bool(all_reduce(int(self.stop_signalled()), self.world, "max"))

    def checkpoint_due(self, step, last_step):
        """Every --checkpoint_every steps (0: none) and always after the last update, so that a run keeps its model;
        not at the step a resume starts from (its checkpoint is the one it was read from)."""
        every = self.cfg.checkpoint_every
        return step > self.start.step and (last_step or (every > 0 and step % every == 0))

    def save(self, step, raw_model, optimizers, train_loader, val_loss):
        """Save the state after `step` updates, once the model's loss on a val micro-batch is finite: weights can be
        finite (5e8) and still give nan, and the loss that train_step checked was that of the weights before the
        update. A diverged model is never saved: its checkpoint would only ever be resumed into more nan."""
        if self.world.is_master:
            self.check_directory()
        loss = all_reduce(self.probe(), self.world) / self.world.world_size
        if not math.isfinite(loss):
            raise Diverged(f"the loss of the model after step {step} is {loss}: the run diverged at its last update; "
                           f"not saving it as model_{step:05d}.pt. Start a new run with a lower learning rate")
        self.last_saved = save_checkpoint(self.log_dir, step, raw_model, optimizers, train_loader,
                                          {"val_loss": val_loss, "run": self.start.run_id}, self.cfg, self.world)
        return self.last_saved

    def save_and_stop(self, step, raw_model, optimizers, train_loader, val_loss):
        """After a stop request: save the state after `step` updates and say how to continue."""
        path = self.save(step, raw_model, optimizers, train_loader, val_loss)
        print0(f"stopped by {self.stop.received or 'a signal on another rank'} at step {step}: saved {path}. "
               f"Continue with the same command plus --resume")

    def finished(self):
        saved = self.last_saved
        print0((f"saved {saved}. " if saved else "") + f"Next: curves with `python plot.py {self.log_dir / 'log.txt'}`"
               + (f"; `python train_gpt2.py --resume {saved} --sample PROMPT`; HellaSwag with `python hellaswag.py "
                  f"-m {saved}`" if saved else ""))

    def as_user_error(self, error):
        """An error of the loop as a UserError that says what to do: out of memory (the -B to try), a torch.compile
        without its compiler, a collective that failed because another rank stopped, a diverged run (its last good
        checkpoint); any other error as it is."""
        newest = self.newest_checkpoint()
        if isinstance(error, Diverged):
            return Diverged(f"{error}. " + (f"The newest checkpoint, from before it: {newest}" if newest else
                                            "No checkpoint of this run was saved"))
        if is_out_of_memory(error):
            B = self.cfg.micro_batch_size
            resume = (f"continue from {newest} with --resume {newest} -B {max(1, B // 2)}" if newest else
                      f"start again with -B {max(1, B // 2)}")
            return RankError(f"out of {self.world.device_type.upper()} memory at step {self.step} with -B {B}: "
                             f"{resume} (the same --total_batch_size, with more accumulation steps)")
        if collective_failed(error):
            return RankError(f"stopped at step {self.step}: another rank failed or stopped answering (its own error "
                             f"is printed above; this rank waits --dist_timeout {self.cfg.dist_timeout} s at most)")
        return compile_failed(error) or error

    def newest_checkpoint(self):
        """This run's newest checkpoint in its log_dir (its own: a file of another run is not its last good one)."""
        ours = [p for p in list_checkpoints(self.log_dir) if checkpoint_identity(p) == (self.start.run_id,
                                                                                        checkpoint_step(p))]
        return ours[-1] if ours else None


class StopSignals:
    """The first SIGTERM or SIGINT asks the loop to stop at the next safe point (after the current update, or at
    once during an evaluation), save a checkpoint and exit 0. Further SIGTERMs are ignored: a VM shutdown signals
    the whole process group and torchrun forwards another, and neither may kill a rank while it saves. Only a
    second Ctrl-C stops at once (KeyboardInterrupt), for a user who does not want to wait. Once the checkpoint is
    saved, nothing that arrives later may turn the clean exit into a kill: after a stop request the handlers are not
    given back, both signals are ignored until the process ends."""

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            # torchrun forwards the signal to every rank: rank 0 says so (the others stop just the same). os.write,
            # not print0: safe even if the signal arrived in the middle of a print
            if int(os.environ.get("RANK", "0")) == 0:
                os.write(2, f"\n{name} received: stopping at the next safe point (after this update or evaluation) "
                            f"to save a checkpoint. Ctrl-C again stops at once, without saving.\n".encode())
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        stopped_cleanly = self.received is not None and exc[0] is None
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_IGN if stopped_cleanly else handler)


class Diverged(UserError):
    """The run's loss or gradient is not finite: it stops without saving (Run.as_user_error names the last good
    checkpoint)."""


def check_finite(what, value, step):
    """A nan or inf loss or gradient norm stops the run where it is: an update from it would make the weights nan,
    and a checkpoint of them would only be resumed into more nan. The same on every rank (the values are global)."""
    if not math.isfinite(value):
        raise Diverged(f"the {what} is {value} at step {step}: the run diverged; stopping without saving. Start a new "
                       f"run with a lower learning rate (a --resume keeps the run's), from a checkpoint before it with "
                       f"--init_from if you like")


class RankError(UserError):
    """An error that this rank alone may meet (out of memory, the compiler, a lost peer): under torchrun it prints
    it itself, naming the rank, where an error that every rank meets alike (a flag, the data) is printed once."""


def report_error(program, error, world):
    """The one line main() prints for an error. Under torchrun a RankError or an OSError is printed by the rank that
    met it, naming it; any other error, which every rank meets alike (a flag, the data), once per node by its first
    rank (across nodes a node's own files may differ). Before the process group exists (world None), once."""
    if world is None or world.world_size == 1:
        print0(f"{program}: error: {error}", file=sys.stderr)
    elif isinstance(error, (RankError, OSError)) or world.local_rank == 0:
        where = f"[rank {world.rank} of {world.world_size}] " if isinstance(error, (RankError, OSError)) or world.rank \
            else ""
        print(f"{program}: error: {where}{error}", file=sys.stderr)


def collective_failed(error):
    """Whether an exception is a collective that failed because another rank stopped (its own error says why)."""
    lost = ("Connection closed by peer", "Connection reset by peer", "remote worker", "timed out", "Timed out")
    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in lost))


def compile_failed(error):
    """torch.compile needs a C compiler and Triton at run time (slim CUDA images lack them): its failure as a
    UserError that says what to do, or None for any other error."""
    if type(error).__module__.startswith(("torch._dynamo", "torch._inductor", "triton")):
        first = first_line(error)[:200]
        return UserError(f"torch.compile failed ({type(error).__name__}: {first}): rerun with --compile false, "
                         f"or install a C compiler (e.g. apt install build-essential)")
    return None


def format_seconds(seconds):
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m" if hours else f"{m}m {s:02d}s" if m else f"{s}s"



# -----------------------------------------------------------------------------
# Weights & Biases, and work that rank 0 does for everyone

def start_wandb(cfg, log_dir, resumed):
    """A W&B run named after log_dir with the whole config; a resumed run continues the same W&B run."""
    import uuid

    import wandb

    id_file = log_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if resumed and id_file.exists() else uuid.uuid4().hex[:8]
    atomic_write(id_file, lambda f: f.write(run_id.encode()))
    try:
        (log_dir / "wandb").mkdir(exist_ok=True)
        return wandb.init(project=cfg.wandb, name=log_dir.name, id=run_id, resume="allow", dir=str(log_dir),
                          config=dataclasses.asdict(cfg))
    except (OSError, wandb.errors.Error) as e:  # a read-only place, a W&B server that refuses the run, ...
        first = first_line(e)
        raise UserError(f"W&B could not start its run in {log_dir / 'wandb'} ({first}): fix that, or leave out "
                        f"--wandb") from None


def on_master(world, fn, *args):
    """Run fn on rank 0 alone while the others wait; every rank learns whether it failed, so that a download
    error stops all of them at once rather than leaving the others in a barrier until the timeout."""
    error = None
    if world.is_master:
        try:
            fn(*args)
        except UserError as e:
            error = e
    if all_reduce(int(error is not None), world, "max") and error is None:
        raise UserError("rank 0 failed (see its message)")
    if error is not None:
        raise error



MAX_EPOCHS = 1000  # a run may read its data many times (a small corpus), not thousands of times by mistake


def check_epochs(cfg, start, train_loader):
    """Refuse, before any work, a run that would read its training data more than MAX_EPOCHS times: GPT-2 124M's
    19,073 steps of 524,288 tokens on a 55,000-token text file (180,000 epochs) is a mistake, not a plan."""
    epoch = train_loader.epoch_windows * train_loader.T
    epochs = (cfg.max_steps - start.step) * cfg.total_batch_size / epoch
    if epochs > MAX_EPOCHS and cfg.sample is None:
        raise UserError(f"--data {cfg.data} holds {epoch:,} training tokens: {cfg.max_steps - start.step:,} steps of "
                        f"{cfg.total_batch_size:,} tokens would read them {epochs:,.0f} times. For a small corpus "
                        f"start from the quick start's sizes (--preset moliere --data {cfg.data}), or lower "
                        f"--max_steps or --total_batch_size")

# -----------------------------------------------------------------------------
# The evaluations' data, loaded and checked before any work

def load_hellaswag(cfg, world, raw_model):
    """The val examples, tokenized once per run (rank 0 downloads them while the others wait)."""
    if cfg.hellaswag_data is None:
        on_master(world, hellaswag.download, "val")
    examples = [hellaswag.render_example(e) for e in hellaswag.iterate_examples("val", cfg.hellaswag_data)]
    try:
        hellaswag.check_fits(raw_model, examples)  # within the model's block_size and vocabulary
    except UserError as e:
        raise UserError(f"{e}: use --hellaswag_every 0") from None
    return examples


def load_core(cfg, world, raw_model):
    """CORE's tasks and their items, tokenized once per run (rank 0 downloads the bundle while the others wait)."""
    bundle = cfg.core_bundle
    if bundle is None:
        on_master(world, core.download)
        bundle = core.BUNDLE_DIR
    tasks = core.load_tasks(bundle, cfg.core_max_per_task or None)
    items = core.render(tasks)
    try:
        core.check_fits(raw_model, items)
    except UserError as e:
        raise UserError(f"{e}: use --core_every 0") from None
    return tasks, items
