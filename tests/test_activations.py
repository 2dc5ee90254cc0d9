"""GPT-2's GELU in one PyTorch kernel: the same logits and gradients, fewer tensors kept for backward."""
import torch
from transformers import AutoModelForCausalLM

from tunebench.activations import TanhGELU, use_fused_gelu


def saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for the backward pass of one forward."""
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum().backward()
    return sum(kept.values())


def test_fused_gelu_is_the_same_function_and_keeps_less(assets):
    plain = AutoModelForCausalLM.from_pretrained(assets / "gpt2_nodropout")
    fused = AutoModelForCausalLM.from_pretrained(assets / "gpt2_nodropout")
    assert use_fused_gelu(fused) == plain.config.n_layer
    assert all(isinstance(block.mlp.act, TanhGELU) for block in fused.transformer.h)
    ids = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    before, after = saved_bytes(plain, ids), saved_bytes(fused, ids)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # three (tokens x 4 x width) float32 tensors less per block: 2 x 64 x 128 x 4 bytes each
    assert before - after >= plain.config.n_layer * 3 * 2 * 64 * 4 * plain.config.n_embd * 4
    assert fused.config.activation_function == "gelu_new"  # final/ stays the same model


def test_llama_has_nothing_to_replace(assets):
    assert use_fused_gelu(AutoModelForCausalLM.from_pretrained(assets / "llama")) == 0
