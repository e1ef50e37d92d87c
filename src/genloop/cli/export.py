"""``genloop export``: a model as a file another runtime loads (GGUF for llama.cpp)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genloop.cli.context import console, open_workspace, print_json


def export(
    model: Annotated[
        str,
        typer.Argument(
            help="NAME, NAME@VERSION or NAME@ALIAS, or a local Hugging Face checkpoint directory."
        ),
    ],
    format_: Annotated[
        str, typer.Option("--format", "-f", help="The file format: gguf (llama.cpp, Ollama).")
    ],
    quant: Annotated[
        str,
        typer.Option(
            "--quant",
            "-q",
            help="Weights: f16, q8_0 (8-bit blocks), q4_0 (4-bit blocks) or q4_k_m "
            "(llama.cpp's Q4_K_M mix: 4-bit k-quants, 6-bit for the head and sensitive layers).",
        ),
    ] = "f16",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The file to write \\[default: ./NAME-vVERSION-QUANT.gguf].",
            show_default=False,
        ),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Export a causal language model (Llama architecture) to one GGUF file, tokenizer
    and chat template included, for llama.cpp and the tools built on it. Examples:

    genloop export lm@production --format gguf --quant q4_k_m

    llama-cli -m lm-v3-q4_k_m.gguf -p "Once upon a time" -n 64
    """
    from genloop.optimize.export import check_format, export_model

    check_format(format_, quant)  # before opening anything
    if Path(model).is_dir():
        result = export_model(None, model, format_, quant=quant, output=output)
    else:
        with open_workspace() as ws:
            result = export_model(ws, model, format_, quant=quant, output=output)
    if json:
        print_json(result.to_dict())
        return
    console.print(
        f"wrote {result.path} ({result.quant}, {result.tensors} tensors, vocabulary "
        f"{result.vocab_size}, {result.bytes / 2**20:.1f} MiB)",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
