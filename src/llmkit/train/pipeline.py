"""Pipeline parallelism through PyTorch's ``torch.distributed.pipelining``.

The blocks are cut into ``pp`` consecutive stages, as even as possible with the extra blocks on the first
stages (the last one also runs the output head), or balanced so that the busiest stage, head included,
does the least work; the token embedding runs on the first stage, the final
norm and the head on the last. Each optimizer step is one schedule run over ``grad_accum`` micro-batches:
GPipe (Huang et al. 2019: every forward, then every backward) or 1F1B (Narayanan et al. 2019, PipeDream-
Flush: at most ``pp`` micro-batches in flight), with a bubble of ``(pp − 1)/(grad_accum + pp − 1)`` of
the step either way.

Each stage keeps the :class:`~llmkit.model.Transformer` object with only its own blocks (``blocks``
becomes a ``ModuleDict`` keyed by the blocks' indices, so parameter names stay those of one process);
embeddings and head stay on every stage for the model's own bookkeeping, but only the first and last
stages train them. Tied embeddings are used by both: their gradients are summed across the first and
last stages before each step, as Megatron-LM does. Checkpoints gather every stage's blocks into one
process's state dict, so they load on any layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from llmkit.errors import ConfigError
from llmkit.model.config import GATED_ACTIVATIONS, ModelConfig
from llmkit.model.transformer import IGNORE_INDEX

FIRST_STAGE = ("token_embedding.", "position_embedding.", "embedding_norm.")
LAST_STAGE = ("final_norm.", "lm_head.")


def _check_stages(n_layer: int, stages: int) -> None:
    if stages > n_layer:
        raise ConfigError("pp", stages, f"more pipeline stages than the model's {n_layer} blocks")


def even_split(n_layer: int, stages: int) -> list[range]:
    """Each stage's block indices: even shares, one extra block on each of the first stages."""
    _check_stages(n_layer, stages)
    share, extra = divmod(n_layer, stages)
    starts = [stage * share + min(stage, extra) for stage in range(stages + 1)]
    return [range(start, end) for start, end in zip(starts, starts[1:])]


def balanced_split(config: ModelConfig, stages: int) -> list[range]:
    """Each stage's block indices, contiguous, so that the busiest stage does the least work: a block
    costs its matmul weights, the output head its V·h more on the last stage (the embedding is a lookup).
    The smallest maximum over every split, by dynamic programming over (stages, blocks)."""
    n_layer = config.n_layer
    _check_stages(n_layer, stages)
    h, f = config.n_embd, config.ffn_hidden
    block = h * (config.n_head + 2 * config.n_kv_head) * config.head_dim + h * h
    block += h * f * (2 if config.activation in GATED_ACTIVATIONS else 1) + f * h
    head = config.vocab_size * h
    # best[k][i]: the least possible maximum load of k stages holding blocks 0..i-1; cut[k][i] its last cut.
    best = [[float("inf")] * (n_layer + 1) for _ in range(stages + 1)]
    cut = [[0] * (n_layer + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n_layer - (stages - k) + 1):
            for j in range(k - 1, i):
                load = (i - j) * block + (head if k == stages else 0)
                value = max(best[k - 1][j], load)
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    ends, i = [], n_layer
    for k in range(stages, 0, -1):
        ends.append(i)
        i = cut[k][i]
    starts = [0] + sorted(ends)[:-1]
    return [range(start, end) for start, end in zip(starts, sorted(ends))]


def owning_stage(name: str, split: list[range]) -> int:
    """The stage whose copy of parameter ``name`` (one process's naming) is trained."""
    if name.startswith("blocks."):
        index = int(name.split(".")[1])
        return next(stage for stage, blocks in enumerate(split) if index in blocks)
    return len(split) - 1 if name.startswith(LAST_STAGE) else 0


class StageModule(nn.Module):
    """One stage's forward: (token ids or the previous stage's hidden states) -> hidden states, or logits
    on the last stage. The embedding follows :meth:`Transformer.hidden_states` for whole causal sequences
    (no cache, prefix or packed documents: the pretraining case). It holds the modules it runs (FSDP2
    shards them, the schedule scales their gradients), and tied embeddings wherever either end runs."""

    def __init__(self, model: nn.Module, blocks: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.owner = (model,)  # the model's tables and methods, without registering it a second time
        self.blocks = nn.ModuleList(model.blocks[str(index)] for index in blocks)
        ends = {"embedding": first, "head": last}
        if model.config.tie_embeddings:
            ends = dict.fromkeys(ends, first or last)
        if ends["embedding"]:
            self.token_embedding, self.position_embedding = model.token_embedding, model.position_embedding
            self.embedding_norm, self.embedding_dropout = model.embedding_norm, model.embedding_dropout
        if ends["head"]:
            self.final_norm, self.lm_head = model.final_norm, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.owner[0]
        # Under sequence parallelism a later stage receives its tensor-parallel rank's share of the sequence.
        length = x.shape[1] * (1 if self.first else getattr(model, "sequence_shards", 1))
        positions = model._positions(0, length)
        mask, is_causal = model._attention_mask(positions, 0, length, None)
        if self.first:
            x = self.token_embedding(x)
            if self.position_embedding is not None:
                x = x + self.position_embedding(positions)
            if model.config.position == "sinusoidal":
                x = x + model.sinusoids[positions].to(x.dtype)
            if self.embedding_norm is not None:
                x = self.embedding_norm(x)
            x = self.embedding_dropout(x)
        rope = (model.rope_cos[positions], model.rope_sin[positions]) if model.config.position == "rope" else None
        for block in self.blocks:
            x = model.run_block(block, x, rope, None, mask, is_causal)
        return model.output_logits(self.final_norm(x)) if self.last else x


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The causal LM loss of :func:`llmkit.train.objectives.causal_lm_loss`, per micro-batch."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def prune_to_stage(model: nn.Module, ranks: int, rank: int, balance: str = "even", virtual: int = 1) -> None:
    """Keep only ``rank``'s blocks in ``model``, under their one-process names. The blocks are split into
    ``ranks · virtual`` stages (``balance``: ``even``, :func:`even_split`, or ``balanced``,
    :func:`balanced_split`); rank r runs stages r, r + ranks, ... (the interleaved schedule's loop)."""
    stages = ranks * virtual
    split = even_split(model.config.n_layer, stages) if balance == "even" else balanced_split(model.config, stages)
    held = [index for stage in range(rank, stages, ranks) for index in split[stage]]
    model.blocks = nn.ModuleDict({str(index): model.blocks[index] for index in held})
    model.pipeline_split, model.pipeline_ranks, model.pipeline_rank = split, ranks, rank
    model.pipeline_stages = stages


def owning_rank(model: nn.Module, name: str) -> int:
    """The pipeline rank whose copy of parameter ``name`` is trained (a tied head's is the embedding's)."""
    if name == "lm_head.weight" and model.config.tie_embeddings:
        name = "token_embedding.weight"
    return owning_stage(name, model.pipeline_split) % model.pipeline_ranks


class Pipeline:
    """The schedule of this rank's stage, and what a step needs around it."""

    def __init__(self, model: nn.Module, mesh, schedule: str, micro_batches: int, device: torch.device, shard=None):
        """``shard``: FSDP2's wrapping of each stage's forward module (data parallelism), or None."""
        # Imported here: torch.distributed.pipelining brings Dynamo, a second of every llmkit command's start.
        from torch.distributed import pipelining

        self.model, self.device = model, device
        self.group = mesh["pp"].get_group()
        self.ranks, self.rank = mesh["pp"].size(), mesh["pp"].get_local_rank()
        self.first, self.last = self.rank == 0, self.rank == self.ranks - 1
        split = model.pipeline_split
        stages = []
        for stage in range(self.rank, len(split), self.ranks):
            module = StageModule(model, split[stage], stage == 0, stage == len(split) - 1)
            if shard is not None:
                shard(module)
            stages.append(pipelining.PipelineStage(module, stage, len(split), device, group=self.group))
        # The single-stage schedules take their one stage, the interleaved one the list (of one, or more).
        chosen = stages if schedule == "interleaved-1f1b" else stages[0]
        schedules = {
            "gpipe": pipelining.ScheduleGPipe,
            "1f1b": pipelining.Schedule1F1B,
            "interleaved-1f1b": pipelining.ScheduleInterleaved1F1B,
        }
        self.schedule = schedules[schedule](chosen, micro_batches, loss_fn=_loss)
        self.tied_group = self._tied_group(mesh) if model.config.tie_embeddings else None

    def _tied_group(self, mesh):
        """A group of the first and last stage of every (dp, tp) position (all ranks create every group)."""
        ranks = mesh.mesh  # (pp, dp, tp)
        mine = None
        for dp in range(ranks.shape[1]):
            for tp in range(ranks.shape[2]):
                pair = sorted({int(ranks[0, dp, tp]), int(ranks[-1, dp, tp])})
                group = dist.new_group(pair)
                if dist.get_rank() in pair:
                    mine = group
        return mine

    def counted(self) -> list[nn.Parameter]:
        """The parameters this stage trains: a gradient norm sums them over the stages, each once (a tied
        embedding's copy on the last stage, and the idle embedding and head copies, are left out)."""
        return [p for name, p in self.model.named_parameters() if owning_rank(self.model, name) == self.rank]

    def _pipeline_mean(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The last stage's mean micro-batch loss, on every stage."""
        total = torch.stack([loss.detach().float() for loss in losses]).mean() if self.last else torch.zeros(())
        total = total.to(self.device)
        dist.all_reduce(total, group=self.group)
        return total

    def forward_backward(self, batches: list[dict]) -> torch.Tensor:
        """One step's micro-batches through the schedule (gradients averaged over them); the mean loss."""
        input_ids = torch.cat([batch["input_ids"] for batch in batches]).to(self.device)
        targets = torch.cat([batch["targets"] for batch in batches]).to(self.device)
        losses: list[torch.Tensor] = []
        self.schedule.step(*([input_ids] if self.first else []), target=targets if self.last else None, losses=losses)
        if self.tied_group is not None and (self.first or self.last):
            grad = self.model.token_embedding.weight.grad
            if grad is not None:
                dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.tied_group)
        return self._pipeline_mean(losses)

    @torch.no_grad()
    def evaluate(self, batch: dict) -> torch.Tensor:
        """The validation loss of one batch (mean over the schedule's micro-batches), on every stage."""
        losses: list[torch.Tensor] = []
        input_ids, targets = batch["input_ids"].to(self.device), batch["targets"].to(self.device)
        self.schedule.eval(*([input_ids] if self.first else []), target=targets if self.last else None, losses=losses)
        return self._pipeline_mean(losses)


def _to_cpu(value):
    return value.cpu() if torch.is_tensor(value) else value


def gather_stages(model: nn.Module, model_state: dict, optimizer_state: dict) -> None:
    """Every stage's trained parameters (and their optimizer state) in the state dicts of the first stage,
    in place; a no-op without pipeline parallelism. Every rank of the pipeline group must call it."""
    if not hasattr(model, "pipeline_split"):
        return
    mine = {name for name in model_state if owning_rank(model, name) == model.pipeline_rank}
    pieces = [None] * dist.get_world_size()
    owned = (
        {name: _to_cpu(model_state[name]) for name in mine},
        {
            name: {key: _to_cpu(tensor) for key, tensor in value.items()}
            for name, value in optimizer_state["state"].items()
            if name in mine
        },
        [list(group["params"]) for group in optimizer_state["param_groups"]],
    )
    dist.all_gather_object(pieces, owned)
    for weights, states, groups in pieces:
        model_state.update(weights)
        optimizer_state["state"].update(states)
        for group, names in zip(optimizer_state["param_groups"], groups):
            group["params"] += [name for name in names if name not in group["params"]]


def select_stage(model: nn.Module, model_state: dict, optimizer_state: dict) -> None:
    """Drop from full state dicts the blocks this stage does not hold, in place (the inverse of
    :func:`gather_stages` for loading)."""
    if not hasattr(model, "pipeline_split"):
        return
    held = set(model.state_dict())
    for name in [name for name in model_state if name not in held]:
        del model_state[name]
    for name in [name for name in optimizer_state["state"] if name not in held]:
        del optimizer_state["state"][name]
    for group in optimizer_state["param_groups"]:
        group["params"] = [name for name in group["params"] if name in held]
