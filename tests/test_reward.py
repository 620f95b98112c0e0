"""Reward model by behaviour: the pairwise loss against values worked out by hand, rankings expanded
to every pair of a prompt in one batch (count, order, rows, weights), the reward read at the last real
token from the language model's hidden state, logits unchanged by the hidden-state split, and a short
run whose held-out accuracy on an easy synthetic preference is far above chance, whose checkpoint
loads for scoring with rewards centred on the chosen responses, and which resumes with tied embeddings."""

import math

import pytest
import torch
from helpers import tiny_config
from preference_helpers import char_tokenizer, repeat_digit_pairs, write_base, write_jsonl
from safetensors.torch import load_file

from llmkit.align.preference import PreferenceBatches, comparison_pairs, load_preference_datasets, tokenize_preferences
from llmkit.align.reward import (
    RewardConfig,
    RewardModel,
    load_reward_model,
    pairwise_reward_loss,
    reward_training,
    train_reward,
)
from llmkit.chat import Preference, Ranking, render_completion
from llmkit.errors import ConfigError, InputError, MismatchError
from llmkit.model import Transformer
from llmkit.model.checkpoint import load_model, resolve_checkpoint
from llmkit.train.checkpoint import verify_checkpoint


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return char_tokenizer(tmp_path_factory.mktemp("corpus"))


def _train_config(out, **changes):
    settings = dict(
        out=str(out),
        max_steps=60,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        dtype="float32",
        eval_interval=0,
        log_interval=5,
        progress=False,
        device="cpu",
    )
    return reward_training(**{**settings, **changes})


def test_pairwise_loss_matches_hand_computed_values():
    chosen, rejected = torch.tensor([1.0, 0.5, -0.2]), torch.tensor([0.0, 1.0, -0.2])
    # -log σ(x) = log(1 + e^{-x}) for x = r_chosen - r_rejected - margin
    plain = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5)), math.log(2)]
    assert pairwise_reward_loss(chosen, rejected).item() == pytest.approx(sum(plain) / 3, rel=1e-6)
    with_margin = [math.log(1 + math.exp(-0.75)), math.log(1 + math.exp(0.75)), math.log(1 + math.exp(0.25))]
    weights = torch.tensor([0.5, 0.5, 1.0])
    expected = (0.5 * with_margin[0] + 0.5 * with_margin[1] + with_margin[2]) / 2.0
    assert pairwise_reward_loss(chosen, rejected, 0.25, weights).item() == pytest.approx(expected, rel=1e-6)


def test_rankings_expand_to_every_pair_of_a_prompt_in_one_batch(tokenizer):
    assert comparison_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert [len(comparison_pairs(count)) for count in range(2, 7)] == [1, 3, 6, 10, 15]
    ranking = Ranking(user("Rank"), [assistant("a"), assistant("bb"), assistant("ccc"), assistant("dddd")])
    pair = Preference(user("Pick"), assistant("x"), assistant("yy"))
    groups, dropped = tokenize_preferences(tokenizer, [ranking, pair], context_length=32)
    assert dropped == 0
    batch = PreferenceBatches(groups, batch_size=2, pad_id=tokenizer.pad_id).sequential_batch(0)
    assert batch["chosen_index"].tolist() == [0, 0, 0, 1, 1, 2, 4]
    assert batch["rejected_index"].tolist() == [1, 2, 3, 2, 3, 3, 5]
    assert batch["pair_weight"].tolist() == pytest.approx([1 / 6] * 6 + [1.0])
    for expansion, better, worse in zip(ranking.pairs() + [pair], batch["chosen_index"], batch["rejected_index"]):
        for row, response in ((better, expansion.chosen_messages), (worse, expansion.rejected_messages)):
            ids, mask = render_completion(tokenizer, expansion.prompt_messages, response)
            length = batch["last_index"][row] + 1
            assert length == len(ids) and batch["input_ids"][row, :length].tolist() == ids
            assert batch["continuation_mask"][row, :length].tolist() == mask
            assert batch["input_ids"][row, length:].eq(tokenizer.pad_id).all()
            # The response's characters and its closing <|end|>, nothing of the prompt.
            assert sum(mask) == len(response[0]["content"]) + 1
    # A response longer than the context leaves its group: of a ranking of three, one pair is left.
    long = Ranking(user("Rank"), [assistant("a"), assistant("z" * 40), assistant("b")])
    groups, dropped = tokenize_preferences(tokenizer, [long], context_length=32)
    assert dropped == 2 and len(groups[0].sequences) == 2
    # Every group appears once per epoch of training batches, in an order that is a function of the seed.
    batches = PreferenceBatches(groups * 3, batch_size=1, pad_id=tokenizer.pad_id, seed=5)
    assert torch.equal(
        batches.get_batch(4)["input_ids"],
        PreferenceBatches(groups * 3, 1, tokenizer.pad_id, seed=5).get_batch(4)["input_ids"],
    )


def test_reward_is_read_at_the_last_real_token_and_logits_are_the_head_on_the_hidden_states(tokenizer):
    torch.manual_seed(0)
    language_model = Transformer(
        tiny_config(vocab_size=tokenizer.vocab_size, context_length=32, logit_softcap=3.0)
    ).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 10))
    hidden = language_model.hidden_states(ids)
    assert hidden.shape == (2, 10, 16)
    cap = language_model.config.logit_softcap
    assert torch.equal(language_model(ids), cap * torch.tanh(language_model.lm_head(hidden) / cap))
    cache = language_model.new_cache(2)
    stepwise = torch.cat([language_model(ids[:, :6], cache=cache), language_model(ids[:, 6:], cache=cache)], dim=1)
    assert torch.allclose(stepwise, language_model(ids), atol=1e-5)

    model = RewardModel.from_language_model(language_model).eval()
    assert model.lm_head is not None  # tied: it is the token embedding
    last = torch.tensor([9, 6])
    rewards = model(ids, last)
    expected = model.reward_head(hidden[torch.arange(2), last]).squeeze(-1)
    assert torch.allclose(rewards, expected, atol=1e-6)
    changed = ids.clone()
    changed[1, 7:] = 0  # tokens after row 1's last one are padding: they change nothing
    assert torch.allclose(model(changed, last), rewards, atol=1e-6)
    untied = RewardModel.from_language_model(
        Transformer(tiny_config(vocab_size=tokenizer.vocab_size, tie_embeddings=False))
    )
    assert untied.lm_head is None and "lm_head.weight" not in untied.state_dict()


def test_a_short_run_separates_chosen_from_rejected_on_held_out_pairs(tmp_path, tokenizer):
    base = write_base(tmp_path / "base", tokenizer)
    data = write_jsonl(tmp_path / "pairs.jsonl", repeat_digit_pairs(400, seed=0))
    out = tmp_path / "reward"
    summary = train_reward(
        RewardConfig(base=str(base), datasets=[str(data)], val_fraction=0.25, epochs=None, train=_train_config(out))
    )
    assert summary["train_pairs"] == 300 and summary["val_pairs"] == 100
    assert summary["heldout_accuracy"] >= 0.8 and summary["heldout_margin"] > 0.5

    checkpoint = resolve_checkpoint(out)
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert weights["reward_head.weight"].shape == (1, 32) and "lm_head.weight" not in weights
    scorer = load_reward_model(out)
    fresh = repeat_digit_pairs(60, seed=99)
    chosen = scorer.score([row["prompt"] for row in fresh], [row["chosen"] for row in fresh])
    rejected = scorer.score([row["prompt"] for row in fresh], [row["rejected"] for row in fresh])
    assert sum(better > worse for better, worse in zip(chosen, rejected)) / len(fresh) >= 0.8
    assert scorer(fresh[0]["prompt"], fresh[0]["chosen"]) == pytest.approx(chosen[0], abs=1e-5)
    # Normalised: the chosen responses of the training rows score 0 on average.
    train_rows, _ = load_preference_datasets([str(data)], 1, 0.25, seed=1337)
    train_chosen = scorer.score(
        [row.prompt_messages for row in train_rows], [row.chosen_messages for row in train_rows]
    )
    assert sum(train_chosen) / len(train_chosen) == pytest.approx(0.0, abs=1e-4)

    with pytest.raises(MismatchError, match="reward_head"):
        load_model(out)
    with pytest.raises(InputError, match="has stage .pretrain., not .reward."):
        load_reward_model(base)
    verify_checkpoint(checkpoint)  # the normalised weights were written with their own checksums: resumable as is


def test_tied_reward_model_resumes_and_loads(tmp_path, tokenizer):
    base = write_base(tmp_path / "base", tokenizer, tie_embeddings=True)
    data = write_jsonl(tmp_path / "pairs.jsonl", repeat_digit_pairs(40, seed=3))
    out = tmp_path / "reward"
    settings = dict(base=str(base), datasets=[str(data)], val_fraction=0.0, epochs=None, normalize=False)
    train_reward(RewardConfig(**settings, train=_train_config(out, max_steps=2, batch_size=4, log_interval=1)))
    resumed = train_reward(
        RewardConfig(**settings, train=_train_config(out, max_steps=4, batch_size=4, log_interval=1, resume=True))
    )
    assert resumed["steps"] == 4 and "heldout_accuracy" not in resumed
    scorer = load_reward_model(out)
    assert scorer.model.lm_head.weight is scorer.model.token_embedding.weight
    sequence = render_completion(tokenizer, user("Repeat 1"), assistant("1"))[0]
    hidden = scorer.model.hidden_states(torch.tensor([sequence]))[0, -1]
    assert scorer.score_ids([sequence])[0] == pytest.approx(scorer.model.reward_head(hidden).item(), abs=1e-5)


def test_bad_settings_are_refused(tokenizer):
    with pytest.raises(ConfigError, match="optimizer"):
        RewardConfig(train=reward_training(optimizer="muon"))
    with pytest.raises(ConfigError, match="batch_warmup_tokens"):
        RewardConfig(train=reward_training(batch_warmup_tokens=1000))
    with pytest.raises(ConfigError, match="datasets"):
        RewardConfig(datasets=["arithmetic:0"])
    with pytest.raises(ConfigError, match="'checkpoint_format' = 'sharded'"):
        RewardConfig(train=reward_training(checkpoint_format="sharded"))


def test_embedded_tasks_validate_on_their_held_out_split():
    train, validation = load_preference_datasets(["arithmetic_plain:30"], 2000, 0.1, seed=0)
    assert 0 < len(validation) <= 3 and 20 <= len(train) <= 30
    questions = {row.prompt_messages[-1]["content"] for row in train}
    assert not questions & {row.prompt_messages[-1]["content"] for row in validation}
    assert all(row.chosen_messages != row.rejected_messages for row in train + validation)
