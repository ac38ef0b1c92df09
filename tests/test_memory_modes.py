"""The memory modes (memory.py): activation checkpointing computes the same gradients; FSDP on 2 ranks computes what DDP
on 2 ranks and 1 process compute, evaluates and samples as they do, and its checkpoints are theirs (either mode
resumes the other's, on any number of ranks); the modes' refusals and the memory check's advice."""
import re

import pytest
import torch
from conftest import TINY, read_log, torchrun_cpu, write_shards

import memory
import train_gpt2

SHAPE = train_gpt2.GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32)


# -- activation checkpointing -------------------------------------------------------------------------------------

def gradients(recipe, checkpointed, backend=None, shape=SHAPE):
    """(loss, {name: gradient}, state_dict keys, block forwards run) of one forward and backward of a tiny model of
    `recipe`, weights random everywhere (the modern recipe's zero-initialised projections would give zero gradients)."""
    torch.manual_seed(0)
    model, runs = train_gpt2.RECIPES[recipe](shape), []
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for block in model.transformer.h:  # counting each block's forward passes (eager only: compiled code is traced)
        block.forward = lambda *args, forward=block.forward: runs.append(1) or forward(*args)
    if checkpointed:
        memory.checkpoint_blocks(model)
    forward = torch.compile(model, backend=backend) if backend else model
    x, y = (torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    _, loss = forward(x, y)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}, list(model.state_dict()), len(runs)


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_activation_checkpointing_gives_the_same_gradients_bit_for_bit_in_eager_mode(recipe):
    loss, grads, names, runs = gradients(recipe, checkpointed=False)
    loss_ac, grads_ac, names_ac, runs_ac = gradients(recipe, checkpointed=True)
    assert runs == 2 and runs_ac == 4  # each block again in the backward pass
    assert loss_ac == loss and all(torch.equal(grads_ac[name], grads[name]) for name in grads)
    assert names_ac == names  # the same state_dict keys: checkpoints and exports do not change


@pytest.mark.parametrize("recipe, backend", [
    ("gpt2", "aot_eager"), ("modern", "aot_eager"),  # torch.compile's tracing and AOT autograd, without codegen
    pytest.param("gpt2", "inductor", marks=pytest.mark.slow),  # what --compile true runs: 25 s to compile one block
])
def test_activation_checkpointing_gives_the_same_gradients_compiled(recipe, backend):
    shape = SHAPE if backend != "inductor" else train_gpt2.GPTConfig(block_size=32, vocab_size=128, n_layer=1,
                                                                     n_head=2, n_embd=32)
    torch._dynamo.reset()
    loss, grads, _, _ = gradients(recipe, checkpointed=False, shape=shape)
    loss_ac, grads_ac, _, _ = gradients(recipe, checkpointed=True, backend=backend, shape=shape)
    torch._dynamo.reset()
    assert abs(loss_ac - loss) <= 1e-6
    for name in grads:  # float32, summed in another order by the compiled kernels: rounding only
        assert torch.allclose(grads_ac[name], grads[name], rtol=1e-5, atol=1e-7), name


def test_a_run_with_activation_checkpointing_recomputes_the_blocks_and_logs_the_same_losses(shards, tmp_path,
                                                                                          monkeypatch):
    args = TINY + ["--data", str(shards), "--max_steps", "6", "--eval_every", "3"]
    real_forward, calls = train_gpt2.Block.forward, []

    def forward(block, *args):  # block forwards that keep a graph for the backward: training's, and recomputations
        calls.append(torch.is_grad_enabled())
        return real_forward(block, *args)

    monkeypatch.setattr(train_gpt2.Block, "forward", forward)
    train_gpt2.main(args + ["--log_dir", str(tmp_path / "plain")])
    plain, calls[:] = sum(calls), []
    train_gpt2.main(args + ["--log_dir", str(tmp_path / "ac"), "--activation_checkpointing", "true"])
    assert plain == 6 * 2 * 2 and sum(calls) == 2 * plain  # 6 steps of 2 micro-steps of 2 blocks, each one again
    assert read_log(tmp_path / "ac" / "log.txt") == read_log(tmp_path / "plain" / "log.txt")  # bit for bit


# -- FSDP: the same run as DDP and as one process; checkpoints that either mode resumes ---------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """20 steps of 256 tokens with accumulation (B=2: 2 micro-steps on each of 2 ranks, 4 in one process) and a
    checkpoint at step 10: under FSDP on 2 ranks, DDP on 2 ranks and in one process; stdout of the two torchruns."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    shards = write_shards(tmp_path / "shards", [4000, 6000, 5000])
    args = TINY + ["--data", str(shards), "-B", "2", "--max_steps", "20", "--checkpoint_every", "10"]
    out = {"fsdp": torchrun_cpu(args + ["--fsdp", "true"], tmp_path / "fsdp").stdout,
           "ddp": torchrun_cpu(args, tmp_path / "ddp").stdout}
    train_gpt2.main(args + ["--log_dir", str(tmp_path / "single")])
    return tmp_path, out


def assert_close(log, reference, tolerance=1e-5):
    assert log.keys() <= reference.keys() and log
    for key in log:  # the same batches, summed in another order: float32 rounding only
        assert abs(float(log[key]) - float(reference[key])) <= tolerance, key


@pytest.mark.slow
def test_fsdp_on_two_ranks_computes_what_ddp_and_one_process_compute(runs):
    """Tied wte/lm_head, the clipped global gradient norm, the accumulation: any of them wrong and the losses part."""
    tmp_path, out = runs
    fsdp, ddp, single = (read_log(tmp_path / run / "log.txt") for run in ("fsdp", "ddp", "single"))
    assert fsdp.keys() == ddp.keys() == single.keys() and len(fsdp) == 20 + 5
    assert_close(fsdp, ddp)
    assert_close(fsdp, single)
    fsdp_norms, ddp_norms = ([float(n) for n in re.findall(r"\| norm (\S+) \|", out[run])] for run in ("fsdp", "ddp"))
    assert len(fsdp_norms) == 20 and max(abs(a - b) for a, b in zip(fsdp_norms, ddp_norms)) <= 1e-4  # the global norm
    assert max(fsdp_norms) > 1.0  # so clipping (at 1.0) was at work


@pytest.mark.slow
def test_fsdp_evaluates_and_samples_on_every_rank_alone(shards, tmp_path):
    """HellaSwag (13 examples: 7 on rank 0, 6 on rank 1, one per forward), CORE and samples: the ranks run different
    numbers of forward passes and rank 0 alone samples, which FSDP's per-block all-gathers would not survive. The
    scores are those of hellaswag.py's and core.py's own scorers on the checkpoint."""
    import core
    import hellaswag
    from test_core import write_bundle
    from test_hellaswag import make_examples, write_examples

    data_file = write_examples(tmp_path / "hella.jsonl", make_examples(n=13, seed=3))
    bundle = write_bundle(tmp_path / "eval_bundle")
    out = torchrun_cpu(TINY + ["--data", str(shards), "--vocab_size", "50304", "--block_size", "128", "--max_steps",
                               "2", "--warmup_steps", "1", "--eval_every", "0", "--checkpoint_every", "2",
                               "--hellaswag_every", "2", "--hellaswag_data", str(data_file), "--core_every", "2",
                               "--core_bundle", str(bundle), "--sample_every", "2", "--fsdp", "true"], tmp_path)
    assert out.stdout.count("> Hello, I'm a language model,") == 2 * 4  # at step 0 and at the end
    log, model = read_log(tmp_path / "log.txt"), train_gpt2.GPT.from_checkpoint(tmp_path / "model_00002.pt")
    result = hellaswag.evaluate(model, list(hellaswag.iterate_examples("val", data_file)), "cpu")
    assert log[2, "hella"] == f"{result['acc_norm']:.4f}" and result["n"] == 13
    tasks = core.load_tasks(bundle)
    score = core.summarize(tasks, core.evaluate(model, tasks, core.render(tasks), "cpu"))["core"]
    assert log[2, "core"] == f"{score:.4f}"


@pytest.mark.slow
def test_a_checkpoint_is_the_same_whether_fsdp_or_ddp_wrote_it(runs):
    """Full tensors under the same names; the optimizer's state numbered as torch.optim numbers it."""
    tmp_path, _ = runs
    fsdp, ddp = (torch.load(tmp_path / run / "model_00010.pt", weights_only=True) for run in ("fsdp", "ddp"))
    assert fsdp["model"].keys() == ddp["model"].keys()
    for name, tensor in ddp["model"].items():
        assert fsdp["model"][name].shape == tensor.shape and torch.allclose(fsdp["model"][name], tensor, atol=1e-4)
    (a,), (b,) = fsdp["optimizer"], ddp["optimizer"]
    assert a["param_groups"] == b["param_groups"]  # every hyperparameter, and the ids 0, 1, ... in the same order
    assert a["state"].keys() == b["state"].keys() == set(range(sum(len(g["params"]) for g in b["param_groups"])))
    for i, state in b["state"].items():
        for key, tensor in state.items():
            assert a["state"][i][key].shape == tensor.shape and torch.allclose(a["state"][i][key], tensor, atol=1e-6)


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_on_one_process_without_fsdp(runs):
    """2 FSDP ranks -> 1 process with twice the accumulation (the flag not given: a machine flag, never the
    checkpoint's), as the uninterrupted single-process run computes it."""
    tmp_path, _ = runs
    train_gpt2.main(["--resume", str(tmp_path / "fsdp" / "model_00010.pt"), "--log_dir", str(tmp_path / "fsdp_to_1"),
                     "--device", "cpu", "--dtype", "float32", "-B", "2"])
    resumed = read_log(tmp_path / "fsdp_to_1" / "log.txt")
    assert min(resumed)[0] == 10 and (20, "val") in resumed
    assert_close(resumed, read_log(tmp_path / "single" / "log.txt"))


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_under_fsdp_and_an_fsdp_resume_is_bit_identical(runs):
    """DDP -> FSDP carries on as the uninterrupted runs; FSDP -> FSDP (with activation checkpointing turned on, a
    machine flag) continues bit for bit: the same losses, weights and optimizer state at the end."""
    tmp_path, _ = runs
    machine = ["--device", "cpu", "--dtype", "float32", "-B", "2", "--fsdp", "true"]
    torchrun_cpu(["--resume", str(tmp_path / "ddp" / "model_00010.pt"), *machine], tmp_path / "ddp_to_fsdp")
    assert_close(read_log(tmp_path / "ddp_to_fsdp" / "log.txt"), read_log(tmp_path / "ddp" / "log.txt"))
    torchrun_cpu(["--resume", str(tmp_path / "fsdp" / "model_00010.pt"), *machine, "--activation_checkpointing",
                  "true"], tmp_path / "fsdp_to_fsdp")
    resumed, straight = (read_log(tmp_path / run / "log.txt") for run in ("fsdp_to_fsdp", "fsdp"))
    assert resumed == {key: value for key, value in straight.items() if key[0] >= 10}
    a, b = (torch.load(tmp_path / run / "model_00020.pt", weights_only=True) for run in ("fsdp_to_fsdp", "fsdp"))
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in b["model"])
    assert all(torch.equal(a["optimizer"][0]["state"][i][k], t) for i, s in b["optimizer"][0]["state"].items()
               for k, t in s.items())


# -- refusals, and the memory check's advice ----------------------------------------------------------------------

def one_line_error(capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_fsdp_with_the_modern_recipe_or_on_one_process_is_refused_before_any_work(tmp_path, capsys):
    log_dir = tmp_path / "log"
    err = one_line_error(capsys, TINY + ["--data", str(tmp_path / "absent"), "--log_dir", str(log_dir), "--fsdp",
                                         "true", "--recipe", "modern"])
    assert ("Muon orthogonalises whole matrices, which FSDP shards: use --recipe gpt2 with --fsdp, or "
            "--activation_checkpointing true with DDP") in err
    assert "this is one process: run it under torchrun --nproc_per_node=N" in err and not log_dir.exists()


def cuda_world(ranks):
    return train_gpt2.DistInfo(rank=0, local_rank=0, world_size=ranks, device="cuda:0", device_type="cuda",
                               is_master=True)


def check(monkeypatch, gigabytes, ranks, shape=(12, 12, 768), **flags):
    """memory.check_memory for a GPT-2 of `shape` (124M) at -B 16, T=1024, bf16, on `ranks` GPUs of `gigabytes` GB
    each (simulated)."""
    monkeypatch.setattr(memory, "memory_of", lambda world: (gigabytes * 10**9, "GPU memory"))
    cfg = train_gpt2.TrainConfig(micro_batch_size=16, dtype="bfloat16", **flags)
    config = train_gpt2.GPTConfig(vocab_size=50304, **dict(zip(("n_layer", "n_head", "n_embd"), shape)))
    memory.check_memory(train_gpt2.GPT, config, cfg, cuda_world(ranks), {"learning_rate": cfg.max_lr})


def test_the_memory_check_accepts_under_fsdp_what_fits_only_sharded(monkeypatch):
    """GPT-2 124M keeps 2.0 GB of weights, gradients and AdamW state and, at -B 16, at least 1.5 GB of activations
    (each block's input and MLP, bf16): 3 GB refused, and accepted sharded over 2 GPUs (1.0 + 1.5 + the gathered
    root and one block)."""
    with pytest.raises(train_gpt2.UserError) as refused:
        check(monkeypatch, 3, 2)
    assert ("-B 16 with -T 1024: the run needs at least 3.5 GB (weights, gradients, optimizer state and "
            "activations), more than this machine's 3.0 GB of GPU memory: use --fsdp true on 2 GPUs, or "
            "--activation_checkpointing true, or a smaller -B or -T") in str(refused.value)
    check(monkeypatch, 3, 2, fsdp="true")
    check(monkeypatch, 3, 1, activation_checkpointing="true")


def test_the_memory_check_says_how_many_gpus_a_model_needs_sharded(monkeypatch):
    """GPT-2 1.5B: 25 GB of weights, gradients and AdamW state alone, and at least 12.6 GB of activations at -B 16
    (2.7 GB recomputed): on 24 GB cards, FSDP on 3 of them, or 2 with activation checkpointing."""
    with pytest.raises(train_gpt2.UserError) as refused:
        check(monkeypatch, 24, 1, shape=(48, 25, 1600))
    assert ("more than this machine's 24.0 GB of GPU memory: use --fsdp true on 3 GPUs (2 with "
            "--activation_checkpointing true), or a smaller --n_layer or --n_embd") in str(refused.value)
    with pytest.raises(train_gpt2.UserError) as refused:
        check(monkeypatch, 24, 2, shape=(48, 25, 1600), fsdp="true")
    assert ("activations per rank), more than this machine's 24.0 GB of GPU memory: use --fsdp true on 3 GPUs, or "
            "--activation_checkpointing true, or a smaller") in str(refused.value)
    check(monkeypatch, 24, 2, shape=(48, 25, 1600), fsdp="true", activation_checkpointing="true")
