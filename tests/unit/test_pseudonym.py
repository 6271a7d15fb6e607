"""Keyed pseudonyms: stable per id, unlinkable across keys and id kinds."""

from __future__ import annotations

import pytest

from sinks.pseudonym import DIGEST_BYTES, Pseudonymiser


def test_same_id_same_key_gives_the_same_pseudonym() -> None:
    first, second = Pseudonymiser(b"k1"), Pseudonymiser(b"k1")
    assert first.pseudonym("user-42", "user") == second.pseudonym("user-42", "user")
    assert len(first.pseudonym("user-42", "user")) == 2 * DIGEST_BYTES


def test_another_key_gives_another_pseudonym() -> None:
    assert Pseudonymiser(b"k1").pseudonym("user-42") != Pseudonymiser(b"k2").pseudonym("user-42")


def test_user_and_card_ids_with_the_same_text_do_not_link() -> None:
    pseudonyms = Pseudonymiser(b"k1")
    assert pseudonyms.pseudonym("x1", "user") != pseudonyms.pseudonym("x1", "card")


def test_pseudonym_does_not_contain_the_id_and_differs_between_ids() -> None:
    pseudonyms = Pseudonymiser(b"k1")
    values = {pseudonyms.pseudonym(f"user-{i}") for i in range(1000)}
    assert len(values) == 1000
    assert not any("user" in value for value in values)


def test_empty_id_stays_empty_and_empty_key_is_refused() -> None:
    assert Pseudonymiser(b"k1").pseudonym("") == ""
    with pytest.raises(ValueError, match="key"):
        Pseudonymiser(b"")


def test_long_keys_are_accepted() -> None:
    long_key = b"k" * 200
    assert Pseudonymiser(long_key).pseudonym("u") != Pseudonymiser(b"k" * 199).pseudonym("u")
