"""
Plot training logs: log.txt -> train loss, val loss, HellaSwag and CORE curves, with reference lines for the corpus
the runs trained on (GPT-2 and GPT-3 on FineWeb-Edu; unigram and bigram models on Molière) and GPT-2 124M's CORE.

    python plot.py log_moliere/log.txt                        # -> log_moliere/train_loss.png, val_loss.png
    python plot.py log/log.txt                                # -> log/train_loss.png, val_loss.png, hellaswag.png
    python plot.py log_moliere/log.txt log_moliere_modern/log.txt  # overlaid, one colour and label each
    python plot.py run1/log.txt run2/log.txt --labels a b     # labels of your choice (default: each log's dir)
    python plot.py build-nanogpt/log/log.txt --out figs       # build-nanogpt's logs read unchanged

The PNGs go beside the log (several logs: into the first one's directory, overlaid) unless --out names a
directory, so plotting a run of your own never overwrites the committed results/*.png. Train loss is drawn raw
(faint) and smoothed (a line fitted over the steps within --smooth 0.1 = 10% of each step; see smooth()).

A log holds one record per line, `{step} train {loss}`, `{step} val {loss}`, `{step} hella {acc_norm}`, `{step}
core {core}`;
lines starting with `#` are comments except `# config {json}`, whose total_batch_size gives tokens per step
and whose data says what the run trained on. A metric no log has records of gets no PNG.
"""
import argparse
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np

from common import GPT2_124M_CORE, UserError, atomic_write, check_outputs

# The record kinds we plot (others: lr, norm, sample, ... are skipped) -> (file, what it shows, name in messages)
METRICS = {"train": ("train_loss.png", "train loss", "train loss"),
           "val": ("val_loss.png", "val loss", "val loss"),
           "hella": ("hellaswag.png", "HellaSwag acc_norm", "HellaSwag"),
           "core": ("core.png", "CORE (centered accuracy, 22 tasks)", "CORE")}
KINDS = tuple(METRICS)
DEFAULT_DATA = "edu_fineweb10B"  # train_gpt2.py's --data default: a config without "data" trained on FineWeb-Edu
# GPT-2 124M as released by OpenAI, measured the same way we measure (build-nanogpt's numbers):
GPT2_VAL_LOSS = 3.2924  # on the FineWeb-Edu val shard (edufineweb_val_000000.npy)
GPT2_HELLA, GPT3_HELLA = 0.2955, 0.337  # HellaSwag acc_norm; GPT-3 124M's (zero-shot) is from the GPT-3 paper
# What a model with no context (unigram) or one token of it (bigram) scores on Molière's val split (the last 10% of
# the tokens, GPT-2's tokenizer, nats per token; the README's figures): a run below the bigram line has learned more
# than which token tends to follow which.
MOLIERE_UNIGRAM, MOLIERE_BIGRAM = 5.97, 3.72
# Reference lines: (corpus, value, label, colour, style), in black and grey so they never share a colour with a run
# (runs take C0, C1, ...). A line is drawn only when a run trained on its corpus (see corpus()): a loss on other text
# is not comparable with it, and a Molière run's HellaSwag says little. CORE's (corpus None) is drawn for every run:
# it is the field's yardstick whatever the model read.
REFERENCES = {"val": [("fineweb-edu", GPT2_VAL_LOSS, "GPT-2 124M on FineWeb-Edu val", "black", "--"),
                      ("moliere", MOLIERE_UNIGRAM, "unigram model on Molière val", "grey", ":"),
                      ("moliere", MOLIERE_BIGRAM, "bigram model on Molière val", "black", "-.")],
              "hella": [("fineweb-edu", GPT2_HELLA, "GPT-2 124M", "black", "--"),
                        ("fineweb-edu", GPT3_HELLA, "GPT-3 124M, its paper", "grey", ":")],
              "core": [(None, GPT2_124M_CORE, "GPT-2 124M, as nanochat measured it", "black", "--")]}


def parse_log(path):
    """Read one log.txt into {"train": {step: loss}, "val": ..., "hella": ..., "tokens_per_step", "data",
    "skipped"}; "data" is the run's --data, None when the log has no config line (build-nanogpt's logs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such log file: {path}")
    log = {kind: {} for kind in KINDS}
    log["tokens_per_step"], log["data"], log["skipped"] = None, None, 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith("# config "):
            try:  # a torn or hand-edited header is not worth dying for: fall back to --tokens_per_step
                config = json.loads(line[len("# config "):])
                tokens = config.get("total_batch_size")
                log["tokens_per_step"] = int(tokens) if tokens else log["tokens_per_step"]
                log["data"] = str(config.get("data") or DEFAULT_DATA)
            except (ValueError, TypeError, AttributeError):
                pass
            continue
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 3 and parts[1] not in KINDS and parts[0].isdigit():
            continue  # a record kind we don't plot (lr, norm, sample, ...), whatever its fields
        try:  # e.g. the half-written last line of a killed run, or a nan loss: counted, not plotted
            step, kind, value = int(parts[0]), parts[1], float(parts[2])
            if len(parts) != 3 or not math.isfinite(value):
                raise ValueError(line)
        except (IndexError, ValueError):
            log["skipped"] += 1
            continue
        log[kind][step] = value  # a step logged again after a resume: the later line wins
    if not any(log[kind] for kind in KINDS):
        raise UserError(f"no {'/'.join(KINDS)} records in {path}")
    return log


def corpus(log):
    """The corpus a run trained on, as REFERENCES names it: "fineweb-edu", "moliere", or None for other text.
    A log without a config line (build-nanogpt's) counts as FineWeb-Edu: that is what build-nanogpt trains on,
    and the reference lines' labels say which data they hold for."""
    name = Path(log["data"] or DEFAULT_DATA).name.lower()
    if "fineweb" in name:
        return "fineweb-edu"
    return "moliere" if name.endswith(("moliere.txt", "molière.txt")) else None


def smooth(steps, values, frac):
    """The train loss at each step s, read off a straight line fitted to the losses of the steps from s * (1 - frac)
    to s * (1 + frac) (fewer near the last step).

    Why not an EMA: it averages only the past, so it lags a loss that falls fast: on the 200-step Molière quick start
    (results/moliere_gpt2/log.txt) an EMA of 0.95 sat up to 2.1 above the raw loss in the first 50 steps. This window
    is centred, so a trend pulls it neither way; a line rather than a mean keeps that true where the window is cut
    short at the end. Its width is a fraction of the step because a loss curve changes on that scale (by 0.3 a step
    at first, by noise alone later): 10% is raw for the first 10 steps, ±20 steps at step 200 and ±1,900 at step
    19,073, so runs of any length are smoothed alike, without knowing where they will end.
    """
    x, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    lo = np.searchsorted(x, x * (1 - frac), side="left")  # x is sorted: each step's window is x[lo[i]:hi[i]]
    hi = np.searchsorted(x, x * (1 + frac), side="right")
    out = np.empty_like(y)
    for i, (a, b) in enumerate(zip(lo, hi)):
        wx, wy = x[a:b], y[a:b]
        dx = wx - wx.mean()  # least squares: the line passes through the window's means with this slope
        slope = (dx * (wy - wy.mean())).sum() / (dx * dx).sum() if b - a > 1 else 0.0  # one step alone: its value
        out[i] = wy.mean() + slope * (x[i] - wx.mean())
    return out.tolist()


def token_unit(tokens):
    """(scale, unit) that writes a token count readably: 10e9 -> B, a Moliere run's few million -> M."""
    return next((scale, unit) for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if tokens >= scale)


def add_token_axis(ax, tokens_per_step, last_step):
    """A second x axis on top in tokens: tokens = step * tokens_per_step, in the unit that fits the run."""
    scale, unit = token_unit(tokens_per_step * max(last_step, 1))
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / scale,
                                               lambda t: t * scale / tokens_per_step))
    top.set_xlabel(f"tokens ({unit})" if unit else "tokens")


def nice_step(x):
    """The largest 1, 2 or 5 times a power of ten that is at most x (0.45 -> 0.2, 0.6 -> 0.5)."""
    power = 10 ** math.floor(math.log10(x))
    return max(m * power for m in (1, 2, 5) if m * power <= x * (1 + 1e-9))


def log_ticks(lo, hi, count=10):
    """Round-number ticks from lo to hi for a log axis: about `count` of them (at most 2 * count), evenly spread.

    Each gap is a round step near a fixed fraction of the value, so the low end, where a run ends and runs are
    compared, gets the fine steps: a loss falling from 11 to 3 gets 3, 3.2, ..., 3.8, 4, 4.5, ..., 7.5, 8, 9, 10, 11.
    (Matplotlib's log locator labels only 1-9 times a power of ten there: nothing between 3 and 4.)
    """
    gap = max(math.log(hi / lo) / count, 1e-3)  # wanted tick spacing as a fraction of the value
    step = nice_step(lo * gap)
    tick, ticks = math.ceil(lo / step - 1e-6) * step, []
    while tick <= hi * (1 + 1e-9):
        ticks.append(float(f"{tick:.10g}"))  # 3.0000000000000004 -> 3.0
        # As the values grow, coarsen the step (1, 2, 5, 10, ...) towards the wanted one, but only on a multiple of
        # the coarser step, so the ticks stay round and evenly spaced: 4.6, 4.8, 5, 5.5 (not 4.4, 4.5, 5)
        while (up := nice_step(step * 2.5)) <= tick * gap * (1 + 1e-9) and abs(tick / up - round(tick / up)) < 1e-6:
            step = up
        tick = (round(tick / step) + 1) * step
    if len(ticks) > 2 * count > 4:  # rounding the steps down can double the count (3.2-3.6: every 0.02): space them out
        return log_ticks(lo, hi, count * 0.7)
    return ticks


def title(what, labels):
    """`what: run1 vs run2`, or the number of runs when their names would not fit on one line."""
    names = " vs ".join(labels)
    return f"{what}: {names}" if len(names) <= 70 else f"{what}: {len(labels)} runs (see the legend)"


def plot_metric(plt, runs, kind, frac=0, tokens_per_step=None):
    """The figure of `kind` for every run (raw faintly, smoothed on top if frac), references dashed; the caller
    saves and closes it. Runs keep their colour (C{i}) across figures, even where one has no records of `kind`."""
    fig, ax = plt.subplots(figsize=(8, 5))
    last_step, what = 0, METRICS[kind][1]
    for i, (label, log) in enumerate(runs):
        steps = sorted(log[kind])
        values = [log[kind][s] for s in steps]
        if not steps:
            continue
        last_step = max(last_step, steps[-1])
        if frac:  # noisy per-step losses: the smoothed curve carries the label, the raw one is context
            ax.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=0.8)
            smoothed = smooth(steps, values, frac)
            ax.plot(steps, smoothed, color=f"C{i}", label=f"{label} (smoothed, ±{frac:.0%} of step)")
        else:  # evals are already averages over many tokens/examples: plot them as they are, with markers
            ax.plot(steps, values, color=f"C{i}", marker="." if len(steps) < 100 else None, label=label)
    if frac:  # one legend entry says what the faint curves are
        ax.plot([], [], color="grey", alpha=0.5, linewidth=0.8, label="faint: raw, each step")
    corpora = {corpus(log) for _, log in runs if log[kind]}
    for name, value, text, color, style in REFERENCES.get(kind, []):
        if name is None or name in corpora:
            ax.axhline(value, color=color, linestyle=style, linewidth=1, label=f"{text} ({value})")
    ax.set_title(title(what, [label for label, log in runs if log[kind]]))
    if kind in ("train", "val"):  # a loss falling from ~11 to ~3 reads better on a log scale, with plain-number ticks
        what += " (nats per token, log scale)"
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.yaxis.set_major_locator(plt.FixedLocator(log_ticks(lo, hi)))
        ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(plt.NullLocator())  # every tick is a labelled major one
        ax.set_ylim(lo, hi)
    if tokens_per_step:
        add_token_axis(ax, tokens_per_step, last_step)
    ax.set(xlabel="step", ylabel=what)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def summary(label, log, tokens_per_step, frac):
    """One line per run: what a reader compares first (best val, best HellaSwag, where training ended)."""
    parts = [label]
    if log["train"]:
        steps = sorted(log["train"])
        # the train line of step k is the k-th update, so steps 0..k mean k+1 batches of tokens seen
        tokens = (steps[-1] + 1) * tokens_per_step
        scale, unit = token_unit(tokens)
        # The last record is what training printed last (one batch: noisy); the smoothed value is the curve's end.
        final = f"final train loss {log['train'][steps[-1]]:.4f} (raw, step {steps[-1]})"
        if frac:
            final += f", {smooth(steps, [log['train'][s] for s in steps], frac)[-1]:.4f} (smoothed)"
        parts.append(f"{steps[-1] + 1} steps, {tokens / scale:.2f}{unit} tokens, {final}")
    for kind, name, best in (("val", "min val loss", min), ("hella", "max HellaSwag", max), ("core", "max CORE", max)):
        if log[kind]:
            step = best(log[kind], key=log[kind].get)
            parts.append(f"{name} {log[kind][step]:.4f} @ step {step}")
    if log["skipped"]:
        parts.append(f"{log['skipped']} malformed or non-finite lines skipped")
    return " | ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot train/val loss, HellaSwag and CORE from log.txt files.")
    parser.add_argument("logs", nargs="+", help="log.txt files (train_gpt2.py's or build-nanogpt's)")
    parser.add_argument("--labels", nargs="+", help="legend label per log (default: each log's directory name)")
    parser.add_argument("--out", help="output dir (default: the log's own directory; with several logs, the first "
                        "one's, where the overlaid PNGs go)")
    parser.add_argument("--tokens_per_step", type=int, default=524288,
                        help="used when a log has no '# config' line (default 2**19, the GPT-2 124M recipe)")
    parser.add_argument("--smooth", type=float, default=0.1,
                        help="train loss smoothing: at step s, a line fitted over steps s*(1-SMOOTH) to s*(1+SMOOTH) "
                        "(default 0.1, up to 0.5); 0 = raw")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.logs):
        parser.error(f"--labels got {len(args.labels)} labels for {len(args.logs)} logs")
    if not 0 <= args.smooth <= 0.5 or args.tokens_per_step < 1:  # 0.95, an EMA's beta, would blur the whole run
        parser.error("--smooth must be in [0, 0.5] (a fraction of the step) and --tokens_per_step at least 1")
    try:
        plot_logs(args)
    except UserError as e:  # a missing or empty log, an unwritable --out: one line, no traceback
        print(f"plot.py: error: {e}", file=sys.stderr)
        sys.exit(1)


def plot_logs(args):
    out = Path(args.out or Path(args.logs[0]).parent)  # beside the (first) log: never over the committed results/
    # a PNG written over a log (one named train_loss.png, or a link to it) would destroy the run's only record
    check_outputs({"the PNG": [out / name for name, _, _ in METRICS.values()]}, {"the log": args.logs},
                  fix="choose another --out")
    logs = [parse_log(p) for p in args.logs]  # parse everything first: a bad file fails before any plotting
    labels = args.labels or [Path(p).resolve().parent.name for p in args.logs]  # log_moliere/log.txt -> log_moliere
    if len(set(labels)) < len(labels):  # two runs both in a dir called log/: the full dir tells them apart
        labels = [str(Path(p).parent) for p in args.logs]
    per_log = [log["tokens_per_step"] or args.tokens_per_step for log in logs]
    # The top tokens axis is only honest if every run has the same tokens per step; otherwise we leave it out.
    tokens_axis = per_log[0] if len(set(per_log)) == 1 else None

    import matplotlib  # here, not at the top: importing plot.py stays free of matplotlib and its start-up cost
    matplotlib.use("Agg")  # headless: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write into {out} ({e.strerror}): choose another --out") from None
    runs = list(zip(labels, logs))
    for kind, (name, _, what) in METRICS.items():
        if not any(log[kind] for log in logs):  # an empty plot would only look like a broken one
            print(f"no {what} records: {out / name} not written")
            continue
        fig = plot_metric(plt, runs, kind, args.smooth if kind == "train" else 0, tokens_axis)
        atomic_write(out / name, functools.partial(fig.savefig, format="png", dpi=120))  # never a half-written PNG
        plt.close(fig)
        print(f"wrote {out / name}")
    for (label, log), tokens_per_step in zip(runs, per_log):
        print(summary(label, log, tokens_per_step, args.smooth))


if __name__ == "__main__":
    main()
