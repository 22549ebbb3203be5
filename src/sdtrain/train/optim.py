"""Optimizers (AdamW, 8-bit AdamW, Adafactor, Muon) with decay only where it belongs; the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sdtrain.config import ConfigError, OptimConfig
from sdtrain.errors import MissingPackage


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
    muon: bool = False,
    skip: tuple[str, ...] = (),
    muon_scale: float = 1.0,
) -> list[dict]:
    """Two groups: matrices and convolution kernels decay; norms, biases and embeddings' 1-d params do not; and two
    more for the parameters whose ``lr_scale(name)`` is not 1 (text encoders at their own learning rate), whose
    ``lr_scale`` key :func:`set_lr` reads. With ``muon``, the matrices of the denoiser's blocks
    (:func:`is_hidden_matrix`) are groups of their own, marked ``muon``, but for those of the modules named in
    ``skip`` (a part of the parameter's dotted name), their ``lr_scale`` times ``muon_scale``. A group with no
    parameters (LoRA trains matrices only) is left out, as DeepSpeed leaves it out: the optimizer state has the same
    layout under every strategy."""
    matrices = matrix_names(model)
    groups: dict[tuple[float, bool, bool], list] = {(1.0, True, False): [], (1.0, False, False): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        hidden = muon and is_hidden_matrix(name, matrices) and not set(skip) & set(name.split("."))
        scale = (lr_scale(name) if lr_scale else 1.0) * (muon_scale if hidden else 1.0)
        groups.setdefault((scale, param.ndim >= 2, hidden), []).append(param)
    made = []
    for (scale, decays, hidden), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        made.append(group | ({"lr_scale": scale} if scale != 1.0 else {}) | ({"muon": True} if hidden else {}))
    return [g for g in made if g["params"]]


def make_optimizer(
    model: torch.nn.Module, config: OptimConfig, lr_scale: Callable[[str], float] | None = None
) -> torch.optim.Optimizer:
    """The optimizer of ``config.name`` over the trainable parameters, without decay on norms and biases.

    - ``adamw``: torch's fused AdamW (one kernel for all parameters, CUDA and CPU);
    - ``adamw8bit``: bitsandbytes' 8-bit AdamW (optimizer state in 2 instead of 8 bytes per parameter);
    - ``adafactor``: transformers' Adafactor with factored second moments, stepped at ``lr`` (the schedule here
      sets it, so its own relative-step schedule is off);
    - ``muon``: :class:`Muon` for the matrices and kernels of the denoiser's blocks, AdamW for the rest.

    ``lr_scale(name)``: a parameter's learning rate over ``config.lr`` (default 1 for all).
    """
    muon = config.name == "muon"
    muon_scale = config.muon_lr / config.lr if muon and config.muon_lr is not None else 1.0
    groups = param_groups(model, config.weight_decay, lr_scale, muon, tuple(config.muon_skip), muon_scale)
    if muon:
        check_muon_skip(model, config)
        return Muon(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, momentum=config.momentum)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=True)
    if config.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise MissingPackage("train.optim.name=adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=config.lr, beta1=None, relative_step=False, scale_parameter=False, warmup_init=False)


def check_muon_skip(model: torch.nn.Module, config: OptimConfig) -> None:
    """Refuse a ``train.optim.muon_skip`` name under which ``model`` has no matrix that Muon would step."""
    matrices = matrix_names(model)
    parts = {part for name in matrices if is_hidden_matrix(name, matrices) for part in name.split(".")}
    if unknown := sorted(set(config.muon_skip) - parts):
        raise ConfigError(f"train.optim.muon_skip: no matrix that Muon steps in this {type(model).__name__} lies in "
                          f"a module named {unknown} (a name is a part of a parameter's dotted name, "
                          "e.g. attn2)")  # fmt: skip


def matrix_names(model: torch.nn.Module) -> set[str]:
    """The parameter names of the weights of ``model``'s linear and convolution layers."""
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return {f"{name}.weight".lstrip(".") for name, module in model.named_modules() if isinstance(module, layers)}


def is_hidden_matrix(name: str, matrices: set[str]) -> bool:
    """Whether Muon steps the parameter ``name``: the weight of a linear or convolution layer (``matrices``: their
    names) inside the denoiser's stack of blocks (a UNet's ``down_blocks`` / ``mid_block`` / ``up_blocks``, a
    transformer's ``transformer_blocks`` / ``single_transformer_blocks``: the first two parts of ``name``, a
    wrapper's prefix first, name a block). The layers that read the latent and write the prediction, the timestep
    and pooled-prompt embeddings (small square matrices applied once a sample, whose orthogonalisation would cost
    more than their forward), modulation tables, norms and biases step with AdamW, as Muon's authors keep a network's
    embeddings and head on AdamW."""
    return name in matrices and any("block" in part for part in name.split(".")[:2])


def orthogonalise(matrices: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrices to ``matrices`` (``(..., rows, columns)``: a batch of them), by the
    quintic Newton-Schulz iteration of Muon (Jordan et al., 2024; the coefficients maximise the slope at zero, so the
    singular values land in about [0.7, 1.2] rather than at 1), in fp32 so that every device computes the same.

    Each iteration is ``X <- (a + b G + c G^2) X`` with ``G = X X^T`` over the short side (``m`` rows of ``n``).
    The polynomial commutes with ``G``, so for a wide matrix the iteration runs on the short side's square matrices
    alone (``G <- Q^2 G``, the product of the ``Q`` kept) and ``X`` is multiplied once at each end: ``2 m^2 n + 4 m^3``
    a step against ``2 m^2 n + m^3`` (for a 3 x 3 kernel of 128 channels, 128 x 1152, a fifth of the work), the same
    result to 1e-6; a matrix near square iterates on ``X``. Each polynomial is two fused ``baddbmm`` products, not
    products and sums apart (64 matrices of 192 x 192 took 0.72 s and take 0.53 on one thread of an AMD EPYC).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrices.float()
    tall = x.shape[-2] > x.shape[-1]
    x = x.mT if tall else x
    batch = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])  # baddbmm: one batch dimension
    x = flush(x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7))
    m, n = x.shape[-2:]
    if steps * (2 * m * m * n + m**3) <= 2 * m * m * n + 4 * steps * m**3:
        for _ in range(steps):
            gram = flush(x @ x.mT)
            x = flush(torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a))
    else:
        gram = flush(x @ x.mT)
        product = None
        for _ in range(steps):
            step = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            step.diagonal(dim1=-2, dim2=-1).add_(a)
            step = flush(step)
            product, gram = step if product is None else flush(step @ product), flush(step @ step @ gram)
        x = product @ x
    x = x.reshape(*batch, *x.shape[-2:])
    return x.mT if tall else x


def flush(x: torch.Tensor) -> torch.Tensor:
    """``x`` with entries of magnitude 1e-15 or less set to zero, in one pass (``hardshrink``). The iteration's
    matrices are of order one, so such entries change nothing at fp32's precision, but their products are subnormal
    numbers, which x86 CPUs compute a hundred times slower: on a tiny UNet's gradients Muon's steps took seconds."""
    return torch.nn.functional.hardshrink(x, 1e-15)


class Muon(torch.optim.Optimizer):
    """Muon for the matrices and kernels of the denoiser's blocks, AdamW for the rest: one optimizer, one state.

    A group with ``muon=True`` steps each parameter by its Nesterov momentum orthogonalised (:func:`orthogonalise`,
    a kernel as its output rows; the matrices of one shape as one batch), scaled by 0.2 sqrt(max(rows, columns)) so
    that its RMS is AdamW's (Moonshot's "Muon is scalable", 2025): the learning rate and weight decay tuned for AdamW
    carry over. The other groups step as AdamW with ``betas``.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, momentum: float):
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "momentum": momentum, "muon": False})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            lr, decay = group["lr"], group["weight_decay"]
            if params and decay:
                torch._foreach_mul_(params, 1 - lr * decay)
            (self._muon if group["muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        if not params:
            return
        buffers = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        grads = [p.grad for p in params]
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, grads)
        nesterovs = torch._foreach_add(grads, buffers, alpha=group["momentum"])
        by_shape: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for p, nesterov in zip(params, nesterovs, strict=True):
            same = by_shape.setdefault((p.shape[0], nesterov[0].numel(), p.dtype), ([], []))
            same[0].append(p)
            same[1].append(nesterov.reshape(p.shape[0], -1))
        for (rows, columns, _), (same, updates) in by_shape.items():
            orthogonal = orthogonalise(torch.stack(updates)).to(same[0].dtype)
            scale = -group["lr"] * 0.2 * math.sqrt(max(rows, columns))
            torch._foreach_add_(
                same, [update.reshape(p.shape) for p, update in zip(same, orthogonal, strict=True)], alpha=scale
            )

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        if not params:
            return
        counts = [self.state[p]["step"] for p in params]
        torch._foreach_add_(counts, 1)
        by_step: dict[float, list[torch.Tensor]] = {}  # one step count for all, unless a parameter missed a step
        for p, step in zip(params, torch.stack(counts).tolist(), strict=True):
            by_step.setdefault(step, []).append(p)
        for step, same in by_step.items():
            grads = [p.grad for p in same]
            averages = [self.state[p]["exp_avg"] for p in same]
            squares = [self.state[p]["exp_avg_sq"] for p in same]
            torch._foreach_lerp_(averages, grads, 1 - beta1)
            torch._foreach_mul_(squares, beta2)
            torch._foreach_addcmul_(squares, grads, grads, value=1 - beta2)
            denominators = torch._foreach_div(squares, 1 - beta2**step)
            torch._foreach_sqrt_(denominators)
            torch._foreach_add_(denominators, group["eps"])
            torch._foreach_addcdiv_(same, averages, denominators, value=-group["lr"] / (1 - beta1**step))


def lr_factor(step: int, progress: float, config: OptimConfig, warmup_share: float = 0.0) -> float:
    """Multiplier of the peak lr: linear warm-up over ``warmup_steps``, then constant, cosine or linear decay to
    ``min_lr_ratio`` over the rest of the run, as ``progress`` (the share of the run done, by steps or by time budget)
    goes from ``warmup_share`` (the share the warm-up takes: ``warmup_steps / num_steps``) to 1. The decay starts at
    the peak where the warm-up ends, as diffusers' and transformers' schedules do (by steps: exactly
    ``get_cosine_schedule_with_warmup``'s, with its floor); a run that a time budget ends before its steps can be a
    little past ``warmup_share`` when its warm-up ends.

    The lr is a pure function of (step, progress), so there is no schedule state to checkpoint.
    """
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decayed = (progress - warmup_share) / (1.0 - warmup_share) if warmup_share < 1.0 else 1.0
    decayed = min(1.0, max(0.0, decayed))
    shape = 0.5 * (1 + math.cos(math.pi * decayed)) if config.schedule == "cosine" else 1.0 - decayed
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


def warmup_times_cosine(step: int, progress: float, warmup_steps: int = 100, min_ratio: float = 0.1) -> float:
    """Stage 1's multiplier of the peak lr: a linear warm-up over ``warmup_steps`` times a cosine decay to
    ``min_ratio`` as ``progress`` goes from 0 to 1 (both at once, where :func:`lr_factor` decays after warming up)."""
    warmup = min(1.0, (step + 1) / warmup_steps)
    return warmup * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate: ``lr`` times the group's ``lr_scale`` (1 unless set)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
