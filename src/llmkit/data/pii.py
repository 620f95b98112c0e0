"""Rule-based masking of personal data and secrets in training text.

Each kind of personal data is one precompiled regular expression that proposes
candidates, followed by a check in Python that rejects look-alikes (a checksum,
an issuer prefix, the ``ipaddress`` module, the words around the match). A match
is replaced by a short tag (``<EMAIL>``, ``<PHONE>``, ...) so the text stays
readable and the model still learns that an address goes there, as in the
BigScience ROOTS corpus (Laurençon et al. 2022) and BigCode's StarCoder
data (Li et al. 2023, §4).

Kinds run in a fixed order, most specific first: URL credentials and secrets
(which contain digits, ``@`` and dots that the later rules would otherwise
split), then e-mails, card numbers, national ids, IP addresses and phones. A tag
contains no digit, ``@`` or ``:``, so a later rule never matches inside an
earlier replacement.

Performance: every document goes through here, so each rule has a cheap
pre-check (no ``@``: no e-mail), no pattern nests unbounded repetitions, and
look-behinds stop a match from starting inside a word or number, so each run of
characters is tried from its start only. Python's ``re`` skips quickly through
text only to positions where a pattern's first character can occur, and a
look-behind in first place disables that: so patterns start with a character
class and check the character before it with a two-character look-behind
(``\\d(?<![\\w.].)`` rather than ``(?<![\\w.])\\d``), which makes them about three
times faster.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Callable

from llmkit.config import check

PII_KINDS = ("email", "phone", "ipv4", "ipv6", "credit_card", "national_id", "url_credentials", "secret")

MASKS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ipv4": "<IP_ADDRESS>",
    "ipv6": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    "national_id": "<ID>",
    "url_credentials": "<CREDENTIALS>",
    "secret": "<SECRET>",
}


@dataclass
class PIIConfig:
    kinds: list[str] = field(
        default_factory=lambda: list(PII_KINDS),
        metadata={"help": f"kinds of personal data to mask: {', '.join(PII_KINDS)}"},
    )
    keep_private_ips: bool = field(
        default=True,
        metadata={
            "help": "leave IP addresses that identify nobody unmasked: private, loopback, link-local, reserved and "
            "documentation ranges, and well-known public DNS resolvers"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.kinds, str):
            self.kinds = [kind.strip() for kind in self.kinds.split(",") if kind.strip()]
        unknown = [kind for kind in self.kinds if kind not in PII_KINDS]
        check(
            not unknown,
            "kinds",
            self.kinds,
            f"unknown {', '.join(map(repr, unknown))}; known kinds: {', '.join(PII_KINDS)}",
        )


def mask_pii(text: str, config: PIIConfig) -> tuple[str, collections.Counter]:
    """``text`` with every enabled kind of personal data replaced by its tag, and the number of replacements per
    kind."""
    counts: collections.Counter = collections.Counter()
    for kind, precheck, mask in _RULES:
        if kind in config.kinds and precheck(text):
            text, count = mask(text, config)
            if count:
                counts[kind] += count
    return text, counts


def _substitute(pattern: re.Pattern, text: str, replace: Callable[[re.Match], str | None]) -> tuple[str, int]:
    """``pattern.sub`` where ``replace`` returns the replacement, or ``None`` to keep a rejected candidate."""
    count = 0

    def replacement(match: re.Match) -> str:
        nonlocal count
        replaced = replace(match)
        if replaced is None:
            return match.group(0)
        count += 1
        return replaced

    return pattern.sub(replacement, text), count


_DIGIT = re.compile(r"\d")


def _has_digit(text: str) -> bool:
    return _DIGIT.search(text) is not None


# --- URL credentials -------------------------------------------------------------------
# Only ``user:password@`` is secret; the scheme and host stay so the URL still reads as one.
# The scheme is bounded so a long dotted run (minified code) cannot make the scan quadratic.
_URL_CREDENTIALS = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]{0,30}://)[^\s/?#@:\[\]]+:[^\s/?#@\[\]]+@")


def _mask_url_credentials(text: str, config: PIIConfig) -> tuple[str, int]:
    return _substitute(_URL_CREDENTIALS, text, lambda match: f"{match.group(1)}{MASKS['url_credentials']}@")


# --- Secrets ---------------------------------------------------------------------------
# Token formats the providers document (and that secret scanners such as gitleaks match).
# Every alternative starts with a literal character, which lets ``re`` skip ahead fast; the
# character before a token is checked in Python instead of by a leading look-behind.
_SECRET_TOKEN = re.compile(
    r"""(?:
        (?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}   # AWS access key ids
      | gh[pousr]_[A-Za-z0-9]{36}                                # GitHub classic tokens
      | github_pat_[A-Za-z0-9_]{82}                              # GitHub fine-grained tokens
      | xox[abposr]-[A-Za-z0-9-]{10,}                            # Slack tokens
      | sk-(?P<openai>(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,})   # OpenAI keys
      | AIza[A-Za-z0-9_-]{35}                                    # Google API keys
      | sk_(?:live|test)_[A-Za-z0-9]{16,}                        # Stripe secret keys
      | rk_(?:live|test)_[A-Za-z0-9]{16,}                        # Stripe restricted keys
    )(?![\w-])""",
    re.VERBOSE,
)
_WORD_OR_DASH = re.compile(r"[\w-]")
# ``api_key = "..."`` and friends, found from the value (a pattern starting with ``[:=]``
# scans fast; one starting with an alternation of names does not), then the name before
# it is checked. The name must end the identifier (``token_url`` is not a secret), and only
# the value is masked so the code around it stays valid.
_ASSIGNED_VALUE = re.compile(r"""[:=]\s*["']?([A-Za-z0-9+/=_.~-]{16,})""")
_SECRET_NAME_BEFORE = re.compile(
    r"""(?<![A-Za-z0-9])
    (?:api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key|client[_-]?secret|secret
      |access[_-]?token|auth[_-]?token|token|password|passwd|pwd)
    ["']?\s*\Z""",
    re.VERBOSE | re.IGNORECASE,
)
SECRET_NAME_CHARACTERS = 40
# Random tokens of 16+ characters have 3.5 to 4.5 bits of entropy per character; names,
# placeholders (YOUR_API_KEY_HERE) and expressions are below, and most lack a digit.
MIN_SECRET_ENTROPY = 3.0


def shannon_entropy(text: str) -> float:
    """Bits per character of the character distribution of ``text``."""
    total = len(text)
    return -sum(count / total * math.log2(count / total) for count in collections.Counter(text).values())


def _looks_random(value: str) -> bool:
    has_letter = any(character.isalpha() for character in value)
    return has_letter and _has_digit(value) and shannon_entropy(value) >= MIN_SECRET_ENTROPY


def _replace_secret_token(match: re.Match) -> str | None:
    if match.start() > 0 and _WORD_OR_DASH.match(match.string, match.start() - 1):
        return None  # the end of a longer word
    # "sk-" also starts ordinary hyphenated words (sk-learn-...): OpenAI keys are mixed case with digits.
    body = match.group("openai")
    if body is not None and not (
        _looks_random(body) and any(c.isupper() for c in body) and any(c.islower() for c in body)
    ):
        return None
    return MASKS["secret"]


def _mask_secrets(text: str, config: PIIConfig) -> tuple[str, int]:
    text, tokens = _substitute(_SECRET_TOKEN, text, _replace_secret_token)

    def replace_assigned(match: re.Match) -> str | None:
        start = match.start()
        if not (
            _looks_random(match.group(1))
            and _SECRET_NAME_BEFORE.search(text, max(0, start - SECRET_NAME_CHARACTERS), start)
        ):
            return None
        return match.group(0)[: match.start(1) - start] + MASKS["secret"]

    text, assignments = _substitute(_ASSIGNED_VALUE, text, replace_assigned)
    return text, tokens + assignments


# --- E-mail ----------------------------------------------------------------------------
_EMAIL = re.compile(
    r"(?<![\w.+-])[\w.+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24})(?![\w-]|\.[A-Za-z0-9])"
)
# Retina image names (icon@2x.png) have the shape of an address; these suffixes are no top-level domain.
_IMAGE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "tif", "tiff"})


def _mask_emails(text: str, config: PIIConfig) -> tuple[str, int]:
    return _substitute(
        _EMAIL, text, lambda match: None if match.group(1).lower() in _IMAGE_SUFFIXES else MASKS["email"]
    )


# --- Payment cards ---------------------------------------------------------------------
# 13 to 19 digits, optionally grouped by single spaces or dashes, not inside a longer number.
_CARD = re.compile(r"\d(?<![\w.-].)(?:[ -]?\d){12,18}(?!\w|[.-]\d)")
# (prefix digits, lowest prefix, highest prefix, allowed lengths): the ISO/IEC 7812 issuer
# ranges the networks publish. A random 16-digit number passes Luhn one time in ten; also
# needing an issuer prefix keeps ids and timestamps in code from being masked.
_CARD_ISSUERS = (
    (1, 4, 4, (13, 16, 19)),  # Visa
    (2, 51, 55, (16,)),  # Mastercard
    (4, 2221, 2720, (16,)),  # Mastercard 2-series
    (2, 34, 34, (15,)),  # American Express
    (2, 37, 37, (15,)),  # American Express
    (4, 6011, 6011, (16, 17, 18, 19)),  # Discover
    (3, 644, 649, (16, 17, 18, 19)),  # Discover
    (2, 65, 65, (16, 17, 18, 19)),  # Discover
    (3, 300, 305, (14, 15, 16, 17, 18, 19)),  # Diners Club
    (2, 36, 36, (14, 15, 16, 17, 18, 19)),  # Diners Club
    (2, 38, 39, (16, 17, 18, 19)),  # Diners Club
    (4, 3528, 3589, (16, 17, 18, 19)),  # JCB
    (2, 62, 62, (16, 17, 18, 19)),  # UnionPay
    (2, 50, 50, tuple(range(13, 20))),  # Maestro
    (2, 56, 69, tuple(range(13, 20))),  # Maestro
)


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check digit test of ISO/IEC 7812-1 annex B."""
    total = 0
    for position, character in enumerate(reversed(digits)):
        value = int(character)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _has_issuer_prefix(digits: str) -> bool:
    return any(
        low <= int(digits[:width]) <= high and len(digits) in lengths for width, low, high, lengths in _CARD_ISSUERS
    )


def _grouped_like_a_card(candidate: str) -> bool:
    """No separators, or one kind of separator after a group of four and between groups of three or more
    (4-4-4-4, 4-6-5)."""
    separators = set(candidate) - set("0123456789")
    if not separators:
        return True
    if len(separators) > 1:
        return False
    groups = candidate.split(separators.pop())
    return len(groups[0]) == 4 and all(len(group) >= 3 for group in groups)


def _replace_card(match: re.Match) -> str | None:
    candidate = match.group(0)
    digits = candidate.replace(" ", "").replace("-", "")
    if _grouped_like_a_card(candidate) and _has_issuer_prefix(digits) and luhn_valid(digits):
        return MASKS["credit_card"]
    return None


def _mask_cards(text: str, config: PIIConfig) -> tuple[str, int]:
    return _substitute(_CARD, text, _replace_card)


# --- National ids --------------------------------------------------------------------
# Only formats with enough structure to rarely match anything else.
# US Social Security numbers, dashed. The SSA never issues area 000, 666 or 900-999, group
# 00 or serial 0000 (SSA, "Social Security Number Randomization", 2011).
_SSN = re.compile(r"\d(?<![\w-].)\d{2}-\d{2}-\d{4}(?!\w|[ .-]\d)")
# UK National Insurance numbers, run together or in pairs: HMRC never uses D, F, I, Q, U, V
# as either prefix letter or O as the second, nor the prefixes below (HMRC National
# Insurance Manual); the suffix is A-D.
_NINO = re.compile(r"[A-CEGHJ-PR-TW-Z](?<![\w-].)[A-CEGHJ-NPR-TW-Z](?:\d{6}|\ \d{2}\ \d{2}\ \d{2}\ )[A-D](?!\w)")
_UNALLOCATED_NINO_PREFIXES = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})
# Canadian Social Insurance numbers, 3-3-3 with one kind of separator: they end in a Luhn
# check digit, and 0 and 8 are not issued as first digits (Service Canada).
_SIN = re.compile(r"[1-79](?<![\w-].)\d{2}([ -])\d{3}\1\d{3}(?!\w|[ .-]\d)")


def _valid_ssn(match: re.Match) -> bool:
    area, group, serial = match.group(0).split("-")
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


_NATIONAL_IDS = (
    (_SSN, _valid_ssn),
    (_NINO, lambda match: match.group(0)[:2] not in _UNALLOCATED_NINO_PREFIXES),
    (_SIN, lambda match: luhn_valid(match.group(0).replace(match.group(1), ""))),
)


def _mask_national_ids(text: str, config: PIIConfig) -> tuple[str, int]:
    total = 0
    for pattern, valid in _NATIONAL_IDS:
        text, count = _substitute(
            pattern, text, lambda match, valid=valid: MASKS["national_id"] if valid(match) else None
        )
        total += count
    return text, total


# --- IP addresses ----------------------------------------------------------------------
# BigCode's StarCoder pipeline keeps private addresses and popular DNS resolvers: they name
# no person or host of one, and masking them garbles configuration files and tutorials.
_PUBLIC_RESOLVERS = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "8.8.8.8",
        "8.8.4.4",
        "1.1.1.1",
        "1.0.0.1",
        "9.9.9.9",
        "149.112.112.112",
        "208.67.222.222",
        "208.67.220.220",
        "76.76.19.19",
        "76.223.122.150",
        "8.26.56.26",
        "8.20.247.20",
        "94.140.14.14",
        "94.140.15.15",
        "2001:4860:4860::8888",
        "2001:4860:4860::8844",
        "2606:4700:4700::1111",
        "2606:4700:4700::1001",
        "2620:fe::fe",
        "2620:fe::9",
    )
)
_IPV4 = re.compile(r"\d(?<![\w.].)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)")
# A dotted quad right after a version word or a version-pin operator is a version
# (``release 1.2.3.4``, ``pkg==1.2.3.4``), and one after "section" a section number
# (HTML5 §8.2.4.44). As in BigCode's filter, a quad of single digits (2.0.1.3) is a
# version too unless a networking word is near it.
_VERSION_BEFORE = re.compile(
    r"""(?:\b(?:v|ver|version|versions|release|rel|build|rev|revision|firmware|update|upgrade|section|sections|chapter|§)\.?|==|>=|<=|~=|!=|\^|~>?)\s*[:=]?\s*["'(]?$""",
    re.IGNORECASE,
)
_NETWORK_WORD = re.compile(
    r"\b(?:ip|ips|ipv4|dns|server|host|hostname|address|addr|gateway|ping|subnet|nameserver|proxy)\b", re.IGNORECASE
)
VERSION_CONTEXT_CHARACTERS = 30
NETWORK_CONTEXT_CHARACTERS = 100

# Cheap pre-check: two colons at most four hex digits apart.
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:]|\.\d)")
# Every address in real use lies in these blocks (IANA IPv6 address space registry); the
# rest of ::/8 is where code lands when ``x[a::b]`` or ``x[1::2]`` parses as an address.
_ASSIGNED_IPV6 = tuple(
    ipaddress.IPv6Network(block)
    for block in ("2000::/3", "fc00::/7", "fe80::/10", "ff00::/8", "::1/128", "::ffff:0:0/96")
)


def _identifies_nobody(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not address.is_global or address.is_multicast or address in _PUBLIC_RESOLVERS


def _is_version(text: str, start: int, end: int) -> bool:
    if _VERSION_BEFORE.search(text, max(0, start - VERSION_CONTEXT_CHARACTERS), start):
        return True
    if end - start == 7:  # four single-digit parts
        return not _NETWORK_WORD.search(
            text, max(0, start - NETWORK_CONTEXT_CHARACTERS), end + NETWORK_CONTEXT_CHARACTERS
        )
    return False


def _mask_ipv4(text: str, config: PIIConfig) -> tuple[str, int]:
    def replace(match: re.Match) -> str | None:
        try:
            address = ipaddress.IPv4Address(match.group(0))
        except ValueError:  # a part above 255 or with a leading zero
            return None
        if _is_version(text, match.start(), match.end()) or (config.keep_private_ips and _identifies_nobody(address)):
            return None
        return MASKS["ipv4"]

    return _substitute(_IPV4, text, replace)


def _mask_ipv6(text: str, config: PIIConfig) -> tuple[str, int]:
    def replace(match: re.Match) -> str | None:
        try:
            address = ipaddress.IPv6Address(match.group(0))
        except ValueError:  # times, MAC addresses, C++ scopes
            return None
        if not any(address in block for block in _ASSIGNED_IPV6) or (
            config.keep_private_ips and _identifies_nobody(address)
        ):
            return None
        return MASKS["ipv6"]

    return _substitute(_IPV6, text, replace)


# --- Phones ----------------------------------------------------------------------------
# International numbers start with + and a country code; the rest is groups split by single
# spaces, dots or dashes, with an optional area code in parentheses (+44 (0)20 ...), or one
# run of digits. E.164 allows at most 15 digits; fewer than 8 is a short code or arithmetic.
_PHONE_INTERNATIONAL = re.compile(
    r"\+(?<![\w+].)(?:\d{1,3}(?:[ .-]?\(\d{1,4}\)[ .-]?\d{1,5})?(?:[ .-]\d{1,5}){1,6}|\d{8,15})(?!\w|[.-]\d)"
)
# North American numbers need a separator and one consistent style, and NANP area codes
# and exchanges never start with 0 or 1: a bare ten-digit run is as likely an id in code.
# Cheap pre-check (a pattern starting with a digit scans fast): the NNN-NNNN ending.
_NORTH_AMERICAN_HINT = re.compile(r"\d{3}[ .-]\d{4}")
_PHONE_NORTH_AMERICAN = re.compile(
    r"(?<![\w+.-])(?:1[ .-])?(?:\([2-9]\d{2}\)\ ?[2-9]\d{2}[ .-]"
    r"|[2-9]\d{2}(?P<separator>[ .-])[2-9]\d{2}(?P=separator))\d{4}(?!\w|[.-]\d)"
)
_DIGIT_GROUP = re.compile(r"\d+")


def _replace_international_phone(match: re.Match) -> str | None:
    groups = _DIGIT_GROUP.findall(match.group(0))
    digits = sum(len(group) for group in groups)
    # Phone numbers are written in groups of two or more; "+1 2 3 4 5 6 7" is a sum.
    single_digit_groups = sum(len(group) == 1 for group in groups[1:])
    return MASKS["phone"] if 8 <= digits <= 15 and single_digit_groups <= 1 else None


def _mask_phones(text: str, config: PIIConfig) -> tuple[str, int]:
    international = 0
    if "+" in text:
        text, international = _substitute(_PHONE_INTERNATIONAL, text, _replace_international_phone)
    north_american = 0
    if _NORTH_AMERICAN_HINT.search(text):
        text, north_american = _substitute(_PHONE_NORTH_AMERICAN, text, lambda match: MASKS["phone"])
    return text, international + north_american


_RULES: tuple[tuple[str, Callable[[str], bool], Callable[[str, PIIConfig], tuple[str, int]]], ...] = (
    ("url_credentials", lambda text: "://" in text, _mask_url_credentials),
    ("secret", lambda text: True, _mask_secrets),
    ("email", lambda text: "@" in text, _mask_emails),
    ("credit_card", _has_digit, _mask_cards),
    ("national_id", _has_digit, _mask_national_ids),
    ("ipv6", lambda text: _IPV6_HINT.search(text) is not None, _mask_ipv6),
    ("ipv4", lambda text: "." in text, _mask_ipv4),
    ("phone", _has_digit, _mask_phones),
)
