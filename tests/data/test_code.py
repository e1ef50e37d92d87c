from __future__ import annotations

import ast
import pickle

from genloop.data.code import FormatCode, RequireParse, StripLicenseHeader, strip_license_header
from genloop.data.records import Dropped, Record


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


def test_format_python_tabs_trailing_whitespace_and_final_newline() -> None:
    text = "def f(x):   \n\tif x:\n\t\treturn 1\t\n\treturn 2"
    out = FormatCode()(rec(text))
    assert isinstance(out, Record)
    assert out.text == "def f(x):\n    if x:\n        return 1\n    return 2\n"
    assert ast.dump(ast.parse(out.text)) == ast.dump(ast.parse(text))


def test_format_never_changes_a_string_literal() -> None:
    # Trailing spaces inside a string: stripping them would change the program, so only
    # the tabs are converted. A tab inside the string too: only the final newline is added.
    text = 'def f():\n\ts = """keep   \nthis"""\n\treturn s'
    out = FormatCode()(rec(text))
    assert isinstance(out, Record)
    assert out.text == 'def f():\n    s = """keep   \nthis"""\n    return s\n'
    text = 'def f():\n\ts = """keep   \n\tthis"""\n\treturn s'
    out = FormatCode()(rec(text))
    assert isinstance(out, Record) and out.text == text + "\n"


def test_format_other_languages_and_skips() -> None:
    out = FormatCode()(rec("int main() {  \n  return 0;\t\n}\n\n\n", language="c"))
    assert isinstance(out, Record) and out.text == "int main() {\n  return 0;\n}\n"
    md = rec("line with hard break  \nnext", language="markdown")
    assert FormatCode()(md).text == "line with hard break  \nnext"  # type: ignore[union-attr]
    clean = rec("x = 1\n")
    original = clean.text
    assert FormatCode()(clean).text is original  # type: ignore[union-attr]


def test_format_leaves_unparseable_python_alone() -> None:
    text = "def f(:\n\treturn 1  \n"
    assert FormatCode()(rec(text)).text == text  # type: ignore[union-attr]


def test_code_steps_pickle() -> None:
    for step in (RequireParse(), StripLicenseHeader(), FormatCode(tab_width=2)):
        clone = pickle.loads(pickle.dumps(step))
        assert clone.name == step.name and vars(clone) == vars(step)
