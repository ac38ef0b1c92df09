"""plot.py: log parsing (headers, resumes, junk lines), the three PNGs and where they go, overlays, reference lines
only for runs on their corpus (FineWeb-Edu, Molière), smoothing without lag (on the committed quick-start logs),
readable loss ticks, titles, labels and error messages."""
import itertools

import numpy as np
import pytest

import plot
from common import UserError
from conftest import ROOT


# A train_gpt2.py-style log: header, records, an unknown kind, junk, then a crash and a resume that redoes
# steps 2 and 3 (the later lines must win).
SYNTHETIC = """\
# config {"total_batch_size": 8192, "max_steps": 5, "preset": "moliere"}
# git 0123abc torch 2.4.0 device cpu
0 val 10.9876
0 hella 0.2500
0 train 10.950000
0 lr 0.0006
1 train 9.500000
1 sample Hello, I'm a language model, and
2 train 8.000000
3 tra

oops
4 val abc
# resumed from model_00002.pt
2 train 7.900000
2 val 7.5000
2 hella 0.2600
3 train 7.100000
4 train nan
4 train 6.500000 extra
4 train 6.400000
5 val 6.3000
5 hella 0.2700
"""

# build-nanogpt's log.txt: records only, no header (its tokens per step is 2**19, our default).
NANOGPT = "0 val 10.9513\n0 hella 0.2490\n0 train 10.955029\n1 train 9.812309\n2 train 9.401567\n"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fake_run(steps, offset=0.0, config='{"total_batch_size": 524288}', hella=True):
    """A plausible log: train loss decaying from ~11 with noise, val every 10 steps, hella every 20 (if hella).
    config: the JSON of its `# config` line, None for none (as in build-nanogpt's logs)."""
    rng = np.random.default_rng(0)
    lines = [f"# config {config}"] if config is not None else []
    for step in range(steps):
        loss = 3 + 8 * np.exp(-step / 30) + offset
        lines.append(f"{step} train {loss + rng.normal(0, 0.1):.6f}")
        if step % 10 == 0:
            lines.append(f"{step} val {loss + 0.1:.4f}")
        if step % 20 == 0 and hella:
            lines.append(f"{step} hella {0.25 + step / 4000 - offset / 100:.4f}")
    return "\n".join(lines) + "\n"


def test_parse_synthetic_log_keeps_later_lines_and_skips_junk(tmp_path):
    log = plot.parse_log(write(tmp_path / "log" / "log.txt", SYNTHETIC))
    assert log["train"] == {0: 10.95, 1: 9.5, 2: 7.9, 3: 7.1, 4: 6.4}
    assert log["val"] == {0: 10.9876, 2: 7.5, 5: 6.3}
    assert log["hella"] == {0: 0.25, 2: 0.26, 5: 0.27}
    assert log["tokens_per_step"] == 8192 and log["data"] == "edu_fineweb10B"  # no "data": the default
    # "3 tra", "oops", "4 val abc", "4 train nan" and "4 train 6.5 extra"; lr/sample lines and blanks are not junk
    assert log["skipped"] == 5


def test_parse_build_nanogpt_log(tmp_path):
    log = plot.parse_log(write(tmp_path / "log.txt", NANOGPT))
    assert log["train"] == {0: 10.955029, 1: 9.812309, 2: 9.401567}
    assert log["val"] == {0: 10.9513} and log["hella"] == {0: 0.249}
    assert log["tokens_per_step"] is None and log["data"] is None and log["skipped"] == 0


def test_smoothing_follows_a_trend_without_lag():
    steps = list(range(300))
    assert plot.smooth(steps, [4.0] * 300, 0.1) == pytest.approx([4.0] * 300)  # no pull towards 0 at the start
    # A loss falling along a line is its own smoothed curve, at the end too: an EMA of 0.95 would sit
    # 0.95 / 0.05 = 19 steps behind, 0.57 above the line
    line = [10 - 0.03 * s for s in steps]
    assert plot.smooth(steps, line, 0.1) == pytest.approx(line)
    # steps 0-9 have only themselves within 10%; step 100 the 21 steps 90..110, whose mean is the value at 100
    noisy = [3 + (-1) ** s * 0.1 for s in steps]
    smoothed = plot.smooth(steps, noisy, 0.1)
    assert smoothed[:10] == pytest.approx(noisy[:10]) and smoothed[100] == pytest.approx(3 + 0.1 / 21)


def assert_real_png(path):
    """A valid PNG, not tiny, and not one flat colour (a blank canvas would pass the first two checks)."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(path)[..., :3]
    assert pixels.std() > 0.05
    packed = (pixels * 255).round().astype(np.int64) @ np.array([65536, 256, 1])  # one int per RGB colour
    assert len(np.unique(packed)) > 50
    return pixels


def count_colour(pixels, hex_colour):
    """Pixels exactly (to 1/255) of one colour: the centre of a line drawn in it."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).max(axis=-1) < 1.5 / 255).sum())


def test_main_writes_three_pngs_and_summary(tmp_path, capsys):
    path = write(tmp_path / "myrun" / "log.txt", fake_run(100))
    plot.main([str(path), "--out", str(tmp_path / "out")])
    for name in ("train_loss.png", "val_loss.png", "hellaswag.png"):
        pixels = assert_real_png(tmp_path / "out" / name)
        assert count_colour(pixels, "#1f77b4") > 200  # the run, drawn in matplotlib's first colour C0
        if name == "train_loss.png":  # plus the raw curve under it: C0 at alpha 0.25 on white
            assert count_colour(pixels, "#c7ddec") > 200
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    # the final train loss twice, each labelled: the last record, and the smoothed curve's end (default --smooth
    # 0.1): the line fitted to steps 90..99 (within 10% of 99; none after it), evaluated at 99
    losses = np.array(list(plot.parse_log(path)["train"].values()))
    smoothed = np.polyval(np.polyfit(np.arange(90, 100), losses[90:], 1), 99)
    assert summary.startswith(f"myrun | 100 steps, 52.43M tokens, final train loss {losses[99]:.4f} (raw, step 99), "
                              f"{smoothed:.4f} (smoothed) |")  # 100 * 2**19 tokens
    # val at step 90 = 3 + 8 * exp(-3) + 0.1; HellaSwag rises with the step, so its last eval (80) is best
    assert "min val loss 3.4983 @ step 90" in summary and "max HellaSwag 0.2700 @ step 80" in summary


def test_two_logs_overlay_with_distinct_labels(tmp_path, capsys):
    # Both logs live in a dir called log/, so the labels fall back to the full dirs to tell them apart.
    first = write(tmp_path / "a" / "log" / "log.txt", fake_run(60))
    second = write(tmp_path / "b" / "log" / "log.txt", fake_run(80, offset=0.5))
    plot.main([str(first), str(second), "--out", str(tmp_path / "out"), "--smooth", "0"])
    for name in ("train_loss.png", "val_loss.png", "hellaswag.png"):
        pixels = assert_real_png(tmp_path / "out" / name)
        assert count_colour(pixels, "#1f77b4") > 100 and count_colour(pixels, "#ff7f0e") > 100  # C0 and C1
    out = capsys.readouterr().out
    assert f"{first.parent} | 60 steps" in out and f"{second.parent} | 80 steps" in out
    # --smooth 0: the final train loss is the last raw value
    assert f"final train loss {plot.parse_log(second)['train'][79]:.4f}" in out


def run_main(monkeypatch, argv, save=False):
    """plot.main(argv), returning what each figure shows, read before main saves and closes it: {kind: dict(
    legend=[texts], runs={label: colour}, curves={colour: y values of the labelled run line}, refs=[y of the
    reference lines], yticks=[(y, label) on the axis], title=, ylabel=, yscale=)}. The PNGs are written only if
    `save` (rendering them again takes most of a test's time; other tests check them)."""
    shown, draw = {}, plot.plot_metric

    def spy(plt, runs, kind, *args):
        fig = draw(plt, runs, kind, *args)
        fig.canvas.draw()  # tick labels get their text when drawn
        ax = fig.axes[0]
        lo, hi = ax.get_ylim()
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]  # the labelled ones
        runs = [line for line in lines if line.get_linestyle() == "-" and str(line.get_color()).startswith("C")]
        shown[kind] = {"legend": [t.get_text() for t in ax.get_legend().get_texts()],
                       "runs": {line.get_label(): line.get_color() for line in runs},
                       "curves": {line.get_color(): np.asarray(line.get_ydata(), dtype=float) for line in runs},
                       "refs": [line.get_ydata()[0] for line in lines if line.get_linestyle() != "-"],
                       "yticks": [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels()
                                  if t.get_text() and lo <= t.get_position()[1] <= hi],
                       "title": ax.get_title(), "ylabel": ax.get_ylabel(), "yscale": ax.get_yscale()}
        return fig

    monkeypatch.setattr(plot, "plot_metric", spy)
    if not save:
        monkeypatch.setattr(plot, "atomic_write", lambda path, write: None)
    plot.main(argv)
    return shown


@pytest.mark.parametrize("config, corpus", [
    ('{"total_batch_size": 524288}', "fineweb"),  # train_gpt2.py's default --data, edu_fineweb10B
    ('{"data": "/data/FineWeb-Edu_sample/"}', "fineweb"),  # shards made elsewhere, named for what they hold
    (None, "fineweb"),  # build-nanogpt's logs have no config line: they train on FineWeb-Edu
    ('{"data": "input/moliere.txt", "preset": "moliere"}', "moliere"),  # 3.2924 on other text means nothing here
    ('{"data": "input/vim_help.txt"}', None),  # other text: no line is comparable
])
def test_reference_lines_only_for_runs_on_their_corpus(tmp_path, monkeypatch, config, corpus):
    path = write(tmp_path / "run" / "log.txt", fake_run(60, config=config))
    shown = run_main(monkeypatch, [str(path), "--out", str(tmp_path / "out")])
    assert shown["train"]["refs"] == []
    if corpus == "fineweb":
        assert shown["val"]["refs"] == [3.2924] and shown["hella"]["refs"] == [0.2955, 0.337]
        assert shown["val"]["legend"] == ["run", "GPT-2 124M on FineWeb-Edu val (3.2924)"]
        assert shown["hella"]["legend"] == ["run", "GPT-2 124M (0.2955)", "GPT-3 124M, its paper (0.337)"]
    elif corpus == "moliere":  # the README's unigram and bigram models of Molière, on its val split
        assert shown["val"]["refs"] == [5.97, 3.72] and shown["hella"]["refs"] == []
        assert shown["val"]["legend"] == ["run", "unigram model on Molière val (5.97)",
                                          "bigram model on Molière val (3.72)"]
    else:
        assert shown["val"]["refs"] == [] and shown["hella"]["refs"] == []
        assert shown["val"]["legend"] == ["run"] and shown["hella"]["legend"] == ["run"]


def test_overlay_labels_runs_by_directory_in_distinct_colours(tmp_path, monkeypatch, capsys):
    moliere = '{"data": "input/moliere.txt"}'
    first = write(tmp_path / "log_moliere" / "log.txt", fake_run(60, config=moliere, hella=False))
    second = write(tmp_path / "log_moliere_modern" / "log.txt", fake_run(60, 0.5, config=moliere, hella=False))
    shown = run_main(monkeypatch, [str(first), str(second), "--out", str(tmp_path / "out")])
    assert shown["train"]["runs"] == {"log_moliere (smoothed, ±10% of step)": "C0",
                                      "log_moliere_modern (smoothed, ±10% of step)": "C1"}
    assert shown["train"]["legend"][-1] == "faint: raw, each step"  # says what the faint curves are
    assert shown["val"]["runs"] == {"log_moliere": "C0", "log_moliere_modern": "C1"}
    assert shown["val"]["legend"][:2] == ["log_moliere", "log_moliere_modern"]  # then Molière's n-gram lines
    out = capsys.readouterr().out
    assert "\nlog_moliere | 60 steps" in out and "\nlog_moliere_modern | 60 steps" in out


@pytest.mark.parametrize("config", ['{"total_batch_size": 524288}', '{"data": "input/moliere.txt"}'])
def test_core_is_drawn_with_gpt2s_score_for_every_run(tmp_path, monkeypatch, capsys, config):
    """train_gpt2.py's `{step} core {value}` records: core.png, GPT-2 124M's 0.1139 dashed whatever the corpus (the
    yardstick does not depend on what the model read), on a linear axis; the summary names the best."""
    text = fake_run(40, config=config) + "".join(f"{s} core {0.01 * s / 10:.4f}\n" for s in (0, 10, 20, 30))
    path = write(tmp_path / "run" / "log.txt", text)
    shown = run_main(monkeypatch, [str(path), "--out", str(tmp_path / "out")])
    assert shown["core"]["refs"] == [0.1139] and shown["core"]["yscale"] == "linear"
    assert shown["core"]["legend"] == ["run", "GPT-2 124M, as nanochat measured it (0.1139)"]
    assert list(shown["core"]["curves"].values())[0].tolist() == [0.0, 0.01, 0.02, 0.03]
    assert "max CORE 0.0300 @ step 30" in capsys.readouterr().out


def test_figures_have_titles_and_say_which_axis_is_logarithmic(tmp_path, monkeypatch):
    first = write(tmp_path / "run_a" / "log.txt", fake_run(60))
    second = write(tmp_path / "run_b" / "log.txt", fake_run(60, 0.5))
    shown = run_main(monkeypatch, [str(first), str(second), "--out", str(tmp_path / "out")])
    assert shown["train"]["title"] == "train loss: run_a vs run_b"
    assert shown["val"]["title"] == "val loss: run_a vs run_b"
    assert shown["hella"]["title"] == "HellaSwag acc_norm: run_a vs run_b"
    for kind, what in (("train", "train loss"), ("val", "val loss")):  # losses on a log axis, and the label says so
        assert shown[kind]["yscale"] == "log" and shown[kind]["ylabel"] == f"{what} (nats per token, log scale)"
    assert shown["hella"]["yscale"] == "linear" and shown["hella"]["ylabel"] == "HellaSwag acc_norm"
    # too many names for one line: the title counts the runs, the legend names them
    names = [f"a_rather_long_run_name_{i}" for i in range(4)]
    assert plot.title("val loss", names) == "val loss: 4 runs (see the legend)"


def test_pngs_go_beside_the_log_not_into_results(tmp_path, monkeypatch, capsys):
    # As the README's quick start has it, from the checkout: results/ holds the committed plots, which a plot of
    # one's own run must not overwrite
    monkeypatch.chdir(tmp_path)
    committed = write(tmp_path / "results" / "train_loss.png", "the committed plot")
    write(tmp_path / "log_moliere" / "log.txt", fake_run(60, config='{"data": "input/moliere.txt"}', hella=False))
    plot.main(["log_moliere/log.txt"])
    assert committed.read_bytes() == b"the committed plot"  # untouched, and nothing added beside it
    assert [p.name for p in committed.parent.iterdir()] == ["train_loss.png"]
    assert_real_png(tmp_path / "log_moliere" / "train_loss.png")
    assert_real_png(tmp_path / "log_moliere" / "val_loss.png")
    assert "wrote log_moliere/train_loss.png\nwrote log_moliere/val_loss.png\n" in capsys.readouterr().out
    # several logs: overlaid in the first one's directory (the second's holds only its log)
    write(tmp_path / "log_moliere_modern" / "log.txt", fake_run(40, 0.5, hella=False))
    (tmp_path / "log_moliere" / "train_loss.png").unlink()
    plot.main(["log_moliere/log.txt", "log_moliere_modern/log.txt"])
    assert_real_png(tmp_path / "log_moliere" / "train_loss.png")
    assert [p.name for p in (tmp_path / "log_moliere_modern").iterdir()] == ["log.txt"]
    assert committed.read_bytes() == b"the committed plot"
    # --help says where the PNGs go without --out (which every other test passes)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        plot.main(["--help"])
    assert "the log's own directory; with several logs, the first one's" in " ".join(capsys.readouterr().out.split())


def local_mean(values, half):
    """The mean of the values within `half` records either side, fewer near the ends so the window stays centred."""
    n = len(values)
    return np.array([values[i - k:i + k + 1].mean() for i in range(n) for k in [min(half, i, n - 1 - i)]])


def test_smoothed_train_loss_tracks_the_raw_loss_of_the_quick_start(tmp_path, monkeypatch, capsys):
    # The committed 200-step quick-start runs, whose loss falls from 10.8 to 5.7 in 25 steps. Within the first 50
    # steps the drawn smoothed curve is at most 0.137 (gpt2; modern 0.215) from the raw loss's centred mean over 7
    # steps, +0.001 (+0.009) on average. The bound, 0.25, is about 4 times one step's noise (std 0.057 after step
    # 50): the curve is raw for its first 10 steps, so it can't be closer than that noise. The EMA of 0.95 it
    # replaces sat up to 2.1 (modern 2.8) above, +1.2 (+1.6) on average, lagging the fall by about 19 steps.
    logs = [ROOT / "results" / "moliere_gpt2" / "log.txt", ROOT / "results" / "moliere_modern" / "log.txt"]
    shown = run_main(monkeypatch, [str(p) for p in logs] + ["--out", str(tmp_path)])
    for colour, path in zip(("C0", "C1"), logs):
        raw = np.array([value for _, value in sorted(plot.parse_log(path)["train"].items())])
        gap = shown["train"]["curves"][colour][:50] - local_mean(raw, 3)[:50]
        assert np.abs(gap).max() < 0.25 and abs(gap.mean()) < 0.03, (path, np.abs(gap).max(), gap.mean())
    assert shown["val"]["refs"] == [5.97, 3.72]  # both committed runs trained on input/moliere.txt
    # the summary gives the last record and the smoothed curve's end, each labelled; the two differ by the last
    # batch's noise (about 0.1 on these runs), while the curve's end is the loss of the last steps
    out = capsys.readouterr().out
    train, val = (plot.parse_log(logs[0])[kind] for kind in ("train", "val"))
    last, recent = train[199], np.mean([train[s] for s in range(190, 200)])
    smoothed = shown["train"]["curves"]["C0"][-1]
    assert f"moliere_gpt2 | 200 steps, 1.64M tokens, final train loss {last:.4f} (raw, step 199), {smoothed:.4f} " \
           f"(smoothed) | min val loss {val[200]:.4f} @ step 200" in out
    assert abs(smoothed - recent) < 0.05 < abs(last - recent)  # not the last batch's noise


def test_loss_axes_have_labelled_ticks_around_the_final_value(tmp_path, monkeypatch):
    # a loss falling from 11 to 3.43: the final value must be readable off the axis, to about 0.1
    lines = [f"{step} train {3.43 + 7.57 * np.exp(-step / 25):.6f}\n{step} val {3.43 + 7.57 * np.exp(-step / 25):.4f}"
             for step in range(200)]
    path = write(tmp_path / "run" / "log.txt", "\n".join(lines) + "\n")
    shown = run_main(monkeypatch, [str(path), "--out", str(tmp_path / "out"), "--smooth", "0"])
    final = plot.parse_log(path)["val"][199]
    for kind in ("train", "val"):
        ticks = [y for y, _ in shown[kind]["yticks"]]
        assert all(float(text) == pytest.approx(y) for y, text in shown[kind]["yticks"])  # labels say their value
        below, above = max(t for t in ticks if t <= final), min(t for t in ticks if t >= final)
        assert 3 <= below < final < above <= 4 and above - below <= 0.25
        # and across the whole range, up to the start at 11: no gap wider than a quarter of the value
        assert max(ticks) >= 10 and max(b / a for a, b in itertools.pairwise(ticks)) <= 1.25


def test_log_ticks_are_round_and_finer_at_the_low_end():
    assert plot.log_ticks(3, 11) == [3, 3.2, 3.4, 3.6, 3.8, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8, 9, 10, 11]
    assert plot.log_ticks(3.2, 3.6) == [3.2, 3.25, 3.3, 3.35, 3.4, 3.45, 3.5, 3.55, 3.6]  # not 21 ticks 0.02 apart
    assert plot.log_ticks(5, 5) == [5]


def test_metric_without_records_gets_no_png(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "log" / "log.txt", NANOGPT.replace("0 hella 0.2490\n", ""))
    out = tmp_path / "out"
    shown = run_main(monkeypatch, [str(path), "--labels", "nano", "--out", str(out), "--tokens_per_step", "1000"],
                     save=True)
    assert not (out / "hellaswag.png").exists() and "hella" not in shown  # an empty plot would look broken
    assert_real_png(out / "train_loss.png")
    assert_real_png(out / "val_loss.png")
    assert shown["val"]["legend"][0] == "nano"  # --labels wins over the directory name
    printed = capsys.readouterr().out
    assert f"no HellaSwag records: {out / 'hellaswag.png'} not written" in printed
    assert "nano | 3 steps, 3.00K tokens" in printed and "HellaSwag" not in printed.splitlines()[-1]
    # a log of val records only: no train_loss.png either
    path = write(tmp_path / "val_only" / "log.txt", "0 val 10.9\n10 val 7.5\n")
    plot.main([str(path), "--out", str(tmp_path / "out2")])
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["val_loss.png"]
    assert "no train loss records" in capsys.readouterr().out


def test_missing_file_and_empty_log_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="no such log file"):  # the library function raises; main reports
        plot.parse_log(tmp_path / "nope.txt")
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(tmp_path / "nope.txt"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"plot.py: error: no such log file: {tmp_path / 'nope.txt'}\n"
    empty = write(tmp_path / "log.txt", "# config {}\n\nnot a record\n")
    with pytest.raises(UserError, match="no train/val/hella/core records in"):
        plot.parse_log(empty)
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(empty), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"plot.py: error: no train/val/hella/core records in {empty}\n"
    assert not (tmp_path / "out").exists()  # failed before writing anything


@pytest.mark.parametrize("where", ["beside", "--out", "./ form", "link"])
def test_a_png_never_overwrites_a_log(tmp_path, capsys, where):
    """A log named like one of the PNGs, in the directory they go to: plotted, it was replaced by its own plot (the
    run's only record). Refused before any parsing or drawing, the log as it was."""
    log = write(tmp_path / "run" / "val_loss.png", SYNTHETIC)
    args = {"beside": [str(log)], "--out": [str(log), "--out", str(tmp_path / "run")],
            "./ form": [str(log), "--out", str(tmp_path / "run" / "." / "sub" / "..")],
            "link": [str(log), "--out", str(tmp_path / "link")]}[where]
    (tmp_path / "link").symlink_to(tmp_path / "run")
    with pytest.raises(SystemExit):
        plot.main(args)
    err = capsys.readouterr().err
    out = {"beside": tmp_path / "run", "--out": tmp_path / "run", "./ form": tmp_path / "run" / "." / "sub" / "..",
           "link": tmp_path / "link"}[where]
    assert err == (f"plot.py: error: the PNG {out / 'val_loss.png'} is the same file as the log {log}: writing it "
                   f"would destroy that input; choose another --out\n")
    assert log.read_text() == SYNTHETIC and sorted(p.name for p in log.parent.iterdir()) == ["val_loss.png"]
    plot.main([str(log), "--out", str(tmp_path / "figs")])  # elsewhere: plotted
    assert (tmp_path / "figs" / "val_loss.png").read_bytes().startswith(b"\x89PNG") and log.read_text() == SYNTHETIC
