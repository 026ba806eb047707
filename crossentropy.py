"""
The training loss without the (B, T, vocab) logits: the head's matmul and the cross-entropy taken a chunk of tokens at
a time, each chunk's gradient computed at once (as Liger-Kernel's fused linear cross-entropy does), so only one
chunk's float32 logits ever exist. At GPT-2's vocabulary and 16 x 1024 tokens that is 3.3 GB of logits (and as much
again for their gradient) not held; the model's forward takes it when only the loss is asked for.

    python -c "import torch, crossentropy as ce; h, w = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4); \
print(ce.chunked_cross_entropy(h, w, torch.arange(8)))"
"""

import torch

# float32 logits per chunk on a CPU: 8 MiB (41 tokens at GPT-2's vocabulary; a char model: one chunk), at the same
# speed as larger chunks and a lower peak for the process (BENCHMARKS.md, LoRA); 8x that on a GPU, whose kernels want
# more work each
CHUNK_BYTES = 2**23


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, softcap, label_smoothing):
        # h (N, C): the last hidden states; w (V, C): the head's weights; targets (N,), -1 = ignored
        V, budget = w.size(0), CHUNK_BYTES * (1 if h.device.type == "cpu" else 8)
        chunk = max(1, budget // (4 * V))
        count = (targets != -1).sum().clamp(min=1)  # the mean over the targets that count (0 if none do)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        frozen = not ctx.needs_input_grad[1]  # a frozen head (LoRA): no (V, C) gradient to compute or keep
        grad_h, grad_w = torch.empty_like(h), None if frozen else torch.zeros_like(w, dtype=torch.float32)
        for s in range(0, h.size(0), chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            z = (hc @ w.t()).float()  # (n, V) this chunk's logits
            if softcap:
                z = softcap * torch.tanh(z / softcap)
            keep = (tc != -1)[:, None]  # (n, 1)
            lse = z.logsumexp(dim=-1, keepdim=True)  # (n, 1)
            picked = z.gather(1, tc.clamp(min=0)[:, None])  # (n, 1)
            nll = (1 - label_smoothing) * (lse - picked) + label_smoothing * (lse - z.mean(dim=-1, keepdim=True))
            loss += (nll * keep).sum()
            dz = z.sub(lse).exp_().sub_(label_smoothing / V)  # softmax minus the target distribution (smoothed)
            dz.scatter_add_(1, tc.clamp(min=0)[:, None], torch.full_like(picked, label_smoothing - 1))
            dz.mul_(keep / count)
            if softcap:
                dz.mul_(1 - (z / softcap).square())  # through the tanh: z = cap * tanh(raw / cap)
            grad_h[s:s + chunk] = (dz.to(w.dtype) @ w).to(h.dtype)
            if not frozen:
                grad_w += (dz.t().to(hc.dtype) @ hc).float()
        ctx.save_for_backward(grad_h, None if frozen else grad_w.to(w.dtype))
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, None if grad_w is None else grad_w * grad_loss, None, None, None


def chunked_cross_entropy(h, w, targets, softcap=0.0, label_smoothing=0.0):
    """Mean cross-entropy of the logits h @ w.T (softcapped if softcap) against targets, as F.cross_entropy with
    ignore_index=-1 gives it. h (..., C), w (V, C), targets (...)."""
    return ChunkedCrossEntropy.apply(h.reshape(-1, h.size(-1)), w, targets.reshape(-1), softcap, label_smoothing)
