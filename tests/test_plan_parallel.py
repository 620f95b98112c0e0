"""The layout planner against closed forms worked by hand and against three published training runs."""

from __future__ import annotations

import pytest
import yaml

from llmkit.cli import main
from llmkit.config import build
from llmkit.errors import ConfigError
from llmkit.model import preset
from llmkit.plan.estimate import exact_parameters
from llmkit.plan.parallel import (
    Layout,
    PlanConfig,
    activation_bytes_per_layer,
    evaluate_layout,
    model_state_bytes,
    plan,
    preset_counts,
)
from llmkit.plan.published import PUBLISHED_RUNS, check_published
from llmkit.pretrain import PretrainConfig

GB = 1e9


def test_zero_stages_match_figure_1_of_the_zero_paper():
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, 64 data-parallel ranks, K = 12:
    # baseline 120 GB, P_os 31.4 GB, P_os+g 16.6 GB, P_os+g+p 1.9 GB per device.
    totals = [model_state_bytes(7.5e9, zero, 64)["total"] / GB for zero in range(4)]
    assert totals == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.05)
    # by hand: 16Φ; 4Φ + 12Φ/64; 2Φ + 14Φ/64; 16Φ/64
    assert model_state_bytes(7.5e9, 2, 64)["gradients"] == pytest.approx(2 * 7.5e9 / 64)


def test_activations_match_korthikanti_table_2_for_gpt3():
    counts = preset_counts("gpt3-175b")
    assert counts.mlp_activation_coefficient == 19  # 2 + 8 + 8 + 1: a 4h GELU MLP
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h

    def layer(**kwargs) -> float:
        values = dict(sequence=s, micro_batch=b, tp=t, sequence_parallel=False, recompute="none", flash=False)
        return activation_bytes_per_layer(counts, **{**values, **kwargs})

    assert layer(tp=1) == pytest.approx(sbh * (34 + 5 * a * s / h))  # eq. (1), as llmkit estimate
    assert layer() == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))  # tensor parallel
    assert layer() == pytest.approx(sbh * 23)  # 10 + 3 + 80/8, worked by hand
    assert layer(sequence_parallel=True) == pytest.approx(sbh * (34 + 5 * a * s / h) / t)
    assert layer(recompute="selective") == pytest.approx(sbh * (10 + 24 / t))
    assert layer(recompute="selective", sequence_parallel=True) == pytest.approx(sbh * 34 / t)
    assert layer(flash=True, sequence_parallel=True) == pytest.approx(sbh * 34 / t)  # no stored scores
    assert layer(recompute="full") == pytest.approx(2 * sbh)
    assert layer(recompute="full", sequence_parallel=True) == pytest.approx(2 * sbh / t)


def test_published_presets_have_the_papers_parameter_counts():
    assert exact_parameters(preset("bloom-176b"))[0] == 176_247_271_424  # BLOOM paper: 176,247M
    assert exact_parameters(preset("gpt3-175b"))[0] / 1e9 == pytest.approx(174.6, abs=0.05)  # Narayanan: 174.6B
    assert exact_parameters(preset("llama-65b"))[0] / 1e9 == pytest.approx(65.2, abs=0.1)  # LLaMA Table 2: 65.2B


def test_memory_of_one_layout_worked_by_hand():
    """GPT-3 175B, tp 8 x pp 16 x dp 8, micro-batch 1, full recomputation, no sequence parallelism."""
    config = PlanConfig(
        preset="gpt3-175b", gpus=1024, global_batch=1536, flash_attention=False, sequence_parallel=False
    )
    result = evaluate_layout(
        config, Layout(tp=8, pp=16, dp=8, zero=0, micro_batch=1, micro_batches=192, recompute="full")
    )
    h, s, vocab = 12288, 2048, 50257
    block = 12 * h * h + 13 * h
    embedding = vocab * h + s * h  # token and learned position embeddings on the first stage
    first_parameters = (6 * block + embedding) / 8  # 96 blocks / 16 stages = 6 a stage
    input_bytes = 2 * s * h  # full recomputation keeps each block's 16-bit input
    working = s * h * (10 + 24 / 8 + 5 * 96 * s / (h * 8))  # one layer rebuilt with all its activations
    first = 16 * first_parameters + 16 * 6 * input_bytes + working  # 1F1B: p = 16 micro-batches in flight
    last_parameters = (6 * block + vocab * h + 2 * h) / 8  # the tied head's copy and the final norm
    last = 16 * last_parameters + 6 * input_bytes + working + 4 * s * vocab / 8  # one in flight, fp32 logits
    assert result["memory"]["stages"]["first"]["total"] == pytest.approx(first)
    assert result["memory"]["stages"]["last"]["total"] == pytest.approx(last)
    assert result["memory"]["per_gpu_bytes"] == pytest.approx(max(first, last))
    assert result["memory"]["in_flight_micro_batches"] == 16
    time = result["time"]
    assert time["bubble_fraction"] == pytest.approx(15 / (192 + 15))
    micro = time["micro_batch_compute_seconds"] + time["micro_batch_tensor_parallel_seconds"]
    micro += time["micro_batch_pipeline_seconds"]
    assert time["step_seconds"] == pytest.approx((192 + 15) * micro + time["data_parallel_seconds"])
    # Narayanan et al. eq. (3): 96·B·s·l·h²·(1 + s/6h + V/16lh) FLOPs per step with recomputation.
    flops = 96 * 1536 * s * 96 * h * h * (1 + s / (6 * h) + vocab / (16 * 96 * h))
    assert time["hardware_flops_per_gpu"] * time["step_seconds"] * 1024 == pytest.approx(flops, rel=2e-3)


def test_gpipe_holds_every_micro_batch():
    config = PlanConfig(preset="gpt3-175b", gpus=1024, global_batch=1536, schedule="gpipe")
    layout = Layout(tp=8, pp=16, dp=8, zero=0, micro_batch=1, micro_batches=192, recompute="full")
    assert evaluate_layout(config, layout)["memory"]["in_flight_micro_batches"] == 192


def test_refuses_what_cannot_fit():
    with pytest.raises(ConfigError, match="no layout fits"):
        plan(PlanConfig(preset="gpt3-175b", gpus=8))
    with pytest.raises(ConfigError, match="no layout fits"):  # 175B x 16 bytes replicated on every GPU
        plan(PlanConfig(preset="gpt3-175b", gpus=64, global_batch=64, tp=1, pp=1, zero=0))
    with pytest.raises(ConfigError, match="no tp x pp x dp"):  # 96 heads: no 7-way tensor parallelism
        plan(PlanConfig(preset="gpt3-175b", gpus=7, tp=7))


def test_plan_ranks_fitting_layouts_fastest_first():
    result = plan(PlanConfig(preset="llama-7b", gpus=16, global_batch=256, tokens=1e11, top=4))
    steps = [entry["time"]["step_seconds"] for entry in result["layouts"]]
    assert steps == sorted(steps) and len(steps) == 4
    for entry in result["layouts"]:
        layout = entry["layout"]
        assert layout["tp"] * layout["pp"] * layout["dp"] == 16
        assert layout["dp"] * layout["micro_batch"] * layout["micro_batches"] == 256
        assert entry["memory"]["per_gpu_bytes"] <= 0.9 * 80 * 2**30
        assert "--nnodes=2 --nproc-per-node=8" in entry["torchrun"]
        pretrain = build(PretrainConfig, yaml.safe_load(entry["yaml"]))  # the YAML is a valid `llmkit pretrain`
        assert (pretrain.train.tp, pretrain.train.pp) == (layout["tp"], layout["pp"])
        assert pretrain.train.batch_size * pretrain.train.grad_accum * layout["dp"] == 256


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_a_layout_runs_the_recomputation_it_was_planned_with(recompute):
    result = plan(PlanConfig(preset="llama-7b", gpus=16, global_batch=256, tokens=1e11, recompute=recompute, top=1))
    text = result["layouts"][0]["yaml"]
    assert build(PretrainConfig, yaml.safe_load(text)).train.activation_checkpointing == recompute


def test_a_layout_splits_the_vocabulary_where_the_trainer_can():
    """The memory model splits embedding, head and logits over tp; the YAML asks for it where the Trainer does
    it (no pipeline parallelism, a vocabulary tp divides): llama-7b's 32,000 tokens split, GPT-3's 50,257 not."""
    for preset_name, splits in (("llama-7b", True), ("gpt3-2.7b", False)):
        for tp, pp in ((2, 1), (2, 2), (1, 2)):
            result = plan(PlanConfig(preset=preset_name, gpus=8, global_batch=64, tokens=1e10, tp=tp, pp=pp, top=1))
            train = build(PretrainConfig, yaml.safe_load(result["layouts"][0]["yaml"])).train
            assert train.vocab_parallel == (splits and tp > 1 and pp == 1), (preset_name, tp, pp)


@pytest.mark.parametrize("name", list(PUBLISHED_RUNS))
def test_published_runs_are_accepted_and_timed_within_a_quarter(name):
    result = check_published(name)
    assert result["fits"]
    assert result["published_layout"] == (name != "llama-65b")
    assert abs(result["relative_error_days"]) <= 0.25, result


def test_plan_command(capsys):
    assert main(["plan", "--preset", "llama-7b", "--gpus", "16", "--global-batch", "256", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "fastest first" in out and "torchrun --nnodes=2" in out and "plan.yaml" in out
    assert main(["plan", "--preset", "gpt3-175b", "--gpus", "8"]) == 2
    assert "no layout fits" in capsys.readouterr().err
