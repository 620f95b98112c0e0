"""The alignment algorithms people compare, at matched compute on one task: SFT, best-of-n, DPO, IPO, PPO and
GRPO, each from the same SFT model.

From a finished ``llmkit speedrun`` folder (``--from-speedrun``): its SFT model and its reward model, on its
task, the embedded arithmetic word problems with the calculator. The answer checker (right or not) is the
gold; the reward model (trained on the task's generated pairs: right solutions over corrupted ones) is the
proxy. Every method starts from the SFT model, with the SFT model as its KL reference, with the chain's own
settings (:mod:`llmkit.align.posttrain`'s sections) except for its budget: each training method gets the
same wall-clock budget on this machine (``--budget``, default 270 s, what the speedrun's GRPO stage took):

- ``grpo``: the checker's reward, 8 prompts x 8 samples an iteration; ``ppo``: the reward model's, 64
  samples an iteration, KL penalty 0.04; both ship their best checkpoint by validation accuracy (64
  problems of the validation split), or the SFT model when no evaluation bettered it;
- ``dpo`` and ``ipo``: the task's generated preference pairs (200 problems of each solution form), as many
  passes as the budget allows; the last checkpoint;
- ``best_of_16``: 16 samples (temperature 1) of the SFT model per problem, the reward model's favourite
  kept. No training: its compute is spent at inference, ``wall_s`` being its sampling and scoring of the
  test problems.

Every model is measured as the speedrun's table measures it, on the same 200 held-out problems
(:func:`llmkit.align.posttrain_eval.evaluate_model`): ``accuracy`` (greedy, calculator on; best-of-n: its
chosen samples), ``proxy`` (the reward model's mean score of those answers), ``kl`` to the SFT model (the
mean over one sampled answer per problem of the sum of log pi - log pi_SFT, nats; best-of-n: log n -
(n - 1) / n, Stiennon et al. 2020), ``wall_s`` (training) and ``steps``.

JSON lines: one ``algorithm`` line per method; ``algorithms.md`` (the table) in ``--out``. Timings taken
while other jobs share the CPU are void; accuracies are not.

Usage: python benchmarks/algorithms_table.py --from-speedrun runs/speedrun [--budget 270] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from llmkit.align.dpo import dpo  # noqa: E402
from llmkit.align.posttrain import (  # noqa: E402
    PosttrainConfig,
    evaluation_settings,
    train_rl,
)
from llmkit.align.posttrain_eval import evaluate_model  # noqa: E402
from llmkit.align.reward import load_reward_model  # noqa: E402
from llmkit.align.rollout import chat_prompt, generate_rollouts  # noqa: E402
from llmkit.infer.engine import Engine  # noqa: E402
from llmkit.infer.sampling import GenerationConfig  # noqa: E402
from llmkit.infer.tools import select_tools  # noqa: E402
from llmkit.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from llmkit.model.checkpoint import BEST, load_checkpoint, load_model, resolve_checkpoint  # noqa: E402
from llmkit.tasks import arithmetic  # noqa: E402


def best_of_n(sft: Path, settings, proxy, n: int) -> dict:
    """``n`` samples of every held-out problem, the proxy's favourite kept: its accuracy and mean proxy."""
    loaded = load_checkpoint(sft)
    tokenizer = loaded.tokenizer
    prompts = [chat_prompt(tokenizer, arithmetic.prompt_messages(problem, True)) for problem in settings.problems]
    rollouts = generate_rollouts(
        Engine(loaded.model, tokenizer, decoding_layout=True, max_batch_size=64),
        prompts,
        n,
        GenerationConfig(max_new_tokens=settings.max_new_tokens, temperature=1.0),
        select_tools("calculator"),
        settings.seed,
        0,
    )
    context = loaded.model.config.context_length
    scores = proxy.score_ids([(rollout.prompt.ids + rollout.token_ids)[:context] for rollout in rollouts])
    right, chosen = [], []
    for index, problem in enumerate(settings.problems):
        best = max(range(index * n, (index + 1) * n), key=lambda position: scores[position])
        right.append(arithmetic.check_answer(problem, rollouts[best].text))
        chosen.append(scores[best])
    return {"accuracy": statistics.fmean(right), "proxy": statistics.fmean(chosen), "kl": math.log(n) - (n - 1) / n}


def budgeted(config: PosttrainConfig, budget: int) -> PosttrainConfig:
    """The chain's RL settings with ``budget`` seconds instead of an iteration budget."""
    time_budget = f"{budget}s"
    grpo, ppo = config.grpo, config.ppo
    return replace(
        config,
        grpo=replace(
            grpo, update=replace(grpo.update, iterations=10**6), train=replace(grpo.train, max_time=time_budget)
        ),
        ppo=replace(ppo, update=replace(ppo.update, iterations=10**6), train=replace(ppo.train, max_time=time_budget)),
    )


def run_dpo(config: PosttrainConfig, loss: str, budget: int, sft: Path, directory: Path) -> dict:
    """The chain's DPO section (its pairs, learning rate, precision, a warm-up of 2 steps as the chain's
    40-step run has) from ``sft`` with loss ``loss``, for ``budget`` seconds instead of 40 steps. Many
    passes over the pairs take the loss (IPO's squared one most) near zero, where one batch's loss is
    easily twice the running mean: the spike guard gets SFT's looser ratio and a checkpoint every 50
    steps to roll back to, instead of ending the run."""
    section = config.dpo
    train = replace(
        section.train,
        max_steps=None,
        max_time=f"{budget}s",
        warmup_steps=2,
        spike_ratio=4.0,
        checkpoint_interval=50,
        out=str(directory),
        dtype=config.dtype,
        seed=config.seed,
        progress=False,
    )
    return dpo(replace(section, base=str(sft), datasets=config.datasets, loss=loss, train=train))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-speedrun", required=True, help="a finished `llmkit speedrun` folder (sft/, reward/)")
    parser.add_argument("--budget", type=int, default=270, help="training seconds given to each method")
    parser.add_argument("--out", help="working folder (default: a temporary one); algorithms.md goes there")
    parser.add_argument("--quick", action="store_true", help="small sizes: shows the benchmark works, not the result")
    arguments = parser.parse_args()
    speedrun, budget, n = Path(arguments.from_speedrun), arguments.budget, 4 if arguments.quick else 16
    sft, reward = speedrun / "sft", speedrun / "reward"
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(arguments.out or scratch)
        out.mkdir(parents=True, exist_ok=True)
        # The settings `llmkit speedrun` runs post-training with, as posttrain_quality.py reads them.
        config = PosttrainConfig(
            base=str(speedrun / "base"),
            out=str(out),
            rl="grpo",
            dtype="bfloat16",
            progress=False,
            **(dict(eval_problems=16) if arguments.quick else {}),
        )
        config = budgeted(config, budget)
        trainings = {
            "grpo": lambda: train_rl(config, sft, out / "grpo", reward),
            "ppo": lambda: train_rl(replace(config, rl="ppo", rl_reward="model"), sft, out / "ppo", reward),
            "dpo": lambda: run_dpo(config, "dpo", budget, sft, out / "dpo"),
            "ipo": lambda: run_dpo(config, "ipo", budget, sft, out / "ipo"),
        }
        runs = {}  # method -> (its run folder, its training summary)
        for method, train in trainings.items():
            # A method trained by an earlier call with the same --out is not trained again.
            record = out / f"{method}_summary.json"
            if not record.is_file():
                summary = train()
                atomic_write_json(record, {"seconds": summary["seconds"], "steps": summary["steps"], "budget": budget})
            runs[method] = (out / method, read_json(record))

        settings = evaluation_settings(config, out)
        proxy = load_reward_model(reward)
        reference = load_model(sft, settings.device)[0].requires_grad_(False)
        evaluated = evaluate_model(sft, "sft", settings, proxy, reference)
        rows = {"sft": {"accuracy": evaluated["accuracy_calculator"], "proxy": evaluated["reward"], "kl": 0.0}}
        start = time.perf_counter()
        rows[f"best_of_{n}"] = best_of_n(sft, settings, proxy, n)
        rows[f"best_of_{n}"]["wall_s"] = time.perf_counter() - start
        for method, (run, summary) in runs.items():
            shipped = run
            if method in ("grpo", "ppo"):  # no validation bettered the start: the RL stage ships the SFT model
                shipped = run / BEST if (run / BEST).is_file() else sft
            evaluated = evaluate_model(resolve_checkpoint(shipped), method, settings, proxy, reference)
            rows[method] = {
                "accuracy": evaluated["accuracy_calculator"],
                "proxy": evaluated["reward"],
                "kl": evaluated["kl"],
                "wall_s": summary["seconds"],
                "steps": summary["steps"],
                "shipped": "sft" if shipped == sft else resolve_checkpoint(shipped).name,
            }
        for method, row in rows.items():
            emit(
                "algorithm",
                round(row["accuracy"], 4),
                "accuracy",
                method=method,
                proxy=round(row["proxy"], 4),
                kl=round(row["kl"], 3),
                wall_s=round(row.get("wall_s", 0.0), 1),
                steps=row.get("steps", 0),
                shipped=row.get("shipped"),
                budget_s=budget if method in runs else None,
                problems=len(settings.problems),
            )
        table = [
            "| method | held-out accuracy | proxy reward | KL to SFT | wall s | steps |",
            "|---|---|---|---|---|---|",
        ]
        table += [
            f"| {method} | {row['accuracy']:.3f} | {row['proxy']:.3f} | {row['kl']:.2f} | "
            f"{row.get('wall_s', 0.0):.0f} | {row.get('steps', 0)} |"
            for method, row in rows.items()
        ]
        atomic_write_text(out / "algorithms.md", "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
