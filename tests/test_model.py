"""The GPT-2 model: equal to Hugging Face's, Hugging Face export, init, optimizer groups, sampling."""

import pytest
import torch
import torch.nn.functional as F

import cpu_loss
import train_gpt2
from train_gpt2 import GPT, GPTConfig

transformers = pytest.importorskip("transformers")


def hf_model(tmp_path, **config):
    """A random transformers GPT-2 saved with save_pretrained: stands in for the hub's weights."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    with torch.no_grad():  # random, non-zero biases and LayerNorm gains so every weight matters
        for name, p in hf.named_parameters():
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path)
    return hf.eval()


def max_relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("config", [
    dict(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=64),
    dict(n_layer=3, n_head=4, n_embd=48, vocab_size=1000, n_positions=32),
])
def test_logits_and_loss_equal_transformers(tmp_path, config):
    hf = hf_model(tmp_path, **config)
    ours = GPT.from_pretrained(tmp_path).eval()
    assert (ours.config.n_layer, ours.config.vocab_size, ours.config.block_size) == (
        config["n_layer"], config["vocab_size"], config["n_positions"])
    idx = torch.randint(0, config["vocab_size"], (3, config["n_positions"]))
    targets = torch.randint(0, config["vocab_size"], idx.shape)
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
        _, loss = ours(idx, targets)
    assert max_relative_error(logits, expected) <= 1e-5
    expected_loss = F.cross_entropy(expected.view(-1, expected.size(-1)), targets.view(-1))
    assert abs(loss.item() - expected_loss.item()) <= 1e-5 * expected_loss.item()


def test_save_pretrained_round_trip_with_padded_vocab(tmp_path):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == 50304
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        logits, _ = ours(idx)
        assert max_relative_error(hf(idx).logits, logits) <= 1e-5
        again, _ = GPT.from_pretrained(tmp_path).eval()(idx)  # and back into our class
    assert torch.equal(again, logits)


def test_forward_loss_and_gradients_equal_plain_cross_entropy():
    """The chunked vocabulary cross-entropy gives the loss and gradients of the plain computation."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=500, n_layer=2, n_head=2, n_embd=32))
    idx, targets = torch.randint(0, 500, (5, 64)), torch.randint(0, 500, (5, 64))
    _, loss = model(idx, targets)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model.lm_head(model.hidden_states(idx))
    plain = F.cross_entropy(logits.view(-1, 500), targets.view(-1))
    plain.backward()
    assert abs(loss.item() - plain.item()) < 1e-6
    for name, p in model.named_parameters():
        assert torch.allclose(ours[name], p.grad, rtol=1e-4, atol=1e-7), name


def test_parameter_count_of_gpt2_124m():
    model = GPT(GPTConfig())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_cpu_loss_in_bf16_equals_the_plain_bf16_loss():
    """Under bf16 autocast (the CPU default where bf16 is native) the chunked loss keeps bf16 probabilities: its
    loss and gradients must still match F.cross_entropy on the same bf16 logits, upcast to float32."""
    torch.manual_seed(0)
    N, C, V = 300, 64, 1000  # several chunks of 128 rows, the last one partial
    x = torch.randn(N, C, requires_grad=True)
    w = (0.5 * torch.randn(V, C)).requires_grad_()
    targets = torch.randint(0, V, (N,))
    head = torch.nn.Linear(C, V, bias=False)
    head.weight = torch.nn.Parameter(w.detach().clone())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = cpu_loss.vocab_cross_entropy(x, head, targets)
    ours.backward()
    dx, dw = x.grad.clone(), head.weight.grad
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(x, w)  # bf16
    plain = F.cross_entropy(logits.float(), targets)
    plain.backward()
    assert ours.dtype == torch.float32 and abs(ours.item() - plain.item()) < 2e-3 * plain.item()
    for ours_grad, plain_grad in ((dx, x.grad), (dw, w.grad)):
        assert ours_grad.dtype == torch.float32
        assert (ours_grad - plain_grad).norm() < 2e-2 * plain_grad.norm()


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_off_the_cpu_forward_is_the_plain_loss(monkeypatch, recipe):
    """Off the CPU the chunks would be thousands of small kernel launches: forward computes F.cross_entropy of the
    logits it returns (here on the meta device: shapes, no memory)."""
    def refuse(*args):
        raise AssertionError("the chunked CPU loss ran on another device")

    monkeypatch.setattr(cpu_loss.VocabCrossEntropy, "apply", refuse)
    with torch.device("meta"):
        model = train_gpt2.RECIPES[recipe](GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=8))
        idx = torch.zeros((2, 16), dtype=torch.long)
        logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 100) and loss.shape == () and loss.device.type == "meta"


def test_weights_are_tied_to_one_storage():
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32))
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert sum(p.numel() for p in model.parameters()) == untied - 100 * 32  # the shared matrix counts once


def test_init_statistics():
    torch.manual_seed(0)
    n_layer = 8
    model = GPT(GPTConfig(block_size=64, vocab_size=5000, n_layer=n_layer, n_head=4, n_embd=256))
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):  # residual projections: scaled by (2 * n_layer) ** -0.5
            assert abs(p.std().item() - 0.02 * (2 * n_layer) ** -0.5) < 0.0005, name
        elif name.endswith("c_attn.weight") or name.endswith("c_fc.weight") or name.endswith("wte.weight"):
            assert abs(p.std().item() - 0.02) < 0.001, name
        elif name.endswith("bias") and "ln_" not in name:
            assert torch.count_nonzero(p) == 0, name


def test_configure_optimizers_decays_exactly_the_matrices():
    n_layer = 2
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=n_layer, n_head=2, n_embd=32))
    [optimizer] = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, device_type="cpu")  # a list:
    # the modern recipe trains with two optimizers
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    # the embeddings (wte is lm_head: tied, listed once) and four matrices per block; every bias and LayerNorm
    # gain goes undecayed
    matrices = {"transformer.wte.weight", "transformer.wpe.weight"} | {
        f"transformer.h.{i}.{m}.weight" for i in range(n_layer) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                          "mlp.c_proj")}
    assert len(matrices) == 2 + 4 * n_layer
    assert {by_id[id(p)] for p in decay["params"]} == matrices
    assert {by_id[id(p)] for p in no_decay["params"]} == set(by_id.values()) - matrices
    assert all(name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight"))
               for name in set(by_id.values()) - matrices)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8


def test_generate_is_reproducible_and_never_emits_padded_ids():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # make the padded ids (>= 50257) by far the most likely: they must still never appear
        model.lm_head.weight[50257:] = 10 * model.lm_head.weight[:1].sign()
        model.transformer.ln_f.weight.fill_(10.0)
    idx = torch.tensor([[50256, 15496]])

    def sample(seed):
        return model.generate(idx, 40, top_k=None, generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(7), sample(7), sample(8)
    assert a.shape == (1, 42) and torch.equal(a[:, :2], idx)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.max().item() < 50257 and c.max().item() < 50257  # beyond block_size too (crops the context)


def test_too_long_input_is_a_clear_error():
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="length 17.*block_size 16"):
        model(torch.zeros((1, 17), dtype=torch.long))
