"""RLHF against a gold reward: reward-model over-optimisation at toy scale (Gao et al. 2022).

The gold preference is programmatic: an answer is better when it is right, and among equally right
answers when it is shorter (``gold = correct - LENGTH_PENALTY * tokens``). From an SFT model (the
speedrun's post-training SFT stage, or any llmkit checkpoint fine-tuned on the embedded arithmetic):

1. two completions are sampled for each of ``--pairs`` RL prompts (inline arithmetic, no tools) and
   labelled by the gold, a tenth of the labels flipped at random (annotator noise); equal golds are
   left out;
2. a reward model (``llmkit reward``) is trained on those pairs: the *proxy*;
3. PPO (``llmkit ppo``) optimises the policy against the proxy with the usual KL penalty, keeping a
   checkpoint every few iterations and choosing its best by validation accuracy (early stopping);
4. every PPO checkpoint, and best-of-n sampling from the SFT model ranked by the proxy
   (n = 1, 2, 4, ..., KL = log n - (n - 1) / n), is measured on held-out test prompts: the gold and
   proxy rewards of sampled answers and the KL to the SFT model (sampled, nats per answer).

JSON lines: ``gold_reward`` and ``proxy_reward`` with ``method`` (``ppo`` with ``step``, ``best_of_n``
with ``n``) and ``kl``; ``reward_model_accuracy`` on held-out gold-labelled pairs; ``selected_gold_gain``:
the gold reward of the checkpoint PPO selected minus the SFT model's, with ``noise`` (two standard
errors of that difference over the test prompts). ``rlhf_gold.png``: gold and proxy against sqrt(KL),
the selected checkpoint marked.

Usage: python benchmarks/rlhf_gold.py --sft runs/speedrun/sft [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from llmkit.align.ppo import PPOConfig, ppo  # noqa: E402
from llmkit.align.reward import RewardConfig, load_reward_model, reward_training, train_reward  # noqa: E402
from llmkit.align.rl_source import RolloutConfig, UpdateConfig, steps_per_iteration  # noqa: E402
from llmkit.align.rl_stage import RLStageConfig, rl_training  # noqa: E402
from llmkit.align.rollout import build_batch, chat_prompt, generate_rollouts, score_rollouts  # noqa: E402
from llmkit.figures import pyplot, save_figure  # noqa: E402
from llmkit.infer.engine import Engine  # noqa: E402
from llmkit.infer.sampling import GenerationConfig  # noqa: E402
from llmkit.io import atomic_write_jsonl  # noqa: E402
from llmkit.model.checkpoint import load_checkpoint, load_model  # noqa: E402
from llmkit.tasks import arithmetic  # noqa: E402
from llmkit.tasks.registry import embedded_task  # noqa: E402

TASK = "arithmetic_plain"
LENGTH_PENALTY = 0.005  # per generated token: among right answers, 20 tokens shorter is worth 0.1
LABEL_NOISE = 0.1
SEED = 0


def gold(problem: arithmetic.Problem, rollout) -> float:
    """The gold reward: right (1) or not (0), less a little for every token generated."""
    return float(arithmetic.check_answer(problem, rollout.text)) - LENGTH_PENALTY * len(rollout.token_ids)


class Policy:
    """A checkpoint loaded once, sampling answers to problems and scoring them against a reference."""

    def __init__(self, path: Path, max_new_tokens: int):
        loaded = load_checkpoint(path)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.engine = Engine(self.model, self.tokenizer, max_batch_size=64)
        self.generation = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0)

    def sample(self, problems: list, samples: int, seed: int) -> list:
        task = embedded_task(TASK)
        prompts = [chat_prompt(self.tokenizer, task.prompt(problem)) for problem in problems]
        return generate_rollouts(self.engine, prompts, samples, self.generation, None, seed, 0)

    def kl(self, rollouts: list, reference: torch.nn.Module) -> list[float]:
        """Per answer: the sum over its sampled tokens of log pi - log pi_ref."""
        batch = build_batch(rollouts, [0.0] * len(rollouts), self.tokenizer.pad_id)
        return score_rollouts(batch, self.model, reference, None, 1.0, 16).sequence_kls().tolist()


def preference_pairs(policy: Policy, problems: list, path: Path) -> int:
    """Two samples of each problem, the gold's preference with LABEL_NOISE of the labels flipped, as a
    prompt/chosen/rejected JSONL file; returns the number of pairs."""
    rollouts = policy.sample(problems, 2, SEED)
    flips, rows = random.Random(SEED), []
    for index, problem in enumerate(problems):
        first, second = rollouts[2 * index], rollouts[2 * index + 1]
        first_gold, second_gold = gold(problem, first), gold(problem, second)
        # An answer that wrote a special token cannot be a message of a preference file: left out.
        if first_gold == second_gold or any("<|" in rollout.text for rollout in (first, second)):
            continue
        chosen, rejected = (first, second) if first_gold > second_gold else (second, first)
        if flips.random() < LABEL_NOISE:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": first.prompt.messages, "chosen": chosen.text, "rejected": rejected.text})
    atomic_write_jsonl(path, rows)
    return len(rows)


def measure(path: Path, problems: list, proxy, reference, max_new_tokens: int) -> dict:
    """Gold, proxy and KL to the reference of one sampled answer per test problem."""
    policy = Policy(path, max_new_tokens)
    rollouts = policy.sample(problems, 1, SEED + 1)
    golds = [gold(problem, rollout) for problem, rollout in zip(problems, rollouts)]
    proxies = proxy.score_ids([rollout.prompt.ids + rollout.token_ids for rollout in rollouts])
    return {
        "golds": golds,
        "gold": statistics.fmean(golds),
        "proxy": statistics.fmean(proxies),
        "kl": statistics.fmean(policy.kl(rollouts, reference)),
    }


def best_of_n(sft: Policy, problems: list, proxy, largest: int) -> list[dict]:
    """Best-of-n by the proxy for n = 1, 2, 4, ... largest, from the same ``largest`` samples per problem."""
    rollouts = sft.sample(problems, largest, SEED + 2)
    proxies = proxy.score_ids([rollout.prompt.ids + rollout.token_ids for rollout in rollouts])
    results, n = [], 1
    while n <= largest:
        golds, chosen_proxies = [], []
        for index, problem in enumerate(problems):
            group = range(index * largest, index * largest + n)
            best = max(group, key=lambda position: proxies[position])
            golds.append(gold(problem, rollouts[best]))
            chosen_proxies.append(proxies[best])
        kl = math.log(n) - (n - 1) / n  # the analytic KL of best-of-n (Stiennon et al. 2020)
        results.append({"n": n, "gold": statistics.fmean(golds), "proxy": statistics.fmean(chosen_proxies), "kl": kl})
        n *= 2
    return results


def plot(points: list[dict], best_of: list[dict], selected_step: int | None, path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for axis, key, title in ((axes[0], "gold", "gold reward"), (axes[1], "proxy", "proxy (reward model)")):
        axis.plot([math.sqrt(max(p["kl"], 0)) for p in points], [p[key] for p in points], marker="o", label="PPO")
        axis.plot([math.sqrt(p["kl"]) for p in best_of], [p[key] for p in best_of], marker="s", label="best-of-n")
        for point in points:
            if point["step"] == (selected_step or 0):
                axis.scatter(
                    [math.sqrt(max(point["kl"], 0))],
                    [point[key]],
                    s=120,
                    facecolors="none",
                    edgecolors="red",
                    label="selected (validation)",
                )
        axis.set_xlabel("sqrt(KL to SFT), nats")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="the SFT checkpoint (e.g. a speedrun's sft/ folder)")
    parser.add_argument("--out", help="working folder (default: a temporary one); rlhf_gold.png goes there")
    parser.add_argument("--quick", action="store_true", help="small sizes: shows the benchmark works, not the result")
    arguments = parser.parse_args()
    sizes = (
        dict(pairs=64, test=24, iterations=4, every=2, reward_steps=8, largest=4)
        if arguments.quick
        else dict(pairs=600, test=200, iterations=24, every=4, reward_steps=150, largest=16)
    )
    max_new_tokens = 96
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(arguments.out or scratch)
        out.mkdir(parents=True, exist_ok=True)
        task = embedded_task(TASK)
        sft_path = Path(arguments.sft)
        sft = Policy(sft_path, max_new_tokens)
        pairs = preference_pairs(sft, task.items(sizes["pairs"], SEED, "prompts"), out / "gold_pairs.jsonl")
        emit("gold_labelled_pairs", pairs, "pairs", label_noise=LABEL_NOISE)
        reward = train_reward(
            RewardConfig(
                base=str(sft_path),
                datasets=[str(out / "gold_pairs.jsonl")],
                val_fraction=0.15,
                epochs=None,
                train=reward_training(out=str(out / "reward"), max_steps=sizes["reward_steps"], progress=False),
            )
        )
        emit("reward_model_accuracy", reward.get("heldout_accuracy"), "fraction", data="gold-labelled pairs (noisy)")
        update = UpdateConfig(iterations=sizes["iterations"], epochs=2, minibatch_size=16)
        interval = sizes["every"] * steps_per_iteration(32, update)
        summary = ppo(
            PPOConfig(
                kl_coef=0.05,
                stage=RLStageConfig(
                    policy=str(sft_path),
                    task=TASK,
                    reward_model=str(out / "reward"),
                    train_problems=2000,
                    validation_problems=64,
                ),
                rollout=RolloutConfig(prompts_per_iteration=32, max_new_tokens=max_new_tokens, tools="none"),
                update=update,
                train=rl_training(
                    out=str(out / "ppo"),
                    lr=5e-5,
                    checkpoint_interval=interval,
                    eval_interval=interval,
                    keep_last=100,
                    progress=False,
                ),
            )
        )
        selected = summary["best_step"]
        proxy = load_reward_model(out / "reward")
        reference, _ = load_model(sft_path)
        test = task.items(sizes["test"], SEED, "heldout")
        points = [{"step": 0, **measure(sft_path, test, proxy, reference, max_new_tokens)}]
        for checkpoint in sorted((out / "ppo" / "checkpoints").glob("step_*")):
            points.append(
                {"step": int(checkpoint.name[5:]), **measure(checkpoint, test, proxy, reference, max_new_tokens)}
            )
        for point in points:
            emit(
                "gold_reward",
                round(point["gold"], 4),
                "reward",
                method="ppo",
                step=point["step"],
                kl=round(point["kl"], 3),
                proxy=round(point["proxy"], 4),
                selected=point["step"] == (selected or 0),
            )
        best_of = best_of_n(sft, test, proxy, sizes["largest"])
        for row in best_of:
            emit(
                "gold_reward",
                round(row["gold"], 4),
                "reward",
                method="best_of_n",
                n=row["n"],
                kl=round(row["kl"], 3),
                proxy=round(row["proxy"], 4),
            )
        chosen = next(point for point in points if point["step"] == (selected or 0))
        differences = [a - b for a, b in zip(chosen["golds"], points[0]["golds"])]
        noise = 2 * statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else 0.0
        emit(
            "selected_gold_gain",
            round(chosen["gold"] - points[0]["gold"], 4),
            "reward",
            step=selected or 0,
            noise=round(noise, 4),
            note="noise: two standard errors of the paired difference over the test prompts",
        )
        plot(points, best_of, selected, out / "rlhf_gold.png")
        (out / "rlhf_gold.json").write_text(json.dumps({"ppo": points, "best_of_n": best_of}, default=str))


if __name__ == "__main__":
    main()
