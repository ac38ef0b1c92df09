"""bench.py's own judgements and bookkeeping (its timings are figures for the README, not tests)."""
import json

import pytest
import torch

import bench
import train_gpt2


def test_hellaswag_methods_may_differ_by_bf16_rounding_but_not_in_float32():
    assert not bench.methods_disagree([60, 60, 61], "bfloat16", 200)  # the H200's bf16 run: one tie broken
    assert bench.methods_disagree([60, 60, 63], "bfloat16", 200)  # more than 1% is a real difference
    assert bench.methods_disagree([60, 60, 61], "float32", 200)
    assert not bench.methods_disagree([60, None, 60], "float32", 200)  # a row that ran out of memory


# bench.py's training rows on a tiny GPT: 4 micro-batches of 2 x 16 tokens make a real step of 128 = 2**7 tokens
TINY = ["--only", "train", "--device", "cpu", "--dtype", "float32", "--compile", "false", "--n_layer", "2",
        "--n_head", "2", "--n_embd", "32", "--vocab_size", "128", "-B", "2", "-T", "16", "--total_batch_size", "128",
        "--steps", "2"]
CALLS_PER_ROW = 1 + 2 + 2  # the first step (compilation), 2 warm-up steps, --steps 2


@pytest.fixture
def spy(monkeypatch):
    """Wraps train_gpt2.train_step (so rows that bypass it draw nothing here) and bench.median_time; records what
    each step drew from its loader, whether it changed every parameter tensor, the attention kernels allowed,
    and each row's measured time."""
    record = {"steps": [], "seconds": []}
    real_step, real_median = train_gpt2.train_step, bench.median_time

    def train_step(model, optimizers, train_loader, step, grad_accum_steps, cfg, world, dtype, **kwargs):
        batches, next_batch = [], train_loader.next_batch
        train_loader.next_batch = lambda: batches.append(next_batch()) or batches[-1]
        before = [p.detach().clone() for p in model.parameters()]
        call = {"grad_accum_steps": grad_accum_steps, "batches": batches, "total": cfg.total_batch_size,
                "math_only": not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()}
        record["steps"].append(call)
        try:
            call["returned"] = real_step(model, optimizers, train_loader, step, grad_accum_steps, cfg, world, dtype,
                                         **kwargs)
        finally:
            del train_loader.next_batch
        call["all_changed"] = all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        return call["returned"]

    def median_time(*args, **kwargs):
        record["seconds"].append(real_median(*args, **kwargs))
        return record["seconds"][-1]

    monkeypatch.setattr(train_gpt2, "train_step", train_step)
    monkeypatch.setattr(bench, "median_time", median_time)
    return record


def test_real_step_times_train_step_over_the_whole_batch(tmp_path, spy):
    path = tmp_path / "bench.json"
    bench.main(TINY + ["--recipe", "gpt2", "modern", "--json", str(path)])
    rows = json.loads(path.read_text())["results"]
    real = "real step: train_gpt2.train_step, 4 micro-steps of 2x16 = 2**7 tokens"
    micro = "one micro-step + optimizer"
    # per recipe: model(x, y) and the plain loss for one micro-step (eager on a CPU), then the real step
    assert [(r["recipe"], r["step"]) for r in rows] == [(recipe, kind) for recipe in ("gpt2", "modern")
                                                        for kind in (micro, micro, real)]
    assert len(spy["seconds"]) == len(rows)  # one median per row, in the rows' order
    for row, seconds in zip(rows, spy["seconds"]):
        tokens = 128 if row["step"] == real else 2 * 16
        assert row["tokens_per_s"] == round(tokens / seconds)
        assert row["step_s"] == pytest.approx(seconds, rel=1e-3)
        assert row["attention"] == "default" and row["compile"] is False
        assert any(key.startswith("peak_") for key in row)
    # every timed real step went through train_gpt2.train_step: 4 micro-batches of (2, 16) int64 CPU tokens each,
    # and it moved every parameter tensor (the optimizers stepped: AdamW, and Muon + AdamW in the modern recipe)
    assert len(spy["steps"]) == 2 * CALLS_PER_ROW
    for call in spy["steps"]:
        assert call["total"] == 128 and call["grad_accum_steps"] == 4 and len(call["batches"]) == 128 // (2 * 16)
        assert all(x.shape == y.shape == (2, 16) and x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
                   for x, y in call["batches"])
        assert call["all_changed"]
        loss, norm, lr = call["returned"]
        assert loss > 0 and norm > 0 and lr > 0


def test_attention_backends_are_rows_and_an_unavailable_one_is_an_error_note(tmp_path, spy):
    path = tmp_path / "bench.json"
    bench.main(TINY + ["--recipe", "gpt2", "--step_kind", "real", "--attention", "default", "math", "cudnn",
                       "--json", str(path)])
    rows = json.loads(path.read_text())["results"]
    assert [r["attention"] for r in rows] == ["default", "math", "cudnn"]
    assert all(isinstance(r["tokens_per_s"], int) and "error" not in r for r in rows[:2])
    assert rows[2]["tokens_per_s"] is None and "unavailable" in rows[2]["error"]  # no cuDNN kernel on a CPU
    # the context was around the timed step: only the math kernel allowed under "math", all under "default"
    steps = spy["steps"]
    assert [c["math_only"] for c in steps[:2 * CALLS_PER_ROW]] == [False] * CALLS_PER_ROW + [True] * CALLS_PER_ROW
    assert len(steps) == 2 * CALLS_PER_ROW + 1  # cudnn: the first step failed, nothing more ran


def test_total_batch_size_must_be_a_multiple_of_the_micro_batch(tmp_path):
    with pytest.raises(SystemExit, match=r"--total_batch_size 100 is not a positive multiple of B\*T = 2\*16 = 32"):
        bench.main(TINY + ["--total_batch_size", "100", "--json", str(tmp_path / "bench.json")])
    assert not (tmp_path / "bench.json").exists()  # refused before any work


def test_help_describes_the_sections_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for section in bench.SECTIONS:
        assert f"\n  {section} " in text
    assert "real step" in text and "2**19" in text and "Defaults:" in text


def test_core_rows_time_the_same_items_both_ways_in_the_bundles_format(tmp_path, monkeypatch):
    """The core section scores one item set (a synthetic bundle that core.py itself reads) both ways; in float32
    the two count the same items right, and the batched way is the one core.py runs."""
    import core

    monkeypatch.setattr(core, "BUNDLE_DIR", tmp_path / "no_bundle")  # the synthetic one, as offline
    paragraphs = [" ".join(f"w{(7 * i + j) % 97}" for j in range(80)) for i in range(20)]  # (Moliere's, offline)
    monkeypatch.setattr(bench, "moliere_paragraphs", lambda: paragraphs)
    out = tmp_path / "bench.json"
    bench.main(["--only", "core", "--device", "cpu", "--dtype", "float32", "--n_layer", "1", "--n_head", "2",
                "--n_embd", "32", "--core_rows", "12", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["core.py: options of 8 items per forward",
                                          "one sequence per forward, full logits"]
    assert rows[0]["items"] == 36 and rows[0]["correct"] == rows[1]["correct"] and rows[0]["data"] == "synthetic"
    assert rows[0]["speedup"] > 0
    tasks = core.load_tasks(bench.synthetic_bundle(tmp_path / "again", 12))  # the same rows: the format is core's
    assert [t.kind for t in tasks] == ["multiple_choice", "schema", "language_modeling"]
    assert [t.shots for t in tasks] == [3, 1, 1] and all(len(t.rows) == 12 for t in tasks)


@pytest.mark.slow
def test_memory_rows_count_each_ranks_state_and_a_micro_steps_peak(tmp_path):
    """bench.py --only memory's figures on a tiny GPT: FSDP on 2 ranks holds half of DDP's state per rank (counted
    from the tensors), and a micro-step's peak and time come back for both activation checkpointing settings."""
    args = bench.parse_args(["--only", "memory", "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd",
                             "32", "--vocab_size", "128", "-B", "2", "-T", "16", "--steps", "1"])
    world = train_gpt2.DistInfo(0, 0, 1, "cpu", "cpu", True)
    ddp, fsdp = (bench.state_per_rank(args, world, mode) for mode in ("ddp", "fsdp"))
    assert ddp["parameters_counted"] == fsdp["parameters_counted"] == 30_080
    assert ddp["optimizer_state_mb"] == 2 * ddp["parameters_mb"] and fsdp["state_mb_per_rank"] <= 0.55 * ddp[
        "state_mb_per_rank"]
    for checkpointed in (False, True):  # (in this process: the section itself runs each in a fresh one)
        row = {**bench.micro_step(vars(args), "cpu", "float32", checkpointed, "time"),
               **bench.micro_step(vars(args), "cpu", "float32", checkpointed, "memory")}
        assert row["step_s"] > 0 and row["cpu_s"] > 0 and row["peak_mb"] >= 0
        assert row["memory_figure"] == "peak RSS rise (VmHWM)"
