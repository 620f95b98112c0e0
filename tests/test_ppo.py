"""PPO by behaviour: GAE against a naive loop over the actions, the clipped policy and value losses and
the KL-penalised rewards against numbers worked by hand, Ziegler et al.'s controller, a KL penalty of
exactly zero while the policy is the reference, an action mask that leaves out prompt, padding and
injected tool results, advantages whitened over all of an iteration's shards, a toy task whose rewarded
first token PPO makes clearly more likely, and a whole ``llmkit ppo`` run that writes a loadable
checkpoint (the policy alone; the value head beside it), metrics and curves, and resumes exactly."""

import csv
import math

import pytest
import torch
from rl_helpers import (
    TOY_MESSAGES,
    assert_learns_toy_task,
    frozen_copy,
    metrics_rows,
    policy,
    rl_run,
    save_checkpoint,
    starts_with_a,
    tokenizer,
)

from llmkit.align.policy_gradient import Aggregation, clipped_policy_loss, masked_whiten
from llmkit.align.ppo import (
    PPO,
    KLController,
    PPOConfig,
    clipped_value_loss,
    gae,
    kl_penalised_rewards,
    ppo,
)
from llmkit.align.reward import RewardModel
from llmkit.align.rewards import ModelReward
from llmkit.align.rl_source import RolloutConfig, UpdateConfig
from llmkit.align.rl_stage import RLStageConfig, rl_training
from llmkit.align.rollout import (
    Prompt,
    Rollout,
    build_batch,
    chat_prompt,
    completion_tokens,
    generate_rollouts,
    score_rollouts,
)
from llmkit.data.shards import PrepareConfig, prepare_data
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError, MismatchError
from llmkit.infer import Completion, GenerationConfig
from llmkit.infer.engine import Engine
from llmkit.model.checkpoint import load_model, read_config, read_weights, resolve_checkpoint, write_model
from llmkit.tasks import arithmetic
from llmkit.tokenizer import Tokenizer

__all__ = ["policy", "tokenizer"]  # the shared fixtures of rl_helpers, which pytest finds by name


def naive_gae(rewards, values, mask, gamma, gae_lambda):
    """Textbook GAE on each row's list of actions, one step at a time."""
    advantages = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[row, t]]
        next_value = next_advantage = 0.0
        for t in reversed(steps):
            delta = float(rewards[row, t]) + gamma * next_value - float(values[row, t])
            next_advantage = delta + gamma * gae_lambda * next_advantage
            advantages[row, t] = next_advantage
            next_value = float(values[row, t])
    return advantages


def test_gae_worked_by_hand():
    # delta_2 = 1 - 0.7 = 0.3; delta_1 = 0.9*0.7 - 0.6 = 0.03; delta_0 = 0.9*0.6 - 0.5 = 0.04
    # A_2 = 0.3; A_1 = 0.03 + 0.45*0.3 = 0.165; A_0 = 0.04 + 0.45*0.165 = 0.11425
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, gae_lambda=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.11425, 0.165, 0.3]]))
    torch.testing.assert_close(returns, torch.tensor([[0.61425, 0.765, 1.0]]))


@pytest.mark.parametrize("masked", [False, True])
def test_gae_equals_a_naive_loop_over_the_actions(masked):
    generator = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 9, generator=generator), torch.randn(4, 9, generator=generator)
    mask = torch.ones(4, 9, dtype=torch.bool)
    if masked:  # a prompt, tool results in the middle, padding at the end, and a row with no action
        mask[:, :3] = False
        mask[0, 5:7] = False
        mask[1, 7:] = False
        mask[2, 4] = False
        mask[3] = False
    advantages, returns = gae(rewards, values, mask, gamma=0.95, gae_lambda=0.9)
    expected = naive_gae(rewards, values, mask, 0.95, 0.9)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.where(mask, expected + values, 0.0))


def test_clipped_policy_loss_worked_by_hand():
    # Ratios 1.25, 1.5, 1.0 with advantages 1, -2, 0.5 and epsilon 0.2:
    #   token 0: max(-1.25, -1.2) = -1.2 (clipped); token 1: max(3.0, 2.4) = 3.0; token 2: -0.5.
    # Row 1's second entry is padding whose log-ratio would overflow exp() if it were not masked.
    logprobs = torch.log(torch.tensor([[0.5, 0.9], [0.3, 1e-45]]))
    old = torch.log(torch.tensor([[0.4, 0.6], [0.3, 1.0]]))
    old[1, 1] = 150.0
    advantages = torch.tensor([[1.0, -2.0], [0.5, 7.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, metrics = clipped_policy_loss(logprobs, old, advantages, mask, clip=0.2, aggregation=Aggregation("dapo"))
    assert loss.item() == pytest.approx((-1.2 + 3.0 - 0.5) / 3)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)
    # approx_kl = mean of r - 1 - log r: (0.25 - log 1.25 + 0.5 - log 1.5 + 0) / 3
    assert metrics["approx_kl"] == pytest.approx((0.25 - math.log(1.25) + 0.5 - math.log(1.5)) / 3, rel=1e-5)
    sequence_loss, _ = clipped_policy_loss(logprobs, old, advantages, mask, clip=0.2, aggregation=Aggregation("grpo"))
    assert sequence_loss.item() == pytest.approx(((-1.2 + 3.0) / 2 + -0.5) / 2)


def test_clipped_value_loss_worked_by_hand():
    # V_clip = 0.5 + clip(V - 0.5, -0.2, 0.2) = 0.7, 0.3, 0.5; errors (V-G)^2 = 1, 1, 0.01
    # and (V_clip-G)^2 = 1.69, 1.69, 0.01.
    values, old_values = torch.tensor([[1.0, 0.0, 0.5]]), torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, -1.0, 0.4]])
    loss, metrics = clipped_value_loss(values, old_values, returns, torch.ones(1, 3, dtype=torch.bool), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.69 + 0.01) / 3)
    assert metrics["value_clip_fraction"] == pytest.approx(2 / 3)


def test_kl_penalised_rewards_worked_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    reference = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.5, -3.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [True, True, False, False]])
    rewards = kl_penalised_rewards(torch.tensor([1.0, -0.5]), logprobs, reference, mask, kl_coef=0.1)
    # Row 0: -0.1 * (-1), then -0.1 * 0 + 1 on its last action; row 1: -0.1 * -0.5, then -0.1 * 2 - 0.5.
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.1, 1.0, 0.0], [0.05, -0.7, 0.0, 0.0]]))


def test_adaptive_kl_controller_follows_ziegler_et_al():
    controller = KLController(0.1, target=6.0, horizon=10000)
    controller.update(kl=6.6, completions=100)  # error 0.1: beta *= 1 + 0.1 * 100 / 10000
    assert controller.value == pytest.approx(0.1 * 1.001)
    controller.update(kl=60.0, completions=100)  # error clipped to 0.2
    assert controller.value == pytest.approx(0.1 * 1.001 * 1.002)
    fixed = KLController(0.1)
    fixed.update(kl=60.0, completions=100)
    assert fixed.value == 0.1


def fake_completion(tokens, injected, finish_reason):
    return Completion("", tokens, finish_reason, 3, injected=injected)


def test_the_action_mask_holds_exactly_the_sampled_completion_tokens():
    end_id = 99
    prompt = Prompt([], [5, 6, 7])
    # A tool call and its injected result (tokens 11, 12), a last sampled token and the end token restored;
    # a completion cut at the length limit (no end token); a closed tool call left for the caller.
    completions = [
        fake_completion([10, 11, 12, 13], [False, True, True, False], "stop"),
        fake_completion([20], [False], "length"),
        fake_completion([30, 31], [False, False], "tool_calls"),
    ]
    rollouts = [Rollout(prompt, completion, *completion_tokens(completion, end_id)) for completion in completions]
    batch = build_batch(rollouts, [1.0, 0.0, 0.5], pad_id=0)
    assert batch.input_ids.tolist() == [
        [5, 6, 7, 10, 11, 12, 13, 99],
        [5, 6, 7, 20, 0, 0, 0, 0],
        [5, 6, 7, 30, 31, 99, 0, 0],
    ]
    # Position t predicts token t + 1: actions are 10, 13 and the end; 20; 30, 31 and the end.
    F, T = False, True
    assert batch.action_mask.tolist() == [[F, F, T, F, F, T, T], [F, F, T, F, F, F, F], [F, F, T, T, T, F, F]]
    assert batch.response_lengths.tolist() == [3, 1, 3]
    assert batch.rewards.tolist() == [1.0, 0.0, 0.5]
    # A minibatch keeps its rows up to their last action and no further.
    minibatch = batch.rows(torch.tensor([1, 2]))
    assert minibatch.input_ids.tolist() == [[5, 6, 7, 20, 0, 0], [5, 6, 7, 30, 31, 99]]
    assert minibatch.action_mask.tolist() == [[F, F, T, F, F], [F, F, T, T, T]]


def test_kl_penalty_is_zero_while_the_policy_is_the_reference(tokenizer, policy):
    engine = Engine(policy, tokenizer)
    prompt = chat_prompt(tokenizer, TOY_MESSAGES)
    rollouts = generate_rollouts(
        engine, [prompt, prompt], 3, GenerationConfig(max_new_tokens=4, temperature=1.0), None, 0, 0
    )
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    batch = score_rollouts(
        build_batch(rollouts, scores.tolist(), tokenizer.pad_id), policy, frozen_copy(policy), None, 1.0, 4
    )
    rewards = kl_penalised_rewards(batch.rewards, batch.old_logprobs, batch.reference_logprobs, batch.action_mask, 0.5)
    assert batch.action_mask.any(dim=1).all()
    assert torch.equal(
        rewards, kl_penalised_rewards(batch.rewards, batch.old_logprobs, batch.old_logprobs, batch.action_mask, 0.5)
    )
    assert torch.equal(rewards.sum(dim=1), scores)  # nothing but the scores
    other = frozen_copy(policy)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    moved = score_rollouts(build_batch(rollouts, scores.tolist(), tokenizer.pad_id), policy, other, None, 1.0, 4)
    penalised = kl_penalised_rewards(
        moved.rewards, moved.old_logprobs, moved.reference_logprobs, moved.action_mask, 0.5
    )
    assert not torch.allclose(penalised.sum(dim=1), scores)
    assert batch.sequence_kl() == 0.0 and moved.sequence_kl() != 0.0


def test_a_reward_model_scores_the_token_ids_of_prompt_and_completion(tokenizer, policy, tmp_path):
    reward_model = RewardModel.from_language_model(policy)
    write_model(
        tmp_path, reward_model.state_dict(), policy.config, {"stage": "reward", "tokenizer_sha256": tokenizer.sha256}
    )
    tokenizer.save(tmp_path)
    prompt = chat_prompt(tokenizer, TOY_MESSAGES)
    completion = fake_completion(tokenizer.encode("ab"), [False, False], "stop")
    rollout = Rollout(prompt, completion, *completion_tokens(completion, tokenizer.special_ids["<|end|>"]))
    ids = prompt.ids + tokenizer.encode("ab") + [tokenizer.special_ids["<|end|>"]]
    with torch.no_grad():
        expected = reward_model(torch.tensor([ids]), torch.tensor([len(ids) - 1])).item()
    assert ModelReward(str(tmp_path), tokenizer).score([rollout]) == [pytest.approx(expected, abs=1e-6)]
    (tmp_path / "corpus.txt").write_text("another alphabet entirely: xyz 0123")
    train_tokenizer(
        TokenizerConfig(
            source=str(tmp_path / "corpus.txt"), out=str(tmp_path / "other"), kind="char", held_out_fraction=0
        )
    )
    with pytest.raises(MismatchError, match="tokenizer"):
        ModelReward(str(tmp_path), Tokenizer.load(tmp_path / "other"))


def test_advantages_are_whitened_over_every_shard_together():
    generator = torch.Generator().manual_seed(1)
    parts = [torch.randn(3, 5, generator=generator), torch.randn(2, 7, generator=generator)]
    masks = [torch.rand(3, 5, generator=generator) < 0.6, torch.rand(2, 7, generator=generator) < 0.6]
    actions = torch.cat([part[mask] for part, mask in zip(parts, masks)])
    expected = (actions - actions.mean()) / (actions.var(unbiased=False) + 1e-8).sqrt()
    whitened = masked_whiten(parts, masks)
    torch.testing.assert_close(torch.cat([part[mask] for part, mask in zip(whitened, masks)]), expected)
    assert all((part[~mask] == 0).all() for part, mask in zip(whitened, masks))


def test_ppo_makes_the_rewarded_first_token_clearly_more_likely(tokenizer, policy, tmp_path):
    config = PPOConfig(
        kl_coef=0.01,
        rollout=RolloutConfig(prompts_per_iteration=16, max_new_tokens=3, tools="none"),
        update=UpdateConfig(iterations=4, epochs=2, minibatch_size=8),
        train=rl_training(out=str(tmp_path), lr=3e-3, checkpoint_interval=4, device="cpu", progress=False),
    )
    assert_learns_toy_task(policy, tokenizer, PPO(config))


def ppo_config(start, out, iterations, **changes) -> PPOConfig:
    """PPO on 2 arithmetic prompts an iteration, one step each."""
    values = dict(
        stage=RLStageConfig(policy=str(start), train_problems=6, validation_problems=3),
        rollout=RolloutConfig(prompts_per_iteration=2, max_new_tokens=6),
        update=UpdateConfig(iterations=iterations, epochs=1, minibatch_size=2),
        train=rl_training(out=str(out), checkpoint_interval=1, device="cpu", progress=False),
    )
    return PPOConfig(**{**values, **changes})


def test_a_ppo_run_writes_a_checkpoint_metrics_and_curves_and_resumes(tokenizer, policy, tmp_path):
    (tmp_path / "sft").mkdir()
    start = save_checkpoint(tmp_path / "sft", policy, tokenizer)
    # The untrained policy earns no reward and its KL stays 0, so the adaptive coefficient falls by
    # a factor 1 - 0.2 * 2 / 10 every iteration.
    config = ppo_config(start, tmp_path / "ppo", 2, adaptive_kl=True, kl_horizon=10)
    summary = ppo(config)
    assert summary["iterations"] == 2 and summary["kl_coef"] == pytest.approx(0.05 * 0.96**2)
    assert {"accuracy_before", "accuracy_after", "reward_before", "reward_after", "final_kl"} <= set(summary)
    checkpoint = resolve_checkpoint(tmp_path / "ppo")
    assert read_config(checkpoint)["stage"] == "ppo"
    loaded, _ = load_model(checkpoint)  # the policy alone; its value head beside it
    assert set(read_weights(checkpoint / "extra_weights.safetensors")) == {"value_head.weight", "value_head.bias"}
    assert loaded.config == policy.config and (tmp_path / "ppo" / "curves.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="--train.resume"):
        ppo(config)

    config.train.resume, config.update.iterations = True, 3
    summary = ppo(config)
    assert summary["iterations"] == 3 and summary["kl_coef"] == pytest.approx(0.05 * 0.96**3)
    with open(tmp_path / "ppo" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["step"], row["event"]) for row in rows] == [
        ("0", "before"),
        ("1", ""),
        ("2", ""),
        ("3", ""),
        ("3", "end"),
    ]
    for column in ("reward", "kl", "entropy", "clip_fraction", "value_loss", "approx_kl", "response_length"):
        assert all(row[column] != "" for row in rows[1:4]), column


def test_ppo_resumes_exactly_with_its_trained_value_head(tokenizer, policy, tmp_path):
    (tmp_path / "sft").mkdir()
    start = save_checkpoint(tmp_path / "sft", policy, tokenizer)
    # Hot sampling and a penalty for running out of tokens: rewards differ, so policy and value head move.
    changes = dict(
        stage=RLStageConfig(policy=str(start), train_problems=6, validation_problems=2, missing_end_penalty=1.0),
        rollout=RolloutConfig(prompts_per_iteration=2, max_new_tokens=4, temperature=3.0, tools="none"),
    )
    ppo(ppo_config(start, tmp_path / "straight", 3, **changes))
    ppo(ppo_config(start, tmp_path / "split", 2, **changes))
    resumed = ppo_config(start, tmp_path / "split", 3, **changes)
    resumed.train.resume = True
    ppo(resumed)
    final = "checkpoints/step_00000003"
    for name in ("model.safetensors", "extra_weights.safetensors"):
        assert (tmp_path / "split" / final / name).read_bytes() == (
            tmp_path / "straight" / final / name
        ).read_bytes(), name
    head = read_weights(tmp_path / "straight" / final / "extra_weights.safetensors")
    assert head["value_head.weight"].abs().sum() > 0  # trained, not its zero initialisation


def test_ppo_ptx_adds_the_language_model_loss_of_each_micro_batchs_pretraining_rows(tokenizer, policy, tmp_path):
    questions = [problem.question for problem in arithmetic.generate_problems(200, seed=0)]
    (tmp_path / "corpus.txt").write_text("\n".join(questions))
    tokenizer.save(tmp_path / "tok")
    prepare_data(
        PrepareConfig(
            source=str(tmp_path / "corpus.txt"),
            tokenizer=str(tmp_path / "tok"),
            out=str(tmp_path / "data"),
            val_fraction=0.1,
            split="tail",
            workers=1,
        )
    )
    config = PPOConfig(
        ptx_data=str(tmp_path / "data"),
        ptx_coef=0.5,
        ptx_batch_size=2,
        rollout=RolloutConfig(prompts_per_iteration=4, max_new_tokens=3, tools="none"),
        update=UpdateConfig(iterations=1, epochs=1, minibatch_size=4),
        train=rl_training(out=str(tmp_path / "run"), device="cpu", progress=False),
    )
    algorithm = PPO(config, tokenizer, policy.config.context_length)
    rl_run(policy, tokenizer, algorithm, starts_with_a, [chat_prompt(tokenizer, TOY_MESSAGES)])
    [row] = metrics_rows(tmp_path / "run")
    batch = algorithm.pretraining.get_batch(0)  # the first step's rows, scored by the starting policy
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(
            policy(batch["input_ids"]).flatten(0, 1), batch["targets"].flatten()
        )
    assert float(row["ptx_loss"]) == pytest.approx(expected.item(), rel=1e-4)
