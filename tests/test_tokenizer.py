import json
import random

import pytest

from llmkit.chat import CHAT_TEMPLATE
from llmkit.data.sources import is_held_out, iter_documents
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError, InputError
from llmkit.io import sha256_file
from llmkit.tokenizer import SPECIAL_TOKENS, UNK, Tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Über naïve café — 東京で寿司を食べる。\n",
    "for index in range(10):\n    print(index * index)\n",
    "Lists, tuples and dictionaries are the workhorses of Python.\n" * 3,
] * 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for index, text in enumerate(TEXTS):
        (folder / f"doc_{index:02d}.txt").write_text(f"{text}{index}\n", encoding="utf-8")
    return str(folder)


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    summary = train_tokenizer(TokenizerConfig(source=corpus, out=str(out), vocab_size=400, held_out_fraction=0.2))
    return summary, Tokenizer.load(out), out


def test_bpe_round_trip_is_lossless_on_arbitrary_unicode(bpe):
    _, tokenizer, _ = bpe
    generator = random.Random(0)
    # Every code point except surrogates (which cannot be UTF-8 encoded).
    alphabet = [chr(code) for code in range(0x110000) if not 0xD800 <= code <= 0xDFFF]
    samples = [
        "",
        "\x00\x01\x07\x1b[0m\t\r\n",
        "emoji 😀👩‍👩‍👧 flags 🇫🇷",
        "中文 日本語 한국어",
        "  leading and trailing  ",
    ]
    samples += ["".join(generator.choice(alphabet) for _ in range(200)) for _ in range(20)]
    for text in samples:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert all(0 <= token_id < tokenizer.vocab_size for token_id in ids)
    assert tokenizer.encode_batch(samples) == [tokenizer.encode(text) for text in samples]


def test_special_tokens_have_fixed_ids(bpe):
    _, tokenizer, out = bpe
    expected = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    assert tokenizer.special_ids == expected
    assert tokenizer.eot_id == 0 and tokenizer.pad_id == 1
    assert tokenizer.encode("<|user|>hi<|end|>")[0] == expected["<|user|>"]
    assert tokenizer.encode("<|user|>hi<|end|>")[-1] == expected["<|end|>"]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["special_token_ids"] == expected
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["kind"], config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "bpe",
        "<|endoftext|>",
        "<|endoftext|>",
        "<|pad|>",
    )


def test_bytes_per_token_matches_a_hand_count(bpe, corpus):
    summary, tokenizer, out = bpe
    held_out = [d.text for d in iter_documents(corpus) if is_held_out(d.id, 0.2)]
    assert held_out, "the fixture corpus must hold out at least one document"
    total_bytes = sum(len(text.encode("utf-8")) for text in held_out)
    total_tokens = sum(len(tokenizer.encode(text)) for text in held_out)
    assert summary["held_out_documents"] == len(held_out)
    assert summary["held_out_bytes"] == total_bytes
    assert summary["bytes_per_token"] == pytest.approx(total_bytes / total_tokens)
    assert json.loads((out / "tokenizer_config.json").read_text())["bytes_per_token"] == pytest.approx(
        total_bytes / total_tokens
    )
    all_bytes = sum(len(d.text.encode("utf-8")) for d in iter_documents(corpus))
    assert summary["training_bytes"] == all_bytes - total_bytes
    text = "naïve 😀 code"
    assert tokenizer.bytes_per_token([text]) == len(text.encode("utf-8")) / len(tokenizer.encode(text))
    # Merges learnt from the corpus compress it: better than one byte per token.
    assert summary["bytes_per_token"] > 1.5


def test_training_is_deterministic_and_save_keeps_the_hash(bpe, corpus, tmp_path):
    summary, tokenizer, out = bpe
    again = train_tokenizer(
        TokenizerConfig(source=corpus, out=str(tmp_path / "again"), vocab_size=400, held_out_fraction=0.2)
    )
    assert again["sha256"] == summary["sha256"] == tokenizer.sha256 == sha256_file(out / "tokenizer.json")
    tokenizer.save(tmp_path / "checkpoint")
    copy = Tokenizer.load(tmp_path / "checkpoint")
    assert copy.sha256 == tokenizer.sha256
    assert copy.encode("def add(a, b):") == tokenizer.encode("def add(a, b):")


def test_char_vocabulary_is_the_set_of_training_characters(corpus, tmp_path):
    summary = train_tokenizer(TokenizerConfig(source=corpus, out=str(tmp_path), kind="char", held_out_fraction=0.0))
    characters = set("".join(d.text for d in iter_documents(corpus)))
    vocabulary = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert set(vocabulary) - set(SPECIAL_TOKENS) == characters
    assert summary["vocab_size"] == len(SPECIAL_TOKENS) + len(characters)
    tokenizer = Tokenizer.load(tmp_path)
    assert tokenizer.special_ids == {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    text = "東京 café\n"
    assert tokenizer.encode(text) == [vocabulary[character] for character in text]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # A character never seen in training becomes <|unk|>, one per character.
    assert tokenizer.encode("a😀😀") == [vocabulary["a"], tokenizer.special_ids[UNK], tokenizer.special_ids[UNK]]


def test_char_vocabulary_is_capped_by_frequency(tmp_path):
    (tmp_path / "text.txt").write_text("aaaa bbb cc d", encoding="utf-8")
    train_tokenizer(
        TokenizerConfig(
            source=str(tmp_path / "text.txt"),
            out=str(tmp_path / "out"),
            kind="char",
            vocab_size=len(SPECIAL_TOKENS) + 3,
            held_out_fraction=0.0,
        )
    )
    vocabulary = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"]
    # Counts: a=4, ' '=3, b=3, c=2, d=1; ties broken by code point (' ' < 'b').
    assert set(vocabulary) - set(SPECIAL_TOKENS) == {"a", " ", "b"}


def test_transformers_loads_the_files_unchanged(bpe):
    transformers = pytest.importorskip("transformers")
    _, tokenizer, out = bpe
    from_file = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    from_directory = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "Über café 😀 <|assistant|> def f(x):\n\treturn x , ."
    ids = tokenizer.encode(text)
    assert from_file.encode(text, add_special_tokens=False) == ids
    assert from_directory.encode(text, add_special_tokens=False) == ids
    assert from_directory.decode(ids) == text
    assert (from_directory.eos_token_id, from_directory.pad_token_id) == (tokenizer.eot_id, tokenizer.pad_id)


def test_load_errors_name_the_file(tmp_path, bpe):
    with pytest.raises(InputError, match="tokenizer.json: file not found"):
        Tokenizer.load(tmp_path)
    _, _, out = bpe
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_bytes((out / "tokenizer_config.json").read_bytes())
    (broken / "tokenizer.json").write_text('{"model": "truncated', encoding="utf-8")
    with pytest.raises(InputError, match="broken/tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.load(broken)


def test_config_validation():
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenizerConfig(vocab_size=200)
    TokenizerConfig(kind="char", vocab_size=200)
    with pytest.raises(ConfigError, match="held_out_fraction"):
        TokenizerConfig(held_out_fraction=1.0)
    with pytest.raises(ConfigError, match="kind"):
        TokenizerConfig(kind="wordpiece")
