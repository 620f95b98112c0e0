"""LoRA: low-rank adapters on the model's linear layers (Hu et al. 2022).

A frozen weight W (out, in) gets a trainable update of rank r: ``y = x W^T + b + (alpha/r) x A^T B^T``
with A (r, in) and B (out, r). B starts at zero, so the adapted model computes exactly what the base
model does until training moves it (Hu et al. §4.1); A starts like ``nn.Linear``'s weight (Kaiming
uniform, as Hugging Face PEFT does). Dropout acts on the adapter's input only (PEFT's ``lora_dropout``).
Dividing by r keeps the update's size steady when r changes, so alpha need not be retuned (§4.1).

:func:`apply_lora` freezes every base parameter and turns each targeted ``nn.Linear`` into a
:class:`LoRALinear`, which keeps the original ``weight`` and ``bias`` Parameters under their original
names: a LoRA model's state dict is the base state dict plus ``<module>.lora_A`` / ``<module>.lora_B``, so
the training loop's checkpoints and exact resume work unchanged, and the optimizer, which only takes
parameters that require gradients, trains the adapters alone. Targets are module-name suffixes of
:class:`~llmkit.model.Transformer`: ``qkv`` and ``out`` (attention), ``up`` and ``down`` (feed-forward,
every expert of a mixture too) and ``lm_head``. The default adapts all four block projections: Hu et
al. adapted only the query and value maps, but QLoRA (Dettmers et al. 2023, §4) found that adapting
every linear layer of the blocks is what matches full fine-tuning.

:func:`merge_lora` folds ``(alpha/r) B A`` into W and restores plain ``nn.Linear`` layers, so a merged
model is an ordinary :class:`~llmkit.model.Transformer`. :func:`save_adapters` writes the adapters alone
(``adapter_model.safetensors``) with ``adapter_config.json`` (rank, alpha, dropout, targets, and the
base model's config and checkpoint hash), which :func:`load_adapters` checks before applying them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from llmkit.config import check
from llmkit.errors import ConfigError, InputError, MismatchError
from llmkit.io import atomic_directory, atomic_write_json, read_json
from llmkit.model.checkpoint import weights_sha256
from llmkit.model.transformer import Transformer

TARGETS = ("qkv", "out", "up", "down", "lm_head")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class LoRAConfig:
    rank: int = field(default=0, metadata={"help": "LoRA rank r of the adapters; 0 = no adapters (full fine-tuning)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha: the adapter update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout on the adapters' input"})
    targets: list[str] = field(
        default_factory=lambda: ["qkv", "out", "up", "down"],
        metadata={"help": f"modules given adapters, among {', '.join(TARGETS)}"},
    )

    def __post_init__(self) -> None:
        check(self.rank >= 0, "rank", self.rank, "must be >= 0 (0 = no adapters)")
        check(self.alpha > 0, "alpha", self.alpha, "must be positive")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")
        check(len(self.targets) > 0, "targets", self.targets, f"name at least one of {', '.join(TARGETS)}")
        for target in self.targets:
            check(target in TARGETS, "targets", self.targets, f"{target!r} is not one of {', '.join(TARGETS)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class LoRALinear(nn.Linear):
    """A linear layer with a frozen weight and a trainable low-rank update (module docstring)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weight and bias are the wrapped layer's own
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.rank, self.alpha = rank, alpha
        options = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **options))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **options))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The update's second product accumulates into the frozen layer's output (addmm: base + scaling · down Bᵀ),
        # so the full-width update is never written, scaled and added in passes of its own, forward or backward
        # (the scaling then applies to rank-wide tensors only).
        base = super().forward(x)
        down = F.linear(self.lora_dropout(x), self.lora_A)
        rows = base.reshape(-1, self.out_features)
        return torch.addmm(rows, down.reshape(-1, self.rank), self.lora_B.t(), alpha=self.scaling).view(base.shape)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) B A, the adapter's change to the weight, computed in float32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def apply_lora(model: Transformer, config: LoRAConfig) -> Transformer:
    """Freeze ``model`` and give the linear layers named by ``config.targets`` adapters, in place.
    Outputs are unchanged until the adapters are trained (B = 0)."""
    check(config.enabled, "rank", config.rank, "must be positive to apply LoRA adapters")
    if lora_layers(model):
        raise ConfigError("rank", config.rank, "the model already has LoRA adapters; merge them first")
    check(
        not ("lm_head" in config.targets and model.config.tie_embeddings),
        "targets",
        config.targets,
        "lm_head shares its matrix with the token embedding (tie_embeddings): merging its adapter would change the "
        "embedding too",
    )
    targets = {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rpartition(".")[2] in config.targets
    }
    found = {name.rpartition(".")[2] for name in targets}
    check(
        found == set(config.targets),
        "targets",
        config.targets,
        f"the model has no linear layer named {sorted(set(config.targets) - found)}",
    )
    model.requires_grad_(False)
    for name, linear in targets.items():
        _replace(model, name, LoRALinear(linear, config.rank, config.alpha, config.dropout))
    return model


def lora_config_of(model: nn.Module) -> LoRAConfig | None:
    """The configuration the model's adapters were applied with, or None without adapters."""
    layers = lora_layers(model)
    if not layers:
        return None
    first = next(iter(layers.values()))
    targets = sorted({name.rpartition(".")[2] for name in layers}, key=TARGETS.index)
    return LoRAConfig(first.rank, first.alpha, first.lora_dropout.p, targets)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += (alpha/r) B A) and remove the adapters, in place; the
    model is an ordinary trainable model again."""
    for name, layer in lora_layers(model).items():
        layer.weight.copy_((layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype))
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        _replace(model, name, plain)
    return model.requires_grad_(True)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{part}": getattr(layer, part).detach().to("cpu").contiguous()
        for name, layer in lora_layers(model).items()
        for part in ("lora_A", "lora_B")
    }


def save_adapters(model: nn.Module, directory: str | Path, base_checkpoint: str | Path | None = None) -> Path:
    """Write the adapters alone and ``adapter_config.json`` into ``directory`` (atomically). The config
    records the base model's config and, when ``base_checkpoint`` (the checkpoint folder it was loaded
    from) is given, that folder and the sha256 of its weights."""
    config = lora_config_of(model)
    if config is None:
        raise ConfigError("rank", 0, "the model has no LoRA adapters to save")
    base = {"model": dataclasses.asdict(model.config)}
    if base_checkpoint is not None:
        base.update(
            checkpoint=str(Path(base_checkpoint).resolve()),
            sha256=weights_sha256(Path(base_checkpoint)),
        )
    directory = Path(directory)
    with atomic_directory(directory) as building:
        save_file(adapter_state(model), str(building / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(building / ADAPTER_CONFIG, {"lora": dataclasses.asdict(config), "base": base})
    return directory


def load_adapters(model: nn.Module, directory: str | Path, base_checkpoint: str | Path | None = None) -> nn.Module:
    """Apply the adapters saved in ``directory`` to ``model`` (in place). Refuses a model whose config
    differs from the base the adapters were trained on, and, when ``base_checkpoint`` is given and
    the adapters recorded one, base weights with another hash."""
    directory = Path(directory)
    saved = read_json(directory / ADAPTER_CONFIG)
    if "lora" not in saved or "base" not in saved:
        raise InputError(f"{directory / ADAPTER_CONFIG}: expected 'lora' and 'base' sections")
    for name, value in saved["base"]["model"].items():
        if getattr(model.config, name, None) != value:
            raise MismatchError(
                f"{directory / ADAPTER_CONFIG}: the adapters were trained on a model with {name}={value!r}, "
                f"this model has {getattr(model.config, name, None)!r}"
            )
    recorded = saved["base"].get("sha256")
    if base_checkpoint is not None and recorded is not None:
        actual = weights_sha256(Path(base_checkpoint))
        if actual != recorded:
            raise MismatchError(
                f"{directory / ADAPTER_CONFIG}: the adapters were trained on base weights with sha256 "
                f"{recorded[:12]}, {Path(base_checkpoint)} has {actual[:12]}"
            )
    apply_lora(model, LoRAConfig(**saved["lora"]))
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    expected = adapter_state(model)
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise MismatchError(
            f"{directory / ADAPTER_WEIGHTS}: adapters do not match {ADAPTER_CONFIG} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    layers = lora_layers(model)
    with torch.no_grad():
        for key, tensor in tensors.items():
            name, _, part = key.rpartition(".")
            getattr(layers[name], part).copy_(tensor)
    return model
