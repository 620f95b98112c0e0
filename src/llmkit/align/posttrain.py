"""``llmkit posttrain``: the post-training chain on the embedded arithmetic task, with a before/after table.

From a pretrained checkpoint, each stage into its own folder under ``out``:

1. ``sft`` (:mod:`llmkit.align.sft`): the generated GSM8K-style problems with worked solutions whose
   steps are calculator calls, and (``plain``) the same problems with inline arithmetic, so that the
   model also has a way to answer without the calculator (the table's "calculator off" column);
2. ``reward`` (:mod:`llmkit.align.reward`): a reward model from the SFT model on the generated
   (correct, plausible wrong) solution pairs;
3. ``grpo`` (default) or ``ppo`` (:mod:`llmkit.align.grpo`, :mod:`llmkit.align.ppo`) from the SFT model,
   rewarded by the exact answer checker (``rl_reward="verifiable"``, the default) or by the reward model;
4. ``dpo`` (:mod:`llmkit.align.dpo`) from the RL model on generated pairs, the RL model as its reference.

**Why GRPO with the verifiable reward by default.** The answer checker is exact, so the policy cannot
exploit it; a small reward model trained on a few thousand generated pairs ranks the pairs it was trained
for (one corrupted step) but scores the policy's own, differently wrong answers less reliably, and PPO
against it can raise the reward without raising accuracy (reward over-optimisation, Gao et al. 2023).
GRPO needs no critic, which a model this small and a budget of a few dozen iterations would not train
(DeepSeekMath, Shao et al. 2024). ``rl="ppo"`` and ``rl_reward="model"`` run the InstructGPT recipe.

**Evaluation** (:mod:`llmkit.align.posttrain_eval`): the base (few-shot plain-text prompt), SFT, RL and
DPO models on the same held-out problems, greedy, with the calculator and without; the reward model's
mean score; KL to the SFT model. Records of every answer go to ``out/evaluation``; the table goes into
the report card (:func:`llmkit.report.add_section`) with ``posttrain.png`` (accuracy per stage and the
stages' training curves).

**Budgets** are step and iteration counts, so a run is reproducible whatever the machine's load;
``scale`` multiplies all of them (the speedrun scales them with its pretraining time). The defaults take
about 8 minutes on 2 CPU cores with the speedrun's 5 M-parameter model.

**Resume.** ``out/posttrain.json`` lists the finished stages and evaluations, written after each one;
with ``resume`` they are kept, and an interrupted stage continues from its last checkpoint.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

from llmkit.align.dpo import DPOConfig, dpo, dpo_training
from llmkit.align.grpo import GRPOConfig, grpo, grpo_rollout, grpo_update
from llmkit.align.posttrain_eval import EvaluationSettings, evaluate_model, heldout_problems
from llmkit.align.ppo import PPOConfig, ppo
from llmkit.align.reward import RewardConfig, load_reward_model, reward_training, train_reward
from llmkit.align.rl_source import RolloutConfig, UpdateConfig
from llmkit.align.rl_stage import RLStageConfig, rl_training
from llmkit.align.sft import SFTConfig, sft, sft_training
from llmkit.config import check
from llmkit.errors import ConfigError
from llmkit.figures import pyplot, save_figure
from llmkit.io import atomic_write_json, atomic_write_jsonl, iter_jsonl, read_json
from llmkit.model.checkpoint import BEST, LATEST, load_checkpoint, load_model, resolve_checkpoint
from llmkit.report import add_section
from llmkit.train.trainer import resolve_device

STATE_FILE = "posttrain.json"
EVALUATION_DIRECTORY = "evaluation"
FIGURE = "posttrain.png"


def posttrain_sft() -> SFTConfig:
    """The SFT section's defaults: InstructGPT's regime, few demonstrations (500 worked solutions of each
    form, from the task's ``train`` split) and many RL prompts without them (the RL sections' 4,000 of its
    ``prompts`` split); 500 steps of 8 rows."""
    training = sft_training(max_steps=500, batch_size=8, lr=2e-3, eval_interval=0, checkpoint_interval=100, keep_last=1)
    return SFTConfig(generated_examples=500, epochs=None, train=training)


def posttrain_reward() -> RewardConfig:
    """The reward section's defaults: pairs of 500 problems of each solution form (a fifth as many again
    from the held-out split give the table's pair accuracy), 60 steps."""
    training = reward_training(max_steps=60, lr=1e-4, eval_interval=0, keep_last=1)
    return RewardConfig(generated_pairs=500, val_fraction=0.2, epochs=None, train=training)


def posttrain_rl_stage() -> RLStageConfig:
    """4,000 RL prompts; 256 validation problems pick the shipped checkpoint (64 left a standard error of
    0.05 at these accuracies, and selected by noise)."""
    return RLStageConfig(task="arithmetic", train_problems=4000, validation_problems=256)


def posttrain_grpo() -> GRPOConfig:
    """The GRPO section's defaults: 10 iterations of 8 informative groups of 8 samples at temperature 0.8
    (dynamic sampling, up to 4 rounds of 8 prompts), learning rate 1e-4, the validation accuracy and a
    checkpoint every 2 iterations (the best is kept). Chosen by measuring against the earlier 24 iterations
    of 8 prompts at temperature 1 and 5e-5 (docs/rl.md): in about the same time, a mean held-out gain of
    +0.023 over three seeds instead of 0."""
    return GRPOConfig(
        group_size=8,
        kl_coef=0.04,
        dynamic_sampling=True,
        stage=posttrain_rl_stage(),
        rollout=grpo_rollout(prompts_per_iteration=8, temperature=0.8),
        update=grpo_update(iterations=10),
        train=rl_training(lr=1e-4, checkpoint_interval=8, eval_interval=8, keep_last=1),
    )


def posttrain_ppo() -> PPOConfig:
    """The PPO section's defaults: 24 iterations of 64 samples, two passes (8 steps each), the validation
    accuracy every 4 iterations (the best is kept), a checkpoint every 5."""
    return PPOConfig(
        kl_coef=0.04,
        stage=posttrain_rl_stage(),
        rollout=RolloutConfig(prompts_per_iteration=64),
        update=UpdateConfig(iterations=24, epochs=2, minibatch_size=16),
        train=rl_training(lr=5e-5, checkpoint_interval=40, eval_interval=32, keep_last=1),
    )


def posttrain_dpo() -> DPOConfig:
    """The DPO section's defaults: pairs of 200 problems of each solution form, 40 steps."""
    return DPOConfig(
        generated_pairs=200, epochs=None, train=dpo_training(max_steps=40, lr=5e-5, eval_interval=0, keep_last=1)
    )


SECTION_DEFAULTS: dict[str, Callable[[], object]] = {
    "sft": posttrain_sft,
    "reward": posttrain_reward,
    "grpo": posttrain_grpo,
    "ppo": posttrain_ppo,
    "dpo": posttrain_dpo,
}
RUN_FIELDS = ("train.out", "train.seed", "train.device", "train.resume", "train.progress")
PREFERENCE_FIELDS = (
    "base",
    "datasets",
    *RUN_FIELDS,
    "train.dtype",
    "train.warmup_steps",
    "train.log_interval",
    "train.checkpoint_interval",
)
# The fields the chain sets itself (paths between the stages, the shared seed/device/dtype, warmups from the
# scaled budgets); a section that sets one is refused rather than silently overridden.
CHAIN_FIELDS = {
    "sft": ("base", "datasets", *RUN_FIELDS, "train.dtype", "train.warmup_steps"),
    "reward": PREFERENCE_FIELDS,
    "grpo": ("stage.policy", "stage.reward_model", "stage.task", "rollout.max_new_tokens", *RUN_FIELDS),
    "ppo": ("stage.policy", "stage.reward_model", "stage.task", "rollout.max_new_tokens", *RUN_FIELDS),
    "dpo": ("reference", *PREFERENCE_FIELDS),
}
BUDGETS = {
    "sft": "train.max_steps",
    "reward": "train.max_steps",
    "grpo": "update.iterations",
    "ppo": "update.iterations",
    "dpo": "train.max_steps",
}


def dotted(config, path: str):
    """``dotted(config, "train.lr")`` is ``config.train.lr``."""
    for name in path.split("."):
        config = getattr(config, name)
    return config


@dataclass
class PosttrainConfig:
    """The chain's own settings, and one section per stage holding that stage's whole config
    (``--sft.train.lr``, ``--grpo.update.iterations``); the defaults of the sections are the chain's."""

    base: str = field(
        default="runs/speedrun/base", metadata={"help": "pretrained checkpoint (run directory or checkpoint folder)"}
    )
    out: str = field(
        default="runs/posttrain",
        metadata={"help": "folder of every stage's run, the evaluation records and posttrain.json"},
    )
    report: str | None = field(
        default=None, metadata={"help": "folder of the report card to add the post-training section to (default: out)"}
    )
    plain: bool = field(
        default=True, metadata={"help": "also fine-tune and tune on the inline-arithmetic solutions (calculator off)"}
    )
    rl: Literal["grpo", "ppo"] = field(
        default="grpo", metadata={"help": "the RL stage between the reward model and DPO (its section: grpo or ppo)"}
    )
    rl_reward: Literal["verifiable", "model"] = field(
        default="verifiable",
        metadata={"help": "reward of the RL stage: the exact answer checker, or the trained reward model"},
    )
    scale: float = field(
        default=1.0, metadata={"help": "multiplies every stage's budget (train.max_steps, RL update.iterations)"}
    )
    eval_problems: int = field(default=200, metadata={"help": "held-out problems of the before/after table"})
    max_new_tokens: int = field(
        default=96, metadata={"help": "tokens an answer may sample (evaluation and RL rollouts)"}
    )
    shots: int = field(
        default=3,
        metadata={"help": "the base model's few-shot demonstrations at most (fewer when the context is short)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the generated data, initialisation and sampling"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto",
        metadata={
            "help": "autocast dtype of SFT, reward and DPO training: auto (bfloat16 where the device multiplies "
            "faster in it), float32 or bfloat16 (RL keeps its section's train.dtype, float32: "
            "its probability ratios need the precision)"
        },
    )
    resume: bool = field(default=False, metadata={"help": "keep finished stages and continue an interrupted one"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    sft: SFTConfig = field(default_factory=posttrain_sft)
    reward: RewardConfig = field(default_factory=posttrain_reward)
    grpo: GRPOConfig = field(default_factory=posttrain_grpo)
    ppo: PPOConfig = field(default_factory=posttrain_ppo)
    dpo: DPOConfig = field(default_factory=posttrain_dpo)

    def __post_init__(self) -> None:
        check(self.scale > 0, "scale", self.scale, "must be positive")
        for name in ("eval_problems", "max_new_tokens"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        check(self.shots >= 0, "shots", self.shots, "must be >= 0")
        check(self.dtype in ("auto", "float32", "bfloat16"), "dtype", self.dtype, "must be auto, float32 or bfloat16")
        for section, paths in CHAIN_FIELDS.items():
            defaults = SECTION_DEFAULTS[section]()
            for path in paths:
                value = dotted(getattr(self, section), path)
                check(
                    value == dotted(defaults, path),
                    f"{section}.{path}",
                    value,
                    "set by posttrain itself (from --base, --out, --seed, --device, --dtype, --plain, --resume, "
                    "--progress, --max-new-tokens or the scaled budget): change those instead",
                )
            budget = dotted(getattr(self, section), BUDGETS[section])
            check(
                budget is not None and budget > 0,
                f"{section}.{BUDGETS[section]}",
                budget,
                "must be a positive count (the chain's budgets are step and iteration counts)",
            )
        check(
            self.grpo.supervision == "outcome" or (self.rl == "grpo" and self.rl_reward == "verifiable"),
            "grpo.supervision",
            self.grpo.supervision,
            "process supervision needs rl=grpo and rl_reward=verifiable (the step checker)",
        )

    def steps(self, budget: int) -> int:
        """A stage's budget under ``scale`` (at least one step)."""
        return max(1, round(budget * self.scale))

    @property
    def datasets(self) -> list[str]:
        return ["arithmetic"] + (["arithmetic_plain"] if self.plain else [])


# ----------------------------------------------------------------------------------- stages
def _warmup(steps: int) -> int:
    return max(1, steps // 20)


def _resume(config: PosttrainConfig, directory: Path) -> bool:
    """Continue a stage interrupted after its first checkpoint."""
    return config.resume and (directory / LATEST).is_file()


def _run_settings(config: PosttrainConfig, directory: Path) -> dict:
    """The training-loop fields every stage takes from the chain."""
    return dict(
        out=str(directory),
        seed=config.seed,
        device=config.device,
        resume=_resume(config, directory),
        progress=config.progress,
    )


def run_sft(config: PosttrainConfig, out: Path) -> dict:
    steps = config.steps(config.sft.train.max_steps)
    train = replace(
        config.sft.train,
        max_steps=steps,
        warmup_steps=_warmup(steps),
        dtype=config.dtype,
        **_run_settings(config, out / "sft"),
    )
    return sft(replace(config.sft, base=config.base, datasets=config.datasets, train=train))


def _preference_run(config: PosttrainConfig, section: RewardConfig | DPOConfig, directory: Path, base: Path):
    """A reward or DPO section as the chain runs it (short runs: a metrics row every few steps, one
    checkpoint at the end)."""
    steps = config.steps(section.train.max_steps)
    train = replace(
        section.train,
        max_steps=steps,
        warmup_steps=_warmup(steps),
        log_interval=max(1, steps // 20),
        checkpoint_interval=steps,
        dtype=config.dtype,
        **_run_settings(config, directory),
    )
    return replace(section, base=str(base), datasets=config.datasets, train=train)


def run_reward(config: PosttrainConfig, out: Path) -> dict:
    return train_reward(_preference_run(config, config.reward, out / "reward", out / "sft"))


def run_rl(config: PosttrainConfig, out: Path) -> dict:
    return train_rl(config, out / "sft", out / config.rl, out / "reward")


def train_rl(config: PosttrainConfig, policy: Path, directory: Path, reward_model: Path) -> dict:
    """The RL stage from ``policy`` into ``directory`` (``reward_model`` is used when ``rl_reward="model"``)."""
    section = config.grpo if config.rl == "grpo" else config.ppo
    reward = str(reward_model) if config.rl_reward == "model" else None
    run = replace(
        section,
        stage=replace(section.stage, policy=str(policy), reward_model=reward),
        rollout=replace(section.rollout, max_new_tokens=config.max_new_tokens),
        update=replace(section.update, iterations=config.steps(section.update.iterations)),
        train=replace(section.train, **_run_settings(config, directory)),
    )
    return grpo(run) if config.rl == "grpo" else ppo(run)


def shipped_rl_model(out: Path, rl: str) -> Path:
    """The model the RL stage hands on: its best checkpoint by validation accuracy (the run's ``best``
    pointer), or the SFT model it started from when no evaluation bettered it (never ship a worse model)."""
    best = out / rl / BEST
    return best if best.is_file() else out / "sft"


def run_dpo(config: PosttrainConfig, out: Path) -> dict:
    return train_dpo(config, shipped_rl_model(out, config.rl), out / "dpo")


def train_dpo(config: PosttrainConfig, policy: Path, directory: Path) -> dict:
    """The DPO stage from ``policy`` (also its reference) into ``directory``."""
    return dpo(_preference_run(config, config.dpo, directory, policy))


STAGE_FUNCTIONS: dict[str, Callable[[PosttrainConfig, Path], dict]] = {
    "sft": run_sft,
    "reward": run_reward,
    "rl": run_rl,
    "dpo": run_dpo,
}


# ------------------------------------------------------------------------------- the chain
def _load_state(config: PosttrainConfig, out: Path) -> dict:
    """The finished stages and evaluations of a resumed run (refusing one started from another base or RL stage)."""
    base = str(resolve_checkpoint(config.base).resolve())
    path = out / STATE_FILE
    if not (config.resume and path.is_file()):
        return {"base": base, "rl": config.rl, "stages": {}, "evaluations": {}}
    state = read_json(path)
    for name, value in (("base", base), ("rl", config.rl)):
        if state[name] != value:
            raise ConfigError(
                name,
                getattr(config, name),
                f"{path} was started with {name} {state[name]}; resume it with that or choose another --out",
            )
    return state


def _scalars(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if isinstance(value, (int, float, str, bool)) or value is None}


def evaluation_settings(config: PosttrainConfig, out: Path) -> EvaluationSettings:
    """The held-out problems and decoding settings every model of the table is evaluated with."""
    loaded = load_checkpoint(config.base)
    base_model, tokenizer = loaded.model, loaded.tokenizer
    problems = heldout_problems(
        tokenizer, config.eval_problems, config.seed, base_model.config.context_length, config.max_new_tokens
    )
    return EvaluationSettings(
        problems,
        config.max_new_tokens,
        config.shots,
        config.seed,
        resolve_device(config.device),
        out / EVALUATION_DIRECTORY,
    )


def posttrain(config: PosttrainConfig) -> dict:
    """SFT -> reward model -> GRPO or PPO -> DPO from ``config.base``, the evaluation of every stage and
    the report section; returns the table and the stages' summaries."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    state = _load_state(config, out)
    settings = evaluation_settings(config, out)
    judges: dict = {}  # the reward model and the SFT reference, loaded once when an evaluation needs them

    def judge(name: str):
        if name not in judges:
            judges[name] = (
                load_reward_model(out / "reward", device=settings.device)
                if name == "reward"
                else load_model(out / "sft", settings.device)[0].requires_grad_(False)
            )
        return judges[name]

    def checkpoint(stage: str) -> str:
        if stage == f"{config.rl}_best":
            return str(shipped_rl_model(out, config.rl))
        return config.base if stage == "base" else str(out / stage)

    def same_model(stage: str) -> str | None:
        """An evaluated stage whose checkpoint ``stage`` is (the best RL model is often the last or the SFT one)."""
        folder = resolve_checkpoint(checkpoint(stage))
        return next((other for other in ("sft", config.rl) if resolve_checkpoint(checkpoint(other)) == folder), None)

    def save() -> None:
        atomic_write_json(out / STATE_FILE, state)

    plan = [("sft", []), ("reward", ["base", "sft"]), ("rl", [config.rl, f"{config.rl}_best"]), ("dpo", ["dpo"])]
    for stage, evaluations in plan:
        if stage not in state["stages"]:
            stage_started = time.perf_counter()
            summary = STAGE_FUNCTIONS[stage](config, out)
            if summary["interrupted"]:  # SIGINT/SIGTERM: the stage saved a checkpoint, which --resume continues
                raise KeyboardInterrupt
            state["stages"][stage] = {
                **_scalars(summary),
                "stage_seconds": round(time.perf_counter() - stage_started, 1),
            }
            save()
        for evaluated in evaluations:
            same = same_model(evaluated) if evaluated == f"{config.rl}_best" else None
            if same and evaluated not in state["evaluations"]:  # the same weights: the same answers, not run again
                for mode in ("calculator", "plain"):
                    answers = [record for _, record in iter_jsonl(settings.records / f"{same}_{mode}.jsonl")]
                    atomic_write_jsonl(settings.records / f"{evaluated}_{mode}.jsonl", answers)
                state["evaluations"][evaluated] = {**state["evaluations"][same], "seconds": 0.0}
                save()
            if evaluated not in state["evaluations"]:
                evaluation_started = time.perf_counter()
                metrics = evaluate_model(
                    checkpoint(evaluated), evaluated, settings, judge("reward"), judge("reference")
                )
                state["evaluations"][evaluated] = {
                    **metrics,
                    "seconds": round(time.perf_counter() - evaluation_started, 1),
                }
                save()

    rows = table_rows(state, config.rl)
    report_directory = Path(config.report) if config.report else out
    figure = plot_posttrain(out, rows, config.rl)
    metrics = {
        f"{row['stage']}_{key}": row[key]
        for row in rows
        for key in ("accuracy_calculator", "accuracy_plain", "reward", "kl")
        if row.get(key) is not None
    }
    # The gain of the model the RL stage ships (its best checkpoint), and of its last one.
    sft, last, best = (rows[index]["accuracy_calculator"] for index in (1, 2, 3))
    gain, last_gain = best - sft, last - sft
    seconds = round(time.perf_counter() - started, 1)
    metrics.update(
        rl_gain_over_sft=round(gain, 4),
        rl_last_gain_over_sft=round(last_gain, 4),
        eval_problems=len(settings.problems),
        seconds=seconds,
    )
    add_section(
        report_directory,
        "posttrain",
        {**metrics, "table": rows},
        render_table(rows, config, state),
        images=[os.path.relpath(figure, report_directory)],
    )
    return {
        "table": rows,
        "rl_gain_over_sft": gain,
        "rl_last_gain_over_sft": last_gain,
        "eval_problems": len(settings.problems),
        "stages": state["stages"],
        "seconds": seconds,
        "figure": str(figure),
        "records": str(settings.records),
        "report": str(report_directory / "report.md"),
    }


# ------------------------------------------------------------------------------ the table
def table_rows(state: dict, rl: str) -> list[dict]:
    """One row per evaluated model, in the chain's order."""
    rows = []
    for stage in ("base", "sft", rl, f"{rl}_best", "dpo"):
        evaluation = state["evaluations"][stage]
        rows.append(
            {
                "stage": stage,
                "accuracy_calculator": evaluation["accuracy_calculator"],
                "accuracy_plain": evaluation["accuracy_plain"],
                "reward": evaluation.get("reward"),
                "kl": evaluation.get("kl"),
                "shots": evaluation.get("shots"),
            }
        )
    return rows


def render_table(rows: list[dict], config: PosttrainConfig, state: dict) -> str:
    def number(value) -> str:
        return "—" if value is None else f"{value:.3f}"

    lines = [
        "| model | accuracy, calculator | accuracy, no calculator | reward (RM) | KL to SFT (nats) |",
        "|---|---|---|---|---|",
    ]
    names = {
        "base": "base ({shots}-shot)",
        config.rl: f"{config.rl} (last)",
        f"{config.rl}_best": f"{config.rl} (best)",
    }
    for row in rows:
        name = names.get(row["stage"], row["stage"]).format(shots=row["shots"])
        lines.append(
            f"| {name} | {number(row['accuracy_calculator'])} | {number(row['accuracy_plain'])} | "
            f"{number(row['reward'])} | {number(row['kl'])} |"
        )
    stages = state["stages"]
    reward_accuracy = stages["reward"].get("heldout_accuracy")
    rl_section = config.grpo if config.rl == "grpo" else config.ppo
    best_step = stages["rl"].get("best_step")
    best = "the SFT model (no validation bettered it)" if not best_step else f"step {best_step}"
    return "\n".join(
        [
            f"SFT ({stages['sft'].get('steps')} steps on {config.sft.generated_examples} worked solutions of each "
            f"form) → reward model ({stages['reward'].get('steps')} steps, held-out pair accuracy "
            f"{number(reward_accuracy)}) → {config.rl.upper()} ({stages['rl'].get('iterations')} iterations on "
            f"{rl_section.stage.train_problems} prompts whose solutions no stage shows, {config.rl_reward} reward; "
            f"its best checkpoint by accuracy on {rl_section.stage.validation_problems} validation problems: "
            f"{best}) → DPO ({stages['dpo'].get('steps')} steps, from that best model) on the embedded arithmetic "
            f"task. Greedy answers to {state['evaluations']['sft']['problems']} held-out test problems; the base "
            f"model gets a plain-text few-shot prompt, the others the chat prompt. Every answer is in `evaluation/`.",
            "",
            *lines,
        ]
    )


# ------------------------------------------------------------------------------- the figure
CURVES = (
    ("sft", "loss", "SFT loss (assistant tokens)"),
    ("reward", "accuracy", "reward model: pair accuracy"),
    ("rl", "reward", "RL: mean rollout reward"),
    ("dpo", "rewards/margins", "DPO: implicit reward margin"),
)


def _curve(metrics: Path, column: str) -> tuple[list[int], list[float]]:
    """A training metric of a run's metrics.csv against the step (its before/end rows left out)."""
    if not metrics.is_file():
        return [], []
    with open(metrics, newline="") as file:
        rows = [row for row in csv.DictReader(file) if not row.get("event") and row.get(column) not in ("", None)]
    return [int(row["step"]) for row in rows], [float(row[column]) for row in rows]


def plot_posttrain(out: Path, rows: list[dict], rl: str) -> Path:
    """``out/posttrain.png``: held-out accuracy of every model with and without the calculator, and the
    training curve of every stage."""
    plt = pyplot()

    figure, axes = plt.subplots(1, 1 + len(CURVES), figsize=(3.6 * (1 + len(CURVES)), 3.4))
    positions = range(len(rows))
    for offset, (key, label) in (
        (-0.2, ("accuracy_calculator", "calculator")),
        (0.2, ("accuracy_plain", "no calculator")),
    ):
        axes[0].bar([position + offset for position in positions], [row[key] for row in rows], width=0.4, label=label)
    axes[0].set_xticks(list(positions), [row["stage"] for row in rows])
    axes[0].set_title("held-out accuracy")
    axes[0].legend(fontsize=8)
    for axis, (stage, column, title) in zip(axes[1:], CURVES):
        steps, values = _curve(out / (rl if stage == "rl" else stage) / "metrics.csv", column)
        axis.plot(steps, values, marker="o" if stage == "rl" else None, markersize=3)
        axis.set_title(title.replace("RL", rl.upper()), fontsize=10)
        axis.set_xlabel("iteration" if stage == "rl" else "step")
    for axis in axes:
        axis.grid(alpha=0.3)
    return save_figure(figure, out / FIGURE)
