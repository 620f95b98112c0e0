"""``llmkit speedrun``: every stage on the embedded default corpus, ending in a report card.

tokenizer -> data -> pretrain -> sample generations -> post-training (SFT -> reward model -> GRPO or
PPO -> DPO on the embedded arithmetic task, :mod:`llmkit.align.posttrain`), each in its own folder under
``out``; each stage adds its section to ``out/report.md`` and ``out/report.json``. With ``--resume``
finished stages are kept and an interrupted one continues from its last checkpoint.

Post-training's budgets are step counts that take about 8 minutes on 2 CPU cores, next to the default
10 minutes of pretraining; a shorter pretraining scales them down in proportion (``--max-time 2m``
gives a fifth of them), so a quick run stays quick. ``--no-posttrain`` stops after the samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmkit.align.posttrain import PosttrainConfig, posttrain
from llmkit.config import check, parse_duration
from llmkit.data.pipeline import PipelineConfig, run_pipeline
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.infer import Engine, GenerationConfig
from llmkit.infer.engine import EngineConfig
from llmkit.model.checkpoint import LATEST
from llmkit.pretrain import ModelOverrides, PretrainConfig, pretrain
from llmkit.report import add_section
from llmkit.token_data import load_manifest
from llmkit.train.config import TrainConfig

DEFAULT_PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef ", 'class Stack:\n    """']
FULL_PRETRAINING_SECONDS = 600.0  # the pretraining time for which post-training gets its full budgets


@dataclass
class SpeedrunConfig:
    out: str = field(default="runs/speedrun", metadata={"help": "folder for every stage's output and the report card"})
    source: str = field(
        default="stdlib", metadata={"help": "corpus: 'stdlib' (embedded default) or a file/folder/.jsonl/.parquet"}
    )
    max_bytes: int | None = field(default=None, metadata={"help": "use at most this many bytes of the corpus"})
    val_fraction: float = field(
        default=0.03, metadata={"help": "fraction of documents held out for validation (and from tokenizer training)"}
    )
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary size"})
    preset: str = field(default="cpu-fast", metadata={"help": "model preset"})
    max_time: str = field(default="10m", metadata={"help": "pretraining wall-time budget"})
    max_steps: int | None = field(
        default=None, metadata={"help": "pretraining step budget (instead of or with max_time)"}
    )
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (of the AdamW groups under Muon)"})
    optimizer: Literal["adamw", "muon"] = field(
        default="muon", metadata={"help": "adamw, or muon (hidden matrices) + AdamW (the rest)"}
    )
    muon_lr: float = field(default=0.02, metadata={"help": "Muon's peak learning rate"})
    warmup_steps: int = field(default=50, metadata={"help": "learning-rate warmup steps"})
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto",
        metadata={
            "help": "training autocast dtype: auto (bfloat16 where the device multiplies faster in it), float32 or "
            "bfloat16"
        },
    )
    eval_interval: int = field(default=100, metadata={"help": "validate every this many steps"})
    samples: int = field(default=3, metadata={"help": "sample generations in the report"})
    posttrain: bool = field(
        default=True,
        metadata={"help": "continue with SFT -> reward model -> GRPO/PPO -> DPO on the embedded arithmetic task"},
    )
    rl: Literal["grpo", "ppo"] = field(default="grpo", metadata={"help": "the post-training RL stage"})
    posttrain_scale: float | None = field(
        default=None,
        metadata={"help": "multiplies the post-training step budgets (default: pretraining max_time / 10m, at most 1)"},
    )
    resume: bool = field(default=False, metadata={"help": "keep finished stages and resume an interrupted one"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        check(self.samples >= 0, "samples", self.samples, "must be >= 0")
        check(
            self.posttrain_scale is None or self.posttrain_scale > 0,
            "posttrain_scale",
            self.posttrain_scale,
            "must be positive",
        )
        try:
            parse_duration(self.max_time)
        except ValueError as error:
            check(False, "max_time", self.max_time, str(error))

    @property
    def scale(self) -> float:
        """The post-training budgets' multiplier: as given, else the pretraining time over the default 10 minutes."""
        if self.posttrain_scale is not None:
            return self.posttrain_scale
        seconds = parse_duration(self.max_time)
        return 1.0 if seconds is None else min(1.0, seconds / FULL_PRETRAINING_SECONDS)


def speedrun(config: SpeedrunConfig) -> dict:
    out = Path(config.out)
    started = time.perf_counter()
    summary: dict = {}

    tokenizer_directory = out / "tokenizer"
    if config.resume and (tokenizer_directory / "tokenizer.json").is_file():
        tokenizer_summary = {"reused": str(tokenizer_directory)}
    else:
        tokenizer_summary = train_tokenizer(
            TokenizerConfig(
                source=config.source,
                out=str(tokenizer_directory),
                vocab_size=config.vocab_size,
                max_bytes=config.max_bytes,
                held_out_fraction=config.val_fraction,
            )
        )
        add_section(
            out,
            "tokenizer",
            tokenizer_summary,
            "Byte-level BPE trained with Hugging Face `tokenizers`; compression measured on held-out documents.",
        )
    summary["tokenizer"] = tokenizer_summary

    data_directory = out / "data"
    if config.resume and (data_directory / "manifest.json").is_file():
        data_summary = load_manifest(data_directory)
    else:
        sources = [
            {"name": Path(name).name or name, "path": name, "max_bytes": config.max_bytes}
            for name in config.source.split(",")
        ]
        # The data pipeline's default steps (cleaning, language, Gopher and code filters, exact and
        # near-duplicate removal, PII masking) add its section, with plots, to this report card.
        run_pipeline(
            PipelineConfig(
                sources=sources,
                tokenizer=str(tokenizer_directory),
                out=str(data_directory),
                val_fraction=config.val_fraction,
                report=str(out),
            )
        )
        data_summary = load_manifest(data_directory)
    summary["data"] = _data_metrics(data_summary)

    model_directory = out / "base"
    train = TrainConfig(
        out=str(model_directory),
        batch_size=config.batch_size,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        optimizer=config.optimizer,
        muon_lr=config.muon_lr,
        max_time=config.max_time,
        max_steps=config.max_steps,
        dtype=config.dtype,
        eval_interval=config.eval_interval,
        resume=config.resume and (model_directory / LATEST).is_file(),
        progress=config.progress,
    )
    pretrain_summary = pretrain(
        PretrainConfig(data=str(data_directory), preset=config.preset, model=ModelOverrides(), train=train)
    )
    if pretrain_summary["interrupted"]:  # SIGINT/SIGTERM: pretraining saved a checkpoint, which --resume continues
        raise KeyboardInterrupt
    pretrain_metrics = {key: value for key, value in pretrain_summary.items() if key != "model"}
    add_section(
        out,
        "pretrain",
        pretrain_metrics,
        f"Preset `{config.preset}`: {pretrain_summary['parameters']:,} parameters. Validation loss in nats/token "
        f"and bits/byte (comparable across tokenizers).",
        images=["base/loss.png"],
    )
    summary["pretrain"] = pretrain_metrics

    engine = Engine.from_config(EngineConfig(checkpoint=str(model_directory)))
    generation = GenerationConfig(max_new_tokens=80, temperature=0.7, top_k=50, seed=0)
    completions = engine.generate(DEFAULT_PROMPTS[: config.samples], generation) if config.samples else []
    samples_text = "\n\n".join(
        f"```python\n{prompt}{completion.text}\n```" for prompt, completion in zip(DEFAULT_PROMPTS, completions)
    )
    add_section(out, "samples", {"prompts": len(completions), "temperature": 0.7, "top_k": 50}, samples_text)
    summary["samples"] = [prompt + completion.text for prompt, completion in zip(DEFAULT_PROMPTS, completions)]

    if config.posttrain:
        result = posttrain(
            PosttrainConfig(
                base=str(model_directory),
                out=str(out),
                report=str(out),
                rl=config.rl,
                scale=config.scale,
                dtype=config.dtype,
                resume=config.resume,
                progress=config.progress,
            )
        )
        summary["posttrain"] = {
            "table": result["table"],
            "rl_gain_over_sft": result["rl_gain_over_sft"],
            "seconds": result["seconds"],
        }

    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["report"] = str(out / "report.md")
    add_section(out, "speedrun", {"total_seconds": summary["seconds"]})
    return summary


def _data_metrics(manifest: dict) -> dict:
    splits = manifest["splits"]
    return {
        f"{split}_{key}": splits[split][key] for split in ("train", "val") for key in ("documents", "tokens", "bytes")
    }
