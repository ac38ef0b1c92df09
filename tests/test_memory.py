"""A batch that fits the card: without -B, a GPU that runs out of memory in the first micro-step gets half the
micro-batch (the total batch stays, through more accumulation), every rank the smallest that fits on any; an
out-of-memory error later is one line naming the -B to try and the checkpoint to resume from. Simulated on a CPU."""
import contextlib

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

    def fits(model, raw_model, B, T, world, dtype, reserve):
        tried.append(B)
        return True

    def all_reduce_min_with_rank_1(tensor, op=None):
        assert op == torch.distributed.ReduceOp.MIN
        tensor.fill_(min(int(tensor.item()), int(tried[-1] <= 2)))

    monkeypatch.setattr(memory, "fits_in_memory", fits)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce_min_with_rank_1)
    assert memory.fit_micro_batch(None, None, [], 16, 1024, world, "bfloat16") == 2
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


# -- what the search leaves room for, and what it compiles (issue 31) ---------------------------------------------

CPU = train_gpt2.DistInfo(rank=0, local_rank=0, world_size=1, device="cpu", device_type="cpu", is_master=True)
TINY_SHAPE = train_gpt2.GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32)


def tiny_model_and_optimizers(recipe="gpt2"):
    torch.manual_seed(0)
    raw_model = train_gpt2.RECIPES[recipe](TINY_SHAPE)
    lrs = {} if recipe == "gpt2" else {"embed_lr": 0.2, "head_lr": 0.008}
    return raw_model, raw_model.configure_optimizers(0.1, 1e-3, "cpu", **lrs)


class FakeGPU:
    """A GPU of `capacity` bytes, on which a micro-step of B sequences takes B * per_sequence bytes and a forward pass
    with an attention mask (an evaluation's) of R rows takes R * per_row, beside what memory.set_aside holds."""

    def __init__(self, monkeypatch, model_class, capacity, per_sequence, per_row=0):
        self.capacity, self.held, self.evaluation_rows = capacity, 0, []
        real_forward, real_hidden_states = model_class.forward, model_class.hidden_states

        def forward(model, idx, targets=None):
            self.need(idx.size(0) * per_sequence)
            return real_forward(model, idx, targets)

        def hidden_states(model, idx, pos=None, attn_mask=None):
            if attn_mask is not None:
                self.evaluation_rows.append(idx.size(0))
                self.need(idx.size(0) * per_row)
            return real_hidden_states(model, idx, pos, attn_mask)

        @contextlib.contextmanager
        def set_aside(nbytes, device):
            self.held += nbytes
            try:
                yield
            finally:
                self.held -= nbytes

        monkeypatch.setattr(model_class, "forward", forward)
        monkeypatch.setattr(model_class, "hidden_states", hidden_states)
        monkeypatch.setattr(memory, "set_aside", set_aside)

    def need(self, nbytes):
        if self.held + nbytes > self.capacity:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")


def state_bytes_after_one_step(model, optimizers):
    """The bytes of state the optimizers allocate at their first update, measured: one step on zero gradients."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for optimizer in optimizers:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return sum(t.numel() * t.element_size() for o in optimizers for s in o.state.values() for t in s.values()
               if t.dim() > 0)  # (AdamW's step counts are scalars, on the CPU)


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_the_search_leaves_room_for_the_optimizers_state(monkeypatch, recipe):
    """The search ran micro-steps with no optimizer state yet: a B within AdamW's 8 bytes per parameter of the card's
    size (1 GB at 124M) ran out of memory at the first update. Now the state is set aside during every try."""
    raw_model, optimizers = tiny_model_and_optimizers(recipe)
    state = state_bytes_after_one_step(*tiny_model_and_optimizers(recipe))  # (Muon: 4 bytes per matrix entry)
    unit = state // 4
    FakeGPU(monkeypatch, type(raw_model), capacity=8 * unit, per_sequence=unit)  # -B 8 alone would fill it
    B = memory.fit_micro_batch(raw_model, raw_model, optimizers, 8, 32, CPU, "float32")
    assert B == 4 and B * unit + state <= 8 * unit  # the largest that leaves the state's bytes free


def test_the_search_leaves_room_for_an_evaluation(monkeypatch):
    """HellaSwag and CORE score max(1, B // 4) examples (up to 4 rows each) per forward pass, with the gradients still
    held: each try now runs such a pass after its micro-step."""
    raw_model, optimizers = tiny_model_and_optimizers()
    state = state_bytes_after_one_step(*tiny_model_and_optimizers())
    gpu = FakeGPU(monkeypatch, type(raw_model), capacity=state + 5000, per_sequence=1, per_row=1000)  # 5 rows fit
    assert memory.fit_micro_batch(raw_model, raw_model, optimizers, 8, 32, CPU, "float32") == 4
    assert gpu.evaluation_rows == [8, 4]  # -B 8 scores 2 examples of 4 rows: too many


def test_the_search_compiles_once_for_the_chosen_B(shards):
    """The search's micro-step was model(x, x): torch.compile guards on its two inputs being one tensor, so the first
    real step, with distinct x and y, compiled the model again (a minute at 124M on a GPU)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    raw_model, optimizers = tiny_model_and_optimizers()
    compiles = CompileCounter()  # a backend that counts the graphs it is given, and runs them as they are
    model = torch.compile(raw_model, backend=compiles)
    assert memory.fit_micro_batch(model, raw_model, optimizers, 4, 32, CPU, "float32") == 4
    searched = compiles.frame_count
    cfg = train_gpt2.TrainConfig(micro_batch_size=4, seq_len=32, total_batch_size=256, lr_horizon=19073)
    loader = train_gpt2.ShardedLoader(shards, 4, 32, "train")
    train_gpt2.train_step(model, optimizers, loader, 0, 2, cfg, CPU, "float32")
    assert searched >= 1 and compiles.frame_count == searched  # the training steps use the search's graph
    torch._dynamo.reset()
