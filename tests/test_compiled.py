"""The path users run on GPUs, run here: torch.compile (`--compile true` compiles on a CPU too, with inductor and the
C compiler), alone and under torchrun, with the in-loop evaluations and a resume, against eager. `--compile auto` is
off on CPUs, so without these tests CI never trained a compiled model (issue 31, item 12). Slow (each run compiles;
inductor's cache serves the repeats), and CI runs them."""
import pytest
from conftest import TINY, read_log, torchrun_cpu, train
from test_hellaswag import make_examples, write_examples

import hellaswag
import train_gpt2


def close(a, b, rel):
    return abs(float(a) - float(b)) <= rel * max(abs(float(a)), abs(float(b)))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_compiled_alone_and_under_torchrun_resumed_equals_eager(shards, tmp_path, recipe):
    data_file = write_examples(tmp_path / "hella.jsonl", make_examples(n=6, seed=3))
    args = [*TINY, "--data", str(shards), "--recipe", recipe, "--vocab_size", "50304", "--block_size", "128",
            "--warmup_steps", "1", "--lr_horizon", "4", "--eval_every", "2", "--checkpoint_every", "2",
            "--keep_checkpoints", "0", "--hellaswag_every", "2", "--hellaswag_data", str(data_file),
            "--sample_every", "2"]
    eager = train(shards, tmp_path / "eager", *args, "--max_steps", "4", base=[])
    # compiled, one process: 2 steps, then a resume to 4
    train(shards, tmp_path / "one", *args, "--compile", "true", "--max_steps", "2", base=[])
    one = train(shards, tmp_path / "one", *args, "--compile", "true", "--max_steps", "4", "--resume", base=[])
    # compiled, 2 ranks (half the accumulation each): the same, under torchrun
    torchrun_cpu([*args, "--compile", "true", "--max_steps", "2"], tmp_path / "two")
    torchrun_cpu([*args, "--compile", "true", "--max_steps", "4", "--resume"], tmp_path / "two")
    two = read_log(tmp_path / "two" / "log.txt")
    expected = {(s, "train") for s in range(4)} | {(s, k) for s in (0, 2, 4) for k in ("val", "hella")}
    assert set(eager) == set(one) == set(two) == expected
    for key, value in eager.items():
        if key[1] != "hella":  # val is logged to 4 decimals
            rel = 1e-5 if key[1] == "train" else 2e-4
            assert close(one[key], value, rel) and close(two[key], value, rel), (key, value, one[key], two[key])
    # HellaSwag in the loop: the score of each run's own model (weights equal to eager's within rounding can pick
    # another of two nearly tied endings, so the scores are compared with hellaswag.py's scorer on the saved model)
    examples = list(hellaswag.iterate_examples("val", data_file))
    for run, log in (("one", one), ("two", two)):
        model = train_gpt2.GPT.from_checkpoint(tmp_path / run / "model_00004.pt")
        assert log[4, "hella"] == f"{hellaswag.evaluate(model, examples, 'cpu')['acc_norm']:.4f}", run
