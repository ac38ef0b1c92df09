"""--recipe modern: rotary, QK-norm, the optimizer split, the soft-capped loss kernel, exact resume, DDP, HellaSwag's
packed scoring, WSD extension, and the refusals."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, lrs_of, read_log, torchrun_cpu, train
from test_hellaswag import make_examples, reference_losses

import hellaswag
import cpu_loss
import train_gpt2
from train_gpt2 import GPTConfig, ModernGPT

MODERN = TINY + ["--recipe", "modern", "--muon_lr", "0.05", "--embed_lr", "0.1", "--head_lr", "0.02"]


def tiny_modern(seed=0, vocab_size=128, block_size=32):
    torch.manual_seed(seed)
    model = ModernGPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # zero-initialised projections and head would hide everything: randomise them
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                p.normal_(0.0, 0.2)
    return model.eval()


def train_modern(shards, log_dir, *extra):
    return train(shards, log_dir, *extra, base=MODERN)


def test_rotary_scores_depend_only_on_relative_offsets():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    model = tiny_modern()

    def scores(pos):  # the angles hidden_states would build for these positions
        hs = 16
        theta = 10000.0 ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)
        angles = pos.view(-1, 1, pos.size(-1), 1).float() * theta
        cos, sin = angles.cos(), angles.sin()
        return train_gpt2.rotary(q, cos, sin) @ train_gpt2.rotary(k, cos, sin).transpose(-1, -2)

    pos = torch.arange(8)
    assert torch.allclose(scores(pos), scores(pos + 37), atol=1e-4)
    assert not torch.allclose(scores(pos), scores(pos * 2), atol=1e-2)  # but they do depend on the offsets
    # and the model as a whole: shifting all positions leaves the hidden states equal
    idx = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        assert torch.allclose(model.hidden_states(idx), model.hidden_states(idx, pos + 100), atol=1e-4)


def test_qk_norm_gives_unit_rms():
    model = tiny_modern()
    seen = []
    real = train_gpt2.rotary
    try:  # rotary receives the normalised q and k; record them
        train_gpt2.rotary = lambda x, cos, sin: seen.append(x) or real(x, cos, sin)
        with torch.no_grad():
            model.hidden_states(10 * torch.randint(0, 12, (2, 16)))
    finally:
        train_gpt2.rotary = real
    assert len(seen) == 2 * 2  # q and k of 2 layers
    for x in seen:
        assert torch.allclose(x.pow(2).mean(-1).sqrt(), torch.ones(()), atol=1e-3)


def test_every_parameter_in_exactly_one_group_and_muon_holds_the_block_matrices():
    model = tiny_modern()
    muon, adamw = model.configure_optimizers(0.1, 0.02, "cpu", embed_lr=0.3, head_lr=0.004)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for o in (muon, adamw) for g in o.param_groups]
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(names.values())  # all of them, none twice
    assert set(groups[0]) == {n for n, p in model.named_parameters() if n.startswith("transformer.h.")}
    assert all(model.get_parameter(n).dim() == 2 for n in groups[0])
    assert groups[1:] == [["transformer.wte.weight"], ["lm_head.weight"]]
    assert [g["base_lr"] for o in (muon, adamw) for g in o.param_groups] == [0.02, 0.3, 0.004]


@pytest.mark.parametrize("autocast", [False, True])
def test_soft_capped_loss_kernel_equals_the_plain_loss(autocast):
    torch.manual_seed(0)
    N, C, V, cap = 300, 64, 1000, 15.0  # several chunks of 128 rows, the last one partial
    x = torch.randn(N, C, requires_grad=True)
    w = torch.randn(V, C).requires_grad_()  # large logits: the cap is active
    targets = torch.randint(0, V, (N,))
    head = train_gpt2.SoftCappedLinear(C, V, bias=False)
    head.weight = torch.nn.Parameter(w.detach().clone())
    assert head.cap == cap
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = cpu_loss.vocab_cross_entropy(x, head, targets)
    ours.backward()
    dx, dw = x.grad.clone(), head.weight.grad
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = F.cross_entropy(cap * torch.tanh(F.linear(x, w) / cap), targets)
    plain.backward()
    tol = 2e-2 if autocast else 1e-5
    assert abs(ours.item() - plain.item()) < tol * plain.item() / 10
    for ours_grad, plain_grad in ((dx, x.grad), (dw, w.grad)):
        assert (ours_grad - plain_grad).norm() < tol * plain_grad.norm()


def test_model_loss_equals_plain_cross_entropy_of_its_logits():
    model = tiny_modern()
    idx, targets = torch.randint(0, 128, (3, 32)), torch.randint(0, 128, (3, 32))
    with torch.no_grad():
        logits, _ = model(idx)
        _, loss = model(idx, targets)
    assert logits.abs().max() < 15.0  # soft-capped
    assert abs(loss.item() - F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()) < 1e-5


def test_resume_is_exact(shards, tmp_path):
    """Uninterrupted vs stopped at step 4 and resumed: equal final model and optimizer states."""
    train_modern(shards, tmp_path / "a", "--max_steps", "8", "--checkpoint_every", "8")
    train_modern(shards, tmp_path / "b", "--max_steps", "8", "--checkpoint_every", "4")
    (tmp_path / "b" / "model_00008.pt").unlink()
    train_modern(shards, tmp_path / "b", "--max_steps", "8", "--checkpoint_every", "4", "--resume")
    a, b = (torch.load(tmp_path / d / "model_00008.pt", weights_only=True) for d in ("a", "b"))
    assert a["args"]["recipe"] == "modern" and len(a["optimizer"]) == 2
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"], b["optimizer"]):
        assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
        for i in sa["state"]:
            assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for k in sa["state"][i])
    assert read_log(tmp_path / "a" / "log.txt") == read_log(tmp_path / "b" / "log.txt")
    model = train_gpt2.GPT.from_checkpoint(tmp_path / "a" / "model_00008.pt")
    assert isinstance(model, ModernGPT) and not hasattr(model.transformer, "wpe")


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_twice_the_accumulation(shards, tmp_path):
    args = MODERN + ["--data", str(shards), "--max_steps", "8", "--eval_every", "4"]
    train_gpt2.main(args + ["--log_dir", str(tmp_path / "single")])  # B 4 x T 32 x 2 accumulation steps
    torchrun_cpu(args, tmp_path / "ddp")
    single, ddp = read_log(tmp_path / "single" / "log.txt"), read_log(tmp_path / "ddp" / "log.txt")
    assert sorted(single) == sorted(ddp)
    for key in single:
        assert abs(float(single[key]) - float(ddp[key])) <= 1e-4, key


def test_hellaswag_packed_scoring_equals_one_example_at_a_time():
    model = tiny_modern(vocab_size=50304, block_size=128)
    examples = make_examples()
    sums, means = reference_losses(model, examples)
    rendered = [hellaswag.render_example(e) for e in examples]
    packed_sums, counts = hellaswag.score_batch(model, rendered, "cpu")
    assert torch.allclose(packed_sums, sums, rtol=1e-4, atol=1e-4)
    assert torch.allclose(packed_sums / counts, means, rtol=1e-4, atol=1e-4)


def test_generate_never_emits_a_padded_id_even_where_the_model_prefers_them():
    model = tiny_modern(vocab_size=50304)
    prompt = torch.tensor([[50256, 15496]])
    with torch.no_grad():  # the head is zero at init (all logits 0): give the 47 padded ids positive logits
        model.lm_head.weight[50257:] = model.hidden_states(prompt)[0, -1]
    logits, _ = model(prompt)
    assert logits[0, -1].argmax() >= 50257  # so sampling from the raw logits would pick one
    out = model.generate(prompt, 40, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 42) and out.max() < 50257  # past block_size 32 too


def test_recipe_changed_on_resume_is_refused(shards, tmp_path, capsys):
    train_modern(shards, tmp_path, "--max_steps", "4", "--checkpoint_every", "4")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_gpt2.main(TINY + ["--data", str(shards), "--log_dir", str(tmp_path), "--max_steps", "4", "--resume",
                                "--recipe", "gpt2"])
    err = capsys.readouterr().err
    assert "--recipe modern -> gpt2" in err and "Traceback" not in err


def test_extending_a_wsd_run_from_before_the_decay_and_refusing_past_the_horizon(shards, tmp_path, capsys):
    args = ["--eval_every", "0", "--warmup_steps", "2", "--cooldown_frac", "0.5"]
    train_modern(shards, tmp_path, *args, "--max_steps", "8", "--checkpoint_every", "2", "--keep_checkpoints", "0")
    first = lrs_of(capsys.readouterr().out)
    assert first[3] == first[0] * 2 == 0.05 and first[4] == 0.05 and first[7] == 0.05 / 4  # decay over 4..7
    # past the horizon the LR would be 0: refused, saying what to do
    with pytest.raises(SystemExit):
        train_modern(shards, tmp_path, *args, "--max_steps", "12", "--resume")
    err = capsys.readouterr().err
    assert "continue from a checkpoint before the decay (step <= 4) in an empty --log_dir" in err
    assert "--lr_horizon 12 --max_steps 12" in err
    # a new horizon from a checkpoint inside the decay would change steps already taken: refused
    # (each branch from an earlier checkpoint continues in a directory of its own: the run's model_00008.pt stays)
    with pytest.raises(SystemExit):
        train_modern(shards, tmp_path / "from_6", *args, "--max_steps", "16", "--lr_horizon", "16", "--resume",
            str(tmp_path / "model_00006.pt"))
    assert "would change the learning rate" in capsys.readouterr().err
    # from step 4's checkpoint (before the decay) with --lr_horizon 16: constant LR on, no jump, decay at 8..15
    train_modern(shards, tmp_path / "from_4", *args, "--max_steps", "16", "--lr_horizon", "16", "--resume",
        str(tmp_path / "model_00004.pt"))
    later = lrs_of(capsys.readouterr().out)
    assert sorted(later) == list(range(4, 16))
    assert [later[s] for s in range(4, 8)] == [0.05] * 4 and later[15] == pytest.approx(0.05 / 8)
    assert all(later[s] >= later[s + 1] for s in range(4, 15))

