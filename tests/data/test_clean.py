from __future__ import annotations

import pickle
import sysconfig
from pathlib import Path

import pytest

from genloop.data.clean import (
    Normalize,
    QualityFilter,
    RemoveStopwords,
    normalize_text,
    repetition_ratio,
    symbol_ratio,
)
from genloop.data.records import Dropped, Record

PROSE = """\
The committee met on Tuesday, 12 March 2024, to review the proposal. After a long
discussion about costs (roughly $3.5 million over five years) and the schedule, most
members agreed that the second option was better: it is cheaper to run, easier to
explain, and it leaves room for the changes we expect next year.

Dr. Okafor asked whether the numbers still hold if demand grows by 20%. They do — the
estimate already assumes growth of 15–25% — but she asked for a short note anyway.
"""

CODE = '''\
#!/usr/bin/env python3
"""Tiny utilities (version 3.11.7)."""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def words(text: str) -> list[str]:
    # Identifiers only; numbers like 0x1F and 1e-9 are skipped.
    return [m.group() for m in _WORD.finditer(text)]


class Counter:
    def __init__(self, items: Iterable[str] = ()) -> None:
        self.counts: dict[str, int] = {}
        for item in items:
            self.counts[item] = self.counts.get(item, 0) + 1

    def __repr__(self) -> str:
        return f"Counter({self.counts!r})"

    def most_common(self, n: int = 1) -> list[tuple[str, int]]:
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return ranked[:n] if n >= 0 else ranked
'''


def rec(text: str | None, **meta: object) -> Record:
    return Record(id="r1", source="test", text=text, meta=dict(meta))


# ------------------------------------------------------------------------------ Normalize


def test_normalize_whitespace_keeps_indentation() -> None:
    text = "\n\n  def f():\r\n      return 1   \r\n\n\n\n\n  x = 2\t\n\n"
    out = Normalize()(rec(text))
    assert isinstance(out, Record)
    assert out.text == "  def f():\n      return 1\n\n\n  x = 2"


def test_normalize_drops_control_characters_but_keeps_tabs() -> None:
    assert normalize_text("a\x00b\x07c\td\x1be\x7f\x0cf") == "abc\tdef"
    assert normalize_text("é\x00ü") == "éü"  # also outside ASCII


def test_normalize_unicode_forms() -> None:
    decomposed = "Cafe\u0301 ﬁne"
    assert normalize_text(decomposed, "NFC") == "Café ﬁne"
    assert normalize_text(decomposed, "NFKC") == "Café fine"
    assert normalize_text(decomposed, "none") == decomposed


def test_normalize_lowercase_and_unicode_trailing_space() -> None:
    assert normalize_text("Hello World\u00a0\nÄ", lowercase=True) == "hello world\nä"


def test_normalize_leaves_clean_text_alone() -> None:
    record = rec("already clean\n  indented")
    original = record.text
    out = Normalize()(record)
    assert isinstance(out, Record) and out.text is original


def test_normalize_passes_records_without_text() -> None:
    image = Record(id="i", source="images", data=b"\x89PNG")
    assert Normalize()(image) is image


def test_normalize_rejects_unknown_form() -> None:
    with pytest.raises(ValueError, match="NFD"):
        Normalize(form="NFD")  # type: ignore[arg-type]


# ------------------------------------------------------------------------ RemoveStopwords


def test_remove_stopwords() -> None:
    out = RemoveStopwords()(rec("The cat sat on the mat.\nIt was THE best of cats, wasn't it?"))
    assert isinstance(out, Record)
    assert out.text == "cat sat mat.\nbest cats, wasn't ?"


def test_remove_stopwords_custom_list() -> None:
    out = RemoveStopwords(frozenset({"Foo"}))(rec("foo bar FOO baz food"))
    assert isinstance(out, Record) and out.text == "bar baz food"


# -------------------------------------------------------------------------- QualityFilter


def reason(result: Record | Dropped) -> str | None:
    return result.reason if isinstance(result, Dropped) else None


def test_quality_keeps_prose_and_code() -> None:
    q = QualityFilter()
    assert reason(q(rec(PROSE))) is None
    assert reason(q(rec(CODE, language="python"))) is None


def test_quality_keeps_real_standard_library_modules() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    q = QualityFilter()
    names = ["textwrap.py", "json/encoder.py", "argparse.py", "ipaddress.py", "string.py"]
    names += ["re/_parser.py", "email/utils.py", "html/parser.py", "shlex.py", "tokenize.py"]
    for name in names:
        text = normalize_text((root / name).read_text(encoding="utf-8"))
        assert reason(q(rec(text))) is None, name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "empty"),
        ("", "empty"),
        (" \n\t \n", "empty"),
        ("too short", "too_short"),
        ("x" * 2001, "too_long"),
        ("Buy cheap watches now!\n" * 50, "repetitive"),
        ("best price buy now " * 100, "repetitive"),
        ("#### ### ##### ## #### #\n" * 3, "symbols"),
        ("\ufffd\ufffd\ufffd garbled \ufffd\ufffd\ufffd\ufffd \ufffd\ufffd\ufffd\ufffd", "symbols"),
        ("🔥🔥🔥 hot deal 🔥🔥🔥🔥🔥🔥 click 🔥🔥🔥🔥🔥", "symbols"),
    ],
)
def test_quality_drops(text: str | None, expected: str) -> None:
    result = QualityFilter(min_chars=20, max_chars=2000)(rec(text))
    assert reason(result) == expected
    assert isinstance(result, Dropped) and result.detail and not result.quarantine


def test_quality_without_upper_limit() -> None:
    text = "\n".join(f"line {i}: value {i * i}" for i in range(100_000))  # ~2.3 MB
    assert reason(QualityFilter()(rec(text))) == "too_long"
    assert reason(QualityFilter(max_chars=None)(rec(text))) is None


def test_quality_passes_images() -> None:
    image = Record(id="i", source="images", data=b"\x89PNG")
    assert QualityFilter()(image) is image


def test_ratios() -> None:
    assert repetition_ratio("a line\nanother line\na line\n") == pytest.approx(6 / 24)
    assert repetition_ratio("one\ntwo\nthree") == 0.0
    assert symbol_ratio("ab##") == 0.5
    assert symbol_ratio("x = {'a': [1, 2]} ** 2 | y & ~z  # done") < 0.05
    assert symbol_ratio("naïve café — «déjà vu»…") == pytest.approx(1 / 23)
    assert symbol_ratio("┌──┐│x│└──┘") > 0.9
    assert symbol_ratio("line one\r\nline two\r\n") == 0.0  # \r is whitespace, not a symbol


@pytest.mark.parametrize(
    "text",
    [
        "नमस्ते दुनिया, यह एक परीक्षण है। हम हिंदी में लिखते हैं।",  # marks are not symbols
        "你好，世界。这是一个测试！「引号」里面的文字也很正常。",  # CJK punctuation neither
        "مرحبا بالعالم، هذا اختبار بسيط للنص العربي.",
        "Prices: 5 € (±2 %), 20 °C → fine; © 2024 Example™.",
    ],
)
def test_quality_keeps_prose_in_any_script(text: str) -> None:
    assert reason(QualityFilter(min_chars=10)(rec(text))) is None


def test_steps_pickle() -> None:
    for step in (Normalize("NFKC", lowercase=True), RemoveStopwords(), QualityFilter(5)):
        clone = pickle.loads(pickle.dumps(step))
        assert clone.name == step.name
        assert vars(clone) == vars(step)
        a, b = clone(rec("The  Text  \n\n\n\n\nhere")), step(rec("The  Text  \n\n\n\n\nhere"))
        assert isinstance(a, Record) and isinstance(b, Record) and a.text == b.text
