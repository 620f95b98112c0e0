"""Cleaning: raw documents (web pages, mis-decoded text, dialogue dumps) into plain text.

:func:`clean_text` runs, in this order:

1. **Binary check.** Text that is mostly control characters or U+FFFD (a binary
   file decoded as text) is dropped as ``clean:binary``. It runs first because
   ftfy would turn the C1 controls of such text into Windows-1252 letters.
2. **HTML extraction** (resiliparse, a C++ DOM parser) when the text is, or
   looks like, an HTML page. It comes before ftfy because markup is often most
   of a page (ftfy then reads only the text that is kept), and because the
   extractor decodes entities itself, so ftfy must not unescape them again
   (``&amp;lt;`` on a page means the text ``&lt;``).
3. **ftfy** repairs mojibake (``schÃ¶n`` -> ``schön``) and normalises to NFC.
   Only its encoding repairs are enabled, as in FineWeb's datatrove formatter
   (Penedo et al. 2024): curly quotes, full-width forms and ligatures are real
   text that a model should learn to read.
4. **Whitespace** last: mojibake repair can produce characters it handles
   (``Â`` + NBSP is a mis-decoded NBSP, which then becomes a plain space).

Dialogue dumps (OpenAssistant OASST1, Reddit comments) are flat lists of
messages pointing at the message they answer; :func:`render_threads` turns each
thread into one document in which every reply follows the message it answers.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal

import ftfy
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.html import HTMLParserException

from llmkit.config import check
from llmkit.errors import InputError

logger = logging.getLogger(__name__)

# "auto" looks at this many leading characters only, so detection costs the
# same on a 10 MB document as on a 10 KB one.
DETECTION_CHARACTERS = 10_000
# Elements whose tags mark a line as markup. Markdown allows inline HTML too
# (<br>, <img>, <details>), so their presence alone proves nothing; see looks_like_html.
HTML_ELEMENTS = (
    "a abbr address article aside b blockquote body br button caption code dd div dl dt em fieldset "
    "figcaption figure footer form h1 h2 h3 h4 h5 h6 head header hr html i iframe img input label "
    "legend li link main meta nav noscript ol option p pre script section select small span strong "
    "style sub sup table tbody td textarea tfoot th thead title tr u ul"
).split()
# Half the non-blank lines. Measured on the first DETECTION_CHARACTERS: the most
# tag-led file among the 1,888 text and code files of the Python standard library
# has 0.30, the most among the Markdown READMEs of 195 installed packages 0.31
# (badge tables); the <body> alone of 3,000 rustdoc/mdBook pages has a median of
# 1.0 and 90% of them reach 0.5 (whole pages are caught by their opening).
HTML_LINE_SHARE = 0.5
_PAGE_OPENING = re.compile(
    r"\ufeff?\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)\b", re.IGNORECASE | re.DOTALL
)
_TAG_LED_LINE = re.compile(r"^[ \t]*</?(?:%s)\b[^<>]*>" % "|".join(HTML_ELEMENTS), re.IGNORECASE | re.MULTILINE)
_NON_BLANK_LINE = re.compile(r"^[ \t]*\S", re.MULTILINE)

# A binary file decoded as Latin-1 is about 25% control characters (65 of the
# 256 byte values), decoded as UTF-8 with replacement mostly U+FFFD; real text
# has almost none, so 5% leaves a wide margin on both sides. Tab, line breaks and
# escape (the start of the colour codes of terminal logs, which ftfy removes) do not count.
BINARY_SHARE = 0.05
_BINARY_CHARACTER = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f\ufffd]")

# Unicode's space separators (category Zs) other than the ASCII space. U+3000,
# the ideographic space, is left alone: it is a full-width CJK character, like
# the full-width forms ftfy is told to keep.
_SPACES = "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f"
# Invisible characters that split words for a tokenizer: zero-width space, word
# joiner, byte-order mark / zero-width no-break space, soft hyphen. The
# zero-width (non-)joiners U+200C/U+200D stay: Persian, Indic scripts and emoji
# sequences need them.
_INVISIBLE = "\u200b\u2060\ufeff\u00ad"
# Line and paragraph separators, next line, vertical tab and form feed end a line.
_LINE_BREAKS = "\u2028\u2029\x85\x0b\x0c"
_WHITESPACE_TABLE = {
    **{code: None for code in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if chr(code) not in "\n\t"},
    **{ord(character): " " for character in _SPACES},
    **{ord(character): None for character in _INVISIBLE},
    **{ord(character): "\n" for character in "\r" + _LINE_BREAKS},
}
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
# PEP 8 puts two blank lines between top-level definitions: keep up to two.
_EXCESS_BLANK_LINES = re.compile(r"\n{4,}")


@dataclass
class CleanConfig:
    html: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={
            "help": "extract text from HTML: 'auto' = when the text looks like a page or markup (use 'never' for "
            "code sources: JSX and templates look like markup)"
        },
    )
    main_content: bool = field(
        default=True,
        metadata={"help": "keep only the main content of HTML pages (drop navigation, headers, footers, menus)"},
    )
    fix_unicode: bool = field(default=True, metadata={"help": "repair mojibake with ftfy and normalise Unicode to NFC"})
    normalize_whitespace: bool = field(
        default=True,
        metadata={
            "help": "drop control and zero-width characters, unify line breaks and spaces, strip trailing spaces, "
            "keep at most two blank lines in a row"
        },
    )

    def __post_init__(self) -> None:
        check(self.html in ("auto", "always", "never"), "html", self.html, "must be 'auto', 'always' or 'never'")


class CleaningError(ValueError):
    """A document that cannot be cleaned; ``reason`` is the key it is counted under in the data report."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def looks_like_html(text: str) -> bool:
    """Whether ``text`` opens like an HTML page, or at least half of its non-blank lines begin with an HTML tag.

    Counting lines that *begin* with a tag, rather than tags, keeps Markdown with
    inline ``<br>``/``<img>`` and code with ``a<b`` comparisons out: in those the
    tags sit inside lines whose structure is the text's own.
    """
    prefix = text[:DETECTION_CHARACTERS]
    if _PAGE_OPENING.match(prefix):
        return True
    lines = len(_NON_BLANK_LINE.findall(prefix))
    return lines > 0 and len(_TAG_LED_LINE.findall(prefix)) >= HTML_LINE_SHARE * lines


def extract_html(html: str, main_content: bool = True) -> str:
    """The visible text of an HTML document, paragraphs and line breaks kept; :class:`CleaningError` if there is none.

    Scripts, styles, comments and ``<noscript>`` fallbacks go; the text of links
    stays, their URLs do not. ``main_content`` applies resiliparse's boilerplate
    heuristics (navigation, headers, footers, menus and short link lists go).
    """
    try:
        text = extract_plain_text(
            html,
            # Line-level filters (Gopher's punctuation and bullet rules, repeated-line
            # dedup) need the paragraphs and list items on lines of their own.
            preserve_formatting=True,
            main_content=main_content,
            list_bullets=True,
            # Alt texts are mostly "logo", "icon" or file names, stranded between paragraphs.
            alt_texts=False,
            links=False,
            form_fields=False,
            noscript=False,
            # Reader comments and "posted by ... on ..." lines are not the article.
            comments=False,
            post_meta=False,
        )
    except HTMLParserException as error:
        raise CleaningError("clean:html_unparseable", str(error)) from None
    if not text.strip():
        raise CleaningError("clean:empty_after_extraction", "the HTML holds no visible text")
    return text


def normalize_whitespace(text: str) -> str:
    """Control and invisible characters removed, line breaks unified to ``\\n``, spaces to ``" "``, trailing spaces and
    excess blank lines gone.

    Tabs and leading indentation are kept (code); so are up to two blank lines in a row,
    and one final newline when the text ended with a line break (as text files do).
    """
    text = text.replace("\r\n", "\n").translate(_WHITESPACE_TABLE)
    text = _TRAILING_SPACE.sub("", text)
    ends_with_newline = text.endswith("\n")
    text = _EXCESS_BLANK_LINES.sub("\n\n\n", text).strip("\n")
    return text + "\n" if ends_with_newline and text else text


def clean_text(text: str, config: CleanConfig) -> tuple[str | None, str | None]:
    """``(cleaned text, None)``, or ``(None, reason)`` when the document is dropped (reasons start with ``clean:``)."""
    text = _without_lone_surrogates(text)
    if len(_BINARY_CHARACTER.findall(text)) > BINARY_SHARE * len(text):
        return None, "clean:binary"
    extracted = config.html == "always" or (config.html == "auto" and looks_like_html(text))
    if extracted:
        try:
            text = extract_html(text, config.main_content)
        except CleaningError as error:
            return None, error.reason
    if config.fix_unicode:
        text = _fix_unicode(text, unescape_html=not extracted)
    if config.normalize_whitespace:
        text = normalize_whitespace(text)
    if not text.strip():
        return None, "clean:empty"
    return text, None


def _without_lone_surrogates(text: str) -> str:
    """Surrogate pairs joined into the characters they encode, lone surrogates replaced by U+FFFD.

    JSON's ``\\ud800`` escapes can put surrogates into a Python string; they
    cannot be written as UTF-8, and the HTML parser refuses them.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _ftfy_config(unescape_html: str | bool) -> ftfy.TextFixerConfig:
    return ftfy.TextFixerConfig(
        unescape_html=unescape_html,
        fix_latin_ligatures=False,
        fix_character_width=False,
        uncurl_quotes=False,
        # Line breaks are normalize_whitespace's job, which the user can turn off.
        fix_line_breaks=False,
        normalization="NFC",
        explain=False,
    )


# "auto" unescapes entities only in text without a literal "<", i.e. text that
# went through an HTML escaper once (Reddit bodies carry "&amp;" and "&gt;").
_FTFY_PLAIN_TEXT = _ftfy_config(unescape_html="auto")
_FTFY_EXTRACTED = _ftfy_config(unescape_html=False)


def _fix_unicode(text: str, unescape_html: bool) -> str:
    # Mojibake needs non-ASCII characters and NFC leaves ASCII alone, so ASCII text
    # without entities or terminal escapes has nothing for ftfy to fix: skipping it
    # saves most of ftfy's time on source code.
    if text.isascii() and "\x1b" not in text and not (unescape_html and "&" in text):
        return text
    return ftfy.fix_text(text, _FTFY_PLAIN_TEXT if unescape_html else _FTFY_EXTRACTED)


@dataclass
class DialogueFields:
    """Where a dialogue record keeps each part of a message (defaults: OpenAssistant OASST1).

    Reddit comment dumps: ``id="id", parent="parent_id", thread="link_id",
    author="author", text="body", id_prefix="t1_"``.
    """

    id: str = field(default="message_id", metadata={"help": "field holding the message's id"})
    parent: str = field(
        default="parent_id",
        metadata={
            "help": "field holding the id of the message it replies to (null or empty for a thread's first message)"
        },
    )
    thread: str | None = field(
        default="message_tree_id",
        metadata={"help": "field holding the thread id (None: each root message starts a thread)"},
    )
    author: str = field(default="role", metadata={"help": "field holding the author's name or role"})
    text: str = field(default="text", metadata={"help": "field holding the message's text"})
    id_prefix: str = field(default="", metadata={"help": "prefix parent ids put before message ids (Reddit: 't1_')"})

    def __post_init__(self) -> None:
        for name in ("id", "parent", "author", "text"):
            check(bool(getattr(self, name)), name, getattr(self, name), "must name a record field")
        check(
            self.thread is None or bool(self.thread),
            "thread",
            self.thread,
            "must name a record field, or be None to derive threads from root messages",
        )


@dataclass
class DialogueStats:
    messages: int = 0
    threads: int = 0
    orphans: int = 0  # replies to a message that is not in the input, rendered as roots


@dataclass(eq=False)  # compared by identity: messages point at their parent and their replies
class _Message:
    record: int  # 1-based position in the input, for error messages
    key: str  # id_prefix + id: what the parent field of its replies holds
    parent_key: str | None
    thread: str | None
    author: str
    text: str
    parent: _Message | None = None  # None for a root
    replies: list[_Message] = field(default_factory=list)


def render_threads(
    records: Iterable[dict], fields: DialogueFields, stats: DialogueStats | None = None
) -> Iterator[tuple[str, str]]:
    """Yield ``(thread id, text)`` per thread, in the order threads first appear in the input.

    Each thread is its reply trees rendered depth-first, replies to one message in
    input order, so every reply comes right after the message it answers or after
    that message's earlier replies and their subtrees. A message is a block of lines
    indented by two spaces per level of depth, headed ``author:`` for a root and
    ``author (reply to parent's author):`` for a reply; blocks are separated by a
    blank line. A message whose parent is not in the input (or is the thread
    itself, as Reddit's top-level comments) is a root; the former are counted as
    orphans. Missing fields, duplicate ids, replies across threads and reply
    cycles raise :class:`InputError`. The whole input is held in memory.
    """
    messages = [_message_of(record, number, fields) for number, record in enumerate(records, start=1)]
    stats = stats if stats is not None else DialogueStats()
    roots = _link_replies(messages, stats)
    threads: dict[str, list[_Message]] = {}
    thread_of_message: dict[int, str] = {}
    for root in roots:
        thread = root.thread if root.thread is not None else root.key.removeprefix(fields.id_prefix)
        threads.setdefault(thread, []).append(root)
        for message, _ in _depth_first(root):
            thread_of_message[message.record] = thread
    _check_no_cycles(messages, thread_of_message)
    first_record = {}
    for message in messages:
        first_record.setdefault(thread_of_message[message.record], message.record)
    stats.messages, stats.threads = len(messages), len(threads)
    if stats.orphans:
        logger.warning("%d messages reply to a message that is not in the input; rendered as roots", stats.orphans)
    for thread in sorted(threads, key=first_record.__getitem__):
        yield (
            thread,
            "\n\n".join(
                _render_block(message, depth) for root in threads[thread] for message, depth in _depth_first(root)
            ),
        )


def _message_of(record: dict, number: int, fields: DialogueFields) -> _Message:
    def value(name: str, types: tuple[type, ...], nullable: bool):
        if name not in record:
            raise InputError(f"record {number}: missing field '{name}'")
        found = record[name]
        if found is None and nullable:
            return None
        if not isinstance(found, types) or isinstance(found, bool):
            expected = " or ".join(kind.__name__ for kind in types) + (" or null" if nullable else "")
            raise InputError(f"record {number}: field '{name}' is {type(found).__name__}, expected {expected}")
        return found

    identifier = value(fields.id, (str, int), nullable=False)
    parent = value(fields.parent, (str, int), nullable=True)
    thread = value(fields.thread, (str, int), nullable=False) if fields.thread is not None else None
    return _Message(
        record=number,
        key=f"{fields.id_prefix}{identifier}",
        parent_key=None if parent in (None, "") else str(parent),
        thread=None if thread is None else str(thread),
        author=value(fields.author, (str,), nullable=False),
        text=value(fields.text, (str,), nullable=False),
    )


def _link_replies(messages: list[_Message], stats: DialogueStats) -> list[_Message]:
    """Attach each reply to its parent; return the roots in input order."""
    by_key: dict[str, _Message] = {}
    for message in messages:
        if message.key in by_key:
            raise InputError(
                f"record {message.record}: duplicate message id '{message.key}' (first in record "
                f"{by_key[message.key].record})"
            )
        by_key[message.key] = message
    stats.orphans = 0
    roots = []
    for message in messages:
        parent = by_key.get(message.parent_key) if message.parent_key is not None else None
        if parent is None:
            if message.parent_key is not None and message.parent_key != message.thread:
                stats.orphans += 1
            roots.append(message)
        elif parent.thread != message.thread:
            raise InputError(
                f"record {message.record}: message '{message.key}' of thread '{message.thread}' replies to "
                f"'{parent.key}' of thread '{parent.thread}'"
            )
        else:
            message.parent = parent
            parent.replies.append(message)
    return roots


def _check_no_cycles(messages: list[_Message], reached: dict[int, str]) -> None:
    """Messages no root reaches reply to each other in a loop (or descend from one); name the loop."""
    stray = next((message for message in messages if message.record not in reached), None)
    if stray is None:
        return
    by_key = {message.key: message for message in messages}
    # Every message no root reaches has its parent in the input, so walking up must come back to one seen before.
    position = {stray.key: 0}
    path = [stray]
    while path[-1].parent_key not in position:
        position[path[-1].parent_key] = len(path)
        path.append(by_key[path[-1].parent_key])
    loop = path[position[path[-1].parent_key] :]
    described = " -> ".join(f"'{message.key}' (record {message.record})" for message in loop + loop[:1])
    raise InputError(f"messages reply to each other in a cycle with no root: {described}")


def _depth_first(root: _Message) -> Iterator[tuple[_Message, int]]:
    # An explicit stack: Reddit reply chains run deeper than Python's recursion limit.
    stack = [(root, 0)]
    while stack:
        message, depth = stack.pop()
        yield message, depth
        stack.extend((reply, depth + 1) for reply in reversed(message.replies))


def _render_block(message: _Message, depth: int) -> str:
    indent = "  " * depth
    header = f"{message.author}:" if message.parent is None else f"{message.author} (reply to {message.parent.author}):"
    lines = [header, *message.text.strip().splitlines()]
    return "\n".join(indent + line if line.strip() else "" for line in lines)
