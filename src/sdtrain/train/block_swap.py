"""Block swap: the last N transformer blocks of a LoRA run's frozen base live in CPU memory (pinned on a GPU machine)
and visit the device one or two at a time (``train.offload.blocks``).

Before a swapped block runs forward, its frozen weights are on the device: copied there on a side stream while the
block before it ran, and waited for. Once the next block starts, the block before it is dropped from the device (its
modules hold their CPU copies again: frozen weights never change, so nothing is copied back). In the backward pass
the blocks come back in reverse order: the recomputation of a checkpointed block's forward brings it in, through the
same hook. Trainable weights (the adapters) stay on the device. The computation is the same with or without
swapping: the weights are the same numbers.

The mechanism is the same on a CPU, where "the device" and "the CPU copy" are two CPU tensors, which is how the tests
check it: losses and weights equal the run without it, and a block's modules hold their CPU copies whenever the
block is not running. Gradient checkpointing is required: without it autograd would keep each block's device copies
for the backward pass.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from sdtrain.config import ConfigError
from sdtrain.models.quantize import held_bytes, tensor_bytes

logger = logging.getLogger(__name__)

# in forward order (Flux: double, then single); Z-Image's main blocks are its ``layers`` (its refiners stay put)
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "layers")
ATTRIBUTE = "_sdtrain_block_swap"  # where the swapper hangs on the model it swaps


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's chain of transformer blocks in forward order; empty for a UNet."""
    return [block for name in BLOCK_LISTS for block in getattr(model, name, None) or []]


def _in_backward() -> bool:
    """Whether autograd's engine is running (a checkpointed block recomputed in the backward pass)."""
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """The swapped blocks of one model, and which of them are on the device now.

    A swapped block's frozen tensors live as CPU objects ("homes") in their modules; visiting the device, each module
    holds a device copy in their place, which the forward (and the graph of a recomputation) uses; leaving, the
    module holds its home again and the copy is freed once no graph refers to it. Replacing the tensors, not their
    ``.data``, works for quantised tensors too (torchao's hold their values as attributes, bitsandbytes' carry their
    quantisation state).

    Args:
        blocks: the blocks to swap, in forward order (gradient-checkpointed: their recomputation in the backward
            pass brings them back).
        device: where they run.
    """

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device):
        self.blocks, self.device = blocks, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.homes: list[list[tuple[dict, str, torch.Tensor]]] = []  # per block: (the module's dict, name, home)
        self.resident: dict[int, torch.cuda.Event | None] = {}  # block index -> its copy's event
        for index, block in enumerate(blocks):
            homes = []
            for module in block.modules():
                for slots in (module._parameters, module._buffers):
                    for name, tensor in slots.items():
                        if tensor is not None and not tensor.requires_grad:
                            homes.append((slots, name, self._home(tensor)))
            for slots, name, home in homes:
                slots[name] = home
            self.homes.append(homes)
            block._apply = partial(_stays, block)  # a model.to(device) (a pipeline's) leaves the block as it is
            for module in block.modules():
                if type(module).__module__.startswith("bitsandbytes") and type(module).__name__ == "Linear4bit":
                    module.forward = partial(_nf4_forward, module)  # keeps no device copy for the backward
            block.register_forward_pre_hook(partial(self._before, index))

    def _home(self, tensor: torch.Tensor) -> torch.Tensor:
        """The CPU copy of a frozen tensor, of its type: pinned where it is copied to a GPU (a quantised tensor that
        cannot be pinned is copied from pageable memory)."""
        home = _copied(tensor, torch.device("cpu"))
        if self.cuda:
            try:
                home = _copied(home, None, pin=True)
            except (RuntimeError, NotImplementedError, TypeError):
                pass
        return home

    def _copy(self, home: torch.Tensor) -> torch.Tensor:
        """A device copy of ``home``, of its type."""
        return _copied(home, self.device, non_blocking=self.cuda)

    def _fetch(self, index: int) -> None:
        """Start copying block ``index`` to the device (on the side stream on a GPU)."""
        if index in self.resident or not 0 <= index < len(self.blocks):
            return
        event = None
        if self.cuda:
            self.side.wait_stream(torch.cuda.current_stream(self.device))  # its memory may be a dropped block's
            with torch.cuda.stream(self.side):
                for slots, name, home in self.homes[index]:
                    slots[name] = self._copy(home)
                event = torch.cuda.Event()
                event.record(self.side)
        else:
            for slots, name, home in self.homes[index]:
                slots[name] = self._copy(home)
        self.resident[index] = event

    def _drop(self, index: int) -> None:
        """Block ``index``'s modules hold their CPU homes again (the device copies are freed)."""
        for slots, name, home in self.homes[index]:
            slots[name] = home
        self.resident.pop(index, None)

    def _before(self, index: int, module, args) -> None:
        """Block ``index`` is about to run: it is on the device (waited for), the ones that ran before it are dropped
        and the next one in this pass's direction is on its way."""
        self._fetch(index)
        event = self.resident[index]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for slots, name, _ in self.homes[index]:
                _record(slots[name], current)  # not reused by the side stream before this block has run
            self.resident[index] = None
        ahead = index - 1 if _in_backward() else index + 1
        for other in list(self.resident):
            if other not in (index, ahead):
                self._drop(other)
        self._fetch(ahead)

    def settle(self) -> None:
        """Drop every swapped block from the device (between steps, after samples)."""
        for index in range(len(self.blocks)):
            self._drop(index)

    def held_elsewhere(self) -> int:
        """Bytes of the swapped blocks' frozen tensors in CPU memory (quantised ones at their packed size)."""
        return sum(tensor_bytes(home) for homes in self.homes for _, _, home in homes)


def _copied(tensor: torch.Tensor, device, non_blocking: bool = False, pin: bool = False) -> torch.Tensor:
    """A copy of a frozen tensor on ``device`` (or pinned), of its type: a Parameter stays one; bitsandbytes' 4-bit
    weight moves its packed values and shares its (small) quantisation state, which stays where it is."""
    move = (lambda t: t.pin_memory()) if pin else (lambda t: t.to(device, non_blocking=non_blocking, copy=True))
    if getattr(tensor, "quant_state", None) is not None:
        import bitsandbytes as bnb

        return bnb.nn.Params4bit(
            data=move(tensor.data), requires_grad=False, quant_state=tensor.quant_state, blocksize=tensor.blocksize,
            compress_statistics=tensor.compress_statistics, quant_type=tensor.quant_type,
            quant_storage=tensor.quant_storage, module=tensor.module, bnb_quantized=True,
        )  # fmt: skip
    copy = move(tensor.detach())
    if isinstance(tensor, torch.nn.Parameter) and type(copy) is torch.Tensor:
        copy = torch.nn.Parameter(copy, requires_grad=False)
    return copy


def _record(tensor: torch.Tensor, stream) -> None:
    """``record_stream`` of a device copy (a quantised tensor's inner tensors)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        tensor.record_stream(stream)
    elif hasattr(tensor, "__tensor_flatten__"):
        for name in tensor.__tensor_flatten__()[0]:
            getattr(tensor, name).record_stream(stream)
    else:
        tensor.data.record_stream(stream)


class _Frozen4bit(torch.autograd.Function):
    """A frozen bitsandbytes 4-bit matmul whose weight is kept for the backward pass through ``save_for_backward``,
    where gradient checkpointing drops it (and the recomputation brings it back). bitsandbytes' own function keeps
    the weight on the autograd context instead, out of checkpointing's reach: every swapped block's device copy
    stayed on the device until the backward pass (measured on an H200: FLUX.1 in nf4 with 30 of 57 blocks swapped
    peaked at 11.3 GiB, 0.8 GiB more than without swapping). The same operations as bitsandbytes', so the same
    numbers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        import bitsandbytes as bnb

        ctx.quant_state = weight.quant_state  # shared by a block's CPU and device copies: always on the device
        ctx.save_for_backward(weight)
        with torch.no_grad():
            return bnb.matmul_4bit(x, weight, bias=bias, quant_state=weight.quant_state)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from bitsandbytes.functional import dequantize_4bit

        (weight,) = ctx.saved_tensors
        return torch.matmul(grad, dequantize_4bit(weight.view(-1, 1), ctx.quant_state).to(grad.dtype)), None, None


def _nf4_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A swapped block's bitsandbytes ``Linear4bit`` forward (its input in the compute dtype, as bitsandbytes does),
    through :class:`_Frozen4bit`."""
    dtype = x.dtype
    if module.compute_dtype is not None:
        x = x.to(module.compute_dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return _Frozen4bit.apply(x, module.weight, bias).to(dtype)


def _stays(block: torch.nn.Module, fn, recurse: bool = True) -> torch.nn.Module:
    """A swapped block's ``_apply``: moves and casts of the whole model pass it by (its frozen weights have their
    place, its adapters are on the device already)."""
    return block


def swap_blocks(
    model: torch.nn.Module, count: int, device, checkpointing: bool, processes: int = 1
) -> BlockSwap | None:
    """Swap the last ``count`` blocks of ``model`` (a LoRA run's denoiser, on ``device``); None for 0.

    Raises:
        ConfigError: the model has no chain of transformer blocks (a UNet), or fewer than ``count`` + 1 (one block
            at least stays, so a copy always has a block to overlap with); a run of several ``processes``.
    """
    if not count:
        return None
    if processes > 1:
        raise ConfigError(f"train.offload.blocks={count}: block swap runs in one process here ({processes} launched: "
                          "DDP needs every parameter on the device); launch one process")  # fmt: skip
    blocks = blocks_of(model)
    if not blocks:
        raise ConfigError(f"train.offload.blocks={count}: block swap is for transformer families (Flux, SD3, PixArt, "
                          f"Sana); {type(model).__name__} has no chain of transformer blocks")  # fmt: skip
    if count >= len(blocks):
        raise ConfigError(f"train.offload.blocks={count}: {type(model).__name__} has {len(blocks)} blocks; swap at "
                          f"most {len(blocks) - 1} (one at least stays on the device)")  # fmt: skip
    if not checkpointing:
        raise ConfigError(f"train.offload.blocks={count} needs train.gradient_checkpointing=true: a block's weights "
                          "must not be kept for the backward pass, which recomputes the block")  # fmt: skip
    swap = BlockSwap(blocks[-count:], device)
    setattr(model, ATTRIBUTE, swap)
    held = swap.held_elsewhere() / 2**30
    logger.info("block swap: %d of %d blocks in CPU memory (%.2f GiB)", count, len(blocks), held)
    return swap


def settle(model: torch.nn.Module) -> None:
    """:meth:`BlockSwap.settle` of ``model``'s swapper, if it has one."""
    swap = getattr(model, ATTRIBUTE, None)
    if swap is not None:
        swap.settle()


def offloaded_bytes(model: torch.nn.Module, count: int, mode: str = "none") -> float:
    """What swapping the last ``count`` blocks of ``model`` takes off the device, as the estimate counts it: their
    frozen weights (held in ``mode``, from shapes) less the two largest, which visit at a time."""
    sizes = sorted(held_bytes(block, mode) for block in blocks_of(model)[-count:]) if count else []
    return sum(sizes[:-2]) if len(sizes) > 2 else 0.0
