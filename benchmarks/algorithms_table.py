"""The alignment algorithms people compare, at matched compute on one task: SFT, best-of-n, DPO, IPO, PPO and
GRPO, each from the same SFT model.

The task and gold reward are rlhf_gold.py's: the embedded arithmetic word problems answered inline
(``arithmetic_plain``, no tools), gold = right (1) or not (0) less 0.005 per generated token. From the SFT
model (``--sft``, e.g. a speedrun's ``sft/``):

1. two samples for each of ``--pairs`` RL prompts, labelled by the gold with a tenth of the labels flipped
   (rlhf_gold.preference_pairs), and a reward model trained on them: the *proxy*;
2. each training method gets the same wall-clock budget on this machine (``--budget``, every core), from the
   SFT model, with the SFT model as its KL reference:

   - ``dpo`` and ``ipo`` (``llmkit dpo --loss dpo|ipo``) on the gold-labelled pairs, passing over them as
     often as the budget allows; the last checkpoint;
   - ``ppo`` against the proxy reward model (KL penalty 0.05), ``grpo`` against the task's verifier (right
     or not), 32 sampled answers an iteration each; the best checkpoint by validation accuracy (64
     problems of the validation split), which is the model an RL stage ships;
   - ``best_of_16``: 16 samples of the SFT model per problem, the proxy's favourite kept: no training, its
     compute is spent at inference (``wall_s`` is its sampling and scoring of the test problems);

3. every model on the same ``--test`` held-out problems: ``accuracy`` (greedy; best-of-n: its chosen
   sample), ``gold`` and ``proxy`` (the mean over one sampled answer per problem; best-of-n: the chosen
   one), ``kl`` to the SFT model (nats per answer, sampled; best-of-n: log n - (n - 1) / n), ``wall_s``
   (training; ``budget`` says what each was given) and ``steps``.

JSON lines: one ``algorithm`` line per method with those fields, and ``algorithms.md`` (the table) in
``--out``. Timings taken while other jobs share the CPU are void; the accuracies are not.

Usage: python benchmarks/algorithms_table.py --sft runs/speedrun/sft [--budget 240] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402
from rlhf_gold import SEED, TASK, Policy, best_of_n, measure, preference_pairs  # noqa: E402

from llmkit.align.dpo import DPOConfig, dpo, dpo_training  # noqa: E402
from llmkit.align.grpo import GRPOConfig, grpo, grpo_update  # noqa: E402
from llmkit.align.ppo import PPOConfig, ppo  # noqa: E402
from llmkit.align.reward import RewardConfig, load_reward_model, reward_training, train_reward  # noqa: E402
from llmkit.align.rl_source import RolloutConfig, UpdateConfig, steps_per_iteration  # noqa: E402
from llmkit.align.rl_stage import RLStageConfig, rl_training  # noqa: E402
from llmkit.align.rollout import chat_prompt, generate_rollouts  # noqa: E402
from llmkit.infer.sampling import GenerationConfig  # noqa: E402
from llmkit.io import atomic_write_text  # noqa: E402
from llmkit.model.checkpoint import load_model, resolve_checkpoint  # noqa: E402
from llmkit.tasks import arithmetic  # noqa: E402
from llmkit.tasks.registry import embedded_task  # noqa: E402

MAX_NEW_TOKENS = 96
ANSWERS_PER_ITERATION = 32  # PPO: 32 prompts x 1; GRPO: 4 prompts x 8
COLUMNS = ["accuracy", "gold", "proxy", "kl", "wall_s", "steps"]


def greedy_accuracy(path: Path, problems: list) -> float:
    policy = Policy(path, MAX_NEW_TOKENS)
    task = embedded_task(TASK)
    prompts = [chat_prompt(policy.tokenizer, task.prompt(problem)) for problem in problems]
    greedy = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0)
    rollouts = generate_rollouts(policy.engine, prompts, 1, greedy, None, SEED, 0)
    return statistics.fmean(
        arithmetic.check_answer(problem, rollout.text) for problem, rollout in zip(problems, rollouts)
    )


def rl_stage(sft: Path, reward_model: Path | None, validation: int) -> RLStageConfig:
    return RLStageConfig(
        policy=str(sft),
        task=TASK,
        reward_model=None if reward_model is None else str(reward_model),
        train_problems=2000,
        validation_problems=validation,
    )


def rl_train(out: Path, budget: int, update: UpdateConfig, every: int):
    """The RL stages' loop settings: ``budget`` seconds, a checkpoint and validation every ``every`` iterations."""
    interval = every * steps_per_iteration(ANSWERS_PER_ITERATION, update)
    return rl_training(
        out=str(out),
        lr=5e-5,
        max_time=f"{budget}s",
        checkpoint_interval=interval,
        eval_interval=interval,
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="the SFT checkpoint (e.g. a speedrun's sft/ folder)")
    parser.add_argument("--budget", type=int, default=240, help="training seconds given to each method")
    parser.add_argument("--out", help="working folder (default: a temporary one); algorithms.md goes there")
    parser.add_argument("--quick", action="store_true", help="small sizes: shows the benchmark works, not the result")
    arguments = parser.parse_args()
    sizes = (
        dict(pairs=48, test=16, reward_steps=8, validation=8, every=1, n=4)
        if arguments.quick
        else dict(pairs=600, test=200, reward_steps=150, validation=64, every=4, n=16)
    )
    budget = arguments.budget
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(arguments.out or scratch)
        out.mkdir(parents=True, exist_ok=True)
        task, sft_path = embedded_task(TASK), Path(arguments.sft)
        sft = Policy(sft_path, MAX_NEW_TOKENS)
        pairs_file = out / "gold_pairs.jsonl"
        pairs = preference_pairs(sft, task.items(sizes["pairs"], SEED, "prompts"), pairs_file)
        train_reward(
            RewardConfig(
                base=str(sft_path),
                datasets=[str(pairs_file)],
                val_fraction=0.15,
                epochs=None,
                train=reward_training(out=str(out / "reward"), max_steps=sizes["reward_steps"], progress=False),
            )
        )
        runs = {}  # method -> (checkpoint shipped, training summary)
        for loss in ("dpo", "ipo"):
            summary = dpo(
                DPOConfig(
                    base=str(sft_path),
                    datasets=[str(pairs_file)],
                    loss=loss,
                    epochs=None,
                    train=dpo_training(out=str(out / loss), max_time=f"{budget}s", progress=False),
                )
            )
            runs[loss] = (out / loss, summary)
        update = UpdateConfig(iterations=10**6, epochs=2, minibatch_size=16)
        summary = ppo(
            PPOConfig(
                kl_coef=0.05,
                stage=rl_stage(sft_path, out / "reward", sizes["validation"]),
                rollout=RolloutConfig(
                    prompts_per_iteration=ANSWERS_PER_ITERATION, max_new_tokens=MAX_NEW_TOKENS, tools="none"
                ),
                update=update,
                train=rl_train(out / "ppo", budget, update, sizes["every"]),
            )
        )
        runs["ppo"] = (out / "ppo", summary)
        group = 8
        update = grpo_update(iterations=10**6)
        summary = grpo(
            GRPOConfig(
                group_size=group,
                stage=rl_stage(sft_path, None, sizes["validation"]),
                rollout=RolloutConfig(
                    prompts_per_iteration=ANSWERS_PER_ITERATION // group, max_new_tokens=MAX_NEW_TOKENS, tools="none"
                ),
                update=update,
                train=rl_train(out / "grpo", budget, update, sizes["every"]),
            )
        )
        runs["grpo"] = (out / "grpo", summary)

        proxy = load_reward_model(out / "reward")
        reference, _ = load_model(sft_path)
        test = task.items(sizes["test"], SEED, "heldout")
        rows = {}
        measured = measure(sft_path, test, proxy, reference, MAX_NEW_TOKENS)
        rows["sft"] = {"accuracy": greedy_accuracy(sft_path, test), **measured, "wall_s": 0.0, "steps": 0}
        start = time.perf_counter()
        chosen = best_of_n(sft, test, proxy, sizes["n"])[-1]
        rows[f"best_of_{sizes['n']}"] = {**chosen, "wall_s": time.perf_counter() - start, "steps": 0}
        for method, (run, summary) in runs.items():
            shipped = run
            if method in ("ppo", "grpo"):  # no validation bettered the start: the RL stage ships the SFT model
                shipped = run / "best" if (run / "best").is_file() else sft_path
            folder = resolve_checkpoint(shipped)
            measured = measure(folder, test, proxy, reference, MAX_NEW_TOKENS)
            rows[method] = {
                "accuracy": greedy_accuracy(folder, test),
                **measured,
                "wall_s": summary["seconds"],
                "steps": summary["steps"],
                "shipped": folder.name if folder != resolve_checkpoint(sft_path) else "sft",
            }
        for method, row in rows.items():
            emit(
                "algorithm",
                round(row["accuracy"], 4),
                "accuracy",
                method=method,
                **{column: round(row[column], 4) for column in COLUMNS[1:]},
                shipped=row.get("shipped"),
                budget_s=budget if method in runs else None,
                test_problems=len(test),
                gold_pairs=pairs,
            )
        table = [
            "| method | held-out accuracy | gold | proxy | KL to SFT | training s | steps |",
            "|---|---|---|---|---|---|---|",
        ]
        table += [
            f"| {method} | {row['accuracy']:.3f} | {row['gold']:.3f} | {row['proxy']:.3f} | {row['kl']:.2f} | "
            f"{row['wall_s']:.0f} | {row['steps']} |"
            for method, row in rows.items()
        ]
        atomic_write_text(out / "algorithms.md", "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
