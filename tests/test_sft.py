"""Supervised fine-tuning by behaviour: targets on exactly the assistant's tokens (checked by hand),
packed rows that compute the unpacked conversations' losses, first-fit-decreasing rows, capped
examples-proportional mixing against its formula, and short runs (full and LoRA) that learn a tiny
dataset well enough for greedy decoding through the engine to reproduce it, merge, and resume exactly."""

import csv
import json
import os
import signal
import string
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config
from safetensors.torch import load_file

from llmkit.align.conversation_batches import (
    ConversationBatches,
    Example,
    conversation_example,
    pack_first_fit_decreasing,
    tokenize_conversations,
)
from llmkit.align.sft import SFTConfig, load_datasets, sft, sft_loss, sft_training, split_validation
from llmkit.chat import Conversation, render_ids
from llmkit.data.shards import PrepareConfig, prepare_data
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError
from llmkit.infer import Engine, GenerationConfig
from llmkit.model import Transformer
from llmkit.model.checkpoint import load_model, write_model
from llmkit.model.lora import LoRAConfig, load_adapters
from llmkit.tokenizer import Tokenizer
from llmkit.train.objectives import IGNORE_INDEX

DATASET = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    },
    {"prompt": "What is 2+3?", "completion": "5, since 2+3=5."},
    {"instruction": "Reverse the word.", "input": "stop", "output": "pots"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "text.txt").write_text((string.ascii_letters + string.digits + string.punctuation + " \n") * 20)
    out = folder / "tokenizer"
    train_tokenizer(TokenizerConfig(source=str(folder), out=str(out), kind="char", vocab_size=200, held_out_fraction=0))
    return Tokenizer.load(out)


def chat_model(tokenizer: Tokenizer, **changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        tiny_config(vocab_size=tokenizer.vocab_size, context_length=64, n_embd=32, tie_embeddings=False, **changes)
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A base checkpoint folder (an untrained tiny model) and a dataset file of three conversations."""
    folder = tmp_path_factory.mktemp("base")
    model = chat_model(tokenizer)
    write_model(folder, model.state_dict(), model.config, {"stage": "pretrain", "tokenizer_sha256": tokenizer.sha256})
    tokenizer.save(folder)
    dataset = folder / "tiny.jsonl"
    dataset.write_text("".join(json.dumps(record) + "\n" for record in DATASET))
    return folder, dataset


def test_targets_are_the_next_assistant_tokens_worked_by_hand(tokenizer):
    special = tokenizer.special_ids
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "a",
            "tool_calls": [{"type": "custom", "custom": {"name": "f", "input": "1"}}],
        },
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "b"},
    ]
    # The rendering, and which tokens the assistant writes (its text, its call, each closing <|end|>).
    rendered = [
        ("<|endoftext|>", False),
        ("<|user|>", False),
        ("h", False),
        ("i", False),
        ("<|end|>", False),
        ("<|assistant|>", False),
        ("a", True),
        ("<|tool_call|>", True),
        ("f", True),
        ("(", True),
        ("1", True),
        (")", True),
        ("<|end|>", True),
        ("<|tool_result|>", False),
        ("2", False),
        ("<|end|>", False),
        ("b", True),
        ("<|end|>", True),
    ]
    ids = [special[token] if token in special else tokenizer.encode(token)[0] for token, _ in rendered]
    assert render_ids(tokenizer, messages) == (ids, [learned for _, learned in rendered])
    example = conversation_example(tokenizer, messages, "task")
    assert example.input_ids.tolist() == ids[:-1]
    expected = [ids[j + 1] if rendered[j + 1][1] else IGNORE_INDEX for j in range(len(ids) - 1)]
    assert example.targets.tolist() == expected
    # by position: "<|assistant|>" predicts "a"; the tool result and its <|end|> are never targets
    assert example.targets[5] == tokenizer.encode("a")[0] and example.targets[12:15].tolist() == [IGNORE_INDEX] * 3
    assert example.targets[-1] == special["<|end|>"]


def test_overlong_conversations_are_truncated_or_dropped_and_counted(tokenizer):
    long = Conversation([{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 30}], "t")
    late = Conversation([{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}], "t")
    short = Conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "t")
    examples, counts = tokenize_conversations(tokenizer, [long, late, short], 40, "truncate")
    # "late"'s only assistant token falls outside the 40-token context; "short" is 7 tokens, 6 inputs
    assert counts == {"truncated": 1, "dropped": 1} and [len(example) for example in examples] == [40, 6]
    examples, counts = tokenize_conversations(tokenizer, [long, late, short], 40, "drop")
    assert counts == {"truncated": 0, "dropped": 2} and [len(example) for example in examples] == [6]


def test_first_fit_decreasing_by_hand():
    # longest first: 5 -> row 0, 4 -> row 1, 3 -> row 0 (full), 3 -> row 1, 2 -> new row 2, 2 -> row 2, 1 -> row 1
    assert pack_first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 8) == [[0, 2], [1, 3, 6], [4, 5]]


def per_token_losses(model, input_ids, targets, **kwargs) -> torch.Tensor:
    logits = model(input_ids, **kwargs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_packed_rows_give_the_losses_of_the_conversations_one_by_one(tokenizer, position):
    model = chat_model(tokenizer, position=position).eval()
    conversations = [
        Conversation(record, "t")
        for record in (
            [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}],
            [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"},
            ],
            [
                {"role": "system", "content": "Terse."},
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": "So."},
            ],
            [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Red"}],
        )
    ]
    examples, _ = tokenize_conversations(tokenizer, conversations, 64)
    batch = ConversationBatches(examples, 2, 64, tokenizer.pad_id).sequential_batch(0)
    assert batch["input_ids"].shape == (2, 64) and int(batch["document_ids"].max()) >= 2  # several per row
    with torch.no_grad():
        packed = per_token_losses(model, batch["input_ids"], batch["targets"], document_ids=batch["document_ids"])
        alone = [
            per_token_losses(model, torch.from_numpy(example.input_ids)[None], torch.from_numpy(example.targets)[None])
            for example in examples
        ]
        loss, _ = sft_loss(model, batch)
    counted = sum(int((example.targets != IGNORE_INDEX).sum()) for example in examples)
    assert int((batch["targets"] != IGNORE_INDEX).sum()) == counted
    total = sum(float(losses.sum()) for losses in alone)
    assert float(packed.sum()) == pytest.approx(total, rel=1e-5)
    assert float(loss) == pytest.approx(total / counted, rel=1e-5)
    # conversation by conversation: its tokens' losses in the row are those it has alone
    rows = ConversationBatches(examples, 2, 64, tokenizer.pad_id).epoch_rows(0)
    flat = packed.view(2, 64)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            length = len(examples[index])
            torch.testing.assert_close(flat[row, start : start + length], alone[index][0:length], atol=1e-5, rtol=1e-5)
            start += length


def fake_examples(sizes: dict[str, int]) -> list[Example]:
    """Examples of 3 to 7 tokens whose inputs are all their own index, so a batch tells which it holds."""
    examples = []
    for task, size in sizes.items():
        for number in range(size):
            length = 3 + number % 5
            examples.append(Example(np.full(length, len(examples)), np.arange(length), task))
    return examples


def conversations_in(batch) -> list[int]:
    """Example indices of the conversations in a batch's rows (padding has the input id -1)."""
    found = []
    for ids, documents in zip(batch["input_ids"], batch["document_ids"]):
        found += [int(ids[documents == document][0]) for document in documents.unique()]
    return [index for index in found if index >= 0]


def test_capped_examples_proportional_mixing_matches_its_formula():
    sizes, cap = {"large": 300, "medium": 60, "small": 5}, 100
    examples = fake_examples(sizes)
    batches = ConversationBatches(examples, 8, 16, -1, seed=3, task_cap=cap)
    expected = {"large": 100 / 165, "medium": 60 / 165, "small": 5 / 165}
    assert batches.rates == pytest.approx(expected)
    # the rows of three mixture epochs, as the batches deliver them
    rows = batches.rows_in_epochs(3)
    drawn = [index for batch in range(rows // 8) for index in conversations_in(batches.get_batch(batch))]
    drawn += conversations_in({key: value[: rows % 8] for key, value in batches.get_batch(rows // 8).items()})
    by_task = Counter(examples[index].task for index in drawn)
    assert {task: count / len(drawn) for task, count in by_task.items()} == pytest.approx(expected, abs=1e-12)
    assert by_task == {"large": 300, "medium": 180, "small": 15}
    # three epochs take 3 x 100 of the 300 large-task examples: each exactly once
    assert sorted(index for index in drawn if examples[index].task == "large") == list(range(300))
    fresh = ConversationBatches(examples, 8, 16, -1, seed=3, task_cap=cap)
    assert all(torch.equal(fresh.get_batch(7)[key], batches.get_batch(7)[key]) for key in ("input_ids", "document_ids"))


def test_pretraining_rows_are_marked_and_count_every_token():
    class Windows:
        def get_batch(self, index):
            rows = torch.arange(17).repeat(2, 1) + index
            return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}

    batches = ConversationBatches(fake_examples({"t": 20}), 4, 16, 0, pretraining=Windows(), pretraining_rows=2)
    batch = batches.get_batch(5)
    assert batch["pretraining"].tolist() == [False, False, True, True]
    assert (batch["targets"][2:] != IGNORE_INDEX).all() and batch["document_ids"][2:].eq(0).all()
    model = Transformer(tiny_config(vocab_size=61, context_length=16)).eval()
    with torch.no_grad():
        loss, metrics = sft_loss(model, batch)
        losses = per_token_losses(model, batch["input_ids"], batch["targets"], document_ids=batch["document_ids"]).view(
            4, 16
        )
    counted = batch["targets"] != IGNORE_INDEX
    assert metrics["pretrain_loss"] == pytest.approx(float(losses[2:].sum() / counted[2:].sum()), rel=1e-5)
    assert metrics["sft_loss"] == pytest.approx(float(losses[:2].sum() / counted[:2].sum()), rel=1e-5)
    assert float(loss) == pytest.approx(float(losses.sum() / counted.sum()), rel=1e-5)


def test_embedded_tasks_and_files_become_labelled_conversations(base):
    _, dataset = base
    conversations = load_datasets(["arithmetic:4", str(dataset)], 10, seed=0)
    assert Counter(conversation.task for conversation in conversations) == {"arithmetic": 4, "tiny": 3}
    assert conversations[0].messages[1]["role"] == "user" and conversations[0].messages[2].get("tool_calls")
    with pytest.raises(ConfigError, match="positive integer"):
        SFTConfig(datasets=["arithmetic:many"])


def test_pretraining_mix_validation_split_and_dropped_conversations(base, tokenizer, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(f"line {number} of plain text." for number in range(300)))
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
    dataset = base[1]
    # the arithmetic system prompt alone outgrows the 64-token context: no assistant token fits, all 6 dropped
    summary = sft(
        run_config(
            base,
            tmp_path / "run",
            epochs=None,
            pretrain_data=str(tmp_path / "data"),
            pretrain_fraction=0.5,
            datasets=[str(dataset), "arithmetic:6"],
            val_fraction=0.34,
            train={"max_steps": 3},
        )
    )
    assert summary["pretraining_rows"] == 2 and summary["steps"] == 3 and summary["dropped"] == 6
    assert summary["tasks"] == {"tiny": {"train": 2, "val": 1, "rate": 1.0}}
    with open(tmp_path / "run" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["loss"] and not row["event"]]
    assert len(rows) == 3 and all(float(row["pretrain_loss"]) > 0 and float(row["sft_loss"]) > 0 for row in rows)
    # the validation loss is the final model's assistant-token loss on the held-out conversation
    held_out = split_validation(load_datasets([str(dataset)], 1, 0), 0.34, seed=1)[1]
    examples, _ = tokenize_conversations(tokenizer, held_out, 64)
    with torch.no_grad():
        expected = sft_loss(
            load_model(tmp_path / "run")[0], ConversationBatches(examples, 4, 64, tokenizer.pad_id).sequential_batch(0)
        )[0]
    assert summary["val_loss"] == pytest.approx(float(expected), abs=1e-5)


def run_config(base, out, **changes) -> SFTConfig:
    folder, dataset = base
    train = dict(
        out=str(out),
        batch_size=4,
        lr=1e-2,
        warmup_steps=5,
        dtype="float32",
        progress=False,
        eval_interval=0,
        log_interval=1,
        checkpoint_interval=1000,
        seed=1,
    )
    train.update(changes.pop("train", {}))
    values = dict(
        base=str(folder), datasets=[str(dataset)], val_fraction=0.0, lora=LoRAConfig(**changes.pop("lora", {}))
    )
    values.update(changes)
    return SFTConfig(**values, train=sft_training(**train))


def mean_assistant_loss(model, tokenizer, dataset) -> float:
    examples, _ = tokenize_conversations(tokenizer, load_datasets([str(dataset)], 1, 0), 64)
    with torch.no_grad():
        return float(
            sft_loss(model.eval(), ConversationBatches(examples, 4, 64, tokenizer.pad_id).sequential_batch(0))[0]
        )


def greedy_reply(model, tokenizer, messages) -> str:
    prompt, _ = render_ids(tokenizer, messages, add_generation_prompt=True)
    return Engine(model, tokenizer).generate_ids([prompt], GenerationConfig(temperature=0, max_new_tokens=30))[0].text


def test_full_fine_tuning_learns_the_answers_and_the_end_of_turn(base, tokenizer, tmp_path):
    folder, dataset = base
    before = mean_assistant_loss(load_model(folder)[0], tokenizer, dataset)
    summary = sft(run_config(base, tmp_path / "run", epochs=100))
    # the conversations have 39, 31 and 31 input tokens: two rows of 64 per epoch, 4 rows per batch,
    # so 100 epochs are 50 steps
    assert summary["steps"] == 50 and summary["rows_per_epoch"] == 2 and summary["tasks"]["tiny"]["train"] == 3
    model, config = load_model(tmp_path / "run")
    assert config["stage"] == "sft" and config["lora"] is None
    after = mean_assistant_loss(model, tokenizer, dataset)
    assert after < 0.5 * before
    assert greedy_reply(model, tokenizer, DATASET[0]["messages"][:2]) == "Paris."
    assert greedy_reply(model, tokenizer, [{"role": "user", "content": "What is 2+3?"}]) == "5, since 2+3=5."
    assert (tmp_path / "run" / "metrics.csv").is_file() and (tmp_path / "run" / "loss.png").is_file()


def test_lora_fine_tuning_merges_into_a_plain_checkpoint(base, tokenizer, tmp_path):
    folder, dataset = base
    out = tmp_path / "lora"
    lora = {"rank": 8, "alpha": 16, "targets": ["qkv", "out", "up", "down", "lm_head"]}
    summary = sft(run_config(base, out, epochs=100, lora=lora))
    plain = chat_model(tokenizer)
    adapted_layers = [plain.lm_head] + [
        layer
        for block in plain.blocks
        for layer in (block.attention.qkv, block.attention.out, block.feed_forward.up, block.feed_forward.down)
    ]
    assert summary["merged"] and summary["trainable_parameters"] == sum(
        8 * (layer.in_features + layer.out_features) for layer in adapted_layers
    )
    merged, config = load_model(out)  # plain: the adapters are in the weights
    assert config["lora"]["merged"] and set(load_file(str(out / "checkpoints/step_00000050/model.safetensors"))) == set(
        plain.state_dict()
    )
    assert mean_assistant_loss(merged, tokenizer, dataset) < 0.5 * mean_assistant_loss(
        load_model(folder)[0], tokenizer, dataset
    )
    assert greedy_reply(merged, tokenizer, DATASET[0]["messages"][:2]) == "Paris."
    adapted = load_adapters(load_model(folder)[0], out / "adapters", base_checkpoint=folder).eval()
    ids = torch.tensor([render_ids(tokenizer, DATASET[0]["messages"])[0]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="merged"):
        sft(run_config(base, out, epochs=200, lora=lora, train={"resume": True}))


def test_an_interrupted_lora_run_resumes_to_the_same_weights(base, tmp_path, monkeypatch):
    settings = dict(epochs=None, lora={"rank": 4}, train={"max_steps": 8, "checkpoint_interval": 2})
    sft(run_config(base, tmp_path / "whole", **settings))
    original = ConversationBatches.get_batch

    def interrupt_at_five(self, index):
        if index == 5:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return original(self, index)

    monkeypatch.setattr(ConversationBatches, "get_batch", interrupt_at_five)
    first = sft(run_config(base, tmp_path / "split", **settings))
    assert first["interrupted"] and not first["merged"] and first["steps"] == 6
    monkeypatch.setattr(ConversationBatches, "get_batch", original)
    resumed = sft(run_config(base, tmp_path / "split", **{**settings, "train": {**settings["train"], "resume": True}}))
    assert resumed["steps"] == 8 and resumed["merged"]
    whole = load_file(str(tmp_path / "whole/checkpoints/step_00000008/model.safetensors"))
    split = load_file(str(tmp_path / "split/checkpoints/step_00000008/model.safetensors"))
    assert all(torch.equal(whole[name], split[name]) for name in whole)
