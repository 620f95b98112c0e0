"""Predicting a larger run's loss from an IsoFLOP sweep of small models, on Tiny Shakespeare (character level).

Runs ``llmkit scaling`` with its defaults (docs/scaling.md): an IsoFLOP sweep of LLaMA-style ``cpu-tiny``
models, the Chinchilla fit L(N, D) = E + A/N^α + B/D^β, then a run of ``prediction_multiplier`` (4) times the
largest sweep budget at the fitted compute-optimal size, whose validation loss is predicted before it
is trained.

Metrics (one JSON object per line):
- predicted_loss, actual_loss: validation nats/token of the predicted run, before and after training it;
- relative_error: |predicted - actual| / actual (goal <= 0.03);
- chinchilla_fit: E, A, B, alpha, beta; kaplan_fits: the L(N) and L(D) exponents;
- compute_optimal: N_opt and D_opt at the predicted run's budget; prediction_budget: its FLOPs (6ND)
  against the largest sweep budget;
- seconds: wall time of the sweep, the fits and the predicted run together.

Usage: python benchmarks/scaling_prediction.py [--out DIR]  (a kept DIR resumes a stopped sweep)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, prepare_shakespeare  # noqa: E402

from llmkit.plan.sweep import ScalingConfig, run_scaling  # noqa: E402

GOAL = 0.03


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="sweep folder to keep (default: a temporary one)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        root = arguments.out or Path(temporary)
        data = root / "data" if (root / "data" / "manifest.json").is_file() else prepare_shakespeare(root)
        start = time.perf_counter()
        summary = run_scaling(ScalingConfig(data=str(data), out=str(root / "scaling"), progress=False))
        seconds = time.perf_counter() - start
    prediction, fits, optimal = summary["prediction"], summary["fits"], summary["compute_optimal"]
    context = {
        "n_layer": prediction["n_layer"],
        "n_embd": prediction["n_embd"],
        "non_embedding_parameters": prediction["non_embedding_parameters"],
        "tokens": prediction["tokens"],
        "budget_flops": prediction["budget"],
    }
    emit("predicted_loss", round(prediction["predicted_loss"], 5), "nats/token", **context)
    emit("actual_loss", round(prediction["actual_loss"], 5), "nats/token", **context)
    error = abs(prediction["relative_error"])
    emit(
        "relative_error",
        round(error, 5),
        "fraction",
        goal=GOAL,
        met=error <= GOAL,
        signed=round(prediction["relative_error"], 5),
        multiplier=prediction["multiplier"],
    )
    chinchilla = fits["chinchilla"]
    emit(
        "chinchilla_fit",
        round(chinchilla["huber_objective"], 8),
        "huber objective",
        **{key: round(chinchilla[key], 5) for key in ("E", "A", "B", "alpha", "beta")},
        points=chinchilla["points"],
        starts=chinchilla["starts"],
    )
    emit(
        "kaplan_fits",
        round(fits["kaplan_n"].get("exponent", float("nan")), 5),
        "alpha_N",
        alpha_d=round(fits["kaplan_d"].get("exponent", float("nan")), 5),
        n_c=fits["kaplan_n"].get("scale"),
        d_c=fits["kaplan_d"].get("scale"),
        isoflop_exponent=fits.get("isoflop_exponent"),
        closed_form_exponent=round(optimal["exponent_n"], 5),
    )
    emit(
        "compute_optimal",
        round(optimal["n_opt"]),
        "non-embedding parameters",
        d_opt=round(optimal["d_opt"]),
        budget_flops=optimal["budget"],
        tokens_per_parameter=round(optimal["tokens_per_parameter"], 2),
    )
    emit(
        "prediction_budget",
        prediction["budget"],
        "FLOPs (6ND)",
        largest_sweep_budget=prediction["largest_sweep_budget"],
        sweep_runs=len(summary["runs"]),
        sweep_flops=summary["sweep_flops"],
        sizes=sorted({run["non_embedding_parameters"] for run in summary["runs"]}),
    )
    emit("seconds", round(seconds, 1), "s", predicted_run_seconds=prediction["trained_seconds"])


if __name__ == "__main__":
    main()
