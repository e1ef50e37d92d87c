"""Regenerate docs/cli.md (from the Typer app) and docs/http.md (from the OpenAPI schema).

.venv/bin/python scripts/gen_docs.py          # write both
.venv/bin/python scripts/gen_docs.py --check  # exit 1 if either is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genloop.docs_gen import cli_reference, http_reference

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Fail if a page is out of date.")
    args = parser.parse_args()
    stale = []
    for name, text in (("cli.md", cli_reference()), ("http.md", http_reference())):
        path = ROOT / "docs" / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run: python scripts/gen_docs.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
