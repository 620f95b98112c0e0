"""The export round trip for real: a chat model imported from Hugging Face files with its own vocabulary and
chat template (SmolLM2's shape in miniature: byte-level BPE with digits split one by one, ``<|im_start|>`` /
``<|im_end|>``, no pad token), LoRA-tuned by llmkit (``apply_lora``, a few AdamW steps, ``merge_lora``),
exports to Hugging Face files that ``transformers`` runs with llmkit's logits and chat ids, and to a GGUF
file that the real llama.cpp (``llama-cpp-python``) tokenizes as llmkit does and continues greedily with
llmkit's tokens, stopping at the model's own end-of-turn. llmkit's own tokenizers (``<|end|>`` ends a turn)
go through llama.cpp too."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from llmkit.chat import render_ids
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.infer import Engine, GenerationConfig
from llmkit.interop import export_hf, import_hf
from llmkit.interop.gguf import export_gguf
from llmkit.model import Transformer
from llmkit.model.checkpoint import load_model, write_model
from llmkit.model.lora import LoRAConfig, apply_lora, lora_layers, merge_lora
from llmkit.tokenizer import END, Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT = (
    "Question: what is 12 + 30? Answer: 42. The quick brown fox jumps over the lazy dog 1234 times.\n"
    "Über naïve café: 7 apples, 365 days, (x) {y} [z].\n"
) * 20
CONVERSATION = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42, the answer."},
]
# float32 everywhere (llama.cpp's KV cache too); logits reach ~15. transformers runs llmkit's operations
# (measured difference 0); llama.cpp's ggml kernels sum in another order (measured 5e-5).
HF_TOLERANCE, LLAMA_CPP_TOLERANCE = 1e-4, 1e-3


def chat_model_source(folder) -> None:
    """A Hugging Face Llama with a SmolLM2-style tokenizer and chat template, random weights."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        [TEXT],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    hf_tokenizer.chat_template = CHATML
    config = transformers.LlamaConfig(
        vocab_size=304,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    peer = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # weights far from their tiny initial scale, so that logits can be confident
        for parameter in peer.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape))
    peer.save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)


def lora_tuned(imported, out, tokenizer: Tokenizer, steps: int = 60) -> Transformer:
    """The imported model with LoRA adapters trained on one conversation (the reply learnt by heart), merged."""
    model, saved = load_model(imported)
    apply_lora(model, LoRAConfig(rank=8, alpha=16))
    ids, mask = render_ids(tokenizer, CONVERSATION)
    inputs, targets = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
    weights = torch.tensor(mask[1:], dtype=torch.float32)
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=3e-2)
    for _ in range(steps):
        losses = F.cross_entropy(model(inputs)[0], targets, reduction="none")
        loss = (losses * weights).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert lora_layers(model) and loss.item() < 0.05
    merge_lora(model).eval()
    out.mkdir()
    write_model(
        out,
        model.state_dict(),
        model.config,
        {key: value for key, value in saved.items() if key not in ("model", "llmkit_version")},
    )
    tokenizer.save(out)
    return model


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(folder, merged model, tokenizer, prompt ids) of the imported chat model after LoRA tuning."""
    root = tmp_path_factory.mktemp("roundtrip")
    chat_model_source(root / "source")
    import_hf(root / "source", root / "imported")
    tokenizer = Tokenizer.load(root / "imported")
    assert not tokenizer.llmkit_format and tokenizer.vocab_size == 300  # its own vocabulary, nothing added
    base = Engine(load_model(root / "imported")[0].eval(), tokenizer)
    model = lora_tuned(root / "imported", root / "tuned", tokenizer)
    prompt = render_ids(tokenizer, CONVERSATION[:1], add_generation_prompt=True)[0]
    greedy = GenerationConfig(max_new_tokens=24, temperature=0)
    reply = Engine(model, tokenizer).generate_ids([prompt], greedy)[0]
    assert (reply.text, reply.finish_reason) == (CONVERSATION[1]["content"], "stop")  # it stopped at <|im_end|>
    assert base.generate_ids([prompt], greedy)[0].text != reply.text  # the LoRA tuning is what taught it
    return root / "tuned", model, tokenizer, prompt


def test_lora_tuned_import_exports_to_transformers_with_its_logits_and_chat_format(tuned, tmp_path):
    folder, model, tokenizer, prompt = tuned
    export_hf(folder, tmp_path / "hf")
    peer = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([render_ids(tokenizer, CONVERSATION)[0]])
    with torch.no_grad():
        assert (peer(ids).logits - model(ids)).abs().max() <= HF_TOLERANCE
    # The model's own tokens only: no llmkit default (<|pad|>, ...) is invented as a new token.
    assert len(hf_tokenizer) == tokenizer.vocab_size
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert (
        hf_tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        == prompt
    )
    assert hf_tokenizer.encode(TEXT[:120]) == tokenizer.encode(TEXT[:120])
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.stop_ids == [tokenizer.backend.token_to_id("<|im_end|>")]
    reply = peer.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :]
    assert hf_tokenizer.decode(reply, skip_special_tokens=True) == CONVERSATION[1]["content"]


def test_lora_tuned_import_exports_to_gguf_with_its_own_tokens(tuned, tmp_path):
    folder, _, tokenizer, _ = tuned
    export_gguf(folder, tmp_path / "tuned.gguf")
    fields = {name: field.contents() for name, field in gguf.GGUFReader(tmp_path / "tuned.gguf").fields.items()}
    token = tokenizer.backend.token_to_id
    expected = {
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": token("<|im_start|>"),
        "tokenizer.ggml.eos_token_id": token("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": token("<|im_end|>"),
        "tokenizer.ggml.unknown_token_id": token("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }
    assert {key: fields.get(key) for key in expected} == expected
    assert "tokenizer.ggml.eot_token_id" not in fields  # its eos is its only end of turn
    assert fields["tokenizer.ggml.tokens"][300:] == [f"[PAD{index}]" for index in range(300, 304)]


def llama_cpp_model(path, context: int):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)"
    )
    # A float32 KV cache (llama.cpp's default is float16, which alone moves these logits by ~1e-2).
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=context,
        n_batch=context,
        n_threads=1,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
        seed=0,
    )


def ends_generation(llm, token: int) -> bool:
    """llama.cpp's own end-of-generation test (eos, eot, eom and the tokens it recognises as such)."""
    import llama_cpp

    return llama_cpp.llama_vocab_is_eog(llm._model.vocab, token)


def llama_cpp_greedy(llm, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens after ``prompt`` until an end-of-generation token (not included) or ``steps`` tokens."""
    tokens = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if ends_generation(llm, token) or len(tokens) == steps:
            break
        tokens.append(token)
    return tokens


def test_llama_cpp_runs_the_exported_gguf_to_llmkits_logits_and_greedy_reply(tuned, tmp_path):
    folder, model, tokenizer, prompt = tuned
    export_gguf(folder, tmp_path / "tuned.gguf")
    llm = llama_cpp_model(tmp_path / "tuned.gguf", 128)
    text = tokenizer.decode(prompt)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt  # llama.cpp's smollm pre-tokenizer
    assert llm.tokenize(TEXT[:120].encode(), add_bos=False, special=False) == tokenizer.encode(TEXT[:120])
    llm.reset()
    llm.eval(prompt)
    theirs = torch.tensor(llm.scores[: len(prompt)], dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0, :, : llm.n_vocab()]
    assert (theirs - ours).abs().max() <= LLAMA_CPP_TOLERANCE
    reply = Engine(model, tokenizer).generate_ids([prompt], GenerationConfig(max_new_tokens=24, temperature=0))[0]
    tokens = llama_cpp_greedy(llm, prompt, 24)  # both stop at <|im_end|>, which neither returns
    assert tokens == reply.token_ids and reply.finish_reason == "stop"
    assert llm.detokenize(tokens).decode() == CONVERSATION[1]["content"]


def test_llama_cpp_stops_an_llmkit_tokenizers_turn_at_end(tmp_path):
    """llmkit's own tokenizer: eos <|endoftext|> and end-of-turn <|end|> both end generation in llama.cpp."""
    (tmp_path / "a.txt").write_text(TEXT)
    train_tokenizer(
        TokenizerConfig(
            source=str(tmp_path / "a.txt"), out=str(tmp_path / "tokenizer"), vocab_size=300, held_out_fraction=0
        )
    )
    tokenizer = Tokenizer.load(tmp_path / "tokenizer")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the lazy dog"}]
    ids = render_ids(tokenizer, messages)[0]
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=64, n_embd=32, n_head=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0)
    for _ in range(80):
        loss = F.cross_entropy(model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    (tmp_path / "checkpoint").mkdir()
    write_model(tmp_path / "checkpoint", model.state_dict(), model.config, {"tokenizer_sha256": tokenizer.sha256})
    tokenizer.save(tmp_path / "checkpoint")
    export_gguf(tmp_path / "checkpoint", tmp_path / "model.gguf")
    prompt = render_ids(tokenizer, messages[:1], add_generation_prompt=True)[0]
    reply = Engine(model, tokenizer).generate_ids([prompt], GenerationConfig(max_new_tokens=20, temperature=0))[0]
    assert (reply.text, reply.finish_reason) == ("the lazy dog", "stop")
    llm = llama_cpp_model(tmp_path / "model.gguf", 64)
    assert llm.token_eos() == tokenizer.eot_id and ends_generation(llm, tokenizer.special_ids[END])
    tokens = llama_cpp_greedy(llm, prompt, 20)
    assert tokenizer.decode(tokens) == "the lazy dog"


@pytest.mark.parametrize("name", ["gpt-2", "smollm", "llama-bpe", "qwen2", "llama3-hf", "qwen2-hf", "whitespace"])
def test_gguf_export_names_the_pre_tokenizer_llama_cpp_splits_with(name):
    """The pre-tokenizers GGUF import rebuilds, and Llama 3's / Qwen2's own tokenizer.json spellings, map to
    llama.cpp's names; another one is refused."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from llmkit.errors import MismatchError
    from llmkit.interop.gguf import _HF_SPLITS, gguf_pre_tokenizer
    from llmkit.interop.gguf_import import PRE_TOKENIZERS

    backend = Backend(models.BPE(ignore_merges=name.startswith("llama")))
    if name in PRE_TOKENIZERS:
        backend.pre_tokenizer = PRE_TOKENIZERS[name][0]()
    elif name.endswith("-hf"):
        pattern = _HF_SPLITS["llama-bpe" if name.startswith("llama") else "qwen2"]
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [  # as those files have it: offsets trimmed
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    data = json.loads(backend.to_str())
    if name == "whitespace":
        with pytest.raises(MismatchError, match="WhitespaceSplit.*no llama.cpp equivalent"):
            gguf_pre_tokenizer(data)
        return
    assert gguf_pre_tokenizer(data) == {"llama3-hf": "llama-bpe", "qwen2-hf": "qwen2"}.get(name, name)
    data["model"]["ignore_merges"] = not data["model"]["ignore_merges"]
    with pytest.raises(MismatchError, match="ignore_merges"):
        gguf_pre_tokenizer(data)
