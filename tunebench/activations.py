"""The MLP activation in one PyTorch kernel where a model spells it out in Python.

GPT-2's "gelu_new" (transformers' NewGELUActivation) is the tanh approximation of GELU written as
seven elementwise operations, and autograd keeps four of their (tokens x 4 x width) results for the
backward pass. torch.nn.functional.gelu(approximate="tanh") is the same function in one kernel that
keeps only its input: for GPT-2 small at micro-batch 4 and 512 tokens, 75 MB less per block. The
values agree to float rounding. The model's config is left as it is, so final/ loads anywhere as
the same model.
"""
import torch
import torch.nn.functional as F


class TanhGELU(torch.nn.Module):
    """GELU, tanh approximation, in PyTorch's own kernel."""

    def forward(self, x):
        return F.gelu(x, approximate="tanh")


def use_fused_gelu(model) -> int:
    """Replace every NewGELUActivation module of the model in place; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child).__name__ == "NewGELUActivation" and type(child).__module__.startswith("transformers."):
                setattr(module, name, TanhGELU())
                replaced += 1
    return replaced
