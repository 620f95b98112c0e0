"""GRPO by behaviour: group-normalised advantages against the formula worked by hand, broadcast to
exactly the action tokens; the k1 and k3 estimators against the exact KL of small distributions and
zero while the policy is the reference; RLOO's leave-one-out advantages and the four loss types (grpo,
bnpo, dr_grpo, dapo) by hand, with the units their micro-batches are weighed by; the verifiable arithmetic
reward; prompt order; a toy task whose rewarded first token GRPO makes clearly more likely through the
Trainer; the Trainer's spike guard skipping a forced spike with checkpoints still between iterations;
a minibatch split into micro-batches giving the whole minibatch's loss (bnpo: the mean of its parts'
token means); intervals that would cut an
iteration refused; and a whole ``llmkit grpo`` run. Process supervision: steps split at tool results,
the arithmetic step rewards, their place in the batch, and the advantages by hand, against a naive loop
and against outcome advantages when every completion is one step."""

import csv

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
    trainable,
    warm_policy,
)

from llmkit.align import rl_source
from llmkit.align.grpo import (
    GRPO,
    GRPOConfig,
    group_advantages,
    grpo,
    grpo_update,
    process_advantages,
)
from llmkit.align.policy_gradient import Aggregation, PolicyModel, aggregate, kl_k1, kl_k3
from llmkit.align.rewards import ArithmeticReward, FunctionTaskReward, as_reward
from llmkit.align.rl_source import RolloutConfig, RolloutSource, prompt_indices
from llmkit.align.rl_stage import RLStageConfig, rl_training
from llmkit.align.rollout import (
    Prompt,
    Rollout,
    RolloutBatch,
    build_batch,
    chat_prompt,
    generate_rollouts,
    score_rollouts,
)
from llmkit.errors import ConfigError, InputError
from llmkit.infer import Completion, GenerationConfig, cpu_kernels
from llmkit.infer.cpu_kernels import TiledLinear
from llmkit.infer.engine import Engine
from llmkit.model.checkpoint import read_config, resolve_checkpoint
from llmkit.tasks import arithmetic, functions
from llmkit.tasks.functions import FunctionTask
from llmkit.train.trainer import Trainer

__all__ = ["policy", "tokenizer"]  # the shared fixtures of rl_helpers, which pytest finds by name


def test_group_advantages_worked_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    # Group 1: mean 0.5, sample std sqrt(1/3); group 2: mean 0.75, std 0.5; group 3: all equal, std 0.
    third = 3**-0.5
    expected = [
        0.5 / (third + 1e-4),
        -0.5 / (third + 1e-4),
        -0.5 / (third + 1e-4),
        0.5 / (third + 1e-4),
        0.25 / 0.5001,
        0.25 / 0.5001,
        0.25 / 0.5001,
        -0.75 / 0.5001,
        0.0,
        0.0,
        0.0,
        0.0,
    ]
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor(expected))
    unscaled = [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75, 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False), torch.tensor(unscaled))


def test_rloo_advantages_subtract_the_mean_of_the_other_samples_worked_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    # Group 1: a 1 against the others' mean 1/3 -> 2/3, a 0 against 2/3 -> -2/3. Group 2: a 1 against 2/3
    # -> 1/3, the 0 against 1 -> -1. Group 3: 0.
    expected = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0, 0.0, 0.0, 0.0, 0.0]
    rloo = group_advantages(rewards, 4, scale=False, leave_one_out=True)
    torch.testing.assert_close(rloo, torch.tensor(expected))
    # Ahmadian et al.'s identity: the leave-one-out advantage is the group-centred reward times G / (G - 1).
    torch.testing.assert_close(rloo, group_advantages(rewards, 4, scale=False) * 4 / 3)
    # Scaled, the group's sample std divides it as it does GRPO's: group 2's std is 0.5.
    scaled = group_advantages(rewards, 4, leave_one_out=True)
    torch.testing.assert_close(scaled[4:8], torch.tensor([1 / 3, 1 / 3, 1 / 3, -1.0]) / 0.5001)
    batch = RolloutBatch(
        torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 2, dtype=torch.bool), torch.tensor([3.0, 1.0, 0.0, 2.0])
    )
    GRPO(GRPOConfig(group_size=4, advantage="rloo", scale_rewards=False)).advantages([batch])
    # Each reward against the mean of the other three: 3 - 1, 1 - 5/3, 0 - 2, 2 - 4/3.
    torch.testing.assert_close(batch.advantages[:, 0], torch.tensor([2.0, -2 / 3, -2.0, 2 / 3]))
    with pytest.raises(ConfigError, match="'advantage' = 'rloo'.*outcome supervision"):
        GRPOConfig(advantage="rloo", supervision="process")


def test_advantages_reach_exactly_the_action_tokens_of_their_sequence():
    mask = torch.tensor([[False, True, True], [True, True, False], [False, False, True], [False, True, True]])
    batch = RolloutBatch(torch.zeros(4, 4, dtype=torch.long), mask, torch.tensor([1.0, 0.0, 2.0, 2.0]))
    GRPO(GRPOConfig(group_size=2)).advantages([batch])
    value = 0.5 / (0.5**0.5 + 1e-4)
    torch.testing.assert_close(
        batch.advantages, torch.tensor([[0.0, value, value], [-value, -value, 0.0], [0.0] * 3, [0.0] * 3])
    )


def test_a_group_is_informative_when_its_rewards_or_step_rewards_differ():
    assert GRPO(GRPOConfig(group_size=2)).informative([1.0, 0.0, 2.0, 2.0, 0.0, 0.0], None) == [True, False, False]
    process = GRPO(GRPOConfig(group_size=2, supervision="process"))
    # Equal outcomes, but the first group's steps differ (1 then 0 against 1): informative per step.
    assert process.informative([1.0, 1.0, 0.0, 0.0], [[1.0, 0.0], [1.0], [0.0], [0.0, 0.0]]) == [True, False]


def test_process_advantages_worked_by_hand():
    # One group of two completions: steps with rewards 1, 0 (first) and 1 (second) -> mean 2/3, sample std sqrt(1/3).
    step_rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    step_mask = torch.tensor([[False, True, False, True], [False, False, False, True]])
    high, low = (1 / 3) / (3**-0.5 + 1e-4), (-2 / 3) / (3**-0.5 + 1e-4)
    # A token's advantage sums the normalised rewards of the steps ending at or after it.
    expected = torch.tensor([[high + low, high + low, low, low], [high, high, high, high]])
    torch.testing.assert_close(process_advantages(step_rewards, step_mask, group_size=2), expected)
    unscaled = torch.tensor([[-1 / 3] * 2 + [-2 / 3] * 2, [1 / 3] * 4])
    torch.testing.assert_close(process_advantages(step_rewards, step_mask, group_size=2, scale=False), unscaled)
    # Discounted: the first step's tokens weigh the second step's -2/3 by 0.5 (-> 0), or not at all (-> 1/3).
    for discount, first in ((0.5, 0.0), (0.0, 1 / 3)):
        expected = torch.tensor([[first] * 2 + [-2 / 3] * 2, [1 / 3] * 4])
        torch.testing.assert_close(
            process_advantages(step_rewards, step_mask, 2, scale=False, discount=discount), expected
        )


def test_process_advantages_match_a_naive_loop_and_equal_outcome_ones_for_single_steps():
    generator = torch.Generator().manual_seed(0)
    rows, positions, group = 6, 9, 3
    step_mask = torch.rand(rows, positions, generator=generator) < 0.4
    step_mask[:, -1] = True
    step_rewards = torch.randint(0, 3, (rows, positions), generator=generator).float() * step_mask
    advantages = process_advantages(step_rewards, step_mask, group)
    for first in range(0, rows, group):
        values = [
            float(step_rewards[row, t])
            for row in range(first, first + group)
            for t in range(positions)
            if step_mask[row, t]
        ]
        mean = sum(values) / len(values)
        std = (sum((value - mean) ** 2 for value in values) / (len(values) - 1)) ** 0.5
        for row in range(first, first + group):
            for t in range(positions):
                naive = sum(
                    (float(step_rewards[row, s]) - mean) / (std + 1e-4)
                    for s in range(t, positions)
                    if step_mask[row, s]
                )
                assert float(advantages[row, t]) == pytest.approx(naive, abs=1e-5)
    # One step per completion, ending at its last token: the outcome advantage on every earlier token.
    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    last = torch.zeros(rows, positions, dtype=torch.bool)
    last[:, -1] = True
    expected = group_advantages(outcome, group)[:, None].expand(rows, positions)
    torch.testing.assert_close(process_advantages(outcome[:, None] * last, last, group), expected)


def test_steps_end_where_tool_results_are_injected_and_their_rewards_land_there():
    problem = arithmetic.generate_problems(1, seed=3)[0]
    values = [str(value.numerator) for value in arithmetic.step_values(problem.steps)]
    prompt = Prompt(arithmetic.prompt_messages(problem), [7, 7, 7])
    # Tokens: call one (2 sampled) + its result (2 injected), call two (1 sampled) + result (1 injected),
    # answer (2 sampled).
    injected = [False, False, True, True, False, True, False, False]
    calls = [{"payload": "x", "result": values[0]}, {"payload": "y", "result": "Error: division by zero"}]
    answers = [f"#### {problem.answer}", f"#### {problem.answer + 1}"]
    rollouts = [
        Rollout(prompt, Completion(text, [5] * 8, "stop", 3, tool_calls=calls, injected=injected), [5] * 8, injected)
        for text in answers
    ]
    assert rollouts[0].step_ends() == [1, 4, 7]
    reward = ArithmeticReward([problem])
    assert reward.score_steps(rollouts) == [[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    # Cut off inside the second call, before it closed: the unfinished last step earns the outcome reward, 0.
    cut = Rollout(
        prompt, Completion("", [5] * 5, "length", 3, tool_calls=calls[:1], injected=injected[:5]), [5] * 5, injected[:5]
    )
    assert cut.step_ends() == [1, 4] and reward.score_steps([cut]) == [[1.0, 0.0]]
    batch = build_batch(rollouts, [1.0, 0.0], pad_id=0, step_rewards=reward.score_steps(rollouts))
    # Token i of the completion is predicted at position len(prompt) - 1 + i.
    assert batch.step_mask[0].nonzero().flatten().tolist() == [3, 6, 9]
    assert batch.step_rewards[0, [3, 6, 9]].tolist() == [1.0, 0.0, 1.0] and batch.step_rewards[1, 9] == 0.0
    with pytest.raises(ValueError, match="3 steps but 2 step rewards"):
        build_batch(rollouts[:1], [1.0], pad_id=0, step_rewards=[[1.0, 0.0]])
    with pytest.raises(ConfigError, match="process supervision needs a reward with step rewards"):
        as_reward(lambda messages, text: 1.0).score_steps(rollouts)


def test_kl_estimators_are_unbiased_and_k3_is_never_negative():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.1])
    exact = float((p * (p / q).log()).sum())
    # The expectation over tokens drawn from p, taken exactly over the support.
    assert float((p * kl_k1(p.log(), q.log())).sum()) == pytest.approx(exact)
    assert float((p * kl_k3(p.log(), q.log())).sum()) == pytest.approx(exact)
    assert (kl_k3(p.log(), q.log()) >= 0).all() and not (kl_k1(p.log(), q.log()) >= 0).all()
    assert torch.equal(kl_k3(p.log(), p.log()), torch.zeros(5))


def test_each_loss_type_and_its_units_by_hand():
    # Two completions of 3 and 1 action tokens, and a row without actions; off the mask an estimator may be inf.
    losses = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, float("inf")], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    expected = {
        "grpo": ((1 + 2 + 3) / 3 + 10 / 1) / 2,  # per-sequence means, then their mean
        "bnpo": (1 + 2 + 3 + 10) / 4,  # the token mean
        "dapo": (1 + 2 + 3 + 10) / 4,
        "dr_grpo": (1 + 2 + 3 + 10) / (2 * 5),  # the token sum over sequences x max_completion_length 5
    }
    units = {"grpo": 2.0, "bnpo": 1.0, "dapo": 4.0, "dr_grpo": 2.0}
    for loss_type, value in expected.items():
        aggregation = Aggregation(loss_type, max_completion_length=5)
        assert aggregate(losses, mask, aggregation).item() == pytest.approx(value)
        assert aggregation.units(mask) == units[loss_type]
        assert aggregation.units(torch.zeros_like(mask)) == 0.0  # an idle micro-batch weighs nothing
    with pytest.raises(ValueError, match="dr_grpo.*max_completion_length"):
        Aggregation("dr_grpo")
    with pytest.raises(ConfigError, match="'loss_type' = 'token': choose one of grpo, bnpo, dr_grpo, dapo"):
        grpo_update(loss_type="token")


def test_grpo_kl_term_is_zero_while_the_policy_is_the_reference(tokenizer, policy):
    prompt = chat_prompt(tokenizer, TOY_MESSAGES)
    rollouts = generate_rollouts(
        Engine(policy, tokenizer), [prompt, prompt], 2, GenerationConfig(max_new_tokens=4, temperature=1.0), None, 0, 0
    )
    algorithm = GRPO(GRPOConfig(group_size=2))
    for reference, zero in ((frozen_copy(policy), True), (warm_policy(tokenizer, steps=1), False)):
        batch = score_rollouts(
            build_batch(rollouts, [1.0, 0.0, 0.0, 1.0], tokenizer.pad_id), policy, reference, None, 1.0, 4
        )
        algorithm.advantages([batch])
        _, metrics = algorithm.loss(PolicyModel(policy, None, 1.0), batch)
        assert (metrics["kl_k3"] == 0.0) is zero and metrics["kl_k3"] >= 0


def test_arithmetic_reward_checks_the_final_answer_and_the_format():
    problem = arithmetic.generate_problems(1, seed=3)[0]
    reward = ArithmeticReward([problem], format_bonus=0.1)
    messages = arithmetic.prompt_messages(problem)
    assert reward(messages, f"Steps...\n#### {problem.answer}") == 1.0
    assert reward(messages, f"#### {problem.answer + 1}") == 0.1
    assert reward(messages, f"the answer is {problem.answer}") == 0.0
    with pytest.raises(InputError, match="no arithmetic problem"):
        reward([{"role": "user", "content": "What is 2+2?"}], "#### 4")


def test_function_reward_runs_the_checker_once_per_task_and_grades_the_format():
    task = FunctionTask(
        "string",
        "double",
        'def double(x):\n    """Twice x."""',
        "def double(x):\n    return 2 * x",
        (("[2]", "4"), ("[5]", "10"), ("[0]", "0")),
    )
    reward = FunctionTaskReward([task], format_bonus=0.2)
    prompt = Prompt(functions.prompt_messages(task), [1])
    replies = [
        "```python\ndef double(x):\n    return x + x\n```",
        "def double(x):\n    return x * x",
        "def double(y):\n    return 2 * y",
        "def double(x) return",
    ]
    rollouts = [Rollout(prompt, Completion(text, [], "stop", 1), [], []) for text in replies]
    # Correct; right signature but wrong on 2 and 5; wrong parameter name; does not parse.
    assert reward.score(rollouts) == [1.0, 0.2, 0.0, 0.0]
    assert reward(prompt.messages, replies[0]) == 1.0


def test_prompts_come_in_seeded_epochs_and_are_a_function_of_the_iteration():
    stream = [index for iteration in range(5) for index in prompt_indices(6, 3, seed=1, iteration=iteration)]
    assert sorted(stream[:6]) == sorted(stream[6:12]) == list(range(6))
    assert stream[:6] != stream[6:12]  # a new order every epoch
    assert prompt_indices(6, 3, seed=1, iteration=4) == stream[12:15]


def toy_config(out, **changes) -> GRPOConfig:
    """GRPO on the toy task: 2 prompts x 8 samples, 2 epochs of minibatches of 8 (4 steps an iteration)."""
    values = dict(
        group_size=8,
        kl_coef=0.01,
        rollout=RolloutConfig(prompts_per_iteration=2, max_new_tokens=3, tools="none"),
        update=grpo_update(iterations=4, epochs=2, minibatch_size=8),
        train=rl_training(out=str(out), lr=3e-3, checkpoint_interval=8, device="cpu", progress=False),
    )
    return GRPOConfig(**{**values, **changes})


def test_grpo_makes_the_rewarded_first_token_clearly_more_likely(tokenizer, policy, tmp_path):
    assert_learns_toy_task(policy, tokenizer, GRPO(toy_config(tmp_path)))


def test_rollouts_sample_from_a_decoding_copy_of_the_policy_made_again_after_every_update(
    tokenizer, policy, tmp_path, monkeypatch
):
    """Every iteration's rollouts come from an engine over a copy of the weights the policy has then (its logits
    equal the policy's), laid out for decoding where the kernels run, sharing no tensor with the policy, which keeps
    its plain layers and trains on."""
    algorithm = GRPO(toy_config(tmp_path))
    model = trainable(policy, algorithm, algorithm.config)
    prompt = chat_prompt(tokenizer, TOY_MESSAGES)
    source = RolloutSource(model, frozen_copy(policy), tokenizer, algorithm, as_reward(starts_with_a), [prompt])
    samplers, generate = [], rl_source.generate_rollouts

    def recording(engine, *arguments):
        samplers.append(engine.model)
        ids = torch.tensor([prompt.ids])
        with torch.no_grad():
            torch.testing.assert_close(engine.model(ids), model.policy(ids), rtol=1e-5, atol=1e-5)
        trained = {tensor.untyped_storage().data_ptr() for tensor in model.policy.state_dict().values()}
        assert not trained & {tensor.untyped_storage().data_ptr() for tensor in engine.model.state_dict().values()}
        return generate(engine, *arguments)

    monkeypatch.setattr(rl_source, "generate_rollouts", recording)
    Trainer(model, source, algorithm.config.train, loss_fn=source.loss, hooks=source).run()
    assert len(samplers) == 4 and len({id(sampler) for sampler in samplers}) == 4  # a copy an iteration
    assert any(isinstance(module, TiledLinear) for module in samplers[0].modules()) == cpu_kernels.available()
    assert not any(isinstance(module, TiledLinear) for module in model.policy.modules())


def test_the_spike_guard_skips_a_spiking_rl_step_and_checkpoints_stay_between_iterations(tokenizer, policy, tmp_path):
    config = toy_config(tmp_path, update=grpo_update(iterations=4, epochs=2, minibatch_size=4))  # 8 steps an iteration
    algorithm, spiking = GRPO(config), 13  # a step past the guard's 10 warm-up steps, inside the second iteration
    terms, calls = algorithm.terms, iter(range(1, 10**6))

    def spike(outputs, minibatch):
        loss, metrics = terms(outputs, minibatch)
        return (loss * 1000 if next(calls) == spiking else loss), metrics

    algorithm.terms = spike
    _, summary = rl_run(policy, tokenizer, algorithm, starts_with_a, [chat_prompt(tokenizer, TOY_MESSAGES)])
    assert summary["skipped_batches"] == 1 and summary["rollbacks"] == 0 and summary["steps"] == 4 * 8 - 1
    with open(tmp_path / "metrics.csv", newline="") as file:
        skipped = [row["step"] for row in csv.DictReader(file) if row["event"] == "skipped"]
    assert skipped == [str(spiking - 1)]  # logged at the step count before it
    # The step count lags the data by one from then on; checkpoints wait for the ends of iterations.
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step_00000023", "step_00000031"]
    iterations = [float(row["iteration"]) for row in metrics_rows(tmp_path)]
    assert iterations == [0.0] * 8 + [1.0] * 7 + [2.0] * 8 + [3.0] * 8


def test_micro_batches_weigh_their_share_so_a_split_minibatch_is_the_whole_ones_loss(tokenizer, policy):
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": content}]) for content in ("mixed a", "mixed b")]
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        losses, weights, parts = [], [], []
        for accumulation in (1, 2):
            config = GRPOConfig(
                group_size=2,
                rollout=RolloutConfig(prompts_per_iteration=2, max_new_tokens=6, temperature=3.0, tools="none"),
                update=grpo_update(minibatch_size=4, loss_type=loss_type),
                train=rl_training(grad_accum=accumulation, device="cpu"),
            )
            algorithm = GRPO(config)
            source = RolloutSource(
                trainable(policy, algorithm, config),
                frozen_copy(policy),
                tokenizer,
                algorithm,
                alternating_reward(),
                prompts,
            )
            batches = [source.get_batch(index) for index in range(accumulation)]
            losses.append(
                sum(source.loss(source.model, batch)[0] for batch in batches) / accumulation
            )  # the Trainer's mean
            weights.append([batch["weight"].item() for batch in batches])
            parts.append([source.loss(source.model, {**batch, "weight": torch.tensor(1.0)})[0] for batch in batches])
        # Split, each micro-batch is one prompt's group, weighted by its share of the minibatch's units.
        assert weights[0] == [1.0] and sum(weights[1]) == pytest.approx(2.0)
        if loss_type == "bnpo":  # by definition the mean of the micro-batches' own token means
            assert weights[1] == [1.0, 1.0]
            torch.testing.assert_close(losses[1], sum(parts[1]) / 2)
        else:
            torch.testing.assert_close(losses[1], losses[0])


def alternating_reward():
    """Reward 0, 1, 0, 1... in call order for "mixed" prompts (so each group of an even size is
    informative), always 1 for the others (so their groups are uniform)."""
    calls = iter(range(10**6))
    return as_reward(
        lambda messages, text: float(next(calls) % 2) if messages[-1]["content"].startswith("mixed") else 1.0
    )


def test_dynamic_sampling_keeps_only_informative_groups_over_rounds_of_the_prompt_stream(tokenizer, policy):
    contents = ["mixed a", "same b", "same c", "mixed d", "same e", "mixed f"]
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": content}]) for content in contents]
    config = GRPOConfig(
        group_size=2,
        dynamic_sampling=True,
        max_sampling_rounds=3,
        rollout=RolloutConfig(prompts_per_iteration=2, max_new_tokens=2, tools="none"),
        update=grpo_update(iterations=3),
        train=rl_training(seed=5, device="cpu"),
    )
    for iteration in range(3):
        algorithm = GRPO(config)
        source = RolloutSource(
            trainable(policy, algorithm, config),
            frozen_copy(policy),
            tokenizer,
            algorithm,
            alternating_reward(),
            prompts,
        )
        source.get_batch(iteration * source.cycle)  # an iteration's first micro-batch samples it
        batch, metrics = source.shards[0].batch, source.metrics
        # Independently: walk the rounds' prompts (stream positions iteration * 3 + round) in order.
        drawn, expected = [], []
        for round_index in range(3):
            drawn += prompt_indices(len(prompts), 2, seed=5, iteration=iteration * 3 + round_index)
            expected = [index for index in drawn if contents[index].startswith("mixed")][:2]
            if len(expected) == 2:
                break
        assert metrics["sampling_rounds"] == round_index + 1 and metrics["kept_groups"] == len(expected)
        assert metrics["uniform_groups"] == pytest.approx(
            1 - sum(contents[i].startswith("mixed") for i in drawn) / len(drawn)
        )
        rows = [prompts[index].ids for index in expected for _ in range(2)]
        assert [batch.input_ids[row, : len(ids)].tolist() for row, ids in enumerate(rows)] == rows
        assert batch.rewards.tolist() == [0.0, 1.0] * len(expected)


def test_dynamic_sampling_without_an_informative_group_makes_no_update(tokenizer, policy, tmp_path):
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": "same"}])]
    config = GRPOConfig(
        group_size=2,
        dynamic_sampling=True,
        max_sampling_rounds=2,
        rollout=RolloutConfig(prompts_per_iteration=1, max_new_tokens=2, tools="none"),
        update=grpo_update(iterations=1),
        train=rl_training(out=str(tmp_path), device="cpu", progress=False),
    )
    model, summary = rl_run(policy, tokenizer, GRPO(config), alternating_reward(), prompts)
    [row] = metrics_rows(tmp_path)
    assert float(row["kept_groups"]) == 0 and float(row["uniform_groups"]) == 1.0 and float(row["sampling_rounds"]) == 2
    assert float(row["grad_norm"]) == 0 and summary["steps"] == 1 and summary["skipped_batches"] == 0
    assert all(
        torch.equal(parameter, original) for parameter, original in zip(model.policy.parameters(), policy.parameters())
    )


@pytest.mark.parametrize("supervision, dynamic_sampling", [("outcome", False), ("process", False), ("outcome", True)])
def test_a_grpo_run_writes_a_checkpoint_with_its_stage(tokenizer, policy, tmp_path, supervision, dynamic_sampling):
    (tmp_path / "sft").mkdir()
    stage = RLStageConfig(
        policy=str(save_checkpoint(tmp_path / "sft", policy, tokenizer)),
        task="arithmetic_plain",
        train_problems=4,
        validation_problems=2,
    )
    summary = grpo(
        GRPOConfig(
            group_size=2,
            supervision=supervision,
            dynamic_sampling=dynamic_sampling,
            stage=stage,
            rollout=RolloutConfig(prompts_per_iteration=2, max_new_tokens=4, tools="none"),
            update=grpo_update(iterations=1),
            train=rl_training(out=str(tmp_path / "grpo"), device="cpu", progress=False),
        )
    )
    assert summary["iterations"] == 1 and summary["stage"] == "grpo" and summary["validation_prompts"] == 2
    assert summary["accuracy_before"] == summary["accuracy_after"] == 0.0  # a letter-answering policy solves nothing
    assert read_config(resolve_checkpoint(tmp_path / "grpo"))["stage_config"]["group_size"] == 2
    assert (tmp_path / "grpo" / "loss.png").stat().st_size > 0 and (tmp_path / "grpo" / "curves.png").stat().st_size > 0


def test_grpo_refuses_checkpoints_and_evaluations_inside_an_iteration():
    update = grpo_update(epochs=7, minibatch_size=16)  # 8 prompts x 8 samples: 28 steps an iteration
    with pytest.raises(
        ConfigError, match="'train.checkpoint_interval' = 240: must be a multiple of the 28 optimizer steps.*224 or 252"
    ):
        GRPOConfig(update=update)
    with pytest.raises(
        ConfigError, match="'train.eval_interval' = 12: must be a multiple of the 28 optimizer steps.*28 or 56"
    ):
        GRPOConfig(update=update, train=rl_training(checkpoint_interval=56, eval_interval=12))
    assert (
        GRPOConfig(update=update, train=rl_training(checkpoint_interval=56, eval_interval=28)).steps_per_iteration == 28
    )
    for changes in (
        {"dtype": "float16"},
        {"optimizer": "muon"},
        {"parallelism": "fsdp"},
        {"batch_size": 8},
        {"tp": 2},
        {"pp": 2},
    ):
        with pytest.raises(ConfigError, match=next(iter(changes))):
            GRPOConfig(train=rl_training(**changes))
