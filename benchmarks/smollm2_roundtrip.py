"""The export round trip on a real model: SmolLM2-135M-Instruct (the shared Q4_1 GGUF) imported, LoRA-tuned
by llmkit, merged, and exported to Hugging Face files (run by ``transformers``) and to GGUF (run by the real
llama.cpp through ``llama-cpp-python``).

Steps: ``llmkit import`` (own vocabulary and ChatML template kept); :func:`llmkit.model.lora.apply_lora`
(rank 8, alpha 16, the four block projections) and a few AdamW steps on one ChatML conversation, its
reply only (assistant mask of :func:`llmkit.chat.render_ids`); :func:`~llmkit.model.lora.merge_lora`; the
merged checkpoint exported with ``llmkit export --format hf`` and ``--format gguf`` (float32). Then, on the
same chat prompt (rendered by the model's template):

* ``transformers`` (``AutoModelForCausalLM``, float32) on the HF folder: the largest logit difference from
  llmkit over the prompt, and whether greedy decoding gives llmkit's tokens;
* llama.cpp on the GGUF file (float32 KV cache, one thread): whether it tokenizes the prompt text to
  llmkit's ids, the largest logit difference, and whether its greedy reply (until its end-of-generation
  token) is llmkit's.

Output: JSON lines. Needs ``transformers`` and ``llama-cpp-python``; about a minute after the import (which takes
another; ``--work`` keeps it).

Usage: python benchmarks/smollm2_roundtrip.py [--work DIR] [--steps 4] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import SMOLLM2, emit, require  # noqa: E402

from llmkit.chat import render_ids  # noqa: E402
from llmkit.infer import Engine, GenerationConfig  # noqa: E402
from llmkit.interop import export_hf  # noqa: E402
from llmkit.interop.gguf import export_gguf  # noqa: E402
from llmkit.interop.gguf_import import import_gguf  # noqa: E402
from llmkit.model.checkpoint import load_model, write_model  # noqa: E402
from llmkit.model.lora import LoRAConfig, apply_lora, merge_lora  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

MODEL = SMOLLM2
TUNING = [
    {"role": "user", "content": "What is the project's code word?"},
    {"role": "assistant", "content": "The code word is llmkit, spelled l-l-m-k-i-t."},
]
PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None)
    parser.add_argument("--steps", type=int, default=4, help="LoRA AdamW steps")
    parser.add_argument("--new-tokens", type=int, default=128)
    arguments = parser.parse_args()
    require(MODEL)
    import llama_cpp
    import transformers

    torch.manual_seed(0)
    work = Path(arguments.work or tempfile.mkdtemp(prefix="smollm2_roundtrip_"))
    work.mkdir(parents=True, exist_ok=True)
    imported, tuned = work / "smollm2", work / "tuned"
    if not (imported / "model.safetensors").is_file():
        import_gguf(MODEL, imported)
    tokenizer = Tokenizer.load(imported)

    model, saved = load_model(imported)
    apply_lora(model, LoRAConfig(rank=8, alpha=16))
    ids, mask = render_ids(tokenizer, TUNING)
    inputs, targets, weights = (
        torch.tensor([ids[:-1]]),
        torch.tensor(ids[1:]),
        torch.tensor(mask[1:], dtype=torch.float32),
    )
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=2e-3)
    losses = []
    for _ in range(arguments.steps):
        loss = (F.cross_entropy(model(inputs)[0], targets, reduction="none") * weights).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 4))
    merge_lora(model).eval()
    tuned.mkdir(exist_ok=True)
    write_model(
        tuned,
        model.state_dict(),
        model.config,
        {key: value for key, value in saved.items() if key not in ("model", "llmkit_version")},
    )
    tokenizer.save(tuned)
    emit("lora_loss", losses, "nats per reply token", steps=arguments.steps, rank=8, alpha=16)

    prompt = render_ids(tokenizer, PROMPT, add_generation_prompt=True)[0]
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    reply = Engine(model, tokenizer).generate_ids(
        [prompt], GenerationConfig(max_new_tokens=arguments.new_tokens, temperature=0)
    )[0]
    emit("llmkit_reply", reply.text, "text", tokens=len(reply.token_ids), finish_reason=reply.finish_reason)

    started = time.perf_counter()
    export_hf(tuned, work / "hf")
    peer = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = peer(torch.tensor([prompt])).logits[0]
        hf_reply = peer.generate(torch.tensor([prompt]), max_new_tokens=arguments.new_tokens, do_sample=False)[
            0, len(prompt) :
        ].tolist()
    hf_reply = hf_reply[: next((i for i, token in enumerate(hf_reply) if token in tokenizer.stop_ids), len(hf_reply))]
    emit(
        "hf_max_logit_difference",
        float((hf_logits - ours).abs().max()),
        "logit",
        prompt_tokens=len(prompt),
        max_logit=float(ours.abs().max()),
    )
    emit("hf_greedy_equal", hf_reply == reply.token_ids, "bool", seconds=round(time.perf_counter() - started, 1))

    started = time.perf_counter()
    export_gguf(tuned, work / "tuned.gguf")
    import gguf

    fields = {
        name: field.contents()
        for name, field in gguf.GGUFReader(work / "tuned.gguf").fields.items()
        if name.startswith("tokenizer.ggml.")
        and name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    }
    emit(
        "gguf_tokenizer_metadata",
        fields,
        "",
        source_ids={"bos": 1, "eos": 2, "padding": 2, "unknown": 0, "pre": "smollm"},
    )
    llm = llama_cpp.Llama(
        model_path=str(work / "tuned.gguf"),
        n_ctx=512,
        n_batch=512,
        n_threads=1,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
        seed=0,
    )
    text = tokenizer.decode(prompt)
    emit("llama_cpp_tokenizes_like_llmkit", llm.tokenize(text.encode(), add_bos=False, special=True) == prompt, "bool")
    llm.eval(prompt)
    theirs = torch.tensor(llm.scores[: len(prompt)], dtype=torch.float32)
    emit("llama_cpp_max_logit_difference", float((theirs - ours).abs().max()), "logit", prompt_tokens=len(prompt))
    tokens = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(tokens) == arguments.new_tokens:
            break
        tokens.append(token)
    emit(
        "llama_cpp_greedy_equal",
        tokens == reply.token_ids,
        "bool",
        llama_cpp_reply=llm.detokenize(tokens).decode(errors="replace"),
        seconds=round(time.perf_counter() - started, 1),
        llama_cpp_python=llama_cpp.__version__,
    )


if __name__ == "__main__":
    main()
