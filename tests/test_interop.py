"""Hugging Face and GGUF interoperability, checked against the peer implementations: exported models run
in ``transformers`` with llmkit's logits and greedy continuation, Hugging Face models built from a config
import with their logits, round trips keep every weight, unsupported layouts are refused by name, and a
GGUF file read back with ``gguf.GGUFReader`` runs a llama.cpp-style forward pass (adjacent-pair RoPE)
to llmkit's logits."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config
from safetensors.torch import load_file

from llmkit.chat import CHAT_TEMPLATE, render_ids
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError, InputError, MismatchError
from llmkit.infer import Engine, EngineConfig, GenerationConfig
from llmkit.interop import ExportConfig, ImportConfig, export_checkpoint, export_hf, import_checkpoint, import_hf
from llmkit.model import ModelConfig, Transformer
from llmkit.model.checkpoint import load_model, write_model
from llmkit.tokenizer import END, SPECIAL_TOKENS, Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TEXT = "the quick brown fox jumps over the lazy dog. Über naïve café, 1234 (x) {y} [z]\n" * 30
SAMPLES = ["the lazy dog", " café über", "<|user|>hi<|end|><|assistant|>", "no  double\tspaces\n", "é€😀"]
VARIANTS = {
    "llama-gqa-untied": dict(n_head=4, n_kv_head=2, n_embd=32, tie_embeddings=False, rope_theta=500.0),
    "llama-geglu-bias": dict(activation="geglu", bias=True, norm_eps=1e-6),
    "qwen3-qk-norm": dict(qk_norm=True, n_head=4, n_kv_head=1, n_embd=32),
    "gpt2": dict(position="learned", norm="layernorm", activation="gelu_tanh", bias=True),
    "gpt2-gelu-no-bias-untied": dict(
        position="learned", norm="layernorm", activation="gelu", bias=False, tie_embeddings=False, ffn_hidden=40
    ),
    "gpt2-relu2": dict(position="learned", norm="layernorm", activation="relu2", bias=True),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text(TEXT)
    out = folder / "tokenizer"
    train_tokenizer(TokenizerConfig(source=str(folder), out=str(out), vocab_size=300, held_out_fraction=0))
    return Tokenizer.load(out)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, norms and biases included, so a misplaced tensor changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def write_checkpoint(folder, config: ModelConfig, tokenizer: Tokenizer, seed: int = 0) -> Transformer:
    model = perturbed(Transformer(config), seed)
    folder.mkdir(parents=True)
    write_model(folder, model.state_dict(), config, {"tokenizer_sha256": tokenizer.sha256})
    tokenizer.save(folder)
    return model


def variant_config(name: str) -> ModelConfig:
    # The model's vocabulary is padded past the tokenizer's 300 tokens, as llmkit allows.
    return tiny_config(vocab_size=320, context_length=64, **VARIANTS[name])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_exported_model_gives_llmkit_logits_and_greedy_text_in_transformers(tmp_path, tokenizer, name):
    model = write_checkpoint(tmp_path / "checkpoint", variant_config(name), tokenizer)
    summary = export_hf(tmp_path / "checkpoint", tmp_path / "hf")
    peer = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert (
        type(peer).__name__
        == summary["architecture"]
        == json.loads((tmp_path / "hf/config.json").read_text())["architectures"][0]
    )
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (peer(ids).logits - model(ids)).abs().max() <= 1e-4
    prompt = tokenizer.encode("the quick")
    ours = (
        Engine(model, tokenizer)
        .generate("the quick", GenerationConfig(max_new_tokens=20, temperature=0, stop_at_end_of_text=False))[0]
        .token_ids
    )
    theirs = peer.generate(
        torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_id
    )[0, len(prompt) :].tolist()
    assert len(ours) == 20 and ours == theirs


def test_exported_tokenizer_encodes_decodes_and_templates_like_llmkit(tmp_path, tokenizer):
    write_checkpoint(tmp_path / "checkpoint", variant_config("gpt2"), tokenizer)
    export_hf(tmp_path / "checkpoint", tmp_path / "hf")
    peer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SAMPLES:
        assert peer.encode(text) == tokenizer.encode(text)  # and no bos/eos added by default
        assert peer.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text)) == text
    assert (tmp_path / "hf/tokenizer.json").read_bytes() == tokenizer.tokenizer_json
    generation = json.loads((tmp_path / "hf/generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eot_id, tokenizer.special_ids[END]]
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the fox?"},
        {"role": "assistant", "content": "jumps"},
        {"role": "user", "content": "over?"},
    ]
    rendered = peer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert peer.encode(rendered) == render_ids(tokenizer, messages, add_generation_prompt=True)[0]


def hf_source(folder, kind: str, seed: int = 0):
    """A Hugging Face model built from a small config with random weights, saved with a tokenizer that
    lacks most of llmkit's special tokens, as a downloaded model would."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>"] if kind == "gpt2" else ["<unk>", "<s>", "</s>"]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        [TEXT],
        trainers.BpeTrainer(
            vocab_size=280,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    vocab_size = 288  # padded past the tokenizer's 280
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        hf_tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token=specials[0], eos_token=specials[0]
        )
    else:
        shape = dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            rope_theta=1000.0,
            tie_word_embeddings=False,
        )
        config = (transformers.LlamaConfig if kind == "llama" else transformers.Qwen3Config)(**shape)
        hf_tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
        hf_tokenizer.chat_template = "{% for message in messages %}<s>{{ message.content }}</s>{% endfor %}"
    torch.manual_seed(seed)
    peer = perturbed(transformers.AutoModelForCausalLM.from_config(config), seed)
    peer.save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    return peer, hf_tokenizer


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen3"])
def test_hf_model_imports_with_its_logits_and_its_own_chat_format_or_llmkits(tmp_path, kind):
    peer, hf_tokenizer = hf_source(tmp_path / "hf", kind)
    summary = import_hf(tmp_path / "hf", tmp_path / "imported")
    model, saved = load_model(tmp_path / "imported")
    ids = torch.randint(0, 280, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(ids), peer(ids).logits
    assert (ours[..., :280] - theirs[..., :280]).abs().max() <= 1e-4
    tokenizer = Tokenizer.load(tmp_path / "imported")
    for text in SAMPLES[:2] + SAMPLES[3:]:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    # The source's template is kept (it is how the source chats); without one, llmkit's chat format.
    assert tokenizer.config["chat_template"] == (hf_tokenizer.chat_template or CHAT_TEMPLATE)
    assert tokenizer.config["eos_token"] == hf_tokenizer.eos_token
    if hf_tokenizer.chat_template:  # a chat model stays as it is: no token added, its eos ends generation
        assert summary["added_special_tokens"] == saved["imported_from"]["added_special_tokens"] == []
        assert (
            not tokenizer.llmkit_format
            and tokenizer.vocab_size == 280
            and model.config.vocab_size == peer.config.vocab_size
        )
        assert tokenizer.stop_ids == [hf_tokenizer.eos_token_id]
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        assert (
            render_ids(tokenizer, messages)[0]
            == hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        )
        return
    added = [token for token in SPECIAL_TOKENS if token not in hf_tokenizer.get_vocab()]
    assert summary["added_special_tokens"] == saved["imported_from"]["added_special_tokens"] == added
    assert tokenizer.llmkit_format
    # New tokens sit after the source's 280 and start at the mean of the source tokens' embedding rows.
    added_ids = [tokenizer.special_ids[token] for token in added]
    assert sorted(added_ids) == list(range(280, 280 + len(added)))
    assert model.config.vocab_size == max(288, 280 + len(added))
    for ours, theirs in (
        (model.token_embedding, peer.get_input_embeddings()),
        (model.lm_head, peer.get_output_embeddings()),
    ):
        mean = theirs.weight[:280].mean(dim=0)
        assert torch.allclose(ours.weight[added_ids], mean.expand(len(added), -1), atol=1e-6)
    # The checkpoint is an ordinary llmkit one: the engine loads it (tokenizer hash checked) and decodes.
    completion = Engine.from_config(EngineConfig(checkpoint=str(tmp_path / "imported"))).generate(
        "the", GenerationConfig(max_new_tokens=3, temperature=0)
    )
    assert len(completion[0].token_ids) >= 1


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2", "qwen3-qk-norm"])
def test_export_then_import_gives_identical_weights_config_and_tokenizer(tmp_path, tokenizer, name):
    config = variant_config(name)
    write_checkpoint(tmp_path / "checkpoint", config, tokenizer)
    export_checkpoint(ExportConfig(checkpoint=str(tmp_path / "checkpoint"), format="hf", out=str(tmp_path / "hf")))
    summary = import_checkpoint(ImportConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "back")))
    assert summary["added_special_tokens"] == []
    before, after = load_file(tmp_path / "checkpoint/model.safetensors"), load_file(tmp_path / "back/model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
    restored = json.loads((tmp_path / "back/config.json").read_text())
    assert restored["model"] == dataclasses.asdict(config)
    assert Tokenizer.load(tmp_path / "back").sha256 == tokenizer.sha256 == restored["tokenizer_sha256"]


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(position="alibi"), "position"),
        (dict(position="sinusoidal"), "position"),
        (dict(norm_placement="post"), "norm_placement"),
        (dict(moe_experts=2), "moe_experts"),
        (dict(logit_softcap=30.0), "logit_softcap"),
        (dict(embedding_norm=True), "embedding_norm"),
        (dict(activation="relu2"), "activation"),
        (dict(norm="layernorm"), "norm"),
        (dict(qk_norm=True, bias=True), "bias"),
        (dict(position="learned", norm="layernorm", activation="gelu", n_head=2, n_kv_head=1), "n_kv_head"),
        (dict(position="learned", norm="layernorm", activation="swiglu"), "activation"),
    ],
)
def test_export_refuses_layouts_without_an_exact_equivalent_naming_the_field(tmp_path, tokenizer, changes, field):
    write_checkpoint(tmp_path / "checkpoint", tiny_config(**changes), tokenizer)
    with pytest.raises(MismatchError, match=f"'{field}' = {changes[field]!r}"):
        export_hf(tmp_path / "checkpoint", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "values, key",
    [
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "architectures"),
        (
            {"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            "rope_scaling",
        ),
        (
            {"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
            "rope_parameters.rope_type",
        ),
        ({"architectures": ["LlamaForCausalLM"], "attention_bias": True, "mlp_bias": False}, "mlp_bias"),
        ({"architectures": ["LlamaForCausalLM"], "hidden_act": "relu"}, "hidden_act"),
        ({"architectures": ["LlamaForCausalLM"], "head_dim": 16}, "head_dim"),
        ({"architectures": ["Qwen3ForCausalLM"], "use_sliding_window": True}, "use_sliding_window"),
        (
            {"architectures": ["GPT2LMHeadModel"], "scale_attn_by_inverse_layer_idx": True},
            "scale_attn_by_inverse_layer_idx",
        ),
        ({"architectures": ["GPT2LMHeadModel"], "activation_function": "silu"}, "activation_function"),
    ],
)
def test_import_refuses_unsupported_hf_options_naming_the_key(tmp_path, values, key):
    shape = {
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "n_embd": 32,
        "n_layer": 1,
        "n_head": 4,
    }
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/config.json").write_text(json.dumps({**shape, **values}))
    with pytest.raises(MismatchError, match=key):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_outputs_replace_previous_outputs_but_never_other_files(tmp_path, tokenizer):
    write_checkpoint(tmp_path / "checkpoint", variant_config("gpt2"), tokenizer)
    export_hf(tmp_path / "checkpoint", tmp_path / "hf")
    export_hf(tmp_path / "checkpoint", tmp_path / "hf", dtype="float16")  # a previous export is replaced
    assert json.loads((tmp_path / "hf/config.json").read_text())["dtype"] == "float16"
    (tmp_path / "project").mkdir()
    (tmp_path / "project/notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds other files"):
        export_hf(tmp_path / "checkpoint", tmp_path / "project")
    with pytest.raises(InputError, match="holds other files"):
        import_hf(tmp_path / "hf", tmp_path / "project")
    assert [path.name for path in (tmp_path / "project").iterdir()] == ["notes.txt"]


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="dtype"):
        ExportConfig(format="gguf", dtype="bfloat16")
    with pytest.raises(ConfigError, match="source"):
        ImportConfig(source="")


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def llama_cpp_forward(tensors: dict, fields: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a GGUF llama model computed as llama.cpp's graph does, with RoPE on adjacent pairs
    (2i, 2i+1) (ggml's "normal" mode), independently of llmkit's code."""
    heads, kv_heads = fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]
    eps, base = fields["llama.attention.layer_norm_rms_epsilon"], fields["llama.rope.freq_base"]
    x = tensors["token_embd.weight"][ids]
    length, width = x.shape
    head_dim = width // heads
    angles = torch.arange(length)[:, None] * base ** (-torch.arange(0, head_dim, 2) / head_dim)  # (T, head_dim/2)

    def rope(t):  # (T, h, head_dim)
        even, odd = t[..., 0::2], t[..., 1::2]
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    for layer in range(fields["llama.block_count"]):
        weight = {name.split(".", 2)[2]: value for name, value in tensors.items() if name.startswith(f"blk.{layer}.")}
        h = rms_norm(x, weight["attn_norm.weight"], eps)
        q = rope((h @ weight["attn_q.weight"].T).view(length, heads, head_dim))
        k = rope((h @ weight["attn_k.weight"].T).view(length, kv_heads, head_dim))
        v = (h @ weight["attn_v.weight"].T).view(length, kv_heads, head_dim)
        group = heads // kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / head_dim**0.5
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        x = (
            x
            + torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, width)
            @ weight["attn_output.weight"].T
        )
        h = rms_norm(x, weight["ffn_norm.weight"], eps)
        x = (
            x
            + (F.silu(h @ weight["ffn_gate.weight"].T) * (h @ weight["ffn_up.weight"].T)) @ weight["ffn_down.weight"].T
        )
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    return rms_norm(x, tensors["output_norm.weight"], eps) @ head.T


def read_gguf(path) -> tuple[dict, dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {
        tensor.name: torch.from_numpy(tensor.data.astype("float32")).reshape(tuple(reversed(tensor.shape.tolist())))
        for tensor in reader.tensors
    }
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    return fields, tensors, types


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_llama_reads_back_with_metadata_and_runs_llama_cpp_style_to_llmkit_logits(tmp_path, tokenizer, tied):
    config = variant_config("llama-gqa-untied").replace(tie_embeddings=tied)
    model = write_checkpoint(tmp_path / "checkpoint", config, tokenizer)
    export_checkpoint(
        ExportConfig(checkpoint=str(tmp_path / "checkpoint"), format="gguf", out=str(tmp_path / "model.gguf"))
    )
    fields, tensors, types = read_gguf(tmp_path / "model.gguf")
    assert fields["general.architecture"] == "llama"
    expected = {
        "llama.context_length": 64,
        "llama.embedding_length": 32,
        "llama.block_count": 2,
        "llama.feed_forward_length": config.ffn_hidden,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 8,
        "llama.rope.freq_base": 500.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tokenizer.eot_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eot_id,
        "tokenizer.ggml.eot_token_id": tokenizer.special_ids[END],
        "tokenizer.ggml.padding_token_id": tokenizer.pad_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
    vocabulary = {token: token_id for token_id, token in enumerate(fields["tokenizer.ggml.tokens"])}
    assert len(vocabulary) == 320 and all(
        vocabulary[token] == index for token, index in tokenizer.backend.get_vocab().items()
    )
    assert fields["tokenizer.ggml.token_type"][tokenizer.eot_id] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.token_type"][319] == gguf.TokenType.UNUSED
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads(tokenizer.tokenizer_json)["model"]["merges"])
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    names |= {
        f"blk.{layer}.{name}.weight"
        for layer in range(2)
        for name in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        )
    }
    assert set(tensors) == names and set(types.values()) == {gguf.GGMLQuantizationType.F32}
    # Undo the pair interleaving by hand: row 2j of a head is the rotate-half row j, row 2j+1 is j + head_dim/2.
    qkv = model.blocks[1].attention.qkv.weight
    order = torch.tensor([head * 8 + half * 4 + j for head in range(4) for j in range(4) for half in range(2)])
    assert torch.equal(tensors["blk.1.attn_q.weight"], qkv[:32][order])
    assert torch.equal(tensors["blk.1.attn_k.weight"], qkv[32:48][order[:16]])
    assert torch.equal(tensors["blk.1.attn_v.weight"], qkv[48:])
    assert torch.equal(tensors["blk.1.ffn_gate.weight"], model.blocks[1].feed_forward.up.weight[: config.ffn_hidden])
    ids = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (llama_cpp_forward(tensors, fields, ids) - model(ids[None])[0]).abs().max() <= 1e-4


def test_gguf_float16_and_gpt2_layout(tmp_path, tokenizer):
    config = variant_config("gpt2")
    model = write_checkpoint(tmp_path / "checkpoint", config, tokenizer)
    summary = export_checkpoint(
        ExportConfig(
            checkpoint=str(tmp_path / "checkpoint"), format="gguf", out=str(tmp_path / "gpt2.gguf"), dtype="float16"
        )
    )
    fields, tensors, types = read_gguf(tmp_path / "gpt2.gguf")
    assert summary["architecture"] == fields["general.architecture"] == "gpt2"
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(config.norm_eps)
    assert fields["gpt2.context_length"] == 64 and fields["gpt2.attention.head_count"] == 2
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.bias"] == gguf.GGMLQuantizationType.F32  # 1-D tensors stay float32
    state = model.state_dict()
    pairs = {
        "position_embd.weight": "position_embedding.weight",
        "blk.0.attn_qkv.weight": "blocks.0.attention.qkv.weight",
        "blk.1.ffn_down.weight": "blocks.1.feed_forward.down.weight",
        "output_norm.bias": "final_norm.bias",
        "output.weight": "token_embedding.weight",
    }  # tied, yet written: llama.cpp's gpt2 reads its head there
    for theirs, ours in pairs.items():
        expected = state[ours] if state[ours].dim() == 1 else state[ours].to(torch.float16).float()
        assert torch.equal(tensors[theirs], expected)


@pytest.mark.parametrize(
    "changes, field",
    [(dict(qk_norm=True), "qk_norm"), (dict(activation="geglu"), "activation"), (dict(bias=True), "bias")],
)
def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path, tokenizer, changes, field):
    write_checkpoint(tmp_path / "checkpoint", tiny_config(**changes), tokenizer)
    with pytest.raises(MismatchError, match=f"'{field}'"):
        export_checkpoint(
            ExportConfig(checkpoint=str(tmp_path / "checkpoint"), format="gguf", out=str(tmp_path / "m.gguf"))
        )
    assert list(tmp_path.glob("*.gguf*")) == []


def test_gguf_refuses_a_character_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    train_tokenizer(
        TokenizerConfig(
            source=str(tmp_path / "a.txt"),
            out=str(tmp_path / "chars"),
            kind="char",
            vocab_size=100,
            held_out_fraction=0,
        )
    )
    characters = Tokenizer.load(tmp_path / "chars")
    write_checkpoint(tmp_path / "checkpoint", tiny_config(vocab_size=characters.vocab_size), characters)
    with pytest.raises(MismatchError, match="kind 'char'"):
        export_checkpoint(
            ExportConfig(checkpoint=str(tmp_path / "checkpoint"), format="gguf", out=str(tmp_path / "m.gguf"))
        )
