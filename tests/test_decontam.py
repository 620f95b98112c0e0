import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmkit.data.decontam import ContaminationIndex, DecontaminationConfig, iter_strings
from llmkit.errors import ConfigError, InputError

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
# Words 3-15 of QUESTION (13 words), recased and repunctuated.
PLANTED_13 = "CLIPS to 48 (of her Friends) in April; and then... she sold HALF"
# Words 3-14 (12 words), then a different word.
SHARED_12 = "clips to 48 of her friends in april and then she sold apples"
FILLER = " ".join(f"filler{i}" for i in range(200))
QUIZ_STEM = "Which gas do green plants absorb from the air to make their food by photosynthesis?"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_sets(tmp_path: Path) -> list[str]:
    math = write_jsonl(
        tmp_path / "math.jsonl",
        [{"question": QUESTION, "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"}],
    )
    quiz = tmp_path / "quiz.csv"
    quiz.write_text(f'question,choice0,answer\n"{QUIZ_STEM}",carbon dioxide,0\n', encoding="utf-8")
    return [str(math), str(quiz)]


def reference_matches(texts_by_set: dict[str, list[str]], document: str, ngram: int, min_words: int) -> dict[str, int]:
    """Distinct shared n-grams per set, with tuples of words instead of hashes."""

    def words(text):
        return re.findall(r"\w+", text.lower())

    def grams(word_list, lengths):
        return {tuple(word_list[i : i + k]) for k in lengths for i in range(len(word_list) - k + 1)}

    set_grams = {}
    for name, texts in texts_by_set.items():
        set_grams[name] = set()
        for text in texts:
            text_words = words(text)
            if len(text_words) >= min_words:
                set_grams[name] |= grams(text_words, [min(len(text_words), ngram)])
    document_grams = grams(words(document), range(min_words, ngram + 1))
    counts = {name: len(document_grams & found) for name, found in set_grams.items()}
    return {name: count for name, count in counts.items() if count}


def test_planted_13_gram_is_found_and_reported_per_set(tmp_path):
    index = ContaminationIndex.from_files(write_sets(tmp_path))
    assert index.set_names == ["math", "quiz"]
    assert index.matches(f"{FILLER} {PLANTED_13} {FILLER}") == {"math": 1}
    # 15 consecutive words hold 15 - 13 + 1 = 3 distinct 13-grams.
    assert index.matches(f"{FILLER} clips to 48 of her friends in April and then she sold half as many {FILLER}") == {
        "math": 3
    }
    both = f"{FILLER} {PLANTED_13}. {FILLER} {QUIZ_STEM.upper()} {FILLER}"
    # QUIZ_STEM has 15 words: 3 distinct 13-grams.
    assert index.matches(both) == {"math": 1, "quiz": 3}
    # Repeating a shared n-gram does not count it twice.
    assert index.matches(f"{PLANTED_13} {FILLER} {PLANTED_13}") == {"math": 1}


def test_twelve_shared_words_do_not_match(tmp_path):
    index = ContaminationIndex.from_files(write_sets(tmp_path))
    assert index.matches(f"{FILLER} {SHARED_12} {FILLER}") == {}
    assert index.matches("") == {}


def test_n_is_configurable(tmp_path):
    index = ContaminationIndex.from_files(write_sets(tmp_path), ngram=5, min_words=5)
    # 12 shared words hold 12 - 5 + 1 = 8 distinct 5-grams.
    assert index.matches(f"{FILLER} {SHARED_12} {FILLER}") == {"math": 8}


def test_min_matches_decides_contamination(tmp_path):
    config = DecontaminationConfig(sets=write_sets(tmp_path), min_matches=2)
    index = ContaminationIndex.from_files(config.sets, config.ngram, config.min_words)
    assert not config.is_contaminated(index.matches(f"{FILLER} {PLANTED_13} {FILLER}"))
    assert config.is_contaminated(index.matches(f"{FILLER} {QUIZ_STEM} {FILLER}"))


def test_short_strings_match_whole_and_shorter_ones_are_ignored(tmp_path):
    path = write_jsonl(
        tmp_path / "choices.jsonl",
        [
            {
                "choices": [
                    "a bacterial population growing quickly inside the bloodstream",
                    "carbon dioxide",
                    "A",
                    QUESTION,
                ]
            }
        ],
    )
    index = ContaminationIndex.from_files([str(path)])
    # 9 words (>= min_words 8, < 13): the whole sequence is one n-gram.
    assert index.matches(f"{FILLER} A Bacterial population growing quickly, inside the bloodstream! {FILLER}") == {
        "choices": 1
    }
    assert index.matches(f"{FILLER} a bacterial population growing quickly inside the {FILLER}") == {}
    # Shorter strings (answer labels, two-word choices) would match ordinary text by chance.
    assert index.matches("A student breathes out carbon dioxide.") == {}


def test_every_string_of_nested_records_is_indexed_but_keys_and_numbers_are_not(tmp_path):
    long_key = "this field name is a long sentence of words that should never be indexed"
    record = {
        "id": "hellaswag-1",
        "ctx": "A man is sitting on a roof with a hammer and a box of shingles next to him.",
        "endings": [
            "he starts pulling up roofing from the roof and throwing it to the ground below.",
            "he is using a dry brush to sweep the leaves.",
        ],
        "meta": {
            "source": [{"text": "The video shows a roofer working through a sunny afternoon in the suburbs of town."}]
        },
        "label": 0,
        long_key: "short",
    }
    path = write_jsonl(tmp_path / "hellaswag.jsonl", [record])
    assert list(iter_strings(record)) == [
        "hellaswag-1",
        record["ctx"],
        *record["endings"],
        record["meta"]["source"][0]["text"],
        "short",
    ]
    index = ContaminationIndex.from_files([str(path)])
    for text in [record["ctx"], record["endings"][0], record["meta"]["source"][0]["text"]]:
        assert index.matches(f"{FILLER} {text} {FILLER}").get("hellaswag", 0) >= 1, text
    assert index.matches(f"{FILLER} {long_key} {FILLER}") == {}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt", ".parquet"])
def test_every_format_gives_the_same_index(tmp_path, suffix):
    texts = [QUESTION, QUIZ_STEM]
    path = tmp_path / f"eval{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, [{"text": text} for text in texts])
    elif suffix == ".json":
        path.write_text(json.dumps({"data": [{"text": text} for text in texts]}), encoding="utf-8")
    elif suffix == ".csv":
        path.write_text("text\n" + "".join(f'"{text}"\n' for text in texts), encoding="utf-8")
    elif suffix == ".txt":
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    else:
        pyarrow = pytest.importorskip("pyarrow")
        pytest.importorskip("pyarrow.parquet")

        pyarrow.parquet.write_table(pyarrow.table({"text": texts, "label": [1, 2]}), path)
    index = ContaminationIndex.from_files([str(path)])
    expected = write_jsonl(tmp_path / "reference.jsonl", [{"text": text} for text in texts])
    reference = ContaminationIndex.from_files([str(expected)])
    assert np.array_equal(index.hashes, reference.hashes)
    assert index.matches(f"{FILLER} {PLANTED_13} {FILLER}") == {"eval": 1}


def test_matches_agree_with_a_tuple_based_reference(tmp_path):
    generator = random.Random(0)
    vocabulary = [f"w{i}" for i in range(12)]  # few words, so shared n-grams are common

    def sentence(length):
        return " ".join(generator.choice(vocabulary) for _ in range(length))

    texts_by_set = {name: [sentence(generator.randint(1, 30)) for _ in range(40)] for name in ("alpha", "beta")}
    paths = [
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": text} for text in texts])
        for name, texts in texts_by_set.items()
    ]
    ngram, min_words = 6, 3
    index = ContaminationIndex.from_files([str(path) for path in paths], ngram=ngram, min_words=min_words)
    for _ in range(50):
        document = sentence(generator.randint(0, 60))
        assert index.matches(document) == reference_matches(texts_by_set, document, ngram, min_words), document


def test_save_and_load_round_trip(tmp_path):
    index = ContaminationIndex.from_files(write_sets(tmp_path))
    index.save(tmp_path / "index" / "contamination.npz")
    loaded = ContaminationIndex.load(tmp_path / "index" / "contamination.npz")
    assert np.array_equal(loaded.hashes, index.hashes) and np.array_equal(loaded.set_ids, index.set_ids)
    assert (loaded.set_names, loaded.ngram, loaded.min_words, loaded.lengths) == (
        index.set_names,
        index.ngram,
        index.min_words,
        index.lengths,
    )
    document = f"{FILLER} {PLANTED_13} {QUIZ_STEM}"
    assert loaded.matches(document) == index.matches(document) == {"math": 1, "quiz": 3}
    assert [path.name for path in (tmp_path / "index").iterdir()] == ["contamination.npz"]  # no temporary file left


def test_hashes_are_the_same_in_another_process(tmp_path):
    paths = write_sets(tmp_path)
    script = (
        "import sys; from llmkit.data.decontam import ContaminationIndex; "
        "ContaminationIndex.from_files(sys.argv[2:]).save(sys.argv[1])"
    )
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "other.npz"), *paths], check=True, env=environment)
    other = ContaminationIndex.load(tmp_path / "other.npz")
    assert np.array_equal(other.hashes, ContaminationIndex.from_files(paths).hashes)


def test_a_hash_shared_by_two_sets_counts_for_both(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [{"q": QUESTION}])
    second = write_jsonl(tmp_path / "second.jsonl", [{"q": QUESTION + " Extra words follow."}])
    index = ContaminationIndex.from_files([str(first), str(second)])
    assert index.matches(PLANTED_13) == {"first": 1, "second": 1}


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("eval.jsonl", json.dumps({"q": QUESTION}) + "\n{broken\n", r"eval.jsonl:2: not valid JSON"),
        ("eval.jsonl", json.dumps({"q": QUESTION}) + "\n[1, 2]\n", r"eval.jsonl:2: expected a JSON object"),
        ("eval.json", '{"q": "unterminated', r"eval.json:1: not valid JSON"),
        (
            "eval.csv",
            f'question,answer\n"{QUESTION}",1\nonly one field\n',
            r"eval.csv:3: 1 fields, but the header has 2",
        ),
        ("eval.csv", 'question\n"unterminated\n', r"eval.csv:\d+: not valid CSV"),
        ("eval.xml", "<q/>", r"eval.xml: unsupported evaluation file suffix '.xml'"),
        ("eval.jsonl", json.dumps({"q": "too short", "label": "A"}) + "\n", r"eval.jsonl: no text of at least 8 words"),
    ],
)
def test_bad_evaluation_files_name_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=expected):
        ContaminationIndex.from_files([str(path)])


def test_missing_file_and_duplicate_set_names_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="absent.jsonl: evaluation file not found"):
        ContaminationIndex.from_files([str(tmp_path / "absent.jsonl")])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [str(write_jsonl(tmp_path / folder / "test.jsonl", [{"q": QUESTION}])) for folder in ("a", "b")]
    with pytest.raises(InputError, match="b/test.jsonl: another evaluation file is also named 'test'"):
        ContaminationIndex.from_files(paths)


def test_loading_a_missing_or_foreign_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="contamination index not found"):
        ContaminationIndex.load(tmp_path / "absent.npz")
    (tmp_path / "foreign.npz").write_bytes(b"not a zip archive")
    with pytest.raises(InputError, match="foreign.npz: not a valid contamination index"):
        ContaminationIndex.load(tmp_path / "foreign.npz")


@pytest.mark.parametrize(
    "values, field",
    [
        ({"sets": []}, "sets"),
        ({"sets": ["eval.xml"]}, "sets"),
        ({"sets": ["eval.jsonl"], "ngram": 0}, "ngram"),
        ({"sets": ["eval.jsonl"], "min_words": 14}, "min_words"),
        ({"sets": ["eval.jsonl"], "min_matches": 0}, "min_matches"),
    ],
)
def test_config_errors_name_the_field(values, field):
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        DecontaminationConfig(**values)


def test_config_accepts_comma_separated_sets():
    assert DecontaminationConfig(sets="a.jsonl, b.csv").sets == ["a.jsonl", "b.csv"]


@pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason=f"shared GSM8K data not found at {GSM8K_TRAIN}")
def test_real_gsm8k_question_planted_in_a_document_is_found():
    index = ContaminationIndex.from_files([str(GSM8K_TRAIN)])
    record = json.loads(GSM8K_TRAIN.read_text(encoding="utf-8").splitlines()[100])
    words = re.findall(r"\w+", record["question"].lower())
    expected = len({tuple(words[i : i + 13]) for i in range(len(words) - 12)})
    document = f"Worksheet for Monday.\n\n{record['question']}\n\nShow your work below. {FILLER}"
    assert index.matches(document) == {"train": expected}
    assert index.matches(f"To be, or not to be, that is the question. {FILLER}") == {}
