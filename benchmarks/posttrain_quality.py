"""Post-training quality on the embedded arithmetic task, from a model pretrained by ``llmkit speedrun``.

Runs the post-training chain (:mod:`llmkit.align.posttrain`: SFT -> reward model -> GRPO or PPO ->
DPO) from the pretrained model, then the RL stage and DPO again from the same starts with other seeds
(``--seeds``, default 3 in all), and prints one JSON object per line:

- ``accuracy`` with ``stage`` (``base`` few-shot, ``sft``, ``grpo``/``ppo`` (the RL run's last checkpoint),
  ``grpo_best`` (its best by validation accuracy, the model the chain ships), ``dpo``, and the other seeds'
  runs as ``grpo_seed1``, ``grpo_seed1_best``, ``dpo_seed1``, ...) and ``tool`` (``on``: the calculator runs;
  ``off``: inline arithmetic, no tools): greedy held-out accuracy;
- ``rl_gain_over_sft`` with ``stage`` (the shipped best RL checkpoint, the last one, DPO): the accuracy minus
  the SFT model's (calculator on), the mean over the seeds, with each seed's gain and ``goal_met`` (the mean
  gain above twice the spread); ``seed_spread``: the sample standard deviation of the seeds' accuracies
  (with their range);
- ``sampled_accuracy``, ``majority_accuracy`` and ``pass_at_k`` with ``stage`` (``sft`` and the RL
  stage), ``samples`` and ``temperature``: over ``k`` completions sampled per held-out problem (the
  calculator on), the share that is right (pass@1 as RL's rollouts see it), the share of problems
  whose most frequent answer is right (maj@k, self-consistency) and the share with at least one right
  answer (pass@k). RL mostly moves pass@1 towards maj@k (DeepSeekMath §5.2.2; Yue et al. 2025), so
  ``majority_accuracy`` minus the greedy accuracy is the headroom RL has on greedy decoding;
- ``reward_model_accuracy`` with ``data``: the reward model's accuracy on held-out generated pairs
  (problems of the held-out split), and on a held-out tenth of the HH-RLHF harmless-base pairs in
  ``../shared/data/hh_rlhf`` for a second reward model trained on the other nine tenths (skipped, with
  the reason, when the data is absent).

Usage:
    python benchmarks/posttrain_quality.py --from-speedrun runs/speedrun  # reuse a finished speedrun's stages
    python benchmarks/posttrain_quality.py --base runs/speedrun/base   # a model from `llmkit speedrun`
    python benchmarks/posttrain_quality.py                             # pretrains one first (10 minutes)
    python benchmarks/posttrain_quality.py --quick                     # a short run that shows it works
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED_DATA, emit  # noqa: E402

HH_RLHF = SHARED_DATA / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
TOOLS = {"calculator": "on", "plain": "off"}


def pretrained_base(out: Path, max_time: str) -> Path:
    """A model pretrained by ``llmkit speedrun`` (post-training left to this benchmark)."""
    from llmkit.speedrun import SpeedrunConfig, speedrun

    speedrun(SpeedrunConfig(out=str(out / "speedrun"), max_time=max_time, samples=0, posttrain=False, progress=False))
    return out / "speedrun" / "base"


def seed_accuracies(config, out: Path, seed: int, settings, reference) -> dict[str, float]:
    """The RL stage and DPO again with another ``seed`` from the same starts as the chain's (RL from the SFT
    model, DPO from the chain's shipped RL model), evaluated like the chain's stages on the same held-out
    problems: held-out accuracy (calculator on) of the RL run's last and best checkpoints and of DPO."""
    from llmkit.align.posttrain import shipped_rl_model, train_dpo, train_rl
    from llmkit.align.posttrain_eval import evaluate_model
    from llmkit.model.checkpoint import resolve_checkpoint

    seeded = dataclasses.replace(config, seed=seed)
    rl, accuracies = f"{config.rl}_seed{seed}", {}
    train_rl(seeded, out / "sft", out / rl, out / "reward")
    train_dpo(seeded, shipped_rl_model(out, config.rl), out / f"dpo_seed{seed}")
    evaluated: dict[Path, dict] = {}  # the best checkpoint is often the last one (or SFT): evaluated once
    stages = {  # the chain's stage name -> (this seed's name, its checkpoint)
        config.rl: (rl, out / rl),
        f"{config.rl}_best": (f"{rl}_best", shipped_rl_model(out, rl)),
        "dpo": (f"dpo_seed{seed}", out / f"dpo_seed{seed}"),
    }
    for stage, (name, path) in stages.items():
        folder = resolve_checkpoint(path)
        if folder not in evaluated:
            evaluated[folder] = evaluate_model(folder, name, settings, None, reference)
        emit_accuracies(evaluated[folder], stage=name, seed=seed, problems=evaluated[folder]["problems"])
        accuracies[stage] = evaluated[folder]["accuracy_calculator"]
    return accuracies


def emit_accuracies(metrics: dict, **context) -> None:
    """``accuracy`` lines, calculator on and off, of an evaluated model."""
    for mode, tool in TOOLS.items():
        emit("accuracy", metrics[f"accuracy_{mode}"], "fraction", tool=tool, **context)


def emit_gains(stage: str, sft: float, accuracies: list[float], seeds: list[int]) -> None:
    """The gain over SFT of ``stage`` as the mean over seeds, and the seeds' spread (sample standard deviation
    of the accuracies): the goal is a gain above twice the spread."""
    gains = [round(accuracy - sft, 4) for accuracy in accuracies]
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else float("nan")
    mean = statistics.fmean(gains)
    emit(
        "rl_gain_over_sft",
        round(mean, 4),
        "fraction",
        stage=stage,
        tool="on",
        seeds=seeds,
        per_seed=gains,
        sft_accuracy=sft,
        goal_met=bool(mean > 2 * spread),
    )
    emit(
        "seed_spread",
        round(spread, 4),
        "fraction",
        stage=stage,
        tool="on",
        seeds=seeds,
        accuracies=accuracies,
        accuracy_range=round(max(accuracies) - min(accuracies), 4),
        note="sample standard deviation over the seeds of the held-out accuracy (calculator on)",
    )


def sampling_headroom(path: Path, stage: str, settings, samples: int, temperature: float) -> None:
    """pass@1, maj@k and pass@k of ``samples`` completions per held-out problem, with the calculator."""
    from llmkit.align.rollout import chat_prompt, generate_rollouts
    from llmkit.infer.answers import majority_vote
    from llmkit.infer.engine import Engine
    from llmkit.infer.sampling import GenerationConfig
    from llmkit.infer.tools import select_tools
    from llmkit.model.checkpoint import load_checkpoint
    from llmkit.tasks import arithmetic

    loaded = load_checkpoint(path)

    model, tokenizer = loaded.model, loaded.tokenizer
    model.to(settings.device)
    prompts = [chat_prompt(tokenizer, arithmetic.prompt_messages(problem, True)) for problem in settings.problems]
    rollouts = generate_rollouts(
        Engine(model, tokenizer, decoding_layout=True, max_batch_size=64),
        prompts,
        samples,
        GenerationConfig(max_new_tokens=settings.max_new_tokens, temperature=temperature),
        select_tools("calculator"),
        settings.seed,
        0,
    )
    right = majority = any_right = 0
    for index, problem in enumerate(settings.problems):
        texts = [rollout.text for rollout in rollouts[index * samples : (index + 1) * samples]]
        correct = [arithmetic.check_answer(problem, text) for text in texts]
        right, any_right = right + sum(correct), any_right + any(correct)
        winner, _ = majority_vote(
            [arithmetic.final_answer(text) for text in texts]
        )  # exact numbers, not their spelling
        majority += winner is not None and winner == problem.answer
    context = dict(stage=stage, tool="on", samples=samples, temperature=temperature, problems=len(settings.problems))
    emit("sampled_accuracy", round(right / len(rollouts), 4), "fraction", **context)
    emit("majority_accuracy", round(majority / len(settings.problems), 4), "fraction", **context)
    emit("pass_at_k", round(any_right / len(settings.problems), 4), "fraction", **context)


def hh_rlhf_accuracy(out: Path, steps: int) -> None:
    """A reward model from the SFT model on nine tenths of HH-RLHF harmless-base; accuracy on the rest."""
    if not HH_RLHF.is_file():
        emit(
            "skipped",
            0,
            "",
            what="reward_model_accuracy on hh_rlhf",
            reason=f"{HH_RLHF} not found (the shared datasets live beside the repository)",
        )
        return
    from llmkit.align.reward import RewardConfig, reward_training, train_reward

    summary = train_reward(
        RewardConfig(
            base=str(out / "sft"),
            datasets=[str(HH_RLHF)],
            val_fraction=0.1,
            epochs=1.0,
            train=reward_training(out=str(out / "reward_hh"), max_steps=steps, eval_interval=0, progress=False),
        )
    )
    emit(
        "reward_model_accuracy",
        summary["heldout_accuracy"],
        "fraction",
        data="hh_rlhf",
        heldout_pairs=summary["heldout_pairs"],
        train_pairs=summary["train_pairs"],
        dropped_pairs=summary["dropped_pairs"],
        steps=summary["steps"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="pretrained checkpoint from `llmkit speedrun` (default: pretrain one)")
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    parser.add_argument(
        "--from-speedrun",
        help="a finished `llmkit speedrun` folder: its base model and post-training "
        "stages are reused (resumed), only the second RL seed and HH-RLHF run",
    )
    parser.add_argument("--rl", choices=["grpo", "ppo"], default="grpo")
    parser.add_argument("--seeds", type=int, default=3, help="RL and DPO runs with different seeds (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="small budgets: shows the benchmark works, not the quality"
    )
    arguments = parser.parse_args()

    from llmkit.align.posttrain import PosttrainConfig, evaluation_settings, posttrain
    from llmkit.model.checkpoint import load_model

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(arguments.out or scratch)
        quick = dict(scale=0.15, eval_problems=60) if arguments.quick else {}
        if arguments.from_speedrun:
            # The settings `llmkit speedrun` runs post-training with (its defaults).
            speedrun = Path(arguments.from_speedrun)
            config = PosttrainConfig(
                base=str(speedrun / "base"),
                out=str(speedrun),
                report=str(speedrun),
                rl=arguments.rl,
                dtype="bfloat16",
                resume=True,
                progress=False,
                **quick,
            )
        else:
            base = Path(arguments.base) if arguments.base else pretrained_base(out, "1m" if arguments.quick else "10m")
            config = PosttrainConfig(
                base=str(base), out=str(out / "posttrain"), rl=arguments.rl, progress=False, **quick
            )
        result = posttrain(config)
        out = Path(config.out)
        for row in result["table"]:
            shots = {"shots": row["shots"]} if row["stage"] == "base" else {}
            emit_accuracies(row, stage=row["stage"], problems=result["eval_problems"], **shots)
        rows = {row["stage"]: row["accuracy_calculator"] for row in result["table"]}
        settings = evaluation_settings(config, out)
        reference = load_model(out / "sft", settings.device)[0].requires_grad_(False)
        seeds = [config.seed + offset for offset in range(arguments.seeds)]
        runs = [
            {arguments.rl: rows[arguments.rl], f"{arguments.rl}_best": rows[f"{arguments.rl}_best"], "dpo": rows["dpo"]}
        ]
        runs += [seed_accuracies(config, out, seed, settings, reference) for seed in seeds[1:]]
        for stage, name in (
            (f"{arguments.rl}_best", f"{arguments.rl} (best checkpoint, shipped)"),
            (arguments.rl, f"{arguments.rl} (last checkpoint)"),
            ("dpo", "dpo"),
        ):
            emit_gains(name, rows["sft"], [run[stage] for run in runs], seeds)
        for stage in ("sft", arguments.rl):
            sampling_headroom(out / stage, stage, settings, 4 if arguments.quick else 16, 1.0)
        emit(
            "reward_model_accuracy",
            result["stages"]["reward"]["heldout_accuracy"],
            "fraction",
            data="generated_pairs",
            heldout_pairs=result["stages"]["reward"]["heldout_pairs"],
        )
        hh_rlhf_accuracy(out, 20 if arguments.quick else 200)


if __name__ == "__main__":
    main()
