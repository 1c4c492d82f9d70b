"""The output projection and the next-token cross-entropy fused, a chunk of rows at a time.

The plain path builds logits for the whole batch (B x T x V), casts them to fp32, takes a log-
softmax and, in backward, the same size again: at vocab 6400 and 16 x 256 tokens that is 105 MB
per copy. Here each chunk of rows computes its logits, its loss and, right away, its gradients
with respect to the hidden states and the head's weight (softmax - one-hot, divided by the number of
targets); only those gradients (N x C and V x C) are kept for backward, which just scales them.
Under autocast the two matmuls run in the autocast dtype and the softmax in fp32, as in the
plain path. Liger-Kernel's fused linear cross-entropy works the same way.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MB in fp32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            valid = targets != IGNORE_INDEX  # (N,)
            num_targets = valid.sum().clamp(min=1)
            loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = (h[rows] @ w.T).float()  # (n, V)
                log_norm = torch.logsumexp(logits, dim=-1)  # (n,)
                chunk_targets = targets[rows].clamp(min=0)[:, None]  # (n, 1); ignored rows masked below
                chunk_valid = valid[rows]
                picked = logits.gather(1, chunk_targets).squeeze(1)  # (n,)
                loss += ((log_norm - picked) * chunk_valid).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d(mean loss)/d(logits) = (softmax - one-hot) / num_targets; ignored rows get 0
                grad_logits = (logits - log_norm[:, None]).exp_()
                grad_logits.scatter_add_(1, chunk_targets, torch.full_like(picked, -1.0)[:, None])
                grad_logits *= (chunk_valid / num_targets)[:, None]
                grad_logits = grad_logits.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits @ w  # (n, C)
                if grad_weight is not None:
                    grad_weight += (grad_logits.T @ h[rows]).float()  # (V, C), accumulated in fp32
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss / num_targets

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss if grad_hidden is not None else None
        grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `targets` (N,) under logits hidden (N, C) @ weight (V, C).T, targets of
    -100 ignored: equal to F.cross_entropy(linear(hidden, weight).float(), targets), without the
    (N, V) logits ever existing at once."""
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
