"""Training objectives: prefix-LM masking of the loss, the prefix and span-corruption batch transforms,
the MoE auxiliary loss, and the objectives through the Trainer and the command line."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from helpers import SyntheticBatches, tiny_config
from torch import nn

from llmkit.cli import main
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.pretrain import ModelOverrides, PretrainConfig
from llmkit.tokenizer import ENDOFTEXT, PAD, RESERVED, SPECIAL_TOKENS, Tokenizer
from llmkit.train.config import TrainConfig
from llmkit.train.objectives import (
    IGNORE_INDEX,
    ObjectiveBatches,
    SpanCorruption,
    auxiliary_loss,
    build_objective,
    causal_lm_loss,
    prefix_lm_loss,
    random_prefix,
    unwrap_model,
)
from llmkit.train.trainer import Trainer

CORPUS = "\n".join(f"the {i % 13} cat sat on the {i % 7} mat and saw {i % 5} birds." for i in range(600))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("objectives")
    (folder / "corpus.txt").write_text(CORPUS)
    train_tokenizer(
        TokenizerConfig(source=str(folder / "corpus.txt"), kind="char", vocab_size=64, out=str(folder / "tok"))
    )
    return Tokenizer.load(folder / "tok")


class FixedLogits(nn.Module):
    """Returns fixed logits and records what it was called with; optionally reports MoE statistics."""

    def __init__(self, logits, aux_loss=None, expert_utilisation=None):
        super().__init__()
        self.logits, self.calls = logits, []
        if aux_loss is not None:
            self.aux_loss = aux_loss
        self.expert_utilisation = expert_utilisation

    def forward(self, input_ids, prefix_lengths=None):
        self.calls.append(prefix_lengths)
        return self.logits


class TextTokens:
    """Causal batches of random tokens drawn from above the special ids, so a sentinel in the
    corrupted output can only have come from the transform."""

    def __init__(self, batch_size, context_length, vocab_size=200, first_text_id=len(SPECIAL_TOKENS)):
        self.batch_size, self.context_length, self.vocab_size, self.first = (
            batch_size,
            context_length,
            vocab_size,
            first_text_id,
        )

    def get_batch(self, index):
        rows = torch.randint(
            self.first,
            self.vocab_size,
            (self.batch_size, self.context_length + 1),
            generator=torch.Generator().manual_seed(index),
        )
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}

    def sequential_batch(self, index):
        return self.get_batch(-1 - index)


def hand_prefix_loss(logits, targets, prefix_lengths):
    """Mean negative log-likelihood over targets whose token (at position j+1) lies outside the prefix."""
    terms = []
    for row in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            if j + 1 >= prefix_lengths[row]:
                scores = logits[row, j].tolist()
                log_partition = math.log(sum(math.exp(score) for score in scores))
                terms.append(log_partition - scores[targets[row, j]])
    return sum(terms) / len(terms)


def random_prefix_batch(seed=0, rows=3, length=7, vocab=11):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, vocab, generator=generator)
    batch = {
        "input_ids": torch.randint(0, vocab, (rows, length), generator=generator),
        "targets": torch.randint(0, vocab, (rows, length), generator=generator),
        "prefix_lengths": torch.tensor([1, 4, 7]),
    }
    return logits, batch


# ------------------------------------------------------------------------ losses
def test_prefix_loss_equals_hand_masked_cross_entropy():
    logits, batch = random_prefix_batch()
    model = FixedLogits(logits)
    loss, _ = prefix_lm_loss(model, batch)
    assert loss.item() == pytest.approx(hand_prefix_loss(logits, batch["targets"], batch["prefix_lengths"]), rel=1e-5)
    assert torch.equal(model.calls[0], batch["prefix_lengths"])


def test_targets_inside_the_prefix_do_not_count_but_the_first_after_it_does():
    logits, batch = random_prefix_batch(seed=1)
    loss, _ = prefix_lm_loss(FixedLogits(logits), batch)
    inside = {**batch, "targets": batch["targets"].clone()}
    inside["targets"][1, :2] = (inside["targets"][1, :2] + 1) % 11  # row 1 has prefix 4: targets 0..2 are prefix tokens
    inside["targets"][2, :6] = (inside["targets"][2, :6] + 1) % 11
    assert prefix_lm_loss(FixedLogits(logits), inside)[0].item() == loss.item()
    first_predicted = {**batch, "targets": batch["targets"].clone()}
    first_predicted["targets"][1, 3] = (
        first_predicted["targets"][1, 3] + 1
    ) % 11  # predicts token 4, the first after the prefix
    assert prefix_lm_loss(FixedLogits(logits), first_predicted)[0].item() != loss.item()


def test_prefix_length_one_is_the_causal_loss():
    logits, batch = random_prefix_batch(seed=2)
    batch["prefix_lengths"] = torch.ones(3, dtype=torch.long)
    assert prefix_lm_loss(FixedLogits(logits), batch)[0].item() == pytest.approx(
        causal_lm_loss(FixedLogits(logits), batch)[0].item()
    )


def test_prefix_loss_on_the_transformer_sees_the_prefix_bidirectionally():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    batch = {**SyntheticBatches(batch_size=2).get_batch(0), "prefix_lengths": torch.tensor([5, 9])}
    loss, _ = prefix_lm_loss(model, batch)
    logits = model(batch["input_ids"], prefix_lengths=batch["prefix_lengths"])
    assert loss.item() == pytest.approx(
        hand_prefix_loss(logits.detach(), batch["targets"], batch["prefix_lengths"]), rel=1e-5
    )
    # A change late in the prefix reaches the prefix's first position only through bidirectional attention.
    changed = batch["input_ids"].clone()
    changed[0, 4] = (changed[0, 4] + 1) % 61
    assert not torch.allclose(model(changed, prefix_lengths=batch["prefix_lengths"])[0, 0], logits[0, 0])


@pytest.mark.parametrize("loss_fn", [causal_lm_loss, prefix_lm_loss])
def test_objectives_are_the_language_models_loss_and_auxiliary_loss_reads_the_router(loss_fn):
    logits, batch = random_prefix_batch(seed=3)
    utilisation = torch.tensor([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]])
    with_aux = FixedLogits(logits, aux_loss=torch.tensor(0.37), expert_utilisation=utilisation)
    without, no_metrics = loss_fn(FixedLogits(logits), batch)
    loss, metrics = loss_fn(with_aux, batch)
    assert loss.item() == without.item() and metrics == no_metrics == {}  # the Trainer adds the router's loss
    aux, metrics = auxiliary_loss(with_aux)
    assert aux.item() == pytest.approx(0.37)
    assert metrics == {"aux_loss": pytest.approx(0.37), "expert_max_share": pytest.approx(0.6)}
    assert auxiliary_loss(FixedLogits(logits)) == (None, {})


def test_the_trainer_adds_a_moe_models_auxiliary_loss_in_training_not_in_validation(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config(moe_experts=4, moe_top_k=2, moe_aux_loss_weight=0.5))
    batches = SyntheticBatches(batch_size=2)
    plain = torch.nn.functional.cross_entropy(
        model(batches.get_batch(0)["input_ids"]).flatten(0, 1), batches.get_batch(0)["targets"].flatten()
    )
    aux, _ = auxiliary_loss(model)
    config = TrainConfig(
        out=str(tmp_path),
        batch_size=2,
        max_steps=1,
        eval_interval=0,
        eval_batches=1,
        log_interval=1,
        dtype="float32",
        progress=False,
        device="cpu",
    )
    summary = Trainer(model, batches, config, val_batches=batches).run()
    with open(tmp_path / "metrics.csv", newline="") as file:
        row = next(row for row in csv.DictReader(file) if row["step"] == "1" and not row["event"])
    assert aux.item() > 0 and float(row["aux_loss"]) == pytest.approx(aux.item(), rel=1e-4)
    assert float(row["loss"]) == pytest.approx(
        plain.item() + aux.item(), abs=1e-5
    )  # the first step's, before its update
    assert 0.25 <= float(row["expert_max_share"]) <= 1
    validation = batches.sequential_batch(0)
    with torch.no_grad():
        validation_loss = torch.nn.functional.cross_entropy(
            model(validation["input_ids"]).flatten(0, 1), validation["targets"].flatten()
        )
    assert summary["val_loss"] == pytest.approx(validation_loss.item(), abs=1e-5)  # the language model alone


def test_unwrap_model_sees_through_compile_and_ddp(tmp_path):
    model = Transformer(tiny_config())
    assert unwrap_model(torch.compile(model)) is model
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert unwrap_model(torch.compile(nn.parallel.DistributedDataParallel(model))) is model
    finally:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------ prefix transform
def test_random_prefix_is_deterministic_in_bounds_and_uniform():
    source = SyntheticBatches(batch_size=8, context_length=16)
    batches = ObjectiveBatches(source, random_prefix, seed=5, bytes_per_token=1.0)
    first = batches.get_batch(3)
    assert all(torch.equal(first[key], batches.get_batch(3)[key]) for key in first)
    assert torch.equal(first["input_ids"], source.get_batch(3)["input_ids"])
    draws = torch.cat([batches.get_batch(index)["prefix_lengths"] for index in range(500)])
    assert draws.min() == 1 and draws.max() == 16
    counts = torch.bincount(draws, minlength=17)[1:].float()
    assert counts.min() > 0.7 * counts.mean()  # 250 expected per value
    other_seed = ObjectiveBatches(source, random_prefix, seed=6, bytes_per_token=1.0)
    assert not torch.equal(other_seed.get_batch(3)["prefix_lengths"], first["prefix_lengths"])


# -------------------------------------------------------------- span corruption
def restore(input_ids, targets, prefix_length, sentinels, eos):
    """Undo span corruption for one row: put each sentinel's span back in place of the sentinel."""
    length = int((targets != IGNORE_INDEX).sum()) + 1
    sequence = [int(input_ids[0])] + targets[: length - 1].tolist()
    assert input_ids[: length - 1].tolist() == sequence[:-1]
    corrupted, spans = sequence[:prefix_length], sequence[prefix_length:]
    assert spans[-1] == eos
    replacement, current = {}, None
    for token in spans[:-1]:
        if token in sentinels:
            current = replacement.setdefault(token, [])
        else:
            current.append(token)
    restored = []
    for token in corrupted:
        restored += replacement[token] if token in sentinels else [token]
    order = [token for token in corrupted if token in sentinels]
    return (
        restored,
        order,
        [token for token in spans if token in sentinels],
        [len(replacement[s]) for s in order],
        length,
    )


@pytest.mark.parametrize("context_length", [16, 64, 101, 512])
def test_span_corruption_reconstructs_the_original_tokens(tokenizer, context_length):
    transform = SpanCorruption.for_tokenizer(tokenizer, context_length)
    sentinels = [tokenizer.special_ids[token] for token in RESERVED]
    pad_id = tokenizer.special_ids[PAD]
    source = TextTokens(batch_size=6, context_length=context_length)
    batches = ObjectiveBatches(source, transform, seed=0, bytes_per_token=None)
    for index in range(3):
        original = source.get_batch(index)["input_ids"]
        batch = batches.get_batch(index)
        assert batch["input_ids"].shape == batch["targets"].shape == (6, context_length)
        for row in range(6):
            prefix = int(batch["prefix_lengths"][row])
            restored, order, target_order, _, length = restore(
                batch["input_ids"][row], batch["targets"][row], prefix, set(sentinels), tokenizer.special_ids[ENDOFTEXT]
            )
            assert restored == original[row, : len(restored)].tolist()
            assert order == target_order == sentinels[: len(order)]  # unique, in order, the same in both halves
            assert 1 <= len(order) <= 8
            assert context_length - 2 <= length - 1 <= context_length  # fills the context up to rounding
            assert (batch["input_ids"][row, length - 1 :] == pad_id).all()
            assert (batch["targets"][row, length - 1 :] == IGNORE_INDEX).all()
    again = batches.get_batch(1)
    assert torch.equal(again["input_ids"], batches.get_batch(1)["input_ids"])
    assert not torch.equal(again["input_ids"], batches.get_batch(2)["input_ids"])


@pytest.mark.parametrize("context_length, expected_spans", [(64, 3), (128, 6), (1024, 8)])
def test_span_corruption_noise_density_and_span_counts(tokenizer, context_length, expected_spans):
    transform = SpanCorruption.for_tokenizer(tokenizer, context_length)
    sentinels = set(tokenizer.special_ids[token] for token in RESERVED)
    batches = ObjectiveBatches(
        TextTokens(batch_size=25, context_length=context_length), transform, seed=1, bytes_per_token=None
    )
    densities, span_counts, span_lengths, noisy_positions = [], [], [], np.zeros(context_length + 1)
    for index in range(8):
        batch = batches.get_batch(index)
        for row in range(25):
            restored, order, _, lengths, _ = restore(
                batch["input_ids"][row],
                batch["targets"][row],
                int(batch["prefix_lengths"][row]),
                sentinels,
                tokenizer.special_ids[ENDOFTEXT],
            )
            densities.append(sum(lengths) / len(restored))
            span_counts.append(len(order))
            span_lengths += lengths
            position = 0
            for token in batch["input_ids"][row, : batch["prefix_lengths"][row]].tolist():
                if token in sentinels:
                    noisy_positions[position : position + lengths[order.index(token)]] += 1
                    position += lengths[order.index(token)]
                else:
                    position += 1
    assert np.mean(densities) == pytest.approx(0.15, abs=0.01)
    assert set(span_counts) == {expected_spans}
    if expected_spans < 8:  # below the sentinel cap, spans average T5's 3 tokens
        assert np.mean(span_lengths) == pytest.approx(3.0, abs=0.25)
    assert min(span_lengths) == 1 and len(set(span_lengths)) > 3  # random lengths, not a fixed pattern
    window = len(restored)
    assert (
        noisy_positions[0] == 0 and noisy_positions[window // 10 : window - 1].min() > 0
    )  # T5: a row starts with kept text


def test_span_layout_fills_any_context_and_rejects_tiny_ones():
    for context_length in range(4, 2049):
        window, noise, spans = SpanCorruption.layout(context_length)
        assert context_length - 2 <= window + 2 * spans <= context_length
        assert 1 <= spans <= min(8, noise, window - noise)
        assert abs(noise - 0.15 * window) <= max(0.5, 1 - 0.15 * window)
    with pytest.raises(ConfigError, match="context_length"):
        SpanCorruption.layout(3)


# ------------------------------------------------------------------- training
def test_span_objective_learns_a_repeated_batch(tokenizer, tmp_path):
    class OneBatch(TextTokens):
        def get_batch(self, index):
            return super().get_batch(0)

    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=200, context_length=32, n_embd=32))
    batches, loss_fn = build_objective("span", OneBatch(4, 32), tokenizer, 32, seed=0)
    config = TrainConfig(
        out=str(tmp_path / "run"),
        max_steps=20,
        lr=1e-2,
        warmup_steps=0,
        batch_size=4,
        eval_interval=0,
        eval_batches=2,
        dtype="float32",
        progress=False,
        device="cpu",
        log_interval=5,
    )
    trainer = Trainer(model, batches, config, val_batches=batches, loss_fn=loss_fn)
    first = loss_fn(model, batches.get_batch(0))[0].item()
    summary = trainer.run()
    assert math.isfinite(summary["train_loss"]) and summary["train_loss"] < 0.5 * first
    assert summary["val_bpb"] is None and math.isfinite(summary["val_loss"])


@pytest.mark.parametrize("objective", ["prefix", "span"])
def test_pretrain_objective_from_the_command_line(tmp_path, capsys, objective):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    tok, data, run = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--source",
                str(tmp_path / "corpus.txt"),
                "--kind",
                "char",
                "--vocab-size",
                "64",
                "--out",
                str(tok),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "prepare",
                "--source",
                str(tmp_path / "corpus.txt"),
                "--tokenizer",
                str(tok),
                "--out",
                str(data),
                "--split",
                "tail",
                "--val-fraction",
                "0.2",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "pretrain",
                "--preset",
                "cpu-tiny",
                "--objective",
                objective,
                "--model.context-length",
                "48",
                "--data",
                str(data),
                "--train.out",
                str(run),
                "--train.max-steps",
                "5",
                "--train.batch-size",
                "4",
                "--train.eval-batches",
                "2",
                "--no-train.progress",
                "--train.dtype",
                "float32",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["objective"] == objective and summary["steps"] == 5
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["val_loss"])
    assert (summary["val_bpb"] is None) == (objective == "span")


def test_pretrain_config_rejects_what_span_corruption_cannot_do():
    with pytest.raises(ConfigError, match="context_length"):
        PretrainConfig(
            preset="cpu-tiny", objective="span", model=ModelOverrides(context_length=3), train=TrainConfig(max_steps=1)
        )
    with pytest.raises(ConfigError, match="target_val_bpb"):
        PretrainConfig(preset="cpu-tiny", objective="span", train=TrainConfig(max_steps=1, target_val_bpb=2.0))
    with pytest.raises(ConfigError, match="objective"):
        PretrainConfig(preset="cpu-tiny", objective="mlm")
