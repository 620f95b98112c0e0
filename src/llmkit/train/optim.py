"""Optimizers (AdamW; Muon with AdamW) and the learning-rate schedules.

**Muon** (Jordan et al. 2024, "Muon: MomentUm Orthogonalized by Newton-Schulz", used by modded-nanogpt
and nanochat) optimises the 2-D weight matrices of the hidden layers: SGD with Nesterov momentum whose
update is replaced by the nearest semi-orthogonal matrix U V^T (from its SVD U S V^T), computed
approximately by a quintic Newton-Schulz iteration. Every direction of the update then moves by the
same amount, however skewed the gradient's spectrum. Embeddings (a lookup table indexed by one-hot
tokens, not a map between hidden spaces), the output head (empirically better with AdamW, Jordan et
al.), norm gains, biases and other vectors keep AdamW, as in the reference implementation.

We build on :class:`torch.optim.Muon` (its arguments, checks and state format) and replace only its
step, for one reason: a fused projection is orthogonalised per logical block. ``Attention.qkv`` stacks
the q, k and v matrices and a gated feed-forward's ``up`` stacks gate and up; orthogonalising the
stack would couple unrelated matrices and scale the update by the stack's shape. modded-nanogpt
orthogonalises q, k and v separately, the Moonlight authors (Liu et al. 2025) report that the split
trains better (NVIDIA/Megatron-LM#1428), nanochat keeps the matrices apart for this reason
(karpathy/nanochat#27), and on Tiny Shakespeare it gave 2.516 instead of 2.578 bits/byte (docs/train.md).

The update of a block with ``rows x cols`` entries is scaled by ``max(1, rows / cols) ** 0.5``
(Jordan et al.'s "original" rule, modded-nanogpt, ``adjust_lr_fn="original"`` in PyTorch), which keeps
its RMS per entry that of a square block's; the learning rate 0.02 of modded-nanogpt goes with it.
(Moonshot's alternative ``0.2 * max(rows, cols) ** 0.5`` matches AdamW's update RMS instead, so that
AdamW's learning rate can be reused.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmkit.model.config import GATED_ACTIVATIONS
from llmkit.model.transformer import Attention, FeedForward

# Jordan et al.'s quintic: a large slope at zero (3.4445) pulls small singular values up within 5 steps;
# they end in about [0.7, 1.2] rather than exactly 1, which trains no worse.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def adamw_groups(parameters: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying biases and norm gains pulls them towards zero for no
    regularisation benefit (GPT-3, nanoGPT)."""
    return [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8, fused: bool = True
) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over every trainable parameter."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    return _adamw(adamw_groups(parameters, weight_decay), lr, betas, eps, fused)


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float, fused: bool) -> torch.optim.AdamW:
    # fused: one kernel for the whole update instead of a Python loop over parameters (sharded FSDP
    # parameters take the multi-tensor foreach path instead).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **({"fused": True} if fused else {"foreach": True}))


def newton_schulz(
    matrices: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NEWTON_SCHULZ_COEFFICIENTS,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximately U V^T for each ``matrix`` = U S V^T of a (rows, cols) or (batch, rows, cols) tensor
    (Jordan et al. 2024).

    Dividing by the Frobenius norm, an upper bound of the spectral norm, puts every singular value in
    [0, 1]; each step maps the singular values through p(s) = a s + b s^3 + c s^5 and leaves the
    singular vectors alone. Works on the wide orientation so the Gram matrix is the smaller one. In
    bfloat16 on accelerators (as Jordan et al.); in float32 on the CPU, whose bfloat16 matrix products
    are slower than its float32 ones at these sizes."""
    a, b, c = coefficients
    x = matrices.to(torch.float32 if matrices.device.type == "cpu" else torch.bfloat16)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def update_scale(rows: int, cols: int, adjust_lr_fn: str | None) -> float:
    """Jordan et al.'s ``max(1, rows/cols)^0.5`` (PyTorch's "original", the default) or Moonshot's
    ``0.2 * max(rows, cols)^0.5`` ("match_rms_adamw")."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * max(rows, cols) ** 0.5
    return max(1.0, rows / cols) ** 0.5


class Muon(torch.optim.Muon):
    """:class:`torch.optim.Muon` whose param groups may carry ``blocks``: the row counts of the logical
    matrices stacked in each parameter of the group (q, k, v of a fused projection), orthogonalised and
    scaled one by one. Without ``blocks`` the update is torch.optim.Muon's."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            # Blocks of one shape are orthogonalised together, one batched iteration per shape: a small
            # model has dozens of small matrices, and one call each spends more time in dispatch than in
            # the products.
            by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                parameter.mul_(1 - lr * group["weight_decay"])  # decoupled, as AdamW's
                sizes = group.get("blocks") or [parameter.size(0)]
                for rows, block in zip(parameter.split(sizes), update.split(sizes)):
                    by_shape.setdefault(tuple(block.shape), []).append((rows, block))
            for (rows_count, cols_count), pairs in by_shape.items():
                scale = update_scale(rows_count, cols_count, group["adjust_lr_fn"])
                orthogonal = newton_schulz(
                    torch.stack([block for _, block in pairs]),
                    group["ns_steps"],
                    group["ns_coefficients"],
                    group["eps"],
                )
                for (rows, _), step in zip(pairs, orthogonal):
                    rows.add_(step.to(rows.dtype), alpha=-lr * scale)
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the hidden matrices and AdamW for everything else, presented as one optimizer: the
    trainer's schedule, gradient scaler, ``zero_grad`` and checkpoints see the groups of both (Muon's
    first) and a state dict in the standard layout.

    Optimizer.__init__ is not called: the groups and state belong to the two inner optimizers, and the
    views below always show their current ones (``load_state_dict`` replaces the inner group lists).
    """

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        self.defaults = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def step(self, closure=None):
        loss = self.muon.step(closure)  # evaluates the closure, if any, before either update
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        """Muon's entries, then AdamW's renumbered after them: what Optimizer.state_dict would give for
        the concatenated groups."""
        muon, adamw = self.muon.state_dict(), self.adamw.state_dict()
        offset = sum(len(group["params"]) for group in muon["param_groups"])
        state = {**muon["state"], **{index + offset: value for index, value in adamw["state"].items()}}
        groups = muon["param_groups"] + [
            {**group, "params": [index + offset for index in group["params"]]} for group in adamw["param_groups"]
        ]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Split by group: the first ``len(muon.param_groups)`` are Muon's. Parameter keys may be indices
        or the names that torch.distributed.checkpoint uses."""
        count = len(self.muon.param_groups)
        groups = state_dict["param_groups"]
        for optimizer, own_groups in ((self.muon, groups[:count]), (self.adamw, groups[count:])):
            keys = {key for group in own_groups for key in group["params"]}
            optimizer.load_state_dict(
                {
                    "state": {key: value for key, value in state_dict["state"].items() if key in keys},
                    "param_groups": own_groups,
                }
            )


def muon_groups(model: nn.Module) -> tuple[list[dict], list[nn.Parameter]]:
    """(Muon param groups, the parameters left to AdamW) of a :class:`~llmkit.model.Transformer`.

    Muon takes every trainable 2-D weight except the embeddings and the output head (tied or not);
    fused projections get a group with their ``blocks``. Groups without parameters are left out
    (torch.distributed.checkpoint refuses more than one empty group)."""
    excluded = {id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()}
    excluded.add(id(model.lm_head.weight))
    blocks: dict[int, tuple[int, ...]] = {}
    for module in model.modules():
        if isinstance(module, Attention):
            q, kv = module.n_head * module.head_dim, module.n_kv_head * module.head_dim
            blocks[id(module.qkv.weight)] = (q, kv, kv)
        elif isinstance(module, FeedForward) and module.activation in GATED_ACTIVATIONS:
            blocks[id(module.up.weight)] = (module.down.in_features,) * 2
    by_split: dict[tuple[int, ...] | None, list[nn.Parameter]] = {}
    adamw = []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.dim() == 2 and id(parameter) not in excluded:
            by_split.setdefault(blocks.get(id(parameter)), []).append(parameter)
        else:
            adamw.append(parameter)
    return [{"params": params, "blocks": list(split) if split else None} for split, params in by_split.items()], adamw


def build_muon(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    muon_lr: float,
    muon_momentum: float,
    muon_weight_decay: float,
    fused: bool = True,
) -> MuonAdamW:
    """Muon (Nesterov momentum, 5 Newton-Schulz steps) for the hidden matrices of ``model``, AdamW with
    ``lr`` and ``weight_decay`` for the rest."""
    groups, rest = muon_groups(model)
    muon = Muon(
        groups,
        lr=muon_lr,
        momentum=muon_momentum,
        weight_decay=muon_weight_decay,
        nesterov=True,
        adjust_lr_fn="original",
    )
    adamw = _adamw([group for group in adamw_groups(rest, weight_decay) if group["params"]], lr, betas, 1e-8, fused)
    return MuonAdamW(muon, adamw)


def learning_rate(
    step: int,
    budget_used: float | None,
    peak: float,
    warmup_steps: int,
    schedule: str,
    min_ratio: float,
    decay_fraction: float,
) -> float:
    """Linear warmup over ``warmup_steps``, then a function of ``budget_used``, the fraction (0..1) of the
    run's budget (steps, tokens or wall time, whichever ends first) already spent:
    - ``cosine``: half-cosine from the peak down to ``min_ratio * peak`` (GPT-3, Chinchilla);
    - ``wsd``: warmup-stable-decay, the peak until the last ``decay_fraction`` of the budget, then linear
      down to ``min_ratio * peak`` (Hu et al. 2024, MiniCPM): a run can be extended without restarting;
    - ``constant``: the peak (also whenever the budget is unknown).
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant" or budget_used is None:
        return peak
    used = min(max(budget_used, 0.0), 1.0)
    minimum = peak * min_ratio
    if schedule == "cosine":
        return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * used))
    decay_start = 1.0 - decay_fraction
    if used < decay_start:
        return peak
    return peak - (peak - minimum) * (used - decay_start) / decay_fraction
