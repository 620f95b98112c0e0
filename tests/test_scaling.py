"""Scaling laws: the fits recover known laws, the closed-form optimum is the numeric one, and `llmkit scaling`
sweeps, predicts before it trains, resumes, and names bad fields."""

import json
import math
import random

import numpy as np
import pytest
from PIL import Image

import llmkit.plan.sweep as sweep
from llmkit.cli import build_parser, main
from llmkit.config import config_from_args
from llmkit.data.shards import PrepareConfig, prepare_data
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError, MismatchError
from llmkit.model import Transformer
from llmkit.plan.scaling import (
    ChinchillaLaw,
    KaplanLaw,
    _huber_objective,
    fit_chinchilla,
    fit_kaplan,
    isoflop_minimum,
    lower_envelope,
)
from llmkit.plan.sweep import GRIDS, ScalingConfig, ShapeRule, plan_sweep, run_scaling

# Hoffmann et al. 2022 eq. (10), and the refit of the same data by Besiroglu et al. 2024.
CHINCHILLA = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
EPOCH_REFIT = ChinchillaLaw(E=1.82, A=482.0, B=2085.0, alpha=0.3478, beta=0.3658)


def isoflop_points(law: ChinchillaLaw, noise: float, seed: int = 0):
    """Seven IsoFLOP profiles, 1e15..1e21 FLOPs, six sizes each from 1/30 to 30 times the optimum."""
    budgets = np.repeat(np.logspace(15, 21, 7), 6)
    n = law.compute_optimal(budgets)[0] * np.tile(np.logspace(-1.5, 1.5, 6), 7)
    d = budgets / (6 * n)
    loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0.0, noise, len(n)))
    return n, d, loss


@pytest.mark.parametrize("law", [CHINCHILLA, EPOCH_REFIT], ids=["chinchilla", "epoch-refit"])
def test_chinchilla_fit_recovers_the_law_behind_noisy_losses(law):
    fit = fit_chinchilla(*isoflop_points(law, noise=0.001), grid=GRIDS["coarse"])
    assert fit.starts == 3**5 and fit.points == 42
    assert fit.law.E == pytest.approx(law.E, rel=0.01)
    assert fit.law.alpha == pytest.approx(law.alpha, rel=0.03)
    assert fit.law.beta == pytest.approx(law.beta, rel=0.03)
    assert fit.law.A == pytest.approx(law.A, rel=0.15)
    assert fit.law.B == pytest.approx(law.B, rel=0.15)
    # The quantity that matters downstream: the compute-optimal size two decades past the data.
    assert fit.law.compute_optimal(1e23)[0] == pytest.approx(law.compute_optimal(1e23)[0], rel=0.1)


def test_huber_objective_gradient_matches_finite_differences():
    n, d, loss = isoflop_points(CHINCHILLA, noise=0.01)
    args = (np.log(n), np.log(d), np.log(loss), 1e-3)
    theta = np.array([6.1, 5.9, 0.5, 0.3, 0.3])  # residuals on both sides of δ
    value, gradient = _huber_objective(theta, *args)
    residual = np.log(np.exp(6.1 - 0.3 * np.log(n)) + np.exp(5.9 - 0.3 * np.log(d)) + np.exp(0.5)) - np.log(loss)
    naive = sum(0.5 * r * r if abs(r) <= 1e-3 else 1e-3 * (abs(r) - 0.5e-3) for r in residual)
    assert value == pytest.approx(naive, rel=1e-12)
    step = 1e-7
    numeric = [
        (_huber_objective(theta + step * unit, *args)[0] - _huber_objective(theta - step * unit, *args)[0]) / (2 * step)
        for unit in np.eye(5)
    ]
    assert gradient == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_closed_form_compute_optimum_equals_brute_force_minimisation():
    for law in (CHINCHILLA, EPOCH_REFIT):
        for budget in (1e18, 5.76e23, 1e26):
            n_opt, d_opt = law.compute_optimal(budget)
            assert 6 * n_opt * d_opt == pytest.approx(budget, rel=1e-12)
            sizes = np.geomspace(1e3, 1e16, 2_000_001)  # log spacing 1.5e-5
            losses = law.loss(sizes, budget / (6 * sizes))
            best = int(np.argmin(losses))
            assert 0 < best < len(sizes) - 1, "the minimum must be interior to the searched range"
            assert n_opt == pytest.approx(sizes[best], rel=1e-4)
            assert law.loss(n_opt, d_opt) <= losses[best] + 1e-12


def test_compute_optimum_needs_positive_exponents():
    with pytest.raises(ValueError, match="alpha"):
        ChinchillaLaw(E=1.0, A=1.0, B=1.0, alpha=0.0, beta=0.3).compute_optimal(1e20)


def test_kaplan_fit_recovers_the_exponent_of_a_pure_power_law():
    rng = np.random.default_rng(1)
    x = np.geomspace(1e5, 1e9, 12)
    law = KaplanLaw(scale=8.8e13, exponent=0.076, points=12)
    fit = fit_kaplan(x, law.loss(x) * np.exp(rng.normal(0, 0.002, len(x))))
    assert fit.exponent == pytest.approx(0.076, rel=0.05)
    assert math.log(fit.scale) == pytest.approx(math.log(8.8e13), rel=0.02)
    with pytest.raises(ValueError, match="two or more"):
        fit_kaplan([1e6, 1e6], [3.0, 2.9])


def test_kaplan_fits_on_the_envelopes_of_a_sweep_recover_both_exponents():
    """Losses from Kaplan et al.'s joint law L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D (their eq. 1.5, 4.1 constants).
    Each size also gets a data-rich run and each data size a model-rich run, which are where L(N, D) becomes
    L(N) and L(D); the envelopes must pick exactly those and the fits recover α_N and α_D."""
    alpha_n, n_c, alpha_d, d_c = 0.076, 8.8e13, 0.095, 5.4e13

    def joint(n, d):
        return ((n_c / n) ** (alpha_n / alpha_d) + d_c / d) ** alpha_d

    sizes, datas = np.geomspace(1e6, 1e9, 7), np.geomspace(1e8, 1e11, 7)
    points = [(n, d) for n in sizes for d in datas]  # an under-trained grid: neither resource is in excess
    rich_data = [(n, 1e17) for n in sizes]
    rich_model = [(1e16, d) for d in datas]
    points = rich_data + points + rich_model
    n = np.array([p[0] for p in points])
    d = np.array([p[1] for p in points])
    loss = joint(n, d)
    by_size = lower_envelope(n, loss)
    # The data-rich runs, then the model-rich run with the most data: N = 1e16 beats every smaller model.
    assert by_size == list(range(len(rich_data))) + [len(points) - 1]
    fit_n = fit_kaplan(n[by_size[:-1]], loss[by_size[:-1]])
    assert fit_n.exponent == pytest.approx(alpha_n, rel=1e-3)
    assert fit_n.scale == pytest.approx(n_c, rel=1e-2)
    by_data = lower_envelope(d, loss)
    assert by_data == list(range(len(points) - len(rich_model), len(points)))
    fit_d = fit_kaplan(d[by_data], loss[by_data])
    assert fit_d.exponent == pytest.approx(alpha_d, rel=1e-3)
    assert fit_d.scale == pytest.approx(d_c, rel=1e-2)


def test_lower_envelope_keeps_each_new_best_in_order_of_x():
    x = [1, 2, 2, 3, 4, 5]
    loss = [5.0, 4.0, 3.0, 3.5, 2.0, 2.0]
    assert lower_envelope(x, loss) == [0, 2, 4]


def test_isoflop_minimum_is_the_vertex_of_the_parabola_in_log_n():
    n = np.geomspace(1e4, 1e7, 6)
    assert isoflop_minimum(n, 2.0 + 0.1 * (np.log(n) - np.log(3e5)) ** 2) == pytest.approx(3e5, rel=1e-9)
    assert isoflop_minimum(n[:2], [2.0, 1.9]) is None
    assert isoflop_minimum(n, 2.0 - 0.1 * (np.log(n) - np.log(3e5)) ** 2) is None


# ------------------------------------------------------------------------------------------- the sweep
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scaling_data")
    words = "the cat sat on a mat while one dog ran far from home and then came back".split()
    generator = random.Random(0)
    # A first-order chain over words: learnable structure that bigger models and more tokens keep improving on.
    successors = {word: generator.sample(words, 3) for word in words}
    lines = []
    for _ in range(600):
        word, line = generator.choice(words), []
        for _ in range(10):
            line.append(word)
            word = generator.choice(successors[word])
        lines.append(" ".join(line))
    (folder / "corpus.txt").write_text("\n".join(lines))
    train_tokenizer(
        TokenizerConfig(
            source=str(folder / "corpus.txt"), out=str(folder / "tok"), kind="char", vocab_size=64, held_out_fraction=0
        )
    )
    prepare_data(
        PrepareConfig(
            source=str(folder / "corpus.txt"),
            tokenizer=str(folder / "tok"),
            out=str(folder / "data"),
            val_fraction=0.1,
            split="tail",
            workers=1,
        )
    )
    return str(folder / "data")


def tiny(data, out, **changes) -> ScalingConfig:
    # baby-gpt blocks with 8-wide heads: shapes (1, 8), (1, 16), (1, 32) of 888, 3,312 and 12,768 parameters,
    # trained for 10 to 390 steps of 8 x 32 tokens.
    values = dict(
        data=data,
        out=str(out),
        preset="baby-gpt",
        head_dim=8,
        context_length=32,
        batch_size=8,
        budgets=[2e8, 6e8],
        sizes=[1_000, 3_000, 10_000],
        aspect_ratio=16,
        min_tokens_per_parameter=0.1,
        max_tokens_per_parameter=1000,
        min_steps=1,
        lr=1e-2,
        eval_batches=4,
        dtype="float32",
        device="cpu",
        fit_grid="coarse",
        progress=False,
        seed=5,
    )
    values.update(changes)
    return ScalingConfig(**values)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    return out, run_scaling(tiny(data, out))


def test_shapes_follow_the_aspect_ratio_rule_and_count_like_the_model(data, tmp_path):
    # GPT layout: a block is 12h² + 13h (SPEC §3), measured here at the width the aspect ratio gives one layer.
    assert ShapeRule(tiny(data, tmp_path), vocab_size=64).k == (12 * 16**2 + 13 * 16) / 16**2
    rule = ShapeRule(tiny(data, tmp_path, preset="cpu-tiny", head_dim=None, aspect_ratio=32), vocab_size=64)
    # cpu-tiny's block at width h = 32: q and o 2h², k and v (2:1 GQA) h², SwiGLU 3·h·f with f = 8h/3 rounded
    # up to a multiple of 64 = 128, two RMSNorm gains 2h.
    h, f = 32, 64 * math.ceil(int(8 * 32 / 3) / 64)
    assert rule.k == (3 * h * h + 3 * h * f + 2 * h) / h**2
    previous = 0
    for target in (2e4, 1e5, 5e5, 2e6):
        shape = rule(target)
        count = Transformer(rule.model_config(shape)).num_parameters(exclude_embeddings=True)
        assert rule.count(shape["n_layer"], shape["n_embd"]) == count
        assert (
            shape["n_embd"] % 32 == 0
            and shape["n_head"] == 2 * shape["n_kv_head"]
            and shape["n_embd"] == 16 * shape["n_head"]
        )
        wider = rule.count(shape["n_layer"], shape["n_embd"] + 32)
        narrower = rule.count(shape["n_layer"], shape["n_embd"] - 32) if shape["n_embd"] > 32 else 0
        assert narrower < target < wider  # the nearest width at its depth
        assert count > previous
        previous = count
    deep = rule(2e6)
    assert deep["n_layer"] > 1 and deep["n_embd"] / deep["n_layer"] == pytest.approx(32, rel=0.35)


def test_tiny_sweep_writes_results_plot_and_a_prediction_made_before_training(finished):
    out, summary = finished
    runs = summary["runs"]
    assert len(runs) == 6 and {run["budget"] for run in runs} == {2e8, 6e8}
    assert sorted({(run["n_layer"], run["n_embd"]) for run in runs}) == [(1, 8), (1, 16), (1, 32)]
    for run in runs:
        result = json.loads((out / "runs" / run["name"] / "result.json").read_text())
        assert result["val_loss"] == run["val_loss"] and math.isfinite(run["val_loss"])
        assert result["flops_6nd"] == 6 * result["non_embedding_parameters"] * result["tokens"]
        # The token budget is the run's share of its FLOPs, rounded to whole steps of 8 x 32 tokens.
        assert abs(result["tokens"] - result["budget"] / (6 * result["non_embedding_parameters"])) <= 128
        assert result["tokens"] % 256 == 0
    prediction = json.loads((out / "prediction.json").read_text())
    predicted_run = json.loads((out / "predict" / "result.json").read_text())
    assert prediction["budget"] == 4 * 6e8 and prediction["predicted_at"] <= predicted_run["finished_at"]
    law = ChinchillaLaw(**prediction["law"])
    assert prediction["predicted_loss"] == pytest.approx(
        law.loss(prediction["non_embedding_parameters"], prediction["tokens"])
    )
    assert prediction["actual_loss"] == predicted_run["val_loss"]
    assert prediction["relative_error"] == pytest.approx(
        (prediction["predicted_loss"] - prediction["actual_loss"]) / prediction["actual_loss"]
    )
    optimal = summary["compute_optimal"]
    assert optimal["budget"] == 2.4e9
    assert 6 * optimal["n_opt"] * optimal["d_opt"] == pytest.approx(2.4e9)
    with Image.open(out / "scaling.png") as image:
        assert image.size[0] > 1000
    assert json.loads((out / "scaling.json").read_text())["prediction"] == prediction


def test_rerun_trains_nothing_and_keeps_the_prediction(data, finished, monkeypatch):
    out, first = finished
    before = (out / "prediction.json").read_text()

    def no_training(config):
        raise AssertionError(f"{config.train.out} was trained again")

    monkeypatch.setattr(sweep, "pretrain", no_training)
    again = run_scaling(tiny(data, out))
    assert (out / "prediction.json").read_text() == before
    assert [run["val_loss"] for run in again["runs"]] == [run["val_loss"] for run in first["runs"]]
    with pytest.raises(MismatchError, match="lr"):
        run_scaling(tiny(data, out, lr=5e-3))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"budgets": [1e12]}, "budgets"),
        ({"budgets": ["1e12", "lots"]}, "budgets"),
        ({"sizes": [100_000, -5]}, "sizes"),
        ({"prediction_multiplier": 2.0}, "prediction_multiplier"),
        ({"max_tokens_per_parameter": 0.001}, "max_tokens_per_parameter"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
        ({"aspect_ratio": 0.0}, "aspect_ratio"),
        ({"lr": -1.0}, "lr"),
        ({"preset": "gpt5"}, "preset"),
        ({"context_length": 0}, "context_length"),
        ({"head_dim": 0}, "head_dim"),
        ({"min_steps": 0}, "min_steps"),
    ],
)
def test_bad_values_are_config_errors_naming_the_field(data, tmp_path, changes, field):
    with pytest.raises(ConfigError) as error:
        tiny(data, tmp_path, **changes)
    assert error.value.field == field


def test_runs_shorter_than_min_steps_are_left_out(data, tmp_path):
    config = tiny(data, tmp_path, min_steps=30)
    rule = ShapeRule(config, vocab_size=64)
    steps = {run.name: run.tokens // 256 for run in plan_sweep(config, rule)}
    # At 2e8 FLOPs the 12,768-parameter model would get 2e8 / (6 · 12,768) / 256 = 10 steps; 3,312 gets 39.
    assert "C2.00e08_L1_H32" not in steps and steps["C2.00e08_L1_H16"] == 39
    assert len(steps) == 5 and min(steps.values()) >= 30


def test_a_budget_with_too_few_sizes_is_named(data, tmp_path):
    config = tiny(data, tmp_path, budgets=[2e8, 1e11], max_tokens_per_parameter=100)
    with pytest.raises(ConfigError, match="tokens per parameter") as error:
        run_scaling(config)
    assert error.value.field == "budgets" and error.value.value == 1e11


def test_command_line_maps_flags_and_reports_bad_ones(data, tmp_path, capsys):
    assert main(["scaling", "--data", data, "--out", str(tmp_path), "--budgets", "1e12", "--no-progress"]) == 2
    assert "config field 'budgets'" in capsys.readouterr().err
    assert main(["scaling", "--data", data, "--out", str(tmp_path), "--sizes", "10k,20x"]) == 2
    assert "config field 'sizes' = '20x'" in capsys.readouterr().err
    parser, _ = build_parser()
    arguments = parser.parse_args(
        [
            "scaling",
            "--budgets",
            "2e9,1e9",
            "--sizes",
            "20k,10k",
            "--prediction-multiplier",
            "8",
            "--fit-grid",
            "coarse",
            "--no-predict",
        ]
    )
    config = config_from_args(ScalingConfig, arguments)
    assert config.budgets == [1e9, 2e9] and config.sizes == [10_000, 20_000]
    assert (config.prediction_multiplier, config.fit_grid, config.predict, config.prediction_budget) == (
        8.0,
        "coarse",
        False,
        1.6e10,
    )


def test_fit_rejects_too_few_points():
    with pytest.raises(ValueError, match="5 parameters"):
        fit_chinchilla([1e5, 2e5, 4e5, 8e5], [1e6] * 4, [3.0, 2.9, 2.8, 2.7])
