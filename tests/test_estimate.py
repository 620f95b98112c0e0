"""Planning estimates against hand-worked figures from the papers."""

from __future__ import annotations

import json
import math

import pytest

from llmkit.errors import ConfigError
from llmkit.model import Transformer, preset
from llmkit.plan.estimate import (
    DEVICES,
    EstimateConfig,
    closed_form_parameters,
    estimate,
    exact_parameters,
    format_estimate,
)

DAY = 86400


def gpt3(**overrides) -> dict:
    values = dict(preset="gpt3-175b", tokens=300e9, gpus=1024, gpu="a100-40gb", mfu=0.462)
    values.update(overrides)
    return estimate(EstimateConfig(**values))


# --------------------------------------------------------------------------------------- GPT-3 175B


def test_gpt3_parameters_closed_form_and_exact():
    h, layers, vocab, context = 12288, 96, 50257, 2048
    closed = layers * (12 * h * h + 13 * h) + vocab * h
    assert closed == 174_579_068_928
    exact = closed + context * h + 2 * h  # + learned positions + final LayerNorm (weight, bias)
    result = gpt3()
    assert result["parameters"]["closed_form"] == closed
    assert result["parameters"]["exact"] == exact == 174_604_259_328
    assert round(exact / 1e9, 1) == 174.6
    assert "GPT layout" in result["parameters"]["closed_form_label"]
    assert "approximation" not in result["parameters"]["closed_form_label"]


def test_gpt3_training_flops_match_the_paper():
    # GPT-3 paper, appendix D: 3.14e23 FLOPs for 175B parameters on 300B tokens.
    flops = gpt3()["compute"]["training_flops"]
    assert flops == pytest.approx(6 * 174_604_259_328 * 300e9)
    assert flops == pytest.approx(3.14e23, rel=0.01)


def test_gpt3_wall_time_at_model_flops_utilisation():
    # 6·174.6e9·300e9 / (1024 · 312e12 · 0.462) = 3.1428e23 / 1.4761e17 = 2.129e6 s = 24.6 days.
    # (The "34 days" figure is Narayanan et al. 2021's 8TP/(nX), with recomputation: next test.)
    time = gpt3()["compute"]["time"]
    hand = 6 * 174.6e9 * 300e9 / (1024 * 312e12 * 0.462)
    assert time["seconds"] == pytest.approx(hand, rel=1e-3)
    assert time["days"] == pytest.approx(24.6, abs=0.1)
    assert gpt3()["compute"]["time_with_recompute"]["days"] == pytest.approx(24.64 * 8 / 6, abs=0.05)


def test_gpt3_34_days_with_recomputation():
    # Narayanan et al. 2021 §5.1: 8·T·P / (n·X) with X = 140 TFLOP/s per A100 (recomputed forward included)
    # = 8 · 300e9 · 175e9 / (1024 · 140e12) = 2.93e6 s ≈ 34 days.
    result = gpt3(mfu=140e12 / 312e12, activation_checkpointing="full")
    recompute = result["compute"]["time_with_recompute"]
    assert recompute["hardware_flops"] == pytest.approx(8 * 174_604_259_328 * 300e9)
    assert abs(recompute["days"] - 34) <= 1
    # At 46.2 % counted on hardware FLOPs: 8·174.6e9·300e9 / (1024·312e12·0.462) / 86400 = 32.9 days.
    at_palm_utilisation = gpt3(activation_checkpointing="full")["compute"]["time_with_recompute"]
    assert at_palm_utilisation["days"] == pytest.approx(32.86, abs=0.05)


def test_gpt3_format():
    text = format_estimate(gpt3())
    for fragment in (
        "174.6 B",
        "174,604,259,328",
        "174,579,068,928",
        "3.14e23 FLOPs",
        "24.6 days",
        "1,024 x a100-40gb",
        "46.2 %",
        "3.18 TiB",
        "20 bytes/param",
    ):
        assert fragment in text, fragment


def test_result_is_json_serialisable():
    json.dumps(gpt3(activation_checkpointing="full"))


# ------------------------------------------------------------------------------ other classic sizes


@pytest.mark.parametrize(
    "name, exact, paper",
    [
        # LLaMA Table 2 (Touvron et al. 2023) lists these sizes truncated to one decimal.
        ("llama-7b", 6_738_415_616, 6.7),
        ("llama-13b", 13_015_864_320, 13.0),
        ("llama-33b", 32_528_943_616, 32.5),
        ("llama-65b", 65_285_660_672, 65.2),
    ],
)
def test_llama_parameter_counts(name, exact, paper):
    config = preset(name)
    h, f, layers = config.n_embd, config.ffn_hidden, config.n_layer
    hand = layers * (4 * h * h + 3 * h * f + 2 * h) + 2 * config.vocab_size * h + h  # untied, RMSNorm, no biases
    assert hand == exact
    total, _ = exact_parameters(config)
    assert total == exact
    assert math.floor(total / 1e8) / 10 == paper


def test_gpt1_about_117m():
    total, _ = exact_parameters(preset("gpt1"))
    # 12(12·768² + 13·768) + 40478·768 + 512·768; post-LN has no final norm.
    assert total == 12 * (12 * 768**2 + 13 * 768) + 40478 * 768 + 512 * 768 == 116_534_784
    assert total == pytest.approx(117e6, rel=0.01)


def test_gpt2_xl_about_1_5b():
    total, _ = exact_parameters(preset("gpt2-xl"))
    assert total == 48 * (12 * 1600**2 + 13 * 1600) + 50257 * 1600 + 1024 * 1600 + 2 * 1600
    assert 1.5e9 <= total <= 1.6e9


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-125m", "gpt3-1.3b", "gpt3-13b"])
def test_closed_form_is_exact_minus_positions_and_final_norm(name):
    config = preset(name)
    total, _ = exact_parameters(config)
    positions = config.context_length * config.n_embd
    final_norm = 2 * config.n_embd
    assert closed_form_parameters(config) == total - positions - final_norm
    result = estimate(EstimateConfig(preset=name))
    assert result["parameters"]["position_embeddings"] == positions
    assert result["parameters"]["final_norm"] == final_norm


def test_non_gpt_layout_is_labelled_an_approximation():
    result = estimate(EstimateConfig(preset="llama-7b"))
    assert result["model"]["gpt_layout"] is False
    assert "GPT-layout approximation" in result["parameters"]["closed_form_label"]
    assert "GPT-layout approximation" in format_estimate(result)


def test_meta_count_equals_materialised_model():
    for name in ("cpu-tiny", "baby-gpt"):
        config = preset(name)
        total, non_embedding = exact_parameters(config)
        model = Transformer(config)
        assert total == model.num_parameters()
        assert non_embedding == model.num_parameters(exclude_embeddings=True)
    assert (
        estimate(EstimateConfig(preset="cpu-tiny", gpu="cpu"))["parameters"]["exact"]
        == Transformer(preset("cpu-tiny")).num_parameters()
    )


# ---------------------------------------------------------------------------------------- memory


def test_training_memory_is_20_bytes_per_parameter():
    result = estimate(EstimateConfig(preset="gpt2", gpus=8))
    n = result["parameters"]["exact"]
    memory = result["training_memory"]
    assert memory["states_bytes"] == 20 * n
    assert sum(memory["bytes_per_param_breakdown"].values()) == 20
    assert memory["per_gpu_replicated_bytes"] == pytest.approx(20 * n + memory["activation_bytes"])
    assert memory["per_gpu_zero3_bytes"] == pytest.approx(20 * n / 8 + memory["activation_bytes"])


def test_activation_memory_korthikanti():
    # gpt2: s=1024, b=2, h=768, a=12, 12 layers: s·b·h·(34 + 5·a·s/h) = 1024·2·768·(34 + 80) per layer.
    result = estimate(EstimateConfig(preset="gpt2", batch_size=2))
    assert result["training_memory"]["activation_bytes"] == pytest.approx(12 * 1024 * 2 * 768 * 114)
    recomputed = estimate(EstimateConfig(preset="gpt2", batch_size=2, activation_checkpointing="full"))
    assert recomputed["training_memory"]["activation_bytes"] == pytest.approx(12 * 2 * 1024 * 2 * 768)
    # Selective recomputation drops the attention core's 5·a·s/h: 34 of 114 per s·b·h (Korthikanti et al. §4.1).
    selective = estimate(EstimateConfig(preset="gpt2", batch_size=2, activation_checkpointing="selective"))
    assert selective["training_memory"]["activation_bytes"] == pytest.approx(12 * 1024 * 2 * 768 * 34)
    assert "attention core recomputed" in format_estimate(selective)
    shorter = estimate(EstimateConfig(preset="gpt2", sequence_length=512))
    assert shorter["training_memory"]["activation_bytes"] == pytest.approx(12 * 512 * 768 * (34 + 5 * 12 * 512 / 768))


def test_inference_memory_and_kv_cache():
    result = estimate(EstimateConfig(preset="llama-7b", batch_size=4, sequence_length=1024))
    n = result["parameters"]["exact"]
    inference = result["inference_memory"]
    kv = 2 * 32 * 4 * 1024 * 32 * 128 * 2  # K and V · layers · batch · seq · kv heads · head_dim · 2 bytes
    assert inference["kv_cache_bytes"] == kv == 2 * 2**30
    assert inference["weights_bytes"] == 2 * n
    assert inference["total_bytes"] == 2 * n + kv
    assert result["compute"]["inference_flops_per_token"] == 2 * n
    int8 = estimate(EstimateConfig(preset="llama-7b", inference_bytes_per_param=1.0))
    assert int8["inference_memory"]["weights_bytes"] == n


def test_gqa_kv_cache_is_smaller_by_the_group_size():
    mha = preset("llama-7b")
    gqa = preset("llama-7b", n_kv_head=8)
    config = EstimateConfig(preset="llama-7b", batch_size=3, sequence_length=2048)
    mha_kv = estimate(config, model=mha)["inference_memory"]["kv_cache_bytes"]
    gqa_kv = estimate(config, model=gqa)["inference_memory"]["kv_cache_bytes"]
    assert mha_kv == gqa_kv * (mha.n_head // gqa.n_kv_head) == gqa_kv * 4
    # cpu-tiny is GQA out of the box: 4 query heads share 2 kv heads.
    tiny = preset("cpu-tiny")
    tiny_kv = estimate(EstimateConfig(preset="cpu-tiny"))["inference_memory"]["kv_cache_bytes"]
    assert tiny_kv == 2 * tiny.n_layer * 1 * tiny.context_length * 2 * tiny.head_dim * 2


# ------------------------------------------------------------------------------------ validation


def test_unknown_gpu_names_the_field_and_the_choices():
    with pytest.raises(ConfigError) as error:
        EstimateConfig(gpu="a100-1tb")
    assert error.value.field == "gpu"
    assert "h100-sxm" in str(error.value) and "a100-40gb" in str(error.value)


@pytest.mark.parametrize("mfu", [0.0, -0.1, 1.5])
def test_mfu_out_of_range(mfu):
    with pytest.raises(ConfigError) as error:
        EstimateConfig(mfu=mfu)
    assert error.value.field == "mfu"
    EstimateConfig(mfu=1.0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("preset", "gpt5"),
        ("tokens", 0),
        ("gpus", 0),
        ("batch_size", 0),
        ("sequence_length", 0),
        ("inference_bytes_per_param", 0),
    ],
)
def test_other_fields_are_validated(field, value):
    with pytest.raises(ConfigError) as error:
        EstimateConfig(**{field: value})
    assert error.value.field == field


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ConfigError) as error:
        estimate(EstimateConfig(preset="gpt2", sequence_length=4096))
    assert error.value.field == "sequence_length"


def test_device_table():
    assert DEVICES["a100-40gb"]["peak_flops"] == 312e12 and DEVICES["a100-40gb"]["memory_gib"] == 40
    assert DEVICES["h100-sxm"]["peak_flops"] == 989e12
    assert DEVICES["v100"]["peak_flops"] == 125e12
    for name in ("a100-80gb", "h100-pcie", "h200", "rtx-4090", "l4", "t4", "cpu"):
        assert DEVICES[name]["peak_flops"] > 0 and DEVICES[name]["memory_gib"] > 0
