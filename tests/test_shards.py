import json
import random

import numpy as np
import pytest

from llmkit.data import shards
from llmkit.data.shards import PrepareConfig, prepare_data
from llmkit.data.sources import is_held_out, iter_documents
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError, InputError, MismatchError
from llmkit.token_data import check_tokenizer, load_manifest, open_split, token_dtype
from llmkit.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa λάμδα 東京 😀 def return print(x)".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources: a JSONL file of 120 varied documents and a folder of text files."""
    folder = tmp_path_factory.mktemp("corpus")
    generator = random.Random(0)
    with open(folder / "records.jsonl", "w", encoding="utf-8") as file:
        for _ in range(120):
            text = " ".join(generator.choice(WORDS) for _ in range(generator.randint(1, 60)))
            file.write(json.dumps({"text": text}) + "\n")
    (folder / "texts").mkdir()
    for index in range(5):
        (folder / "texts" / f"{index}.txt").write_text(f"text file {index}\n" * (index + 1), encoding="utf-8")
    return f"{folder / 'records.jsonl'},{folder / 'texts'}"


@pytest.fixture(scope="module")
def tokenizer_directory(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TokenizerConfig(source=corpus, out=str(out), vocab_size=320))
    return str(out)


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer_directory, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    manifest = prepare_data(
        PrepareConfig(
            source=corpus, tokenizer=tokenizer_directory, out=str(out), val_fraction=0.2, shard_tokens=500, workers=1
        )
    )
    return manifest, out


def read_split(directory, split) -> np.ndarray:
    return np.concatenate([np.asarray(shard) for shard in open_split(directory, split)])


def test_shards_hold_each_document_then_the_document_token(corpus, tokenizer_directory, prepared):
    manifest, out = prepared
    tokenizer = Tokenizer.load(tokenizer_directory)
    # Independent recompute: encode every document one by one, append <|endoftext|>, split by the id hash.
    expected = {"train": [], "val": []}
    for document in iter_documents(corpus):
        split = "val" if is_held_out(document.id, 0.2) else "train"
        expected[split] += tokenizer.encode(document.text) + [tokenizer.eot_id]
    assert expected["val"] and expected["train"]
    for split in ("train", "val"):
        assert read_split(out, split).tolist() == expected[split]
        assert manifest["splits"][split]["tokens"] == len(expected[split])
    assert manifest["eot_id"] == 0 and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == tokenizer.sha256


def test_manifest_counts_match_the_files_and_the_sources(corpus, prepared):
    manifest, out = prepared
    assert manifest == {**load_manifest(out), "seconds": manifest["seconds"]}
    for split, statistics in manifest["splits"].items():
        shards = statistics["shards"]
        assert [shard["file"] for shard in shards] == [f"{split}_{index:03d}.bin" for index in range(len(shards))]
        for shard in shards:
            assert shard["tokens"] == (out / shard["file"]).stat().st_size // np.dtype(np.uint16).itemsize
            assert shard["tokens"] <= 500
        assert all(shard["tokens"] == 500 for shard in shards[:-1])
        assert statistics["tokens"] == sum(shard["tokens"] for shard in shards)
        for key in ("documents", "tokens", "bytes"):
            assert statistics[key] == sum(per_source[key] for per_source in statistics["sources"].values())
    documents = list(iter_documents(corpus))
    assert manifest["sources"] == corpus.split(",")
    assert sum(statistics["documents"] for statistics in manifest["splits"].values()) == len(documents)
    assert sum(statistics["bytes"] for statistics in manifest["splits"].values()) == sum(
        len(d.text.encode()) for d in documents
    )
    jsonl = corpus.split(",")[0]
    assert sum(s["sources"][jsonl]["documents"] for s in manifest["splits"].values()) == 120


def test_output_is_independent_of_worker_count(corpus, tokenizer_directory, prepared, tmp_path, monkeypatch):
    manifest, out = prepared
    # Many small chunks, so two workers really interleave and the in-flight queue fills up.
    monkeypatch.setattr(shards, "CHUNK_CHARACTERS", 64)
    parallel = prepare_data(
        PrepareConfig(
            source=corpus,
            tokenizer=tokenizer_directory,
            out=str(tmp_path),
            val_fraction=0.2,
            shard_tokens=500,
            workers=2,
        )
    )
    assert parallel["splits"] == manifest["splits"]
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            assert (tmp_path / shard["file"]).read_bytes() == (out / shard["file"]).read_bytes()


def test_rerun_replaces_old_shards(corpus, tokenizer_directory, tmp_path):
    config = dict(source=corpus, tokenizer=tokenizer_directory, out=str(tmp_path), val_fraction=0.2, workers=1)
    small_shards = prepare_data(PrepareConfig(**config, shard_tokens=300))
    assert len(small_shards["splits"]["train"]["shards"]) > 1
    prepare_data(PrepareConfig(**config, shard_tokens=1_000_000))
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "manifest.json",
        "tokenizer",
        "train_000.bin",
        "val_000.bin",
    ]


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(8192) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32
    assert token_dtype(200_000).itemsize == 4


def test_mismatched_tokenizer_is_refused(corpus, prepared, tmp_path):
    manifest, out = prepared
    other_directory = tmp_path / "other"
    train_tokenizer(TokenizerConfig(source=corpus, out=str(other_directory), vocab_size=300))
    other = Tokenizer.load(other_directory)
    with pytest.raises(MismatchError) as error:
        check_tokenizer(manifest, other)
    message = str(error.value)
    assert manifest["tokenizer"]["sha256"][:12] in message and other.sha256[:12] in message
    assert "vocab 300" in message and f"vocab {manifest['vocab_size']}" in message
    check_tokenizer(manifest, Tokenizer.load(out / manifest["tokenizer"]["path"]))  # the data's own copy


def test_damaged_data_directory_errors_name_the_file(prepared, tmp_path):
    manifest, out = prepared
    with pytest.raises(InputError, match="manifest.json: file not found"):
        load_manifest(tmp_path)
    for shard in manifest["splits"]["train"]["shards"]:
        (tmp_path / shard["file"]).write_bytes((out / shard["file"]).read_bytes())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "splits": {"train": manifest["splits"]["train"]}}))
    assert len(read_split(tmp_path, "train")) == manifest["splits"]["train"]["tokens"]
    with pytest.raises(InputError, match="no split 'val'"):
        open_split(tmp_path, "val")
    (tmp_path / "train_001.bin").write_bytes(b"\x00\x00" * 10)
    with pytest.raises(InputError, match=r"train_001.bin: 20 bytes, .*manifest.json says 1000"):
        load_manifest(tmp_path)
    (tmp_path / "train_001.bin").unlink()
    with pytest.raises(InputError, match="train_001.bin: shard listed in .* is missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(InputError, match="malformed manifest"):
        load_manifest(tmp_path)


def test_empty_split_is_an_error(corpus, tokenizer_directory, tmp_path):
    prepare_data(
        PrepareConfig(source=corpus, tokenizer=tokenizer_directory, out=str(tmp_path), val_fraction=0.0, workers=1)
    )
    shards = open_split(tmp_path, "train")
    assert all(isinstance(shard, np.memmap) and not shard.flags.writeable for shard in shards)
    with pytest.raises(InputError, match="split 'val' has no tokens"):
        open_split(tmp_path, "val")


def test_config_validation():
    with pytest.raises(ConfigError, match="val_fraction"):
        PrepareConfig(val_fraction=1.0)
    with pytest.raises(ConfigError, match="workers"):
        PrepareConfig(workers=-1)


def test_failed_run_leaves_the_previous_data_directory_intact(corpus, tokenizer_directory, prepared, tmp_path):
    manifest, out = prepared
    for path in out.iterdir():
        if path.is_file():
            (tmp_path / path.name).write_bytes(path.read_bytes())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="bad.jsonl:2: missing field 'text'"):
        prepare_data(
            PrepareConfig(source=f"{corpus},{bad}", tokenizer=tokenizer_directory, out=str(tmp_path), workers=2)
        )
    assert not list(tmp_path.glob(".*.tmp"))
    assert load_manifest(tmp_path)["splits"] == manifest["splits"]
    assert (tmp_path / "train_000.bin").read_bytes() == (out / "train_000.bin").read_bytes()


def test_tail_split_holds_out_the_end_of_each_document(tmp_path):
    from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
    from llmkit.tokenizer import Tokenizer

    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(1000))
    (tmp_path / "corpus.txt").write_text(text)
    train_tokenizer(
        TokenizerConfig(
            source=str(tmp_path / "corpus.txt"),
            out=str(tmp_path / "tok"),
            kind="char",
            vocab_size=64,
            held_out_fraction=0,
        )
    )
    manifest = prepare_data(
        PrepareConfig(
            source=str(tmp_path / "corpus.txt"),
            tokenizer=str(tmp_path / "tok"),
            out=str(tmp_path / "data"),
            val_fraction=0.1,
            split="tail",
            workers=1,
        )
    )
    tokenizer = Tokenizer.load(tmp_path / "tok")
    train, val = (np.concatenate(open_split(tmp_path / "data", split)).tolist() for split in ("train", "val"))
    eot = tokenizer.eot_id
    assert train == tokenizer.encode(text[:900]) + [eot]
    assert val == tokenizer.encode(text[900:]) + [eot]
    assert manifest["splits"]["val"]["bytes"] == 100 and manifest["split"] == "tail"


def test_shakespeare_char_split_matches_nanogpt(tmp_path, shared_data):
    """nanoGPT's shakespeare_char/prepare.py reports 65 characters, 1,003,854 train and 111,540 val tokens."""
    source = str(shared_data / "tinyshakespeare" / "input.txt")
    summary = train_tokenizer(
        TokenizerConfig(source=source, out=str(tmp_path / "tok"), kind="char", vocab_size=128, held_out_fraction=0)
    )
    from llmkit.tokenizer import SPECIAL_TOKENS

    assert summary["vocab_size"] - len(SPECIAL_TOKENS) == 65
    manifest = prepare_data(
        PrepareConfig(
            source=source,
            tokenizer=str(tmp_path / "tok"),
            out=str(tmp_path / "data"),
            val_fraction=0.1,
            split="tail",
            workers=1,
        )
    )
    # +1: the end-of-text token after each part
    assert manifest["splits"]["train"]["tokens"] == 1_003_854 + 1
    assert manifest["splits"]["val"]["tokens"] == 111_540 + 1
