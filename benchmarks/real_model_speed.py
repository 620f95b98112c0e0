"""Inference speed on a real model: SmolLM2-135M-Instruct through llmkit's engine, against Hugging Face
transformers and llama.cpp on the same weights.

The model is ../shared/data/models/SmolLM2-135M-Instruct.Q4_1.gguf, imported with ``llmkit import`` (its
Q4_1 weights dequantized to float32; the script skips with a reason when the file is absent). The same
float32 weights go to ``transformers`` (``LlamaForCausalLM`` through ``llmkit export --format hf``) and to
llama.cpp through ``llama-cpp-python`` when it is installed (skipped with a reason otherwise): F16 written
by ``llmkit export --format gguf``, Q8_0 and Q4_0 quantized from it by llama.cpp's own quantizer, and the
original Q4_1 file. Every system runs in this process with the same number of threads, round-robin, and
the medians are reported.

* ``decode``: batch 1, a 7-token prompt, 128 greedy tokens (end of text ignored), timed end to end
  (prompt included). llmkit runs through ``Engine.generate_ids`` (the public path every caller uses) at
  float32, bfloat16, int8 and int4 (``EngineConfig.dtype`` / ``quantize``), eager, and the last three also
  with ``compile=True`` (``+compile``; ``first_generation_s``: its first 128 tokens, compile included).
  ``greedy_agreement``: the fraction of the 128 tokens equal to llmkit float32's before the first
  difference; ``greedy_agreement_vs_float32`` averages it over five prompts (untimed).
  ``speedup_vs_llamacpp``: each width's faster llmkit engine (eager or compiled) against llama.cpp at that
  width: bfloat16 against F16, int8 against Q8_0, int4 against Q4_1 and Q4_0 (goal >= 1 each).
* ``prefill``: a 512-token prompt to its first token (prompt tokens / s); the eager engines only, as
  compiled engines run prompts eagerly. ``prefill_speedup_vs_llamacpp`` per width as above.
* ``batched_decode``: 8 and 16 concurrent requests (different prompts, 128 tokens each) submitted
  together to the continuous-batching scheduler: aggregate generated tokens / s, for llmkit's engines at
  every width, eager and compiled (the compiled step of several rows is one graph for every batch size, so
  it compiles once, in the untimed first run). transformers runs the same batch left-padded
  through ``generate``; llama-cpp-python's API decodes one sequence at a time, so n requests take n
  batch-1 runs: ``batched_speedup_vs_llamacpp_sequential`` divides by its batch-1 rate.

All of it takes 10 to 25 minutes on 2 cores (compiling, and the concurrent requests of every width; Inductor's
on-disk cache makes a second run faster). Timings taken while other jobs share the CPU are void: rerun on a quiet
machine.

Usage: python benchmarks/real_model_speed.py [--repeats 3] [--threads 2] [--no-compile] [--no-llamacpp]
    [--no-batched]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import SMOLLM2, emit, interleaved_rates, require  # noqa: E402

from llmkit.infer import Engine, GenerationConfig  # noqa: E402
from llmkit.infer.engine import EngineConfig  # noqa: E402

MODEL = SMOLLM2
PROMPT = "<|im_start|>user\nHi!<|im_end|>\n"  # 7 tokens
AGREEMENT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "The capital of France is Paris, and",
    PROMPT,
]
BATCH_PROMPTS = [
    "Once upon a time",
    "The best way to learn Python is",
    "def fibonacci(n):",
    "Paris is a city",
    "The three laws of robotics",
    "Water boils at",
    "In 1492, Columbus",
    "A healthy breakfast has",
    "The stock market",
    "My favourite book",
    "Photosynthesis is",
    "The moon orbits",
    "To bake bread, first",
    "Machine learning models",
    "The Great Wall of China",
    "Coffee contains",
]
PREFILL_TOKENS = 512
LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* for its quantizer
WIDTHS = {"16-bit": ("F16",), "8-bit": ("Q8_0",), "4-bit": ("Q4_1", "Q4_0")}
LLMKIT_WEIGHTS = {
    "float32": ("float32", "none"),
    "bfloat16": ("bfloat16", "none"),
    "int8": ("float32", "int8"),
    "int4": ("float32", "int4"),
}  # name: (EngineConfig.dtype, EngineConfig.quantize)
LLMKIT_WIDTHS = {"16-bit": "bfloat16", "8-bit": "int8", "4-bit": "int4"}


def emit_speedups(metric: str, rates: dict, ours: dict[str, str], **context) -> None:
    """``metric``: the rate of llmkit's engine ``ours[width]`` over each llama.cpp file of that width."""
    for width, theirs in WIDTHS.items():
        for their in theirs:
            ratio = rates[("llmkit", ours[width])] / rates[("llama.cpp", their)]
            emit(metric, round(ratio, 3), "x", width=width, llmkit=ours[width], llamacpp=their, **context)


def width_of(name: str) -> str:
    """The llama.cpp width an llmkit engine is compared with (float32 with F16, llama.cpp's widest)."""
    base = name.removesuffix("+compile")
    return next((width for width, ours in LLMKIT_WIDTHS.items() if ours == base), "16-bit")


def prefill_text(tokenizer, count: int) -> list[int]:
    """``count`` tokens of English-and-code text: this module's own docstrings and source, repeated."""
    text = inspect.getsource(sys.modules[__name__])
    ids = tokenizer.encode(text)
    while len(ids) < count:
        ids += ids
    return ids[:count]


def agreement(tokens: list[int], reference: list[int]) -> float:
    same = 0
    for ours, theirs in zip(tokens, reference):
        if ours != theirs:
            break
        same += 1
    return same / len(reference)


# ----------------------------------------------------------------------------------------------- llmkit
def llmkit_engines(checkpoint: Path, compile: bool) -> dict[str, Engine]:
    """One engine per width, eager, and with ``compile`` also compiled for the widths compared with llama.cpp
    (float32 is the reference for agreement; compiling it took 2 minutes on a busy machine for ~1.2x)."""
    engines = {}
    for name, (dtype, quantize) in LLMKIT_WEIGHTS.items():
        for compiled in (False, True) if compile and name in LLMKIT_WIDTHS.values() else (False,):
            config = EngineConfig(checkpoint=str(checkpoint), dtype=dtype, quantize=quantize, compile=compiled)
            engines[name + ("+compile" if compiled else "")] = Engine.from_config(config)
    return engines


def llmkit_generate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0, stop_at_end_of_text=False)
    start = time.perf_counter()
    completions = engine.generate_ids(prompts, config)
    seconds = time.perf_counter() - start
    return sum(len(completion.token_ids) for completion in completions) / seconds, [c.token_ids for c in completions]


# ------------------------------------------------------------------------------------------ transformers
def transformers_model(checkpoint: Path, directory: Path):
    import transformers

    from llmkit.interop.hf import export_hf

    export_hf(checkpoint, directory)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def transformers_generate(
    model, prompts: list[list[int]], new_tokens: int, pad_id: int
) -> tuple[float, list[list[int]]]:
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(prompt)) + prompt for prompt in prompts])  # left-padded
    mask = torch.tensor([[0] * (longest - len(prompt)) + [1] * len(prompt) for prompt in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    seconds = time.perf_counter() - start
    generated = output[:, longest:]
    return generated.numel() / seconds, generated.tolist()


# ------------------------------------------------------------------------------------------- llama.cpp
def llamacpp_models(checkpoint: Path, directory: Path, threads: int) -> dict:
    import llama_cpp

    from llmkit.interop.gguf import export_gguf

    files = {"F16": directory / "model-f16.gguf", "Q4_1": MODEL}
    export_gguf(checkpoint, files["F16"], "float16")
    with quiet_native_output():
        for name, ftype in LLAMA_FTYPES.items():
            files[name] = directory / f"model-{name.lower()}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = ftype, threads
            if llama_cpp.llama_model_quantize(
                str(files["F16"]).encode(), str(files[name]).encode(), ctypes.byref(params)
            ):
                raise RuntimeError(f"llama.cpp could not quantize to {name}")
        return {
            name: llama_cpp.Llama(
                str(path), n_ctx=1024, n_batch=PREFILL_TOKENS, n_threads=threads, n_threads_batch=threads, verbose=False
            )
            for name, path in files.items()
        }


@contextlib.contextmanager
def quiet_native_output():
    """llama.cpp's C code logs to the process's stdout and stderr: keep the JSON lines clean."""
    sys.stdout.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)


def llamacpp_one(model, prompt: list[int], new_tokens: int) -> tuple[float, list[list[int]]]:
    rate, tokens = llamacpp_generate(model, prompt, new_tokens)
    return rate, [tokens]


def llamacpp_generate(model, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    model.reset()  # no prefix reuse from the previous run
    tokens = []
    start = time.perf_counter()
    for token in model.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
        tokens.append(token)
        if len(tokens) == new_tokens:
            break
    return new_tokens / (time.perf_counter() - start), tokens


def llamacpp_prefill(model, prompt: list[int]) -> float:
    model.reset()
    start = time.perf_counter()
    model.eval(prompt)
    return len(prompt) / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="llmkit eager only (no compile=True engines)")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--no-batched", action="store_true")
    arguments = parser.parse_args()
    require(MODEL)
    torch.set_num_threads(arguments.threads)
    from llmkit.interop.gguf_import import import_gguf

    context = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF weights)",
        "threads": arguments.threads,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        checkpoint = directory / "llmkit"
        import_gguf(MODEL, checkpoint)
        engines = llmkit_engines(checkpoint, not arguments.no_compile)
        tokenizer = engines["float32"].tokenizer
        reference = transformers_model(checkpoint, directory / "hf")
        llama = {}
        if arguments.no_llamacpp:
            emit("skipped", 0, "", system="llama.cpp", reason="--no-llamacpp")
        else:
            try:
                import llama_cpp  # noqa: F401

                llama = llamacpp_models(checkpoint, directory, arguments.threads)
                context["llama_cpp_python"] = llama_cpp.__version__
            except ImportError:
                emit("skipped", 0, "", system="llama.cpp", reason="llama-cpp-python is not installed")
        prompt = tokenizer.encode(PROMPT)
        pad_id = tokenizer.stop_ids[0] if tokenizer.stop_ids else 0
        new_tokens = arguments.new_tokens

        # ---- batch-1 decode
        runs, tokens = {}, {}

        def keep(key, result):
            rate, tokens[key] = result
            return rate

        for name, engine in engines.items():
            runs[("llmkit", name)] = lambda e=engine, k=("llmkit", name): keep(
                k, llmkit_generate(e, [prompt], new_tokens)
            )
        runs[("transformers", "float32")] = lambda: keep(
            ("transformers", "float32"), transformers_generate(reference, [prompt], new_tokens, pad_id)
        )
        for name, model in llama.items():
            runs[("llama.cpp", name)] = lambda m=model, k=("llama.cpp", name): keep(
                k, llamacpp_one(m, prompt, new_tokens)
            )
        for (system, name), run in runs.items():
            start = time.perf_counter()
            run()  # warm-up, and for a compiled engine the compile of its decoding step
            if name.endswith("+compile"):
                emit(
                    "first_generation_s",
                    round(time.perf_counter() - start, 1),
                    "s",
                    system=system,
                    weights=name,
                    new_tokens=new_tokens,
                    **context,
                )
        rates = interleaved_rates(runs, arguments.repeats)
        base = tokens[("llmkit", "float32")][0]
        for (system, name), rate in rates.items():
            emit(
                "decode_tokens_per_s",
                round(rate, 1),
                "tokens/s",
                system=system,
                weights=name,
                batch=1,
                prompt_tokens=len(prompt),
                new_tokens=new_tokens,
                greedy_agreement=round(agreement(tokens[(system, name)][0], base), 3),
                **context,
            )
        # Each width's faster llmkit engine (eager or compiled) is the one compared.
        ours = {
            width: max((name, name + "+compile"), key=lambda key: rates.get(("llmkit", key), 0))
            for width, name in LLMKIT_WIDTHS.items()
        }
        if llama:
            emit_speedups("speedup_vs_llamacpp", rates, ours, batch=1, **context)
        # ---- greedy agreement with llmkit float32 over several prompts (not timed)
        agreement_prompts = [tokenizer.encode(text) for text in AGREEMENT_PROMPTS]
        decoders = {  # float32 and each width's engine of the speedup_vs_llamacpp lines
            ("llmkit", name): (lambda ids, e=engines[name]: llmkit_generate(e, [ids], new_tokens)[1][0])
            for name in ["float32", *ours.values()]
        }
        decoders[("transformers", "float32")] = lambda ids: transformers_generate(reference, [ids], new_tokens, pad_id)[
            1
        ][0]
        for name, model in llama.items():
            decoders[("llama.cpp", name)] = lambda ids, m=model: llamacpp_generate(m, ids, new_tokens)[1]
        outputs = {key: [decode(ids) for ids in agreement_prompts] for key, decode in decoders.items()}
        for (system, name), produced in outputs.items():
            fractions = [agreement(tokens, base) for tokens, base in zip(produced, outputs[("llmkit", "float32")])]
            emit(
                "greedy_agreement_vs_float32",
                round(sum(fractions) / len(fractions), 3),
                "fraction",
                system=system,
                weights=name,
                prompts=len(fractions),
                identical_prompts=sum(fraction == 1.0 for fraction in fractions),
                per_prompt=[round(fraction, 3) for fraction in fractions],
                new_tokens=new_tokens,
                **context,
            )

        for name in engines:
            emit(
                "speedup_vs_transformers",
                round(rates[("llmkit", name)] / rates[("transformers", "float32")], 3),
                "x",
                llmkit=name,
                transformers="float32",
                batch=1,
                **context,
            )

        # ---- prefill
        long_prompt = prefill_text(tokenizer, PREFILL_TOKENS)
        runs = {  # prompts run eagerly in compiled engines too: the eager engines only
            ("llmkit", name): (lambda e=engine: llmkit_generate(e, [long_prompt], 1)[0] * PREFILL_TOKENS)
            for name, engine in engines.items()
            if not name.endswith("+compile")
        }
        runs[("transformers", "float32")] = lambda: (
            transformers_generate(reference, [long_prompt], 1, pad_id)[0] * PREFILL_TOKENS
        )
        for name, model in llama.items():
            runs[("llama.cpp", name)] = lambda m=model: llamacpp_prefill(m, long_prompt)
        for run in runs.values():
            run()
        prefill_rates = interleaved_rates(runs, arguments.repeats)
        for (system, name), rate in prefill_rates.items():
            emit(
                "prefill_tokens_per_s",
                round(rate, 1),
                "tokens/s",
                system=system,
                weights=name,
                prompt_tokens=PREFILL_TOKENS,
                **context,
            )
        if llama:
            emit_speedups(
                "prefill_speedup_vs_llamacpp", prefill_rates, LLMKIT_WIDTHS, prompt_tokens=PREFILL_TOKENS, **context
            )

        # ---- batched decode (continuous batching)
        if not arguments.no_batched:
            for batch in (8, 16):
                prompts = [tokenizer.encode(text) for text in BATCH_PROMPTS[:batch]]
                runs = {
                    ("llmkit", name): (lambda e=engine: llmkit_generate(e, prompts, new_tokens)[0])
                    for name, engine in engines.items()
                }
                runs[("transformers", "float32")] = lambda: transformers_generate(
                    reference, prompts, new_tokens, pad_id
                )[0]
                for run in runs.values():
                    run()
                for (system, name), rate in interleaved_rates(runs, arguments.repeats).items():
                    emit(
                        "batched_decode_tokens_per_s",
                        round(rate, 1),
                        "tokens/s",
                        system=system,
                        weights=name,
                        batch=batch,
                        new_tokens=new_tokens,
                        **context,
                    )
                    if system == "llmkit" and llama:
                        # llama-cpp-python decodes one sequence at a time: n requests take n batch-1 runs.
                        for their in WIDTHS[width_of(name)]:
                            emit(
                                "batched_speedup_vs_llamacpp_sequential",
                                round(rate / rates[("llama.cpp", their)], 3),
                                "x",
                                llmkit=name,
                                llamacpp=their,
                                batch=batch,
                                **context,
                            )


if __name__ == "__main__":
    main()
