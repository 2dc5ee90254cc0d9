"""Quality metrics. Losses are sums over scored tokens, so every mean is over tokens, never batches."""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(summed next-token NLL, number of scored tokens). Label -100 is never scored. Logits may carry
    extra leading positions (a soft prompt's virtual tokens): only the last len(labels) count."""
    logits = logits[:, -labels.shape[1] :]
    # Shift the labels, not the logits: a slice of the logits would copy the largest tensor of the step.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (targets != IGNORE_INDEX).sum()
