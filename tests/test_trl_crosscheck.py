"""TRL as a peer (issue 19 part 5): a tiny llmkit policy and reference, exported to Hugging Face format,
and the same preference pairs go through TRL's own trainers and through llmkit.

- DPO: TRL's ``DPOTrainer`` tokenizes the conversational pairs with the exported chat template into the
  ids and completion masks llmkit renders, and its loss (sigmoid, hinge), implicit rewards, accuracies,
  margins and per-token and sequence log-probabilities of policy and reference equal llmkit's
  :class:`~llmkit.align.dpo.DPOObjective` at step 0. TRL's IPO averages the log-ratios over the
  completion's tokens where llmkit's (the paper's) sums them: it equals llmkit's ``ipo_loss`` on averaged
  log-ratios.
- Reward model: TRL's ``RewardTrainer`` loss (with and without a margin) and rewards on a
  ``LlamaForSequenceClassification`` holding llmkit's trunk and head equal llmkit's pairwise loss and rewards.
- GRPO: TRL's ``GRPOTrainer`` loss on fixed prompts, completions, advantages, old and reference
  log-probabilities equals llmkit's GRPO loss for grpo, bnpo, dr_grpo and dapo, on one micro-batch and,
  where bnpo and dapo part, on a minibatch split in two (TRL's gradient accumulation).

Everything runs in float32 on the CPU; log-probabilities agree to 1e-4 (sums over up to 8 tokens of two
implementations' matmuls), losses and rewards to 1e-5."""

import pytest
import torch
from helpers import tiny_config

trl = pytest.importorskip("trl", reason="TRL (pip install -e '.[test]') is needed for the peer cross-check")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from llmkit.align.dpo import DPOObjective, ipo_loss  # noqa: E402
from llmkit.align.grpo import GRPO, GRPOConfig, grpo_update  # noqa: E402
from llmkit.align.policy_gradient import Aggregation, PolicyModel, policy_forward  # noqa: E402
from llmkit.align.preference import PreferenceBatches, tokenize_preferences  # noqa: E402
from llmkit.align.reward import RewardModel, pairwise_reward_loss, reward_pair_scores  # noqa: E402
from llmkit.align.rl_source import RolloutConfig  # noqa: E402
from llmkit.align.rollout import RolloutBatch  # noqa: E402
from llmkit.chat import Preference  # noqa: E402
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer  # noqa: E402
from llmkit.interop import export_hf  # noqa: E402
from llmkit.model import Transformer  # noqa: E402
from llmkit.model.checkpoint import write_model  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

PAIRS = [("Repeat 3", "3", "say 7 no"), ("Repeat 0", "0 then stop", "1"), ("Say yes", "no, yes no", "yes")]
# float32 on the CPU (TRL defaults to bf16 autocast where it can), no logging, progress bars or saving.
PEER_ARGS = dict(report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, save_strategy="no")


def perturbed_model(tokenizer: Tokenizer, seed: int) -> Transformer:
    """A tiny Llama-layout model with random weights everywhere, so log-probs and rewards differ clearly."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab_size=320, context_length=64, n_embd=32, tie_embeddings=False))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """llmkit's policy, reference and tokenizer, and their exports loaded by ``transformers``."""
    root = tmp_path_factory.mktemp("trl")
    (root / "corpus").mkdir()
    (root / "corpus/a.txt").write_text("Repeat the digit 0123456789 please. Say yes or no, then stop.\n" * 30)
    train_tokenizer(TokenizerConfig(source=str(root / "corpus"), out=str(root / "tok"), vocab_size=300))
    tokenizer = Tokenizer.load(root / "tok")
    models = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        models[name] = perturbed_model(tokenizer, seed)
        (root / name).mkdir()
        write_model(root / name, models[name].state_dict(), models[name].config, {"tokenizer_sha256": tokenizer.sha256})
        tokenizer.save(root / name)
        export_hf(root / name, root / f"hf_{name}")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(root / "hf_policy")
    return root, tokenizer, hf_tokenizer, models


def conversational_rows() -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        for prompt, chosen, rejected in PAIRS
    ]


def llmkit_batch(tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    rows = [Preference(row["prompt"], row["chosen"], row["rejected"]) for row in conversational_rows()]
    groups, dropped = tokenize_preferences(tokenizer, rows, 64)
    assert dropped == 0
    return PreferenceBatches(groups, len(groups), tokenizer.pad_id).sequential_batch(0)


def trimmed(ids: torch.Tensor, mask: torch.Tensor, length: torch.Tensor) -> tuple[list[int], list[bool]]:
    return ids[:length].tolist(), mask[:length].bool().tolist()


def test_dpo_loss_rewards_and_log_probs_equal_trls_dpo_trainer(peers):
    root, tokenizer, hf_tokenizer, models = peers
    beta = 0.5
    policy, reference = (
        transformers.AutoModelForCausalLM.from_pretrained(root / f"hf_{name}", dtype=torch.float32)
        for name in ("policy", "reference")
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=trl.DPOConfig(output_dir=str(root / "dpo"), beta=beta, per_device_train_batch_size=3, **PEER_ARGS),
        train_dataset=datasets.Dataset.from_list(conversational_rows()),
        processing_class=hf_tokenizer,
    )
    theirs = trainer.data_collator([trainer.train_dataset[index] for index in range(len(PAIRS))])
    ours = llmkit_batch(tokenizer)
    # TRL's rows are the chosen responses, then the rejected ones; llmkit's go pair by pair.
    our_rows = torch.cat([ours["chosen_index"], ours["rejected_index"]])
    for row, our_row in enumerate(our_rows.tolist()):
        assert trimmed(
            theirs["input_ids"][row], theirs["completion_mask"][row], theirs["attention_mask"][row].sum()
        ) == (trimmed(ours["input_ids"][our_row], ours["continuation_mask"][our_row], ours["last_index"][our_row] + 1))

    # Per-token log-probs: TRL's fused head on its models against llmkit's policy_forward.
    labels = theirs["input_ids"].masked_fill(theirs["completion_mask"] == 0, -100)
    completion = theirs["completion_mask"][:, 1:].bool()
    our_completion = ours["continuation_mask"][:, 1:]
    for name, model in (("policy", trainer.model), ("reference", trainer.ref_model)):
        with torch.no_grad():
            their_tokens = model(
                input_ids=theirs["input_ids"],
                attention_mask=theirs["attention_mask"],
                labels=labels,
                fused_lm_head=True,
            ).log_probs
            our_tokens = policy_forward(models[name], ours["input_ids"], temperature=1.0).logprobs
        for row, our_row in enumerate(our_rows.tolist()):
            torch.testing.assert_close(
                our_tokens[our_row][our_completion[our_row]], their_tokens[row][completion[row]], atol=1e-4, rtol=1e-5
            )
        # Sequence log-probs: TRL's own reference pass, per pair.
        their_chosen, their_rejected = trainer.compute_ref_log_probs(model, theirs)
        with torch.no_grad():
            our_logps = DPOObjective(beta=beta, reference=models[name]).logps(models[name], ours)[0]
        torch.testing.assert_close(our_logps[ours["chosen_index"]], their_chosen, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(our_logps[ours["rejected_index"]], their_rejected, atol=1e-4, rtol=1e-5)

    for our_loss, their_loss in (("dpo", "sigmoid"), ("hinge", "hinge")):
        trainer.loss_types, trainer.loss_weights = [their_loss], [1.0]
        trainer._metrics["eval"].clear()
        with torch.no_grad():
            their_value = trainer.compute_loss(trainer.model, theirs)
            our_value, metrics = DPOObjective(our_loss, beta, reference=models["reference"])(models["policy"], ours)
        assert float(their_value) == pytest.approx(float(our_value), abs=1e-5)
        logged = trainer._metrics["eval"]  # the models are in evaluation mode: no dropout either side
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert logged[key][-1] == pytest.approx(float(metrics[key]), abs=1e-5), key
        for key in ("logps/chosen", "logps/rejected"):
            assert logged[key][-1] == pytest.approx(float(metrics[key]), abs=1e-4), key
    assert 0 < logged["rewards/accuracies"][-1] < 1  # the pairs disagree: the comparison covers both signs

    # TRL's IPO divides each log-ratio by its completion's length before the square (confirmed with the IPO
    # authors, its comment says); llmkit's is eq. 17 on summed log-ratios. On averaged log-ratios they agree.
    trainer.loss_types = ["ipo"]
    with torch.no_grad():
        their_ipo = trainer.compute_loss(trainer.model, theirs)
        policy_logps, reference_logps = DPOObjective(beta=beta, reference=models["reference"]).logps(
            models["policy"], ours
        )
    lengths = ours["continuation_mask"].sum(dim=1)
    averaged = [
        (logps / lengths)[ours[index]]
        for logps in (policy_logps, reference_logps)
        for index in ("chosen_index", "rejected_index")
    ]
    our_ipo = ipo_loss(averaged[0], averaged[1], averaged[2], averaged[3], beta).mean()
    assert float(their_ipo) == pytest.approx(float(our_ipo), abs=1e-5)


def test_reward_model_pairwise_loss_and_rewards_equal_trls_reward_trainer(peers):
    root, tokenizer, hf_tokenizer, models = peers
    ours = RewardModel.from_language_model(models["policy"]).eval()
    with torch.no_grad():
        ours.reward_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
        ours.reward_head.bias.fill_(0.3)  # free in a pairwise loss; TRL's score layer has none
    scorer = transformers.AutoModelForSequenceClassification.from_pretrained(
        root / "hf_policy", num_labels=1, dtype=torch.float32
    )
    with torch.no_grad():
        scorer.score.weight.copy_(ours.reward_head.weight)
    trainer = trl.RewardTrainer(
        model=scorer,
        args=trl.RewardConfig(output_dir=str(root / "reward"), per_device_train_batch_size=3, **PEER_ARGS),
        train_dataset=datasets.Dataset.from_list(conversational_rows()),
        processing_class=hf_tokenizer,
    )
    batch = llmkit_batch(tokenizer)
    examples = [trainer.train_dataset[index] for index in range(len(PAIRS))]
    for example, chosen, rejected in zip(examples, batch["chosen_index"], batch["rejected_index"]):
        assert example["chosen_ids"] == batch["input_ids"][chosen, : batch["last_index"][chosen] + 1].tolist()
        assert example["rejected_ids"] == batch["input_ids"][rejected, : batch["last_index"][rejected] + 1].tolist()
    trainer.model.eval()
    with torch.no_grad():
        chosen, rejected = reward_pair_scores(ours, batch)
        for margin in (0.0, 0.5):
            theirs = trainer.data_collator([{**example, "margin": margin} for example in examples])
            their_loss, outputs = trainer.compute_loss(trainer.model, theirs, return_outputs=True)
            assert float(their_loss) == pytest.approx(float(pairwise_reward_loss(chosen, rejected, margin)), abs=1e-5)
    their_chosen, their_rejected = outputs.logits.squeeze(-1).chunk(2)
    torch.testing.assert_close(chosen - 0.3, their_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected - 0.3, their_rejected, atol=1e-5, rtol=1e-5)


def grpo_inputs(generator: torch.Generator, rows: int, prompt_length: int, completion_lengths: list[int]) -> dict:
    """Fixed prompts and right-padded completions of up to 5 tokens, advantages, and old and reference
    log-probs near the policy's (so some ratios are clipped)."""
    width = 5
    completion_mask = torch.tensor([[1] * length + [0] * (width - length) for length in completion_lengths])
    return {
        "prompt_ids": torch.randint(10, 300, (rows, prompt_length), generator=generator),
        "prompt_mask": torch.ones(rows, prompt_length, dtype=torch.long),
        "completion_ids": torch.randint(10, 300, (rows, width), generator=generator) * completion_mask
        + (1 - completion_mask),  # pad id 1 after the completion
        "completion_mask": completion_mask,
        "advantages": torch.randn(rows, generator=generator),
        "shift": 0.3 * torch.randn(rows, width, generator=generator),
        "reference_shift": 0.5 * torch.randn(rows, width, generator=generator),
    }


def our_grpo_loss(models, inputs: dict, loss_type: str, beta: float, clip: float, policy_logps) -> torch.Tensor:
    """llmkit's GRPO loss on TRL's inputs laid out as a RolloutBatch (target positions of prompt + completion)."""
    prompt_length = inputs["prompt_ids"].shape[1]
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.bool)
    mask[:, prompt_length - 1 :] = inputs["completion_mask"].bool()

    def at_targets(values: torch.Tensor) -> torch.Tensor:
        placed = torch.zeros(mask.shape)
        placed[:, prompt_length - 1 :] = values
        return placed

    batch = RolloutBatch(
        input_ids,
        mask,
        torch.zeros(len(input_ids)),
        old_logprobs=at_targets(policy_logps + inputs["shift"]),
        reference_logprobs=at_targets(policy_logps + inputs["reference_shift"]),
        advantages=inputs["advantages"][:, None] * mask,
    )
    config = GRPOConfig(
        group_size=2,
        kl_coef=beta,
        rollout=RolloutConfig(max_new_tokens=inputs["completion_ids"].shape[1]),
        update=grpo_update(loss_type=loss_type, clip=clip),
    )
    loss, _ = GRPO(config).loss(PolicyModel(models["policy"], None, 1.0), batch)
    return loss


def their_grpo_loss(trainer, inputs: dict, policy_logps, items: int) -> torch.Tensor:
    trl_inputs = {key: inputs[key] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    trl_inputs.update(
        advantages=inputs["advantages"],
        old_per_token_logps=policy_logps + inputs["shift"],
        ref_per_token_logps=policy_logps + inputs["reference_shift"],
        num_items_in_batch=torch.tensor(items),
    )
    return trainer._compute_loss(trainer.model, trl_inputs)


@pytest.mark.parametrize("split", [1, 2])
def test_grpo_loss_equals_trls_for_every_loss_type_both_have(peers, split):
    root, _, hf_tokenizer, models = peers
    beta, clip = 0.04, 0.2
    trainer = trl.GRPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(root / "hf_policy", dtype=torch.float32),
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=trl.GRPOConfig(
            output_dir=str(root / f"grpo{split}"),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=split,
            num_generations=2,
            max_completion_length=5,
            beta=beta,
            epsilon=clip,
            # TRL's default multiplies the KL term by the ratio (DeepSeek-V3.2); llmkit's is DeepSeekMath's eq. 4.
            use_bias_correction_kl=False,
            **PEER_ARGS,
        ),
        train_dataset=datasets.Dataset.from_list([{"prompt": "Repeat 3"}] * 4),
        processing_class=hf_tokenizer,
    )
    trainer.model.train()  # TRL's training-mode normalisers; the tiny model has no dropout
    trainer.current_gradient_accumulation_steps = split
    generator = torch.Generator().manual_seed(3)
    # Micro-batches of different token counts, so that bnpo (a mean of micro-batch means) and dapo part.
    parts = [grpo_inputs(generator, 4, 6, lengths) for lengths in ([5, 1, 3, 2], [4, 5, 5, 2])[:split]]
    tokens = sum(int(part["completion_mask"].sum()) for part in parts)
    values = {}
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        trainer.loss_type = loss_type
        theirs = ours = 0.0
        units = [Aggregation(loss_type, 5).units(part["completion_mask"].bool()) for part in parts]
        for part, unit in zip(parts, units):
            input_ids = torch.cat([part["prompt_ids"], part["completion_ids"]], dim=1)
            policy_logps = policy_forward(models["policy"], input_ids, 1.0).logprobs[:, 5:].detach()
            theirs = theirs + their_grpo_loss(trainer, part, policy_logps, tokens)
            # llmkit weighs each micro-batch by its share of the minibatch's units (RolloutSource._weigh).
            ours = ours + unit / sum(units) * our_grpo_loss(models, part, loss_type, beta, clip, policy_logps)
        assert float(theirs) == pytest.approx(float(ours), abs=1e-5), loss_type
        values[loss_type] = float(ours)
    assert (values["bnpo"] == values["dapo"]) is (split == 1)  # one micro-batch: the same loss by definition
