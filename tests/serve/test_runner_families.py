"""The native batched runner on every architecture it lists: exactness against Hugging Face
``generate``, alone and inside a busy batch, and which configs it takes.

Each family is a tiny model built from its own transformers config class (2 layers, 64
wide, grouped-query attention where the family has it) with its special features on: a
sliding window shorter than the test sequences, soft-capping, q/k/v biases, q/k norms,
partial rotary, a static rope scaling, learned positions, parallel residual, tied and
untied embeddings. Weights are drawn wide (see ``conftest.build_wide_llama``) and norm
weights and biases away from their identity values, so each feature changes the tokens.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.config import ServeConfig
from genloop.serve.engine.architectures import (
    BATCHED_MODEL_TYPES,
    layer_windows,
    supports_batching,
)
from genloop.serve.engine.engine import Engine, collect
from genloop.serve.engine.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "The cat sat on the mat.",
    "def add(a, b):",
    "Rain",
    "Hello there! How are you today? I am fine, thank you very much. The dog ran",
]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0)
WINDOW = 8  # sliding windows: shorter than most prompts and every completion
SIZE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
LLAMA_LIKE = SIZE | {"num_key_value_heads": 2, "intermediate_size": 128}


def _configs(tok: Any) -> dict[str, Any]:
    """One tiny config per batched family, its features switched on."""
    import transformers as tf

    ids = {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "max_position_embeddings": 128,
    }
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    return {
        "llama": tf.LlamaConfig(
            **LLAMA_LIKE,
            **ids,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            tie_word_embeddings=False,
        ),
        "mistral": tf.MistralConfig(
            **LLAMA_LIKE, **ids, sliding_window=WINDOW, tie_word_embeddings=True
        ),
        "qwen2": tf.Qwen2Config(  # q/k/v biases; the second layer slides
            **LLAMA_LIKE,
            **ids,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
            tie_word_embeddings=True,
        ),
        "qwen3": tf.Qwen3Config(  # per-head q/k norms, yarn
            **LLAMA_LIKE,
            **ids,
            head_dim=16,
            attention_bias=True,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 2.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            },
            tie_word_embeddings=False,
        ),
        "gemma2": tf.Gemma2Config(  # (1+w) norms, sandwich norms, both soft-caps, √d
            **LLAMA_LIKE,
            **ids,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=8.0,
            rope_parameters=rope,
        ),
        "gemma3_text": tf.Gemma3TextConfig(  # per-head norms, local and global rope
            **LLAMA_LIKE,
            **ids,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=8.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        "phi3": tf.Phi3Config(  # fused qkv and gate_up, partial rotary, a window
            **LLAMA_LIKE,
            **ids,
            sliding_window=WINDOW,
            rope_parameters=rope | {"partial_rotary_factor": 0.5},
            tie_word_embeddings=False,
        ),
        "gpt2": tf.GPT2Config(  # LayerNorm, learned positions, Conv1D, gelu_new
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            scale_attn_by_inverse_layer_idx=True,
            **{k: v for k, v in ids.items() if k != "max_position_embeddings"},
        ),
        "gpt_neox": tf.GPTNeoXConfig(  # per-head qkv, rotary_pct 0.25, parallel residual
            **SIZE,
            intermediate_size=128,
            **ids,
            rope_parameters=rope | {"partial_rotary_factor": 0.25},
            use_parallel_residual=True,
            tie_word_embeddings=False,
        ),
        "olmo2": tf.Olmo2Config(  # q/k norms over the whole projection, post-norms only
            **LLAMA_LIKE, **ids, tie_word_embeddings=False
        ),
        "phi3_longrope": tf.Phi3Config(  # Phi-3.5's rope: short table up to 64 positions
            **LLAMA_LIKE,
            **ids,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "original_max_position_embeddings": 64,
                "short_factor": [1.0, 1.5, 2.0, 3.0],
                "long_factor": [4.0, 6.0, 8.0, 12.0],
            },
            original_max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
    }


def build_family(name: str, out: Path, tokenizer_dir: Path) -> Path:
    """A tiny checkpoint of config ``name`` (a model type, or a variant) at ``out``:
    matrices drawn wide (std 0.15), norm weights and biases moved off 1 and 0 (std 0.1),
    seed 3."""
    import transformers as tf

    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.pretrained import save_hf_dir
    from genloop.serve.engine.architectures import CAUSAL_LM_CLASSES

    config = _configs(load_hf_tokenizer(tokenizer_dir))[name]
    torch.manual_seed(3)
    model = getattr(tf, CAUSAL_LM_CLASSES[config.model_type])(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
            else:
                param.add_(torch.randn_like(param) * 0.1)
        # Gemma scales embeddings by √d: drawn as wide as the rest, a token's own embedding
        # would swamp the layers' (normed) outputs and greedy text would repeat it
        embed = model.get_input_embeddings()
        embed.weight.div_(float(getattr(embed, "scalar_embed_scale", 1.0)))
    return save_hf_dir(model, out, family="causal_lm", tokenizer_dir=tokenizer_dir)


def engine_for(path: Path, **serve: Any) -> Engine:
    from genloop.serve.engine.loader import load_engine

    cfg = ServeConfig(**({"device": "cpu", "max_batch_size": 4, "max_queue": 16} | serve))
    return load_engine(path, model_name=path.name, model_version=1, cfg=cfg)


@functools.cache
def hf_model(path: Path) -> Any:
    from genloop.models.pretrained import load_pretrained

    return load_pretrained(path)


def hf_greedy(path: Path, prompt_ids: list[int], eos: int, pad: int) -> list[int]:
    """Hugging Face generate's greedy continuation, the reference."""
    with torch.inference_mode():
        out = hf_model(path).generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=GREEDY.max_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="module")
def tokenizer_dir(model_dirs: tuple[Path, Path]) -> Path:
    return model_dirs[0]


@pytest.fixture(scope="module", params=BATCHED_MODEL_TYPES)
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
) -> Iterator[tuple[str, Path, Engine, Callable[[list[int]], list[int]]]]:
    """(model type, checkpoint, an engine on it, the HF reference for a prompt)."""
    model_type: str = request.param
    path = build_family(model_type, tmp_path_factory.mktemp(model_type) / "m", tokenizer_dir)
    eng = engine_for(path)
    tok = eng.tokenizer
    yield (
        model_type,
        path,
        eng,
        lambda ids: hf_greedy(path, ids, tok.eos_token_id, tok.pad_token_id),
    )
    asyncio.run(eng.close())


def test_every_family_takes_the_batched_runner(family: Any) -> None:
    model_type, path, eng, _ = family
    model = hf_model(path)
    assert model.config.model_type == model_type
    assert supports_batching(model.config) and eng.runner.kind == "native"
    if model_type in ("mistral", "qwen2", "gemma2", "gemma3_text", "phi3"):
        assert WINDOW in layer_windows(model.config)  # the window really is on


def test_greedy_equals_hf_generate_alone(family: Any) -> None:
    model_type, _, eng, reference = family
    ids = [eng.encode(p) for p in PROMPTS]

    async def main() -> list[list[int]]:
        await eng.start()
        out = []
        for i, prompt in enumerate(ids):
            deltas, finished = await collect(eng.submit(GenerationRequest(f"a{i}", prompt, GREEDY)))
            assert finished.completion_tokens == len(deltas)
            out.append([d.token_id for d in deltas])
        return out

    got = asyncio.run(main())
    for prompt, tokens in zip(ids, got, strict=True):
        assert tokens == reference(prompt), (model_type, prompt)
    # the text varies: a model stuck on one token would make the comparison weak
    assert max(len(set(t)) for t in got) > 3, (model_type, got)


def test_greedy_equals_hf_generate_inside_a_busy_batch(family: Any) -> None:
    """Greedy requests join and leave a batch of sampled ones of other lengths; prompts
    are prefilled in chunks of 8 tokens in the same forward as the decode rows (so a chunk
    starts where the window has already slid), and every sequence outgrows the window."""
    model_type, _, eng, reference = family
    eng.scheduler.prefill_chunk, eng.scheduler.prefill_budget = 8, 12
    ids = [eng.encode(p) for p in PROMPTS]
    steps_before = eng.steps

    async def main() -> dict[str, list[int]]:
        await eng.start()
        noise = [
            eng.submit(
                GenerationRequest(
                    f"noise{i}",
                    ids[(i + 1) % 4] * (1 + i % 3),
                    SamplingParams(max_tokens=5 + 7 * i, temperature=1.0, seed=i, ignore_eos=True),
                )
            )
            for i in range(4)
        ]
        first = [eng.submit(GenerationRequest("g0", ids[0], GREEDY))]
        await asyncio.sleep(0.02)  # later ones arrive while the batch is decoding
        later = [eng.submit(GenerationRequest(f"g{i}", ids[i], GREEDY)) for i in (1, 2, 3)]
        results = await asyncio.gather(*(collect(s) for s in noise + first + later))
        names = [f"noise{i}" for i in range(4)] + ["g0", "g1", "g2", "g3"]
        assert all(f.reason == "length" for _, f in results[:4])
        return {n: [d.token_id for d in r[0]] for n, r in zip(names, results, strict=True)}

    got = asyncio.run(main())
    for i in range(4):
        assert got[f"g{i}"] == reference(ids[i]), (model_type, PROMPTS[i])
    assert eng.steps - steps_before > GREEDY.max_tokens  # they shared steps


def test_logits_equal_hf_forward(family: Any) -> None:
    """The runner's next-token logits, after a chunked prefill and over decode steps, are
    the model's own (what greedy text cannot show: soft-capping the output logits keeps
    their order, and sampling reads their values)."""
    from genloop.models.pretrained import load_pretrained
    from genloop.serve.engine.runner import Chunk, DecoderRunner

    model_type, path, eng, _ = family
    ids = eng.encode(PROMPTS[3])[:20]
    runner = DecoderRunner(load_pretrained(path), n_slots=2, max_len=32)
    runner.step([Chunk(1, ids[:12], 0, False)], [], [], [])
    got = [runner.step([Chunk(1, ids[12:], 12, True)], [], [], [])]
    for i, token in enumerate([5, 77, 200]):
        got.append(runner.step([], [1], [token], [len(ids) + i]))
    with torch.inference_mode():
        full = hf_model(path)(torch.tensor([[*ids, 5, 77, 200]])).logits[0].float()
    want = full[len(ids) - 1 :]
    torch.testing.assert_close(torch.cat(got), want, rtol=1e-4, atol=1e-4, msg=model_type)


def test_bf16_logits_follow_the_model_rounding(family: Any) -> None:
    """In bf16 the runner rounds where each family's forward does (norms in fp32 then cast
    before or after the weight, OLMo 2's fp32 rotary), so its logits stay the model's."""
    from genloop.models.pretrained import load_pretrained
    from genloop.serve.engine.runner import Chunk, DecoderRunner

    model_type, path, eng, _ = family
    ids = eng.encode(PROMPTS[3])[:16]
    model = load_pretrained(path, dtype="bf16")
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0, -1].float()
    runner = DecoderRunner(model, n_slots=1, max_len=16)
    assert runner.dtype == torch.bfloat16
    got = runner.step([Chunk(0, ids, 0, True)], [], [], [])
    assert got is not None
    # equal here; the margin allows a matmul kernel that sums in another order, and is far
    # below a misplaced rounding (OLMo 2's rotary in bf16 instead of fp32: 0.025)
    torch.testing.assert_close(got[0], want, rtol=0.0, atol=5e-3, msg=model_type)


# ------------------------------------------------------------------ int8 and configs


def test_int8_weight_only_qwen2_takes_the_batched_runner_exactly(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """An int8 variant of a family with q/k/v biases: its int8 q/k/v fuse (biases
    included) and greedy decoding gives the int8 model's own ``generate`` tokens."""
    from genloop.models.pretrained import load_pretrained
    from genloop.optimize.quantize import quantize_model, save_quantized

    float_dir = build_family("qwen2", tmp_path / "f", tokenizer_dir)
    model = load_pretrained(float_dir)
    description = quantize_model(model, "int8", "weight_only")
    path = save_quantized(model, tmp_path / "q", description, tokenizer_dir=float_dir)
    eng = engine_for(path)
    assert eng.runner.kind == "native"
    tok = eng.tokenizer
    ids = [eng.encode(p) for p in PROMPTS[:2]]

    async def main() -> list[list[int]]:
        await eng.start()
        streams = [eng.submit(GenerationRequest(f"q{i}", p, GREEDY)) for i, p in enumerate(ids)]
        out = [[d.token_id for d in (await collect(s))[0]] for s in streams]
        await eng.close()
        return out

    for prompt, tokens in zip(ids, asyncio.run(main()), strict=True):
        assert tokens == hf_greedy(path, prompt, tok.eos_token_id, tok.pad_token_id)


def test_longrope_is_batched_within_its_original_context(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """Phi-3.5's longrope uses its short table while sequences stay within the original
    context: a server whose longest sequence fits (64 positions here) batches it exactly;
    one allowing longer sequences runs it on the generic runner."""
    from genloop.errors import GenloopError
    from genloop.serve.engine.runner import build_runner

    path = build_family("phi3_longrope", tmp_path / "m", tokenizer_dir)
    config = hf_model(path).config
    assert supports_batching(config, max_len=64) and not supports_batching(config)
    with pytest.raises(GenloopError, match="longrope"):  # forced, it says why not
        build_runner(hf_model(path), n_slots=1, max_len=128, kind="native")
    with pytest.raises(GenloopError, match="unknown runner 'fast'"):
        build_runner(hf_model(path), n_slots=1, max_len=64, kind="fast")
    # "llama", the native runner's former name, still picks it
    assert build_runner(hf_model(path), n_slots=1, max_len=64, kind="llama").kind == "native"
    assert engine_for(path, max_prompt_tokens=128, max_tokens=64).runner.kind == "hf"
    eng = engine_for(path, max_prompt_tokens=40, max_tokens=24)
    assert eng.runner.kind == "native" and eng.runner.max_len == 64
    tok = eng.tokenizer
    ids = [eng.encode(p) for p in PROMPTS]

    async def main() -> list[list[int]]:
        await eng.start()
        streams = [eng.submit(GenerationRequest(f"l{i}", p, GREEDY)) for i, p in enumerate(ids)]
        out = [[d.token_id for d in (await collect(s))[0]] for s in streams]
        await eng.close()
        return out

    for prompt, tokens in zip(ids, asyncio.run(main()), strict=True):
        assert tokens == hf_greedy(path, prompt, tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize(
    ("config", "batched"),
    [
        ({"model_type": "llama"}, True),
        ({"model_type": "qwen2", "rope_scaling": {"type": "yarn", "factor": 4.0}}, True),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "dynamic"}}, False),
        ({"model_type": "phi3", "rope_parameters": {"rope_type": "longrope"}}, False),
        (
            {
                "model_type": "phi3",
                "rope_parameters": {
                    "rope_type": "longrope",
                    "original_max_position_embeddings": 4096,
                },
            },
            False,  # no max_len given: a sequence may outgrow the original context
        ),
        (
            {
                "model_type": "gemma3_text",
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 8.0},
                    "sliding_attention": {"rope_type": "default"},
                },
            },
            True,
        ),
        ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, False),
        ({"model_type": "gpt2", "add_cross_attention": True}, False),
        ({"model_type": "t5", "is_encoder_decoder": True}, False),
        ({"model_type": "falcon"}, False),
        ({}, False),
    ],
)
def test_supports_batching_reads_the_config(config: dict[str, Any], batched: bool) -> None:
    assert supports_batching(config) is batched


def test_supports_batching_on_config_objects() -> None:
    from transformers import LlamaConfig, T5Config

    assert supports_batching(LlamaConfig())
    assert not supports_batching(
        LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    )
    assert not supports_batching(T5Config())


def test_architectures_module_imports_no_torch() -> None:
    code = (
        "import sys; import genloop.serve.engine.architectures as a; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(len(a.BATCHED_MODEL_TYPES))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(BATCHED_MODEL_TYPES))
