"""Measurements taken the same way for every method: memory, sizes, hardware, versions, FLOPs."""
import ctypes
import importlib.metadata
import os
import platform
import resource
from pathlib import Path

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)


def peak_cpu_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_cpu_allocator(exact_rss: bool) -> None:
    """How glibc handles the large blocks tensors live in; call before the model loads.

    By default glibc maps every block over its threshold (at most 32 MB) fresh from the system and
    unmaps it when freed, so each step's logits and activations cost new pages that the kernel must
    zero. Fast (the default): every block comes from the heap and freed memory stays there for the
    next step; the peak RSS then includes freed but kept blocks. exact_rss: every block of 1 MB or
    more is returned at once, so that peak RSS follows the tensors, for memory measurements
    (slowest). Measured step times and peaks: bench/README.md. Does nothing without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        if exact_rss:
            libc.mallopt(M_MMAP_THRESHOLD, 2**20)
        else:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        pass


def peak_gpu_mem_mb():
    """Peak bytes held by the CUDA caching allocator on this device since the last reset; None on CPU."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def reset_peak_gpu_mem() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def dir_size_mb(path) -> float:
    path = Path(path)
    if not path.exists():
        return 0.0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def optimizer_state_mb(optimizer) -> float:
    """Bytes of every tensor the optimizer keeps per parameter (moments, 8-bit maps and scales)."""
    seen, total = set(), 0
    state = getattr(optimizer, "optimizer", optimizer).state  # unwrap accelerate's wrapper
    for per_param in state.values():
        for value in per_param.values():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total / 2**20


def bf16_native() -> bool:
    """Whether this machine multiplies bf16 matrices natively: a GPU that supports bf16, or a CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 is emulated, far slower than float32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(num_processes: int = 1, mixed_precision: str = "no", distributed_type: str = "NO") -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpus": gpus,
        "num_processes": num_processes,
        "mixed_precision": mixed_precision,
        "distributed_type": distributed_type,
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def train_flops_per_token(config, trainable: int, total: int, seq_len: int) -> float:
    """Model FLOPs per trained token (an estimate by formula, as in the PaLM paper's appendix B):
    forward 2N + attention 2*n_layer*seq*d; backward computes activation gradients (as much again)
    and weight gradients only for trainable weights (2 per trainable parameter)."""
    n_layer = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    attention = 2 * n_layer * seq_len * d_model
    forward = 2 * total + attention
    return 2 * forward + 2 * trainable
