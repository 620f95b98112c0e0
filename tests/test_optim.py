"""Muon (Newton-Schulz orthogonalisation, the update, parameter groups, resume), batch-size warmup and
the loss function's metrics in the trainer's logs."""

import csv

import pytest
import torch
import torch.nn.functional as F
from helpers import SyntheticBatches, tiny_config
from safetensors.torch import load_file
from test_train import InterruptAt, losses, run, train_config

from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.train.config import TrainConfig
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.optim import NEWTON_SCHULZ_COEFFICIENTS, Muon, MuonAdamW, build_muon, build_optimizer, newton_schulz


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48)])
def test_newton_schulz_gives_the_polar_factor_approximately(shape):
    torch.manual_seed(0)
    matrix = torch.randn(*shape)
    orthogonal = newton_schulz(matrix).float()
    singular_values = torch.linalg.svdvals(orthogonal)
    # Jordan et al.'s quintic trades exactness for speed: singular values land near 1, not on it.
    assert 0.65 <= singular_values.min() and singular_values.max() <= 1.2
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    polar = u @ vh
    assert F.cosine_similarity(orthogonal.flatten(), polar.flatten(), dim=0) > 0.97


def naive_muon(weight, grads, lr, momentum, weight_decay):
    """Jordan et al.'s Muon written out in float64: EMA momentum, Nesterov look-ahead, 5 quintic
    Newton-Schulz steps on the Frobenius-normalised update, decoupled decay, max(1, rows/cols)**0.5 scale."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    weight, buffer = weight.double().clone(), torch.zeros_like(weight, dtype=torch.float64)
    for grad in grads:
        grad = grad.double()
        buffer = momentum * buffer + (1 - momentum) * grad
        update = (1 - momentum) * grad + momentum * buffer
        x = update.T if update.shape[0] > update.shape[1] else update
        x = x / torch.sqrt((x * x).sum())
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.T if update.shape[0] > update.shape[1] else x
        weight = weight * (1 - lr * weight_decay) - lr * max(1, weight.shape[0] / weight.shape[1]) ** 0.5 * x
    return weight


def test_muon_step_matches_a_naive_reference():
    torch.manual_seed(0)
    start = torch.randn(48, 16) * 0.1
    grads = [torch.randn(48, 16) for _ in range(3)]
    ours = torch.nn.Parameter(start.clone())
    optimizer = Muon([ours], lr=0.02, momentum=0.9, weight_decay=0.1)
    for grad in grads:
        ours.grad = grad.clone()
        optimizer.step()
    expected = naive_muon(start, grads, lr=0.02, momentum=0.9, weight_decay=0.1)
    moved = (expected - start.double()).abs().max()
    # Newton-Schulz in float32 on the CPU against float64.
    assert (ours.double() - expected).abs().max() < 1e-4 * moved


@pytest.mark.parametrize("nesterov, adjust_lr_fn", [(True, None), (False, "original"), (True, "match_rms_adamw")])
def test_muon_on_a_plain_matrix_is_torch_optim_muon_up_to_its_bfloat16(nesterov, adjust_lr_fn):
    torch.manual_seed(0)
    start, grads = torch.randn(24, 40), [torch.randn(24, 40) for _ in range(3)]
    ours, peer = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    options = dict(lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    optimizers = [Muon([ours], **options), torch.optim.Muon([peer], **options)]
    for grad in grads:
        for parameter, optimizer in zip((ours, peer), optimizers):
            parameter.grad = grad.clone()
            optimizer.step()
    # torch.optim.Muon iterates in bfloat16, ours in float32 on the CPU: the same update up to its rounding
    # (about 1 % of the distance moved; a wrong scale, decay or momentum would be off by far more).
    moved = (peer.detach() - start).abs().max()
    assert (ours.detach() - peer.detach()).abs().max() < 0.03 * moved


def test_fused_blocks_are_orthogonalised_like_separate_matrices():
    torch.manual_seed(0)
    sizes = [32, 8, 8]  # q, k, v with grouped-query attention
    start, grads = torch.randn(48, 32) * 0.1, [torch.randn(48, 32) for _ in range(2)]
    fused = torch.nn.Parameter(start.clone())
    separate = [torch.nn.Parameter(block.clone()) for block in start.split(sizes)]
    whole = torch.nn.Parameter(start.clone())
    optimizers = [
        Muon([{"params": [fused], "blocks": sizes}], lr=0.02),
        Muon(separate, lr=0.02),
        Muon([whole], lr=0.02),
    ]
    for grad in grads:
        fused.grad, whole.grad = grad.clone(), grad.clone()
        for parameter, block in zip(separate, grad.split(sizes)):
            parameter.grad = block.clone()
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in separate]), rtol=0, atol=0)
    assert (whole - fused).abs().max() > 1e-3  # orthogonalising the stack is a different update


def test_every_parameter_lands_in_exactly_one_group():
    model = Transformer(
        tiny_config(
            bias=True,
            norm="layernorm",
            position="learned",
            tie_embeddings=False,
            n_head=4,
            n_kv_head=2,
            activation="swiglu",
            moe_experts=2,
            moe_top_k=1,
        )
    )
    optimizer = build_muon(model, 1e-3, 0.1, (0.9, 0.95), 0.02, 0.95, 0.0)
    muon_groups, adamw_groups = optimizer.muon.param_groups, optimizer.adamw.param_groups
    assert optimizer.param_groups == muon_groups + adamw_groups
    placed = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters())
    in_adamw = {id(p) for group in adamw_groups for p in group["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    for name, parameter in model.named_parameters():
        hidden_matrix = parameter.dim() == 2 and "embedding" not in name and name != "lm_head.weight"
        assert (id(parameter) not in in_adamw) == hidden_matrix, name
    blocks = {names[id(p)]: group["blocks"] for group in muon_groups for p in group["params"]}
    assert blocks["blocks.0.attention.qkv.weight"] == [16, 8, 8]  # 4 query heads of 4, 2 key and 2 value heads
    assert blocks["blocks.1.feed_forward.experts.0.up.weight"] == [model.config.ffn_hidden] * 2
    assert blocks["blocks.0.attention.out.weight"] is None and blocks["blocks.0.feed_forward.router.weight"] is None


def test_muon_learns_a_repeated_batch_at_least_as_well_as_adamw():
    """Same AdamW (lr 3e-3) for embeddings and norms in both runs; only the hidden matrices' optimizer differs.
    With the matrices held still (muon_lr ~ 0) the loss ends at 2.20; AdamW reaches 1.67, Muon 1.65."""
    batch = SyntheticBatches(batch_size=8).get_batch(0)
    final = {}
    for name in ("adamw", "muon"):
        torch.manual_seed(0)
        model = Transformer(tiny_config(n_embd=32, n_head=4))
        optimizer = (
            build_muon(model, 3e-3, 0.0, (0.9, 0.95), 0.02, 0.95, 0.0)
            if name == "muon"
            else build_optimizer(model, 3e-3, 0.0, (0.9, 0.95))
        )
        for _ in range(30):
            loss, _ = causal_lm_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        final[name] = causal_lm_loss(model, batch)[0].item()
    assert final["muon"] < 2.0  # from chance level, ln 61 = 4.11
    assert final["muon"] <= final["adamw"]


def test_muon_resume_continues_bit_for_bit(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    options = dict(optimizer="muon", muon_lr=0.01, model_config=tiny_config(activation="swiglu"))
    run(straight, **options)
    assert run(split, batches=InterruptAt(5), **options)["interrupted"]
    run(split, resume=True, **options)
    assert losses(split) == losses(straight)
    final = load_file(straight / "checkpoints/step_00000012/model.safetensors")
    resumed = load_file(split / "checkpoints/step_00000012/model.safetensors")
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], rtol=0, atol=0)
    state = torch.load(split / "checkpoints/step_00000012/optimizer.pt", weights_only=True)["state"]
    assert state["blocks.0.attention.qkv.weight"]["momentum_buffer"].shape == (48, 16)


class RecordingLoss:
    """causal_lm_loss that remembers the rows of every training micro-batch."""

    def __init__(self):
        self.rows = []

    def __call__(self, model, batch):
        if model.training:
            self.rows.append(batch["input_ids"].shape[0])
        return causal_lm_loss(model, batch)


def test_batch_warmup_ramps_the_rows_and_counts_only_used_tokens(tmp_path):
    recorder = RecordingLoss()
    summary = run(tmp_path / "ramp", loss_fn=recorder, max_steps=10, eval_interval=0, batch_warmup_tokens=200)
    # By hand, batch 4 x 16 tokens: rows = max(1, ceil(4 * tokens_seen / 200)) at tokens_seen
    # 0, 16, 32, 48, 64, 96, 128, 176, 240, 304.
    assert recorder.rows == [1, 1, 1, 1, 2, 2, 3, 4, 4, 4]
    assert summary["tokens"] == 16 * sum(recorder.rows)
    with pytest.raises(ConfigError, match="batch_warmup_start"):
        train_config(tmp_path, batch_warmup_tokens=200, batch_warmup_start=5)


def test_batch_warmup_resumes_mid_ramp_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight, batch_warmup_tokens=300, batch_warmup_start=2)
    run(split, batches=InterruptAt(3), batch_warmup_tokens=300, batch_warmup_start=2)
    run(split, resume=True, batch_warmup_tokens=300, batch_warmup_start=2)
    assert losses(split) == losses(straight)
    with open(straight / "metrics.csv") as file:
        tokens = [int(row["tokens"]) for row in csv.DictReader(file) if row["loss"] and not row["event"]]
    # rows = max(2, ceil(4 * tokens_seen / 300)): 2, 2, 2, 2, 2, then 3 at 160 tokens seen.
    assert tokens[:6] == [32, 64, 96, 128, 160, 208]


def test_trainer_logs_the_loss_functions_metrics(tmp_path):
    def loss_fn(model, batch):
        loss, _ = causal_lm_loss(model, batch)
        first = batch["input_ids"][0, 0]
        return loss, {"first_token": float(first), "twice": 2 * first.float(), "note": "not a number", "loss": -1.0}

    summary = run(tmp_path, loss_fn=loss_fn, grad_accum=2, max_steps=3, eval_interval=0)
    with open(tmp_path / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["loss"]]
    source = SyntheticBatches()
    for step, row in enumerate(rows):
        # Step s draws micro-batches 2s and 2s+1; the logged value is their mean.
        expected = sum(float(source.get_batch(index)["input_ids"][0, 0]) for index in (2 * step, 2 * step + 1)) / 2
        assert float(row["first_token"]) == pytest.approx(expected)
        assert float(row["twice"]) == pytest.approx(2 * expected)
        assert "note" not in row and float(row["loss"]) > 0  # the trainer's own columns win
    assert summary["train_metrics"] == {
        "first_token": pytest.approx(float(rows[-1]["first_token"])),
        "twice": pytest.approx(float(rows[-1]["twice"])),
        "loss": -1.0,
    }


def test_muon_refuses_fsdp_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="'optimizer'.*FSDP"):
        TrainConfig(optimizer="muon", parallelism="fsdp")
    with pytest.raises(ConfigError, match="'muon_momentum'"):
        TrainConfig(optimizer="muon", muon_momentum=1.0)


def test_muon_adamw_zero_grad_and_state_dict_cover_both():
    model = Transformer(tiny_config())
    optimizer = build_muon(model, 1e-3, 0.1, (0.9, 0.95), 0.02, 0.95, 0.0)
    assert isinstance(optimizer, MuonAdamW)
    causal_lm_loss(model, SyntheticBatches().get_batch(0))[0].backward()
    optimizer.step()
    state = optimizer.state_dict()
    count = sum(len(group["params"]) for group in state["param_groups"])
    assert sorted(state["state"]) == list(range(count)) == sorted(i for g in state["param_groups"] for i in g["params"])
    assert "momentum_buffer" in state["state"][0] and "exp_avg" in state["state"][count - 1]
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
