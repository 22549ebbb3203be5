"""Frozen weights held quantised: a model's linear layers in fp8 or int8 (torchao's weight-only tensors) or nf4
(bitsandbytes' 4-bit layers, QLoRA's format), the libraries diffusers loads through ``quantization_config`` and peft
adds LoRA adapters to. What is quantised, when, and why these libraries: ``docs/memory.md``."""

from __future__ import annotations

from functools import partial

import torch

from sdtrain.errors import MissingPackage

LIBRARIES = {"fp8": "torchao", "int8": "torchao", "nf4": "bitsandbytes"}  # the package each mode runs on
BYTES_PER_WEIGHT = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 0.5 / 64 + 4 / 64 / 256}  # nf4: absmax
# per block of 64, itself 8-bit per block of 256 (double quantisation)


def check_available(mode: str, key: str) -> None:
    """Refuse ``mode`` where its library is not installed, naming the one to install.

    Raises:
        MissingPackage: ``key`` (``model.quantize``) asks for a mode whose library is missing.
    """
    if mode == "none":
        return
    library = LIBRARIES[mode]
    try:
        __import__(library)
    except ImportError as e:
        raise MissingPackage(f"{key}={mode} needs {library}: pip install 'sdtrain[quantize]' (or {library})") from e


def hold_in(model: torch.nn.Module, dtype: torch.dtype, norms: bool = True) -> torch.nn.Module:
    """Cast ``model``'s frozen floating-point weights to ``dtype``, but those of the modules a diffusers or
    transformers model keeps in float32 (``_keep_in_fp32_modules``) and, with ``norms``, of its normalisation layers;
    returns it. A denoiser's norms stay fp32 (a few numbers each): under autocast their input is fp32 or half as a
    quantised layer or autocast hands it over, and a CPU GroupNorm takes fp32 weights with either, half weights only
    with a half input. A frozen encoder runs without autocast, all in ``dtype`` (``norms`` False)."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if (norms and "Norm" in type(module).__name__) or (keep and any(part in keep for part in name.split("."))):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point() and tensor.dtype != dtype and not tensor.requires_grad:
                tensor.data = tensor.data.to(dtype)
    return model


def _linear(module: torch.nn.Module, _name: str = "") -> bool:
    return type(module) is torch.nn.Linear


def quantize(
    model: torch.nn.Module, mode: str, compute_dtype: torch.dtype, device: torch.device | str, encoder: bool = False
) -> int:
    """Hold ``model``'s linear layers quantised in ``mode`` and the rest of its weights (convolutions, norms,
    embeddings) in ``compute_dtype``, on ``device``; each layer is moved to the device before it is quantised, so the
    full-precision model never is. Returns the number of layers quantised.

    fp8 and int8 are weight-only: a layer dequantises its weight to ``compute_dtype`` for each matmul. nf4 layers
    (bitsandbytes ``Linear4bit``, blocks of 64, double quantisation) compute in ``compute_dtype``. Both are frozen
    (no gradient reaches them); peft wraps either with trainable adapters. ``encoder``: a frozen encoder, which runs
    without autocast (its norms are held in ``compute_dtype`` too, see :func:`hold_in`).
    """
    check_available(mode, "quantize")
    hold_in(model.requires_grad_(False), compute_dtype, norms=not encoder)
    count = sum(1 for m in model.modules() if _linear(m))
    if mode in ("fp8", "int8"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Float8WeightOnlyConfig() if mode == "fp8" else Int8WeightOnlyConfig()
        quantize_(model, config, filter_fn=_linear, device=device)
    else:
        _to_nf4(model, compute_dtype, device)
    for module in model.modules():
        if _quantised(module):
            module.register_forward_pre_hook(partial(_input_in, compute_dtype))
    return count


def _quantised(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, torch.nn.Linear) and weight is not None and type(weight) is not torch.nn.Parameter


def _input_in(dtype: torch.dtype, module, args):
    """A quantised layer's input in the compute dtype, as autocast hands it to a plain linear layer: autocast does
    not reach them (torchao's tensors compute at the Python level, bitsandbytes returns its input's dtype), so an fp32
    input (a norm's output under autocast) would make an fp32 output, and on a GPU a residual stream of fp32 (FLUX.1:
    2 GiB more) and fp32 matmuls for torchao."""
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() and args[0].dtype != dtype:
        return (args[0].to(dtype), *args[1:])
    return None


def _to_nf4(model: torch.nn.Module, compute_dtype: torch.dtype, device) -> None:
    """Replace every ``nn.Linear`` of ``model`` by a bitsandbytes nf4 ``Linear4bit`` holding its weights (quantised
    when the layer reaches the device)."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _linear(child):
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=compute_dtype,
                compress_statistics=True, quant_type="nf4", device="meta",
            )  # fmt: skip
            layer.weight = bnb.nn.Params4bit(
                child.weight.data.to("cpu"), requires_grad=False, compress_statistics=True, quant_type="nf4"
            )
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            # bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 CPU kernel the first time the layer
            # runs in eval mode without gradients (sampling): a layer narrower than its 64-wide block fails there
            # (`shape '[N, 0]' is invalid`), the repacked weight (absmax rounded to bf16) gives other values, and it
            # stays repacked for the training steps after, whose matmul then has no backward (an in-place error on
            # the bias). Off: one kernel on every CPU, in training and sampling.
            layer.support_avx512bf16_for_cpu = False
            setattr(parent, name, layer.to(device))  # bitsandbytes quantises on the move


def held_bytes(model: torch.nn.Module, mode: str = "none") -> float:
    """Bytes the frozen weights of ``model`` take once :func:`quantize` holds its linear layers in ``mode`` (``none``:
    as they are), computed from shapes: the same on the meta device, before quantising, and after. Trainable weights
    are not counted. fp8 / int8 layers keep one scale per output row in the compute dtype; nf4 see
    ``BYTES_PER_WEIGHT``."""
    total = 0.0
    for module in model.modules():
        own = [t for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)] if not t.requires_grad]
        if mode != "none" and isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            rows, bias = module.out_features, module.bias
            total += rows * module.in_features * BYTES_PER_WEIGHT[mode] + (rows * 2 if mode != "nf4" else 0)
            own = [bias] if bias is not None and not bias.requires_grad else []
        total += sum(t.numel() * t.element_size() for t in own)
    return total


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes ``model``'s weights and buffers take where they are held, quantised layers at their packed size."""
    return sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor takes where it is held: a quantised one's packed values and scales."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()  # torchao: the packed values and their scales
        total = sum(getattr(tensor, n).numel() * getattr(tensor, n).element_size() for n in names)
    else:
        total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)  # bitsandbytes: absmax beside the packed bytes
    if state is not None:
        total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values() if torch.is_tensor(t))
    return total
