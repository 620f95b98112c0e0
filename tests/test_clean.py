import random
import sys
import unicodedata

import pytest
from resiliparse.parse.html import HTMLParserException

from llmkit.data import clean
from llmkit.data.clean import (
    CleanConfig,
    CleaningError,
    DialogueFields,
    DialogueStats,
    clean_text,
    extract_html,
    looks_like_html,
    normalize_whitespace,
    render_threads,
)
from llmkit.errors import ConfigError, InputError

PAGE = (
    """<!DOCTYPE html>
<html><head><title>Bread</title>
<style>body { color: red } .SECRET_STYLE {}</style>
<script>var tracker = "SECRET_SCRIPT";</script></head>
<body>
<nav class="navbar"><ul><li><a href="/">Home</a></li><li><a href="/about">About us</a></li></ul></nav>
<main><article>
<h1>The history of bread</h1>
<p>Bread has been a staple food for thousands of years, made from """
    """<a href="https://example.com/flour">flour</a> and water.</p>
<p>Early bread was flat &amp; unleavened; an escaped tag is written &amp;lt;p&amp;gt; in HTML.</p>
<img src="loaf.png" alt="ALT_TEXT_OF_IMAGE">
</article></main>
<footer class="footer"><p>Copyright 2024 Example Corp. All rights reserved.</p></footer>
<noscript>Please enable JavaScript</noscript>
</body></html>
"""
)


def test_page_keeps_main_text_and_drops_boilerplate():
    text, reason = clean_text(PAGE, CleanConfig())
    assert reason is None
    assert text.splitlines() == [
        "The history of bread",
        "",
        "Bread has been a staple food for thousands of years, made from flour and water.",
        "",
        # Entities decoded once by the extractor, never a second time by ftfy.
        "Early bread was flat & unleavened; an escaped tag is written &lt;p&gt; in HTML.",
    ]


def test_page_without_main_content_filter_keeps_navigation_but_never_scripts():
    text, _ = clean_text(PAGE, CleanConfig(main_content=False))
    for kept in ("Home", "About us", "The history of bread", "Copyright 2024 Example Corp."):
        assert kept in text
    for dropped in (
        "SECRET_SCRIPT",
        "SECRET_STYLE",
        "color: red",
        "ALT_TEXT_OF_IMAGE",
        "https://example.com",
        "JavaScript",
        "<p>",
        "href",
    ):
        assert dropped not in text


def test_broken_html_is_extracted_or_reported_never_raised():
    assert clean_text("<html><body><p>unclosed paragraph <div><b>bold text", CleanConfig()) == (
        "unclosed paragraph\n\nbold text",
        None,
    )
    assert clean_text("<html><body><script>only()</script><style>p {}</style></body></html>", CleanConfig()) == (
        None,
        "clean:empty_after_extraction",
    )
    # A lone surrogate (legal in JSON "\ud800", not in UTF-8) would make the parser refuse the string.
    assert clean_text("<html><body><p>half \ud800 a pair</p></body></html>", CleanConfig()) == (
        "half \ufffd a pair",
        None,
    )
    with pytest.raises(CleaningError, match="clean:empty_after_extraction"):
        extract_html("<p>   </p>")


def test_parser_failure_is_a_reason(monkeypatch):
    def refuse(html, **options):
        raise HTMLParserException("Failed to parse HTML document.")

    monkeypatch.setattr(clean, "extract_plain_text", refuse)
    assert clean_text(PAGE, CleanConfig()) == (None, "clean:html_unparseable")


def test_binary_junk_is_dropped_but_a_few_stray_controls_are_not():
    junk = bytes(range(256)).decode("latin-1") * 4
    assert clean_text(junk, CleanConfig(html="always")) == (None, "clean:binary")
    assert clean_text("\ufffd\ufffd\ufffdPNG\ufffd\x1a", CleanConfig()) == (None, "clean:binary")
    assert clean_text("A normal sentence with one stray \x07 bell in it.", CleanConfig()) == (
        "A normal sentence with one stray  bell in it.",
        None,
    )
    # A coloured terminal log is text: ftfy removes its escape sequences.
    assert clean_text("\x1b[32mINFO\x1b[0m ok\n" * 3, CleanConfig()) == ("INFO ok\nINFO ok\nINFO ok\n", None)


def test_mojibake_is_repaired_and_typography_kept():
    assert clean_text("Das ist schÃ¶n", CleanConfig()) == ("Das ist schön", None)
    # UTF-8 NBSP read as Windows-1252 is "Â" + NBSP: ftfy restores the NBSP, then whitespace makes it a space.
    assert clean_text("price:Â\xa010 €", CleanConfig()) == ("price: 10 €", None)
    # Curly quotes, full-width letters and ligatures are real text: only encoding errors are fixed.
    assert clean_text("“ｆｕｌｌ” ﬁne", CleanConfig()) == ("“ｆｕｌｌ” ﬁne", None)
    assert clean_text("cafe\u0301", CleanConfig()) == ("caf\u00e9", None)  # NFC
    assert clean_text("Das ist schÃ¶n", CleanConfig(fix_unicode=False)) == ("Das ist schÃ¶n", None)


def test_entities_unescaped_only_in_escaped_plain_text():
    assert clean_text("Fish &amp; chips &gt; salad", CleanConfig()) == ("Fish & chips > salad", None)
    # A literal "<" means the text is markup-aware (code, HTML snippets): leave entities alone.
    assert clean_text("if a < b: s = '&amp;'", CleanConfig()) == ("if a < b: s = '&amp;'", None)


def test_whitespace_normalisation_exact():
    raw = (
        "\ufeffTitle\u00a0line  \r\nsecond\tline\x00\x1b\u200b!\rthird\u2028fourth\x0cfifth\n\n\n\n\n\n"
        "    indented code\t \n\n"
    )
    expected = "Title line\nsecond\tline!\nthird\nfourth\nfifth\n\n\n    indented code\n"  # one final newline kept
    assert normalize_whitespace(raw) == expected
    assert clean_text(raw, CleanConfig(fix_unicode=False)) == (expected, None)
    assert normalize_whitespace("a\n\n\nb\n\nc") == "a\n\n\nb\n\nc"  # up to two blank lines stay
    assert normalize_whitespace("zero\u200dwidth joiner\u3000kept") == "zero\u200dwidth joiner\u3000kept"


def test_whitespace_table_covers_unicode_categories():
    for code in range(sys.maxunicode + 1):
        character = chr(code)
        category = unicodedata.category(character)
        if category == "Zs" and character not in " \u3000":
            assert normalize_whitespace(f"a{character}b") == "a b", hex(code)
        elif category == "Cc" and character not in "\n\t":
            assert normalize_whitespace(f"a{character}b") in ("ab", "a\nb"), hex(code)


def test_empty_after_cleaning_is_a_reason():
    assert clean_text(" \u200b \r\n\t\u00a0\n\n", CleanConfig()) == (None, "clean:empty")


PYTHON_CODE = """def clamp(a, b, c):
    if a<b and b>c:
        return b
    while x < y > z:
        pass
    return List<str>, a<b>c, x </p> y
"""

MARKDOWN = """# Project

<p align="center"><img src="logo.png" width="200"></p>

First line<br>
second line with <b>bold</b> and <a href="https://example.com">a link</a>.

- item one
- item two
"""


@pytest.mark.parametrize("text", [PYTHON_CODE, MARKDOWN, "a < b > c", "", "plain prose"])
def test_code_and_markdown_are_not_taken_for_html(text):
    assert not looks_like_html(text)
    if text.strip():
        assert clean_text(text, CleanConfig()) == (text, None)


@pytest.mark.parametrize(
    "text",
    [
        PAGE,
        "  \n<!-- generated -->\n<!doctype html><title>x</title><p>hello",
        "<?xml version='1.0'?>\n<html><p>hello</p></html>",
        "<body><p>Body without a head</p></body>",
        "<div class='post'>\n  <p>A paragraph of a fragment with no page around it.</p>\n"
        "  <p>Another one.</p>\n</div>\n",
    ],
)
def test_pages_and_fragments_are_taken_for_html(text):
    assert looks_like_html(text)


def test_html_mode_never_and_always():
    fragment = "Intro line\nA <b>bold</b> word\n<p>One paragraph</p>\nOutro\n"
    assert not looks_like_html(fragment)  # one line in four starts with a tag
    assert clean_text(fragment, CleanConfig(html="never")) == (fragment, None)
    # HTML ignores line breaks in text; block elements make paragraphs.
    assert clean_text(fragment, CleanConfig(html="always")) == (
        "Intro line A bold word\n\nOne paragraph\n\nOutro",
        None,
    )
    assert clean_text(PAGE, CleanConfig(html="never"))[0].startswith("<!DOCTYPE html>")
    with pytest.raises(ConfigError, match="html"):
        CleanConfig(html="sometimes")


def oasst(message_id, parent_id, tree, role, text):
    return {"message_id": message_id, "parent_id": parent_id, "message_tree_id": tree, "role": role, "text": text}


def test_thread_with_branches_renders_replies_after_what_they_answer():
    records = [
        oasst("q", None, "t1", "alice", "How do I bake bread?"),
        oasst("a1", "q", "t1", "bob", "Mix flour,\nwater and yeast."),
        oasst("a2", "q", "t1", "carol", "Buy it."),
        oasst("f1", "a1", "t1", "alice", "How long should it rise?"),
        oasst("f2", "a2", "t1", "alice", "Where?"),
        oasst("f3", "f1", "t1", "bob", "An hour."),
        oasst("f4", "a1", "t1", "dave", "  Use warm water.  \n"),
    ]
    stats = DialogueStats()
    assert list(render_threads(records, DialogueFields(), stats)) == [
        (
            "t1",
            "alice:\nHow do I bake bread?\n\n"
            "  bob (reply to alice):\n  Mix flour,\n  water and yeast.\n\n"
            "    alice (reply to bob):\n    How long should it rise?\n\n"
            "      bob (reply to alice):\n      An hour.\n\n"
            "    dave (reply to bob):\n    Use warm water.\n\n"
            "  carol (reply to alice):\n  Buy it.\n\n"
            "    alice (reply to carol):\n    Where?",
        )
    ]
    assert stats == DialogueStats(messages=7, threads=1, orphans=0)


def test_threads_in_order_of_first_appearance_with_orphans():
    records = [
        oasst("b1", None, "tb", "prompter", "Second thread starts first"),
        oasst("a1", None, "ta", "prompter", "Hi"),
        oasst("lost", "deleted-message", "ta", "assistant", "I answer a message that is gone"),
        oasst("a2", "a1", "ta", "assistant", "Hello"),
        oasst("b2", "b1", "tb", "assistant", "Reply"),
    ]
    stats = DialogueStats()
    assert list(render_threads(records, DialogueFields(), stats)) == [
        ("tb", "prompter:\nSecond thread starts first\n\n  assistant (reply to prompter):\n  Reply"),
        (
            "ta",
            "prompter:\nHi\n\n  assistant (reply to prompter):\n  Hello\n\nassistant:\nI answer a message that is gone",
        ),
    ]
    assert stats == DialogueStats(messages=5, threads=2, orphans=1)


def test_threads_derived_from_roots_reddit_style():
    fields = DialogueFields(id="id", parent="parent_id", thread=None, author="author", text="body")
    records = [
        {"id": 1, "parent_id": None, "author": "op", "body": "Post"},
        {"id": 2, "parent_id": 9, "author": "x", "body": "Orphan"},
        {"id": 3, "parent_id": 1, "author": "y", "body": "Reply"},
        {"id": 4, "parent_id": "", "author": "z", "body": "Another root"},
    ]
    stats = DialogueStats()
    assert list(render_threads(records, fields, stats)) == [
        ("1", "op:\nPost\n\n  y (reply to op):\n  Reply"),
        ("2", "x:\nOrphan"),
        ("4", "z:\nAnother root"),
    ]
    assert stats.orphans == 1


def test_reddit_ids_with_kind_prefixes():
    fields = DialogueFields(
        id="id", parent="parent_id", thread="link_id", author="author", text="body", id_prefix="t1_"
    )
    records = [
        {"id": "c1", "parent_id": "t3_post", "link_id": "t3_post", "author": "ann", "body": "Top-level comment"},
        {"id": "c2", "parent_id": "t1_c1", "link_id": "t3_post", "author": "ben", "body": "Answer"},
        {"id": "c3", "parent_id": "t3_post", "link_id": "t3_post", "author": "cat", "body": "Second top-level"},
    ]
    stats = DialogueStats()
    assert list(render_threads(records, fields, stats)) == [
        ("t3_post", "ann:\nTop-level comment\n\n  ben (reply to ann):\n  Answer\n\ncat:\nSecond top-level"),
    ]
    assert stats.orphans == 0  # replies to the post itself are roots, not orphans


def test_random_trees_render_in_depth_first_order():
    generator = random.Random(0)
    records = []
    for number in range(300):
        parent = generator.choice([None] + [record["message_id"] for record in records[-20:]])
        records.append(oasst(f"m{number}", parent, "t", "user", f"m{number}"))
    parent_of = {record["message_id"]: record["parent_id"] for record in records}
    ((_, text),) = render_threads(records, DialogueFields())
    blocks = [block.splitlines() for block in text.split("\n\n")]
    order = [lines[1].strip() for lines in blocks]
    depths = [(len(lines[0]) - len(lines[0].lstrip())) // 2 for lines in blocks]
    assert sorted(order) == sorted(parent_of)
    open_path: list[str] = []  # the chain of ancestors of the current block
    for message, depth in zip(order, depths):
        del open_path[depth:]
        assert parent_of[message] == (open_path[-1] if open_path else None)
        open_path.append(message)
    # Siblings keep their input order.
    position = {message: index for index, message in enumerate(order)}
    for earlier, later in zip(records, records[1:]):
        if earlier["parent_id"] == later["parent_id"]:
            assert position[earlier["message_id"]] < position[later["message_id"]]


def test_deep_reply_chain_does_not_recurse():
    records = [oasst("0", None, "t", "u", "start")] + [
        oasst(str(n), str(n - 1), "t", "u", "more") for n in range(1, 3000)
    ]
    ((_, text),) = render_threads(records, DialogueFields())
    assert text.count("(reply to u)") == 2999


@pytest.mark.parametrize(
    "records, expected",
    [
        (
            [
                oasst("a", None, "t", "u", "x"),
                {"message_id": "b", "parent_id": "a", "message_tree_id": "t", "text": "y"},
            ],
            r"record 2: missing field 'role'",
        ),
        (
            [{"message_id": "a", "message_tree_id": "t", "role": "u", "text": "x"}],
            r"record 1: missing field 'parent_id'",
        ),
        ([oasst("a", None, "t", "u", None)], r"record 1: field 'text' is NoneType, expected str"),
        (
            [oasst("a", None, "t", "u", "x"), oasst("a", None, "t", "u", "y")],
            r"record 2: duplicate message id 'a' \(first in record 1\)",
        ),
        (
            [oasst("a", None, "t1", "u", "x"), oasst("b", "a", "t2", "u", "y")],
            r"record 2: message 'b' of thread 't2' replies to 'a' of thread 't1'",
        ),
        (
            [
                oasst("r", None, "t", "u", "root"),
                oasst("a", "c", "t", "u", "x"),
                oasst("b", "a", "t", "u", "y"),
                oasst("c", "b", "t", "u", "z"),
                oasst("d", "b", "t", "u", "w"),
            ],
            r"cycle with no root: 'a' \(record 2\) -> 'c' \(record 4\) -> 'b' \(record 3\) -> 'a' \(record 2\)",
        ),
        ([oasst("self", "self", "t", "u", "x")], r"cycle with no root: 'self' \(record 1\) -> 'self' \(record 1\)"),
    ],
)
def test_bad_dialogue_records_name_the_record(records, expected):
    with pytest.raises(InputError, match=expected):
        list(render_threads(records, DialogueFields()))


def test_dialogue_fields_must_name_fields():
    with pytest.raises(ConfigError, match="author"):
        DialogueFields(author="")
