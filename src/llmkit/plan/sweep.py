"""``llmkit scaling``: an IsoFLOP sweep of small models, the scaling-law fits, and a checked prediction.

The sweep (Hoffmann et al. 2022, approach 2 "IsoFLOP profiles"): for each compute budget ``C`` (FLOPs,
counted as ``6·N·D`` with N the non-embedding parameters, see :mod:`llmkit.plan.scaling`) and each model
size of a grid, train a model of ``N`` parameters on ``D = C / (6N)`` tokens, through the one training
loop (``pretrain``), and record its final validation loss (nats/token). Every run's learning rate decays
by cosine to ``min_lr_ratio`` exactly at its own token budget: a run cut short of its schedule would
overstate the loss of the larger budgets (Chinchilla §3's correction of Kaplan et al.). All runs share
the seed, hence the data order, and are evaluated on the same validation windows.

Which sizes at which budget: every size of the grid whose tokens per parameter ``D/N`` lie in
``[min_tokens_per_parameter, max_tokens_per_parameter]`` and which trains for at least ``min_steps``
optimizer steps. The window moves with ``√C`` as the compute-optimal size does, so each IsoFLOP curve
straddles its minimum without spending runs far from it. Runs of a few hundred steps end in the
optimisation transient (warmup, the first rapid fall of the loss), which the laws do not describe
(Kaplan et al. §5 model it with a separate step term); on Tiny Shakespeare they pulled the fit's
predictions low (docs/scaling.md).

Model shapes (the fixed aspect-ratio rule): width/depth ``a = n_embd / n_layer`` is held near
``aspect_ratio`` (Kaplan et al. §3.1: at fixed N the loss depends only weakly on shape for a wide range
of aspect ratios). For a target ``N``: depth ``l = max(1, round(∛(N / (k·a²))))``, with ``k`` the
preset's block parameters per width² (≈ 12 for GPT blocks, ≈ 11 for SwiGLU with 2:1 GQA); then the
width is the multiple of ``head_dim · n_head / n_kv_head`` (``head_dim`` or the preset's head size; the
preset's grouping) whose exact non-embedding count at that depth is nearest ``N`` in log; ``n_head =
n_embd / head_dim``. Everything else comes from ``preset``.

After the sweep: the Chinchilla law and Kaplan's L(N), L(D) are fitted (:mod:`llmkit.plan.scaling`);
then the **prediction**: a run of ``prediction_multiplier × max(budgets)`` FLOPs at the fitted
compute-optimal size. Its predicted loss is written to ``prediction.json`` *before* it is trained; after
training the file gains the actual loss and the relative error.

Files under ``out``: ``runs/<name>/`` each sweep run (checkpoint, ``metrics.csv``, ``plan.json`` written
when it starts, ``result.json`` written atomically when it ends), ``predict/`` the predicted run,
``prediction.json``, ``scaling.json`` (fits, runs, prediction) and ``scaling.png``.

Resuming: a rerun skips every run with a ``result.json``, continues an interrupted run from its last
checkpoint, and keeps an existing prediction (it was made before its run was trained). A run folder or
prediction made under a different config is refused, naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from llmkit.config import check, parse_number
from llmkit.errors import ConfigError, LlmkitError, MismatchError
from llmkit.figures import pyplot, save_figure
from llmkit.io import atomic_write_json, read_json
from llmkit.model.checkpoint import LATEST
from llmkit.model.config import PRESETS, ModelConfig
from llmkit.plan.ablate import count_parameters
from llmkit.plan.scaling import (
    CHINCHILLA_GRID,
    ChinchillaLaw,
    KaplanLaw,
    fit_chinchilla,
    fit_kaplan,
    isoflop_minimum,
    lower_envelope,
)
from llmkit.pretrain import ModelOverrides, PretrainConfig, build_model_config, pretrain
from llmkit.token_data import load_tokenizer
from llmkit.train.config import DTYPE_HELP, TrainConfig

# Every other value of each axis of the paper's grid: 243 L-BFGS starts instead of 4,500.
GRIDS = {"chinchilla": CHINCHILLA_GRID, "coarse": {name: values[::2] for name, values in CHINCHILLA_GRID.items()}}
SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "n_kv_head")


def _numbers(name: str, values, kind: type) -> list:
    """A list field given as numbers or as text (``1e12``, ``100k``), every item positive."""
    numbers = []
    for item in values if isinstance(values, list) else [values]:
        try:
            number = parse_number(item, kind) if isinstance(item, str) else kind(item)
        except (TypeError, ValueError):
            raise ConfigError(name, item, f"not a {'whole ' if kind is int else ''}number") from None
        check(number > 0, name, item, "must be positive")
        numbers.append(number)
    return numbers


@dataclass
class ScalingConfig:
    data: str = field(default="runs/data", metadata={"help": "token data directory from `llmkit data prepare`"})
    out: str = field(
        default="runs/scaling",
        metadata={"help": "sweep folder: runs/, predict/, prediction.json, scaling.json, scaling.png"},
    )
    preset: str = field(
        default="cpu-tiny", metadata={"help": f"model family (every field but the shape): {', '.join(PRESETS)}"}
    )
    budgets: list = field(
        default_factory=lambda: [2.5e11, 5e11, 1e12, 2e12],
        metadata={
            "help": "compute budgets of the IsoFLOP profiles, FLOPs counted as 6·N·D (N non-embedding parameters)"
        },
    )
    sizes: list = field(
        default_factory=lambda: [
            15_000,
            50_000,
            100_000,
            200_000,
            300_000,
            600_000,
            800_000,
            1_200_000,
            2_000_000,
            3_200_000,
            5_000_000,
        ],
        metadata={
            "help": "grid of target non-embedding parameter counts (shapes by the aspect-ratio rule); each budget "
            "trains those in the window"
        },
    )
    min_tokens_per_parameter: float = field(
        default=1.0, metadata={"help": "a size trains at a budget if D/N is at least this"}
    )
    max_tokens_per_parameter: float = field(default=400.0, metadata={"help": "... and if D/N is at most this"})
    min_steps: int = field(
        default=300, metadata={"help": "a size trains at a budget only with at least this many optimizer steps"}
    )
    aspect_ratio: float = field(default=32.0, metadata={"help": "target n_embd / n_layer of every shape"})
    head_dim: int | None = field(
        default=None, metadata={"help": "attention head size; n_head = n_embd / head_dim (default: the preset's)"}
    )
    context_length: int | None = field(default=None, metadata={"help": "sequence length (default: the preset's)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per optimizer step, every run"})
    lr: float = field(default=4e-3, metadata={"help": "peak learning rate, every run"})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "the cosine schedule ends at this fraction of the peak, at each run's budget"}
    )
    warmup_fraction: float = field(
        default=0.05, metadata={"help": "linear warmup over this fraction of each run's steps"}
    )
    eval_batches: int = field(
        default=50, metadata={"help": "validation batches of the final evaluation (the same windows for every run)"}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": DTYPE_HELP},
    )
    seed: int = field(default=1337, metadata={"help": "seed of every run's initialisation and data order"})
    predict: bool = field(
        default=True, metadata={"help": "train the predicted run after the fit (the prediction is made either way)"}
    )
    prediction_multiplier: float = field(
        default=4.0, metadata={"help": "the predicted run's budget over the largest sweep budget (>= 4)"}
    )
    compute_budget: float | None = field(
        default=None,
        metadata={
            "help": "report the compute-optimal N and D for this many FLOPs (default: the predicted run's budget)"
        },
    )
    fit_grid: Literal["chinchilla", "coarse"] = field(
        default="chinchilla",
        metadata={
            "help": "L-BFGS starts of the Chinchilla fit: the paper's 4,500-point grid, or every other value of it "
            "(243)"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, "preset", self.preset, f"unknown preset; choose one of {', '.join(PRESETS)}")
        self.budgets = sorted(_numbers("budgets", self.budgets, float))
        self.sizes = sorted(_numbers("sizes", self.sizes, int))
        check(
            len(set(self.budgets)) >= 2,
            "budgets",
            self.budgets,
            "give at least two distinct budgets (IsoFLOP profiles)",
        )
        check(len(set(self.sizes)) >= 2, "sizes", self.sizes, "give at least two distinct sizes")
        check(
            self.min_tokens_per_parameter > 0,
            "min_tokens_per_parameter",
            self.min_tokens_per_parameter,
            "must be positive",
        )
        check(
            self.max_tokens_per_parameter > self.min_tokens_per_parameter,
            "max_tokens_per_parameter",
            self.max_tokens_per_parameter,
            f"must exceed min_tokens_per_parameter={self.min_tokens_per_parameter}",
        )
        check(self.min_steps >= 1, "min_steps", self.min_steps, "must be at least 1")
        check(
            self.context_length is None or self.context_length > 0,
            "context_length",
            self.context_length,
            "must be positive",
        )
        check(self.head_dim is None or self.head_dim > 0, "head_dim", self.head_dim, "must be positive")
        check(self.aspect_ratio > 0, "aspect_ratio", self.aspect_ratio, "must be positive")
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", self.warmup_fraction, "must be in [0, 1)")
        check(
            self.prediction_multiplier >= 4,
            "prediction_multiplier",
            self.prediction_multiplier,
            "must be at least 4: a prediction is tested well beyond the sweep's compute",
        )
        check(
            self.compute_budget is None or self.compute_budget > 0,
            "compute_budget",
            self.compute_budget,
            "must be positive",
        )
        pretrain_config(self, {}, Path(self.out), steps=1)  # lr, batch size, dtype, device, context length: checked now

    @property
    def prediction_budget(self) -> float:
        return self.prediction_multiplier * max(self.budgets)


def pretrain_config(config: ScalingConfig, shape: dict, directory: Path, steps: int) -> PretrainConfig:
    """One run: the preset with ``shape``, trained for ``steps`` steps with its schedule ending there."""
    context = {} if config.context_length is None else {"context_length": config.context_length}
    train = TrainConfig(
        out=str(directory),
        batch_size=config.batch_size,
        lr=config.lr,
        min_lr_ratio=config.min_lr_ratio,
        schedule="cosine",
        warmup_steps=round(config.warmup_fraction * steps),
        max_tokens=steps * _tokens_per_step(config),
        eval_interval=0,
        eval_batches=config.eval_batches,
        dtype=config.dtype,
        seed=config.seed,
        device=config.device,
        progress=config.progress,
        keep_last=1,
    )
    return PretrainConfig(data=config.data, preset=config.preset, model=ModelOverrides(**shape, **context), train=train)


def _tokens_per_step(config: ScalingConfig) -> int:
    context = PRESETS[config.preset]["context_length"] if config.context_length is None else config.context_length
    return config.batch_size * context


# ------------------------------------------------------------------------------------------- shapes
class ShapeRule:
    """Shapes of the preset's family for target non-embedding counts (the aspect-ratio rule above)."""

    def __init__(self, config: ScalingConfig, vocab_size: int):
        self.config, self.vocab_size = config, vocab_size
        base = self.model_config({})
        self.head_dim, self.group = config.head_dim or base.head_dim, base.n_head // base.n_kv_head
        self.width_step = self.head_dim * self.group
        self._counts: dict[tuple[int, int], int] = {}
        width = self.width_step * max(1, round(config.aspect_ratio / self.width_step))
        self.k = (self.count(2, width) - self.count(1, width)) / width**2

    def model_config(self, shape: dict) -> ModelConfig:
        return build_model_config(pretrain_config(self.config, shape, Path(self.config.out), steps=1), self.vocab_size)

    def shape(self, n_layer: int, n_embd: int) -> dict:
        n_head = n_embd // self.head_dim
        return {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_kv_head": n_head // self.group}

    def count(self, n_layer: int, n_embd: int) -> int:
        if (n_layer, n_embd) not in self._counts:
            self._counts[n_layer, n_embd] = count_parameters(self.model_config(self.shape(n_layer, n_embd)))[1]
        return self._counts[n_layer, n_embd]

    def __call__(self, target: float) -> dict:
        depth = max(1, round((target / (self.k * self.config.aspect_ratio**2)) ** (1 / 3)))
        multiple = 1
        while self.count(depth, self.width_step * (multiple + 1)) <= target:
            multiple += 1
        nearest = min(
            (multiple, multiple + 1), key=lambda m: abs(math.log(self.count(depth, self.width_step * m) / target))
        )
        return self.shape(depth, self.width_step * nearest)


# ------------------------------------------------------------------------------------------- planning
@dataclass
class Run:
    name: str
    budget: float  # 6·N·D FLOPs the run was planned for
    target: float  # the size asked for
    shape: dict
    config: PretrainConfig
    model: ModelConfig  # as the preset and shape resolve for this data's vocabulary
    parameters: int
    non_embedding_parameters: int
    flops_per_token: float
    tokens: int

    @property
    def directory(self) -> Path:
        return Path(self.config.train.out)


def plan_run(config: ScalingConfig, rule: ShapeRule, name: str, budget: float, target: float, directory: Path) -> Run:
    """The run of the shape nearest ``target`` on ``budget / (6N)`` tokens, rounded to whole steps."""
    shape = rule(target)
    model = rule.model_config(shape)
    total, non_embedding, _, flops_per_token = count_parameters(model)
    steps = max(1, round(budget / (6 * non_embedding) / _tokens_per_step(config)))
    return Run(
        name,
        budget,
        target,
        shape,
        pretrain_config(config, shape, directory, steps),
        model,
        total,
        non_embedding,
        flops_per_token,
        steps * _tokens_per_step(config),
    )


def run_name(budget: float, shape: dict) -> str:
    return f"C{budget:.2e}_L{shape['n_layer']}_H{shape['n_embd']}".replace("+", "")


def plan_sweep(config: ScalingConfig, rule: ShapeRule) -> list[Run]:
    """Every (budget, size) run whose tokens per parameter lie in the configured window and that takes at
    least ``min_steps`` optimizer steps."""
    runs, shapes = [], {}
    for target in config.sizes:
        shapes.setdefault(
            tuple(rule(target)[key] for key in SHAPE_FIELDS), target
        )  # two targets of one shape: one size
    for budget in config.budgets:
        chosen = []
        for shape, target in shapes.items():
            name = run_name(budget, dict(zip(SHAPE_FIELDS, shape)))
            run = plan_run(config, rule, name, budget, target, Path(config.out) / "runs" / name)
            in_window = (
                config.min_tokens_per_parameter
                <= run.tokens / run.non_embedding_parameters
                <= config.max_tokens_per_parameter
            )
            if in_window and run.tokens >= config.min_steps * _tokens_per_step(config):
                chosen.append(run)
        check(
            len(chosen) >= 2,
            "budgets",
            budget,
            f"only {len(chosen)} of the sizes train on "
            f"{config.min_tokens_per_parameter:g}-{config.max_tokens_per_parameter:g} tokens per parameter in at "
            f"least {config.min_steps} steps at this budget; add sizes, widen the window or lower min_steps",
        )
        runs += chosen
    check(
        len(runs) >= 5,
        "sizes",
        config.sizes,
        f"the sweep has {len(runs)} runs; the Chinchilla law's 5 parameters need at least 5",
    )
    return runs


# ------------------------------------------------------------------------------------------- running
def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _refuse_changes(path: Path, recorded: dict, current: dict) -> None:
    old, new = _flatten(recorded), _flatten(current)
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    if changed:
        raise MismatchError(
            f"{path}: recorded with {changed[0]}={old.get(changed[0])!r}, the current config has "
            f"{new.get(changed[0])!r}; delete {path.parent} or choose another --out"
        )


def fingerprint(run: Run) -> dict:
    """What makes a finished run reusable: the data, the resolved model and the training config."""
    train = {
        key: value
        for key, value in dataclasses.asdict(run.config.train).items()
        if key not in ("out", "resume", "progress")
    }
    return {
        "data": str(Path(run.config.data).resolve()),
        "preset": run.config.preset,
        "model": dataclasses.asdict(run.model),
        "train": train,
    }


def train_run(run: Run) -> dict:
    """Train ``run``, or return its recorded result; an interrupted run continues from its checkpoint."""
    result_path, plan_path = run.directory / "result.json", run.directory / "plan.json"
    current = fingerprint(run)
    for path in (result_path, plan_path):
        if path.is_file():
            _refuse_changes(path, read_json(path)["config"], current)
    if result_path.is_file():
        return read_json(result_path)
    atomic_write_json(plan_path, {"config": current})
    resume = (run.directory / LATEST).is_file()
    summary = pretrain(dataclasses.replace(run.config, train=dataclasses.replace(run.config.train, resume=resume)))
    result = {
        "name": run.name,
        "budget": run.budget,
        "target_parameters": run.target,
        **run.shape,
        "aspect_ratio": run.shape["n_embd"] / run.shape["n_layer"],
        "parameters": run.parameters,
        "non_embedding_parameters": run.non_embedding_parameters,
        "tokens": summary["tokens"],
        "tokens_per_parameter": summary["tokens"] / run.non_embedding_parameters,
        "flops_6nd": 6.0 * run.non_embedding_parameters * summary["tokens"],
        "flops_per_token": run.flops_per_token,
        "flops": run.flops_per_token * summary["tokens"],
        "steps": summary["steps"],
        "val_loss": summary["val_loss"],
        "val_bpb": summary["val_bpb"],
        "train_loss": summary["train_loss"],
        "seconds": summary["seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": current,
    }
    atomic_write_json(result_path, result)
    return result


class FlopsBar:
    """One progress bar over the whole sweep, advanced by each run's planned FLOPs (``flops_per_token·D``)."""

    def __init__(self, runs: list[Run], enabled: bool):
        self.bar = tqdm(
            total=sum(self.flops(run) for run in runs),
            unit="TFLOP",
            desc="scaling",
            disable=not enabled,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} TFLOP [{elapsed}<{remaining}{postfix}]",
        )

    @staticmethod
    def flops(run: Run) -> float:
        return run.flops_per_token * run.tokens / 1e12

    def add(self, run: Run) -> None:
        self.bar.total += self.flops(run)
        self.bar.refresh()

    def run(self, run: Run) -> dict:
        self.bar.set_postfix_str(run.name)
        result = train_run(run)
        self.bar.update(self.flops(run))
        return result

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------- fitting
def fit_laws(config: ScalingConfig, results: list[dict]) -> dict:
    """The Chinchilla fit, Kaplan's L(N) and L(D) on the lower envelopes, and the IsoFLOP minima."""
    n = np.array([result["non_embedding_parameters"] for result in results], dtype=np.float64)
    d = np.array([result["tokens"] for result in results], dtype=np.float64)
    loss = np.array([result["val_loss"] for result in results], dtype=np.float64)
    fits: dict = {"chinchilla": fit_chinchilla(n, d, loss, grid=GRIDS[config.fit_grid]).as_dict()}
    for name, x in (("kaplan_n", n), ("kaplan_d", d)):
        kept = lower_envelope(x, loss)
        try:
            fits[name] = {
                **fit_kaplan(x[kept], loss[kept]).as_dict(),
                "runs": [results[index]["name"] for index in kept],
            }
        except ValueError as error:
            fits[name] = {"error": str(error), "runs": [results[index]["name"] for index in kept]}
    minima = []
    for budget in config.budgets:
        members = [index for index, result in enumerate(results) if result["budget"] == budget]
        minimum = isoflop_minimum(n[members], loss[members])
        if minimum is not None:
            minima.append({"budget": budget, "n_opt": minimum, "d_opt": budget / (6 * minimum)})
    fits["isoflop_minima"] = minima
    if len(minima) >= 2:
        # Approach 2's exponent a in N_opt ∝ C^a, to set beside the parametric fit's β/(α+β).
        slope, _ = np.polyfit(np.log([m["budget"] for m in minima]), np.log([m["n_opt"] for m in minima]), 1)
        fits["isoflop_exponent"] = float(slope)
    return fits


def law_of(fits: dict) -> ChinchillaLaw:
    return ChinchillaLaw(**{key: fits["chinchilla"][key] for key in ("E", "A", "B", "alpha", "beta")})


def compute_optimal(law: ChinchillaLaw, budget: float) -> dict:
    try:
        n, d = law.compute_optimal(budget)
    except ValueError as error:
        raise LlmkitError(
            f"the fitted law has no compute-optimal size ({error}); the sweep is too small or too noisy: "
            "add budgets or sizes, or train longer"
        ) from None
    return {
        "budget": budget,
        "n_opt": float(n),
        "d_opt": float(d),
        "tokens_per_parameter": float(d / n),
        "loss": float(law.loss(n, d)),
        "exponent_n": law.beta / (law.alpha + law.beta),
        "exponent_d": law.alpha / (law.alpha + law.beta),
    }


# ------------------------------------------------------------------------------------------- predicting
def make_prediction(config: ScalingConfig, rule: ShapeRule, law: ChinchillaLaw, sweep: list[str]) -> tuple[Run, dict]:
    """The run to predict and its prediction; an existing ``prediction.json`` is kept (it was made before
    its run was trained) unless it was made from a different sweep, which is refused."""
    path = Path(config.out) / "prediction.json"
    budget = config.prediction_budget
    if path.is_file():
        prediction = read_json(path)
        if prediction["sweep"] != sweep or prediction["budget"] != budget:
            raise MismatchError(
                f"{path}: made from a different sweep or budget; delete it and {Path(config.out) / 'predict'} to "
                f"predict again"
            )
        run = plan_run(config, rule, "predict", budget, prediction["target_parameters"], Path(config.out) / "predict")
        return run, prediction
    optimal = compute_optimal(law, budget)
    run = plan_run(config, rule, "predict", budget, optimal["n_opt"], Path(config.out) / "predict")
    prediction = {
        "budget": budget,
        "multiplier": config.prediction_multiplier,
        "largest_sweep_budget": max(config.budgets),
        "target_parameters": optimal["n_opt"],
        **run.shape,
        "non_embedding_parameters": run.non_embedding_parameters,
        "tokens": run.tokens,
        "flops_6nd": 6.0 * run.non_embedding_parameters * run.tokens,
        "predicted_loss": float(law.loss(run.non_embedding_parameters, run.tokens)),
        "law": dataclasses.asdict(law),
        "sweep": sweep,
        "predicted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(path, prediction)
    return run, prediction


def record_outcome(config: ScalingConfig, prediction: dict, result: dict) -> dict:
    prediction = {
        **prediction,
        "actual_loss": result["val_loss"],
        "actual_tokens": result["tokens"],
        "relative_error": (prediction["predicted_loss"] - result["val_loss"]) / result["val_loss"],
        "trained_seconds": result["seconds"],
        "finished_at": result["finished_at"],
    }
    atomic_write_json(Path(config.out) / "prediction.json", prediction)
    return prediction


# ------------------------------------------------------------------------------------------- the command
def run_scaling(config: ScalingConfig) -> dict:
    """Sweep (skipping finished runs), fit, predict, train the predicted run, plot; returns the summary
    also written to ``scaling.json``."""
    start = time.perf_counter()
    out = Path(config.out)
    rule = ShapeRule(config, load_tokenizer(config.data).vocab_size)
    runs = plan_sweep(config, rule)
    bar = FlopsBar(runs, config.progress)
    try:
        results = [bar.run(run) for run in runs]
        fits = fit_laws(config, results)
        law = law_of(fits)
        predicted_run, prediction = make_prediction(config, rule, law, [run.name for run in runs])
        if config.predict:
            bar.add(predicted_run)
            prediction = record_outcome(config, prediction, bar.run(predicted_run))
    finally:
        bar.close()
    summary = {
        "preset": config.preset,
        "data": str(Path(config.data).resolve()),
        "convention": "N = non-embedding parameters (Transformer.num_parameters(exclude_embeddings=True)); D = "
        "training tokens; budgets C = 6·N·D FLOPs; loss = validation nats/token",
        "fits": fits,
        "compute_optimal": compute_optimal(law, config.compute_budget or config.prediction_budget),
        "prediction": prediction,
        "runs": [{key: value for key, value in result.items() if key != "config"} for result in results],
        "sweep_flops": sum(result["flops"] for result in results),
        "sweep_flops_6nd": sum(result["flops_6nd"] for result in results),
        "seconds": round(time.perf_counter() - start, 1),
        "files": {
            "summary": str(out / "scaling.json"),
            "plot": str(out / "scaling.png"),
            "prediction": str(out / "prediction.json"),
            "runs": str(out / "runs"),
        },
        "config": dataclasses.asdict(config),
    }
    atomic_write_json(out / "scaling.json", summary)
    plot_scaling(summary, out / "scaling.png")
    return summary


def plot_scaling(summary: dict, path: Path) -> None:
    """One PNG, four panels: the IsoFLOP profiles with the fitted L(N, C/6N) and its compute-optimal points
    (the predicted run's budget dashed, its prediction a hollow star, the outcome a filled one); fitted
    against observed loss for every run; Kaplan's L(N) and L(D) on their envelopes."""
    plt = pyplot()

    law, runs, prediction, fits = law_of(summary["fits"]), summary["runs"], summary["prediction"], summary["fits"]
    n = np.array([run["non_embedding_parameters"] for run in runs], dtype=np.float64)
    d = np.array([run["tokens"] for run in runs], dtype=np.float64)
    loss = np.array([run["val_loss"] for run in runs], dtype=np.float64)
    budgets = sorted({run["budget"] for run in runs}) + [prediction["budget"]]
    figure, axes = plt.subplots(2, 2, figsize=(12, 9.5))
    isoflop, parity, by_size, by_data = axes.flat
    optima = [float(law.compute_optimal(budget)[0]) for budget in budgets]
    sizes = np.geomspace(
        min(n.min(), *optima) / 1.5, max(n.max(), prediction["non_embedding_parameters"], *optima) * 1.5, 200
    )
    for color, budget, optimum in zip(plt.cm.viridis(np.linspace(0, 0.9, len(budgets))), budgets, optima):
        members = [index for index, run in enumerate(runs) if run["budget"] == budget]
        predicted_budget = budget == prediction["budget"] and not members
        isoflop.plot(
            sizes,
            law.loss(sizes, budget / (6 * sizes)),
            color=color,
            linestyle="--" if predicted_budget else "-",
            linewidth=1.2,
        )
        isoflop.scatter(n[members], loss[members], color=color, s=22, label=f"C = {budget:.2e}", zorder=3)
        isoflop.scatter([optimum], [law.loss(optimum, budget / (6 * optimum))], color=color, marker="x", s=50, zorder=3)
        if predicted_budget:
            size = prediction["non_embedding_parameters"]
            isoflop.scatter(
                [size],
                [prediction["predicted_loss"]],
                marker="*",
                s=220,
                facecolors="none",
                edgecolors=color,
                label=f"predicted {prediction['predicted_loss']:.3f} (C = {budget:.2e})",
                zorder=4,
            )
            if "actual_loss" in prediction:
                isoflop.scatter(
                    [size],
                    [prediction["actual_loss"]],
                    marker="*",
                    s=160,
                    color=color,
                    label=f"actual {prediction['actual_loss']:.3f}",
                    zorder=4,
                )
    isoflop.set(
        xscale="log",
        xlabel="non-embedding parameters N",
        ylabel="validation loss (nats/token)",
        title=f"IsoFLOP profiles; L = {law.E:.3f} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f} "
        f"(x: optimum)",
    )
    isoflop.legend(fontsize=7)

    fitted = law.loss(n, d)
    parity.scatter(fitted, loss, s=22, color="tab:blue", label="sweep runs (fitted vs observed)")
    limits = [fitted.min(), fitted.max(), loss.min(), loss.max(), prediction["predicted_loss"]]
    if "actual_loss" in prediction:
        parity.scatter(
            [prediction["predicted_loss"]],
            [prediction["actual_loss"]],
            marker="*",
            s=160,
            color="tab:red",
            label=f"predicted run: relative error {prediction['relative_error']:+.2%}",
        )
        limits.append(prediction["actual_loss"])
    low, high = min(limits), max(limits)
    parity.plot([low, high], [low, high], color="grey", linewidth=1)
    parity.set(xlabel="L(N, D) of the fitted law", ylabel="observed validation loss", title="fitted vs observed")
    parity.legend(fontsize=8)

    for axis, key, x, label in ((by_size, "kaplan_n", n, "N"), (by_data, "kaplan_d", d, "D")):
        fit = fits[key]
        kept = [index for index, run in enumerate(runs) if run["name"] in fit["runs"]]
        axis.scatter(x, loss, s=14, color="lightgrey", label="all runs")
        axis.scatter(x[kept], loss[kept], s=22, color="black", label="best per " + ("size" if label == "N" else "data"))
        if "exponent" in fit:
            line = np.geomspace(x.min(), x.max(), 100)
            axis.plot(
                line,
                KaplanLaw(fit["scale"], fit["exponent"], fit["points"]).loss(line),
                color="tab:orange",
                label=f"L({label}) = ({fit['scale']:.3g}/{label})^{fit['exponent']:.4f}",
            )
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="non-embedding parameters N" if label == "N" else "training tokens D",
            ylabel="validation loss (nats/token)",
            title=f"Kaplan L({label})",
        )
        axis.legend(fontsize=8)
    save_figure(figure, path)
