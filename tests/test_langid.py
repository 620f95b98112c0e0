import math

import pytest

from llmkit.data import langid
from llmkit.data.langid import LanguageConfig, identify_language, language_filter, supported_languages
from llmkit.errors import ConfigError

SENTENCES = {
    "en": "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "de": "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer zuschaut.",
    "fr": "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde.",
    "es": "El rápido zorro marrón salta sobre el perro perezoso mientras el granjero mira desde el porche.",
}
# Short enough that the model is unsure: its probability sits well inside (0, 1).
UNSURE_GERMAN = "Danke schön"


@pytest.mark.parametrize("language", sorted(SENTENCES))
def test_sentences_identified(language):
    identified, score = identify_language(SENTENCES[language], LanguageConfig())
    assert identified == language
    assert score > 0.99


def test_score_is_the_normalised_probability_of_langids_ranking():
    # The model's unnormalised log-probabilities (the shared model: loading another costs seconds), normalised here.
    model = langid._full_identifier()
    log_probabilities = model.nb_classprobs(model.instance2fv(UNSURE_GERMAN))
    best = max(log_probabilities)
    total = sum(math.exp(log_probability - best) for log_probability in log_probabilities)
    language, score = identify_language(UNSURE_GERMAN, LanguageConfig())
    assert language == model.nb_classes[list(log_probabilities).index(best)] == "de"
    assert score == pytest.approx(1 / total, rel=1e-9)
    assert 0.5 < score < 0.99


def test_keep_and_drop_by_language():
    german = SENTENCES["de"]
    assert language_filter(german, LanguageConfig(keep=["en"]))[0] == "language:de"
    assert language_filter(german, LanguageConfig(keep=["en", "de"]))[0] is None
    assert language_filter(german, LanguageConfig(keep=[]))[0] is None
    reason, language, score = language_filter(SENTENCES["en"], LanguageConfig())
    assert (reason, language) == (None, "en") and score > 0.99


def test_threshold_flips_the_decision_at_the_score():
    _, score = identify_language(UNSURE_GERMAN, LanguageConfig())
    at_score = LanguageConfig(keep=["de"], min_score=score)
    just_above = LanguageConfig(keep=["de"], min_score=math.nextafter(score, 1.0))
    assert language_filter(UNSURE_GERMAN, at_score) == (None, "de", score)
    assert language_filter(UNSURE_GERMAN, just_above) == ("language:low_score", "de", score)
    # Keeping every language still applies the threshold.
    assert language_filter(UNSURE_GERMAN, LanguageConfig(keep=[], min_score=0.999))[0] == "language:low_score"


def test_text_without_language_is_dropped_for_its_low_score():
    for text in ("", "12 34 56", "+++ --- ***"):
        assert language_filter(text, LanguageConfig())[0] == "language:low_score"


def test_candidates_restrict_the_model_and_renormalise():
    english = SENTENCES["en"]
    language, score = identify_language(english, LanguageConfig(keep=["de"], candidates=["de", "fr"]))
    assert language in ("de", "fr")
    _, unsure_full = identify_language(UNSURE_GERMAN, LanguageConfig())
    _, unsure_two = identify_language(UNSURE_GERMAN, LanguageConfig(keep=["de"], candidates=["de", "en"]))
    assert unsure_two > unsure_full  # probability mass of the 95 other languages goes to the two left
    # The restricted copy leaves the shared model untouched.
    assert identify_language(english, LanguageConfig()) == ("en", pytest.approx(1.0))


def test_only_the_prefix_is_classified():
    text = SENTENCES["en"] + " " + " ".join([SENTENCES["de"]] * 10)
    assert identify_language(text, LanguageConfig(max_characters=len(SENTENCES["en"])))[0] == "en"
    assert identify_language(text, LanguageConfig(max_characters=None))[0] == "de"


@pytest.mark.parametrize(
    "options, field, value",
    [
        ({"keep": ["en", "xx"]}, "keep", "xx"),
        ({"candidates": ["english"]}, "candidates", "english"),
        ({"keep": ["en"], "candidates": ["de", "fr"]}, "keep", "en"),
        ({"candidates": []}, "candidates", []),
        ({"min_score": 1.5}, "min_score", 1.5),
        ({"max_characters": 0}, "max_characters", 0),
    ],
)
def test_bad_config_names_field_and_value(options, field, value):
    with pytest.raises(ConfigError) as error:
        LanguageConfig(**options)
    assert (error.value.field, error.value.value) == (field, value)


def test_supported_languages_are_the_models():
    languages = supported_languages()
    assert len(languages) == 97 and {"en", "de", "fr", "es", "zh"} <= set(languages)
