"""Reading an annotation output back (SPEC §6) for inspect, render and export, and the ``--where`` filter.

``--where`` is a small filter language over the columns, parsed here (never ``eval``-ed) into a
``pyarrow.compute`` expression::

    score < 0.5
    label_name == 'circle' and score >= 0.9
    status = 'error' or (width > 4000 and not label_name in ('cat', 'dog'))
    error_type is not null

Comparisons ``< <= > >= == = !=``, ``is [not] null``, ``[not] in (v, ...)``, combined with ``and``, ``or``,
``not`` and parentheses; literals are numbers (integers within 64 bits), quoted strings, ``true`` and
``false``. As in SQL, a comparison or ``in`` on a null cell is unknown (null), ``not`` keeps it unknown,
``and``/``or`` follow Kleene's logic (``null or true`` is true), and a row whose filter is unknown is dropped:
``not label_name in ('cat')`` drops the rows without a label, as ``label_name not in ('cat')`` does.
"""

from __future__ import annotations

import functools
import json
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycv import storage
from raycv.errors import ConfigError
from raycv.outputs import schema as outputs
from raycv.storage import Storage
from raycv.tasks.registry import Task, get_task

# -- Reading ---------------------------------------------------------------------------------------------------


def images_files(output: str, store: Storage) -> list[str]:
    """The committed ``OUTPUT/images`` files.

    Raises:
        FileNotFoundError: ``output`` holds no committed rows (not an annotation output, or nothing ran).
    """
    files = outputs.committed_files(output, store)
    if not files:
        raise FileNotFoundError(
            f"{storage.join(output, outputs.IMAGES_DIR)} holds no Parquet files: point at the `output` of a "
            "finished `raycv annotate` run"
        )
    return files


def objects_files(output: str, store: Storage) -> list[str]:
    try:
        folder = storage.join(output, outputs.OBJECTS_DIR)
        return [e.uri for e in store.iter_files(folder, extensions=(".parquet",))]
    except FileNotFoundError:
        return []


def read_file(uri: str, store: Storage, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file; of ``columns``, those it has (older files may lack newer columns)."""
    fs, path = store.filesystem(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        return pf.read(columns=None if columns is None else [c for c in columns if c in names])


def concat(tables: list[pa.Table]) -> pa.Table:
    """Tables whose schemas differ by optional columns (e.g. ``gradcam_png``) as one, missing cells null."""
    tables = [t for t in tables if t.num_columns]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


def read_images(output: str, store: Storage, columns: list[str] | None = None) -> pa.Table:
    """Every committed ``OUTPUT/images`` row (``columns`` only, when given)."""
    return concat([read_file(f, store, columns) for f in images_files(output, store)])


def read_objects(output: str, store: Storage, columns: list[str] | None = None) -> pa.Table:
    """Every ``OUTPUT/objects`` row (detection outputs); an empty table for other tasks."""
    schema = outputs.objects_schema()
    tables = [read_file(f, store, columns) for f in objects_files(output, store)]
    if not tables:
        names = columns or schema.names
        return pa.schema([schema.field(n) for n in names if n in schema.names]).empty_table()
    return concat(tables)


def task_of(output: str, store: Storage) -> Task | None:
    """The task of an output (from its first rows that name one); None when no row does."""
    for f in images_files(output, store):
        tasks = [t for t in read_file(f, store, ["task"]).column("task").to_pylist() if t]
        if tasks:
            return get_task(str(tasks[0]))
    return None


def read_summary(output: str, store: Storage) -> dict[str, Any] | None:
    try:
        return json.loads(store.read_bytes(storage.join(output, outputs.SUMMARY)))  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


# -- --where ---------------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op><=|>=|!=|==|=|<|>)
      | (?P<punct>[(),])
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "is", "null", "in", "true", "false"}
_KINDS = {"lit": "a value", "op": "a comparison (< <= > >= == !=)", "name": "a column name"}


Build = Callable[[pa.Schema], pc.Expression]


@dataclass(frozen=True)
class Where:
    """A parsed ``--where``: the columns it reads, its text (for messages), and how to build the
    expression for a table's schema (a literal takes the type of the column it is compared with, so that
    ``score >= 0.9`` holds for a float32 score of 0.9)."""

    build: Build
    columns: frozenset[str]
    text: str


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos, text = 0, text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ConfigError(
                "--where", text, f"Cannot read it from position {pos}: {text[pos : pos + 20]!r}."
            )
        pos = m.end()
        kind = m.lastgroup
        value = m.group(kind)  # type: ignore[arg-type]
        if kind == "num":
            out.append(("lit", _number(text, value)))
        elif kind == "str":
            out.append(("lit", re.sub(r"\\(.)", r"\1", value[1:-1])))
        elif kind == "name" and value.lower() in _KEYWORDS:
            word = value.lower()
            out.append(("lit", word == "true") if word in ("true", "false") else ("kw", word))
        else:
            out.append((str(kind), value))
    return out


def _number(text: str, value: str) -> int | float:
    """A numeric literal; an integer must fit 64 bits (pyarrow's widest), else a :class:`ConfigError`."""
    if re.search(r"[.eE]", value):
        return float(value)
    number = int(value)
    if not -(2**63) <= number < 2**63:
        raise ConfigError(
            "--where",
            text,
            f"The number {value} does not fit a 64-bit integer (-2**63 .. 2**63-1); "
            f"write it as a float, e.g. {float(number):.6g}.",
        )
    return number


class _Parser:
    """Recursive descent over: or_expr := and_expr ('or' and_expr)*; and_expr := not_expr ('and' not_expr)*;
    not_expr := 'not' not_expr | '(' or_expr ')' | comparison."""

    def __init__(self, text: str) -> None:
        self.text, self.toks, self.i = text, _tokens(text), 0
        self.columns: set[str] = set()

    def fail(self, why: str) -> ConfigError:
        return ConfigError(
            "--where",
            self.text,
            f'{why} Write e.g. "score < 0.5" or "label_name == \'cat\' and score >= 0.9" '
            "(comparisons, is [not] null, in (...), and/or/not, parentheses).",
        )

    def peek(self) -> tuple[str, Any] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, kind: str, value: Any = None) -> Any:
        tok = self.peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            shown = "the end" if tok is None else repr(tok[1])
            wanted = repr(value) if value is not None else _KINDS[kind]
            raise self.fail(f"Expected {wanted} but found {shown}.")
        self.i += 1
        return tok[1]

    def accept(self, kind: str, value: Any = None) -> bool:
        tok = self.peek()
        if tok is not None and tok[0] == kind and (value is None or tok[1] == value):
            self.i += 1
            return True
        return False

    def parse(self) -> Build:
        if not self.toks:
            raise self.fail("The filter is empty.")
        expr = self.or_expr()
        if self.peek() is not None:
            raise self.fail(f"Unexpected {self.peek()[1]!r} after a complete condition.")  # type: ignore[index]
        return expr

    def or_expr(self) -> Build:
        parts = [self.and_expr()]
        while self.accept("kw", "or"):
            parts.append(self.and_expr())
        # pyarrow's | and & are or_kleene and and_kleene: null or true is true, null and false is false
        return lambda schema: functools.reduce(operator.or_, (p(schema) for p in parts))

    def and_expr(self) -> Build:
        parts = [self.not_expr()]
        while self.accept("kw", "and"):
            parts.append(self.not_expr())
        return lambda schema: functools.reduce(operator.and_, (p(schema) for p in parts))

    def not_expr(self) -> Build:
        if self.accept("kw", "not"):
            inner = self.not_expr()
            return lambda schema: ~inner(schema)
        if self.accept("punct", "("):
            expr = self.or_expr()
            self.take("punct", ")")
            return expr
        return self.comparison()

    def comparison(self) -> Build:
        name = self.take("name")
        self.columns.add(name)
        field = pc.field(name)
        if self.accept("kw", "is"):
            negate = self.accept("kw", "not")
            self.take("kw", "null")
            return lambda schema: ~field.is_null() if negate else field.is_null()
        negate = self.accept("kw", "not")
        if negate or self.accept("kw", "in"):
            if negate:
                self.take("kw", "in")
            values = self.literal_list()
            return lambda schema: ~_is_in(field, values) if negate else _is_in(field, values)
        compare = _COMPARE[self.take("op")]
        value = self.take("lit")
        return lambda schema: compare(field, _typed(schema, name, value))

    def literal_list(self) -> list[Any]:
        self.take("punct", "(")
        values = [self.take("lit")]
        while self.accept("punct", ","):
            values.append(self.take("lit"))
        self.take("punct", ")")
        return values


_COMPARE: dict[str, Callable[[Any, Any], pc.Expression]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "=": operator.eq,
    "==": operator.eq,
    "!=": operator.ne,
}


def _is_in(field: pc.Expression, values: list[Any]) -> pc.Expression:
    """``field in values``, null on a null cell (SQL), so that ``not`` keeps it null; pyarrow's ``is_in``
    gives false there (or true for ``not``), and this pyarrow cannot ask it for null."""
    return pc.if_else(field.is_null(), pa.scalar(None, pa.bool_()), field.isin(values))


def _typed(schema: pa.Schema, name: str, value: Any) -> Any:
    """A numeric literal as a scalar of its float column's type (else pyarrow widens the column, and
    float32 0.9 < 0.9)."""
    index = schema.get_field_index(name)
    kind = schema.field(index).type if index >= 0 else None
    if kind is not None and pa.types.is_floating(kind) and isinstance(value, int | float):
        return pa.scalar(float(value), kind)  # an int beyond float32 precision is rounded, not refused
    return value


def parse_where(text: str) -> Where:
    """Parse a ``--where`` filter (grammar in the module doc).

    Raises:
        ConfigError: a syntax error, naming where and what is expected, or an integer beyond 64 bits.
    """
    p = _Parser(text)
    build = p.parse()
    return Where(build, frozenset(p.columns), text)


def filter_table(table: pa.Table, where: Where) -> pa.Table:
    """The rows of ``table`` where ``where`` holds.

    Raises:
        ConfigError: an unknown column, or a comparison of incompatible types (``score > 'a'``).
    """
    missing = sorted(where.columns - set(table.column_names))
    if missing:
        raise ConfigError(
            "--where",
            where.text,
            f"No column {', '.join(missing)}; columns: {', '.join(table.column_names)}.",
        )
    try:
        return table.filter(where.build(table.schema))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ConfigError("--where", where.text, f"Cannot evaluate it on these columns: {exc}") from exc


def applies_to_objects(where: Where, task: Task | None) -> bool:
    """Whether ``where`` filters detected objects (it reads an object column such as ``score``, ``label``)
    rather than image rows. Mixing image-only and object-only columns is refused."""
    if task is None or not task.objects:
        return False
    image_columns = set(outputs.images_schema(task.name).names)
    object_only = set(outputs.objects_schema().names) - image_columns
    image_only = image_columns - set(outputs.objects_schema().names)
    on_objects, on_images = where.columns & object_only, where.columns & image_only
    if on_objects and on_images:
        raise ConfigError(
            "--where",
            where.text,
            f"It mixes object columns ({', '.join(sorted(on_objects))}) with image columns "
            f"({', '.join(sorted(on_images))}); filter on one or the other.",
        )
    return bool(on_objects)


def iter_rows(output: str, store: Storage, where: Where | None = None) -> Iterator[pa.Table]:
    """The committed image rows, file by file (bounded memory), filtered by ``where`` when given."""
    for f in images_files(output, store):
        table = read_file(f, store)
        yield filter_table(table, where) if where is not None else table
