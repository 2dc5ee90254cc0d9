"""Predict a run's peak memory per process before it runs, and the cheapest settings that fit a budget.

No weights are loaded and no memory is taken: the model is built from its config on fake tensors
(PyTorch's FakeTensorMode: shapes and dtypes, no data), with the recipe's gradient checkpointing and
method applied as train.py applies them.

weights, gradients, optimizer state: exact sizes from that model's parameters (tied weights once),
  the method's trained parameters and the optimizer's layout: AdamW keeps two moments in the
  parameter's dtype; bitsandbytes' 8-bit AdamW one byte per moment plus a float32 scale per
  256-element block, but float32 moments for tensors under 4096 elements; SGD one momentum.
  DeepSpeed ZeRO divides by the number of processes (stage 1: optimizer state, 2: and gradients,
  3: and weights); its optimizer updates one flat float32 partition per parameter group, and it
  keeps a float32 master copy of the trained weights, counted with the optimizer state. On a GPU,
  offload moves the optimizer state (and at stage 3 the weights) to CPU memory. DDP (several
  processes without DeepSpeed) keeps a second copy of the gradients in its buckets. FSDP2 (full
  shard) divides weights, gradients and optimizer state by the number of processes, with no master
  copy (under mixed precision it keeps the sharded weights in float32), and adds what it gathers:
  the root module's own weights (embeddings, output layer, final norm: gathered for the whole pass)
  and the largest transformer block's (one block at a time), in the compute dtype, plus that block's
  unsharded gradients before they are reduced. With CPU offload, the shards live in CPU memory.
activations: one forward and backward pass of the real model code as the training loop runs it
  (the loss included, fused or plain as train.py takes it, under autocast with mixed precision) on
  fake tensors, under a dispatch mode that follows every tensor storage created until it is freed:
  what is alive at the peak besides weights and gradients is activations and temporaries;
  gradients computed by then count as gradients. `--plan` also prints the other loss's peak.
optimizer step: all gradients plus the step's temporaries: PyTorch AdamW, one copy of the trained
  parameters on a GPU (foreach) or two of the largest tensor on a CPU; 8-bit AdamW on a CPU, five
  float32 copies of the largest tensor (it dequantizes). The peak is the larger of the two phases.
runtime: on a CPU the compared measurement is the process's peak resident memory, which includes
  Python, PyTorch and the libraries: the process's own resident memory before the model loads is
  measured and added. On a GPU the compared measurement is the allocator's peak: tensors only.

Not modelled: DeepSpeed's communication buckets and ZeRO-3's gathered layers, FSDP's prefetch of the
next block and its padding of shards to equal size, the CUDA context
(about 0.5 GB, added only in the budget check), allocator fragmentation.
"""
import contextlib
import itertools
import math
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.utils._pytree as pytree
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from tunebench import cache, inputs
from tunebench.errors import UserError
from tunebench.recipe import NOT_IN_MEMORY, MethodSettings, Recipe, setting_without

MB = 2**20
GB = 2**30
CUDA_CONTEXT = 512 * MB  # outside PyTorch's allocator; only for the budget check
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps float32 moments for smaller tensors
BNB_BLOCK = 256  # elements per float32 absmax scale
BNB_QMAPS = 2 * 256 * 4  # two 256-entry float32 quantization maps, shared by all tensors
EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")


@dataclass(frozen=True)
class Setup:
    """The hardware side of a run, as the accelerate config sets it."""
    device: str = "cpu"  # "cpu" or "cuda"
    processes: int = 1
    mixed_precision: str = "no"  # "no", "bf16", "fp16"
    zero_stage: int = 0  # 0: no DeepSpeed
    offload_optimizer: bool = False
    offload_params: bool = False  # with fsdp: weights, gradients and optimizer state in CPU memory
    fsdp: bool = False  # FSDP2, full shard

    def describe(self) -> str:
        if self.fsdp:
            offload = " offloading weights, gradients and optimizer state" if self.offload_params else ""
            precision = "fp32" if self.mixed_precision == "no" else f"{self.mixed_precision} mixed precision"
            return f"{self.processes} process{'es' if self.processes > 1 else ''} on {self.device}, {precision}, FSDP2 full shard{offload}"
        zero = f"DeepSpeed ZeRO-{self.zero_stage}" if self.zero_stage else "no DeepSpeed"
        offload = [name for name, on in (("optimizer", self.offload_optimizer), ("weights", self.offload_params)) if on]
        if offload:
            zero += f" offloading {' and '.join(offload)}"
        precision = "fp32" if self.mixed_precision == "no" else f"{self.mixed_precision} mixed precision"
        return f"{self.processes} process{'es' if self.processes > 1 else ''} on {self.device}, {precision}, {zero}"


def _this_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _from_deepspeed_json(ds: dict) -> dict:
    zero = ds.get("zero_optimization", {})
    fields = dict(
        zero_stage=int(zero.get("stage", 0)),
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None),
        offload_params=(zero.get("offload_param") or {}).get("device", "none") not in ("none", None),
    )
    for precision in ("bf16", "fp16"):
        if str(ds.get(precision, {}).get("enabled", "false")).lower() == "true":
            fields["mixed_precision"] = precision
    return fields


def setup_from_config_file(path) -> Setup:
    """The Setup an accelerate config file describes; None: one process on this machine, fp32."""
    if path is None:
        return Setup(device=_this_device())
    path = Path(path)
    cfg = inputs.read_yaml_mapping(path, "accelerate config", "pick one under accelerate_configs/")
    processes = cfg.get("num_processes") or 1
    if type(processes) is not int or processes < 1:
        raise UserError(f"accelerate config '{path}': num_processes must be a positive whole number, got {processes!r}")
    fields = dict(device="cpu" if cfg.get("use_cpu") else _this_device(),
                  processes=processes,
                  mixed_precision=str(cfg.get("mixed_precision") or "no"))
    if cfg.get("distributed_type") == "DEEPSPEED":
        ds = cfg.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            json_path = Path(ds["deepspeed_config_file"])  # accelerate reads it from the working directory
            if not json_path.is_file():
                raise UserError(f"DeepSpeed config '{json_path}' named in '{path}' does not exist here; "
                                "run from the repository root")
            fields.update(_from_deepspeed_json(yaml.safe_load(json_path.read_text(encoding="utf-8"))))
        else:
            fields.update(zero_stage=int(ds.get("zero_stage", 2)),
                          offload_optimizer=ds.get("offload_optimizer_device", "none") != "none",
                          offload_params=ds.get("offload_param_device", "none") != "none")
    elif cfg.get("distributed_type") == "FSDP":
        fields.update(fsdp=True, offload_params=bool((cfg.get("fsdp_config") or {}).get("fsdp_offload_params")))
    return Setup(**fields)


def setup_from_accelerator(accelerator) -> Setup:
    """The Setup of the running processes (after Accelerator(), before prepare())."""
    fields = dict(device=accelerator.device.type, processes=accelerator.num_processes,
                  mixed_precision=str(accelerator.mixed_precision))
    if accelerator.state.deepspeed_plugin is not None:
        fields.update(_from_deepspeed_json(accelerator.state.deepspeed_plugin.deepspeed_config))
    if accelerator.distributed_type.value == "FSDP":
        from torch.distributed.fsdp import CPUOffloadPolicy

        fields.update(fsdp=True, offload_params=isinstance(accelerator.state.fsdp_plugin.cpu_offload, CPUOffloadPolicy))
    return Setup(**fields)


def model_dtype(recipe: Recipe, config, setup: Setup):
    """The dtype the weights are held in during training."""
    from tunebench.models import DTYPES

    if setup.zero_stage and setup.mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if setup.mixed_precision == "bf16" else torch.float16  # DeepSpeed casts the model
    if setup.fsdp and setup.mixed_precision in ("bf16", "fp16"):
        return torch.float32  # accelerate upcasts the sharded weights; FSDP gathers them in the compute dtype
    dtype = DTYPES[recipe.model.dtype]
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return dtype


@contextlib.contextmanager
def _whole_models():
    """While a ZeRO-3 run's DeepSpeed config is registered, transformers builds every model
    partitioned across processes (deepspeed.zero.Init); the plan's model must be whole."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def _meta_model(recipe: Recipe, config, dtype, checkpointing: bool):
    """The recipe's model with its method on the meta device: shapes and dtypes, no memory."""
    with _whole_models():
        return _build_meta_model(recipe, config, dtype, checkpointing)


def _build_meta_model(recipe: Recipe, config, dtype, checkpointing: bool):
    from transformers import AutoModelForCausalLM

    from tunebench.activations import use_fused_gelu
    from tunebench.methods import METHODS, apply_method
    from tunebench.models import enable_gradient_checkpointing

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=recipe.model.attn_implementation,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    use_fused_gelu(model)  # as train.py does
    if checkpointing:
        enable_gradient_checkpointing(model)
    method = replace(recipe.method, **METHODS[recipe.method.type].plan_keys)
    return apply_method(model, method, None)  # peft puts the new (small) weights where the base weights are


def _fsdp_units(model, params: list) -> tuple:
    """(elements of the root's own weights, of the largest transformer block's, of its trained ones): what
    FSDP2 gathers at once when accelerate wraps each block (the model's _no_split_modules) on its own."""
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    root = sum(p.numel() for p in params if id(p) not in in_blocks)
    largest = max(blocks, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    if largest is None:
        return root, 0, 0
    return (root, sum(p.numel() for p in largest.parameters()),
            sum(p.numel() for p in largest.parameters() if p.requires_grad))


def _quantized_weights(model, method: MethodSettings) -> dict:
    """id(weight) -> (elements, bytes per element) for each weight a 4-bit base holds quantized (QLoRA): transformers
    quantizes the frozen linear layers but the output layer. bitsandbytes packs two weights a byte,
    with one absmax per 64-weight block: a float32, or with double quantization a byte, plus a
    float32 per 256 blocks, the nested 256-entry code and a float32 offset; and the 16-entry NF4/FP4 code."""
    from transformers.pytorch_utils import Conv1D

    from tunebench.methods import METHODS

    if METHODS[method.type].base_bits(method) != 4:
        return {}
    output = model.get_output_embeddings()
    out = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output and not module.weight.requires_grad:
            n = module.weight.numel()
            blocks = math.ceil(n / 64)
            absmax = blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 if method.double_quant else blocks * 4
            out[id(module.weight)] = (n, (math.ceil(n / 2) + absmax + 16 * 4) / n)  # (elements, bytes per element)
    return out


def _to_fake(model, fake_mode, device: str):
    """Give a meta model fake parameters and buffers on the training device, in place (shared
    tensors stay shared). Fake tensors run the device's real kernels' shape logic, without data."""
    fakes = {}
    with fake_mode:
        for module in model.modules():
            for registry in (module._parameters, module._buffers):
                for name, tensor in registry.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in fakes:
                        fake = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                        if isinstance(tensor, torch.nn.Parameter):
                            fake = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
                        fakes[id(tensor)] = fake
                    registry[name] = fakes[id(tensor)]
    return model


def optimizer_state_bytes(trained: list, optimizer: str) -> int:
    """Bytes of optimizer state for trained tensors given as (numel, element size) pairs, laid out
    as the optimizer allocates it."""
    total = 0
    for numel, size in trained:
        if optimizer == "adamw":
            total += 2 * numel * size + 4  # two moments, and the step count as a float32 tensor
        elif optimizer == "sgd":
            total += numel * size
        elif numel < BNB_MIN_8BIT_SIZE:
            total += 2 * numel * 4
        else:
            total += 2 * numel + 2 * math.ceil(numel / BNB_BLOCK) * 4
    if optimizer in EIGHT_BIT and any(numel >= BNB_MIN_8BIT_SIZE for numel, _ in trained):
        total += BNB_QMAPS
    return total


def _step_temporaries(optimizer: str, device: str, updated_bytes: int, largest: int, size: int) -> int:
    """Transient bytes of one optimizer step; largest: elements of the largest tensor updated at once,
    size: their element size."""
    if optimizer == "adamw":
        return updated_bytes if device == "cuda" else 2 * largest * size
    if optimizer in EIGHT_BIT and device == "cpu":
        return 5 * largest * 4
    return 0


def runtime_bytes(setup: Setup) -> int:
    """On a CPU: this process's resident memory now (call before the model loads); on a GPU: 0."""
    if setup.device != "cpu":
        return 0
    import psutil

    return psutil.Process().memory_info().rss


@dataclass
class Prediction:
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    runtime: int
    offloaded: int  # moved to CPU memory by DeepSpeed offload, outside the GPU's peak
    phase: str  # where the peak falls: "backward" or "optimizer step"
    loss: str  # "fused" (tunebench/fused_loss.py) or "plain"
    trainable: int
    total_params: int

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.runtime

    def as_summary(self, setup: Setup) -> dict:
        return {
            "predicted_peak_mb": self.peak / MB,
            "compare_with": "peak_cpu_rss_mb" if setup.device == "cpu" else "peak_gpu_mem_mb",
            "weights_mb": self.weights / MB,
            "gradients_mb": self.gradients / MB,
            "optimizer_state_mb": self.optimizer_state / MB,
            "activations_mb": self.activations / MB,
            "runtime_mb": self.runtime / MB,
            "offloaded_mb": self.offloaded / MB,
            "peak_phase": self.phase,
            "loss": self.loss,
            "setup": setup.describe(),
        }


class _LiveBytes(TorchDispatchMode):
    """Follows the storage of every tensor that operations create under it until it is freed, and
    keeps the peak of the bytes alive: gradients (once accumulated into a trained parameter) and
    everything else (activations and temporaries). Weights and buffers are not counted."""

    def __init__(self, model):
        super().__init__()
        self._storages = weakref.WeakKeyDictionary()  # storage -> [bytes counted, is a gradient]
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            self._storages[tensor.untyped_storage()] = [0, False]
        self.gradients = self.other = self.peak_gradients = self.peak_other = 0
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._now_a_gradient)

    def _freed(self, entry: list) -> None:
        if entry[1]:
            self.gradients -= entry[0]
        else:
            self.other -= entry[0]

    def _now_a_gradient(self, param) -> None:
        entry = self._storages.get(param.grad.untyped_storage())
        if entry and not entry[1]:
            entry[1] = True
            self.other -= entry[0]
            self.gradients += entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._storages:
                    entry = [storage.nbytes(), False]
                    self._storages[storage] = entry
                    weakref.finalize(storage, self._freed, entry)
                    self.other += entry[0]
        if self.gradients + self.other > self.peak_gradients + self.peak_other:
            self.peak_gradients, self.peak_other = self.gradients, self.other
        return out


class Planner:
    """Predictions for one recipe and model config. The fake-tensor passes are cached, so that a
    budget search runs each (dtype, micro-batch, checkpointing) once."""

    def __init__(self, recipe: Recipe, config, setup: Setup):
        if recipe.task != "causal_lm":
            raise UserError(f"the memory plan covers causal language modelling (task causal_lm), not task {recipe.task}")
        self.recipe, self.config, self.setup = recipe, config, setup
        self.runtime = runtime_bytes(setup)
        self._layouts, self._passes, self._loss_paths = {}, {}, {}

    def _layout(self, setup: Setup):
        """([(numel, element size)] of all parameters, the same of the trained ones, the trained
        elements in train.py's two parameter groups (matrices, with weight decay, and the rest), and
        the elements FSDP gathers at once (_fsdp_units))."""
        dtype = model_dtype(self.recipe, self.config, setup)
        if dtype not in self._layouts:
            from tunebench.methods import unique_params

            model = _meta_model(self.recipe, self.config, dtype, checkpointing=False)
            params = list(unique_params(model))
            trained = [p for p in params if p.requires_grad]
            quantized = _quantized_weights(model, self.recipe.method)
            self._layouts[dtype] = ([(p.numel(), p.element_size()) if id(p) not in quantized else quantized[id(p)]
                                     for p in params],
                                    [(p.numel(), p.element_size()) for p in trained],
                                    [sum(p.numel() for p in trained if (p.ndim >= 2) == matrix) for matrix in (True, False)],
                                    _fsdp_units(model, params))
        return self._layouts[dtype]

    def loss_path(self, setup: Setup, fused=None) -> str:
        """"fused" or "plain": the loss train.py takes (fused_loss.choose; ZeRO-3 hooks every layer, FSDP
        shards the output layer),
        or the one asked for where it can apply."""
        from tunebench import fused_loss

        wanted = self.recipe.train.fused_loss if fused is None else fused
        if not wanted or setup.zero_stage >= 3 or setup.fsdp:
            return "plain"
        dtype = model_dtype(self.recipe, self.config, setup)
        if dtype not in self._loss_paths:
            model = _meta_model(self.recipe, self.config, dtype, checkpointing=False)
            self._loss_paths[dtype] = "fused" if fused_loss.why_not(model) is None else "plain"
        return self._loss_paths[dtype]

    def _pass(self, setup: Setup, micro_batch: int, checkpointing: bool, loss: str) -> dict:
        """Bytes alive at the peak of one forward and backward pass: gradients, and the rest."""
        dtype = model_dtype(self.recipe, self.config, setup)
        autocast = None if setup.zero_stage or setup.mixed_precision == "no" else setup.mixed_precision
        key = (dtype, autocast, setup.device, micro_batch, checkpointing, loss)
        if key not in self._passes:
            from torch._subclasses.fake_tensor import FakeTensorMode

            from accelerate.utils import convert_outputs_to_fp32

            from tunebench import fused_loss
            from tunebench.metrics import causal_loss

            fake_mode = FakeTensorMode(allow_non_fake_inputs=True)  # peft keeps small index tensors on the CPU
            model = _to_fake(_meta_model(self.recipe, self.config, dtype, checkpointing), fake_mode, setup.device)
            model.train()
            if autocast:
                model.forward = convert_outputs_to_fp32(model.forward)  # as accelerate returns them in mixed precision
            loss_of = fused_loss.install(model, only_scored=False) if loss == "fused" else causal_loss  # as train.py's
            seq = self.recipe.data.max_length
            with fake_mode, _LiveBytes(model) as live:
                ids = torch.zeros((micro_batch, seq), dtype=torch.long, device=setup.device)
                with torch.autocast(setup.device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast),
                                    enabled=autocast is not None):
                    nll, _ = loss_of(model, {"input_ids": ids, "labels": ids})
                nll.backward()
            self._passes[key] = {"gradients": live.peak_gradients, "activations": live.peak_other}
        return self._passes[key]

    def predict(self, micro_batch=None, checkpointing=None, optimizer=None, grad_accum=None, setup=None,
                fused=None) -> Prediction:
        """The run as the recipe sets it, or with the given settings changed (fused: the fused loss
        where it applies, or the plain one)."""
        train = self.recipe.train
        micro_batch = micro_batch or train.micro_batch_size
        checkpointing = self.recipe.model.gradient_checkpointing if checkpointing is None else checkpointing
        optimizer, grad_accum, setup = optimizer or train.optimizer, grad_accum or train.grad_accum, setup or self.setup
        n, zero, on_gpu = setup.processes, setup.zero_stage, setup.device == "cuda"

        params, trained, groups, units = self._layout(setup)
        weights = round(sum(numel * size for numel, size in params))
        gradients = sum(numel * size for numel, size in trained)
        state = optimizer_state_bytes(trained, optimizer)
        largest = max((numel for numel, _ in trained), default=0)
        buckets = offloaded = 0
        if zero:
            # The optimizer sees one flat float32 partition per parameter group, beside DeepSpeed's master weights.
            partitions = [(math.ceil(group / n), 4) for group in groups if group]
            state = optimizer_state_bytes(partitions, optimizer) + sum(numel * 4 for numel, _ in partitions)
            largest = max((numel for numel, _ in partitions), default=0)
            gradients //= n if zero >= 2 else 1
            weights //= n if zero >= 3 else 1
            if on_gpu and setup.offload_optimizer:
                offloaded, state = offloaded + state, 0
            if on_gpu and setup.offload_params and zero >= 3:
                offloaded, weights = offloaded + weights, 0
        elif setup.fsdp:
            # Each process's shard of every tensor; the optimizer steps the shards in their dtype.
            trained = [(math.ceil(numel / n), size) for numel, size in trained]
            weights = round(sum(math.ceil(numel / n) * size for numel, size in params))
            gradients = sum(numel * size for numel, size in trained)
            state = optimizer_state_bytes(trained, optimizer)
            largest = max((numel for numel, _ in trained), default=0)
            if on_gpu and setup.offload_params:
                offloaded, weights, gradients, state = weights + gradients + state, 0, 0, 0
            compute_size = {"bf16": 2, "fp16": 2}.get(setup.mixed_precision, params[0][1] if params else 4)
            root, block, block_trained = units
            weights += (root + block) * compute_size
            gradients += block_trained * (params[0][1] if params else 4)  # one block's, before reduce-scatter
        elif n > 1:
            buckets = gradients

        loss = self.loss_path(setup, fused)
        passed = self._pass(setup, micro_batch, checkpointing, loss)
        computed_grads = gradients if grad_accum > 1 or zero >= 2 or setup.fsdp else min(gradients, passed["gradients"])
        backward = (computed_grads + buckets, passed["activations"])
        # The optimizer updates the trained tensors in their dtype, or under ZeRO its float32 partition.
        size = 4 if zero or not trained else trained[0][1]
        updated_bytes = sum(numel * 4 for numel, _ in partitions) if zero else gradients
        optimizer_on_device = not (on_gpu and setup.offload_optimizer)
        temporaries = _step_temporaries(optimizer, setup.device, updated_bytes, largest, size) if optimizer_on_device else 0
        step = (gradients + buckets, temporaries)
        grads, activations = backward if sum(backward) >= sum(step) else step
        return Prediction(
            weights=weights, gradients=grads, optimizer_state=state, activations=activations, runtime=self.runtime,
            offloaded=offloaded, phase="backward" if sum(backward) >= sum(step) else "optimizer step", loss=loss,
            trainable=sum(self._layout(self.setup)[2]), total_params=sum(numel for numel, _ in self._layout(self.setup)[0]),
        )


def predict_for_summary(recipe: Recipe, config, accelerator) -> dict:
    """The prediction for summary.json, made before the model loads, and kept (tunebench/cache.py) for
    the next run of the same setting: a search's trials differ in their rate only. The runtime is this
    process's own. A model whose code cannot run on fake tensors gets the reason instead: a prediction
    must never stop a training run."""
    import transformers

    setup = setup_from_accelerator(accelerator)
    runtime = runtime_bytes(setup)
    setting = setting_without(recipe, NOT_IN_MEMORY)
    key = cache.digest(setting, config.to_dict(), asdict(setup), torch.__version__, transformers.__version__).hexdigest()
    try:
        fields = cache.remembered("memory_plan", key[:32], lambda: asdict(Planner(recipe, config, setup).predict()))
    except Exception as e:  # noqa: BLE001 - any failure of the fake-tensor pass
        return {"predicted_peak_mb": None, "error": f"{type(e).__name__}: {e}"}
    return Prediction(**dict(fields, runtime=runtime)).as_summary(setup)


# ---- printing and the budget search --------------------------------------------------------------

ZERO_CONFIGS = {  # (stage, offload) -> the accelerate config that sets it
    (2, False): "accelerate_configs/deepspeed_zero2.yaml",
    (3, False): "accelerate_configs/deepspeed_zero3.yaml",
    (3, True): "accelerate_configs/deepspeed_zero3_offload.yaml",
}
# Rough price of each change in speed, to order the settings that fit (cheapest first): 8-bit
# AdamW costs next to nothing; a smaller micro-batch (same global batch through accumulation)
# uses the hardware less well; checkpointing recomputes the forward (about a third more compute);
# ZeRO adds communication, offload adds transfers over PCIe.
COST = {"halve_micro_batch": 1, "8bit": 1, "checkpointing": 3, "zero2": 2, "zero3": 4, "offload": 8}


def _mb(n: int) -> str:
    return f"{n / MB:,.1f} MB"


def format_prediction(recipe: Recipe, setup: Setup, p: Prediction) -> str:
    train, model = recipe.train, recipe.model
    lines = [
        f"memory plan for {recipe.name}: {model.name}, method {recipe.method.type} "
        f"({p.trainable:,} of {p.total_params:,} parameters trained)",
        f"  {setup.describe()}; micro-batch {train.micro_batch_size} x {recipe.data.max_length} tokens, "
        f"grad_accum {train.grad_accum}, gradient checkpointing {'on' if model.gradient_checkpointing else 'off'}, "
        f"optimizer {train.optimizer}, {p.loss} loss" + ("" if p.loss == "fused" else " on the logits"),
        f"  weights          {_mb(p.weights):>12}",
        f"  gradients        {_mb(p.gradients):>12}   (alive at the peak)",
        f"  optimizer state  {_mb(p.optimizer_state):>12}" + ("   (with DeepSpeed's float32 master weights)" if setup.zero_stage else ""),
        f"  activations      {_mb(p.activations):>12}   (and temporaries, at the peak)",
    ]
    if setup.device == "cpu":
        lines.append(f"  runtime          {_mb(p.runtime):>12}   (this process before the model loads: Python, PyTorch, libraries)")
    if p.offloaded:
        lines.append(f"  offloaded        {_mb(p.offloaded):>12}   (in CPU memory, not in the peak below)")
    compare = "peak_cpu_rss_mb" if setup.device == "cpu" else "peak_gpu_mem_mb"
    lines.append(f"  predicted peak   {_mb(p.peak):>12}   per process, during the {p.phase}; "
                 f"summary.json's {compare} measures it")
    return "\n".join(lines)


def _candidates(recipe: Recipe, setup: Setup):
    """(cost, changes, settings) for every combination of the memory-saving changes."""
    train, model = recipe.train, recipe.model
    global_batch = train.micro_batch_size * train.grad_accum
    micro_batches = [train.micro_batch_size]
    while micro_batches[-1] > 1 and global_batch % (micro_batches[-1] // 2) == 0:
        micro_batches.append(micro_batches[-1] // 2)
    optimizers = [train.optimizer] + (["adamw_8bit"] if train.optimizer == "adamw" else [])
    checkpointing = [model.gradient_checkpointing] + ([True] if not model.gradient_checkpointing else [])
    setups = [setup]
    for stage, offload in ZERO_CONFIGS if not setup.fsdp else ():  # FSDP shards already
        more_sharding = setup.processes > 1 and stage > setup.zero_stage and not offload
        more_offload = offload and setup.device == "cuda" and not setup.offload_optimizer
        if more_sharding or more_offload:
            setups.append(replace(setup, zero_stage=stage, offload_optimizer=offload, offload_params=offload))
    for mb, opt, ckpt, s in itertools.product(micro_batches, optimizers, checkpointing, setups):
        if opt in EIGHT_BIT and s.offload_optimizer:
            continue  # refused: DeepSpeed would swap in its own CPU Adam
        changes, cost = [], 0
        if mb != train.micro_batch_size:
            changes += [f"train.micro_batch_size={mb}", f"train.grad_accum={global_batch // mb}"]
            cost += COST["halve_micro_batch"] * int(math.log2(train.micro_batch_size // mb))
        if opt != train.optimizer:
            changes.append(f"train.optimizer={opt}")
            cost += COST["8bit"]
        if ckpt != model.gradient_checkpointing:
            changes.append("model.gradient_checkpointing=true")
            cost += COST["checkpointing"]
        if s != setup:
            changes.append(f"(accelerate launch --config_file {ZERO_CONFIGS[(s.zero_stage, s.offload_optimizer)]})")
            cost += COST["offload"] if s.offload_optimizer else COST[f"zero{s.zero_stage}"]
        yield cost, changes, dict(micro_batch=mb, grad_accum=global_batch // mb, optimizer=opt, checkpointing=ckpt, setup=s)


def fits(prediction: Prediction, setup: Setup, budget: int) -> bool:
    return prediction.peak + (CUDA_CONTEXT if setup.device == "cuda" else 0) <= budget


def cheapest_fits(planner: Planner, budget: int, how_many: int = 3) -> list:
    """[(changes, prediction)] of the cheapest settings whose predicted peak fits, cheapest first."""
    found = []
    for _, changes, settings in sorted(_candidates(planner.recipe, planner.setup), key=lambda c: (c[0], len(c[1]))):
        prediction = planner.predict(**settings)
        if fits(prediction, settings["setup"], budget):
            found.append((changes, prediction))
            if len(found) == how_many:
                break
    return found


def show(recipe: Recipe, setup: Setup, budget_gb=None) -> None:
    """`train.py --plan`: print the prediction and, with a budget, the cheapest settings that fit."""
    from tunebench.methods import check_context
    from tunebench.models import load_config

    config = load_config(recipe.model)
    check_context(config, recipe)
    import accelerate, datasets, peft  # noqa: E401,F401 - loaded as train.py loads them, so that the runtime measured matches a run's
    planner = Planner(recipe, config, setup)
    prediction = planner.predict()
    print(format_prediction(recipe, setup, prediction))
    other = planner.predict(fused=prediction.loss != "fused")
    if other.loss != prediction.loss:
        print(f"  with the {other.loss} loss instead ({'train.fused_loss=' + str(other.loss == 'fused').lower()}): "
              f"{_mb(other.peak)}")
    if budget_gb is None:
        return
    budget = int(budget_gb * GB)
    context = " (with the CUDA context, about 0.5 GB)" if setup.device == "cuda" else ""
    if fits(prediction, setup, budget):
        print(f"budget {budget_gb:g} GB: fits as it is{context}")
        return
    found = cheapest_fits(planner, budget)
    if not found:
        print(f"budget {budget_gb:g} GB: nothing tried fits{context} (smaller micro-batch, 8-bit AdamW, checkpointing, "
              "ZeRO); try a shorter data.max_length, a lighter method or more processes")
        return
    print(f"budget {budget_gb:g} GB: does not fit as it is{context}; the cheapest settings that fit, cheapest first:")
    for changes, p in found:
        print(f"  {_mb(p.peak):>10}   {' '.join(changes)}")
