"""Generation metrics on crafted strings, and seeded generation on a tiny model."""

import pytest

from smartprune.evaluation.generation import (
    GenerationConfig,
    generate,
    generation_quality,
    meaningless,
    reference_vocabulary,
    repetition,
    units,
)


def test_units_are_lowercase_words_numbers_or_single_symbols():
    assert units("The cat's 3 HATS!") == ["the", "cat", "'", "s", "3", "hats", "!"]
    assert units(",,") == [",", ","]


def test_repetition_counts_units_inside_a_repeated_four_gram():
    assert repetition("a b c d a b c d") == pytest.approx(4 / 8)
    assert repetition("a b c d e f g h") == 0.0
    # "a a a a a a": 4-grams at ends 4,5,6 all equal; the 2nd and 3rd are repeats, covering words 2..6
    assert repetition("a a a a a a") == pytest.approx(5 / 6)
    assert repetition("") == 0.0
    # punctuation counts: a run of commas (what a broken model writes) is all repetition
    assert repetition(",,,,,,,,") == pytest.approx(7 / 8)  # all but the first comma
    assert repetition("a, b. a, b.") == pytest.approx(4 / 8)  # units a , b . a , b .: "a , b ." repeats


def test_meaningless_is_the_share_of_words_outside_the_vocabulary():
    vocab = reference_vocabulary("The cat sat on the <unk> mat .")
    assert vocab == frozenset({"the", "cat", "sat", "on", "mat"})
    assert meaningless("the cat flew 42 zzq", vocab) == pytest.approx(2 / 4)  # numbers not counted
    assert meaningless("the cat, the mat.", vocab) == 0.0  # punctuation not counted
    assert meaningless("42", vocab) == 1.0  # no alphabetic word at all: says nothing
    assert meaningless(",,,,", vocab) == 1.0


def test_generation_is_seeded_and_writes_every_token(model_dirs):
    import smartprune

    loaded = smartprune.load_model(model_dirs["llama"])
    a = generate(loaded.model, loaded.tokenizer, "Once upon a time", 12, greedy=False, seed=3)
    b = generate(loaded.model, loaded.tokenizer, "Once upon a time", 12, greedy=False, seed=3)
    assert a == b and len(a) == 12
    out = generation_quality(loaded.model, loaded.tokenizer, GenerationConfig(lengths=(4, 12)),
                             reference_vocabulary("once upon a time the revolution"))
    assert set(out) >= {"repetition@4", "meaningless@12", "texts"}
    assert 0.0 <= out["meaningless@12"] <= 1.0
