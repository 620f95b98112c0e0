"""Will a training run fit? An estimate before the first step, so that a run the machine cannot hold
refuses in one line, naming the flags to change, instead of being killed by the out-of-memory killer
half-way into its first step.

What one micro-batch keeps alive at the peak of its backward pass:

- the weights (already resident when the check runs, so they count against nothing new);
- fp32 gradients and AdamW's two moments of the *trainable* parameters (LoRA: the adapters only);
- activations saved for the backward pass: per layer and token about ``16·h + 4·f`` values (the
  attention block's inputs and outputs, q/k/v, the norms, and the gated MLP's ``f``-wide up, gate
  and activation outputs; Korthikanti et al. 2022's 34·s·b·h bytes counts the same kind of terms for
  a 4h MLP, without the attention scores that span-by-span attention never stores), in the autocast
  dtype's width, the same with selective recomputation (the fused attention kernels keep q, k, v, their
  output and a logsumexp, no scores: recomputing the core frees only the logsumexp, and under grouped-query
  attention the repeated keys and values); with full recomputation, one ``h``-wide block input per layer plus
  one layer's full set while it is recomputed;
- the output head's logits for one chunk of :meth:`llmkit.model.Transformer.token_losses`, with their
  float32 softmax and its gradient (a stage whose loss holds every position's logits gets them all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LOGIT_CHUNK_TOKENS = 2048  # llmkit.model.Transformer.token_losses' default
FREE_MEMORY_SHARE = 0.8  # of the free memory a step may take; the rest is for what the estimate leaves out


@dataclass
class MemoryEstimate:
    optimizer_bytes: int  # gradients and AdamW moments of the trainable parameters
    activation_bytes: int
    logit_bytes: int

    @property
    def total(self) -> int:
        return self.optimizer_bytes + self.activation_bytes + self.logit_bytes


def estimate_step_memory(model: nn.Module, tokens: int, dtype: torch.dtype, recompute: str) -> MemoryEstimate:
    """What one micro-batch of ``tokens`` tokens adds to memory beyond the weights under activation
    recomputation ``recompute`` (none, selective or full; module docstring)."""
    config = model.config
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    width = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    stored = 16 * config.n_embd + 4 * config.ffn_hidden
    per_layer = config.n_embd if recompute == "full" else stored
    activations = config.n_layer * tokens * per_layer * width
    if recompute == "full":
        activations += tokens * stored * width
    logits = 3 * 4 * min(tokens, LOGIT_CHUNK_TOKENS) * config.vocab_size
    return MemoryEstimate(12 * trainable, activations, logits)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for the run on ``device`` (the kernel's MemAvailable on the CPU), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as file:
            fields = dict(line.split(":", 1) for line in file)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
