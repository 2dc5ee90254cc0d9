"""The causal LM loss without the logits: cross-entropy computed from the last hidden states and the
output layer's weight, a chunk of tokens at a time (fused linear cross-entropy).

The plain loss asks the model for its logits, (tokens x vocabulary): for GPT-2 at micro-batch 4 and
512 tokens 412 MB in float32, and cross-entropy keeps that much several times over for the backward
pass. Here the output layer returns its input instead, and the loss multiplies each chunk of scored
tokens by the weight, takes its log-sum-exp and, in the same pass, the gradients of the summed NLL
with respect to those tokens' hidden states and to the weight (softmax minus one-hot, times the
chunk's input or the weight). The backward pass only scales them by the incoming gradient, so no
chunk is computed twice and at most one chunk's logits exist at a time. The same idea is published
as torchtune's chunked output loss, Liger Kernel's fused linear cross-entropy and Apple's Cut
Cross-Entropy; this is a plain PyTorch version that runs on any device.

It is the same math as metrics.causal_loss, from the model's logits: equal to float32 rounding, with
the same gradients. Under autocast the chunk's matrix product runs in the autocast dtype and the
softmax in float32, as the plain path does (accelerate returns the logits in float32).

choose() gives a run its loss: a function of (model, batch) that runs the model itself, as
metrics.causal_loss does, so that no caller holds hidden states under the name of logits. It takes the
fused loss only where it is exact: the model's output layer must be a plain torch.nn.Linear (not
adapted by a method, quantized, wrapped or hooked, which changes its class or adds hooks), and the
model must return that layer's output as its logits unchanged (no soft-capping or scaling after it),
checked by running the model once both ways. Anything else keeps the plain loss, and says why.
"""
import torch
import torch.nn.functional as F

from tunebench.metrics import CHUNK_ELEMENTS, IGNORE_INDEX, causal_loss, model_inputs


def _pass_through(hidden):
    return hidden


def _compute_dtype(device_type: str, dtype):
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed NLL of targets under logits = hidden @ weight.T + bias, for hidden (N, d) and targets (N,)
    (-100: not scored). Gradients are computed chunk by chunk in the forward pass and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        dtype = _compute_dtype(hidden.device.type, weight.dtype)
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            total = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if want_hidden else None
            grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_weight else None
            grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if want_bias else None
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start : start + chunk].to(dtype), targets[start : start + chunk]
                scored = (t != IGNORE_INDEX).float()
                t = t.clamp(min=0)
                logits = F.linear(h, w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * scored).sum()
                if not (want_hidden or want_weight or want_bias):
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                grad = grad.mul_(scored[:, None]).to(dtype)
                if want_hidden:
                    grad_hidden[start : start + chunk] = grad @ w
                if want_weight:
                    if dtype == torch.float32:
                        grad_weight.addmm_(grad.t(), h)
                    else:
                        grad_weight += (grad.t() @ h).float()
                if want_bias:
                    grad_bias += grad.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.param_dtypes
        scale = lambda g, dtype: None if g is None else g.mul_(grad_total.to(g.dtype)).to(dtype or g.dtype)  # noqa: E731
        return scale(grad_hidden, None), scale(grad_weight, weight_dtype), scale(grad_bias, bias_dtype), None, None


def linear_nll(hidden, labels, weight, bias=None, only_scored=True) -> tuple:
    """(summed next-token NLL, scored tokens), as metrics.causal_nll(F.linear(hidden, weight, bias),
    labels) gives it, without the logits. hidden may carry extra leading positions (a soft prompt's).
    only_scored: multiply only the positions that are scored (not a prompt's or padding), which the
    memory plan's fake tensors cannot select (their number depends on the data)."""
    hidden = hidden[:, -labels.shape[1] :]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    scored = targets != IGNORE_INDEX
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if only_scored:
        hidden, targets = hidden[scored], targets[scored]
    if not torch.is_grad_enabled():
        # Validation: the loss only. A Function's needs_input_grad ignores torch.no_grad(), so without
        # this the forward pass would compute (and hold) every gradient for nothing.
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
    nll = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), chunk)
    return nll, scored.sum()


def why_not(model) -> str | None:
    """Why the fused loss cannot stand in for this model's output layer, from its structure; None if it can."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    if head is None:
        return "the model has no output layer to fuse"
    kind = f"{type(head).__module__}.{type(head).__name__}"
    if type(head) is not torch.nn.Linear:
        return f"the output layer is a {kind} (adapted, quantized or not a plain linear map), not a torch.nn.Linear"
    if hasattr(head.weight, "ds_id"):
        return "DeepSpeed ZeRO-3 partitions the output layer's weight across processes"
    if head._forward_hooks or head._forward_pre_hooks or getattr(head, "_hf_hook", None):
        return "the output layer has forward hooks (a method, an offload or DeepSpeed ZeRO-3 acts on it)"
    if type(head).forward is not torch.nn.Linear.forward or "forward" in vars(head):
        return "the output layer's forward is replaced"
    return None


def _returns_its_logits(model, head) -> bool:
    """Whether the model's logits are its output layer applied to what that layer receives."""
    ids = (torch.arange(8, device=head.weight.device) % head.out_features)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            head.forward = _pass_through
            hidden = model(input_ids=ids).logits
    finally:
        vars(head).pop("forward", None)
        model.train(was_training)
    return hidden.shape[-1] == head.in_features and torch.allclose(
        logits.float(), F.linear(hidden, head.weight, head.bias).float(), rtol=1e-4, atol=1e-5)


def install(model, only_scored=True):
    """From now on the model's output layer returns its input, so that what the model returns as
    `.logits` are its last hidden states; returns the loss for it: fused_causal_loss(model, batch) ->
    (summed next-token NLL, scored tokens), as metrics.causal_loss gives it. `model` may be this model
    wrapped (for DDP, by accelerate)."""
    head = model.get_output_embeddings()
    head.forward = _pass_through  # an instance attribute: save_pretrained and the weights are untouched

    def fused_causal_loss(model, batch):
        last_hidden = model(**model_inputs(batch)).logits  # the output layer passed its input through
        return linear_nll(last_hidden, batch["labels"], head.weight, head.bias, only_scored)

    return fused_causal_loss


def choose(model, wanted: bool, not_here: str | None = None) -> tuple:
    """(the run's loss(model, batch) -> (summed next-token NLL, scored tokens), what the run prints
    about it): the fused loss where it is wanted and exact, else metrics.causal_loss. not_here: why the
    hardware setup rules it out before the model is wrapped for it, or None."""
    reason = "train.fused_loss is false" if not wanted else not_here or why_not(model)
    if reason is None and not _returns_its_logits(model, model.get_output_embeddings()):
        reason = "the model changes the output layer's result before returning it (e.g. soft-capping or scaling)"
    if reason is not None:
        return causal_loss, f"plain cross-entropy on the logits ({reason})"
    vocab = model.get_output_embeddings().out_features
    return install(model), (f"fused linear cross-entropy (no logits tensor; chunks of "
                            f"{max(1, CHUNK_ELEMENTS // vocab)} tokens x {vocab:,} vocabulary)")
