"""Cross-entropy through the output head, chunk by chunk, so the full logits never exist.

At 128K tokens and a 32K vocabulary the logits are 8 GiB in bf16, 16 GiB once upcast for the loss, and as much
again for their gradient.  `chunked_cross_entropy` computes head and loss over `chunk` tokens at a time in a
custom autograd function: forward keeps only the per-token log-sum-exp, backward recomputes each chunk's logits
and turns them straight into that chunk's input gradient and its share of the head weight's gradient.  At most
one chunk's logits and their gradient exist at a time, at the price of computing the head's matmul twice.
Softmax statistics and the loss are float32 whatever the dtype of the hidden states.

Where torch ships its own chunked linear cross-entropy (`F.linear_cross_entropy` with `LinearCrossEntropyOptions`,
torch >= 2.13) and it was measured faster, `auto` calls it: on the CPU it is 1.9x faster than this file's
function at 0.12x its peak memory, exact to fp32 rounding (bench/bench_loss.py).  On CUDA this file's function
stays until the GPU rows of bench_loss say otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        """hidden (N, d), weight (V, d), targets (N,) -> the summed loss over targets != IGNORE_INDEX (fp32)."""
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for the oracle tests
        total = torch.zeros((), dtype=acc, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows].to(dtype) @ w.t()).to(acc)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            t = targets[rows]
            keep = t != IGNORE_INDEX
            picked = logits.gather(1, t.clamp_min(0)[:, None])[:, 0]
            total += ((lse[rows] - picked) * keep).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows].to(ctx.dtype)
            # d loss / d logits = softmax - onehot, for kept rows; computed in fp32, used in the dots' dtype
            probs = torch.exp((h @ w.t()).to(lse.dtype) - lse[rows, None])
            t = targets[rows]
            keep = (t != IGNORE_INDEX)
            probs[torch.arange(len(t), device=t.device), t.clamp_min(0)] -= 1.0
            d_logits = (probs * (keep[:, None] * grad_total)).to(ctx.dtype)
            grad_hidden[rows] = (d_logits @ w).to(hidden.dtype)
            grad_weight += (d_logits.t() @ h).to(lse.dtype)
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def torch_chunked_fits(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `auto` hands the loss to torch's chunked linear cross-entropy: torch has it, the tensors are CPU
    tensors of one float32/float64 dtype, and no autocast is on (whose casts this file's function makes itself)."""
    return (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
            and hidden.device.type == "cpu" and hidden.dtype == weight.dtype
            and hidden.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu"))


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int, backend: str = "auto") -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ weight.T` against `targets`, `chunk` tokens at a time.

    hidden (..., d), weight (V, d), targets (...) with IGNORE_INDEX for positions not scored.  The same value and
    gradients as `F.cross_entropy(F.linear(hidden, weight).float(), targets)`; the result is float32 (float64 for
    float64 inputs).  backend: "hylo" (this file's autograd function), "torch" (torch's chunked
    `F.linear_cross_entropy`, `chunk` rows at a time), or "auto" (torch's where `torch_chunked_fits`)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if backend not in ("auto", "hylo", "torch"):
        raise ValueError(f"backend='{backend}' is not one of ['auto', 'hylo', 'torch'] for chunked_cross_entropy")
    flat_targets = targets.reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    count = (flat_targets != IGNORE_INDEX).sum().clamp_min(1)
    if backend == "torch" or (backend == "auto" and torch_chunked_fits(flat_hidden, weight)):
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk)
        total = F.linear_cross_entropy(flat_hidden, weight, flat_targets, reduction="sum", ignore_index=IGNORE_INDEX,
                                       options=options)
        return total / count
    return _ChunkedCrossEntropy.apply(flat_hidden, weight, flat_targets, chunk) / count


def full_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference: all logits at once, upcast to float32 (float64 stays float64)."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token negative log-likelihood (float32, shaped like `targets`), `chunk` tokens of logits at a time
    (0: all at once).  For evaluation: under autograd every chunk's logits would be kept for backward."""
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    step = chunk if chunk > 0 else max(1, flat_h.shape[0])
    parts = [F.cross_entropy(F.linear(flat_h[i:i + step], weight).float(), flat_t[i:i + step], reduction="none",
                             ignore_index=IGNORE_INDEX) for i in range(0, flat_h.shape[0], step)]
    return torch.cat(parts).view(targets.shape)


# ------------------------------------------------------------------------------------------ distillation (KL)
class _ChunkedDistillation(torch.autograd.Function):
    """KL(teacher || student) at a temperature and the student's cross-entropy, `chunk` tokens at a time: both
    models' logits exist for one chunk only, in forward and in backward (which recomputes them)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, temperature: float, chunk: int):
        """-> (KL summed over scored tokens, cross-entropy summed over them), float32 (float64 for float64)."""
        device = hidden.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else hidden.dtype
        acc = torch.promote_types(dtype, torch.float32)
        w, tw = weight.to(dtype), teacher_weight.to(dtype)
        n = hidden.shape[0]
        lse = torch.empty(3, n, dtype=acc, device=hidden.device)  # student at T, teacher at T, student at 1
        kl = torch.zeros((), dtype=acc, device=hidden.device)
        ce = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows].to(dtype) @ w.t()).to(acc)
            teacher = (teacher_hidden[rows].to(dtype) @ tw.t()).to(acc)
            student_t = torch.log_softmax(logits / temperature, dim=-1)
            teacher_t = torch.log_softmax(teacher / temperature, dim=-1)
            t = targets[rows]
            keep = t != IGNORE_INDEX
            kl += ((teacher_t.exp() * (teacher_t - student_t)).sum(-1) * keep).sum()
            lse[0, rows] = (logits / temperature - student_t)[:, 0]
            lse[1, rows] = (teacher / temperature - teacher_t)[:, 0]
            lse[2, rows] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.clamp_min(0)[:, None])[:, 0]
            ce += ((lse[2, rows] - picked) * keep).sum()
        ctx.save_for_backward(hidden, weight, teacher_hidden, teacher_weight, targets, lse)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return kl, ce

    @staticmethod
    def backward(ctx, grad_kl, grad_ce):
        hidden, weight, teacher_hidden, teacher_weight, targets, lse = ctx.saved_tensors
        temp = ctx.temperature
        w, tw = weight.to(ctx.dtype), teacher_weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows].to(ctx.dtype)
            logits = (h @ w.t()).to(lse.dtype)
            teacher = (teacher_hidden[rows].to(ctx.dtype) @ tw.t()).to(lse.dtype)
            t = targets[rows]
            keep = (t != IGNORE_INDEX)[:, None]
            # d KL / d logits = (p_student^T - p_teacher^T) / T;  d CE / d logits = softmax - onehot
            d_logits = (torch.exp(logits / temp - lse[0, rows, None]) - torch.exp(teacher / temp - lse[1, rows, None]))
            d_logits *= grad_kl / temp
            probs = torch.exp(logits - lse[2, rows, None])
            probs[torch.arange(len(t), device=t.device), t.clamp_min(0)] -= 1.0
            d_logits += probs * grad_ce
            d_logits = (d_logits * keep).to(ctx.dtype)
            grad_hidden[rows] = (d_logits @ w).to(hidden.dtype)
            grad_weight += (d_logits.t() @ h).to(lse.dtype)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def distillation_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                      chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL, cross-entropy): the student's next-token distribution `softmax(hidden @ weight.T / T)` against the
    teacher's `softmax(teacher_hidden @ teacher_weight.T / T)` as KL(teacher || student), and the student's own
    cross-entropy against `targets` (at temperature 1), each a mean over the scored tokens (targets !=
    IGNORE_INDEX), `chunk` tokens of both models' logits at a time.

    hidden, teacher_hidden (..., d) and (..., d_teacher); weight (V, d), teacher_weight (V, d_teacher): the
    vocabularies must agree, the widths need not.  Gradients reach `hidden` and `weight` only (the teacher is
    frozen).  The same values and gradients as `full_distillation_loss`; float32 (float64 for float64 inputs)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"the student's vocabulary ({weight.shape[0]}) differs from the teacher's "
                         f"({teacher_weight.shape[0]})")
    flat_targets = targets.reshape(-1)
    count = (flat_targets != IGNORE_INDEX).sum().clamp_min(1)
    kl, ce = _ChunkedDistillation.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(),
                                        teacher_weight.detach(), flat_targets, float(temperature), chunk)
    return kl / count, ce / count


def full_distillation_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                           teacher_weight: torch.Tensor, targets: torch.Tensor,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of `distillation_loss`: both models' full logits at once (upcast to float32)."""
    logits = F.linear(hidden, weight).flatten(0, -2)
    teacher = F.linear(teacher_hidden, teacher_weight).flatten(0, -2).detach()
    acc = torch.promote_types(logits.dtype, torch.float32)
    logits, teacher = logits.to(acc), teacher.to(acc)
    flat_targets = targets.reshape(-1)
    keep = flat_targets != IGNORE_INDEX
    count = keep.sum().clamp_min(1)
    kl = F.kl_div(torch.log_softmax(logits / temperature, -1), torch.log_softmax(teacher / temperature, -1),
                  reduction="none", log_target=True).sum(-1)
    ce = F.cross_entropy(logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return (kl * keep).sum() / count, ce / count
