"""Scaling laws: the fitted forms of Kaplan et al. (2020) and Hoffmann et al. (2022, "Chinchilla").

Everything here is pure arithmetic on (N, D, loss) points, independent of how they were trained
(:mod:`llmkit.plan.sweep` trains them). The conventions, used throughout llmkit's scaling code:

* ``N`` is the **non-embedding** parameter count, ``Transformer.num_parameters(exclude_embeddings=True)``
  (Kaplan §2.1: laws in non-embedding parameters hold across depths and widths; counting the
  embedding bends them for small models, their Fig. 6);
* ``D`` is training tokens; ``C = 6·N·D`` is the nominal training compute in FLOPs (Kaplan §2.1,
  Chinchilla §3). ``Transformer.flops_per_token`` adds the output head and the attention-score term
  ``12·l·h·T``, which are a noticeable share for tiny models; the sweep records that count too, but
  budgets and the compute-optimal frontier are stated in ``6·N·D`` so the closed form below holds;
* losses are validation cross-entropy in nats per token.

Laws:

* Kaplan: ``L(N) = (N_c / N)^α_N`` and ``L(D) = (D_c / D)^α_D``, straight lines in log-log space,
  fitted by least squares on ``log L`` (:func:`fit_kaplan`) to the sweep's best-per-size and
  best-per-data points (:func:`lower_envelope`);
* Chinchilla: ``L(N, D) = E + A / N^α + B / D^β``, fitted as in Hoffmann et al. §3.3 / appendix D.2
  (:func:`fit_chinchilla`): minimise the Huber loss (δ = 1e-3) between
  ``LSE(a - α log N, b - β log D, e)`` and ``log L`` (``A = eᵃ``, ``B = eᵇ``, ``E = eᵉ``) with L-BFGS
  from every point of a grid of initialisations, keeping the best (α, β bounded below by 0);
* compute-optimal allocation for ``C = 6ND`` (Hoffmann et al. appendix D.3):
  ``N_opt = G·(C/6)^(β/(α+β))``, ``D_opt = G⁻¹·(C/6)^(α/(α+β))``, ``G = (αA / (βB))^(1/(α+β))``;
* IsoFLOP minima (Hoffmann et al. approach 2): a parabola in ``log N`` through one budget's runs
  gives that budget's optimal size (:func:`isoflop_minimum`), independently of the parametric fit.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from llmkit.errors import LlmkitError

HUBER_DELTA = 1e-3
# Hoffmann et al. appendix D.2: α, β ∈ {0, 0.5, …, 2}, e ∈ {-1, -0.5, …, 1}, a, b ∈ {0, 5, …, 25}.
CHINCHILLA_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
# The paper's search is unbounded; we keep α, β >= 0 (loss cannot rise with parameters or data in this law).
# On a sweep where it seems to (too few steps, too high a learning rate), an unbounded search runs off to
# α -> -∞ with A -> 0 through every one of its iteration limits; bounded, it stops at α = 0 at once.
EXPONENT_BOUNDS = [(None, None), (None, None), (None, None), (0.0, None), (0.0, None)]


def _minimize():
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise LlmkitError("fitting the Chinchilla law needs scipy (pip install 'llmkit[scaling]')") from None
    return minimize


@dataclass(frozen=True)
class ChinchillaLaw:
    """``L(N, D) = E + A / N^alpha + B / D^beta``."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def compute_optimal(self, compute) -> tuple:
        """(N_opt, D_opt) minimising the loss at ``6·N·D = compute``, from the closed form."""
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError(
                f"no compute-optimal size: the fit has alpha={self.alpha:.3g}, beta={self.beta:.3g} (both must be > 0)"
            )
        total = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / total)
        n = g * np.power(np.asarray(compute) / 6, self.beta / total)
        d = np.power(np.asarray(compute) / 6, self.alpha / total) / g
        return n, d

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ChinchillaFit:
    law: ChinchillaLaw
    objective: float  # summed Huber loss of the best start
    starts: int  # L-BFGS runs (grid points)
    converged: int  # of which the optimiser reported success
    points: int

    def as_dict(self) -> dict:
        return {
            **self.law.as_dict(),
            "huber_objective": self.objective,
            "huber_delta": HUBER_DELTA,
            "starts": self.starts,
            "converged_starts": self.converged,
            "points": self.points,
        }


def _huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float):
    """Summed Huber loss of ``LSE(a - α log N, b - β log D, e) - log L`` and its gradient in (a, b, e, α, β).
    L-BFGS calls it about 150 times a start, 4,500 starts a fit: written for few NumPy operations (half the
    time of a fit is here, the other half in SciPy)."""
    a, b, e, alpha, beta = theta
    first, second = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(first, second), e)
    weight_n, weight_d, weight_e = np.exp(first - top), np.exp(second - top), np.exp(e - top)
    total = weight_n + weight_d + weight_e
    residual = top + np.log(total) - log_loss
    # Huber's derivative is the residual clipped to ±δ; its value |c|·(|r| - |c|/2) is r²/2 inside, δ(|r| - δ/2) out.
    clipped = np.clip(residual, -delta, delta)
    value = float(np.abs(clipped) @ (np.abs(residual) - 0.5 * np.abs(clipped)))
    slope = clipped / total  # times each term's weight: the derivative through the LSE
    slope_n, slope_d = slope * weight_n, slope * weight_d
    return value, np.array([slope_n.sum(), slope_d.sum(), slope @ weight_e, -(slope_n @ log_n), -(slope_d @ log_d)])


def fit_chinchilla(n, d, loss, delta: float = HUBER_DELTA, grid: dict | None = None) -> ChinchillaFit:
    """Fit ``L(N, D) = E + A/N^α + B/D^β`` to observed losses (Hoffmann et al. 2022 §3.3, approach 3)."""
    n, d, loss = (np.asarray(values, dtype=np.float64) for values in (n, d, loss))
    if not (n.shape == d.shape == loss.shape) or n.ndim != 1:
        raise ValueError("n, d and loss must be 1-D arrays of one length")
    if len(n) < 5:
        raise ValueError(f"the Chinchilla law has 5 parameters; {len(n)} points cannot determine it")
    if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any():
        raise ValueError("n, d and loss must be positive")
    minimize = _minimize()
    grid = grid or CHINCHILLA_GRID
    log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)
    best, best_value, converged, starts = None, math.inf, 0, 0
    # L-BFGS-B's 5×5 linear algebra runs ~100x slower when BLAS spreads it over threads that compete
    # with anything else on the machine; one thread is plenty.
    with threadpool_limits(1):
        for alpha, beta, e, a, b in itertools.product(grid["alpha"], grid["beta"], grid["e"], grid["a"], grid["b"]):
            # The Huber values are ~δ·|r| per point, far below L-BFGS's default tolerances: tighten them, or
            # the search stops early (the pitfall Besiroglu et al. 2024 found in the original fit).
            result = minimize(
                _huber_objective,
                np.array([a, b, e, alpha, beta]),
                args=(log_n, log_d, log_loss, delta),
                jac=True,
                method="L-BFGS-B",
                bounds=EXPONENT_BOUNDS,
                options={"maxiter": 1000, "ftol": 1e-14, "gtol": 1e-12},
            )
            starts += 1
            converged += bool(result.success)
            if np.isfinite(result.fun) and result.fun < best_value:
                best, best_value = result.x, float(result.fun)
    if best is None:
        raise ValueError("every L-BFGS start diverged; the losses cannot be fitted by the Chinchilla law")
    a, b, e, alpha, beta = best
    law = ChinchillaLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))
    return ChinchillaFit(law=law, objective=best_value, starts=starts, converged=converged, points=len(n))


@dataclass(frozen=True)
class KaplanLaw:
    """``L(x) = (scale / x)^exponent``: Kaplan's L(N) with scale N_c, exponent α_N, or L(D) with D_c, α_D."""

    scale: float
    exponent: float
    points: int

    def loss(self, x):
        return np.power(self.scale / np.asarray(x, dtype=np.float64), self.exponent)

    def as_dict(self) -> dict:
        return asdict(self)


def fit_kaplan(x, loss) -> KaplanLaw:
    """Least squares on ``log L = α·log x_c - α·log x`` (Kaplan et al. 2020 eqs. 1.1, 1.2)."""
    x, loss = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if len(np.unique(x)) < 2:
        raise ValueError(f"a power law needs points at two or more distinct sizes; got {len(np.unique(x))}")
    slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
    exponent = -slope
    return KaplanLaw(scale=float(np.exp(intercept / exponent)), exponent=float(exponent), points=len(x))


def lower_envelope(x, loss) -> list[int]:
    """Indices of the points whose loss is below that of every point with a smaller or equal ``x``, in
    increasing ``x``: the sweep's best-per-size (x = N) or best-per-data (x = D) points.

    In an IsoFLOP sweep the runs of a size differ in tokens; the envelope keeps, for each size, its
    best run, and drops sizes no better than a smaller one, i.e. the undertrained right-hand arms of
    the IsoFLOP curves. What remains is limited by the resource on the x axis, which is what Kaplan's
    L(N) (trained to convergence) and L(D) (the largest model, early stopped) describe."""
    x, loss = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    kept, best = [], math.inf
    for index in np.lexsort((loss, x)):
        if loss[index] < best:
            kept.append(int(index))
            best = loss[index]
    return kept


def isoflop_minimum(n, loss) -> float | None:
    """The size minimising a parabola in ``log N`` fitted to one budget's runs (Hoffmann et al.
    approach 2); None with fewer than three sizes or a parabola that opens downwards."""
    n, loss = np.asarray(n, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if len(np.unique(n)) < 3:
        return None
    curvature, slope, _ = np.polyfit(np.log(n), loss, 2)
    if curvature <= 0:
        return None
    return float(np.exp(-slope / (2 * curvature)))
