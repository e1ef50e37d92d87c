"""``genloop generate``: text from a prompt or a JSONL batch, images from a prompt,
embeddings of a JSONL file.

Text models run on the serving engine (``genloop.serve.engine``), the same continuous
batching the server uses; image models (vae, gan, diffusion) on their family's sampler;
``--embed`` runs a masked_lm model's encoder (``genloop.models.embeddings``), as
``/v1/embeddings`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from genloop.cli.context import console, err_console, open_workspace, print_json
from genloop.models.family import IMAGE_FAMILIES

if TYPE_CHECKING:
    from genloop.serve.engine.engine import Engine
    from genloop.serve.engine.types import SamplingParams


def generate(
    model: Annotated[
        str,
        typer.Argument(
            help="NAME, NAME@VERSION or NAME@ALIAS, or a model directory's path (with a '/').",
            show_default=False,
        ),
    ],
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", "-p", help="Text to continue (image models: what to draw)."),
    ] = None,
    n: Annotated[
        int, typer.Option("-n", min=1, help="Completions (or images) for the prompt.")
    ] = 1,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Same seed, prompt and settings: same output."),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Most tokens to generate per completion.")
    ] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="0 decodes greedily.")
    ] = 1.0,
    top_p: Annotated[
        float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling cut.")
    ] = 1.0,
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="Sample among the k best tokens only.")
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="Stop before this string (repeatable)."),
    ] = None,
    chat: Annotated[
        bool,
        typer.Option("--chat", help="Send the prompt as a user message (the chat template)."),
    ] = False,
    input_: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help='JSONL of prompts: {"id", "prompt" or "messages", optional settings}.',
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="JSONL written with --input, one line per finished item; run the same "
            "command again to resume (ids already there are skipped).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Image models: folder for the PNGs \\[default: ./images]."),
    ] = None,
    negative_prompt: Annotated[
        str | None,
        typer.Option("--negative-prompt", help="Text-to-image: what the images should not show."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=1, max=1000, help="Text-to-image: denoising steps."),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option("--guidance-scale", min=0.0, max=50.0, help="Text-to-image: guidance."),
    ] = None,
    embed: Annotated[
        bool,
        typer.Option(
            "--embed",
            help="Embed the text of each --input row (masked_lm models); rows are written "
            "with their 'embedding' to --output, or to stdout.",
        ),
    ] = False,
    field: Annotated[
        str, typer.Option("--field", help="With --embed: the key of each row's text.")
    ] = "text",
    dimensions: Annotated[
        int | None,
        typer.Option(
            "--dimensions", min=1, help="With --embed: keep the first N dimensions, renormalised."
        ),
    ] = None,
    truncate: Annotated[
        bool,
        typer.Option("--truncate", help="With --embed: cut texts longer than the model's context."),
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Sequences decoded (or embedded) together.")
    ] = 16,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Generate text (streamed) or images from a model, or run a JSONL batch through it.

    genloop generate tiny-lm@production -p "Once upon a time" --max-tokens 40
    genloop generate tiny-lm --input prompts.jsonl --output out.jsonl
    genloop generate digits-gan -p "7" -n 16 --out sevens/
    genloop generate shapes-t2i -p "a large red circle on the left" -n 8 --out circles/
    genloop generate my-bert --embed --input docs.jsonl --output vectors.jsonl
    """
    from genloop.errors import ConfigError

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, not {device!r}")
    if embed:
        if input_ is None or prompt is not None:
            raise ConfigError(
                f'--embed reads --input FILE.jsonl (rows with a "{field}" text), not --prompt'
            )
        if json and output is None:
            raise ConfigError("--embed --json prints a summary: give --output for the rows")
        _embed(model, input_, output, field, dimensions, truncate, batch_size, device, json)
        return
    if field != "text" or dimensions is not None or truncate:
        raise ConfigError("--field, --dimensions and --truncate go with --embed")
    if (input_ is None) != (output is None):
        raise ConfigError("--input and --output go together")
    if input_ is None and prompt is None:
        raise ConfigError("give --prompt TEXT, or --input FILE.jsonl --output FILE.jsonl")
    if input_ is not None and prompt is not None:
        raise ConfigError("give either --prompt or --input, not both")
    path, name, version, family = _resolve(model)
    if family == "masked_lm":
        raise ConfigError(
            f"{name} is an embedding model (masked_lm): it generates no text; embed a file "
            "with --embed --input FILE.jsonl"
        )
    if family in IMAGE_FAMILIES:
        if input_ is not None:
            raise ConfigError(f"{name} is an image model ({family}); --input is for text models")
        options = {
            "negative_prompt": negative_prompt,
            "steps": steps,
            "guidance_scale": guidance_scale,
        }
        _images(path, prompt, n, seed, options, out or Path("images"), json)
        return
    if out is not None:
        raise ConfigError("--out is for image models; text goes to stdout or --output")
    if negative_prompt is not None or steps is not None or guidance_scale is not None:
        raise ConfigError(
            "--negative-prompt, --steps and --guidance-scale are for text-to-image models"
        )
    from genloop.serve.engine.types import SamplingParams

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop or ()),
    )
    engine = _load(path, name, version, batch_size, device)
    if input_ is not None:
        assert output is not None
        _batch(engine, input_, output, params, n, json)
    else:
        assert prompt is not None
        _prompt(engine, prompt, params, n, chat, json)


def _embed(
    ref: str,
    input_: Path,
    output: Path | None,
    field: str,
    dimensions: int | None,
    truncate: bool,
    batch_size: int,
    device: str,
    json: bool,
) -> None:
    """Embed the ``field`` text of every row of ``input_``; write each row with its
    ``embedding`` to ``output`` (through a ``.part`` file, renamed when done) or stdout."""
    import json as json_lib
    import sys
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from genloop.data.jsonl import read_jsonl
    from genloop.errors import GenloopError
    from genloop.models.embeddings import EMBEDDING_FAMILIES, cannot_embed, load_embedder

    if not input_.is_file():
        raise GenloopError(f"{input_}: no such file")
    local = Path(ref)
    if ("/" in ref or ref.startswith(".")) and local.is_dir():
        path, name = local, local.resolve().name  # load_embedder checks what it holds
    else:
        path, name, _version, family = _resolve(ref)
        if family not in EMBEDDING_FAMILIES:
            raise cannot_embed(name, family)
    with err_console.status(f"loading {name}", spinner="dots"):
        embedder = load_embedder(path, device=device, name=name)
    from genloop.models.embeddings import check_dimensions

    check_dimensions(dimensions, embedder.hidden_size)
    with input_.open(encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    part = output.with_name(output.name + ".part") if output is not None else None
    sink = part.open("w", encoding="utf-8") if part is not None else sys.stdout
    started, written, width = time.monotonic(), 0, 0
    try:
        with Progress(
            TextColumn("embed"),
            BarColumn(),
            MofNCompleteColumn(),
            console=err_console,
            transient=True,
            disable=json,
        ) as bar:
            task = bar.add_task("embed", total=total)
            batch: list[tuple[str, dict[str, Any]]] = []

            def flush() -> None:
                nonlocal written, width
                ids = embedder.token_ids([row[field] for _, row in batch])
                for (where, _), row_ids in zip(batch, ids, strict=True):
                    if len(row_ids) > embedder.context_length and not truncate:
                        raise GenloopError(
                            f"{where}: the text is {len(row_ids)} tokens; {name} reads at "
                            f"most {embedder.context_length} (shorten it, or pass --truncate)"
                        )
                    if not row_ids:
                        raise GenloopError(f"{where}: the text has no tokens")
                vectors = embedder.embed(
                    ids, dimensions=dimensions, batch_size=batch_size, truncate=truncate
                )
                for (_, row), vector in zip(batch, vectors, strict=True):
                    sink.write(json_lib.dumps(row | {"embedding": vector.tolist()}) + "\n")
                written += len(batch)
                width = int(vectors.shape[1])
                bar.update(task, completed=written)
                batch.clear()

            for _n, where, row in read_jsonl(input_):
                if not isinstance(row, dict):
                    raise GenloopError(f"{where}: expected a JSON object")
                text = row.get(field)
                if not isinstance(text, str) or not text.strip():
                    raise GenloopError(
                        f'{where}: no "{field}" text to embed (name another key with --field)'
                    )
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # JSON allows a lone surrogate ("\ud800")
                    raise GenloopError(f"{where}: the text is not valid Unicode") from None
                batch.append((where, row))
                if len(batch) >= batch_size:
                    flush()
            if batch:
                flush()
        if written == 0:
            raise GenloopError(f"{input_}: no rows to embed")
    except BaseException:
        if part is not None:
            sink.close()
            part.unlink(missing_ok=True)
        raise
    if part is not None and output is not None:
        sink.close()
        part.replace(output)
    seconds = time.monotonic() - started
    summary = {
        "model": name,
        "rows": written,
        "dimensions": width,
        "output": str(output) if output is not None else None,
        "seconds": round(seconds, 3),
    }
    if json:
        print_json(summary)
        return
    where_to = str(output) if output is not None else "stdout"
    (console if output is not None else err_console).print(
        f"{written} rows embedded ({width} dimensions) to {where_to} in {seconds:.1f} s",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _resolve(ref: str) -> tuple[Path, str, int | None, str]:
    """(artifact directory, model name, version, family) of a ref or a model directory."""
    from genloop.serve.engine.loader import model_family

    local = Path(ref)
    if ("/" in ref or ref.startswith(".")) and local.is_dir():
        return local, local.resolve().name, None, model_family(local)
    from genloop.workspace import registry

    with open_workspace() as ws:
        info = registry.resolve(ws, ref)
        path = ws.store.open_verified(info.artifact)  # the manifest is checked
    return path, info.name, info.version, info.family


def _load(path: Path, name: str, version: int | None, batch_size: int, device: str) -> Engine:
    from genloop.config import ServeConfig
    from genloop.serve.engine import load_engine

    cfg = ServeConfig(
        device=device,  # checked above
        max_batch_size=batch_size,
        max_queue=batch_size,
        request_timeout_s=24 * 3600.0,  # a batch job has no client waiting on it
    )
    with err_console.status(f"loading {name}", spinner="dots"):
        return load_engine(path, model_name=name, model_version=version, cfg=cfg)


def _prompt(
    engine: Engine, prompt: str, params: SamplingParams, n: int, chat: bool, json: bool
) -> None:
    import asyncio
    import sys
    from dataclasses import replace

    from genloop.serve.engine.engine import collect
    from genloop.serve.engine.types import Finished, GenerationRequest, TokenDelta

    if chat:
        ids = engine.chat_prompt_ids([{"role": "user", "content": prompt}])
    else:
        ids = engine.encode(prompt)

    async def main() -> list[Finished]:
        await engine.start()
        try:
            streams = [
                engine.submit(
                    GenerationRequest(
                        f"cli-{i}",
                        ids,
                        params if params.seed is None else replace(params, seed=params.seed + i),
                    )
                )
                for i in range(n)
            ]
            if n == 1 and not json:  # stream the one completion as it is generated
                finished = None
                async for event in streams[0]:
                    if isinstance(event, Finished):
                        finished = event
                    elif isinstance(event, TokenDelta) and event.text:
                        sys.stdout.write(event.text)
                        sys.stdout.flush()
                sys.stdout.write("\n")
                assert finished is not None
                return [finished]
            return [(await collect(s))[1] for s in streams]
        finally:
            await engine.close()

    results = asyncio.run(main())
    if json:
        print_json(
            {
                "model": engine.model_name,
                "version": engine.model_version,
                "prompt_tokens": len(ids),
                "choices": [
                    {
                        "text": f.text,
                        "finish_reason": f.reason,
                        "completion_tokens": f.completion_tokens,
                    }
                    for f in results
                ],
            }
        )
        return
    if n > 1:
        for i, f in enumerate(results):
            console.rule(f"completion {i + 1} ({f.reason})", style="dim")
            console.out(f.text, highlight=False)
    failed = [f for f in results if f.reason not in ("stop", "length")]
    if failed:
        from genloop.errors import GenloopError

        raise GenloopError(f"generation ended early: {failed[0].reason} {failed[0].error or ''}")


def _batch(
    engine: Engine, input_: Path, output: Path, params: SamplingParams, n: int, json: bool
) -> None:
    import asyncio

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from genloop.serve.batch import read_items, run_batch

    items = read_items(input_)
    with Progress(
        TextColumn("generate"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=json,
    ) as bar:
        task = bar.add_task("generate", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        async def main() -> Any:
            await engine.start()
            try:
                return await run_batch(engine, items, output, params=params, n=n, progress=progress)
            finally:
                await engine.close()

        result = asyncio.run(main())
    if json:
        print_json(result.to_dict())
        return
    if result.generated == 0:
        console.print(
            f"nothing to do: all {result.total} items are already in {output}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        return
    skipped = f", {result.skipped} already done" if result.skipped else ""
    failed = f", {result.failed} failed (see their error)" if result.failed else ""
    console.print(
        f"{result.generated} of {result.total} items written to {output}{skipped}{failed}; "
        f"{result.completion_tokens:,} tokens in {result.seconds:.1f} s "
        f"({result.tokens_per_s:,.0f} tokens/s)",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _images(
    path: Path,
    prompt: str | None,
    n: int,
    seed: int | None,
    options: dict[str, Any],
    out: Path,
    json: bool,
) -> None:
    from genloop.models.image_generation import load_generator, save_images

    with err_console.status("generating", spinner="dots"):
        generator = load_generator(path)
        warnings = generator.prompt_warnings(prompt or "")
        images = generator.generate(prompt, n, seed, **options)
        paths = save_images(images, out)
    if json:
        print_json({"images": [str(p) for p in paths], "warnings": warnings})
        return
    for warning in warnings:
        err_console.print(f"warning: {warning}", highlight=False, markup=False)
    console.print(
        f"{len(images)} images and grid.png written to {out}", highlight=False, markup=False
    )
