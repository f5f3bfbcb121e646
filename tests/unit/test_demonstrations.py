"""In-context demonstrations: which train examples, how they are written, what is left."""

import pytest

from blackbox.tasks import Example, TaskError, get_task, pick_demonstrations, place_prompt, validate_template
from blackbox.tasks import with_demonstrations


def _train(per_label: int, labels: int = 2) -> list[Example]:
    return [Example(f"text {label}-{i}", None, label) for i in range(per_label) for label in range(labels)]


def test_each_label_gives_its_share_and_the_rest_keeps_its_order():
    train = _train(4, labels=3)
    demonstrations, rest = pick_demonstrations(train, 2, seed=13, num_classes=3)
    assert sorted(e.label for e in demonstrations) == [0, 0, 1, 1, 2, 2]
    assert len(rest) == len(train) - 6
    assert not set(demonstrations) & set(rest)
    assert rest == [e for e in train if e not in demonstrations]


def test_the_draw_follows_the_seed():
    train = _train(8)
    first = pick_demonstrations(train, 1, seed=13, num_classes=2)[0]
    assert first == pick_demonstrations(train, 1, seed=13, num_classes=2)[0]
    draws = {tuple(pick_demonstrations(train, 1, seed=s, num_classes=2)[0]) for s in range(20)}
    assert len(draws) > 1


def test_zero_takes_nothing():
    train = _train(2)
    assert pick_demonstrations(train, 0, seed=1, num_classes=2) == ([], train)


@pytest.mark.parametrize("per_class, message", [(2, "label 1: 2"), (-1, ">= 0")])
def test_too_many_or_negative_is_refused(per_class, message):
    train = _train(3)[:-1]  # label 1 has two examples
    with pytest.raises(TaskError, match=message):
        pick_demonstrations(train, per_class, seed=1, num_classes=2)


def test_a_label_absent_from_train_is_named():
    with pytest.raises(TaskError, match="label 2: 0"):
        pick_demonstrations(_train(3), 1, seed=1, num_classes=3)


def test_demonstrations_are_the_template_filled_with_their_label_words():
    template = "Review: {text_a}\nSentiment{prompt}: {mask}"
    demonstrations = [Example("a fine film", None, 1), Example("dull", None, 0)]
    written = with_demonstrations(template, demonstrations, ("bad", "great"))
    assert written == ("Review: a fine film\nSentiment: great\n\nReview: dull\nSentiment: bad\n\n" + template)
    validate_template(written, is_pair=False)


def test_pair_texts_and_braces_in_texts_keep_the_template_valid():
    task = get_task("rte")
    template = place_prompt(task.template_for("causal"), "tail")
    demonstrations = [Example("a {mask} here", "and {text_b}", 0)]
    written = with_demonstrations(template, demonstrations, task.verbalizer)
    validate_template(written, is_pair=True)
    assert written.startswith("a (mask) here\nQuestion: and (text_b) True? Yes or No?\nAnswer: Yes\n\n")
    assert written.count("{prompt}") == 1 and written.endswith("{mask}")


def test_no_demonstrations_leave_the_template_alone():
    assert with_demonstrations("{text_a} {mask}", [], ("a", "b")) == "{text_a} {mask}"


def test_a_class_of_several_words_answers_with_its_first():
    written = with_demonstrations("{text_a} {mask}", [Example("fine", None, 1)], ("bad|awful", "great|good"))
    assert written == "fine great\n\n{text_a} {mask}"


def test_the_label_words_of_p0_are_every_word_of_every_class():
    from blackbox.tune_config import TuneConfig, prompt_init_text

    assert prompt_init_text(TuneConfig(prompt_init="labels"), ("bad|awful", "great")) == "bad awful great"
    assert prompt_init_text(TuneConfig(prompt_init="text=Is it good?"), ("bad", "great")) == "Is it good?"
    assert prompt_init_text(TuneConfig(), ("bad", "great")) == ""
