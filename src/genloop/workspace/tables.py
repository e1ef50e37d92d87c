"""The catalog schema: every box of the loop is a row here.

SQLAlchemy 2 declarative models. The schema is created and changed only through the
Alembic migrations in ``genloop/workspace/migrations``; a test checks that the migrated
database and these models agree. Text that users typed (prompts, responses, corrections)
is stored encrypted (``*_enc`` columns, see ``genloop.security.crypto``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations can drop and alter them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend, whatever the server's time zone.

    Naive datetimes given to it are taken as UTC (SQLite stores them naive).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite: stored as UTC without an offset
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)  # PostgreSQL: in the session's time zone


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


def _ts() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), default=utcnow, nullable=False)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = _ts()
    versions: Mapped[list[DatasetVersion]] = relationship(back_populates="dataset")


class DatasetVersion(Base):
    __tablename__ = "dataset_versions"
    __table_args__ = (
        UniqueConstraint("dataset_id", "version", name="uq_dataset_versions_dataset_version"),
        UniqueConstraint("dataset_id", "content_hash", name="uq_dataset_versions_dataset_hash"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    # sha256 of the inputs and the config that produced it: same hash → same version.
    content_hash: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32), default="text")  # text|code|images|sft|dpo
    artifact: Mapped[str] = mapped_column(String(512))  # artifact store key
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    lineage: Mapped[dict[str, Any]] = mapped_column(default=dict)  # sources, parents
    # 'ready', or 'excluded' when built from an erased user's data (never trained on again).
    status: Mapped[str] = mapped_column(String(16), default="ready")
    created_at: Mapped[datetime] = _ts()
    dataset: Mapped[Dataset] = relationship(back_populates="versions")


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    name: Mapped[str] = mapped_column(String(128), default="")
    kind: Mapped[str] = mapped_column(
        String(32), default="train"
    )  # train|tune|eval|retrain|pipeline
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|completed|failed|…
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)  # final metrics
    dataset_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset_versions.id", ondelete="SET NULL")
    )
    # The base model a fine-tune started from. No foreign key: runs and model_versions
    # would reference each other; model_versions.run_id is the enforced direction.
    parent_model_version_id: Mapped[int | None] = mapped_column(Integer)
    parent_run_id: Mapped[str | None] = mapped_column(
        ForeignKey("runs.id", ondelete="SET NULL")
    )  # a tuning study's trials, a pipeline's stages
    study: Mapped[str | None] = mapped_column(String(128))
    trial: Mapped[int | None] = mapped_column(Integer)
    git_commit: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = _ts()
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class RunMetric(Base):
    """One point of a run's metric series (loss, val_loss, lr, grad_norm, tokens_per_s …)."""

    __tablename__ = "run_metrics"
    __table_args__ = (Index("ix_run_metrics_run_key_step", "run_id", "key", "step"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    at: Mapped[datetime] = _ts()


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    family: Mapped[str] = mapped_column(String(32))  # causal_lm|seq2seq|vae|gan|diffusion
    artifact: Mapped[str] = mapped_column(String(512))
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    dataset_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset_versions.id", ondelete="SET NULL")
    )
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)  # e.g. {"variant": "int8"}
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = _ts()


class Alias(Base):
    """The current target of ``NAME@ALIAS``."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("name", "alias", name="uq_aliases_name_alias"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    alias: Mapped[str] = mapped_column(String(64))
    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE")
    )
    updated_at: Mapped[datetime] = _ts()


class AliasHistory(Base):
    """Each promotion of an alias; a rollback marks the newest live one rolled back."""

    __tablename__ = "alias_history"
    __table_args__ = (Index("ix_alias_history_name_alias", "name", "alias"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    alias: Mapped[str] = mapped_column(String(64))
    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE")
    )
    actor: Mapped[str] = mapped_column(String(128), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = _ts()
    rolled_back_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Evaluation(Base):
    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    dataset_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset_versions.id", ondelete="SET NULL")
    )
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    suite: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # generation settings, seed
    report: Mapped[str | None] = mapped_column(String(512))  # artifact key
    created_at: Mapped[datetime] = _ts()


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16), index=True)  # shown in lists and logs
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; never the key
    scopes: Mapped[str] = mapped_column(String(256))  # comma-separated
    user_id: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = _ts()
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # per-key overrides of serve.rate_limit: NULL → the server's default, 0 → no limit
    requests_per_min: Mapped[int | None] = mapped_column(Integer)
    tokens_per_min: Mapped[int | None] = mapped_column(Integer)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    tokens_per_month: Mapped[int | None] = mapped_column(BigInteger)


class RequestLog(Base):
    """A served request; its id is the response id that feedback links to."""

    __tablename__ = "requests"
    __table_args__ = (Index("ix_requests_user_id", "user_id"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    user_id: Mapped[str | None] = mapped_column(String(128))
    endpoint: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[int | None] = mapped_column(Integer)
    prompt_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    response_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer, default=200)
    flags: Mapped[list[Any]] = mapped_column(default=list)  # guardrail flags
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class Usage(Base):
    """Hourly usage counters per key and model version."""

    __tablename__ = "usage"
    __table_args__ = (
        UniqueConstraint(
            "api_key_id", "model_name", "model_version", "hour", name="uq_usage_bucket"
        ),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[int | None] = mapped_column(Integer)
    hour: Mapped[datetime] = mapped_column(UTCDateTime())
    requests: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (
        Index("ix_feedback_user_id", "user_id"),
        Index("ix_feedback_principal", "principal"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"))
    user_id: Mapped[str | None] = mapped_column(String(128))  # the client's label
    # who gave it, from the API key: "user:<key's user id>" or "key:<key id>" (caps, votes)
    principal: Mapped[str | None] = mapped_column(String(160))
    rating: Mapped[int] = mapped_column(Integer)  # +1 | -1
    correction_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    comment_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|approved|rejected
    exported_to: Mapped[int | None] = mapped_column(
        ForeignKey("dataset_versions.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = _ts()


class Alert(Base):
    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))  # drift|latency|error_rate|nan|…
    severity: Mapped[str] = mapped_column(String(16), default="warning")
    source: Mapped[str] = mapped_column(String(128), default="")  # model ref or run id
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditEvent(Base):
    """Admin actions and erasures: who did what to which object; never content."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256), default="")
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Lock(Base):
    """A named lease (one retrain at a time); expired leases may be taken over."""

    __tablename__ = "locks"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    acquired_at: Mapped[datetime] = _ts()
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LabelTask(Base):
    """A labeling task: items to label with one ``kind`` of label (genloop.feedback.labeling).

    kind: ``classification`` | ``spans`` (a label per token) | ``caption`` (edit a text) |
    ``preference`` (choose between two generations).
    """

    __tablename__ = "label_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    label_set: Mapped[list[Any]] = mapped_column(default=list)  # classification, spans
    overlap: Mapped[int] = mapped_column(Integer, default=1)  # labels wanted per item
    source: Mapped[dict[str, Any]] = mapped_column(default=dict)  # dataset ref or file + hash
    # where the pre-labels came from: "model:NAME@V", "dataset", "file", or none
    prelabel_source: Mapped[str | None] = mapped_column(String(256))
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = _ts()


class LabelItem(Base):
    """One thing to label: its payload (text; tokens; prompt + two generations) and an
    optional pre-label the annotator accepts or corrects."""

    __tablename__ = "label_items"
    __table_args__ = (UniqueConstraint("task_id", "position", name="uq_label_items_task_position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("label_tasks.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # the queue's order
    payload: Mapped[dict[str, Any]] = mapped_column()
    # SQL NULL when there is none (not JSON null), so "has a pre-label" is a plain filter
    prelabel: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class Label(Base):
    """One annotator's label of one item; a second one by the same annotator is refused."""

    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("item_id", "annotator", name="uq_labels_item_annotator"),
        Index("ix_labels_task_id", "task_id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("label_items.id", ondelete="CASCADE"))
    task_id: Mapped[int] = mapped_column(ForeignKey("label_tasks.id", ondelete="CASCADE"))
    annotator: Mapped[str] = mapped_column(String(128))
    value: Mapped[dict[str, Any]] = mapped_column()
    # whether the value equals the item's pre-label (None: the item had none)
    prelabel_accepted: Mapped[bool | None] = mapped_column(Boolean)
    created_at: Mapped[datetime] = _ts()
