from __future__ import annotations

import ast
import pickle
import sys
from pathlib import Path

import pytest

from genloop.data.code import (
    FormatCode,
    RequireParse,
    StripLicenseHeader,
    ruff_binary,
    strip_license_header,
)
from genloop.data.records import Dropped, Record
from genloop.data.steps import Steps, process_chunk
from genloop.errors import GenloopError


def rec(text: str, language: str | None = "python", **meta: object) -> Record:
    if language is not None:
        meta["language"] = language
    return Record(id="r", source="code", text=text, meta=dict(meta))


# ---------------------------------------------------------------------------- RequireParse


def test_parseable_python_passes() -> None:
    record = rec("def f(x):\n    return x * 2\n")
    assert RequireParse()(record) is record


def test_unparseable_python_is_dropped_with_line() -> None:
    out = RequireParse()(rec("x = 1\ndef f(:\n    pass\n"))
    assert isinstance(out, Dropped)
    assert out.reason == "unparseable" and out.quarantine
    assert "line 2" in out.detail


def test_python_2_and_bad_indentation_and_nul_are_dropped() -> None:
    for text in ['print "hello"\n', "if x:\npass\n", "x = 1\x00\n"]:
        out = RequireParse()(rec(text))
        assert isinstance(out, Dropped) and out.reason == "unparseable", text


def test_other_languages_pass_and_path_decides_without_language() -> None:
    js = rec("function f( {", language="javascript")
    assert RequireParse()(js) is js
    by_path = rec("def (", language=None, path="pkg/mod.py")
    assert isinstance(RequireParse()(by_path), Dropped)
    unknown = rec("def (", language=None)
    assert RequireParse()(unknown) is unknown


def test_warnings_do_not_escape() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record = rec('pattern = "\\d+"\n')  # an invalid escape warns when compiled
        assert RequireParse()(record) is record


# ---------------------------------------------------------------------- StripLicenseHeader

PY_HEADER = """\
#!/usr/bin/env python3
# -*- coding: utf-8 -*-
# Copyright (c) 2021 Example Corp.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.

# This module parses things.
import os
"""


def test_python_license_comment_removed_shebang_and_coding_kept() -> None:
    out = StripLicenseHeader()(rec(PY_HEADER))
    assert isinstance(out, Record)
    assert out.text == (
        "#!/usr/bin/env python3\n# -*- coding: utf-8 -*-\n# This module parses things.\nimport os\n"
    )


def test_several_license_paragraphs_are_removed() -> None:
    text = (
        "# Copyright 2020 A. Person\n#\n\n"
        "# Permission is hereby granted, free of charge, to any person obtaining a copy\n\n"
        '# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND.\n\n'
        "x = 1\n"
    )
    assert strip_license_header(text, "python") == "x = 1\n"


def test_license_docstring_removed_but_ordinary_docstring_kept() -> None:
    licensed = (
        '"""Copyright 2019 Someone.\n\nMIT License. Permission is hereby granted."""\n\nimport re\n'
    )
    assert strip_license_header(licensed, "python") == "import re\n"
    ordinary = '"""Tools for parsing.\n\nCopyright 2019 Someone."""\nimport re\n'
    assert strip_license_header(ordinary, "python") == ordinary


def test_no_header_leaves_record_alone() -> None:
    record = rec("# Utilities for strings.\nimport re\n")
    original = record.text
    out = StripLicenseHeader()(record)
    assert isinstance(out, Record) and out.text is original


def test_c_style_headers() -> None:
    c = "/*\n * Copyright (C) 2010 Foo\n * SPDX-License-Identifier: GPL-2.0\n */\n\n"
    c += "#include <stdio.h>\n"
    assert strip_license_header(c, "c") == "#include <stdio.h>\n"
    js = "// Copyright 2022 Bar. All rights reserved.\n"
    js += "// Use of this source code is governed by a license.\n'use strict';\n"
    assert strip_license_header(js, "javascript") == "'use strict';\n"
    lua = "-- Copyright 2015 Baz, MIT license\nlocal x = 1\n"
    assert strip_license_header(lua, "lua") == "local x = 1\n"
    # not a license: kept; code on the comment's last line: kept
    assert strip_license_header("/* helpers */\nint x;\n", "c") == "/* helpers */\nint x;\n"
    tricky = "/* Copyright 2010 */ int x;\n"
    assert strip_license_header(tricky, "c") == tricky


def test_unknown_language_uses_the_first_line() -> None:
    assert strip_license_header("/* Licensed under MIT */\nx\n") == "x\n"
    assert strip_license_header("# Copyright 2001 Q\nx = 1\n") == "x = 1\n"
    include = "#include <license.h>\nint x;\n"
    assert strip_license_header(include) == include


# ------------------------------------------------------------------------------ FormatCode

MESSY = "import os\nx=1\ndef f(a,b):\n\tif a:\n\t\treturn {'k':a+b}   \n\treturn None\n"
FORMATTED = (
    'import os\n\nx = 1\n\n\ndef f(a, b):\n    if a:\n        return {"k": a + b}\n'
    "    return None\n"
)


def test_format_python_with_ruff_keeps_the_syntax_tree() -> None:
    record = rec(MESSY)
    out = FormatCode()(record)
    assert out is record and out.text == FORMATTED
    assert ast.dump(ast.parse(out.text)) == ast.dump(ast.parse(MESSY))
    clean = rec(FORMATTED)
    original = clean.text
    assert FormatCode()(clean).text is original  # type: ignore[union-attr]  # unchanged


def test_format_drops_what_ruff_cannot_parse_with_its_message() -> None:
    out = FormatCode()(rec("x = 1\ndef f(:\n\treturn 1  \n"))
    assert isinstance(out, Dropped)
    assert out.reason == "unformattable" and out.quarantine
    assert out.detail.startswith("2:7: ")  # line:column: ruff's message, no temp path
    assert "genloop-ruff" not in out.detail


def test_format_keeps_a_docstring_ruff_reindents() -> None:
    # ruff re-indents docstrings and strips their trailing whitespace: the string changes,
    # what it documents does not (Black's safety check compares docstrings so, too)
    text = 'class A:\n  def f(self):\n        """Doc.\n\n          more   \n        """\n'
    out = FormatCode()(rec(text))
    assert not isinstance(out, Dropped)
    assert out.text == 'class A:\n    def f(self):\n        """Doc.\n\n        more\n        """\n'


def test_a_formatting_that_changes_the_program_is_dropped() -> None:
    # the guard against a formatter bug: any other change of the tree is refused
    from genloop.data.code import _check_formatted

    out = _check_formatted(rec("x = 1\n"), "x = 2\n")
    assert isinstance(out, Dropped)
    assert out.reason == "format_changed_ast" and not out.quarantine
    doc = _check_formatted(rec('def f():\n    """a b"""\n'), 'def f():\n    """a  b"""\n')
    assert isinstance(doc, Dropped)  # words inside a docstring line still count


def test_format_a_batch_keeps_each_answer_with_its_record() -> None:
    texts = [MESSY, "def broken(:\n", FORMATTED, 'class A:\n  """x\n  """\n', "y=2"]
    records = [rec(t) for t in texts]
    records.append(rec("int main() {  \n  return 0;\t\n}\n\n\n", language="c"))
    records.append(rec("line with hard break  \nnext", language="markdown"))
    records.append(rec("def f(): ...\nclass A:\n    x: int\n", language=None, path="a.pyi"))
    out = FormatCode().batch(records)
    assert [o.reason if isinstance(o, Dropped) else o.text for o in out] == [
        FORMATTED,
        "unformattable",
        FORMATTED,
        'class A:\n    """x"""\n',
        "y = 2",  # no final newline before (normalize strips it), none after
        "int main() {\n  return 0;\n}\n",
        "line with hard break  \nnext",
        "def f(): ...\n\nclass A:\n    x: int\n",  # a stub: one blank line, not two
    ]
    assert FormatCode().batch([]) == []


def test_format_drops_text_python_cannot_encode() -> None:
    out = FormatCode()(rec("x = '\udc80'\n"))  # a lone surrogate: no UTF-8 for it
    assert isinstance(out, Dropped) and out.reason == "unformattable"
    assert "not valid Unicode" in out.detail


def test_format_counts_changed_and_dropped_in_a_chunk() -> None:
    steps = Steps([RequireParse(), FormatCode()], False, False, 0, 0, binary=False)
    records = [rec(MESSY), rec(FORMATTED), rec("def f(:\n"), rec('def f():\n  """a\n  """\n')]
    outcomes, counts = process_chunk(records, steps)
    assert [(o.step, o.dropped.reason if o.dropped else None) for o in outcomes] == [
        ("", None),
        ("", None),
        ("require_parse", "unparseable"),
        ("", None),
    ]
    assert outcomes[0].record is not None and outcomes[0].record.text == FORMATTED
    assert outcomes[3].record is not None and outcomes[3].record.text == 'def f():\n    """a"""\n'
    fmt = counts["format_code"]
    assert (fmt.seen, fmt.changed, dict(fmt.dropped)) == (3, 2, {})


def test_ruff_binary_missing_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert Path(ruff_binary()).is_file()
    monkeypatch.setitem(sys.modules, "ruff.__main__", None)  # the package is not installed
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(GenloopError, match=r"needs ruff, which is not installed.*pip install ruff"):
        FormatCode()(rec(MESSY))


def test_code_steps_pickle() -> None:
    for step in (RequireParse(), StripLicenseHeader(), FormatCode()):
        clone = pickle.loads(pickle.dumps(step))
        assert clone.name == step.name and vars(clone) == vars(step)
