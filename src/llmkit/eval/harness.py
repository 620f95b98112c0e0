"""EleutherAI's lm-evaluation-harness (``lm_eval`` 0.4) running llmkit models: the model class ``llmkit``.

lm-eval 0.4 finds model classes only in its own registry (``lm_eval.api.registry``; it has no
entry-point group for plugins), so the class must be registered in the process that runs the
evaluation. Importing this module registers it; the command line is lm-eval's own, with this module
imported first::

    python -m llmkit.eval.harness --model llmkit --model_args checkpoint=runs/base,device=cpu,batch_size=16 \\
        --tasks my_task --include_path my_tasks/

From Python: ``import llmkit.eval.harness`` then ``lm_eval.simple_evaluate(model="llmkit",
model_args="checkpoint=...")``, or pass an ``LlmkitLM(engine=...)`` instance as ``model``.

The three request types map onto llmkit's one scoring path and one engine:

* ``loglikelihood`` -> :func:`llmkit.eval.loglikelihood.loglikelihoods` (lm-eval's own context /
  continuation tokenisation, so ``llmkit eval`` and this adapter give identical numbers);
* ``loglikelihood_rolling`` -> :func:`llmkit.eval.loglikelihood.rolling_loglikelihoods` (each
  document on its own after the prefix token, lm-eval's HF model's bos-else-eos, every token scored once);
* ``generate_until`` -> :meth:`llmkit.infer.Engine.generate_ids`, with the task's stop strings
  (``until``), ``max_gen_toks`` and sampling settings; the prompt loses tokens from the left when it
  would leave fewer than ``max_gen_toks`` positions in the context window (as lm-eval's HF model).

With ``--apply_chat_template`` (chat-tuned checkpoints) prompts are rendered in the model's own chat template
(imported chat models) or llmkit's chat format.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

# Importing lm_eval.models (the parent package) also lists lm-eval's built-in model names ("hf", ...),
# which its registry would otherwise load only while empty, that is, never once "llmkit" is registered.
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from llmkit.chat import CHAT_TEMPLATE, render_text, uses_own_template
from llmkit.chat_templates import render_template
from llmkit.config import check
from llmkit.errors import InputError
from llmkit.eval.loglikelihood import loglikelihoods, rolling_loglikelihoods
from llmkit.infer import Engine, GenerationConfig
from llmkit.infer.engine import EngineConfig
from llmkit.model.checkpoint import DTYPES

# Settings lm-eval task configs may carry that GenerationConfig takes under its own names.
_SET_FROM_REQUEST = {"until", "max_gen_toks", "do_sample"}


@register_model("llmkit")
class LlmkitLM(LM):
    def __init__(
        self,
        checkpoint: str | None = None,
        device: str | None = None,
        batch_size: int | str = 16,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        engine: Engine | None = None,
    ):
        """A checkpoint (a run directory or checkpoint folder) loaded on ``device`` (by default the GPU when
        there is one, else the CPU; in ``dtype``, by default the stored one), or a ready ``engine``."""
        super().__init__()
        check(
            (checkpoint is None) != (engine is None),
            "checkpoint",
            checkpoint,
            "give exactly one of checkpoint or engine",
        )
        check(str(batch_size).isdigit() and int(batch_size) > 0, "batch_size", batch_size, "must be a positive integer")
        check(int(max_gen_toks) > 0, "max_gen_toks", max_gen_toks, "must be positive")
        check(dtype is None or dtype in DTYPES, "dtype", dtype, f"must be one of {', '.join(DTYPES)}")
        if engine is None:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            check(
                not str(device).startswith("cuda") or torch.cuda.is_available(),
                "device",
                device,
                "CUDA is not available on this machine; pass device=cpu",
            )
            engine = Engine.from_config(EngineConfig(checkpoint=checkpoint, device=device, dtype=dtype or "float32"))
        self.engine, self.model, self.tokenizer = engine, engine.model, engine.tokenizer
        self.checkpoint = checkpoint
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        self._device = self.model.token_embedding.weight.device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LlmkitLM":
        """``checkpoint=...,device=...,batch_size=...,max_gen_toks=...,dtype=...`` (``--model_args``)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arguments: dict, additional_config: dict | None = None) -> "LlmkitLM":
        # lm-eval's command line always sends its own --device/--batch_size (defaults cuda:0 and 1);
        # settings written in --model_args win over them, and max_batch_size (for batch_size=auto) has no use here.
        merged = {
            key: value
            for key, value in (additional_config or {}).items()
            if key in ("device", "batch_size") and value is not None
        }
        if str(merged.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            del merged["device"]  # lm-eval's default on a machine without CUDA: take what the machine has
        merged.update(arguments)
        return cls(**merged)

    def get_model_info(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "model_num_parameters": self.engine.parameter_count,
            "tokenizer_sha256": self.tokenizer.sha256,
        }

    @property
    def tokenizer_name(self) -> str:
        # lm-eval keys its request cache on this name when a chat template is applied.
        return f"llmkit-{self.tokenizer.sha256[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return self.tokenizer.chat_template if uses_own_template(self.tokenizer) else CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """``--apply_chat_template``: the conversation in the model's own chat template when it has one (an
        imported chat model such as SmolLM2, as ``transformers``' ``apply_chat_template`` renders it for
        lm-eval's ``hf`` model), else in llmkit's chat format (:mod:`llmkit.chat`)."""
        if uses_own_template(self.tokenizer):
            return render_template(self.tokenizer, chat_history, add_generation_prompt)
        return render_text(chat_history, add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(request.args) for request in requests]
        results = loglikelihoods(self.model, self.tokenizer, pairs, self.batch_size)
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        results = [
            total for total, _ in rolling_loglikelihoods(self.model, self.tokenizer, texts, batch_size=self.batch_size)
        ]
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generation_config(self, gen_kwargs: dict) -> GenerationConfig:
        """lm-eval generation kwargs (``until``, ``max_gen_toks`` or an alias, ``do_sample``, ``temperature``,
        and any other :class:`GenerationConfig` field such as ``top_p``) -> a GenerationConfig."""
        settings = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        known = {item.name for item in dataclasses.fields(GenerationConfig)} - {"stop", "max_new_tokens"}
        unknown = sorted(set(settings) - known - _SET_FROM_REQUEST)
        if unknown:
            raise InputError(
                f"generation kwargs {unknown} have no llmkit equivalent (llmkit takes "
                f"{sorted(known | _SET_FROM_REQUEST)})"
            )
        options = {key: value for key, value in settings.items() if key in known}
        # normalize_gen_kwargs sets temperature 0 for greedy; sampling without a temperature means 1 (HF's default).
        options["temperature"] = float(settings.get("temperature", 1.0)) if settings["do_sample"] else 0.0
        return GenerationConfig(max_new_tokens=settings["max_gen_toks"], stop=list(settings["until"]), **options)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        context_length = self.model.config.context_length
        arguments = [request.args for request in requests]
        groups: dict[str, list[int]] = {}
        for index, (_, gen_kwargs) in enumerate(arguments):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(index)
        outputs: list[str] = [""] * len(arguments)
        progress = tqdm(total=len(arguments), desc="generate_until", disable=disable_tqdm, leave=False)
        for indices in groups.values():
            config = self.generation_config(arguments[indices[0]][1])
            room = context_length - config.max_new_tokens
            if room < 1:
                raise InputError(
                    f"max_gen_toks={config.max_new_tokens} leaves no room for a prompt in the model's context of "
                    f"{context_length} tokens; lower it (model_args max_gen_toks=... or the task's "
                    f"generation_kwargs)"
                )
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [self.engine.encode(arguments[index][0])[-room:] for index in chunk]
                for index, completion in zip(chunk, self.engine.generate_ids(prompts, config)):
                    outputs[index] = completion.text
                    self.cache_hook.add_partial("generate_until", arguments[index], completion.text)
                progress.update(len(chunk))
        progress.close()
        return outputs


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (``lm_eval ...`` arguments) with the ``llmkit`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
