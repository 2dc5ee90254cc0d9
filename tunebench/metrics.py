"""Quality metrics. Losses are sums over scored tokens, so every mean is over tokens, never batches."""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(summed next-token NLL, number of scored tokens). Label -100 is never scored. Logits may carry
    extra leading positions (a soft prompt's virtual tokens): only the last len(labels) count."""
    logits = logits[:, -labels.shape[1] :]
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (targets != IGNORE_INDEX).sum()


def scored_targets(labels: torch.Tensor) -> torch.Tensor:
    """How many targets a batch scores: one per row for class labels (batch,); for token labels
    (batch, length) every label after the first that is not -100, as causal_nll counts them."""
    if labels.ndim == 1:
        return torch.tensor(labels.numel(), device=labels.device)
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def classification_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(summed cross-entropy, number of rows) for class logits (batch, classes) and labels (batch,)."""
    return F.cross_entropy(logits.float(), labels, reduction="sum"), torch.tensor(labels.numel(), device=labels.device)
