"""
A faster loss for CPUs: train_gpt2.GPT.forward's cross-entropy of the vocabulary projection, computed chunk by chunk
without ever storing the (B*T, vocab) logits. Equal to F.cross_entropy(lm_head(x), targets) (tests/test_model.py);
the model calls it only on a CPU in eager mode (a GPU, or torch.compile, which fuses the plain loss, runs it faster).
On a CPU it makes a training step 1.0-1.5x faster in half the memory or less (bench.py; results/README.md).

Importing this file does nothing but define the function.
"""

import torch


class VocabCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T against targets, for eager mode on a CPU.

    The vocabulary projection and its softmax are most of a small GPT's work. The usual chain (bf16 logits,
    upcast to float32, log_softmax, nll, and the same again backwards) writes and reads several (N, vocab)
    float32 tensors: 412 MB each at N = B*T = 2048, and on a CPU memory traffic and page faults, not FLOPs,
    then set the pace. Here the logits of `chunk_rows` rows at a time become probabilities in place, in the
    compute dtype (bf16 under autocast: as precise as the bf16 logits they come from; the softmax itself
    sums in float32). Since the loss is the last thing computed, the gradient is formed at once:
    d loss / d logits = (softmax - onehot(target)) / N, and each chunk adds its part of d weight at once, so only
    one chunk of (rows, vocab) exists at a time. Backward only scales what forward kept.
    With a soft-cap (the modern recipe) the logits are cap * tanh(z / cap) of z = x @ weight.T. Computed as
    2 * cap * sigmoid(2 * z / cap) - cap, the same function (tanh(u) = 2 sigmoid(2u) - 1) at half the cost on a CPU
    (a sigmoid is one exp, a tanh two); the softmax ignores the constant - cap. The chain rule adds one factor,
    1 - tanh**2 = 4 sigmoid (1 - sigmoid): d loss / d z = (softmax - onehot(target)) * 4 sigmoid (1 - sigmoid) / N.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, chunk_rows, need_grad, softcap=None):
        N, V = x.size(0), weight.size(0)
        xc, wc = x.to(dtype), weight.to(dtype)
        wz = wc if softcap is None else wc * (2 / softcap)  # rows @ wz.T: z, or 2 z / cap for the sigmoid
        chunk = torch.empty(min(N, chunk_rows), V, dtype=dtype, device=x.device)  # reused for every chunk
        dx = torch.empty_like(xc) if need_grad else None
        dw = torch.zeros(V, x.size(1), dtype=torch.float32, device=x.device) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, N, chunk_rows):
            rows, tgt = xc[start:start + chunk_rows], targets[start:start + chunk_rows, None]
            p = chunk[:len(rows)]
            torch.mm(rows, wz.t(), out=p)  # logits (rows, V)
            if softcap is None:
                p.copy_(torch.softmax(p, dim=1))
                s = p
            else:  # p keeps sigmoid(2 z / cap) for the gradient, s the softmax of the capped logits
                s = torch.softmax(p.sigmoid_() * (2 * softcap), dim=1)
            p_target = s.gather(1, tgt).float()
            loss -= p_target.clamp_min(1e-38).log().sum()  # clamp: a p that underflowed to 0 costs 87, not inf
            if need_grad:
                s.scatter_(1, tgt, (p_target - 1).to(dtype))  # softmax - onehot: the gradient, times N
                if softcap is not None:  # times sigmoid (1 - sigmoid), into p; the 4 comes in backward
                    torch.addcmul(p, p, p, value=-1, out=p).mul_(s)
                torch.mm(p, wc, out=dx[start:start + len(rows)])
                if dtype == torch.float32:
                    dw.addmm_(p.t(), rows)  # in place, no temporary
                else:  # a bf16 product, summed in float32 over the chunks
                    dw.add_(p.t() @ rows)
        if need_grad:
            ctx.save_for_backward(dx, dw)
            ctx.x_dtype, ctx.chain = x.dtype, 1.0 if softcap is None else 4.0
        return loss / N

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        # the 1/N of the mean, whatever scaled the loss (accumulation), and the soft-cap's 4
        scale = grad_loss * ctx.chain / dx.size(0)
        return (dx * scale).to(ctx.x_dtype), dw * scale, None, None, None, None, None


def vocab_cross_entropy(x, head, targets, chunk_rows=128):
    """The loss of the head (GPT-2's nn.Linear, or the modern recipe's SoftCappedLinear with its cap) on (N, C)
    hidden states x, in eager mode on a CPU; it follows autocast's dtype like an nn.Linear would."""
    softcap = getattr(head, "cap", None)  # SoftCappedLinear's
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else head.weight.dtype
    with torch.autocast("cpu", enabled=False):  # dtypes are chosen explicitly inside
        return VocabCrossEntropy.apply(x, head.weight, targets, dtype, chunk_rows, torch.is_grad_enabled(), softcap)
