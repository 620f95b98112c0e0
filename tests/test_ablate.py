"""`llmkit ablate`: equal budgets, the table against its JSON, resuming, and errors that name the variant."""

import csv
import json
import math
import os
import random
import signal
import statistics

import pytest
from PIL import Image

from llmkit.cli import main
from llmkit.data.shards import PrepareConfig, prepare_data
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError
from llmkit.model import ModelConfig, Transformer
from llmkit.plan.ablate import AblateConfig, Variant, ablate, parse_variant
from llmkit.train.batches import TokenBatches

TINY = dict(n_layer=1, n_embd=16, n_head=2, context_length=16)  # on top of cpu-tiny
BATCH = 4
TOKENS_PER_STEP = BATCH * TINY["context_length"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ablate_data")
    words = "the cat sat on a mat while one dog ran far from home".split()
    generator = random.Random(0)
    (folder / "corpus.txt").write_text(
        "\n".join(" ".join(generator.choice(words) for _ in range(10)) for _ in range(400))
    )
    train_tokenizer(
        TokenizerConfig(
            source=str(folder / "corpus.txt"), out=str(folder / "tok"), kind="char", vocab_size=64, held_out_fraction=0
        )
    )
    prepare_data(
        PrepareConfig(
            source=str(folder / "corpus.txt"),
            tokenizer=str(folder / "tok"),
            out=str(folder / "data"),
            val_fraction=0.2,
            split="tail",
            workers=1,
        )
    )
    return str(folder / "data")


def config(data, out, variants, **changes) -> AblateConfig:
    values = dict(
        data=data,
        out=str(out),
        preset="cpu-tiny",
        variants=variants,
        max_tokens=6 * TOKENS_PER_STEP,
        batch_size=BATCH,
        lr=3e-3,
        warmup_steps=2,
        eval_interval=2,
        eval_batches=1,
        dtype="float32",
        device="cpu",
        progress=False,
        seed=3,
    )
    values.update(changes)
    return AblateConfig(**values)


def token_variants() -> list:
    return [
        {"name": "base", "model": TINY, "repeats": 2},
        {"name": "layernorm", "model": {**TINY, "norm": "layernorm"}},
        {"name": "post", "model": {**TINY, "norm_placement": "post"}, "train": {"lr": 2e-3}},
    ]


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    return out, ablate(config(data, out, token_variants()))


def metrics_rows(directory) -> list[dict]:
    with open(directory / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def table_rows(markdown: str) -> dict[str, list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    return {cells[0]: cells for cells in ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)}


def test_tiny_ablation_writes_table_json_and_plot_on_an_equal_token_budget(finished):
    out, summary = finished
    on_disk = json.loads((out / "ablation.json").read_text())
    assert [row["name"] for row in on_disk["variants"]] == ["base", "layernorm", "post"]
    assert [len(row["runs"]) for row in on_disk["variants"]] == [2, 1, 1]
    for row in on_disk["variants"]:
        for run in row["runs"]:
            rows = metrics_rows(out / "runs" / row["name"] / f"seed_{run['seed']}")
            # every run trained exactly the budget, and its final validation is the last row of its own metrics.csv
            assert int(rows[-1]["tokens"]) == run["tokens"] == 6 * TOKENS_PER_STEP and rows[-1]["event"] == "end"
            assert float(rows[-1]["val_bpb"]) == pytest.approx(run["val_bpb"], abs=1e-4)
            assert [point["tokens"] for point in run["curve"]] == [k * 2 * TOKENS_PER_STEP for k in (1, 2, 3)]
    assert [run["seed"] for run in on_disk["variants"][0]["runs"]] == [3, 4]
    with Image.open(out / "ablation.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 300  # two panels side by side
    assert "![validation curves](ablation.png)" in (out / "ablation.md").read_text()


def test_table_delta_and_noise_equal_the_hand_computation_from_the_json(finished):
    out, _ = finished
    on_disk = json.loads((out / "ablation.json").read_text())
    table = table_rows((out / "ablation.md").read_text())
    base, *others = on_disk["variants"]
    base_bpb = [run["val_bpb"] for run in base["runs"]]
    assert base["val_bpb"] == pytest.approx(statistics.fmean(base_bpb), abs=1e-5)
    sigma = statistics.stdev(base_bpb)  # the only variant with two seeds
    assert on_disk["seed_noise_val_bpb"] == pytest.approx(sigma, abs=1e-5)
    assert table["base"][9] == f"{base['val_bpb']:.4f} ± {base['val_bpb_std']:.4f}" and table["base"][10] == "+0.0000"
    for row in others:
        delta = row["runs"][0]["val_bpb"] - base["val_bpb"]
        assert float(table[row["name"]][10]) == pytest.approx(delta, abs=0.5e-4 + 1e-9)
        assert float(table[row["name"]][11]) == pytest.approx(
            delta / (sigma * math.sqrt(1 + 1 / 2)), abs=0.05 + 1e-3 * abs(delta / sigma)
        )
        assert table[row["name"]][4] == f"{6 * TOKENS_PER_STEP:,}"


def test_rerun_skips_finished_runs_and_refuses_a_changed_variant(data, finished):
    out, _ = finished
    results = sorted(out.glob("runs/*/seed_*/result.json"))
    before = {path: (path.stat().st_mtime_ns, (path.parent / "metrics.csv").stat().st_mtime_ns) for path in results}
    extended = token_variants() + [{"name": "learned", "model": {**TINY, "position": "learned"}}]
    again = ablate(config(data, out, extended))
    assert {
        path: (path.stat().st_mtime_ns, (path.parent / "metrics.csv").stat().st_mtime_ns) for path in results
    } == before
    assert (out / "runs/learned/seed_3/result.json").is_file() and len(again["variants"]) == 4
    changed = token_variants()
    changed[2]["train"] = {"lr": 1e-3}
    with pytest.raises(ConfigError, match=r"variants\[post\]\.train\.lr' = 0\.001.*with 0\.002"):
        ablate(config(data, out, changed))


def test_an_interrupted_ablation_resumes_to_the_uninterrupted_result(data, finished, tmp_path, monkeypatch):
    out, summary = finished
    straight = summary["variants"][2]["runs"][0]  # "post", trained without interruption
    original, interrupted = TokenBatches.get_batch, []

    def interrupt_at_step_three(self, index):
        if index == 3 and not interrupted:
            interrupted.append(index)
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return original(self, index)

    monkeypatch.setattr(TokenBatches, "get_batch", interrupt_at_step_three)
    variants = [token_variants()[2]]
    with pytest.raises(KeyboardInterrupt):
        ablate(config(data, tmp_path, variants))
    assert not (tmp_path / "runs/post/seed_3/result.json").exists() and (tmp_path / "runs/post/seed_3/latest").is_file()
    monkeypatch.setattr(TokenBatches, "get_batch", original)
    resumed = ablate(config(data, tmp_path, variants))["variants"][0]["runs"][0]
    assert (resumed["tokens"], resumed["val_bpb"]) == (straight["tokens"], straight["val_bpb"])
    assert [point["val_loss"] for point in resumed["curve"]] == [point["val_loss"] for point in straight["curve"]]


def test_a_flops_budget_becomes_a_token_budget_per_variant(data, tmp_path):
    wide = {**TINY, "n_embd": 32}
    moe = {**TINY, "moe_experts": 4, "moe_top_k": 1, "ffn_hidden": 64}
    budget = 1.5e7
    summary = ablate(
        config(
            data,
            tmp_path,
            [
                {"name": "narrow", "model": {**TINY, "ffn_hidden": 64}},
                {"name": "wide", "model": wide},
                {"name": "moe", "model": moe},
            ],
            max_tokens=None,
            max_flops=budget,
        )
    )
    rows = {row["name"]: row for row in summary["variants"]}
    for name, row in rows.items():
        run = row["runs"][0]
        model = Transformer(ModelConfig(**run["config"]["model"]))
        flops_per_token = model.flops_per_token()
        assert run["flops_per_token"] == pytest.approx(flops_per_token)
        trained = int(metrics_rows(tmp_path / "runs" / name / "seed_3")[-1]["tokens"])
        assert trained == run["tokens"] and trained % TOKENS_PER_STEP == 0
        assert abs(flops_per_token * trained - budget) <= flops_per_token * TOKENS_PER_STEP / 2  # whole steps
        assert row["flops"] == pytest.approx(flops_per_token * trained)
    # dense, no embeddings in the matmuls but a tied head: 6·(N_non-embedding + V·d) + 12·l·d·T
    narrow = rows["narrow"]
    vocab = narrow["runs"][0]["config"]["model"]["vocab_size"]
    assert narrow["flops_per_token"] == 6 * (narrow["non_embedding_parameters"] + vocab * 16) + 12 * 1 * 16 * 16
    assert rows["wide"]["tokens"] < narrow["tokens"]
    # top-1 of 4 experts as wide as the dense feed-forward: the same active weights plus the router (d·experts)
    assert rows["moe"]["active_non_embedding_parameters"] == narrow["non_embedding_parameters"] + 16 * 4
    assert rows["moe"]["non_embedding_parameters"] > 3 * narrow["non_embedding_parameters"] // 2
    assert "converted to a token budget per variant" in (tmp_path / "ablation.md").read_text()


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"name": "typo", "model": {"norm_placment": "post"}}, r"variants\[typo\]\.model\.norm_placment"),
        ({"name": "bad", "model": {"norm_placement": "middle"}}, r"variants\[bad\]\.model\.norm_placement.*one of"),
        ({"name": "odd", "model": {"n_embd": 30, "n_head": 4}}, r"variants\[odd\]\.model\.n_embd"),
        ({"name": "slow", "train": {"lr_typo": 1}}, r"variants\[slow\]\.train\.lr_typo"),
        ({"name": "lucky", "train": {"seed": 5}}, r"variants\[lucky\]\.train\.seed.*shared"),
        ({"name": "extra", "models": {}}, r"variants\[extra\]\.models"),
        ("cli:moe_experts=4 nonsense=1", r"variants\[cli\]\.nonsense"),
    ],
)
def test_a_bad_variant_is_a_config_error_naming_it(data, tmp_path, variant, message):
    with pytest.raises(ConfigError, match=message):
        config(data, tmp_path, [{"name": "base"}, variant])


def test_budget_and_names_are_checked(data, tmp_path):
    with pytest.raises(ConfigError, match="exactly one budget"):
        config(data, tmp_path, ["a"], max_flops=1e9)
    with pytest.raises(ConfigError, match="two variants have this name"):
        config(data, tmp_path, ["a", "a:norm=layernorm"])
    with pytest.raises(ConfigError, match="folder"):
        config(data, tmp_path, ["../escape"])


def test_compact_command_line_variants(data, tmp_path, capsys):
    variant = parse_variant("moe:moe_experts=4 moe_top_k=1 lr=3e-3 repeats=2")
    assert variant == Variant(name="moe", model={"moe_experts": "4", "moe_top_k": "1"}, train={"lr": "3e-3"}, repeats=2)
    assert (
        main(
            [
                "ablate",
                "--data",
                data,
                "--out",
                str(tmp_path),
                "--max-tokens",
                "100",
                "--variants",
                "base,post:norm_placement=post colour=red",
            ]
        )
        == 2
    )
    assert "variants[post].colour" in capsys.readouterr().err
