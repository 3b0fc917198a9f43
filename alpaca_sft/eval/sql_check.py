"""Does a generated SQL answer run, and does it return what the reference returns?

The CREATE TABLE of the prompt is built in an in-memory SQLite; rows are inserted whose values
include every literal the reference (and the candidate) compares a column with, so that a
correct WHERE clause selects something and a wrong one is likely to select something else.
Parsing, statement splitting and normalization are sqlglot's.

The answer is a model's output, so it runs under SQLite's authorizer: it may read the schema's tables
and call SQLite's ordinary functions, nothing else (no ATTACH, which creates a file; no PRAGMA, write,
CREATE/DROP or extension loading), for at most TIME_LIMIT_S and MAX_ROWS rows. An answer that tries
anything else is refused, and says what it tried.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass

import sqlglot
from sqlglot import exp

ROWS = 24
TIME_LIMIT_S = 1.0  # a query over tables of ROWS rows takes milliseconds; a recursive CTE may never end
MAX_ROWS = 10_000
MAX_VALUE_BYTES = 10_000  # per string or blob: the tables' values are short, randomblob(1e9) is not
SQLITE_DIRECTONLY = 0x80000  # sqlite3.h's mark of functions with effects outside the query (load_extension)
# The authorizer's action codes by name (the sqlite3 module has constants, not a table; their values overlap result codes').
ACTIONS = {getattr(sqlite3, f"SQLITE_{name}"): name for name in (
    "ALTER_TABLE ANALYZE ATTACH CREATE_INDEX CREATE_TABLE CREATE_TEMP_INDEX CREATE_TEMP_TABLE CREATE_TEMP_TRIGGER "
    "CREATE_TEMP_VIEW CREATE_TRIGGER CREATE_VIEW CREATE_VTABLE DELETE DETACH DROP_INDEX DROP_TABLE DROP_TEMP_INDEX "
    "DROP_TEMP_TABLE DROP_TEMP_TRIGGER DROP_TEMP_VIEW DROP_TRIGGER DROP_VIEW DROP_VTABLE FUNCTION INSERT PRAGMA READ "
    "RECURSIVE REINDEX SAVEPOINT SELECT TRANSACTION UPDATE").split()}


@dataclass
class SqlResult:
    parses: bool
    executes: bool
    matches_reference: bool | None  # None when there is no reference
    error: str | None = None
    refused: str | None = None  # what the answer tried besides reading the schema's tables: it did not run


def first_statement(text: str) -> exp.Expression | None:
    """The first SQL statement in a model's answer (which may go on after it), or None."""
    try:
        statements = [s for s in sqlglot.parse(text.strip(), read="sqlite") if s is not None]
    except sqlglot.errors.SqlglotError:
        return None
    return statements[0] if statements else None


def normalize_sql(text: str) -> str | None:
    statement = first_statement(text)
    return statement.sql(dialect="sqlite", normalize=True) if statement is not None else None


def _tables(schema: str) -> dict[str, dict[str, str]]:
    """Table -> column -> declared type. A table declared twice (sql-create-context's contexts do that:
    "CREATE TABLE station (name, id); CREATE TABLE station (name, id, installation_date)") gets the union
    of its columns, as the question means one table."""
    tables: dict[str, dict[str, str]] = {}
    for statement in sqlglot.parse(schema, read="sqlite"):
        if isinstance(statement, exp.Create) and isinstance(statement.this, exp.Schema):
            columns = tables.setdefault(statement.this.this.name, {})
            for column in statement.this.expressions:
                if isinstance(column, exp.ColumnDef):
                    columns.setdefault(column.name, column.args["kind"].sql(dialect="sqlite") if column.args.get("kind") else "")
    return tables


def _create(database: sqlite3.Connection, tables: dict[str, dict[str, str]]) -> None:
    for table, columns in tables.items():
        body = ", ".join(f'"{name}" {kind}'.strip() for name, kind in columns.items())
        database.execute(f'CREATE TABLE "{table}" ({body})')


def _literals_by_column(known_columns: set[str], *statements: exp.Expression | None) -> dict[str, set]:
    """Column -> the values it is compared with. A double-quoted "value" that names no column is a
    string to SQLite (and to the WikiSQL-style answers that write strings that way)."""
    found: dict[str, set] = {}
    for statement in statements:
        if statement is None:
            continue
        for comparison in statement.find_all(exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like):
            sides = [comparison.left, comparison.right]
            columns = [c for c in sides if isinstance(c, exp.Column) and c.name.lower() in known_columns]
            values = [v.this if isinstance(v, exp.Literal) else v.name for v in sides
                      if isinstance(v, exp.Literal) or (isinstance(v, exp.Column) and v.name.lower() not in known_columns)]
            if columns and values:
                found.setdefault(columns[0].name.lower(), set()).add(values[0])
    return found


def _rows(columns: list[str], literals: dict[str, set], rng: random.Random) -> list[tuple]:
    def value(column: str):
        seen = sorted(literals.get(column.lower(), ()))
        if seen and rng.random() < 0.5:
            return rng.choice(seen)
        if seen and all(_is_number(v) for v in seen):
            return str(round(float(rng.choice(seen)) + rng.uniform(-10, 10), 1))
        return f"{column}_{rng.randint(0, 5)}"

    return [tuple(value(c) for c in columns) for _ in range(ROWS)]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class _ReadOnly:
    """Installed on a database whose tables are built: every statement run through rows() may only read
    those tables, within the time and size limits. After a refusal, `refused` says what was denied."""

    def __init__(self, database: sqlite3.Connection, tables) -> None:
        self.database = database
        self.tables = {t.lower() for t in tables}
        self.direct_only = {row[0] for row in database.execute("PRAGMA function_list") if row[5] & SQLITE_DIRECTONLY}
        self.refused: str | None = None
        self.deadline = 0.0
        database.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        database.set_authorizer(self._authorize)
        database.set_progress_handler(self._over_time, 1000)

    def _authorize(self, action, arg1, arg2, database_name, _trigger_or_view):
        # A READ whose column is "" is SQLite's note that a table (a WITH table too) is named but none of
        # its values is used, as in count(*): it reads nothing.
        allowed = (action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE)
                   or action == sqlite3.SQLITE_READ and ((arg1 or "").lower() in self.tables and database_name == "main"
                                                         or arg2 == "")
                   or action == sqlite3.SQLITE_FUNCTION and arg2 not in self.direct_only)
        if allowed:
            return sqlite3.SQLITE_OK
        if self.refused is None:  # the first denial names what the answer tried; the rest follow from it
            target = " ".join(str(a) for a in (arg1, arg2) if a)
            self.refused = f"not a read-only query of the schema's tables: {ACTIONS.get(action, action)} {target}".strip()
        return sqlite3.SQLITE_DENY

    def _over_time(self) -> int:
        if time.monotonic() > self.deadline:
            self.refused = f"ran longer than {TIME_LIMIT_S:g} s"
            return 1
        return 0

    def rows(self, sql: str) -> list[tuple]:
        self.refused = None
        self.deadline = time.monotonic() + TIME_LIMIT_S
        rows = self.database.execute(sql).fetchmany(MAX_ROWS + 1)
        if len(rows) > MAX_ROWS:
            self.refused = f"returns more than {MAX_ROWS} rows"
            raise sqlite3.DataError(self.refused)
        return rows


def _build(database: sqlite3.Connection, schema: str, seed: int, *statements) -> dict[str, dict[str, str]]:
    """The schema's tables, filled with rows that hold the literals the statements compare columns with."""
    tables = _tables(schema)
    _create(database, tables)
    rng = random.Random(seed)
    known = {c.lower() for columns in tables.values() for c in columns}
    literals = _literals_by_column(known, *statements)
    for table, columns in tables.items():
        marks = ", ".join("?" * len(columns))
        database.executemany(f'INSERT INTO "{table}" VALUES ({marks})', _rows(list(columns), literals, rng))
    database.commit()  # the answer then runs outside the inserts' transaction, as a statement of its own
    return tables


def check_sql(answer: str, schema: str, reference: str | None = None, seed: int = 0) -> SqlResult:
    candidate = first_statement(answer)
    if candidate is None:
        return SqlResult(parses=False, executes=False, matches_reference=False if reference else None,
                         error="no SQL statement could be parsed")
    expected = first_statement(reference) if reference else None
    database = sqlite3.connect(":memory:")
    try:
        try:
            tables = _build(database, schema, seed, expected, candidate)
        except (sqlglot.errors.SqlglotError, sqlite3.Error) as err:  # the prompt's schema, not the answer, is at fault
            return SqlResult(parses=True, executes=False, matches_reference=None, error=f"the schema does not build: {err}")
        read_only = _ReadOnly(database, tables)
        try:
            got = read_only.rows(candidate.sql(dialect="sqlite"))
        except sqlite3.Error as err:
            return SqlResult(parses=True, executes=False, matches_reference=False if reference else None,
                             error=read_only.refused or str(err), refused=read_only.refused)
        if expected is None:
            return SqlResult(parses=True, executes=True, matches_reference=None)
        try:
            want = read_only.rows(expected.sql(dialect="sqlite"))
        except sqlite3.Error as err:
            return SqlResult(parses=True, executes=True, matches_reference=None,
                             error=f"the reference does not run: {read_only.refused or err}")
        ordered = expected.args.get("order") is not None
        same = got == want if ordered else Counter(got) == Counter(want)
        return SqlResult(parses=True, executes=True, matches_reference=same)
    finally:
        database.close()
