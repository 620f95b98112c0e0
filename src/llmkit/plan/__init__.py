"""Planning before training: back-of-the-envelope estimates and scaling laws.

``estimate`` answers "how big, how much memory, how many FLOPs, how long" for a
model preset on a given number of devices, from closed-form formulas (Kaplan et
al. 2020, the GPT-3 paper, Korthikanti et al. 2022) and the exact parameter
count of the model built on the meta device.
"""

from llmkit.plan.estimate import DEVICES, EstimateConfig, estimate, format_estimate

__all__ = ["DEVICES", "EstimateConfig", "estimate", "format_estimate"]
