"""The data pipeline end to end: what is kept, what is removed and why, the shards, resumption, executors."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import llmkit.io
from llmkit.cli import main
from llmkit.data.pipeline import PipelineConfig, run_pipeline
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError, InputError
from llmkit.token_data import load_manifest, open_split
from llmkit.tokenizer import Tokenizer

WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point government "
    "company number group problem fact water house river garden market letter morning evening window table story "
    "music paper family friend teacher student question answer animal forest mountain village city road bridge "
    "doctor summer winter season weather kitchen bread coffee breakfast dinner holiday journey station train "
    "picture colour light sound voice language history science nature country ocean island harbour ship"
).split()
VERBS = (
    "walked found made took gave told asked felt became left kept began seemed helped showed heard played moved lived "
    "believed"
).split()


def english_document(rng: random.Random, sentences: int = 8) -> str:
    """Plain English-like prose that passes the Gopher and C4 rules: stop words, punctuation, no repetition."""
    out = []
    for _ in range(sentences):
        a, b, c = rng.sample(WORDS, 3)
        out.append(
            f"The {a} {rng.choice(VERBS)} to the {b} of the {c}, and that {rng.choice(WORDS)} was with "
            f"{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.randint(2, 999)}."
        )
    return " ".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL web-like source with planted problems, an HTML page, a code file and an evaluation set."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    documents = {f"clean{i}": english_document(rng) for i in range(30)}
    documents["exact_copy"] = "  " + documents["clean0"].upper() + "  "  # same after normalisation
    near = documents["clean1"].split()
    near[-1] = "forty."
    documents["near_copy"] = " ".join(near)
    documents["too_short"] = "The cat and the dog sat."
    documents["with_email"] = english_document(rng) + " Write to jane.doe@example.com for the kitchen story."
    evaluation = "Natalia sold clips to forty eight of her friends in April and then she sold half as many clips in May"
    documents["contaminated"] = english_document(rng) + " " + evaluation + " " + english_document(rng, 2)
    lines = [json.dumps({"text": text, "name": name}) for name, text in documents.items()]
    lines.insert(5, "{not json")
    lines.insert(8, json.dumps({"text": "  \n ", "name": "blank"}))
    (root / "web.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    html_folder = root / "pages"
    html_folder.mkdir()
    page_text = english_document(rng)
    (html_folder / "page.html").write_text(
        f"<!DOCTYPE html><html><head><script>var tracking = 1;</script><style>p {{color: red}}</style></head>"
        f"<body><nav><a href='/'>Home</a> | <a href='/about'>About</a></nav><article><p>{page_text}</p></article>"
        f"<footer>Copyright footer text</footer></body></html>",
        encoding="utf-8",
    )
    (html_folder / "module.py").write_text("def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n", encoding="utf-8")
    (root / "gsm8k_test.jsonl").write_text(
        json.dumps({"question": evaluation + "?", "answer": "72"}) + "\n", encoding="utf-8"
    )
    (root / "tokenizer_corpus.txt").write_text("\n".join(documents.values()), encoding="utf-8")
    train_tokenizer(
        TokenizerConfig(
            source=str(root / "tokenizer_corpus.txt"), out=str(root / "tokenizer"), vocab_size=300, held_out_fraction=0
        )
    )
    return {
        "root": root,
        "documents": documents,
        "page_text": page_text,
        "names": [json.loads(line)["name"] for line in lines if line.startswith('{"')],
    }


def pipeline_config(corpus, out: Path, **changes) -> PipelineConfig:
    root = corpus["root"]
    values = dict(
        sources=[{"name": "web", "path": str(root / "web.jsonl")}, {"name": "pages", "path": str(root / "pages")}],
        steps=[
            "clean",
            "gopher_quality",
            "code_quality",
            "exact_dedup",
            {"minhash_dedup": {"threshold": 0.7}},
            "pii",
            {"decontaminate": {"sets": [str(root / "gsm8k_test.jsonl")]}},
        ],
        tokenizer=str(root / "tokenizer"),
        out=str(out),
        documents_per_shard=7,
        workers=1,
        val_fraction=0.0,
    )
    values.update(changes)
    return PipelineConfig(**values)


def decoded_documents(out: Path, split: str = "train") -> list[str]:
    tokenizer = Tokenizer.load(out / "tokenizer")
    ids = np.concatenate([np.asarray(shard) for shard in open_split(out, split)])
    cuts = np.flatnonzero(ids == tokenizer.eot_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tokenizer.decode(ids[start:end].tolist()) for start, end in zip(starts, cuts)]


def removed_reasons(out: Path) -> dict[str, str]:
    records = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    return {record["id"]: record["reason"] for record in records}


def test_every_planted_problem_is_removed_or_masked_for_its_reason(corpus, tmp_path):
    out = tmp_path / "data"
    summary = run_pipeline(pipeline_config(corpus, out))
    documents, names = corpus["documents"], corpus["names"]
    line_of = {name: f"web.jsonl:{position + 1 + (position >= 5)}" for position, name in enumerate(names)}
    reasons = removed_reasons(out)
    assert reasons[line_of["too_short"]].startswith("gopher_quality:")
    assert reasons[line_of["exact_copy"]] == "exact_dedup"
    assert reasons[line_of["near_copy"]] == "minhash_dedup"
    assert reasons[line_of["contaminated"]] == "decontaminate:gsm8k_test"
    assert len(reasons) == 4

    kept = decoded_documents(out)
    assert len(kept) == len(documents) - 4 + 2  # + the HTML page and the Python module
    assert sorted(kept) == sorted(
        [
            text
            for name, text in documents.items()
            if name not in ("too_short", "exact_copy", "near_copy", "contaminated", "with_email")
        ]
        + [
            documents["with_email"].replace("jane.doe@example.com", "<EMAIL>"),
            corpus["page_text"],
            "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n",
        ]
    )
    assert summary["skipped_records"] == 2 and summary["documents_read"] == len(documents) + 2
    assert summary["documents_kept"] == len(kept)
    manifest = load_manifest(out)
    assert manifest["filter_statistics"]["pii"]["changes"] == {"modified_documents": 1, "masked_email": 1}
    assert manifest["splits"]["train"]["documents"] == len(kept)

    report = (out / "report.md").read_text()
    assert "| exact_dedup | " in report and "decontaminate:gsm8k_test (1)" in report and "2 records skipped" in report
    assert "web.jsonl:6: not valid JSON" in report
    assert (
        (out / "work" / "ingest_errors.txt")
        .read_text()
        .splitlines()[1]
        .endswith("web.jsonl:9: empty document, skipped")
    )
    assert (out / "data_steps.png").stat().st_size > 0 and (out / "data_histograms.png").stat().st_size > 0


def test_prose_rules_leave_code_alone_and_profiles_are_reported(corpus, tmp_path):
    out = tmp_path / "data"
    run_pipeline(pipeline_config(corpus, out, steps=["gopher_quality"]))
    statistics = load_manifest(out)["filter_statistics"]["gopher_quality"]
    assert statistics["skipped_profile"] == 1  # module.py is code: the prose rule never saw it
    assert any(text.startswith("def add") for text in decoded_documents(out))


def test_source_weights_set_epochs_and_validation_is_not_reweighted(corpus, tmp_path):
    out = tmp_path / "data"
    root = corpus["root"]
    sources = [
        {"name": "web", "path": str(root / "web.jsonl"), "weight": 3.0},
        {"name": "pages", "path": str(root / "pages"), "weight": 1.0},
    ]
    summary = run_pipeline(pipeline_config(corpus, out, sources=sources, steps=[], val_fraction=0.2))
    manifest = load_manifest(out)
    web, pages = manifest["mixture"]["web"], manifest["mixture"]["pages"]
    total = web["kept_train_bytes"] + pages["kept_train_bytes"]
    assert web["epochs"] == pytest.approx(0.75 * total / web["kept_train_bytes"], rel=1e-3)
    assert pages["epochs"] == pytest.approx(0.25 * total / pages["kept_train_bytes"], rel=1e-3)
    train_sources = manifest["splits"]["train"]["sources"]
    assert train_sources["web"]["bytes"] == pytest.approx(0.75 * total, rel=0.1)
    assert summary["mixture_epochs"] == {"web": web["epochs"], "pages": pages["epochs"]}
    # validation documents appear once each, whatever the weights
    validation = decoded_documents(out, "val")
    assert len(validation) == len(set(validation)) == manifest["splits"]["val"]["documents"] > 0


def test_length_curriculum_orders_training_documents(corpus, tmp_path):
    out = tmp_path / "data"
    run_pipeline(pipeline_config(corpus, out, steps=["clean"], curriculum="length"))
    lengths = [len(text.encode()) for text in decoded_documents(out)]
    assert lengths == sorted(lengths)


def test_line_dedup_keeps_the_first_copy_of_boilerplate(tmp_path, corpus):
    rng = random.Random(1)
    footer = "Subscribe to our newsletter for more stories every week."
    texts = [english_document(rng, 3) + "\n" + footer + "\n" + english_document(rng, 2) for _ in range(4)]
    source = tmp_path / "blog.jsonl"
    source.write_text("\n".join(json.dumps({"text": text}) for text in texts) + "\n")
    out = tmp_path / "data"
    run_pipeline(
        PipelineConfig(
            sources=[str(source)],
            steps=["line_dedup"],
            tokenizer=str(corpus["root"] / "tokenizer"),
            out=str(out),
            workers=1,
            val_fraction=0.0,
            documents_per_shard=2,
        )
    )
    assert sorted(decoded_documents(out)) == sorted(
        [texts[0]] + [text.replace(footer + "\n", "") for text in texts[1:]]
    )


def test_dialogue_threads_are_rendered_as_reply_trees(tmp_path, corpus):
    messages = [
        {
            "message_id": "a",
            "parent_id": None,
            "message_tree_id": "t1",
            "role": "prompter",
            "text": "How do rivers form?",
        },
        {
            "message_id": "b",
            "parent_id": "a",
            "message_tree_id": "t1",
            "role": "assistant",
            "text": "Rain collects in channels.",
        },
        {
            "message_id": "c",
            "parent_id": "a",
            "message_tree_id": "t1",
            "role": "assistant",
            "text": "Snow melts in spring.",
        },
        {"message_id": "d", "parent_id": "b", "message_tree_id": "t1", "role": "prompter", "text": "Which channels?"},
    ]
    source = tmp_path / "threads.jsonl"
    source.write_text("\n".join(json.dumps(message) for message in messages) + "\n")
    out = tmp_path / "data"
    run_pipeline(
        PipelineConfig(
            sources=[{"name": "chat", "path": str(source), "format": "dialogue"}],
            steps=[],
            tokenizer=str(corpus["root"] / "tokenizer"),
            out=str(out),
            workers=1,
            val_fraction=0.0,
        )
    )
    [text] = decoded_documents(out)
    order = [text.index(message["text"]) for message in messages]
    assert order[0] < order[1] < order[3] < order[2]  # a, its first reply b, b's reply d, then a's second reply c


def test_unknown_step_and_bad_threshold_are_config_errors_naming_them(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"steps\[1\].*dedupe"):
        pipeline_config(corpus, tmp_path, steps=["clean", "dedupe"])
    with pytest.raises(ConfigError, match="threshold"):
        pipeline_config(corpus, tmp_path, steps=[{"minhash_dedup": {"threshold": 1.5}}])
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(
        yaml.safe_dump({"sources": ["stdlib"], "steps": ["clean", {"gopher_quality": {"min_words": -3}}]})
    )
    assert main(["data", "run", str(config_file)]) == 2


def test_a_missing_tokenizer_fails_before_any_work(corpus, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(InputError, match="no_tokenizer/tokenizer.json: file not found"):
        run_pipeline(pipeline_config(corpus, out, tokenizer=str(tmp_path / "no_tokenizer")))
    assert not out.exists()


def test_a_different_pipeline_in_the_same_work_directory_is_refused(corpus, tmp_path):
    out = tmp_path / "data"
    run_pipeline(pipeline_config(corpus, out, steps=["clean"]))
    with pytest.raises(Exception, match="different pipeline"):
        run_pipeline(pipeline_config(corpus, out, steps=["clean", "pii"]))
    run_pipeline(pipeline_config(corpus, out, steps=["clean", "pii"], restart=True))
    assert load_manifest(out)["pipeline"]["steps"] == ["clean", "pii"]


@pytest.mark.slow
def test_dask_executor_in_local_mode_gives_the_same_shards(corpus, tmp_path):
    pytest.importorskip("dask.distributed")
    local, dask = tmp_path / "local", tmp_path / "dask"
    run_pipeline(pipeline_config(corpus, local))
    run_pipeline(pipeline_config(corpus, dask, executor="dask", workers=2))
    assert (local / "train_000.bin").read_bytes() == (dask / "train_000.bin").read_bytes()


@pytest.mark.slow
def test_a_run_killed_half_way_resumes_without_losing_or_duplicating(corpus, tmp_path):
    rng = random.Random(2)
    source = tmp_path / "many.jsonl"
    source.write_text("\n".join(json.dumps({"text": english_document(rng, 4)}) for _ in range(40)) + "\n")
    arguments = [
        "--sources",
        str(source),
        "--steps",
        "clean,language,exact_dedup,pii",
        "--tokenizer",
        str(corpus["root"] / "tokenizer"),
        "--documents-per-shard",
        "1",
        "--workers",
        "1",
        "--val-fraction",
        "0",
    ]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    assert main(["data", "run", "--out", str(reference), *arguments]) == 0

    process = subprocess.Popen(
        [sys.executable, "-m", "llmkit.cli", "data", "run", "--out", str(interrupted), *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = interrupted / "work" / "phase_0" / "shard_00010.stats.json"
    deadline = time.time() + 120
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list((interrupted / "work" / "phase_0").glob("*.stats.json")))
    assert 10 < done < 40, f"the kill should land mid-phase ({done} of 40 shards done)"
    assert not (interrupted / "manifest.json").exists()

    assert main(["data", "run", "--out", str(interrupted), *arguments]) == 0
    assert (interrupted / "train_000.bin").read_bytes() == (reference / "train_000.bin").read_bytes()
    assert load_manifest(interrupted)["splits"]["train"]["documents"] == 40


def test_a_shard_is_on_disk_before_its_statistics_mark_it_done(corpus, tmp_path, monkeypatch):
    """What a power loss needs: each JSONL file of a shard is fsynced, and its folder after the rename,
    before the shard's stats.json (written last: the shard is done) is."""
    synced = []
    fsync = llmkit.io.fsync_path
    monkeypatch.setattr(llmkit.io, "fsync_path", lambda path: synced.append(Path(path)) or fsync(path))
    run_pipeline(pipeline_config(corpus, tmp_path / "out"))
    stats_files = sorted((tmp_path / "out" / "work").glob("phase_*/*.stats.json"))
    assert len(stats_files) > 2
    for stats in stats_files:
        done = next(
            index
            for index, path in enumerate(synced)
            if path.parent == stats.parent and path.name.startswith(f".{stats.name}.")
        )
        for kind in ("kept.jsonl", "removed.jsonl"):
            data = synced.index(stats.parent / stats.name.replace("stats.json", f"{kind}.tmp"))
            assert data < done and stats.parent in synced[data + 1 : done], (stats, kind)
