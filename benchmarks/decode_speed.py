"""Decoding throughput of the inference engine, with and without the KV cache.

Metric decode_tokens_per_s (one JSON object per line) for the cpu-small preset and a GPT-2-124M-shaped
model (random weights: speed does not depend on them), batch 1 and 8, greedy, a 32-token prompt and
64 new tokens, timed end to end (prompt processing included), float32 and bfloat16; and the same
GPT-2 shape through transformers' ``generate`` in this process as the reference (speedup_vs_hf).

Usage: python benchmarks/decode_speed.py [--new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, interleaved_rates  # noqa: E402

from llmkit.data.tokenizer_training import (
    TokenizerConfig,
    train_tokenizer,  # noqa: E402
)
from llmkit.infer import Engine, GenerationConfig  # noqa: E402
from llmkit.model import Transformer, preset  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

PROMPT_TOKENS = 32


def small_tokenizer(directory: Path) -> Tokenizer:
    (directory / "corpus.txt").write_text("abcdefghijklmnopqrstuvwxyz " * 10)
    train_tokenizer(
        TokenizerConfig(
            source=str(directory / "corpus.txt"),
            out=str(directory / "tok"),
            kind="char",
            vocab_size=64,
            held_out_fraction=0,
        )
    )
    return Tokenizer.load(directory / "tok")


def engine_rate(engine: Engine, batch: int, new_tokens: int, use_cache: bool) -> float:
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, engine.model.config.vocab_size, (batch, PROMPT_TOKENS), generator=generator).tolist()
    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0, use_cache=use_cache, stop_at_end_of_text=False)
    start = time.perf_counter()
    produced = sum(len(completion.token_ids) for completion in engine.generate_ids(prompts, config))
    return produced / (time.perf_counter() - start)


def huggingface_rate(model, batch: int, new_tokens: int) -> float:
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, PROMPT_TOKENS), generator=generator)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return batch * (output.shape[1] - PROMPT_TOKENS) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    arguments = parser.parse_args()
    context = {
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": arguments.new_tokens,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = small_tokenizer(Path(directory))
        for name in ("cpu-small", "gpt2"):
            torch.manual_seed(0)
            model = Transformer(preset(name)).eval()
            engines = {
                "float32": Engine(model, tokenizer, decoding_layout=True),
                "bfloat16": Engine(
                    Transformer(preset(name)).to(torch.bfloat16).eval(), tokenizer, decoding_layout=True
                ),
            }
            runs = {}
            for batch in (1, 8):
                for dtype, engine in engines.items():
                    runs[(batch, dtype, True)] = lambda e=engine, b=batch: engine_rate(e, b, arguments.new_tokens, True)
                runs[(batch, "float32", False)] = lambda e=engines["float32"], b=batch: engine_rate(
                    e, b, arguments.new_tokens, False
                )
            reference = None
            if name == "gpt2" and not arguments.no_hf:
                import transformers

                reference = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
                for batch in (1, 8):
                    runs[(batch, "transformers", True)] = lambda b=batch: huggingface_rate(
                        reference, b, arguments.new_tokens
                    )
            rates = interleaved_rates(runs, arguments.repeats)
            for (batch, dtype, cache), rate in rates.items():
                system = "transformers generate float32" if dtype == "transformers" else f"llmkit {dtype}"
                emit(
                    "decode_tokens_per_s",
                    round(rate, 1),
                    "tokens/s",
                    model=name,
                    batch=batch,
                    kv_cache=cache,
                    system=system,
                    **context,
                )
            if reference is not None:
                for batch in (1, 8):
                    best = max(rates[(batch, "float32", True)], rates[(batch, "bfloat16", True)])
                    emit(
                        "speedup_vs_hf",
                        round(best / rates[(batch, "transformers", True)], 3),
                        "x",
                        model=name,
                        batch=batch,
                        **context,
                    )


if __name__ == "__main__":
    main()
