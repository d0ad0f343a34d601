"""The rows the jobs write to Parquet: one dataclass per file, one base, each schema derived from its class.

``archive/<shard>.parquet`` holds :class:`pipeline.types.Record` rows, ``keys/<shard>.parquet``
:class:`pipeline.restore.RestoreRecord` rows and ``metrics/<shard>.parquet``
:class:`pipeline.audit.AuditRecord` rows: one row per sample key, the job's own columns plus the
``status``/``reason``/``error`` columns of :class:`Row`, where a failed row names a reason from its
job's closed set (:meth:`Row.fail`).

A row class declares each column once, as a field made by :func:`required` (non-null, a positional
argument of the constructor) or :func:`column` (a keyword argument with a default, null unless said
otherwise), which carries the column's Arrow type, nullability and optional doc (the field's
``"doc"`` metadata in the file). :meth:`Row.arrow_schema` derives the file's schema: the class's
columns in declaration order, with Row's three after the column named by ``tail_after``. Files
already written fix these schemas, so changing a column's type, nullability, doc or place changes
the file format (docs/archive-format.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from operator import attrgetter
from typing import Any, ClassVar, NamedTuple, Self

import pyarrow as pa

STATUS_OK = "ok"
STATUS_FAILED = "failed"

_ARROW = "arrow"  # the field-metadata key under which a dataclass field keeps its _Column


class _Column(NamedTuple):
    type: pa.DataType
    nullable: bool
    doc: str | None


def required(arrow_type: pa.DataType, doc: str | None = None) -> Any:
    """A non-null column that every row is built with (a positional argument of the constructor)."""
    return field(metadata={_ARROW: _Column(arrow_type, False, doc)})


def column(arrow_type: pa.DataType, doc: str | None = None, *, default: Any = None, nullable: bool = True) -> Any:
    """A column with a default (a keyword-only argument of the constructor); nullable unless told not."""
    return field(default=default, kw_only=True, metadata={_ARROW: _Column(arrow_type, nullable, doc)})


@dataclass
class Row:
    """Base of a Parquet row: the status/reason/error columns, :meth:`fail` and :meth:`arrow_schema`.

    A subclass sets ``reasons`` (its job's closed set of failure reasons) and ``tail_after`` (the
    column that status/reason/error follow in the file), and may document those three columns in
    ``tail_docs``.
    """

    reasons: ClassVar[Mapping[str, str]] = {}
    tail_after: ClassVar[str] = ""
    tail_docs: ClassVar[Mapping[str, str]] = {}

    status: str = column(pa.string(), default=STATUS_FAILED, nullable=False)
    reason: str | None = column(pa.string())
    error: str | None = column(pa.string())

    def fail(self, reason: str, message: str) -> Self:
        """Mark the row failed with ``reason`` from ``reasons``; any other reason is a bug in the caller, so
        it raises instead of writing an undocumented reason."""
        if reason not in self.reasons:
            raise ValueError(f"unknown {type(self).__name__} failure reason {reason!r}; "
                             f"expected one of {sorted(self.reasons)}")
        self.status, self.reason, self.error = STATUS_FAILED, reason, message
        return self

    @classmethod
    def arrow_schema(cls) -> pa.Schema:
        """The schema of a file of these rows (see the module doc for the column order)."""
        tail = [f.name for f in fields(Row)]
        by_name = {f.name: f for f in fields(cls)}
        own = [name for name in by_name if name not in tail]
        if cls.tail_after not in own:
            raise TypeError(f"{cls.__name__}.tail_after must name one of its columns {own}, got {cls.tail_after!r}")
        at = own.index(cls.tail_after) + 1
        return pa.schema([_arrow_field(by_name[name], cls.tail_docs.get(name))
                          for name in own[:at] + tail + own[at:]])


def _arrow_field(f: Field[Any], doc: str | None) -> pa.Field:
    spec = f.metadata.get(_ARROW)
    if spec is None:
        raise TypeError(f"row field {f.name!r} declares no Arrow column (make it with rows.column or rows.required)")
    doc = doc or spec.doc
    return pa.field(f.name, spec.type, nullable=spec.nullable, metadata=None if doc is None else {"doc": doc})


def rows_table(rows: Sequence[Row], schema: pa.Schema, metadata: Mapping[str, str] | None = None,
               sort_key: str | None = "key") -> pa.Table:
    """``rows`` (sorted by the attribute ``sort_key``; None keeps their order) as a table of ``schema``,
    each column read from the attribute of its name, with ``metadata`` as the file's key-value metadata."""
    ordered = sorted(rows, key=attrgetter(sort_key)) if sort_key else rows
    columns = {name: [getattr(r, name) for r in ordered] for name in schema.names}
    return pa.table(columns, schema=schema.with_metadata(dict(metadata or {})))
