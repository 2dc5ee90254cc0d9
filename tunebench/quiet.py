"""Keep third-party start-up noise away from tunebench's own lines.

Some libraries print on import or on load, whatever the run: an optional kernel that is not
installed, DeepSpeed finding no GPU, a deprecation between two libraries. None of it says anything about the user's run, and it would stand between
the user and tunebench's `error:` line. Each message is named here and dropped, nothing else: every
other warning still prints (Python's own rule shows each once). TUNEBENCH_VERBOSE=1 keeps them all.
"""
import logging
import os
import warnings

# (logger, start of the message): logged at import or on load, none of them about the run.
NOISE = [
    # bitsandbytes >= 0.50 on a CPU with AVX-512 bf16: an optional 4-bit matmul kernel (package
    # `kernels`) that 8-bit optimizers do not use.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # DeepSpeed on import, on a machine without a GPU (accelerate imports it when installed).
    ("DeepSpeed", "Setting accelerator to CPU"),
    # tunebench packs text into full blocks, which hold no padding; padded batches carry a mask.
    ("transformers.modeling_utils", "We strongly recommend passing in an `attention_mask`"),
]
# (category, start of the message): raised inside one library by another, not by tunebench.
DEPRECATIONS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # peft calling transformers 5
]


class _DropMessages(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record):
        return not str(record.msg).startswith(self.prefixes)


def silence_third_party_noise() -> None:
    """Drop the messages named above. Call before the libraries are imported: their loggers are
    made here first, and the filters stay on them."""
    if os.environ.get("TUNEBENCH_VERBOSE") == "1":
        return
    by_logger = {}
    for name, prefix in NOISE:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    for category, message in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)


def no_model_file_bars() -> None:
    """transformers 5 draws a bar for each file a model loads or saves, so every save of final/ cut
    into the training bar. Downloads from the hub keep theirs: a long download tells something."""
    if os.environ.get("TUNEBENCH_VERBOSE") == "1":
        return
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()
