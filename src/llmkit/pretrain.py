"""``llmkit pretrain``: a token data directory in, a trained base model out."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llmkit.config import check
from llmkit.errors import ConfigError
from llmkit.model.config import PRESETS, ModelConfig, preset
from llmkit.model.transformer import Transformer
from llmkit.token_data import load_tokenizer
from llmkit.train.batches import TokenBatches
from llmkit.train.config import TrainConfig
from llmkit.train.objectives import OBJECTIVES, SpanCorruption, build_objective
from llmkit.train.trainer import Trainer

# Every ModelConfig field, optional: the ones given override the preset.
ModelOverrides = dataclasses.make_dataclass(
    "ModelOverrides",
    [
        (f.name, typing.Optional[typing.get_type_hints(ModelConfig)[f.name]], field(default=None, metadata=f.metadata))
        for f in dataclasses.fields(ModelConfig)
    ],
)


@dataclass
class PretrainConfig:
    data: str = field(default="runs/data", metadata={"help": "token data directory from `llmkit data prepare`"})
    preset: str = field(default="cpu-small", metadata={"help": f"model preset: {', '.join(PRESETS)}"})
    objective: Literal["causal", "prefix", "span"] = field(
        default="causal",
        metadata={"help": "causal LM, prefix LM (loss after a random prefix) or T5 span corruption (docs/train.md)"},
    )
    model: ModelOverrides = field(default_factory=ModelOverrides)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, "preset", self.preset, f"unknown preset; choose one of {', '.join(PRESETS)}")
        check(self.objective in OBJECTIVES, "objective", self.objective, f"choose one of {', '.join(OBJECTIVES)}")
        try:  # a bad field combination fails now, before any file is read
            model_config = build_model_config(self, vocab_size=1)
        except ConfigError as error:
            raise ConfigError(f"model.{error.field}", error.value, error.reason) from None
        if self.objective == "span":
            SpanCorruption.layout(model_config.context_length)
            check(
                self.train.target_val_bpb is None,
                "train.target_val_bpb",
                self.train.target_val_bpb,
                "span corruption reports no bits per byte; use objective causal or prefix",
            )


def build_model_config(config: PretrainConfig, vocab_size: int) -> ModelConfig:
    overrides = {key: value for key, value in dataclasses.asdict(config.model).items() if value is not None}
    if overrides.get("vocab_size", vocab_size) < vocab_size:
        raise ConfigError(
            "vocab_size", overrides["vocab_size"], f"smaller than the tokenizer's vocabulary ({vocab_size})"
        )
    overrides.setdefault("vocab_size", vocab_size)
    return preset(config.preset, **overrides)


def pretrain(config: PretrainConfig) -> dict:
    """Train a model from scratch (or resume) on a prepared data directory; returns the run summary."""
    tokenizer = load_tokenizer(config.data)
    model_config = build_model_config(config, tokenizer.vocab_size)
    train = config.train
    # Same seed on every rank: FSDP shards each rank's own initialisation, so all must build the same model.
    torch.manual_seed(train.seed)
    model = Transformer(model_config)
    (train_batches, loss_fn), (val_batches, _) = [
        build_objective(
            config.objective,
            TokenBatches(config.data, split, train.batch_size, model_config.context_length, seed=train.seed),
            tokenizer,
            model_config.context_length,
            train.seed,
        )
        for split in ("train", "val")
    ]
    metadata = {
        "stage": "pretrain",
        "stage_config": dataclasses.asdict(config),
        "tokenizer_sha256": tokenizer.sha256,
        "data": str(Path(config.data).resolve()),
    }
    summary = Trainer(
        model, train_batches, train, val_batches=val_batches, loss_fn=loss_fn, tokenizer=tokenizer, metadata=metadata
    ).run()
    return {
        "preset": config.preset,
        "objective": config.objective,
        "model": dataclasses.asdict(model_config),
        **summary,
    }
