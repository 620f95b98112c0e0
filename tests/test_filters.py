import base64
import importlib
import inspect
from dataclasses import replace
from itertools import cycle, islice

import pytest

from llmkit.config import build
from llmkit.data.filters import (
    C4Config,
    CodeConfig,
    GopherQualityConfig,
    KeywordConfig,
    c4,
    code_quality,
    gopher_quality,
    keyword_filter,
    split_words,
    text_statistics,
)
from llmkit.data.repetition import GopherRepetitionConfig, gopher_repetition
from llmkit.errors import ConfigError

GOPHER = GopherQualityConfig()
C4 = C4Config()
CODE = CodeConfig()

# Mean word length 53/14, two stop words per cycle, every word alphabetic.
VOCABULARY = "the cat sat on a warm mat and watched birds fly over quiet gardens".split()
ENGLISH = """The old mill stood at the edge of the village for more than two hundred years.
Every spring the river rose and turned its wheel faster than the miller could manage.
Children from the nearby farms came to watch the water pour over the stones.
In the autumn the farmers brought their grain, and the air smelled of flour and rain.
When the last miller retired, the town council decided to keep the building as a museum."""


LINE = "the old miller watched the river"  # 6 words of mean length 4.5


def words(count: int, vocabulary=VOCABULARY) -> list[str]:
    return list(islice(cycle(vocabulary), count))


def prose(count: int) -> str:
    return " ".join(words(count))


# --- words and statistics -------------------------------------------------------------


def test_words_are_whitespace_tokens_as_written():
    assert split_words("The cat,\tsat...\n\n  - on 12\u00a0mats") == ["The", "cat,", "sat...", "-", "on", "12", "mats"]


def test_text_statistics_hand_computed():
    text = "The cat sat.\n\n  - on 12 mats"
    statistics = text_statistics(text)
    # Words: The cat sat. - on 12 mats -> lengths 3 3 4 1 2 2 4; with a letter: 5 of 7.
    assert statistics == {
        "characters": len(text),
        "lines": 2,
        "words": 7,
        "mean_word_length": 19 / 7,
        "alphabetic_word_fraction": 5 / 7,
    }
    assert text_statistics("") == {
        "characters": 0,
        "lines": 0,
        "words": 0,
        "mean_word_length": 0.0,
        "alphabetic_word_fraction": 0.0,
    }


# --- Gopher quality ---------------------------------------------------------------------


def test_gopher_defaults_are_the_papers():
    assert (GOPHER.min_words, GOPHER.max_words) == (50, 100_000)
    assert (GOPHER.min_mean_word_length, GOPHER.max_mean_word_length) == (3, 10)
    assert (GOPHER.max_symbol_to_word_ratio, GOPHER.max_bullet_line_fraction, GOPHER.max_ellipsis_line_fraction) == (
        0.1,
        0.9,
        0.3,
    )
    assert (GOPHER.min_alphabetic_word_fraction, GOPHER.min_stop_words) == (0.8, 2)
    assert set(GOPHER.stop_words) == {"the", "be", "to", "of", "and", "that", "have", "with"}


def test_natural_english_passes_every_default_filter():
    assert gopher_quality(ENGLISH, GOPHER) is None
    assert gopher_repetition(ENGLISH, GopherRepetitionConfig()) is None
    assert keyword_filter(ENGLISH, KeywordConfig()) is None
    result = c4(ENGLISH, C4)
    assert (result.reason, result.text, result.lines_removed) == (None, ENGLISH, {})


def test_gopher_word_count_bounds():
    assert gopher_quality(prose(50), GOPHER) is None
    assert gopher_quality(prose(49), GOPHER) == "gopher_quality:word_count"
    assert gopher_quality(prose(100_000), GOPHER) is None
    assert gopher_quality(prose(100_001), GOPHER) == "gopher_quality:word_count"
    assert gopher_quality(prose(49), replace(GOPHER, min_words=49)) is None
    assert gopher_quality(prose(49), replace(GOPHER, min_words=None)) is None
    assert gopher_quality(prose(61), replace(GOPHER, max_words=60)) == "gopher_quality:word_count"


def test_gopher_mean_word_length_bounds():
    shortest = ["the", "and"] + ["cat"] * 48  # 150 characters / 50 words = 3.0
    assert gopher_quality(" ".join(shortest), GOPHER) is None
    too_short = ["the", "and"] + ["cat"] * 47 + ["at"]  # 149 / 50 = 2.98
    assert gopher_quality(" ".join(too_short), GOPHER) == "gopher_quality:mean_word_length"
    assert gopher_quality(" ".join(too_short), replace(GOPHER, min_mean_word_length=2.98)) is None
    longest = ["the", "and"] + ["abcdefghij"] * 47 + ["x" * 24]  # 6 + 470 + 24 = 500 / 50 = 10.0
    assert gopher_quality(" ".join(longest), GOPHER) is None
    too_long = longest[:-1] + ["x" * 25]  # 501 / 50 = 10.02
    assert gopher_quality(" ".join(too_long), GOPHER) == "gopher_quality:mean_word_length"
    assert gopher_quality(" ".join(too_long), replace(GOPHER, max_mean_word_length=10.02)) is None


@pytest.mark.parametrize("symbol", ["#", "...", "…"])
def test_gopher_symbol_to_word_ratio(symbol):
    def document(symbols: int) -> str:
        tokens = words(50)
        for index in range(symbols):  # attached to a word mid-line: neither a new word nor an ellipsis line end
            tokens[2 + 3 * index] += symbol
        return " ".join(tokens)

    assert gopher_quality(document(5), GOPHER) is None  # 5 / 50 = 0.1
    assert gopher_quality(document(6), GOPHER) == "gopher_quality:symbol_to_word_ratio"  # 0.12
    assert gopher_quality(document(6), replace(GOPHER, max_symbol_to_word_ratio=0.12)) is None


def test_gopher_bullet_lines_ignore_blank_lines():
    def document(bullets: int, blank_lines: int = 0) -> str:
        lines = [("•", "-", "*")[index % 3] + " " + LINE if index < bullets else LINE for index in range(20)]
        return "\n".join(lines) + "\n" * (blank_lines + 1)

    assert gopher_quality(document(18), GOPHER) is None  # 18 / 20 = 0.9
    assert gopher_quality(document(19), GOPHER) == "gopher_quality:bullet_lines"  # 0.95
    # Counting blank lines would give 19 / 30 and let it through.
    assert gopher_quality(document(19, blank_lines=10), GOPHER) == "gopher_quality:bullet_lines"
    assert gopher_quality(document(19), replace(GOPHER, max_bullet_line_fraction=0.95)) is None
    assert gopher_quality(document(19), replace(GOPHER, bullet_characters="+")) is None


def test_gopher_ellipsis_lines():
    def document(ellipsis_lines: int) -> str:
        endings = ["...", "…"]
        return "\n".join(LINE + (endings[index % 2] if index < ellipsis_lines else ".") for index in range(10))

    assert gopher_quality(document(3), GOPHER) is None  # 3 / 10 = 0.3
    assert gopher_quality(document(4), GOPHER) == "gopher_quality:ellipsis_lines"
    assert gopher_quality(document(4), replace(GOPHER, max_ellipsis_line_fraction=0.4)) is None


def test_gopher_alphabetic_word_fraction():
    def document(numbers: int) -> str:
        return " ".join(words(50 - numbers) + ["1984"] * numbers)

    assert gopher_quality(document(10), GOPHER) is None  # 40 / 50 = 0.8
    assert gopher_quality(document(11), GOPHER) == "gopher_quality:alphabetic_words"  # 0.78
    assert gopher_quality(document(11), replace(GOPHER, min_alphabetic_word_fraction=0.78)) is None
    symbols = " ".join(words(39) + ["="] * 11)  # a token of symbols alone is a word without a letter
    assert gopher_quality(symbols, GOPHER) == "gopher_quality:alphabetic_words"


def test_gopher_stop_words_counted_ignoring_case_and_punctuation():
    plain = "cats sit on warm mats watching birds fly over quiet gardens".split()
    assert gopher_quality(" ".join(["The"] + words(49, plain)), GOPHER) == "gopher_quality:stop_words"
    assert gopher_quality(" ".join(["The"] + words(48, plain) + ["with."]), GOPHER) is None
    assert gopher_quality(" ".join(["the"] + words(48, plain) + ["the"]), GOPHER) is None  # occurrences count
    assert gopher_quality(" ".join(["The"] + words(49, plain)), replace(GOPHER, min_stop_words=1)) is None
    assert (
        gopher_quality(" ".join(["cats"] + words(49, plain)), replace(GOPHER, stop_words=("Cats",), min_stop_words=1))
        is None
    )


# --- C4 ---------------------------------------------------------------------------------

SENTENCES = [
    "The river runs past the old mill.",
    "Children play in the meadow every summer.",
    "Nobody remembers who built the stone bridge.",
]


def page(*extra_lines: str) -> str:
    return "\n".join([*SENTENCES, *extra_lines])


def test_c4_keeps_clean_page_and_skips_blank_lines():
    result = c4("\n\n".join(SENTENCES) + "\n", C4)
    assert (result.reason, result.text, result.lines_removed) == (None, "\n".join(SENTENCES), {})


def test_c4_terminal_punctuation():
    quoted = 'She said "meet me by the bridge"'
    result = c4(page("Read more about the old mill", "He called it a day and left...", quoted), C4)
    assert result.reason is None
    assert result.text == page(quoted)
    assert result.lines_removed == {"terminal_punctuation": 2}
    assert c4(page("Read more about the old mill"), replace(C4, require_terminal_punctuation=False)).text == page(
        "Read more about the old mill"
    )
    assert c4(page(quoted), replace(C4, terminal_punctuation=".")).lines_removed == {"terminal_punctuation": 1}


def test_c4_min_words_per_line():
    result = c4(page("Just four words here.", "Exactly five words are here."), C4)
    assert result.text == page("Exactly five words are here.")
    assert result.lines_removed == {"min_words_per_line": 1}
    assert c4(page("Just four words here."), replace(C4, min_words_per_line=4)).text == page("Just four words here.")
    assert c4(page("Hi."), replace(C4, min_words_per_line=0)).text == page("Hi.")


def test_c4_max_word_length():
    longest = "A word " + "x" * 1000 + " is here."
    too_long = "A word " + "x" * 1001 + " is here."
    result = c4(page(longest, too_long), C4)
    assert result.text == page(longest)
    assert result.lines_removed == {"max_word_length": 1}
    assert c4(page(too_long), replace(C4, max_word_length=1001)).text == page(too_long)
    assert c4(page(too_long), replace(C4, max_word_length=None)).text == page(too_long)


def test_c4_citations_removed_before_the_punctuation_check():
    cited = "The mill was built in the year 1850.[1] Records agree.[citation needed][edit]"
    result = c4(page(cited), C4)
    assert result.text == page("The mill was built in the year 1850. Records agree.")
    assert c4(page(cited), replace(C4, remove_citations=False)).lines_removed == {"terminal_punctuation": 1}


def test_c4_javascript_lines():
    notice = "Please enable JavaScript to view the comments."
    result = c4(page(notice), C4)
    assert (result.reason, result.text, result.lines_removed) == (None, page(), {"javascript": 1})
    assert c4(page(notice), replace(C4, remove_javascript_lines=False)).text == page(notice)


@pytest.mark.parametrize(
    "phrase", ["terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies"]
)
def test_c4_policy_lines(phrase):
    notice = f"Please read our {phrase.upper()} before you continue."
    result = c4(page(notice), C4)
    assert (result.text, result.lines_removed) == (page(), {"policy": 1})
    assert c4(page(notice), replace(C4, remove_policy_lines=False)).text == page(notice)


def test_c4_lorem_ipsum_drops_the_page_and_returns_it_unchanged():
    text = page("Lorem ipsum dolor sit amet, consectetur adipiscing.")
    assert c4(text, C4).reason == "c4:lorem_ipsum"
    assert c4(text, C4).text == text
    assert c4(text, replace(C4, drop_lorem_ipsum=False)).reason is None


def test_c4_curly_bracket_in_a_kept_line_drops_the_page():
    assert c4(page("The set {a, b} has two elements."), C4).reason == "c4:curly_bracket"
    assert c4(page("The set {a, b} has two elements."), replace(C4, drop_curly_bracket=False)).reason is None
    # As in C4's code, a line already dropped (no terminal punctuation) does not count.
    result = c4(page("function f() { return 1 }"), C4)
    assert (result.reason, result.lines_removed) == (None, {"terminal_punctuation": 1})


def test_c4_bad_words_are_whole_words_from_a_configurable_list(tmp_path):
    assert c4(page("What the FUCK is going on here?"), C4).reason == "c4:bad_words"
    assert c4(page("Scunthorpe is a town in North Lincolnshire."), C4).reason is None
    assert c4(page("What the fuck is going on here?"), replace(C4, drop_bad_words=False)).reason is None
    word_list = tmp_path / "words.txt"
    word_list.write_text("# desserts are bad for you\nbanana split\n", encoding="utf-8")
    custom = replace(C4, bad_words_path=str(word_list))
    assert c4(page("We ate a Banana Split after dinner."), custom).reason == "c4:bad_words"
    assert c4(page("We ate a Banana Split after dinner."), C4).reason is None
    assert c4(page("What the fuck is going on here?"), custom).reason is None


def test_c4_min_sentences_and_empty_pages():
    assert c4(page(), C4).reason is None
    assert c4("\n".join(SENTENCES[:2]), C4).reason == "c4:min_sentences"
    assert c4("\n".join(SENTENCES[:2]), replace(C4, min_sentences=2)).reason is None
    # Three sentences on one line: counted, not lines.
    assert c4("One is here. Two is there! Three is where?", C4).reason is None
    assert c4("Read more\nShare this page", C4).reason == "c4:no_lines_left"


# --- code ---------------------------------------------------------------------------------

CODE_RULES_OFF = dict(
    max_line_length=None,
    max_mean_line_length=None,
    min_alphanumeric_fraction=None,
    auto_generated_scan_lines=0,
    max_encoded_match_length=None,
    max_encoded_fraction=None,
)


def code_only(**thresholds) -> CodeConfig:
    return CodeConfig(**(CODE_RULES_OFF | thresholds))


def lines_kept_by_c4(source: str) -> int:
    result = c4(source, C4)
    return 0 if result.reason else len(result.text.splitlines())


@pytest.mark.parametrize("module", ["reprlib", "textwrap", "colorsys"])
def test_real_python_source_passes_the_code_profile_but_not_c4(module):
    source = inspect.getsource(importlib.import_module(module))
    assert code_quality(source, CODE) is None
    # C4 throws code away: it drops the page, or keeps under a fifth of its lines (the docstring prose).
    assert lines_kept_by_c4(source) < len(source.splitlines()) / 5


def test_python_source_can_fail_gopher_quality():
    # Gopher's rules alone let docstring-heavy modules through (textwrap passes);
    # reprlib's symbol-heavy code fails the alphabetic-word rule.
    source = inspect.getsource(importlib.import_module("reprlib"))
    assert gopher_quality(source, GOPHER) == "gopher_quality:alphabetic_words"
    assert c4(source, C4).reason is not None


def test_minified_and_encoded_files_fail():
    minified = "var a=1,b=2;function f(x){return x*a+b}" * 40
    assert code_quality(minified, CODE) == "code_quality:max_line_length"
    blob = base64.encodebytes(bytes(range(256)) * 4).decode()  # 76-character lines: no long line, one long base64 run
    embedded = f'"""Icon data."""\n\nICON = """\n{blob}"""\n'
    assert code_quality(embedded, CODE) == "code_quality:encoded_match_length"
    dump = "\n".join(" ".join(f"{value:02x}" for value in range(row * 16, row * 16 + 16)) for row in range(16))
    assert (
        code_quality(f'DUMP = """\n{dump}\n"""\n', CODE) == "code_quality:encoded_fraction"
    )  # a hex dump: most of the file
    escapes = 'TEXT = "' + "\\u0041" * 100 + '"\n'
    assert code_quality(escapes, code_only(max_encoded_fraction=0.5)) == "code_quality:encoded_fraction"


def test_code_line_length_rules():
    text = "\n".join(["short"] * 5 + ["xy " * 333 + "x"])  # the last line has 1000 characters
    assert code_quality(text, code_only(max_line_length=1000)) is None
    assert code_quality(text + "x", code_only(max_line_length=1000)) == "code_quality:max_line_length"
    lines = ["x" * 100] * 4
    assert code_quality("\n".join(lines) + "\n", code_only(max_mean_line_length=100)) is None
    assert (
        code_quality("\n".join(lines + ["x" * 101]), code_only(max_mean_line_length=100))
        == "code_quality:mean_line_length"
    )  # 501 / 5
    assert code_quality("\n".join(lines + ["x" * 101]), code_only(max_mean_line_length=100.2)) is None


def test_code_alphanumeric_fraction():
    assert code_quality("a...", code_only(min_alphanumeric_fraction=0.25)) is None  # 1 / 4
    assert (
        code_quality("a....", code_only(min_alphanumeric_fraction=0.25)) == "code_quality:alphanumeric_fraction"
    )  # 1 / 5
    assert code_quality("a....", code_only(min_alphanumeric_fraction=0.2)) is None


def test_code_auto_generated_header_in_first_lines():
    def source(marker_line: int) -> str:
        lines = [f"x{index} = {index}" for index in range(10)]
        lines[marker_line] = "# Code generated by protoc. DO NOT EDIT."
        return "\n".join(lines)

    assert code_quality(source(4), CODE) == "code_quality:auto_generated"
    assert code_quality(source(5), CODE) is None
    assert code_quality(source(5), replace(CODE, auto_generated_scan_lines=6)) == "code_quality:auto_generated"
    assert code_quality(source(4), replace(CODE, auto_generated_markers=("machine-made",))) is None


def test_code_encoded_data_thresholds():
    blob = base64.b64encode(bytes(range(256)) * 4).decode()  # 1368 characters, no newline
    text = f'"{blob[:1024]}"'
    assert code_quality(text, code_only(max_encoded_match_length=1024)) is None
    assert (
        code_quality(f'"{blob[:1025]}"', code_only(max_encoded_match_length=1024))
        == "code_quality:encoded_match_length"
    )
    # 100 encoded characters in a file of 200, then of 199.
    assert code_quality(f'"{blob[:100]}"' + " " * 98, code_only(max_encoded_fraction=0.5)) is None
    assert (
        code_quality(f'"{blob[:100]}"' + " " * 97, code_only(max_encoded_fraction=0.5))
        == "code_quality:encoded_fraction"
    )
    # Hex pairs on their own lines match both the base64 and the hex pattern: the overlap counts once.
    pairs = "\n".join(["AB"] * 40)
    assert code_quality(pairs, code_only(max_encoded_fraction=1.0)) is None


# --- keywords -------------------------------------------------------------------------------


def test_html_remnants_per_word():
    def document(remnants: int) -> str:
        markup = ["<br>", "&nbsp;", "</p>", "<div"][:remnants]
        return " ".join(["plain"] * (20 - remnants) + markup)

    assert keyword_filter(document(2), KeywordConfig()) is None  # 2 / 20 = 0.1
    assert keyword_filter(document(3), KeywordConfig()) == "keyword:html_remnants"  # 0.15
    assert keyword_filter(document(3), KeywordConfig(max_html_remnant_ratio=0.15)) is None
    assert keyword_filter(" ".join(["a<bc", "<bold>", "x < y", "R&D"] * 5), KeywordConfig()) is None


def test_boilerplate_line_fraction():
    def document(boilerplate: int) -> str:
        notices = ["All Rights Reserved.", "Click here to subscribe.", "Skip to content", "Share this:"]
        return "\n".join(
            notices[:boilerplate] + [f"An ordinary sentence number {index}." for index in range(10 - boilerplate)]
        )

    assert keyword_filter(document(3), KeywordConfig()) is None  # 3 / 10
    assert keyword_filter(document(4), KeywordConfig()) == "keyword:boilerplate_lines"
    assert keyword_filter(document(4), KeywordConfig(max_boilerplate_line_fraction=0.4)) is None
    assert keyword_filter(document(4), KeywordConfig(boilerplate_phrases=())) is None
    assert keyword_filter("\n".join(["He clicked here and there."] * 10), KeywordConfig()) is None


def test_blocklist_file(tmp_path):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# competitors\nacme corp\nwidget\n\n", encoding="utf-8")
    config = KeywordConfig(blocklist_path=str(blocklist))
    assert keyword_filter("Buy from ACME Corp today.", config) == "keyword:blocklist"
    assert keyword_filter("We sell widgets and gadgets.", config) is None
    assert keyword_filter("Buy from ACME Corp today.", KeywordConfig()) is None


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: GopherQualityConfig(min_words=-1), "min_words"),
        (lambda: GopherQualityConfig(min_words=60, max_words=50), "min_words"),
        (lambda: GopherQualityConfig(min_mean_word_length=11), "min_mean_word_length"),
        (lambda: GopherQualityConfig(max_bullet_line_fraction=1.5), "max_bullet_line_fraction"),
        (lambda: GopherQualityConfig(stop_words=("the", " ")), "stop_words"),
        (lambda: GopherQualityConfig(bullet_characters=""), "bullet_characters"),
        (lambda: C4Config(min_words_per_line=-1), "min_words_per_line"),
        (lambda: C4Config(max_word_length=0), "max_word_length"),
        (lambda: C4Config(bad_words_path="/nowhere/words.txt"), "bad_words_path"),
        (lambda: CodeConfig(min_alphanumeric_fraction=2.0), "min_alphanumeric_fraction"),
        (lambda: CodeConfig(max_line_length=-5), "max_line_length"),
        (lambda: KeywordConfig(max_html_remnant_ratio=-1.0), "max_html_remnant_ratio"),
        (lambda: KeywordConfig(blocklist_path="/nowhere/blocklist.txt"), "blocklist_path"),
    ],
)
def test_invalid_config_names_the_field(make, field):
    with pytest.raises(ConfigError, match=f"'{field}'") as error:
        make()
    assert error.value.field == field


def test_configs_build_from_yaml_values():
    assert build(GopherQualityConfig, {"stop_words": ["The", "of"], "min_words": "10"}).stop_words == ("the", "of")
    assert build(C4Config, {"min_sentences": 5}).min_sentences == 5
