"""DPO by behaviour: the DPO (and cDPO), IPO and hinge losses against values worked out by hand,
sequence log-probs against a naive per-token loop and the engine's scorer, loss log 2 when the policy
is the reference, reference log-probs computed on the fly equal to precomputed ones, and short runs
that move the policy's implicit reward towards the chosen responses."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config
from preference_helpers import char_tokenizer, repeat_digit_pairs, write_base, write_jsonl

from llmkit.align.dpo import (
    DPOConfig,
    DPOObjective,
    dpo,
    dpo_loss,
    dpo_training,
    hinge_loss,
    ipo_loss,
    precompute_reference_logps,
)
from llmkit.align.preference import PreferenceBatches, load_preference_datasets, sequence_logprobs, tokenize_preferences
from llmkit.errors import ConfigError
from llmkit.infer.scoring import score_sequences
from llmkit.model import Transformer
from llmkit.model.checkpoint import load_model, read_config, resolve_checkpoint

# Four pairs: log-probs of the policy and the reference on the chosen and rejected responses.
POLICY_CHOSEN = torch.tensor([-1.0, -2.0, -4.0, -3.0])
POLICY_REJECTED = torch.tensor([-3.0, -1.5, -1.0, -3.0])
REFERENCE_CHOSEN = torch.tensor([-1.5, -2.5, -2.0, -3.0])
REFERENCE_REJECTED = torch.tensor([-2.0, -1.0, -1.0, -3.0])
# h = (policy - reference on chosen) - (policy - reference on rejected), worked out by hand.
H = [0.5 - (-1.0), 0.5 - (-0.5), -2.0 - 0.0, 0.0]  # 1.5, 1.0, -2.0, 0.0
LOGPS = (POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return char_tokenizer(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("dpo")
    base = write_base(folder / "base", tokenizer)
    data = write_jsonl(folder / "pairs.jsonl", repeat_digit_pairs(160, seed=1))
    return folder, base, data


def _batches(tokenizer, data, batch_size=8):
    rows, _ = load_preference_datasets([str(data)], 1, 0.0, seed=0)
    groups, _ = tokenize_preferences(tokenizer, rows, 32)
    return PreferenceBatches(groups, batch_size, tokenizer.pad_id)


def test_dpo_loss_matches_hand_computed_values():
    beta = 0.5
    # -log σ(x) = log(1 + e^{-x})
    expected = [math.log(1 + math.exp(-beta * h)) for h in H]
    assert dpo_loss(*LOGPS, beta).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[3] == pytest.approx(math.log(2))
    # cDPO: -(1-ε) log σ(βh) - ε log σ(-βh)
    smoothing = 0.1
    expected = [0.9 * math.log(1 + math.exp(-beta * h)) + 0.1 * math.log(1 + math.exp(beta * h)) for h in H]
    assert dpo_loss(*LOGPS, beta, label_smoothing=smoothing).tolist() == pytest.approx(expected, rel=1e-6)


def test_ipo_and_hinge_losses_match_hand_computed_values():
    # IPO with β = 0.25: target 1/(2β) = 2, so (1.5-2)², (1-2)², (-2-2)², (0-2)².
    assert ipo_loss(*LOGPS, 0.25).tolist() == pytest.approx([0.25, 1.0, 16.0, 4.0], rel=1e-6)
    # Hinge with β = 0.8: max(0, 1 - 0.8 h) = max(0, -0.2), 0.2, 2.6, 1.
    assert hinge_loss(*LOGPS, 0.8).tolist() == pytest.approx([0.0, 0.2, 2.6, 1.0], rel=1e-6, abs=1e-7)


def test_sequence_logprobs_equal_a_naive_per_token_sum(tokenizer, setup):
    _, _, data = setup
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=32)).eval()
    batch = _batches(tokenizer, data, batch_size=3).sequential_batch(0)
    ids, mask = batch["input_ids"], batch["continuation_mask"]
    lengths = batch["last_index"] + 1
    with torch.no_grad():
        summed = sequence_logprobs(model, ids, mask)
    peer = score_sequences(model, [ids[row, : lengths[row]].tolist() for row in range(len(ids))])
    for row in range(len(ids)):
        sequence = ids[row, : lengths[row]]
        with torch.no_grad():  # alone, without padding
            logprobs = F.log_softmax(model(sequence[None])[0].double(), dim=-1)
        naive = sum(
            logprobs[position - 1, sequence[position]].item()
            for position in range(1, len(sequence))
            if mask[row, position]
        )
        assert mask[row, : lengths[row]].sum() >= 2  # the digit and <|end|>
        assert summed[row].item() == pytest.approx(naive, abs=1e-4)
        assert summed[row].item() == pytest.approx(
            peer[row].logprobs[mask[row, 1 : lengths[row]]].sum().item(), abs=1e-4
        )


def test_loss_is_log_two_while_the_policy_is_the_reference_and_on_the_fly_matches_precomputed(tokenizer, setup):
    _, base, data = setup
    policy, _ = load_model(base)
    batches = _batches(tokenizer, data)
    precompute_reference_logps(policy, batches, torch.device("cpu"), torch.float32)
    batch = batches.get_batch(0)
    loss, metrics = DPOObjective("dpo", beta=0.1)(policy, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert abs(metrics["rewards/margins"].item()) < 1e-5 and metrics["rewards/accuracies"].item() == 0.0

    reference, _ = load_model(base)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    without = {key: value for key, value in batch.items() if key != "reference_logps"}
    for loss_name in ("dpo", "ipo", "hinge"):
        stored, _ = DPOObjective(loss_name, beta=0.1)(policy, batch)
        on_the_fly, _ = DPOObjective(loss_name, beta=0.1, reference=reference)(policy, without)
        assert on_the_fly.item() == pytest.approx(stored.item(), rel=1e-5)
        assert stored.item() != pytest.approx(math.log(2), abs=1e-3)


def _implicit_margins(checkpoint, base, batches, beta):
    """Mean implicit-reward margin and accuracy of ``checkpoint`` against ``base`` on every pair."""
    policy, _ = load_model(checkpoint)
    reference, _ = load_model(base)
    objective = DPOObjective(beta=beta, reference=reference)
    chosen, rejected = zip(
        *(objective.pair_scores(policy, batches.sequential_batch(index)) for index in range(batches.sequential_batches))
    )
    margins = torch.cat(chosen) - torch.cat(rejected)
    return margins.mean().item(), (margins > 0).float().mean().item()


@pytest.mark.parametrize("loss_name, precompute", [("dpo", True), ("ipo", False)])
def test_a_few_steps_move_the_policy_towards_the_chosen_responses(tokenizer, setup, loss_name, precompute):
    folder, base, data = setup
    out = folder / f"run_{loss_name}"
    config = DPOConfig(
        base=str(base),
        datasets=[str(data)],
        val_fraction=0.2,
        loss=loss_name,
        beta=0.1,
        epochs=None,
        precompute_reference=precompute,
        train=dpo_training(
            out=str(out),
            max_steps=25,
            batch_size=16,
            lr=5e-3,
            warmup_steps=5,
            dtype="float32",
            eval_interval=0,
            log_interval=5,
            progress=False,
            device="cpu",
        ),
    )
    summary = dpo(config)
    assert read_config(resolve_checkpoint(out))["stage"] == "dpo"
    batches = _batches(tokenizer, data, batch_size=32)
    assert _implicit_margins(base, base, batches, 0.1) == (0.0, 0.0)
    margin, accuracy = _implicit_margins(out, base, batches, 0.1)
    assert margin > 0.05 and accuracy > 0.7
    assert summary["heldout_margin"] > 0 and summary["heldout_accuracy"] > 0.5
    assert summary["train_pairs"] + summary["val_pairs"] == 160
    assert (out / "preference.png").is_file()


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOConfig(loss="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ConfigError, match="batch_warmup_tokens"):
        DPOConfig(train=dpo_training(batch_warmup_tokens=1000))
