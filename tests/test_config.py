"""Config models, YAML loading, --set overrides and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from genloop.config import (
    BuiltinSource,
    CodeSource,
    FilesSource,
    FloatParam,
    GateConfig,
    GenloopConfig,
    HfDiskSource,
    ImagesSource,
    IntParam,
    TrainConfig,
    UrlSource,
    apply_overrides,
    config_schema,
    load_config,
    parse_config,
)
from genloop.errors import ConfigError

# Every section filled in, most keys away from their defaults.
FULL = """\
name: code-lm
workspace:
  path: ./ws
  database_url: postgresql+psycopg://genloop@127.0.0.1:5432/genloop
data:
  name: stdlib-code
  kind: code
  sources:
    - type: files
      paths: ["corpus/**/*.jsonl", "extra.csv"]
      field: body
      columns: [title, body]
      encoding: latin-1
    - type: code
      path: ./src
      extensions: [.py]
      languages: [python]
      exclude: ["**/tests/**"]
    - type: builtin
      name: python-stdlib
    - type: url
      urls: ["http://127.0.0.1:8080/page.html"]
      allow_private: true
      max_bytes: 100000
      timeout_s: 2.5
      respect_robots: false
      user_agent: genloop-test
    - type: hf_disk
      path: ./hf
      split: validation
      field: content
    - type: images
      path: ./digits
      extensions: [.png]
  clean:
    normalize: NFKC
    strip_whitespace: false
    lowercase: true
    remove_stopwords: true
    min_chars: 1
    max_chars: 5000
    max_repetition_ratio: 0.4
    max_symbol_ratio: 0.6
  dedup: {exact: true, near: false, threshold: 0.9, num_perm: 64, shingle_size: 3}
  pii: {enabled: true, kinds: [email, secret]}
  code: {require_parse: false, strip_license_header: true, format: true}
  images: {size: 16, channels: 3, normalize: zero_one}
  split: {val: 0.1, test: 0.2, seed: 7}
  workers: 4
  sample_records: 5
tokenizer:
  kind: bpe
  vocab_size: 4096
  min_frequency: 3
  special_tokens: ["<|endoftext|>", "<|pad|>"]
  chat_template: "{{ messages }}"
  seq_len: 128
parts:
  teacher:
    model: {family: causal_lm, n_layer: 1}
    train: {objective: lm, max_steps: 10, warmup_steps: 2}
model:
  family: causal_lm
  base_model: base@production
  n_layer: 2
  n_embd: 64
  n_head: 4
  n_kv_head: 2
  intermediate_size: 128
  activation: gelu
  context_length: 256
  dropout: 0.1
  tie_embeddings: true
  lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj], load_in_4bit: false}
  image_size: 8
  channels: 1
  num_classes: 10
  base_channels: 16
  latent_dim: 8
  vae: {beta: 0.5}
  gan: {loss: non_saturating, spectral_norm: false, ema_decay: 0.99}
  diffusion:
    timesteps: 100
    beta_schedule: linear
    sampler: ddpm
    sample_steps: 20
    guidance_scale: 3
    cond_drop_prob: 0.2
    latent_vae: digits-vae@3
train:
  objective: sft
  dataset: stdlib-code@2
  lr: 3e-4
  min_lr: 1e-5
  schedule: linear
  weight_decay: 0.01
  betas: [0.9, 0.99]
  warmup_steps: 10
  max_steps: 100
  batch_size: 8
  grad_accum: 2
  grad_clip: null
  eval_every: 20
  eval_batches: 4
  early_stopping_patience: 3
  label_smoothing: 0.1
  z_loss: 1e-4
  dpo_beta: 0.2
  precision: bf16
  compile: true
  device: cpu
  strategy: fsdp
  seed: 1
  checkpoint_every: 50
  keep_last: 3
  resume: true
  log_to: [tensorboard, mlflow]
  augment: {flip: true, crop_padding: 1, jitter: 0.1}
eval:
  suites: [perplexity, generation, code, bias, image]
  split: val
  max_samples: 50
  max_new_tokens: 32
  temperature: 0.8
  top_p: 0.95
  seed: 3
  num_samples: 20
  k: [1, 10]
  tasks_path: tasks.jsonl
  bias_suite_path: bias.yaml
  timeout_s: 5
  sandbox_memory_mb: 256
  image_samples: 100
  inception_weights: inception.safetensors
gate:
  rules:
    - {metric: perplexity, op: max_increase_pct, value: 2}
    - {metric: pass@1, op: no_decrease}
    - {metric: bleu, op: min, value: 0.1}
tune:
  trials: 8
  workers: 2
  timeout_s: 600
  sampler: random
  pruner: hyperband
  metric: val_loss
  direction: minimize
  study_name: tiny-study
  space:
    train.lr: {type: float, low: 1e-5, high: 1e-2, log: true}
    model.n_layer: {type: int, low: 1, high: 4, step: 1}
    model.lora.r: {type: categorical, choices: [4, 8, 16]}
optimize:
  quantize: int8
  quantize_mode: weight_only
  prune: 0.3
  prune_structured: true
  recovery_steps: 10
  distill: tiny
  distill_steps: 50
  distill_temperature: 1.5
  distill_alpha: 0.7
  export: onnx
  budget: ppl+3%
  promote: true
serve:
  host: 0.0.0.0
  port: 0
  models: [code-lm@production]
  device: cpu
  max_batch_size: 4
  max_queue: 8
  request_timeout_s: 5
  drain_timeout_s: 1
  max_prompt_tokens: 128
  max_tokens: 64
  max_n: 2
  max_stop: 2
  max_body_bytes: 65536
  max_header_bytes: 4096
  cors_origins: ["http://localhost:3000"]
  ssl_certfile: cert.pem
  ssl_keyfile: key.pem
  metrics_public: true
  ui: false
  store_requests: false
  upstreams: {big: [{url: "http://10.0.0.1:8000/v1", allow_http: true}, "https://vllm.internal/v1"]}
  upstream_health_interval_s: 2
  redis_url: redis://127.0.0.1:6379/0
  rate_limit: {requests_per_min: 10, tokens_per_min: null}
monitor:
  psi_threshold: 0.25
  kl_threshold: 0.2
  reference_window: 100
  window: 50
  check_interval_s: 5
  ewma_alpha: 0.3
  z_threshold: 3
  min_samples: 10
  webhook_url: http://127.0.0.1:9999/hook
  bias_interval_s: 3600
feedback:
  min_items: 5
  per_user_cap: 2
  review_required: true
  replay_ratio: 0.3
  retrain: {method: full, objective: dpo, lr: 5e-5, max_steps: 20, batch_size: 2, lora: {r: 2}}
  schedule: 6h
  poll_interval_s: 1
  max_backoff_s: 60
security:
  retention_days: 30
  guardrails:
    blocklist_input: [forbidden]
    blocklist_output: [secret-word]
    redact_pii_in_logs: true
    injection_heuristics: false
    max_repetition: 4
    on_violation: flag
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(data: dict[str, Any], overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, overrides, source="run.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert info.value.exit_code == 2
    return message


# --- parsing --------------------------------------------------------------------------


def test_every_section_parses_from_a_full_example(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.name == "code-lm"
    assert cfg.workspace.path == Path("ws")
    assert cfg.data is not None
    assert [type(s) for s in cfg.data.sources] == [
        FilesSource,
        CodeSource,
        BuiltinSource,
        UrlSource,
        HfDiskSource,
        ImagesSource,
    ]
    assert cfg.data.images.channels == 3 and cfg.data.split.test == 0.2
    assert cfg.tokenizer.vocab_size == 4096
    assert cfg.model.lora is not None and cfg.model.lora.r == 4
    assert cfg.model.diffusion.sampler == "ddpm"
    assert cfg.parts["teacher"].model.n_layer == 1
    assert cfg.parts["teacher"].train.max_steps == 10
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.z_loss == pytest.approx(1e-4) and cfg.train.betas == (0.9, 0.99)
    assert cfg.train.grad_clip is None
    assert cfg.eval.k == [1, 10]
    assert [r.op for r in cfg.gate.rules] == ["max_increase_pct", "no_decrease", "min"]
    assert cfg.tune is not None
    assert isinstance(cfg.tune.space["train.lr"], FloatParam)
    assert isinstance(cfg.tune.space["model.n_layer"], IntParam)
    assert cfg.optimize is not None and cfg.optimize.budget == "ppl+3%"
    assert cfg.serve.upstreams["big"][1].url == "https://vllm.internal/v1"
    assert cfg.serve.rate_limit.tokens_per_min is None
    assert cfg.monitor.webhook_url == "http://127.0.0.1:9999/hook"
    assert cfg.feedback.retrain.lr == pytest.approx(5e-5)
    assert cfg.feedback.schedule_seconds == 6 * 3600
    assert cfg.security.guardrails.on_violation == "flag"
    # every top-level section was given explicitly
    assert cfg.model_fields_set == set(GenloopConfig.model_fields)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    again = parse_config(json.loads(json.dumps(cfg.model_dump(mode="json"))))
    assert again == cfg
    again = parse_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again == cfg


def test_empty_file_gives_safe_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg == GenloopConfig()
    assert cfg.data is None and cfg.tune is None and cfg.optimize is None
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.max_n == 8 and cfg.serve.max_stop == 4
    assert cfg.serve.max_body_bytes == 1024 * 1024 and cfg.serve.cors_origins == []
    assert not cfg.serve.metrics_public
    assert cfg.data is None
    assert TrainConfig().warmup_steps < TrainConfig().max_steps


def test_load_as_another_model(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - {metric: perplexity, op: max_increase_pct, value: 2}\n")
    gate = load_config(path, cls=GateConfig)
    assert isinstance(gate, GateConfig) and gate.rules[0].value == 2
    with pytest.raises(ConfigError, match=r"unknown key 'rule' .*did you mean 'rules'"):
        load_config(write(tmp_path, "rule: []\n", "r2.yaml"), (), GateConfig)


def test_float_written_without_a_dot_is_a_float(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 3e-4 as a string; the loader reads it as a number.
    cfg = load_config(
        write(
            tmp_path, "tune:\n  space:\n    train.lr: {type: categorical, choices: [1e-4, 3e-4]}\n"
        )
    )
    assert cfg.tune is not None
    assert cfg.tune.space["train.lr"].model_dump()["choices"] == [1e-4, 3e-4]
    # and a string from elsewhere still validates as a float field
    assert parse_config({"train": {"lr": "3e-4"}}).train.lr == pytest.approx(3e-4)


# --- overrides ------------------------------------------------------------------------


def test_overrides_nested_lists_floats_and_new_sections(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    cfg = load_config(
        path,
        [
            "train.lr=1e-3",
            "train.max_steps=500",
            "train.betas=[0.8, 0.9]",
            "train.compile=false",
            "train.early_stopping_patience=null",
            "data.sources.0.paths=[a.txt, b.txt]",
            "data.sources.-1.path=other",
            "gate.rules.1={metric: bleu, op: no_increase}",
            "serve.port=9000",
            "model.lora.r=16",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.max_steps == 500
    assert cfg.train.betas == (0.8, 0.9) and cfg.train.compile is False
    assert cfg.train.early_stopping_patience is None
    assert cfg.data is not None
    assert cfg.data.sources[0] == FilesSource.model_validate(
        {
            "type": "files",
            "paths": ["a.txt", "b.txt"],
            "field": "body",
            "columns": ["title", "body"],
            "encoding": "latin-1",
        }
    )
    assert cfg.data.sources[-1].path == Path("other")  # type: ignore[union-attr]
    assert cfg.gate.rules[1].metric == "bleu"
    assert cfg.serve.port == 9000
    assert cfg.model.lora is not None and cfg.model.lora.r == 16
    # sections that are absent are created; the last override of a key wins
    cfg = parse_config({}, ["optimize.quantize=int8", "train.seed=1", "train.seed=2"])
    assert cfg.optimize is not None and cfg.optimize.quantize == "int8"
    assert cfg.train.seed == 2


def test_apply_overrides_copies_and_reads_yaml_values() -> None:
    data: dict[str, Any] = {"a": {"b": [1, {"c": 2}]}, "n": None}
    out = apply_overrides(
        data, ["a.b.1.c=3", "a.x=[1, 2]", "a.y=true", "a.z=null", "n.m=1e-3", "s= text "]
    )
    assert out == {
        "a": {"b": [1, {"c": 3}], "x": [1, 2], "y": True, "z": None},
        "n": {"m": 1e-3},
        "s": "text",
    }
    assert data == {"a": {"b": [1, {"c": 2}]}, "n": None}  # untouched


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.lr", r"malformed override 'train.lr'"),
        ("=3", r"malformed override '=3'"),
        ("train..lr=3", r"malformed override 'train..lr=3'"),
        ("a.b=[1", r"invalid value in override 'a.b=\[1'.* line 1"),
        ("a.b.0=1", r"index 0 is out of range \(the list has 0 items\)"),
        ("a.list.5=1", r"index 5 is out of range \(the list has 1 item\)"),
        ("a.list.x=1", r"'a.list.x' indexes a list, so it must be a number"),
        ("a.s.t=1", r"'a.s' is a string, not a mapping"),
    ],
)
def test_bad_overrides_name_themselves(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides({"a": {"b": [], "list": [1], "s": "x"}}, [override])


def test_override_creating_an_unknown_key_is_an_error() -> None:
    message = error_of({}, ("train.lerning_rate=3e-4",))
    assert message.startswith(
        "unknown key 'train.lerning_rate' in --set train.lerning_rate=3e-4 "
        "(did you mean 'train.lr'?; valid keys: augment, batch_size,"
    )


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"trian": {}}, "unknown key 'trian' in run.yaml (did you mean 'train'?; valid keys: "),
        (
            {"train": {"lerning_rate": 1}},
            "unknown key 'train.lerning_rate' in run.yaml (did you mean 'train.lr'?",
        ),
        (
            {"train": {"learning_rate": 1}},
            "unknown key 'train.learning_rate' in run.yaml (did you mean 'train.lr'?",
        ),
        (
            {"serve": {"rate_limit": {"request_per_min": 1}}},
            "unknown key 'serve.rate_limit.request_per_min' in run.yaml "
            "(did you mean 'serve.rate_limit.requests_per_min'?",
        ),
        (
            {"model": {"lora": {"rank": 4}, "base_model": "x"}},
            "unknown key 'model.lora.rank' in run.yaml (valid keys: alpha, dropout,",
        ),
        (
            {"tune": {"space": {"train.lr": {"type": "float", "low": 0.1, "hi": 1}}}},
            "unknown key 'tune.space[\"train.lr\"].hi' in run.yaml (did you mean "
            "'tune.space[\"train.lr\"].high'?; valid keys: high, log, low, step, type)",
        ),
    ],
)
def test_unknown_keys_name_the_key_and_the_nearest(data: dict[str, Any], expected: str) -> None:
    assert expected in error_of(data)


def test_unknown_key_inside_a_source_lists_that_source_kinds_keys() -> None:
    data = {
        "data": {
            "name": "d",
            "sources": [
                {"type": "builtin", "name": "digits"},
                {"type": "url", "urls": ["https://example.org"], "alow_private": True},
            ],
        }
    }
    message = error_of(data)
    assert message == (
        "unknown key 'data.sources[1].alow_private' in run.yaml (did you mean "
        "'data.sources[1].allow_private'?; valid keys: allow_private, max_bytes, "
        "respect_robots, timeout_s, type, urls, user_agent)"
    )


def test_bad_source_type_suggests_the_nearest_kind() -> None:
    message = error_of({"data": {"name": "d", "sources": [{"type": "file", "paths": ["x"]}]}})
    assert "invalid value for 'data.sources[0]'" in message
    assert "did you mean 'files'" in message
    message = error_of({"data": {"name": "d", "sources": [{"paths": ["x"]}]}})
    assert "missing 'type' (one of: files, code, builtin, url, hf_disk, images)" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"train": {"lr": -1}},
            "invalid value for 'train.lr' in run.yaml: Input should be greater than 0 (got -1)",
        ),
        ({"train": {"precision": "fp16"}}, "'train.precision' in run.yaml: Input should be"),
        ({"train": {"lr": {"x": 1}}}, "Input should be a valid number (got a mapping)"),
        ({"train": {"warmup_steps": 10, "max_steps": 10}}, "warmup_steps (10) must be less"),
        ({"data": {"name": "d", "sources": []}}, "'data.sources' in run.yaml: List should have"),
        (
            {"data": {"sources": [{"type": "builtin", "name": "digits"}]}},
            "missing required key 'data.name' in run.yaml",
        ),
        (
            {
                "data": {
                    "name": "d",
                    "sources": [{"type": "builtin", "name": "digits"}],
                    "split": {"val": 0.5, "test": 0.5},
                }
            },
            "val + test must be below 1",
        ),
        ({"model": {"family": "gan"}}, "train.objective 'lm' does not fit model.family 'gan'"),
        (
            {"model": {"family": "seq2seq"}},
            "(it trains causal_lm; seq2seq trains with sft, span_corruption)",
        ),
        ({"model": {"lora": {}}}, "lora needs a base_model"),
        ({"gate": {"rules": [{"metric": "ppl", "op": "max"}]}}, "op 'max' needs a value"),
        ({"eval": {"k": [1, 20]}}, "every k must be between 1 and num_samples (10)"),
        ({"serve": {"ssl_certfile": "c.pem"}}, "ssl_certfile and ssl_keyfile go together"),
        ({"serve": {"upstreams": {"m": ["ftp://x"]}}}, "'ftp://x' is not an http"),
        (
            {"tune": {"space": {"train.lrr": {"type": "float", "low": 0, "high": 1}}}},
            "tune.space key 'train.lrr' is not a config key",
        ),
        (
            {"tune": {"space": {"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}},
            "log scale needs low > 0",
        ),
        ({"feedback": {"schedule": "daily"}}, "'feedback.schedule' in run.yaml: String should"),
        ({"optimize": {"prune": 1.0}}, "'optimize.prune' in run.yaml: Input should be less than 1"),
    ],
)
def test_value_errors_name_the_key(data: dict[str, Any], expected: str) -> None:
    assert expected in error_of(data)


def test_several_errors_share_one_line() -> None:
    message = error_of({"train": {"lr": 0, "batch_size": 0, "lerning": 1}, "serve": {"port": -1}})
    parts = message.split("; ")
    assert len([p for p in parts if p.startswith(("invalid value", "unknown key"))]) == 4
    assert "'serve.port'" in message and "'train.batch_size'" in message


def test_file_problems_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config file not found: .*missing\.yaml$"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad = write(tmp_path, "train:\n  lr: 1\n   max_steps: 2\n", "syntax.yaml")
    with pytest.raises(
        ConfigError, match=r"invalid YAML in .*syntax\.yaml at line 3, column \d+: "
    ):
        load_config(bad)
    dup = write(tmp_path, "train:\n  lr: 1\n  lr: 2\n", "dup.yaml")
    with pytest.raises(ConfigError, match=r"line 3, column 3: duplicate key 'lr'"):
        load_config(dup)
    listing = write(tmp_path, "- train\n", "list.yaml")
    with pytest.raises(ConfigError, match=r"must hold a mapping of sections .* not a list"):
        load_config(listing)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)
    unsafe = write(tmp_path, "train: !!python/object/apply:os.system ['true']\n", "unsafe.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(unsafe)


# --- schema ---------------------------------------------------------------------------


def test_schema_is_json_with_descriptions() -> None:
    schema = json.loads(json.dumps(config_schema()))
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert set(schema["properties"]) == set(GenloopConfig.model_fields)
    defs = schema["$defs"]
    assert defs["TrainConfig"]["additionalProperties"] is False
    assert defs["TrainConfig"]["properties"]["lr"]["exclusiveMinimum"] == 0
    assert defs["TrainConfig"]["properties"]["lr"]["description"]
    sources = defs["DataConfig"]["properties"]["sources"]["items"]
    assert sources["discriminator"]["propertyName"] == "type"
    # every field of every model documents itself
    undocumented = [
        f"{name}.{field}"
        for name, model in defs.items()
        for field, prop in model.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert undocumented == []
