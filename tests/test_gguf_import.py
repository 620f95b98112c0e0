"""GGUF import (``llmkit import model.gguf``), checked against independent computations: llmkit's own GGUF
export comes back bit for bit; Llama, Qwen2 and Qwen3 models built in ``transformers`` and written as
GGUF import with their logits; quantized files import as their dequantized weights (a llama.cpp-style
forward pass with adjacent-pair RoPE over the file's tensors, and a hand-written Q8_0/Q4_0/Q4_1 decoder);
rebuilt tokenizers give the source tokenizer's ids; bad files are refused in one line naming the file
and the key; and, where the shared data has it, SmolLM2-135M-Instruct (Q4_1) against ``transformers``'
own GGUF loading."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import SMOLLM2_GGUF
from test_interop import SAMPLES, TEXT, llama_cpp_forward, perturbed, write_checkpoint

from llmkit.chat import CHAT_TEMPLATE, render_ids
from llmkit.cli import main
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import InputError, MismatchError
from llmkit.interop import ExportConfig, ImportConfig, export_checkpoint, import_checkpoint
from llmkit.interop.gguf import vocabulary
from llmkit.model import ModelConfig
from llmkit.model.checkpoint import load_model
from llmkit.tokenizer import END, Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

Q = gguf.GGMLQuantizationType
MORE_SAMPLES = ["I'm 12345 years, it's 3.14159", "CAN'T stop\n\n  indented\r\nline", "x=[1,2]; y={'a': 10}"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text(TEXT)
    train_tokenizer(TokenizerConfig(source=str(folder), out=str(folder / "tok"), vocab_size=300, held_out_fraction=0))
    return Tokenizer.load(folder / "tok")


def llama_config(**changes) -> ModelConfig:
    values = dict(
        vocab_size=320,
        context_length=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        ffn_hidden=48,
        norm="rmsnorm",
        position="rope",
        activation="swiglu",
        bias=False,
        tie_embeddings=False,
        rope_theta=500.0,
    )
    return ModelConfig(**{**values, **changes})


def export_gguf_file(folder, config: ModelConfig, tokenizer: Tokenizer, dtype: str = "float32"):
    model = write_checkpoint(folder / "checkpoint", config, tokenizer)
    export_checkpoint(
        ExportConfig(checkpoint=str(folder / "checkpoint"), format="gguf", out=str(folder / "model.gguf"), dtype=dtype)
    )
    return model, folder / "model.gguf"


def read_back(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {
        tensor.name: torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)).reshape(
            tuple(reversed(tensor.shape.tolist()))
        )
        for tensor in reader.tensors
    }
    return fields, tensors


def rewrite(
    source,
    target,
    *,
    kv: dict | None = None,
    drop: tuple = (),
    types=None,
    extra_tensors: dict | None = None,
    architecture: str | None = None,
) -> None:
    """A copy of the GGUF file ``source`` with metadata changed (``kv``: key -> (value, GGUFValueType)),
    keys dropped, matrices stored as ``types(name)`` and tensors added."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, architecture or reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop or name in (kv or {}):
            continue
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    for name, (value, value_type) in (kv or {}).items():
        writer.add_key_value(name, value, value_type)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    for name, tensor in tensors.items():
        weights = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        kind = types(name) if types and weights.ndim == 2 else tensor.tensor_type
        if kind == Q.F32:
            writer.add_tensor(name, weights)
        else:
            data = quantized(weights, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Where the fp16 super-block scales sit in llama.cpp's K-quant blocks (ggml-common.h), as byte offsets.
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def quantized(weights: np.ndarray, kind) -> np.ndarray:
    """``weights`` quantized by the gguf package; the K-quants, which it only decodes, get random blocks
    with small scales (the model is then whatever those blocks decode to)."""
    if kind not in K_SCALES:
        return quantize(weights, kind)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    generator = np.random.default_rng(int(kind))
    blocks = generator.integers(0, 256, (weights.shape[0], weights.shape[1] // block, size), dtype=np.uint8)
    for offset in K_SCALES[kind]:
        scales = generator.uniform(2e-4, 6e-4, blocks.shape[:2]).astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(weights.shape[0], -1)


def reference_dequantize(raw: np.ndarray, kind) -> np.ndarray:
    """Q8_0, Q4_0 and Q4_1 decoded from ggml's block layout (blocks of 32 weights: an fp16 scale, Q4_1 an
    fp16 minimum too, then 32 int8 or 16 bytes of 4-bit values, low nibbles first), without gguf.quants."""
    size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[kind]
    blocks = raw.reshape(raw.shape[0], -1, size)

    def half(start):
        return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16).astype(np.float32)

    if kind == Q.Q8_0:
        values = half(0) * blocks[..., 2:].view(np.int8).astype(np.float32)
    else:
        packed = blocks[..., 2 if kind == Q.Q4_0 else 4 :]
        nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32)
        values = half(0) * (nibbles - 8) if kind == Q.Q4_0 else half(0) * nibbles + half(2)
    return values.reshape(raw.shape[0], -1)


@pytest.mark.parametrize(
    "name, changes, dtype",
    [
        ("llama-untied", {}, "float32"),
        ("llama-tied", dict(tie_embeddings=True), "float32"),
        ("llama-float16", {}, "float16"),
        (
            "gpt2",
            dict(
                position="learned",
                norm="layernorm",
                activation="gelu_tanh",
                bias=True,
                n_kv_head=4,
                tie_embeddings=True,
                rope_theta=10000.0,
            ),
            "float32",
        ),
    ],
)
def test_llmkit_gguf_export_imports_back_with_the_same_weights_config_and_tokenizer(
    tmp_path, tokenizer, name, changes, dtype
):
    config = llama_config(**changes)
    model, path = export_gguf_file(tmp_path, config, tokenizer, dtype)
    summary = import_checkpoint(ImportConfig(source=str(path), out=str(tmp_path / "back")))
    assert summary["added_special_tokens"] == [] and summary["gguf_architecture"] == (
        "gpt2" if "gpt2" in name else "llama"
    )
    restored, saved = load_model(tmp_path / "back")
    assert saved["model"] == dataclasses.asdict(config)  # eps 1e-05 survives float32 storage, rope_theta, tying, ...
    assert sorted(path.name for path in (tmp_path / "back").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for key, before in model.state_dict().items():
        if key.startswith("rope_"):
            continue
        expected = before.half().float() if dtype == "float16" and before.dim() == 2 else before
        assert torch.equal(restored.state_dict()[key], expected), key
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    if dtype == "float32":
        with torch.no_grad():
            assert torch.equal(restored(ids), model(ids))
    back = Tokenizer.load(tmp_path / "back")
    for text in SAMPLES + MORE_SAMPLES:
        assert back.encode(text) == tokenizer.encode(text)
        assert back.decode(back.encode(text)) == text
    assert (back.eot_id, back.pad_id, back.special_ids[END]) == (
        tokenizer.eot_id,
        tokenizer.pad_id,
        tokenizer.special_ids[END],
    )
    assert back.config["chat_template"] == CHAT_TEMPLATE and back.config["add_bos_token"] is False
    assert saved["tokenizer_sha256"] == back.sha256
    assert saved["imported_from"]["special_token_ids"]["eot"] == tokenizer.special_ids[END]


def hf_model(kind: str):
    """A small random ``transformers`` model of ``kind`` (qwen2: biases on q/k/v only)."""
    shape = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=1000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=kind == "qwen2",
    )
    config = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": lambda **values: transformers.Qwen3Config(head_dim=8, **values),
    }[kind](**shape)
    torch.manual_seed(0)
    return perturbed(transformers.AutoModelForCausalLM.from_config(config), 0)


def write_hf_model_as_gguf(path, peer, kind: str, tokenizer: Tokenizer) -> None:
    """What llama.cpp's converter writes for ``peer``: hyperparameters, vocabulary, tensors under gguf's names,
    and for llama the query/key rows of each head interleaved (row 2j <- j, 2j+1 <- j + head_dim/2)."""
    config = peer.config
    writer = gguf.GGUFWriter(path, kind)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(1000.0)
    if kind == "qwen3":
        writer.add_key_length(8)
        writer.add_value_length(8)
    tokens, types, merges = vocabulary(tokenizer, 320)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if kind != "llama" else "gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eot_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[kind.upper()], config.num_hidden_layers)
    for name, tensor in peer.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weight = tensor.detach().float().numpy()
        if kind == "llama" and ("q_proj" in name or "k_proj" in name):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            weight = weight.reshape(heads, 2, -1, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_transformers_models_written_as_gguf_import_with_their_logits(tmp_path, tokenizer, kind):
    peer = hf_model(kind)
    write_hf_model_as_gguf(tmp_path / "model.gguf", peer, kind, tokenizer)
    import_checkpoint(ImportConfig(source=str(tmp_path / "model.gguf"), out=str(tmp_path / "imported")))
    model, _ = load_model(tmp_path / "imported")
    assert (model.config.bias, model.config.qk_norm, model.config.tie_embeddings) == (
        kind == "qwen2",
        kind == "qwen3",
        kind == "qwen2",
    )
    ids = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - peer(ids).logits).abs().max() <= 1e-4
    if kind == "qwen2":  # o_proj and the MLP have no biases in Qwen2: zeros in llmkit
        assert not model.blocks[0].attention.out.bias.any() and not model.blocks[0].feed_forward.up.bias.any()


QUANT_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16]


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tokenizer):
    """A llama 256 wide (the K-quants' block size) exported as float32 GGUF by llmkit."""
    folder = tmp_path_factory.mktemp("wide")
    config = llama_config(n_layer=1, n_embd=256, n_head=4, n_kv_head=2, ffn_hidden=256)
    model, path = export_gguf_file(folder, config, tokenizer)
    return model, path


@pytest.mark.parametrize("kind", QUANT_TYPES, ids=lambda kind: kind.name)
def test_quantized_gguf_imports_as_its_dequantized_weights(tmp_path, wide_llama, kind):
    source_model, source = wide_llama
    rewrite(source, tmp_path / "q.gguf", types=lambda name: kind)
    summary = import_checkpoint(ImportConfig(source=str(tmp_path / "q.gguf"), out=str(tmp_path / "imported")))
    assert kind.name in summary["tensor_types"]
    model, _ = load_model(tmp_path / "imported")
    fields, tensors = read_back(tmp_path / "q.gguf")
    if kind in (Q.Q8_0, Q.Q4_0, Q.Q4_1):  # the file decoded without gguf.quants
        reader = gguf.GGUFReader(tmp_path / "q.gguf")
        raw = {tensor.name: tensor.data for tensor in reader.tensors}
        for name in ("blk.0.ffn_down.weight", "output.weight"):
            assert np.array_equal(reference_dequantize(raw[name], kind), tensors[name].numpy())
    ids = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, reference = model(ids[None])[0], llama_cpp_forward(tensors, fields, ids)
    assert torch.isfinite(reference).all()
    assert (ours - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())
    if kind in (Q.Q8_0, Q.F16, Q.BF16):  # near the float model too (relative RMS error)
        with torch.no_grad():
            original = source_model(ids[None])[0]
        print(kind.name, ((ours - original).norm() / original.norm()).item())
        assert (ours - original).norm() <= 0.1 * original.norm()


# The pre-tokenizers of the models' own tokenizer.json files, to train the source vocabularies with.
HF_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def source_tokenizer(pre: str):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    if pre in HF_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(HF_SPLITS[pre]), behavior="isolated"), byte_level]
        )
    elif pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    text = TEXT + " ".join(MORE_SAMPLES * 20) + " 1234567 2024 I'll we've THEY'RE\n\n"
    backend.train_from_iterator(
        [text],
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    backend.add_tokens(["<think>"])  # a user-defined token, matched whole but not special
    return backend


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_rebuilt_tokenizer_gives_the_source_tokenizers_ids(tmp_path, pre):
    source = source_tokenizer(pre)
    data = json.loads(source.to_str())
    size = source.get_vocab_size(with_added_tokens=True)
    tokens, types = [None] * size, [int(gguf.TokenType.NORMAL)] * size
    for token, token_id in data["model"]["vocab"].items():
        tokens[token_id] = token
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    writer = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    for add, value in (
        (writer.add_context_length, 16),
        (writer.add_embedding_length, 8),
        (writer.add_block_count, 1),
        (writer.add_feed_forward_length, 8),
        (writer.add_head_count, 2),
        (writer.add_layer_norm_rms_eps, 1e-5),
    ):
        add(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(
        [" ".join(merge) if not isinstance(merge, str) else merge for merge in data["model"]["merges"]]
    )
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    if pre == "llama-bpe":
        writer.add_add_bos_token(True)
    generator = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (size, 8),
        "output_norm.weight": (8,),
        "blk.0.attn_norm.weight": (8,),
        "blk.0.ffn_norm.weight": (8,),
        "blk.0.attn_q.weight": (8, 8),
        "blk.0.attn_k.weight": (8, 8),
        "blk.0.attn_v.weight": (8, 8),
        "blk.0.attn_output.weight": (8, 8),
        "blk.0.ffn_gate.weight": (8, 8),
        "blk.0.ffn_up.weight": (8, 8),
        "blk.0.ffn_down.weight": (8, 8),
    }
    for name, shape in shapes.items():
        writer.add_tensor(name, generator.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert (
        main(["import", str(tmp_path / "model.gguf"), "--out", str(tmp_path / "imported")]) == 0
    )  # the positional form
    ours = Tokenizer.load(tmp_path / "imported")
    peer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    # (not SAMPLES[2]: its <|user|> and <|end|> are special tokens llmkit added, plain text to the source)
    texts = SAMPLES[:2] + SAMPLES[3:] + MORE_SAMPLES + ["<|im_start|>user\nhi<|im_end|>", "<think>why</think> 98765"]
    for text in texts:
        expected = source.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == text
        if (
            pre != "smollm"
        ):  # transformers splits digit runs with GPT-2's regex for "smollm"; llama.cpp isolates each digit
            assert peer.encode(text, add_special_tokens=False) == expected, text
    assert ours.encode("<think>")[0] == source.token_to_id("<think>")
    assert ours.config["chat_template"] == "{{ messages[0]['content'] }}"
    assert (ours.config["bos_token"], ours.config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    # llama-bpe adds bos (llama.cpp does): in the file's post-processor for Hugging Face users; llmkit adds nothing.
    hf_ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "imported")
    assert hf_ours.encode("hi")[:1] == ([1] if pre == "llama-bpe" else source.encode("hi").ids[:1])
    assert ours.config["add_bos_token"] is (pre == "llama-bpe")


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("small")
    return export_gguf_file(folder, llama_config(n_layer=1), tokenizer)[1]


V = gguf.GGUFValueType


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(architecture="falcon"), "general.architecture"),
        (
            dict(kv={"llama.rope.scaling.type": ("linear", V.STRING), "llama.rope.scaling.factor": (2.0, V.FLOAT32)}),
            "llama.rope.scaling.type",
        ),
        (dict(kv={"llama.rope.scaling.factor": (4.0, V.FLOAT32)}), "llama.rope.scaling.factor"),
        (dict(kv={"llama.attention.sliding_window": (16, V.UINT32)}), "llama.attention.sliding_window"),
        (dict(kv={"llama.rope.dimension_count": (4, V.UINT32)}), "llama.rope.dimension_count"),
        (dict(kv={"llama.attention.key_length": (16, V.UINT32)}), "llama.attention.key_length"),
        (dict(kv={"llama.attention.layer_norm_epsilon": (1e-5, V.FLOAT32)}), "llama.attention.layer_norm_epsilon"),
        (dict(kv={"llama.expert_count": (4, V.UINT32)}), "llama.expert_count"),
        (dict(kv={"llama.logit_scale": (0.5, V.FLOAT32)}), "llama.logit_scale"),
        (dict(drop=("llama.attention.layer_norm_rms_epsilon",)), "llama.attention.layer_norm_rms_epsilon"),
        (dict(kv={"tokenizer.ggml.model": ("llama", V.STRING)}), "tokenizer.ggml.model"),
        (dict(kv={"tokenizer.ggml.pre": ("deepseek-llm", V.STRING)}), "tokenizer.ggml.pre"),
        (dict(extra_tensors={"rope_freqs.weight": np.ones(4, dtype=np.float32)}), "rope_freqs.weight"),
        (dict(iq4_nl="blk.0.ffn_up.weight"), "blk.0.ffn_up.weight"),
    ],
)
def test_unsupported_gguf_is_refused_in_one_line_naming_the_file_and_key(tmp_path, small_gguf, change, key):
    if "iq4_nl" in change:  # a type the gguf package decodes but llmkit does not take: raw blocks of it
        rewrite(small_gguf, tmp_path / "bad.gguf")
        _replace_tensor_type(tmp_path / "bad.gguf", change["iq4_nl"], Q.IQ4_NL)
    else:
        rewrite(small_gguf, tmp_path / "bad.gguf", **change)
    with pytest.raises(MismatchError) as error:
        import_checkpoint(ImportConfig(source=str(tmp_path / "bad.gguf"), out=str(tmp_path / "out")))
    message = str(error.value)
    assert f"'{key}'" in message and str(tmp_path / "bad.gguf") in message and "\n" not in message
    assert "IQ4_NL" in message if "iq4_nl" in change else True
    assert not (tmp_path / "out").exists()


def _replace_tensor_type(path, name: str, kind) -> None:
    """Rewrite ``path`` with tensor ``name`` stored as raw (random) blocks of ``kind``."""
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(path) + ".new", reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            writer.add_key_value(
                key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None
            )
    for tensor in reader.tensors:
        if tensor.name == name:
            rows, columns = tensor.shape[1], tensor.shape[0]
            block, size = gguf.GGML_QUANT_SIZES[kind]
            data = np.zeros((rows, columns // block * size), dtype=np.uint8)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (path.parent / (path.name + ".new")).replace(path)


def test_truncated_or_foreign_files_are_refused_naming_the_file(tmp_path, small_gguf):
    data = small_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        InputError, match=r"cut\.gguf: truncated: tensor '[a-z_.0-9]+' ends at byte \d+ but the file has \d+ bytes"
    ):
        import_checkpoint(ImportConfig(source=str(cut), out=str(tmp_path / "out")))
    cut.write_bytes(data[:300])  # inside the metadata
    with pytest.raises(
        InputError, match=r"cut\.gguf: truncated or corrupt GGUF file \(reading failed after metadata key '[a-z_.]+'"
    ):
        import_checkpoint(ImportConfig(source=str(cut), out=str(tmp_path / "out")))
    (tmp_path / "notes.gguf").write_text("hello")
    with pytest.raises(InputError, match=r"notes\.gguf: not a GGUF file"):
        import_checkpoint(ImportConfig(source=str(tmp_path / "notes.gguf"), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    # On the command line: exit status 2 and one line.
    assert main(["import", str(cut), "--out", str(tmp_path / "out")]) == 2


@pytest.mark.usefixtures("all_cores")
def test_smollm2_q4_1_matches_transformers_gguf_loading(smollm2_checkpoint):
    """SmolLM2-135M-Instruct in Q4_1 (its embedding in Q8_0), imported by ``llmkit import`` (the session's
    checkpoint): llmkit's import against transformers' reading of the same file (its config mapping, name
    map, un-permutation and LlamaForCausalLM)."""
    path = SMOLLM2_GGUF
    model, saved = load_model(smollm2_checkpoint)
    assert saved["imported_from"]["gguf_architecture"] == "llama"
    assert saved["imported_from"]["tensor_types"] == ["F32", "Q4_1", "Q8_0"]
    tokenizer = Tokenizer.load(smollm2_checkpoint)
    peer = _transformers_gguf_model(path, model.config)
    peer.eval()
    ids = tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids]))[0], peer(torch.tensor([ids])).logits[0]
    difference = (ours - theirs).abs().max().item()
    print(
        f"SmolLM2-135M-Instruct Q4_1: max |llmkit - transformers| logit difference {difference:.3g} "
        f"(logits up to {theirs.abs().max().item():.3g})"
    )
    assert difference <= 1e-3 and torch.equal(ours.argmax(-1), theirs.argmax(-1))
    peer_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in [
        "Hello, world! It's 2024.",
        "def f(x):\n    return x ** 2  # square",
        "<|im_start|>system\nBe brief<|im_end|>",
        "naïve café – 東京 😀",
        "  two  spaces\t\ttabs\n\n",
    ]:
        assert tokenizer.encode(text) == peer_tokenizer.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.config["eos_token"] == "<|im_end|>" and tokenizer.config["chat_template"].startswith(
        "{% for message"
    )
    assert saved["imported_from"]["special_token_ids"]["eos"] == 2
    # A chat model keeps its vocabulary and speaks its own format: ChatML, ending at <|im_end|>.
    assert model.config.vocab_size == tokenizer.vocab_size == 49152 and not tokenizer.llmkit_format
    assert tokenizer.stop_ids == [2]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert (
        render_ids(tokenizer, messages, add_generation_prompt=True)[0]
        == peer_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def _transformers_gguf_model(path, config: ModelConfig):
    """What ``from_pretrained(gguf_file=...)`` does in one read of the file instead of its three (18 s against
    7 s here) and without its accelerate check: transformers' GGUF reader dequantizes, renames and un-permutes
    the tensors into a LlamaForCausalLM. The model is built with the shape llmkit read; the config
    transformers parses from the same file must agree with it."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=config.n_embd,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):  # no random initialisation: every weight comes from the file
        peer = transformers.LlamaForCausalLM(hf)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=peer)
    theirs = parsed["config"]
    assert {
        key: theirs[key]
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "tie_word_embeddings",
            "vocab_size",
        )
    } == {
        key: getattr(hf, key)
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "tie_word_embeddings",
            "vocab_size",
        )
    }
    assert theirs["rope_theta"] == pytest.approx(config.rope_theta) and theirs["rms_norm_eps"] == pytest.approx(
        config.norm_eps
    )
    missing, unexpected = peer.load_state_dict(parsed["tensors"], strict=False, assign=True)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied: the embedding
    peer.tie_weights()
    peer.model.rotary_emb = type(peer.model.rotary_emb)(config=hf)  # its frequencies are computed, not stored
    assert not any(tensor.is_meta for tensor in [*peer.parameters(), *peer.buffers()])
    return peer
