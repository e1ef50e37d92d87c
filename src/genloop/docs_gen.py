"""The CLI and HTTP reference pages, generated from the code that defines them.

``docs/cli.md`` walks the Typer app (every command, its help, arguments and options);
``docs/http.md`` walks the server's OpenAPI schema (every route, its scope, request and
response models). ``scripts/gen_docs.py`` writes them; a test keeps them current.
"""

from __future__ import annotations

from typing import Any


def cli_reference() -> str:
    import typer

    from genloop.cli.main import app

    root = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        "Generated from the Typer app by `scripts/gen_docs.py`; do not edit by hand.",
        "",
    ]
    for path, command in _walk(root, ("genloop",)):
        lines += _command_section(path, command)
    return "\n".join(lines).rstrip() + "\n"


def _walk(command: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    """Every command under ``command`` (Typer vendors its own click: duck typing)."""
    out = [(path, command)]
    if hasattr(command, "commands"):
        for name in sorted(command.commands):
            sub = command.commands[name]
            if not sub.hidden:
                out += _walk(sub, (*path, name))
    return out


def _command_section(path: tuple[str, ...], command: Any) -> list[str]:
    level = "#" * min(len(path) + 1, 4)
    lines = [f"{level} `{' '.join(path)}`", ""]
    help_text = (command.help or "").strip()
    if help_text:
        lines += [_clean(help_text), ""]
    ctx = command.context_class(command, info_name=" ".join(path))
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines += ["```", f"{' '.join(path)} {usage}".rstrip(), "```", ""]
    rows = []
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        names = ", ".join(f"`{n}`" for n in (*param.opts, *param.secondary_opts))
        helptext = getattr(param, "help", None) or ""
        if param.param_type_name == "argument":
            names = f"`{(param.name or '').upper()}`"
        rows.append(f"| {names} | {_clean(helptext).replace('|', '/')} |")
    if rows:
        lines += ["| parameter | meaning |", "|---|---|", *rows, ""]
    return lines


def _clean(text: str) -> str:
    return text.replace("\\[", "[").replace("\b", "").strip()


def http_reference() -> str:
    schema = _openapi()
    lines = [
        "# HTTP reference",
        "",
        "Generated from the server's OpenAPI schema by `scripts/gen_docs.py`; do not edit by",
        "hand. Every route needs `Authorization: Bearer gl_...` except `GET /health`; the",
        "scope each one needs is listed. Errors have the OpenAI shape",
        '`{"error": {"message", "type", "param", "code"}}`. The live schema is served at',
        "`/openapi.json`.",
        "",
    ]
    for route, methods in sorted(schema.get("paths", {}).items()):
        for method, op in sorted(methods.items()):
            lines += [f"## `{method.upper()} {route}`", ""]
            summary = op.get("summary") or ""
            description = (op.get("description") or "").strip()
            if summary:
                lines += [f"**{summary}**", ""]
            scope = op.get("x-genloop-scope")
            if scope:
                lines += [f"Scope: `{scope}`", ""]
            if description:
                lines += [description, ""]
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            if body:
                lines += [f"Request body: `{_ref_name(body.get('schema', {}))}`", ""]
            responses = op.get("responses", {})
            if responses:
                codes = ", ".join(f"`{c}`" for c in sorted(responses))
                lines += [f"Responses: {codes}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _ref_name(schema: dict[str, Any]) -> str:
    ref = schema.get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref else str(schema.get("type", "object"))


def _openapi() -> dict[str, Any]:
    """The schema of an app built on a throwaway workspace (no model is loaded)."""
    import tempfile
    from pathlib import Path

    from genloop.config import GenloopConfig
    from genloop.serve.app import create_app
    from genloop.workspace import init_workspace

    with tempfile.TemporaryDirectory() as tmp:
        ws = init_workspace(Path(tmp) / "ws")
        try:
            app = create_app(ws, GenloopConfig())
            schema: dict[str, Any] = app.openapi()
            return schema
        finally:
            ws.close()
