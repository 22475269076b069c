"""
The error codes the server can send, collected from the source tree (not
from a hand-kept list), for ``docs/errors.md``: ``scripts/errors-doc``
rewrites its table from them and ``tests/test_docs.py`` checks it.

What counts as a code, all found by reading ``src/pipecomet`` (``ast``):

* ``code="..."`` given to a :class:`~pipecomet.PipecometError` subclass
  (its status is the class's, or the call's ``status=``);
* a class-level ``code = "..."`` of such a subclass that is raised without
  a ``code=`` somewhere (a class only ever raised with its own ``code=``,
  like ``RequestTimeout``, contributes nothing of its own);
* codes relayed from elsewhere: a string passed as the ``code`` parameter
  of any function (a worker's ``_fail(call_id, "unknown_function", ...)``)
  and the values of ``"code"`` / ``"error"`` keys in dict displays (a
  worker function's ``{"error": "not_an_image", ...}`` answer).  Their
  status is the one the relaying class gives; the doc states it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "pipecomet"
BASE = "PipecometError"


@dataclass
class Code:
    code: str
    statuses: set[int] = field(default_factory=set)
    classes: set[str] = field(default_factory=set)
    modules: set[str] = field(default_factory=set)


@dataclass
class _Class:
    name: str
    bases: list[str]
    status: int | None = None
    code: str | None = None


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _str(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _class_attrs(node: ast.ClassDef) -> _Class:
    cls = _Class(node.name, [n for n in map(_name, node.bases) if n])
    for stmt in node.body:
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        for target in targets:
            pairs: list[tuple[ast.expr, ast.expr]] = []
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                pairs = list(zip(target.elts, value.elts))
            else:
                pairs = [(target, value)]
            for t, v in pairs:
                if isinstance(t, ast.Name) and isinstance(v, ast.Constant):
                    if t.id == "status" and isinstance(v.value, int):
                        cls.status = v.value
                    elif t.id == "code" and isinstance(v.value, str):
                        cls.code = v.value
    return cls


def _modules(src: Path) -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(src.rglob("*.py")):
        module = ".".join(path.relative_to(src.parent).with_suffix("").parts)
        out.append((module, ast.parse(path.read_text(encoding="utf-8"), str(path))))
    return out


def collect(src: Path = SRC) -> dict[str, Code]:
    """
    Every error code found in ``src``, with the statuses, error classes and
    modules it comes with.
    """
    modules = _modules(src)
    classes: dict[str, _Class] = {}
    code_params: dict[str, int] = {}  # function name -> index of its "code" parameter
    for _, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = _class_attrs(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.posonlyargs + node.args.args]
                if "code" in names:
                    code_params[node.name] = names.index("code")

    def lineage(name: str) -> list[_Class]:
        chain, todo, seen = [], [name], set()
        while todo:
            n = todo.pop(0)
            if n in seen or n not in classes:
                continue
            seen.add(n)
            chain.append(classes[n])
            todo.extend(classes[n].bases)
        return chain

    def is_error(name: str) -> bool:
        return any(c.name == BASE for c in lineage(name))

    def inherited(name: str, attr: str) -> object:
        for c in lineage(name):
            if getattr(c, attr) is not None:
                return getattr(c, attr)
        return None

    found: dict[str, Code] = {}

    def add(code: str, module: str, cls: str | None = None, status: int | None = None) -> None:
        entry = found.setdefault(code, Code(code))
        entry.modules.add(module)
        if cls:
            entry.classes.add(cls)
        if status is not None:
            entry.statuses.add(status)

    for module, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                callee = _name(node.func)
                if callee is None:
                    continue
                kw = {k.arg: k.value for k in node.keywords if k.arg}
                if is_error(callee):
                    status = kw.get("status")
                    st = status.value if isinstance(status, ast.Constant) else inherited(callee, "status")
                    if "code" in kw:
                        code = _str(kw["code"])
                        value = kw["code"]
                        if (code is None and isinstance(value, ast.Call)  # code=info.get("code", "x")
                                and _name(value.func) == "get" and len(value.args) == 2):
                            code = _str(value.args[1])
                    else:
                        code = inherited(callee, "code")  # type: ignore[assignment]
                    if code:
                        add(code, module, callee, st)  # type: ignore[arg-type]
                elif callee in code_params:
                    index = code_params[callee] - (1 if isinstance(node.func, ast.Attribute) else 0)
                    arg = node.args[index] if 0 <= index < len(node.args) else kw.get("code")
                    code = _str(arg)
                    if code:
                        add(code, module)
                elif "code" in kw and _str(kw["code"]):
                    add(_str(kw["code"]), module)  # type: ignore[arg-type]
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if _str(k) in ("code", "error") and _str(v):
                        add(_str(v), module)  # type: ignore[arg-type]
            elif (isinstance(node, (ast.Assign, ast.AnnAssign))
                    and isinstance(target := (node.targets[0] if isinstance(node, ast.Assign)
                                              else node.target), ast.Name)
                    and target.id.endswith("_ERRORS")
                    and isinstance(node.value, ast.Tuple)):
                # A table of (what the parser says, code, message): the HTTP
                # protocol's 400s for llhttp's parse errors.
                for row in node.value.elts:
                    if isinstance(row, ast.Tuple) and len(row.elts) == 3 and _str(row.elts[1]):
                        add(_str(row.elts[1]), module, "BadRequest", 400)  # type: ignore[arg-type]
    return found


# ---------------------------------------------------------------------------
# The table in docs/errors.md

DOC = ROOT / "docs" / "errors.md"
MARKER = "<!-- codes: generated by scripts/errors-doc; write only the status of relayed codes and the meaning -->\n"
HEADER = "| code | status | meaning | raised in |\n|---|---|---|---|\n"


def parse_table(text: str) -> dict[str, tuple[str, str]]:
    """
    ``{code: (status, meaning)}`` from the generated table of ``text``.
    """
    out: dict[str, tuple[str, str]] = {}
    if MARKER not in text:
        return out
    for line in text.split(MARKER, 1)[1].splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out[cells[0].strip("`")] = (cells[1], cells[2])
    return out


def _short(module: str) -> str:
    return module.removeprefix("pipecomet.")


def render_table(codes: dict[str, Code], previous: dict[str, tuple[str, str]]) -> str:
    """
    The table: one row per code, by status then code.  The status comes
    from the source where it is known there; the meaning (and the status of
    a relayed code) is kept from ``previous``.
    """
    rows = []
    for code in codes.values():
        old_status, meaning = previous.get(code.code, ("", ""))
        status = " / ".join(str(s) for s in sorted(code.statuses)) or old_status or "?"
        where = ", ".join(f"`{_short(m)}`" for m in sorted(code.modules))
        rows.append((status, code.code, f"| `{code.code}` | {status} | {meaning} | {where} |"))
    rows.sort(key=lambda r: (r[0], r[1]))
    return HEADER + "\n".join(r[2] for r in rows) + "\n"


def regenerate(text: str, codes: dict[str, Code] | None = None) -> str:
    """
    ``text`` (docs/errors.md) with its table rebuilt from the source.
    """
    codes = collect() if codes is None else codes
    head, _, rest = text.partition(MARKER)
    lines = rest.splitlines(keepends=True)
    i = 0
    while i < len(lines) and not lines[i].startswith("|"):
        i += 1
    while i < len(lines) and lines[i].startswith("|"):
        i += 1
    return head + MARKER + render_table(codes, parse_table(text)) + "".join(lines[i:])
