import collections
import time

import pytest

from llmkit.data.pii import PII_KINDS, PIIConfig, luhn_valid, mask_pii, shannon_entropy
from llmkit.errors import ConfigError

# Provider tokens are assembled from pieces so this file holds no string that secret
# scanners would flag; every one is made up.
AWS_KEY = "AKIA" + "Z3QW7RTY8UIOP4AS"
GITHUB_TOKEN = "ghp" + "_" + "a1B2c3D4e5F6g7H8i9J0" + "k1L2m3N4o5P6q7R8"
GITHUB_FINE_GRAINED = "github_pat" + "_" + "11ABCDEFG0aB3dE6gH9jK2" + "_" + "mN5pQ8sT1v" * 5 + "xY4zA7bC0"
SLACK_TOKEN = "xox" + "b-123456789012-1234567890123-" + "AbCdEfGhIjKlMnOpQrStUvWx"
OPENAI_KEY = "sk" + "-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAB7cDe0fGh3iJk6l"
GOOGLE_KEY = "AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"
STRIPE_KEY = "sk" + "_live_" + "4eC39HqLyjWDarjtT1zdp7dc"

# (text, masked text, replacements per kind): every kind in several formats.
POSITIVES = [
    ("Contact john.doe+news@example.co.uk today.", "Contact <EMAIL> today.", {"email": 1}),
    ("mailto:Jane_Smith@mail-server.org.", "mailto:<EMAIL>.", {"email": 1}),
    ("call +1 (415) 555-2671 now", "call <PHONE> now", {"phone": 1}),
    ("London: +44 20 7946 0958", "London: <PHONE>", {"phone": 1}),
    ("London: +44 (0)20 7946 0958", "London: <PHONE>", {"phone": 1}),
    ("sms +14155552671", "sms <PHONE>", {"phone": 1}),
    ("Paris +33 1 23 45 67 89.", "Paris <PHONE>.", {"phone": 1}),
    ("office (415) 555-2671, fax 415-555-2672", "office <PHONE>, fax <PHONE>", {"phone": 2}),
    ("415.555.2671 or 1-800-555-0199", "<PHONE> or <PHONE>", {"phone": 2}),
    ("host 93.184.216.34 answered", "host <IP_ADDRESS> answered", {"ipv4": 1}),
    ("ssh root@203.0.114.7", "ssh root@<IP_ADDRESS>", {"ipv4": 1}),
    ("the ip is 1.2.3.4", "the ip is <IP_ADDRESS>", {"ipv4": 1}),
    ("peer 2a00:1450:4001:82a::200e up", "peer <IP_ADDRESS> up", {"ipv6": 1}),
    ("peer 2a00:1450:4001:082a:0000:0000:0000:200e up", "peer <IP_ADDRESS> up", {"ipv6": 1}),
    ("https://[2606:2800:220:1:248:1893:25c8:1946]:443/", "https://[<IP_ADDRESS>]:443/", {"ipv6": 1}),
    ("mapped ::ffff:93.184.216.34", "mapped <IP_ADDRESS>", {"ipv6": 1}),
    ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok", {"credit_card": 1}),
    ("card 5555-5555-5555-4444 ok", "card <CREDIT_CARD> ok", {"credit_card": 1}),
    ("amex 3782 822463 10005 or 378282246310005", "amex <CREDIT_CARD> or <CREDIT_CARD>", {"credit_card": 2}),
    ("discover=6011111111111117;", "discover=<CREDIT_CARD>;", {"credit_card": 1}),
    ("SSN: 123-45-6789.", "SSN: <ID>.", {"national_id": 1}),
    ("NI number AB123456C or AB 12 34 56 C", "NI number <ID> or <ID>", {"national_id": 2}),
    ("SIN 130 692 544 and 193-456-787", "SIN <ID> and <ID>", {"national_id": 2}),
    (
        "git clone https://alice:s3cr3t@github.com/org/repo.git",
        "git clone https://<CREDENTIALS>@github.com/org/repo.git",
        {"url_credentials": 1},
    ),
    (
        "DATABASE_URL=postgres://admin:hunter2@db.example.com:5432/app",
        "DATABASE_URL=postgres://<CREDENTIALS>@db.example.com:5432/app",
        {"url_credentials": 1},
    ),
    (f"aws_access_key_id = {AWS_KEY}", "aws_access_key_id = <SECRET>", {"secret": 1}),
    (f"push with {GITHUB_TOKEN} or {GITHUB_FINE_GRAINED}", "push with <SECRET> or <SECRET>", {"secret": 2}),
    (f"SLACK={SLACK_TOKEN}", "SLACK=<SECRET>", {"secret": 1}),
    (f"client = OpenAI({OPENAI_KEY!r})", "client = OpenAI('<SECRET>')", {"secret": 1}),
    (f"maps key {GOOGLE_KEY}", "maps key <SECRET>", {"secret": 1}),
    (f"stripe.api_key = '{STRIPE_KEY}'", "stripe.api_key = '<SECRET>'", {"secret": 1}),
    ('api_key = "9f8a7b6c5d4e3f2a1b0c9d8e"', 'api_key = "<SECRET>"', {"secret": 1}),
    ('{"password": "Zx81Kq0Lm3Nb7Vc2Xz9"}', '{"password": "<SECRET>"}', {"secret": 1}),
    ("export AUTH_TOKEN=q8W3e7R1t5Y9u2I6o0P4", "export AUTH_TOKEN=<SECRET>", {"secret": 1}),
]

# Look-alikes that must come out unchanged.
LOOK_ALIKES = [
    "version 1.2.3.4, v2.10.4.1, Python 3.11.7, 1.2.3",
    "pip install pkg==4.5.6.7",
    "Upgrade to 2.0.1.3 today.",
    'HTML5 sections "8.2.4.44 Bogus comment state"',
    "dates 2024-01-15, 15/01/2024, 15.01.2024, 2024-01-15T10:30:00Z",
    "times 10:30:45 and 12:30",
    "commit da39a3ee5e6b4b0d3255bfef95601890afd80709",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "ISBN 978-0-306-40615-7, 0-306-40615-2, 9780306406157",
    "x = 4111111111111112  # fails Luhn",
    "id = 1234567812345670  # passes Luhn, but no card network starts with 1",
    "timeout = 4155552671",
    "total = 12345678901234567890",
    "+1 2 3 4 5 6 7 8",
    "semver 1.0.0+20130313144700, offset +05:30",
    "listen 127.0.0.1:8080, lan 192.168.1.10, vpn 10.0.0.1, dns 8.8.8.8",
    "loopback ::1, link fe80::1%eth0, docs 2001:db8::1, resolver 2606:4700:4700::1111",
    "x[a::b] + y[1::2]; std::vector<int>; mac 00:1A:2B:3C:4D:5E",
    "user@ without a domain, @decorator, icon@2x.png",
    "invalid SSNs 000-12-3456 666-12-3456 912-34-5678 123-00-4567 123-45-0000",
    "not NINOs QQ123456C GB123456A",
    "not a SIN 130 692 545",
    "sk-learn-compatible-estimator-wrapper",
    f"MY{AWS_KEY} is one longer word, not a key",
    "password=correcthorsebatterystaple",
    "token = get_token_from_env()",
    "api_key = YOUR_API_KEY_HERE",
    "GITHUB_TOKEN=${GITHUB_TOKEN}",
    "tokenizer = 'gpt2-tokenizer-v1.json'",
    "token_url = 'https://example.com/oauth2/token'",
]


@pytest.mark.parametrize("text, masked, counts", POSITIVES)
def test_positives_are_masked_exactly(text, masked, counts):
    assert mask_pii(text, PIIConfig()) == (masked, collections.Counter(counts))


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_survive(text):
    assert mask_pii(text, PIIConfig()) == (text, collections.Counter())


def test_precision_and_recall_on_the_labelled_set():
    true_positives = collections.Counter()
    false_positives = collections.Counter()
    false_negatives = collections.Counter()
    labelled = POSITIVES + [(text, text, {}) for text in LOOK_ALIKES]
    for text, _, expected in labelled:
        _, found = mask_pii(text, PIIConfig())
        for kind in PII_KINDS:
            true_positives[kind] += min(found[kind], expected.get(kind, 0))
            false_positives[kind] += max(0, found[kind] - expected.get(kind, 0))
            false_negatives[kind] += max(0, expected.get(kind, 0) - found[kind])
    for kind in PII_KINDS:
        assert true_positives[kind] >= 2, f"{kind}: the labelled set needs several positives"
        precision = true_positives[kind] / (true_positives[kind] + false_positives[kind])
        recall = true_positives[kind] / (true_positives[kind] + false_negatives[kind])
        assert (precision, recall) == (1.0, 1.0), kind


def test_counts_add_up_across_kinds_in_one_document():
    text = "Mail a@example.com or b@example.org, call +44 20 7946 0958, card 4111 1111 1111 1111."
    masked, counts = mask_pii(text, PIIConfig())
    assert masked == "Mail <EMAIL> or <EMAIL>, call <PHONE>, card <CREDIT_CARD>."
    assert counts == collections.Counter({"email": 2, "phone": 1, "credit_card": 1})


def test_only_the_configured_kinds_are_masked():
    text = "a@example.com +44 20 7946 0958 93.184.216.34"
    assert mask_pii(text, PIIConfig(kinds=["email"])) == (
        "<EMAIL> +44 20 7946 0958 93.184.216.34",
        collections.Counter({"email": 1}),
    )
    assert mask_pii(text, PIIConfig(kinds="phone,ipv4"))[0] == "a@example.com <PHONE> <IP_ADDRESS>"
    assert mask_pii(text, PIIConfig(kinds=[])) == (text, collections.Counter())


def test_private_addresses_are_masked_when_asked_but_code_still_is_not_an_address():
    config = PIIConfig(keep_private_ips=False)
    masked, counts = mask_pii("lan 192.168.1.10, dns 8.8.8.8, link fe80::1, slice x[a::b], version 1.2.3.4", config)
    assert masked == "lan <IP_ADDRESS>, dns <IP_ADDRESS>, link <IP_ADDRESS>, slice x[a::b], version 1.2.3.4"
    assert counts == collections.Counter({"ipv4": 2, "ipv6": 1})


def test_single_digit_quads_are_addresses_only_near_a_networking_word():
    assert mask_pii("Upgrade to 2.0.1.3 today.", PIIConfig())[0] == "Upgrade to 2.0.1.3 today."
    assert mask_pii("The server at 2.0.1.3 is down.", PIIConfig())[0] == "The server at <IP_ADDRESS> is down."


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="config field 'kinds'.*unknown 'emails'; known kinds: email, phone"):
        PIIConfig(kinds=["email", "emails"])


def reference_luhn(digits: str) -> bool:
    # Double every second digit from the right and add the digits of the products.
    total = 0
    for position, character in enumerate(reversed(digits)):
        product = int(character) * (2 if position % 2 else 1)
        total += sum(int(digit) for digit in str(product))
    return total % 10 == 0


def test_luhn_matches_the_textbook_definition():
    numbers = ["79927398713", "4111111111111111", "4111111111111112"] + [
        str(number) for number in range(10**12, 10**12 + 500)
    ]
    assert luhn_valid("79927398713")  # the worked example of ISO/IEC 7812-1
    assert [luhn_valid(number) for number in numbers] == [reference_luhn(number) for number in numbers]


def test_shannon_entropy_of_hand_worked_strings():
    assert shannon_entropy("aaaa") == 0.0
    assert shannon_entropy("aabb") == 1.0
    assert shannon_entropy("abcdefgh") == 3.0


@pytest.mark.parametrize(
    "adversarial",
    [
        "a." * 50_000,  # long dotted runs (schemes, domains)
        "1." * 50_000,  # dotted numbers (IPv4)
        "1-" * 50_000,  # dashed digits (cards, phones, ids)
        "a:" * 50_000,  # colon runs (IPv6)
        "x" * 100_000 + "@",  # a huge local part with no domain
        "+1 " * 30_000,  # phone groups that never end
        "token=" * 20_000,  # assignments with no value
    ],
    ids=[
        "dotted letters",
        "dotted digits",
        "dashed digits",
        "colons",
        "local part only",
        "phone groups",
        "assignments",
    ],
)
def test_no_catastrophic_backtracking(adversarial):
    start = time.perf_counter()
    mask_pii(adversarial, PIIConfig())
    # Linear scans take milliseconds; a quadratic one on 100 kB takes minutes.
    assert time.perf_counter() - start < 2.0
