"""Prompts in, completions out: what the generative evaluations share.

:class:`EvaluationGenerator` has the ``generate(prompts, config)`` of :class:`llmkit.infer.Engine` (so
:func:`llmkit.infer.prompting.reason` can drive it) with what an evaluation adds:

* prompts are left-truncated so that prompt plus completion fit the model's context, as
  lm-evaluation-harness does for ``generate_until`` (it keeps the last ``max_length - max_gen_toks``
  tokens): the end of a prompt, the question being asked, matters more than its first demonstrations;
  the cut prompts are counted for the report;
* the task's tools go with every request;
* requests go to the engine's continuous-batching scheduler a few batches at a time, so slots freed
  by short completions are refilled at once while a progress bar still moves.

Several samples of one prompt each get their own seed (:func:`seeded`): the engine gives every seeded
request its own random stream, so equal seeds would give equal samples.
"""

from __future__ import annotations

from dataclasses import replace

from tqdm import tqdm

from llmkit.infer import Completion, Engine, GenerationConfig

# Requests handed to the engine per call, in batches: enough to keep every slot busy between calls.
BATCHES_PER_CALL = 4


def seeded(config: GenerationConfig, samples: int) -> list[GenerationConfig]:
    """``samples`` copies of ``config``, copy ``j`` with seed ``config.seed + j`` (all unseeded when it has none)."""
    return [replace(config, seed=None if config.seed is None else config.seed + sample) for sample in range(samples)]


class EvaluationGenerator:
    def __init__(self, engine: Engine, tools=None, batch_size: int = 16, description: str = "generating"):
        self.engine, self.tools, self.batch_size, self.description = engine, tools, batch_size, description
        self.truncated_prompts = 0

    def prompt_ids(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Token ids of ``prompt`` that leave room for the completion. A completion gets at most half the
        context when ``max_new_tokens`` asks for more, so a long answer budget cannot squeeze the question out."""
        context = self.engine.model.config.context_length
        keep = context - min(max_new_tokens, context // 2)
        ids = self.engine.tokenizer.encode(prompt) or [
            self.engine.tokenizer.eot_id
        ]  # an empty prompt starts a document
        self.truncated_prompts += len(ids) > keep
        return ids[-keep:]

    def generate(self, prompts: list[str], config: GenerationConfig | list[GenerationConfig]) -> list[Completion]:
        """One completion per prompt, in order (one config for all, or one per prompt)."""
        configs = config if isinstance(config, list) else [config] * len(prompts)
        if len(configs) != len(prompts):
            raise ValueError(f"{len(configs)} generation configs for {len(prompts)} prompts")
        completions: list[Completion] = []
        chunk = self.batch_size * BATCHES_PER_CALL
        with tqdm(total=len(prompts), desc=self.description, unit="completion") as progress:
            for start in range(0, len(prompts), chunk):
                part = range(start, min(start + chunk, len(prompts)))
                ids = [self.prompt_ids(prompts[index], configs[index].max_new_tokens) for index in part]
                completions += self.engine.generate_ids(ids, [configs[index] for index in part], tools=self.tools)
                progress.update(len(part))
        return completions
