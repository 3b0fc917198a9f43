"""Does a generated SQL answer run, and does it return what the reference returns?

The CREATE TABLE of the prompt is built in an in-memory SQLite; rows are inserted whose values
include every literal the reference (and the candidate) compares a column with, so that a
correct WHERE clause selects something and a wrong one is likely to select something else.
Parsing, statement splitting and normalization are sqlglot's.
"""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from dataclasses import dataclass

import sqlglot
from sqlglot import exp

ROWS = 24


@dataclass
class SqlResult:
    parses: bool
    executes: bool
    matches_reference: bool | None  # None when there is no reference
    error: str | None = None


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


def check_sql(answer: str, schema: str, reference: str | None = None, seed: int = 0) -> SqlResult:
    candidate = first_statement(answer)
    if candidate is None:
        return SqlResult(parses=False, executes=False, matches_reference=False if reference else None,
                         error="no SQL statement could be parsed")
    expected = first_statement(reference) if reference else None
    database = sqlite3.connect(":memory:")
    try:
        try:
            tables = _tables(schema)
            _create(database, tables)
        except (sqlglot.errors.SqlglotError, sqlite3.Error) as err:  # the prompt's schema, not the answer, is at fault
            return SqlResult(parses=True, executes=False, matches_reference=None, error=f"the schema does not build: {err}")
        rng = random.Random(seed)
        known = {c.lower() for columns in tables.values() for c in columns}
        literals = _literals_by_column(known, expected, candidate)
        for table, columns in tables.items():
            marks = ", ".join("?" * len(columns))
            database.executemany(f'INSERT INTO "{table}" VALUES ({marks})', _rows(list(columns), literals, rng))
        try:
            got = database.execute(candidate.sql(dialect="sqlite")).fetchall()
        except sqlite3.Error as err:
            return SqlResult(parses=True, executes=False, matches_reference=False if reference else None, error=str(err))
        if expected is None:
            return SqlResult(parses=True, executes=True, matches_reference=None)
        try:
            want = database.execute(expected.sql(dialect="sqlite")).fetchall()
        except sqlite3.Error as err:
            return SqlResult(parses=True, executes=True, matches_reference=None, error=f"the reference does not run: {err}")
        ordered = expected.args.get("order") is not None
        same = got == want if ordered else Counter(got) == Counter(want)
        return SqlResult(parses=True, executes=True, matches_reference=same)
    finally:
        database.close()
