"""
Plot training logs: log.txt -> train loss, val loss and HellaSwag curves against GPT-2/GPT-3 baselines.

    python plot.py log/log.txt                                # -> results/train_loss.png, val_loss.png, hellaswag.png
    python plot.py run1/log.txt run2/log.txt --labels a b     # several runs overlaid, one colour each
    python plot.py build-nanogpt/log/log.txt --out figs       # build-nanogpt's logs read unchanged

A log holds one record per line, `{step} train {loss}`, `{step} val {loss}`, `{step} hella {acc_norm}`;
lines starting with `#` are comments except `# config {json}`, whose total_batch_size gives tokens per step.
"""
import argparse
import json
import math
from pathlib import Path

KINDS = ("train", "val", "hella")  # the record kinds we plot; others (lr, norm, ...) are skipped
# GPT-2 124M as released by OpenAI, measured the same way we measure (build-nanogpt's numbers):
GPT2_VAL_LOSS = 3.2924  # on the FineWeb-Edu val shard (edufineweb_val_000000.npy)
GPT2_HELLA, GPT3_HELLA = 0.2955, 0.337  # HellaSwag acc_norm; GPT-3 124M's (zero-shot) is from the GPT-3 paper


def parse_log(path):
    """Read one log.txt into {"train": {step: loss}, "val": ..., "hella": ..., "tokens_per_step", "skipped"}."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"plot.py: error: no such log file: {path}")
    log = {kind: {} for kind in KINDS}
    log["tokens_per_step"], log["skipped"] = None, 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith("# config "):
            try:  # a torn or hand-edited header is not worth dying for: fall back to --tokens_per_step
                tokens = json.loads(line[len("# config "):]).get("total_batch_size")
                log["tokens_per_step"] = int(tokens) if tokens else log["tokens_per_step"]
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
        raise SystemExit(f"plot.py: error: no train/val/hella records in {path}")
    return log


def ema(values, beta):
    """Exponential moving average, bias-corrected (as Adam does) so the start isn't pulled towards 0."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta**i))
    return out


def token_unit(tokens):
    """(scale, unit) that writes a token count readably: 10e9 -> B, a Moliere run's few million -> M."""
    return next((scale, unit) for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if tokens >= scale)


def add_token_axis(ax, tokens_per_step, last_step):
    """A second x axis on top in tokens: tokens = step * tokens_per_step, in the unit that fits the run."""
    scale, unit = token_unit(tokens_per_step * max(last_step, 1))
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / scale,
                                               lambda t: t * scale / tokens_per_step))
    top.set_xlabel(f"tokens ({unit})" if unit else "tokens")


def plot_metric(plt, runs, kind, ylabel, baselines, beta, tokens_per_step, path):
    """One figure: `kind` of every run (raw faintly, smoothed on top if beta), baselines dashed, saved to path."""
    fig, ax = plt.subplots(figsize=(8, 5))
    last_step, drawn = 0, False
    for i, (label, log) in enumerate(runs):
        steps = sorted(log[kind])
        values = [log[kind][s] for s in steps]
        if not steps:
            continue
        last_step, drawn = max(last_step, steps[-1]), True
        if beta:  # noisy per-step losses: the smoothed curve carries the label, the raw one is context
            ax.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=0.8)
            ax.plot(steps, ema(values, beta), color=f"C{i}", label=f"{label} (EMA {beta})")
        else:  # evals are already averages over many tokens/examples: plot them as they are, with markers
            ax.plot(steps, values, color=f"C{i}", marker="." if len(steps) < 100 else None, label=label)
    for value, text, color in baselines:
        ax.axhline(value, color=color, linestyle="--", linewidth=1, label=f"{text} ({value})")
    if not drawn:  # nothing of this kind in any log: keep the file (README links to it) and say why
        ax.text(0.5, 0.5, f"no '{kind}' records in the log(s) yet", transform=ax.transAxes, ha="center")
    if kind != "hella":  # a loss falling from ~11 to ~3 reads better on a log scale, with plain-number ticks
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(plt.FormatStrFormatter("%g"))
    if tokens_per_step and drawn:
        add_token_axis(ax, tokens_per_step, last_step)
    ax.set(xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(label, log, tokens_per_step, beta):
    """One line per run: what a reader compares first (best val, best HellaSwag, where training ended)."""
    parts = [label]
    if log["train"]:
        steps = sorted(log["train"])
        final = ema([log["train"][s] for s in steps], beta)[-1] if beta else log["train"][steps[-1]]
        # the train line of step k is the k-th update, so steps 0..k mean k+1 batches of tokens seen
        tokens = (steps[-1] + 1) * tokens_per_step
        scale, unit = token_unit(tokens)
        parts.append(f"{steps[-1] + 1} steps, {tokens / scale:.2f}{unit} tokens, final train loss {final:.4f}")
    for kind, name, best in (("val", "min val loss", min), ("hella", "max HellaSwag", max)):
        if log[kind]:
            step = best(log[kind], key=log[kind].get)
            parts.append(f"{name} {log[kind][step]:.4f} @ step {step}")
    if log["skipped"]:
        parts.append(f"{log['skipped']} malformed or non-finite lines skipped")
    return " | ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot train/val loss and HellaSwag from log.txt files.")
    parser.add_argument("logs", nargs="+", help="log.txt files (train_gpt2.py's or build-nanogpt's)")
    parser.add_argument("--labels", nargs="+", help="legend label per log (default: each log's directory name)")
    parser.add_argument("--out", default="results", help="output dir, relative to the current dir (default: results)")
    parser.add_argument("--tokens_per_step", type=int, default=524288,
                        help="used when a log has no '# config' line (default 2**19, the GPT-2 124M recipe)")
    parser.add_argument("--smooth", type=float, default=0.95, help="train loss EMA coefficient (default 0.95), 0 = raw")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.logs):
        parser.error(f"--labels got {len(args.labels)} labels for {len(args.logs)} logs")
    if not 0 <= args.smooth < 1 or args.tokens_per_step < 1:
        parser.error("--smooth must be in [0, 1) and --tokens_per_step at least 1")
    logs = [parse_log(p) for p in args.logs]  # parse everything first: a bad file fails before any plotting
    labels = args.labels or [Path(p).resolve().parent.name for p in args.logs]
    if len(set(labels)) < len(labels):  # two runs both in a dir called log/: the full dir tells them apart
        labels = [str(Path(p).parent) for p in args.logs]
    per_log = [log["tokens_per_step"] or args.tokens_per_step for log in logs]
    # The top tokens axis is only honest if every run has the same tokens per step; otherwise we leave it out.
    tokens_axis = per_log[0] if len(set(per_log)) == 1 else None

    import matplotlib  # here, not at the top: importing plot.py stays free of matplotlib and its start-up cost
    matplotlib.use("Agg")  # headless: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = list(zip(labels, logs))
    figures = [("train", "train loss", [], args.smooth, "train_loss.png"),
               ("val", "val loss", [(GPT2_VAL_LOSS, "GPT-2 124M", "red")], 0, "val_loss.png"),
               ("hella", "HellaSwag acc_norm",
                [(GPT2_HELLA, "GPT-2 124M", "red"), (GPT3_HELLA, "GPT-3 124M", "green")], 0, "hellaswag.png")]
    for kind, ylabel, baselines, beta, name in figures:
        plot_metric(plt, runs, kind, ylabel, baselines, beta, tokens_axis, out / name)
        print(f"wrote {out / name}" + ("" if any(log[kind] for log in logs) else f" (no '{kind}' records)"))
    for (label, log), tokens_per_step in zip(runs, per_log):
        print(summary(label, log, tokens_per_step, args.smooth))


if __name__ == "__main__":
    main()
