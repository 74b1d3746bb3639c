"""Cell selection: the one function behind every ``cells=`` argument in cellkit.

:func:`select_cells` turns what a user passes as ``cells=`` (``None``, a boolean mask, integer
positions, obs names, the name of a studio selection, or a query string) into integer row
positions of ``obs``. Query strings use a small, restricted grammar (:func:`parse_query`) that is
*interpreted* here over the ``obs`` columns: it is never handed to ``eval``, ``DataFrame.query``
or ``DataFrame.eval``, so a query can compare columns but never call a function, read an
attribute, reach a Python variable (``@name``) or index anything.

Query grammar
-------------
- column comparisons: ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=`` against a number, a quoted
  string, ``True``/``False`` or another column; chains such as ``500 < n_genes <= 2000``;
- membership: ``col in ['a', 'b']``, ``col not in [1, 2]``, ``col.isin(['a', 'b'])`` and, as in
  pandas, ``col == ['a', 'b']`` / ``col != [...]``;
- boolean logic: ``and``, ``or``, ``not`` and their pandas spellings ``&``, ``|``, ``~`` (``&``
  and ``|`` bind like ``and`` / ``or``, as in ``DataFrame.query``), parentheses;
- a boolean column on its own (``is_doublet``, ``not is_doublet``);
- column names as bare identifiers or, for names with spaces or symbols, in backticks
  (```cell type` == 'B cell'``); ``index`` (or the index's name) is the obs names.

Semantics (the same masks as ``obs.query`` for every query the grammar accepts):

- missing values (NaN, ``None``, ``pd.NA``) never satisfy ``==``, ``<``, ``<=``, ``>``, ``>=``,
  ``in`` or ``isin``; they do satisfy ``!=`` and ``not in`` (IEEE / pandas rules);
- a text or categorical-of-text column compared with a number is refused (pandas would silently
  select nothing: ``leiden == 3`` when the clusters are the strings ``'3'``), and so is a numeric
  column compared with a string; the error shows the quoted / unquoted form to use;
- ``<`` and friends on an unordered categorical column are refused with the reason.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from .._errors import DataError

__all__ = ["MAX_QUERY_CHARS", "MAX_QUERY_DEPTH", "QUERY_GRAMMAR", "CellQuery", "parse_query", "select_cells"]

#: longest accepted query string (characters)
MAX_QUERY_CHARS = 4000
#: deepest accepted nesting (parentheses, and/or/not, comparisons) of a query
MAX_QUERY_DEPTH = 32

#: one-paragraph summary of the grammar, quoted by every refusal
QUERY_GRAMMAR = (
    "A cell query may use: column comparisons (==, !=, <, <=, >, >=) with numbers, quoted strings, "
    "True/False or other columns; col in [...] / col not in [...]; col.isin([...]); and / or / not "
    "(or & | ~); parentheses. Put column names with spaces in backticks: `cell type` == 'B cell'. "
    "Nothing else (no function calls, attributes, @variables, subscripts or arithmetic)."
)

_CMP: dict[type[ast.cmpop], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Eq: ("==", operator.eq),
    ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt),
    ast.GtE: (">=", operator.ge),
}
_PLACEHOLDER = "_cellkit_column_"


def _refuse(text: str, why: str) -> DataError:
    return DataError(f"Cannot evaluate the cell query {_short(text)}: {why} {QUERY_GRAMMAR}", param="cells")


def _short(text: str, limit: int = 120) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"… ({len(text):,} characters)"


def _prepare(text: str) -> tuple[str, dict[str, str]]:
    """Replace backticked names by placeholders and ``&``/``|`` by ``and``/``or`` outside strings.

    Refuses ``@`` (pandas' reference to a Python variable) and parentheses nested deeper than
    :data:`MAX_QUERY_DEPTH` before anything is parsed.
    """
    out: list[str] = []
    names: dict[str, str] = {}
    depth = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "'\"":  # copy a string literal verbatim (the parser checks it)
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
            continue
        if c == "`":
            j = text.find("`", i + 1)
            if j < 0:
                raise _refuse(text, "a backtick opens a column name that is never closed.")
            key = f"{_PLACEHOLDER}{len(names)}"
            names[key] = text[i + 1 : j]
            out.append(f" {key} ")
            i = j + 1
            continue
        if c == "@":
            raise _refuse(
                text, "'@' (a reference to a Python variable) is not supported; write the value itself."
            )
        if c in "([{":
            depth += 1
            if depth > MAX_QUERY_DEPTH:
                raise _refuse(text, f"it nests brackets more than {MAX_QUERY_DEPTH} deep.")
        elif c in ")]}":
            depth -= 1
        out.append(" and " if c == "&" else " or " if c == "|" else c)
        i += 1
    return "".join(out), names


@dataclass(frozen=True)
class CellQuery:
    """A parsed, checked cell query; :meth:`mask` evaluates it over an ``obs`` table.

    Build it with :func:`parse_query`.

    Attributes
    ----------
    text
        The query as written.
    columns
        The column names it refers to (bare or backticked), in order of appearance.
    """

    text: str
    columns: tuple[str, ...]
    _tree: ast.Expression = field(repr=False, compare=False)
    _names: Mapping[str, str] = field(repr=False, compare=False)

    def mask(self, obs: pd.DataFrame) -> np.ndarray:
        """``(n_obs,)`` boolean mask of the cells of ``obs`` the query selects.

        Raises
        ------
        cellkit.DataError
            An unknown column (the message lists the available ones), an unquoted value, or a
            comparison the column's type does not support.
        """
        value = _Evaluator(self, obs).boolean(self._tree.body)
        return value


def parse_query(text: str) -> CellQuery:
    """Parse and check a cell query without evaluating it.

    Parameters
    ----------
    text
        A query in the restricted grammar described in :mod:`cellkit.data.selection`, e.g.
        ``"bulk_labels == 'CD14+ Monocyte' and n_genes > 500"``.

    Returns
    -------
    The checked :class:`CellQuery`; columns are looked up when it is evaluated.

    Raises
    ------
    cellkit.DataError
        Text longer than :data:`MAX_QUERY_CHARS`, nested deeper than :data:`MAX_QUERY_DEPTH`, not
        valid syntax, or using anything outside the grammar (calls, attributes, ``@`` references,
        subscripts, lambdas, comprehensions, f-strings, arithmetic, dunder names …). Nothing in
        the text is ever executed.
    """
    if not isinstance(text, str):
        raise DataError(f"A cell query must be a string, got {type(text).__name__}.", param="cells")
    if len(text) > MAX_QUERY_CHARS:
        raise _refuse(
            text,
            f"it is {len(text):,} characters long; at most {MAX_QUERY_CHARS:,} are accepted "
            "(select long lists of cells with a list of obs names or a boolean mask instead).",
        )
    if not text.strip():
        raise _refuse(text, "it is empty.")
    source, names = _prepare(text)
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise _refuse(text, f"it is not valid query syntax ({exc.msg}).") from None
    except (RecursionError, MemoryError, ValueError, OverflowError):
        raise _refuse(text, "it is too complex to parse.") from None
    columns: list[str] = []
    _check(tree.body, text, names, columns, 1)
    return CellQuery(text, tuple(dict.fromkeys(columns)), tree, dict(names))


def _check(node: ast.AST, text: str, names: Mapping[str, str], columns: list[str], depth: int) -> None:
    """Walk the tree against the whitelist (structure only; columns are resolved later)."""
    if depth > MAX_QUERY_DEPTH:
        raise _refuse(text, f"it nests more than {MAX_QUERY_DEPTH} levels deep.")
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check(v, text, names, columns, depth + 1)
    elif isinstance(node, ast.UnaryOp):
        _check_unary(node, text, names, columns, depth)
    elif isinstance(node, ast.Compare):
        _check_compare(node, text, names, columns)
    elif isinstance(node, ast.Call):
        _check_isin_call(node, text, names, columns)
    elif isinstance(node, ast.Name):
        _check_operand(node, text, names, columns)
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return
    else:
        raise _refuse(text, _describe(node))


def _check_unary(
    node: ast.UnaryOp, text: str, names: Mapping[str, str], columns: list[str], depth: int
) -> None:
    """``not`` / ``~`` recurse into their operand; a sign is allowed on a number literal only."""
    if isinstance(node.op, ast.Not | ast.Invert):
        _check(node.operand, text, names, columns, depth + 1)
    elif isinstance(node.op, ast.USub | ast.UAdd) and _is_number(node.operand):
        return
    else:
        raise _refuse(text, "arithmetic (signs) applies to number literals only.")


def _check_compare(node: ast.Compare, text: str, names: Mapping[str, str], columns: list[str]) -> None:
    """A comparison uses a supported operator and compares columns, literals or literal lists."""
    for op in node.ops:
        if type(op) not in _CMP and not isinstance(op, ast.In | ast.NotIn):
            raise _refuse(text, f"the operator {type(op).__name__} ('is', 'is not') is not supported.")
    for operand in (node.left, *node.comparators):
        if isinstance(operand, ast.List | ast.Tuple):
            _check_list(operand, text)
        else:
            _check_operand(operand, text, names, columns)


def _check_isin_call(node: ast.Call, text: str, names: Mapping[str, str], columns: list[str]) -> None:
    """The only call allowed is ``col.isin([...])`` with one literal list."""
    func = node.func
    if not (
        isinstance(func, ast.Attribute)
        and func.attr == "isin"
        and isinstance(func.value, ast.Name)
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.List | ast.Tuple)
    ):
        raise _refuse(text, "function calls are not allowed (only col.isin([...]) with a literal list).")
    _check_operand(func.value, text, names, columns)
    _check_list(node.args[0], text)


def _check_operand(node: ast.AST, text: str, names: Mapping[str, str], columns: list[str]) -> None:
    if isinstance(node, ast.Name):
        if node.id in names:
            columns.append(names[node.id])
            return
        if node.id.startswith("__") or node.id.startswith(_PLACEHOLDER):
            raise _refuse(text, f"the name {node.id!r} is not allowed.")
        columns.append(node.id)
        return
    if isinstance(node, ast.Constant) and _is_literal(node.value):
        return
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub | ast.UAdd)
        and _is_number(node.operand)
    ):
        return
    raise _refuse(text, _describe(node))


def _check_list(node: ast.List | ast.Tuple, text: str) -> None:
    for elt in node.elts:
        ok = (isinstance(elt, ast.Constant) and _is_literal(elt.value)) or (
            isinstance(elt, ast.UnaryOp)
            and isinstance(elt.op, ast.USub | ast.UAdd)
            and _is_number(elt.operand)
        )
        if not ok:
            raise _refuse(text, "a list may hold only numbers, quoted strings and True/False.")


def _is_literal(value: Any) -> bool:
    return isinstance(value, bool | int | float | str)


def _is_number(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    )


def _describe(node: ast.AST) -> str:
    kinds = {
        ast.Attribute: "attribute access (x.y) is not allowed; only col.isin([...]).",
        ast.Subscript: "subscripts (x[...]) are not allowed.",
        ast.Call: "function calls are not allowed.",
        ast.Lambda: "lambdas are not allowed.",
        ast.BinOp: "arithmetic is not supported; compare a column with a value.",
        ast.JoinedStr: "f-strings are not allowed; write a plain quoted string.",
        ast.NamedExpr: "assignments (:=) are not allowed.",
        ast.IfExp: "conditional expressions (x if c else y) are not allowed.",
        ast.ListComp: "comprehensions are not allowed.",
        ast.SetComp: "comprehensions are not allowed.",
        ast.DictComp: "comprehensions are not allowed.",
        ast.GeneratorExp: "comprehensions are not allowed.",
        ast.Starred: "starred expressions are not allowed.",
        ast.Await: "await is not allowed.",
        ast.Dict: "dicts are not allowed.",
        ast.Set: "sets are not allowed; use a list [...].",
        ast.List: "a list belongs on the right of in / not in / == / != or inside isin(...).",
        ast.Tuple: "a list belongs on the right of in / not in / == / != or inside isin(...).",
    }
    for kind, why in kinds.items():
        if isinstance(node, kind):
            return why
    if isinstance(node, ast.Constant):
        return f"the value {node.value!r} ({type(node.value).__name__}) is not supported."
    return f"{type(node).__name__} expressions are not allowed."


# ----------------------------------------------------------------------------- evaluation
@dataclass
class _Column:
    name: str
    series: pd.Series


@dataclass
class _Literal:
    value: Any


class _Evaluator:
    """Evaluates a checked tree over ``obs``; the tree holds only whitelisted nodes."""

    def __init__(self, query: CellQuery, obs: pd.DataFrame) -> None:
        self.query, self.obs, self.n = query, obs, len(obs)

    def fail(self, why: str) -> DataError:
        return DataError(f"Cannot evaluate the cell query {_short(self.query.text)}: {why}", param="cells")

    # -- masks
    def boolean(self, node: ast.AST) -> np.ndarray:
        if isinstance(node, ast.BoolOp):
            masks = [self.boolean(v) for v in node.values]
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            out = masks[0]
            for m in masks[1:]:
                out = combine(out, m)
            return out
        if isinstance(node, ast.UnaryOp):  # not / ~ (checked)
            return ~self.boolean(node.operand)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Call):  # col.isin([...]) (checked)
            col = self.column(node.func.value)  # type: ignore[attr-defined]
            return self.isin(col, node.args[0], negate=False)  # type: ignore[arg-type]
        if isinstance(node, ast.Name):
            col = self.column(node)
            if not _is_bool_dtype(col.series):
                raise self.fail(
                    f"column {col.name!r} is not True/False, so it cannot stand alone; compare it, "
                    f"e.g. {col.name} == ... or {col.name} > ..."
                )
            return _as_mask(col.series)
        raise self.fail("a query must select cells by comparing a column; a lone True/False selects nothing.")

    def compare(self, node: ast.Compare) -> np.ndarray:
        out: np.ndarray | None = None
        left_node = node.left
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, ast.In | ast.NotIn) or isinstance(right_node, ast.List | ast.Tuple):
                part = self.membership(left_node, op, right_node)
            else:
                part = self.pair(left_node, op, right_node)
            out = part if out is None else out & part
            left_node = right_node
        assert out is not None
        return out

    def membership(self, left_node: ast.AST, op: ast.cmpop, right_node: ast.AST) -> np.ndarray:
        if not isinstance(right_node, ast.List | ast.Tuple):
            raise self.fail("in / not in need a literal list on the right, e.g. col in ['a', 'b'].")
        if isinstance(left_node, ast.List | ast.Tuple) or not isinstance(left_node, ast.Name):
            raise self.fail("in / not in / == [...] need a column on the left, e.g. col in ['a', 'b'].")
        if not isinstance(op, ast.In | ast.NotIn | ast.Eq | ast.NotEq):
            raise self.fail("a list can only be used with in, not in, == or !=.")
        col = self.column(left_node, other=None)
        return self.isin(col, right_node, negate=isinstance(op, ast.NotIn | ast.NotEq))

    def isin(self, col: _Column, node: ast.List | ast.Tuple, *, negate: bool) -> np.ndarray:
        values = [self.literal(e).value for e in node.elts]
        for v in values:
            self.check_types(col, v, "in")
        try:
            hit = _as_mask(col.series.isin(values))
        except (TypeError, ValueError) as exc:
            raise self.fail(f"cannot test {col.name!r} against {values!r} ({exc}).") from None
        return ~hit if negate else hit

    def pair(self, left_node: ast.AST, op: ast.cmpop, right_node: ast.AST) -> np.ndarray:
        symbol, fn = _CMP[type(op)]
        left = self.operand(left_node, other=right_node)
        right = self.operand(right_node, other=left_node)
        if isinstance(left, _Literal) and isinstance(right, _Literal):
            raise self.fail(f"{left.value!r} {symbol} {right.value!r} compares two values; name a column.")
        for a, b in ((left, right), (right, left)):
            if isinstance(a, _Column) and isinstance(b, _Literal):
                self.check_types(a, b.value, symbol)
            dtype = a.series.dtype if isinstance(a, _Column) else None
            if symbol not in ("==", "!=") and isinstance(dtype, pd.CategoricalDtype) and not dtype.ordered:
                raise self.fail(
                    f"column {a.name!r} is an unordered categorical, so only ==, !=, in and isin apply "
                    f"to it, not {symbol}."
                )
        lhs = left.series if isinstance(left, _Column) else left.value
        rhs = right.series if isinstance(right, _Column) else right.value
        try:
            res = fn(lhs, rhs)
        except (TypeError, ValueError, OverflowError) as exc:
            names = " and ".join(repr(x.name) for x in (left, right) if isinstance(x, _Column))
            reason = str(exc).split("\n")[0]
            raise self.fail(f"cannot compare {names} with {symbol} ({reason}).") from None
        return _as_mask(res)

    # -- operands
    def operand(self, node: ast.AST, *, other: ast.AST | None) -> _Column | _Literal:
        if isinstance(node, ast.Name):
            return self.column(node, other=other)
        return self.literal(node)

    def literal(self, node: ast.AST) -> _Literal:
        if isinstance(node, ast.Constant):
            return _Literal(node.value)
        assert isinstance(node, ast.UnaryOp)
        assert isinstance(node.operand, ast.Constant)
        v = node.operand.value
        return _Literal(-v if isinstance(node.op, ast.USub) else v)

    def column(self, node: ast.Name, *, other: ast.AST | None = None) -> _Column:
        name = self.query._names.get(node.id, node.id)
        obs = self.obs
        matches = [c for c in obs.columns if str(c) == name]
        if len(matches) > 1:
            raise self.fail(f"obs has {len(matches)} columns named {name!r}; rename them to be unique.")
        if matches:
            return _Column(name, obs[matches[0]])
        if name == "index" or (obs.index.name is not None and str(obs.index.name) == name):
            return _Column(name, pd.Series(obs.index, index=obs.index))
        cols = [str(c) for c in obs.columns]
        shown = ", ".join(repr(c) for c in cols[:30]) + (" …" if len(cols) > 30 else "")
        hint = ""
        if isinstance(other, ast.Name) and node.id not in self.query._names:
            other_name = self.query._names.get(other.id, other.id)
            if any(str(c) == other_name for c in obs.columns):
                hint = f" If {name!r} is a value, quote it: {other_name} == '{name}'."
        available = f"The available columns: {shown}." if cols else "This obs has no columns."
        raise self.fail(f"{name!r} is not an obs column.{hint} {available}")

    def check_types(self, col: _Column, value: Any, symbol: str) -> None:
        kind = _kind(col.series)
        if isinstance(value, str) and kind in ("number", "bool"):
            raise self.fail(
                f"column {col.name!r} holds {'numbers' if kind == 'number' else 'True/False'}, so compare "
                f"it with {'a number' if kind == 'number' else 'True or False'}, not the string {value!r}."
            )
        if not isinstance(value, str) and kind == "text":
            raise self.fail(
                f"column {col.name!r} holds text, so compare it with a quoted string: "
                f"{col.name} {symbol} {str(value)!r}."
            )


def _is_bool_dtype(series: pd.Series) -> bool:
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return False
    return pd.api.types.is_bool_dtype(dtype)


def _kind(series: pd.Series) -> str:
    """``"number"``, ``"bool"``, ``"text"`` or ``"other"`` (mixed; pandas rules apply)."""
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        series = pd.Series(dtype.categories)
        dtype = series.dtype
    is_object_dtype = pd.api.types.is_object_dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_numeric_dtype(dtype):
        return "number"
    if pd.api.types.is_string_dtype(dtype) or is_object_dtype(dtype):
        inferred = pd.api.types.infer_dtype(series, skipna=True)
        if inferred in ("string", "empty"):
            return "text"
        if inferred in ("integer", "floating", "mixed-integer-float", "decimal"):
            return "number"
        if inferred == "boolean":
            return "bool"
    return "other"


def _as_mask(res: Any) -> np.ndarray:
    """A plain ``bool`` array from a comparison result; missing (``pd.NA``) counts as ``False``."""
    arr = res.array if isinstance(res, pd.Series | pd.Index) else res
    if isinstance(arr, pd.api.extensions.ExtensionArray):
        return np.asarray(pd.array(arr, dtype="boolean").fillna(value=False), dtype=bool)
    return np.asarray(arr, dtype=bool)


# ----------------------------------------------------------------------------- selection
def select_cells(
    obs: pd.DataFrame | pd.Index,
    cells: Any = None,
    *,
    order: Literal["sorted", "input"] = "sorted",
    selections: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Row positions of ``obs`` for a ``cells=`` argument: the one cell selection of cellkit.

    Parameters
    ----------
    obs
        The cell table (``adata.obs``, ``tokens.obs``); its index holds the obs names. A bare
        ``pd.Index`` of obs names stands for a table without columns (queries then find none).
    cells
        - ``None``: all cells;
        - a boolean mask with one entry per cell (numpy, list, or a pandas Series — its values in
          row order; missing values count as ``False``);
        - integer positions (negative positions count from the end, as in numpy);
        - obs names (a list or array of strings);
        - a query string in the restricted grammar of :func:`parse_query`, e.g.
          ``"bulk_labels == 'CD14+ Monocyte' and n_genes > 500"``, or a parsed :class:`CellQuery`;
        - with ``selections``: the name of a stored selection (its value is any of the above).
    order
        ``"sorted"`` (default): ascending positions, each cell once — the obs order that
        ``tokenize``, ``embed_cells``, ``finetune`` and the studio use. ``"input"``: positions in
        the order given, repeats kept (the caller decides about repeats); masks and queries come in
        obs order either way. ``attention_maps`` uses it so that per-cell maps follow your list.
    selections
        Named selections (``{name: cells}``, e.g. the studio's lasso selections); a string that
        names one selects it before being read as a query.

    Returns
    -------
    ``(k,)`` int64 positions; may be empty (callers that need cells raise their own error).

    Raises
    ------
    cellkit.DataError
        A mask of the wrong length, positions out of range or not integers, names not in the obs
        names, an unknown selection, or a query that is refused or cannot be evaluated.

    Examples
    --------
    >>> import pandas as pd
    >>> obs = pd.DataFrame({"label": ["B", "T", "B"], "n_genes": [900, 300, 1200]}, index=list("xyz"))
    >>> select_cells(obs, "label == 'B' and n_genes > 1000").tolist()
    [2]
    >>> select_cells(obs, ["z", "x"], order="input").tolist()
    [2, 0]
    """
    if order not in ("sorted", "input"):
        raise DataError(f"order must be 'sorted' or 'input', got {order!r}.")
    if isinstance(obs, pd.Index):
        obs = pd.DataFrame(index=obs)
    n = len(obs)
    if cells is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(cells, str) and selections is not None and cells in selections:
        rows = select_cells(obs, selections[cells], order=order)
    elif isinstance(cells, str | CellQuery):
        try:
            query = cells if isinstance(cells, CellQuery) else parse_query(cells)
            mask = query.mask(obs)
        except DataError as exc:
            if selections is None or not isinstance(cells, str):
                raise
            known = ", ".join(repr(k) for k in sorted(selections)[:20]) or "none"
            raise DataError(
                f"No selection named {cells!r} (known: {known}); read as a query: {exc}"
            ) from None
        rows = np.flatnonzero(mask)
    else:
        rows = _positions(obs, cells)
    rows = rows.astype(np.int64, copy=False)
    return np.unique(rows) if order == "sorted" else rows


def _positions(obs: pd.DataFrame, cells: Any) -> np.ndarray:
    n = len(obs)
    if isinstance(
        cells, pd.Series | pd.Index | pd.api.extensions.ExtensionArray
    ) and pd.api.types.is_bool_dtype(cells.dtype):
        arr = _as_mask(cells)
    else:
        arr = np.asarray(cells)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise DataError(f"cells must be one-dimensional (a mask, positions or names), got shape {arr.shape}.")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise DataError(f"A boolean mask needs {n} entries (one per cell), got {arr.shape[0]}.")
        return np.flatnonzero(arr)
    if arr.dtype.kind in "iu":
        lo, hi = arr.min(), arr.max()
        if lo < -n or hi >= n:
            raise DataError(
                f"Cell positions must be in [0, {n}) (or -{n} … -1 from the end); got {lo} … {hi}."
            )
        return arr.astype(np.int64) % max(n, 1)
    if arr.dtype.kind == "f":
        raise DataError(
            "Cell positions must be integers, not floats; pass an int array, a mask or obs names."
        )
    if arr.dtype.kind not in "OUS":
        raise DataError(f"cells of dtype {arr.dtype} are neither a mask, positions nor obs names.")
    names = arr.astype(str)
    index = obs.index if obs.index.dtype == object else obs.index.astype(str)
    try:
        pos = index.get_indexer(names)
    except pd.errors.InvalidIndexError:
        raise DataError(
            "The obs names are not unique, so cells cannot be selected by name; call "
            "adata.obs_names_make_unique() first."
        ) from None
    if (pos < 0).any():
        missing = names[pos < 0][:5].tolist()
        raise DataError(
            f"{int((pos < 0).sum())} selected cell names are not in the data (obs_names), e.g. {missing}."
        )
    return pos
