"""`server_text`: the gate every string from a server passes before batchrun stores or prints it."""

from __future__ import annotations

import pytest

from batchrun.servertext import MIN_SECRET_CHARS, server_text

TOKEN = "sk-GATE-31415926"


@pytest.mark.parametrize(("given", "expected"), [
    ("plain text", "plain text"),
    ("two\nlines\r\nand\ttabs\u2028sep\u0085nel", "two lines and tabs sep nel"),
    ("\x1b[31mred\x1b[0m", "\ufffd[31mred\ufffd[0m"),  # ANSI: the escape is gone, the rest is visible
    ("\x1b]0;title\x07", "\ufffd]0;title\ufffd"),  # OSC
    ("\x9b2J\x85", "\ufffd2J"),  # C1 CSI, C1 NEL
    ("abc\u202eevil\u2066x\u200b", "abc\ufffdevil\ufffdx\ufffd"),  # bidi overrides, zero-width
    ("\ud800lone surrogate", "\ufffdlone surrogate"),
    (b"bytes \xff\xfe ok", "bytes \ufffd\ufffd ok"),
    (42, "42"),
    ("   ", ""),
])
def test_control_characters_are_neutralised_and_lines_joined(given, expected):
    assert server_text(given) == expected


def test_text_is_capped_with_a_mark():
    assert server_text("x" * 270_000, 300) == "x" * 299 + "…"
    assert len(server_text("é" * 5000, 10)) == 10


@pytest.mark.parametrize("given", [
    TOKEN, f"a{TOKEN}b", f"{' ' * 5000}{TOKEN}", "x" * 1195 + TOKEN, f"\x1b[0m{TOKEN}\x1b[0m",
    TOKEN.encode(), (" " * 100_000 + TOKEN).encode(),
])
def test_the_token_never_comes_out_whole_or_in_part(given):
    text = server_text(given, 300, (TOKEN,))
    assert TOKEN[:6] not in text


def test_pieces_split_by_controls_are_not_joined_into_the_token():
    assert TOKEN not in server_text(TOKEN[:5] + "\u200b" + TOKEN[5:], 300, (TOKEN,))


def test_a_token_too_short_to_be_one_does_not_blank_ordinary_words():
    short = "t" * (MIN_SECRET_CHARS - 1)
    assert server_text("completed", secrets=("t",)) == "completed"
    assert server_text(f"x{short}x", secrets=(short,)) == f"x{short}x"


@pytest.mark.parametrize(("given", "expected"), [
    (f"echo {TOKEN.lower()} and {TOKEN.upper()}", "echo *** and ***"),  # ASCII text, any letter case
    (f"é {TOKEN.swapcase()} é", "é *** é"),  # non-ASCII text takes the full search
    ("no secret here at all", "no secret here at all"),
    ("sk-gate-31415926".replace("s", "\u017f"), "***"),  # long s: IGNORECASE matches it, so it is blanked
])
def test_the_token_is_blanked_in_any_letter_case_and_only_there(given, expected):
    assert server_text(given, 300, (TOKEN, "a-second-secret-value")) == expected
