"""A batch that fits the card: without -B, a GPU that runs out of memory in the first micro-step gets half the
micro-batch (the total batch stays, through more accumulation), every rank the smallest that fits on any; an
out-of-memory error later is one line naming the -B to try and the checkpoint to resume from. Simulated on a CPU."""
import pytest
import torch
from conftest import TINY, read_log

import memory
import train_gpt2

WITHOUT_B = TINY[:TINY.index("-B")] + TINY[TINY.index("-B") + 2:]


def out_of_memory_above(monkeypatch, B_max):
    """From here on, GPT's forward pass on more than B_max sequences raises CUDA's out-of-memory error."""
    real_forward, seen = train_gpt2.GPT.forward, []

    def forward(self, idx, targets=None):
        seen.append(idx.size(0))
        if idx.size(0) > B_max:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return real_forward(self, idx, targets)

    monkeypatch.setattr(train_gpt2.GPT, "forward", forward)
    monkeypatch.setattr(memory, "out_of_memory_is_an_error", lambda world: True)  # as on CUDA
    return seen


def test_without_B_the_largest_micro_batch_that_fits_is_found_and_trains_as_if_given(shards, tmp_path, monkeypatch,
                                                                                   capsys):
    seen = out_of_memory_above(monkeypatch, 2)
    args = WITHOUT_B + ["--data", str(shards), "--max_steps", "6", "--eval_every", "3"]
    train_gpt2.main(args + ["--log_dir", str(tmp_path / "searched")])
    out = capsys.readouterr().out
    # the preset's 64 halves to 8 (256 tokens per step / T=32: the largest that divides), then 4, then 2 fits
    assert seen[:3] == [8, 4, 2] and set(seen[3:]) == {2}
    assert "-B 2: the largest micro-batch that fits in GPU memory (-B 8, 4 ran out)" in out
    assert "256 tokens per step = 2 x 32 x 1 ranks x 4 accumulation steps" in out
    monkeypatch.undo()
    train_gpt2.main(args + ["-B", "2", "--log_dir", str(tmp_path / "given")])
    assert read_log(tmp_path / "searched" / "log.txt") == read_log(tmp_path / "given" / "log.txt")


def test_B_given_is_used_as_given(shards, tmp_path, monkeypatch, capsys):
    seen = out_of_memory_above(monkeypatch, 64)
    train_gpt2.main(TINY + ["--data", str(shards), "--max_steps", "1", "--warmup_steps", "0",
                            "--log_dir", str(tmp_path)])
    assert set(seen) == {4} and "largest micro-batch" not in capsys.readouterr().out


def test_the_ranks_agree_on_the_smallest_batch_that_fits_on_all_of_them(monkeypatch, capsys):
    """Rank 0 (this process) fits any B; rank 1 runs out of memory above 2: both take 2."""
    world = train_gpt2.DistInfo(rank=0, local_rank=0, world_size=2, device="cpu", device_type="cpu", is_master=True)
    tried = []

    def fits(model, B, T, world, dtype):
        tried.append(B)
        return True

    def all_reduce_min_with_rank_1(tensor, op=None):
        assert op == torch.distributed.ReduceOp.MIN
        tensor.fill_(min(int(tensor.item()), int(tried[-1] <= 2)))

    monkeypatch.setattr(memory, "fits_in_memory", fits)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce_min_with_rank_1)
    assert memory.fit_micro_batch(None, 16, 1024, world, "bfloat16") == 2
    assert tried == [16, 8, 4, 2] and "-B 2: the largest micro-batch" in capsys.readouterr().out


def test_even_one_sequence_too_many_is_one_line(shards, tmp_path, monkeypatch, capsys):
    out_of_memory_above(monkeypatch, 0)
    with pytest.raises(SystemExit):
        train_gpt2.main(WITHOUT_B + ["--data", str(shards), "--log_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "even -B 1 (one sequence of 32 tokens) does not fit" in err[0]
    assert not (tmp_path / "log.txt").exists()


def test_out_of_memory_later_names_the_B_and_the_checkpoint_and_loses_nothing(shards, tmp_path, monkeypatch, capsys):
    real_step, args = train_gpt2.train_step, TINY + ["--data", str(shards), "--log_dir", str(tmp_path),
                                                     "--max_steps", "6", "--eval_every", "3", "--checkpoint_every", "2"]

    def step_3_runs_out(model, optimizers, loader, step, *rest):
        if step == 3:  # memory taken by something else, fragmentation, ...
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real_step(model, optimizers, loader, step, *rest)

    monkeypatch.setattr(train_gpt2, "train_step", step_3_runs_out)
    with pytest.raises(SystemExit):
        train_gpt2.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    checkpoint = tmp_path / "model_00002.pt"
    assert len(err) == 1 and "Traceback" not in err[0]
    assert (f"out of CPU memory at step 3 with -B 4: continue from {checkpoint} with --resume {checkpoint} -B 2"
            in err[0])
    monkeypatch.undo()
    train_gpt2.main(args + ["--resume", str(checkpoint), "-B", "2"])  # the message's advice, taken
    train_gpt2.main(TINY + ["--data", str(shards), "--log_dir", str(tmp_path / "straight"), "--max_steps", "6",
                            "--eval_every", "3"])
    resumed, straight = read_log(tmp_path / "log.txt"), read_log(tmp_path / "straight" / "log.txt")
    assert resumed.keys() == straight.keys()
    for key in straight:  # the same batches; B=2 sums its micro-steps in another order
        assert abs(float(resumed[key]) - float(straight[key])) <= 1e-5, key


def test_a_compiler_failure_while_searching_is_one_line(shards, tmp_path, monkeypatch, capsys):
    """The search's first micro-step is where torch.compile compiles: its failure there says what to do, too."""
    class TritonMissing(Exception):
        pass

    TritonMissing.__module__ = "torch._inductor.exc"

    def forward(self, idx, targets=None):
        raise TritonMissing("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(train_gpt2.GPT, "forward", forward)
    monkeypatch.setattr(memory, "out_of_memory_is_an_error", lambda world: True)
    with pytest.raises(SystemExit):
        train_gpt2.main(WITHOUT_B + ["--data", str(shards), "--log_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile failed" in err[0] and "--compile false" in err[0]
