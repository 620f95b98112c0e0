"""``llmkit ablate``: train variants of one model side by side on the same data, budget and seeds.

An ablation is a base preset and a list of named variants, each a set of
:class:`~llmkit.model.config.ModelConfig` overrides (``norm_placement: post``, ``moe_experts: 4``) and
optionally :class:`~llmkit.train.config.TrainConfig` overrides (``lr``, an optimizer). The first variant
is the baseline every other is compared with. Every run goes through the one training loop,
``pretrain(PretrainConfig(...))``, with the same data, the same seed (so the same initialisation
stream and data order) and the same budget:

* ``max_tokens``: every variant sees that many training tokens;
* ``max_flops``: the budget is converted per variant into tokens, ``max_flops / flops_per_token``
  with :meth:`~llmkit.model.transformer.Transformer.flops_per_token` (``6·N + 12·l·d·T``, N the
  non-embedding weights a token passes through, so a Mixture-of-Experts counts its active experts).
  A cheaper variant then sees more tokens, which is the fair comparison at equal compute
  (Kaplan et al. 2020 §6; Hoffmann et al. 2022).

Either budget is rounded to whole optimizer steps, so the learning-rate schedule ends exactly at it.
Validation runs about ``EVAL_POINTS`` times per run (``eval_interval``), enough for the curves.

With ``repeats`` (global or per variant) a variant is trained with seeds ``seed, seed+1, ...``; the
table shows the mean ± sample standard deviation, and the seed noise σ pooled over every variant
with more than one seed gives each difference from the baseline a ``Δ/σ`` score
(``Δ / (σ·√(1/n + 1/n_baseline))``, the two-sample z): beyond about 2 a difference exceeds seed noise.

Files: ``out/runs/<variant>/seed_<seed>/`` is each run's directory (checkpoints, ``metrics.csv``,
``plan.json`` written when it starts and ``result.json`` written atomically when it ends);
``out/ablation.md`` (the table), ``out/ablation.json`` (every number, per-seed runs and curves) and
``out/ablation.png`` (validation bits/byte against tokens and against wall time).

Resuming: a rerun skips every run whose ``result.json`` exists and continues an interrupted one from
its last checkpoint. A run directory whose recorded config differs from the current one for that
variant (a changed override, budget, preset or data) is *refused* with an error naming the variant and
the field: results of two different experiments never end up in one table under one name. Delete
the folder or give the variant a new name.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from llmkit.config import build, check
from llmkit.errors import ConfigError
from llmkit.figures import pyplot, save_figure
from llmkit.io import atomic_write_json, atomic_write_text, read_json
from llmkit.model.checkpoint import LATEST
from llmkit.model.config import PRESETS, ModelConfig
from llmkit.model.moe import MixtureOfExperts
from llmkit.model.transformer import Transformer
from llmkit.pretrain import ModelOverrides, PretrainConfig, build_model_config, pretrain
from llmkit.token_data import load_tokenizer
from llmkit.train.config import DTYPE_HELP, TrainConfig

EVAL_POINTS = 20
# What every variant must share for the comparison to mean anything, or what ablate itself sets.
RESERVED_TRAIN_FIELDS = (
    "out",
    "resume",
    "progress",
    "seed",
    "max_steps",
    "max_tokens",
    "max_time",
    "target_val_bpb",
    "eval_batches",
)
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class Variant:
    name: str = field(metadata={"help": "names the row and the run folder: letters, digits, '.', '_', '-'"})
    model: dict = field(default_factory=dict, metadata={"help": "ModelConfig overrides on the base preset"})
    train: dict = field(
        default_factory=dict, metadata={"help": "TrainConfig overrides (not the budget, seed or evaluation set)"}
    )
    repeats: int | None = field(
        default=None, metadata={"help": "seeds for this variant (default: the ablation's repeats)"}
    )

    def __post_init__(self) -> None:
        check(
            isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9._-]+", self.name) is not None,
            "variants.name",
            self.name,
            "a variant name must be letters, digits, '.', '_' or '-' (it names a folder)",
        )
        for section in ("model", "train"):
            check(
                isinstance(getattr(self, section), dict),
                f"variants[{self.name}].{section}",
                getattr(self, section),
                "expected a mapping of field: value",
            )
        for name in RESERVED_TRAIN_FIELDS:
            check(
                name not in self.train,
                f"variants[{self.name}].train.{name}",
                self.train.get(name),
                "shared by every variant; set it for the whole ablation",
            )
        check(
            self.repeats is None or (isinstance(self.repeats, int) and self.repeats >= 1),
            f"variants[{self.name}].repeats",
            self.repeats,
            "must be a positive whole number",
        )


def parse_variant(item) -> Variant:
    """A variant from YAML (``{name, model: {...}, train: {...}, repeats}``), from the command line's
    compact form (``name`` or ``name:key=value key=value``, each key a ModelConfig or TrainConfig field
    or ``repeats``), or as is."""
    if isinstance(item, Variant):
        return item
    if isinstance(item, str):
        return _compact_variant(item)
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(
            "variants", item, "each variant is {name, model: {...}, train: {...}} or 'name:key=value ...'"
        )
    unknown = sorted(set(item) - {f.name for f in dataclasses.fields(Variant)})
    if unknown:
        raise ConfigError(
            f"variants[{item['name']}].{unknown[0]}",
            item[unknown[0]],
            "unknown; a variant has name, model, train, repeats",
        )
    return Variant(**item)


def _compact_variant(text: str) -> Variant:
    name, _, settings = text.partition(":")
    name = name.strip()
    model, train, repeats = {}, {}, None
    for pair in settings.split():
        key, equals, value = pair.partition("=")
        if not equals:
            raise ConfigError(f"variants[{name}]", pair, "expected key=value")
        if key == "repeats":
            repeats = int(value) if value.isdigit() else value
        elif key in MODEL_FIELDS:
            model[key] = value
        elif key in TRAIN_FIELDS:
            train[key] = value
        else:
            raise ConfigError(f"variants[{name}].{key}", value, "neither a ModelConfig nor a TrainConfig field")
    return Variant(name=name, model=model, train=train, repeats=repeats)


@dataclass
class AblateConfig:
    data: str = field(default="runs/data", metadata={"help": "token data directory from `llmkit data prepare`"})
    out: str = field(
        default="runs/ablate", metadata={"help": "folder for the runs, ablation.md, ablation.json and ablation.png"}
    )
    preset: str = field(default="baby-gpt", metadata={"help": f"base model preset: {', '.join(PRESETS)}"})
    variants: list = field(
        default_factory=list,
        metadata={
            "help": "variants, the first is the baseline; YAML: a list of {name, model: {...}, train: {...}, repeats}; "
            "flag: comma-separated 'name:key=value key=value'"
        },
    )
    max_tokens: int | None = field(default=None, metadata={"help": "budget: training tokens per variant"})
    max_flops: float | None = field(
        default=None, metadata={"help": "budget: training FLOPs per variant (converted to tokens per variant)"}
    )
    batch_size: int = field(default=32, metadata={"help": "sequences per micro-batch"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    eval_interval: int | None = field(
        default=None, metadata={"help": f"validate every this many steps (default: about {EVAL_POINTS} times per run)"}
    )
    eval_batches: int = field(
        default=20, metadata={"help": "validation batches per evaluation (the same set for every variant)"}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": DTYPE_HELP},
    )
    seed: int = field(default=1337, metadata={"help": "seed of every variant's initialisation and data order"})
    repeats: int = field(
        default=1, metadata={"help": "seeds per variant (seed, seed+1, ...); a variant may set its own"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, "preset", self.preset, f"unknown preset; choose one of {', '.join(PRESETS)}")
        check(
            (self.max_tokens is None) != (self.max_flops is None),
            "max_tokens",
            self.max_tokens,
            "give exactly one budget: max_tokens or max_flops",
        )
        check(self.max_flops is None or self.max_flops > 0, "max_flops", self.max_flops, "must be positive")
        check(self.repeats >= 1, "repeats", self.repeats, "must be at least 1")
        check(
            self.eval_interval is None or self.eval_interval >= 1,
            "eval_interval",
            self.eval_interval,
            "must be at least 1",
        )
        self.variants = [parse_variant(item) for item in self.variants]
        check(bool(self.variants), "variants", self.variants, "give at least one variant (the first is the baseline)")
        names = [variant.name for variant in self.variants]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        check(duplicate is None, "variants", duplicate, "two variants have this name")
        for variant in self.variants:
            variant_config(self, variant, self.seed)  # a bad override fails now, naming its variant


def variant_config(config: AblateConfig, variant: Variant, seed: int) -> PretrainConfig:
    """The pretraining config of one run, without its budget; a bad override raises naming the variant."""
    shared = dict(
        batch_size=config.batch_size,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        eval_batches=config.eval_batches,
        dtype=config.dtype,
        device=config.device,
        progress=config.progress,
        keep_last=1,
        seed=seed,
        out=str(Path(config.out) / "runs" / variant.name / f"seed_{seed}"),
    )
    source = f"variant '{variant.name}'"
    model = _naming(variant, "model.", lambda: build(ModelOverrides, variant.model, source=source))
    train = _naming(variant, "train.", lambda: build(TrainConfig, {**shared, **variant.train}, source=source))
    # PretrainConfig names the section of what it refuses itself (model.n_embd).
    return _naming(
        variant, "", lambda: PretrainConfig(data=config.data, preset=config.preset, model=model, train=train)
    )


def _naming(variant: Variant, section: str, make):
    try:
        return make()
    except ConfigError as error:
        raise ConfigError(f"variants[{variant.name}].{section}{error.field}", error.value, error.reason) from None


@dataclass
class PlannedRun:
    variant: Variant
    seed: int
    config: PretrainConfig  # budget and evaluation interval filled in
    parameters: int
    non_embedding_parameters: int
    active_non_embedding_parameters: int
    flops_per_token: float

    @property
    def directory(self) -> Path:
        return Path(self.config.train.out)


def count_parameters(model_config: ModelConfig) -> tuple[int, int, int, float]:
    """(total, non-embedding, active non-embedding parameters, training FLOPs per token), built on the meta device.

    Active: a Mixture-of-Experts layer runs ``top_k`` of its ``n`` experts per token, so
    ``(n - top_k) / n`` of its expert weights are idle for any one token (Fedus et al. 2022)."""
    with torch.device("meta"):
        network = Transformer(model_config)
    non_embedding = network.num_parameters(exclude_embeddings=True)
    idle = sum(
        (layer.n_experts - layer.top_k) * sum(p.numel() for p in layer.experts.parameters()) // layer.n_experts
        for layer in network.modules()
        if isinstance(layer, MixtureOfExperts)
    )
    return network.num_parameters(), non_embedding, non_embedding - idle, network.flops_per_token()


def plan_runs(config: AblateConfig, vocab_size: int) -> list[PlannedRun]:
    """Every (variant, seed) run with its budget converted to whole optimizer steps."""
    runs = []
    for variant in config.variants:
        for repeat in range(variant.repeats or config.repeats):
            pretrain_config = variant_config(config, variant, config.seed + repeat)
            model_config = build_model_config(pretrain_config, vocab_size)
            total, non_embedding, active, flops_per_token = count_parameters(model_config)
            train = pretrain_config.train
            tokens_per_step = train.batch_size * train.grad_accum * model_config.context_length
            budget_tokens = config.max_tokens if config.max_tokens else config.max_flops / flops_per_token
            steps = max(1, round(budget_tokens / tokens_per_step))
            train = dataclasses.replace(
                train,
                max_tokens=steps * tokens_per_step,
                eval_interval=config.eval_interval or max(1, steps // EVAL_POINTS),
            )
            runs.append(
                PlannedRun(
                    variant,
                    config.seed + repeat,
                    dataclasses.replace(pretrain_config, train=train),
                    total,
                    non_embedding,
                    active,
                    flops_per_token,
                )
            )
    return runs


# ------------------------------------------------------------------------------------------- running
def _fingerprint(run: PlannedRun, vocab_size: int) -> dict:
    """What makes two runs the same experiment: data, objective, the resolved model and training configs."""
    train = {
        key: value
        for key, value in dataclasses.asdict(run.config.train).items()
        if key not in ("out", "resume", "progress")
    }
    model = dataclasses.asdict(build_model_config(run.config, vocab_size))
    return json.loads(
        json.dumps(
            {
                "data": str(Path(run.config.data).resolve()),
                "objective": run.config.objective,
                "model": model,
                "train": train,
            }
        )
    )


def _first_difference(old: dict, new: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """The first differing key in field order (so a changed budget is named before the values derived from it)."""
    for key in [*new, *(key for key in old if key not in new)]:
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            found = _first_difference(before, after, f"{prefix}{key}.")
            if found:
                return found
        elif before != after:
            return f"{prefix}{key}", before, after
    return None


def read_curve(directory: Path) -> tuple[list[dict], float]:
    """Validation points (tokens, elapsed_s, val_loss, val_bpb) from a run's metrics.csv, and its training
    throughput: logged windows of tokens_per_s exclude the time spent validating."""
    with open(directory / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    points: dict[int, dict] = {}
    for row in rows:
        if row["val_loss"]:
            points[int(row["tokens"])] = {
                "tokens": int(row["tokens"]),
                "elapsed_s": float(row["elapsed_s"]),
                "val_loss": float(row["val_loss"]),
                "val_bpb": float(row["val_bpb"]) if row["val_bpb"] else None,
            }
    tokens, seconds, previous = 0, 0.0, 0
    for row in rows:
        if row["tokens_per_s"]:
            window = int(row["tokens"]) - previous
            tokens, seconds, previous = (
                tokens + window,
                seconds + window / max(float(row["tokens_per_s"]), 1e-9),
                int(row["tokens"]),
            )
    return sorted(points.values(), key=lambda point: point["tokens"]), tokens / seconds if seconds else 0.0


def train_run(run: PlannedRun, vocab_size: int) -> dict:
    """Train one (variant, seed), or return its recorded result; a changed config for it is refused."""
    fingerprint = _fingerprint(run, vocab_size)
    result_path, plan_path = run.directory / "result.json", run.directory / "plan.json"
    for path in (result_path, plan_path):
        if path.is_file():
            difference = _first_difference(read_json(path)["config"], fingerprint)
            if difference:
                key, before, after = difference
                raise ConfigError(
                    f"variants[{run.variant.name}].{key}",
                    after,
                    f"{run.directory} holds a run of this variant with {before!r}; "
                    "delete that folder or give the variant a new name",
                )
    if result_path.is_file():
        return read_json(result_path)
    atomic_write_json(plan_path, {"config": fingerprint})
    resume = (run.directory / LATEST).is_file()  # an interrupted run continues where it stopped
    summary = pretrain(dataclasses.replace(run.config, train=dataclasses.replace(run.config.train, resume=resume)))
    if summary["interrupted"]:  # Ctrl-C: the trainer saved a checkpoint; the next run of the command resumes it
        raise KeyboardInterrupt
    curve, tokens_per_s = read_curve(run.directory)
    result = {
        "variant": run.variant.name,
        "seed": run.seed,
        "parameters": run.parameters,
        "non_embedding_parameters": run.non_embedding_parameters,
        "active_non_embedding_parameters": run.active_non_embedding_parameters,
        "flops_per_token": run.flops_per_token,
        "tokens": summary["tokens"],
        "flops": run.flops_per_token * summary["tokens"],
        "steps": summary["steps"],
        "seconds": summary["seconds"],
        "tokens_per_s": round(tokens_per_s, 1),
        "val_loss": summary["val_loss"],
        "val_bpb": summary["val_bpb"],
        "curve": curve,
        "config": fingerprint,
    }
    atomic_write_json(result_path, result)
    return result


# --------------------------------------------------------------------------------------- summarising
def _mean_and_spread(values: list[float | None]) -> tuple[float | None, float | None]:
    if any(value is None for value in values):
        return None, None
    return round(statistics.fmean(values), 5), (round(statistics.stdev(values), 5) if len(values) > 1 else None)


def summarise(config: AblateConfig, results: list[dict]) -> dict:
    """One row per variant (means over seeds), the pooled seed noise and each variant's difference from the baseline."""
    rows = []
    for variant in config.variants:
        runs = [result for result in results if result["variant"] == variant.name]
        first = runs[0]
        val_loss, val_loss_std = _mean_and_spread([run["val_loss"] for run in runs])
        val_bpb, val_bpb_std = _mean_and_spread([run["val_bpb"] for run in runs])
        rows.append(
            {
                "name": variant.name,
                "model": variant.model,
                "train": variant.train,
                "seeds": [run["seed"] for run in runs],
                **{
                    key: first[key]
                    for key in (
                        "parameters",
                        "non_embedding_parameters",
                        "active_non_embedding_parameters",
                        "flops_per_token",
                        "tokens",
                        "flops",
                    )
                },
                "seconds": round(statistics.fmean(run["seconds"] for run in runs), 2),
                "tokens_per_s": round(statistics.fmean(run["tokens_per_s"] for run in runs), 1),
                "val_loss": val_loss,
                "val_loss_std": val_loss_std,
                "val_bpb": val_bpb,
                "val_bpb_std": val_bpb_std,
                "runs": runs,
            }
        )
    # Pooled sample variance of every variant trained with more than one seed.
    spread = [(len(row["runs"]) - 1, row["val_bpb_std"]) for row in rows if row["val_bpb_std"] is not None]
    noise = (
        round(math.sqrt(sum(dof * std**2 for dof, std in spread) / sum(dof for dof, _ in spread)), 5)
        if spread
        else None
    )
    baseline = rows[0]
    for row in rows:
        for metric in ("val_loss", "val_bpb"):
            known = row[metric] is not None and baseline[metric] is not None
            row[f"delta_{metric}"] = round(row[metric] - baseline[metric], 5) if known else None
        row["delta_over_noise"] = None
        if noise and row is not baseline and row["delta_val_bpb"] is not None:
            row["delta_over_noise"] = round(
                row["delta_val_bpb"] / (noise * math.sqrt(1 / len(row["runs"]) + 1 / len(baseline["runs"]))), 2
            )
    budget = {"max_tokens": config.max_tokens} if config.max_tokens else {"max_flops": config.max_flops}
    return {
        "preset": config.preset,
        "data": str(Path(config.data).resolve()),
        "budget": budget,
        "seed_noise_val_bpb": noise,
        "config": dataclasses.asdict(config),
        "variants": rows,
    }


def _number(value: float | None, digits: int = 4, spread: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def format_ablation(summary: dict) -> str:
    """The Markdown table of an ablation summary, with the notes that say how to read it."""
    lines = [
        "| variant | seeds | parameters | non-embedding | tokens | FLOPs | wall s | tokens/s | val loss | val bpb | "
        "Δ bpb | Δ/σ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["variants"]:
        non_embedding = f"{row['non_embedding_parameters']:,}"
        if row["active_non_embedding_parameters"] != row["non_embedding_parameters"]:
            non_embedding += f" ({row['active_non_embedding_parameters']:,} active)"
        delta = "—" if row["delta_val_bpb"] is None else f"{row['delta_val_bpb']:+.4f}"
        lines.append(
            f"| {row['name']} | {len(row['seeds'])} | {row['parameters']:,} | {non_embedding} | {row['tokens']:,} | "
            f"{row['flops']:.3e} | {row['seconds']:.1f} | {row['tokens_per_s']:,.0f} | "
            f"{_number(row['val_loss'], 4, row['val_loss_std'])} | {_number(row['val_bpb'], 4, row['val_bpb_std'])} | "
            f"{delta} | {_number(row['delta_over_noise'], 1)} |"
        )
    budget = summary["budget"]
    if "max_tokens" in budget:
        budget_note = f"{budget['max_tokens']:,} training tokens per variant; FLOPs = flops_per_token × tokens"
    else:
        budget_note = (
            f"{budget['max_flops']:.3e} training FLOPs per variant, converted to a token budget per variant with "
            "`Transformer.flops_per_token` (6·N + 12·l·d·T, N the non-embedding weights a token passes through)"
        )
    noise = summary["seed_noise_val_bpb"]
    notes = [
        f"Base preset `{summary['preset']}`, data `{summary['data']}`. Budget: {budget_note}, rounded to whole steps.",
        "Δ bpb: validation bits/byte minus the first (baseline) variant's; ± is the sample standard deviation over "
        "seeds.",
        f"Seed noise σ (pooled over variants with more than one seed): {_number(noise)} bits/byte; "
        "Δ/σ = Δ / (σ·√(1/n + 1/n_baseline)), beyond about ±2 the difference exceeds seed noise."
        if noise is not None
        else "Seed noise not measured (give the baseline `repeats: 3`).",
        "wall s: the whole run including periodic validation; tokens/s: training throughput, validation excluded.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def plot_ablation(summary: dict, path: Path) -> None:
    """One PNG, two panels: validation bits/byte against training tokens and against wall time, one curve
    per variant (the mean over its seeds, with a ±1 standard deviation band when there are several)."""
    plt = pyplot()

    figure, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for row in summary["variants"]:
        curves = [run["curve"] for run in row["runs"]]
        length = min(len(curve) for curve in curves)
        points = [
            [curve[index] for curve in curves]
            for index in range(length)
            if all(curve[index]["val_bpb"] is not None for curve in curves)
        ]
        if not points:
            continue
        tokens = [statistics.fmean(point["tokens"] for point in column) for column in points]
        seconds = [statistics.fmean(point["elapsed_s"] for point in column) for column in points]
        bpb = [statistics.fmean(point["val_bpb"] for point in column) for column in points]
        (line,) = by_tokens.plot(tokens, bpb, label=row["name"], marker="o", markersize=2.5, linewidth=1.2)
        by_time.plot(seconds, bpb, color=line.get_color(), marker="o", markersize=2.5, linewidth=1.2)
        if len(curves) > 1:
            std = [statistics.stdev(point["val_bpb"] for point in column) for column in points]
            by_tokens.fill_between(
                tokens,
                [m - s for m, s in zip(bpb, std)],
                [m + s for m, s in zip(bpb, std)],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
    by_tokens.set_xlabel("training tokens")
    by_tokens.set_ylabel("validation bits per byte")
    by_time.set_xlabel("wall time (s)")
    for axis in (by_tokens, by_time):
        axis.grid(alpha=0.3)
    budget = summary["budget"]
    figure.suptitle(
        f"ablation of {summary['preset']}: "
        + (
            f"{budget['max_tokens']:,} tokens each"
            if "max_tokens" in budget
            else f"{budget['max_flops']:.2e} FLOPs each"
        )
    )
    by_tokens.legend(fontsize=8)
    save_figure(figure, path)


def ablate(config: AblateConfig) -> dict:
    """Train every variant (skipping finished runs), then write ablation.md, ablation.json and ablation.png."""
    out = Path(config.out)
    vocab_size = load_tokenizer(config.data).vocab_size
    runs = plan_runs(config, vocab_size)
    results = []
    bar = tqdm(runs, desc="ablate", unit="run", disable=not config.progress, dynamic_ncols=True)
    for run in bar:
        bar.set_postfix(variant=run.variant.name, seed=run.seed)
        results.append(train_run(run, vocab_size))
    summary = summarise(config, results)
    summary.update(table=str(out / "ablation.md"), plot=str(out / "ablation.png"), results=str(out / "ablation.json"))
    atomic_write_json(out / "ablation.json", summary)
    atomic_write_text(
        out / "ablation.md", f"# Ablation\n\n{format_ablation(summary)}\n![validation curves](ablation.png)\n"
    )
    plot_ablation(summary, out / "ablation.png")
    return summary
