"""The layers of the portal and the operator checked against their sources: what each module
imports (its `crate::`, `super::` and `self::` paths outside test code), against the "Who
imports whom" tables of portal/README.md and operator/README.md and against the "May import:"
line of each file's `//!` header; no import circle between the top-level modules, none between
the files of one directory; no source file over 600 lines before its tests.

Run it as a script to print what the sources import:
`python3 docs/tests/test_layers.py` (the tables' rows) or `... --files` (every file)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CRATES = {"portal": ROOT / "portal" / "src", "operator": ROOT / "operator" / "src"}
MAX_LINES = 600
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RAW_STRING = re.compile(r'b?r(#*)"')


def blank(text: str) -> str:
    """`text` with comments, string and character literals replaced by spaces (newlines
    kept), so that what remains is code."""
    out = []
    i, n = 0, len(text)

    def skip(j: int) -> None:
        out.append("".join(c if c == "\n" else " " for c in text[i:j]))

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
        elif c in "br" and (m := RAW_STRING.match(text, i)) and (
                i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = '"' + m.group(1)
            j = text.find(end, m.end())
            j = n if j < 0 else j + len(end)
        elif c == '"' or (c == "b" and text.startswith('b"', i) and
                          (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_"))):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
        elif c == "'":
            if text.startswith("\\", i + 1):
                j = text.find("'", i + 3) + 1
            elif i + 2 < n and text[i + 2] == "'":
                j = i + 3
            else:  # a lifetime
                out.append(c)
                i += 1
                continue
        else:
            out.append(c)
            i += 1
            continue
        skip(j)
        i = j
    return "".join(out)


def drop_test_items(code: str) -> str:
    """`code` without the items marked `#[cfg(test)]` (test modules, test-only fields,
    statements and helpers)."""
    while (m := re.search(r"#\[cfg\(test\)\]", code)):
        i = m.end()
        depth, opened = 0, False
        while i < len(code):
            c = code[i]
            if c in "([{":
                depth += 1
                opened = opened or c == "{"
            elif c in ")]}":
                if depth == 0:
                    break
                depth -= 1
                if depth == 0 and c == "}" and opened:
                    i += 1
                    break
            elif c in ";," and depth == 0:
                i += 1
                break
            i += 1
        code = code[:m.start()] + "".join(ch if ch == "\n" else " " for ch in code[m.start():i]) \
            + code[i:]
    return code


class File:
    def __init__(self, crate: str, path: Path):
        self.crate = crate
        self.path = path
        src = CRATES[crate]
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "mod" or parts == ["lib"] or parts == ["main"]:
            parts = parts[:-1]
        self.module = parts
        self.text = path.read_text()
        self.is_root = path.parent == src and path.name in ("lib.rs", "main.rs")
        # A file owns the files of its directory: `x/mod.rs`, or `x.rs` beside `x/`.
        self.owns_dir = path.name == "mod.rs" or (
            path.with_suffix("").is_dir() and not self.is_root)

    @property
    def rel(self) -> str:
        return str(self.path.relative_to(ROOT))

    @property
    def top(self) -> str:
        """The top-level module the file belongs to ("lib" for the crate roots)."""
        return self.module[0] if self.module else "lib"

    def lines_before_tests(self) -> int:
        lines = self.text.splitlines()
        for i, line in enumerate(lines):
            if line.strip() == "#[cfg(test)]" and i + 1 < len(lines) and \
                    re.match(r"\s*(pub(\(crate\))? )?mod \w+", lines[i + 1]):
                return i
        return len(lines)

    def header(self) -> str:
        """The `//!` lines, joined."""
        lines = []
        for line in self.text.splitlines():
            if line.startswith("//!"):
                lines.append(line[3:].strip())
            elif lines or line.strip():
                break
        return " ".join(lines)

    def may_import(self) -> set[str] | None:
        """The top-level modules named in the header's "May import:" sentence (the crate's
        own module left out); None when the header has none."""
        header = self.header()
        m = re.search(r"May import:(.*)", header)
        if not m:
            return None
        # The sentence, up to "the rest of `x`" (the files beside it, not top-level modules).
        sentence = re.split(r"\.(?=\s+[A-Z]|\s*$)", m.group(1))[0].split("the rest of")[0]
        names = {n.split("::")[0] for n in re.findall(r"`([\w:]+)`", sentence)}
        return {n for n in names if n in top_modules(self.crate) and n != self.top}

    def references(self) -> list[list[str]]:
        if not hasattr(self, "_references"):
            self._references = self._find_references()
        return self._references

    def _find_references(self) -> list[list[str]]:
        """The absolute module paths this file's code names (outside test items), resolved
        from `crate::`, `super::`, `self::`, a child module's name, or the library's name in
        a binary."""
        code = drop_test_items(blank(self.text))
        children = set(re.findall(r"^\s*(?:pub(?:\([\w:]+\))? )?mod (\w+);", code, re.M))
        found = []
        lib_name = {"portal": "portal", "operator": "operator"}[self.crate]
        starts = r"crate|super|self" + (f"|{lib_name}" if self.path.name == "main.rs" else "")
        if children:
            starts += "|" + "|".join(sorted(children))
        for m in re.finditer(rf"(?<![\w:])((?:{starts})(?:::(?:super|self))*)::", code):
            head = m.group(1).split("::")
            if m.start() > 0 and code[m.start() - 1] == "$":
                continue
            if head[0] in children and not re.match(r"\s*(\{|\*|[A-Za-z_])", code[m.end():]):
                continue
            base = self.resolve(head)
            for rest in paths_after(code, m.end()):
                found.append(base + rest)
        return found

    def resolve(self, head: list[str]) -> list[str]:
        """The module `crate`, `self`, `super` (each followed by any `super`s) or a child
        module's name stand for, from this file."""
        if head[0] in ("crate", "portal", "operator"):
            base: list[str] = []
        elif head[0] == "self":
            base = list(self.module)
        elif head[0] == "super":
            base = self.module[:-1]
        else:
            base = self.module + [head[0]]
        for h in head[1:]:
            if h == "super":
                base = base[:-1]
        return base


def paths_after(code: str, i: int) -> list[list[str]]:
    """The paths written at `code[i:]` after a `x::`: `a::b`, or a `{...}` group of them."""
    if code.startswith("{", i):
        depth, j = 0, i
        while j < len(code):
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            if depth == 0:
                break
            j += 1
        inner, items, depth, start = code[i + 1:j], [], 0, 0
        for k, c in enumerate(inner + ","):
            if c in "{(":
                depth += 1
            elif c in "})":
                depth -= 1
            elif c == "," and depth == 0:
                items.append(inner[start:k].strip())
                start = k + 1
        out = []
        for item in items:
            m = WORD.match(item)
            if not m:
                continue
            if m.group(0) == "self":
                out.append([])
                continue
            after = item[m.end():].lstrip()
            if after.startswith("::"):
                sub = paths_after(item, item.index("::", m.end()) + 2)
                out.extend([[m.group(0)] + s for s in sub] or [[m.group(0)]])
            else:
                out.append([m.group(0)])
        return out
    m = re.compile(r"\s*([A-Za-z_]\w*(?:\s*::\s*[A-Za-z_]\w*)*)(\s*::\s*\{)?").match(code, i)
    if not m:
        return [[]]
    words = [w.strip() for w in m.group(1).split("::")]
    if m.group(2):
        return [words + s for s in paths_after(code, m.end() - 1)]
    return [words]


_FILES: dict[str, list[File]] = {}


def files(crate: str) -> list[File]:
    if crate not in _FILES:
        _FILES[crate] = [File(crate, p) for p in sorted(CRATES[crate].rglob("*.rs"))]
    return _FILES[crate]


def top_modules(crate: str) -> set[str]:
    return {f.module[0] for f in files(crate) if f.module}


def is_test_file(f: File) -> bool:
    """Declared `#[cfg(test)] mod x;` by its parent."""
    if not f.module:
        return False
    name = f.module[-1]
    for parent in files(f.crate):
        if parent.module == f.module[:-1] and (parent.owns_dir or parent.is_root) and \
                parent.path.name != "main.rs":
            if re.search(rf"#\[cfg\(test\)\]\s*(pub(\(crate\))? )?mod {name};", parent.text):
                return True
    return False


def source_files(crate: str) -> list[File]:
    return [f for f in files(crate) if not is_test_file(f)]


def imports(f: File) -> set[str]:
    """The top-level modules `f` imports, its own left out; "lib" for the crate root's own
    items."""
    tops = top_modules(f.crate)
    out = set()
    for path in f.references():
        if not path:
            continue
        name = path[0]
        if name in tops:
            if name != f.top:
                out.add(name)
        elif f.module:
            out.add("lib")
    return out


def subtree(f: File) -> list[File]:
    """`f` and, for a file that owns a directory, every file under it."""
    if not f.owns_dir:
        return [f]
    n = len(f.module)
    return [g for g in source_files(f.crate) if g.module[:n] == f.module and not g.is_root]


def module_imports(crate: str) -> dict[str, set[str]]:
    """Per top-level module (and "lib"), the top-level modules its files import."""
    out: dict[str, set[str]] = {}
    for f in source_files(crate):
        if f.path.name == "main.rs":
            continue
        out.setdefault(f.top, set()).update(imports(f))
    return out


def sibling_imports(crate: str) -> dict[str, dict[str, set[str]]]:
    """Per directory (a module owning files), per file of it: the files of the same directory
    it names (`mod` for the directory's own file)."""
    out: dict[str, dict[str, set[str]]] = {}
    for owner in source_files(crate):
        if not owner.owns_dir and not (owner.is_root and owner.path.name == "lib.rs"):
            continue
        n = len(owner.module)
        members = [g for g in source_files(crate) if len(g.module) == n + 1
                   and g.module[:n] == owner.module and g.path.name != "main.rs"]
        names = {g.module[-1] for g in members}
        table = {}
        for g in [owner] + members:
            me = "mod" if g is owner else g.module[-1]
            named = set()
            for path in g.references():
                if len(path) > n and path[:n] == owner.module:
                    target = path[n] if path[n] in names else "mod"
                    if g is not owner or target != "mod":
                        named.add(target)
                elif path == owner.module and g is not owner:
                    named.add("mod")
            named.discard(me)
            table[me] = named
        out["/".join(owner.module) or "(crate)"] = table
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of more than one node."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def file_rows(crate: str, under: str) -> dict[str, tuple[set[str], set[str]]]:
    """Per file under the directory `under` of the crate's src (`session`): the top-level
    modules it imports, and the files of its own directory it names (for a `mod.rs`, the
    files of its directory; `mod` is the directory's own file)."""
    tables = sibling_imports(crate)
    rows = {}
    for f in source_files(crate):
        rel = str(f.path.relative_to(CRATES[crate]))
        if not rel.startswith(under + "/"):
            continue
        if f.owns_dir:
            beside = tables["/".join(f.module)]["mod"]
        else:
            beside = tables["/".join(f.module[:-1])][f.module[-1]]
        rows[rel] = (imports(f) - {"lib"}, beside)
    return rows


def readme_file_table(crate: str) -> dict[str, tuple[set[str], set[str]]]:
    """The rows of `<crate>/README.md` whose first column is a file (`session/pool/conn.rs`):
    file -> (the modules of the crate it imports, the files beside it it imports)."""
    text = (ROOT / crate / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*`([\w/]+\.rs)`[^|]*\|([^|]*)\|([^|]*)\|\s*$", line)
        if m:
            rows[m.group(1)] = (set(re.findall(r"`(\w+)`", m.group(2))),
                                set(re.findall(r"`(\w+)`", m.group(3))))
    return rows


def readme_table(crate: str) -> dict[str, set[str]]:
    """The "Who imports whom" rows of `<crate>/README.md`: module -> what it imports."""
    text = (ROOT / crate / "README.md").read_text()
    known = top_modules(crate) | {"lib"}
    rows: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*(`[^|]*)\|([^|]*)\|\s*$", line)
        if not m:
            continue
        names = [n for n in re.findall(r"`(\w+)`", m.group(1)) if n in known]
        if not names:
            continue
        imported = {n for n in re.findall(r"`(\w+)`", m.group(2)) if n in known}
        if not imported and "nothing" not in m.group(2):
            continue
        for name in names:
            rows[name] = imported
    return rows


# The tests.

CRATE_NAMES = sorted(CRATES)


def check_lengths(crate: str) -> list[str]:
    return [f"{f.rel}: {f.lines_before_tests()} lines before its tests (at most {MAX_LINES})"
            for f in source_files(crate) if f.lines_before_tests() > MAX_LINES]


def check_headers(crate: str) -> list[str]:
    problems = []
    for f in source_files(crate):
        allowed = f.may_import()
        if allowed is None:
            problems.append(f"{f.rel}: no \"May import:\" line in its //! header")
            continue
        actual = set().union(*(imports(g) for g in subtree(f))) - {f.top}
        if actual != allowed:
            problems.append(f"{f.rel}: imports {sorted(actual)}, its header says {sorted(allowed)}")
    return problems


def check_readme(crate: str) -> list[str]:
    table, actual = readme_table(crate), module_imports(crate)
    problems = []
    for module in sorted(set(table) | set(actual)):
        if module not in table:
            problems.append(f"{crate}/README.md: no row for `{module}` "
                            f"(it imports {sorted(actual[module])})")
        elif module not in actual:
            problems.append(f"{crate}/README.md: a row for `{module}`, which is no module")
        elif table[module] != actual[module]:
            problems.append(f"{crate}/README.md: `{module}` imports {sorted(actual[module])}, "
                            f"the table says {sorted(table[module])}")
    return problems


def check_readme_files(crate: str) -> list[str]:
    table = readme_file_table(crate)
    directories = {"/".join(Path(k).parts[:1]) for k in table}
    actual = {}
    for directory in directories:
        actual.update(file_rows(crate, directory))
    problems = []
    for rel in sorted(set(table) | set(actual)):
        if rel not in table:
            problems.append(f"{crate}/README.md: no row for `{rel}`")
        elif rel not in actual:
            problems.append(f"{crate}/README.md: a row for `{rel}`, which is no source file")
        elif table[rel] != actual[rel]:
            problems.append(f"{crate}/README.md: `{rel}` imports {sorted(actual[rel][0])} of "
                            f"the crate and {sorted(actual[rel][1])} beside it, the table "
                            f"says {sorted(table[rel][0])} and {sorted(table[rel][1])}")
    return problems


def check_circles(crate: str) -> list[str]:
    problems = [f"{crate}: import circle between {c}" for c in cycles(module_imports(crate))]
    for directory, table in sibling_imports(crate).items():
        siblings = {k: v - {"mod"} for k, v in table.items() if k != "mod"}
        problems += [f"{crate}/src/{directory}: import circle between the files {c}"
                     for c in cycles(siblings)]
    return problems


def main(argv: list[str]) -> int:
    for crate in CRATE_NAMES:
        print(f"## {crate}")
        if "--files" in argv:
            for f in source_files(crate):
                print(f"{f.rel:55} {f.lines_before_tests():4}  {', '.join(sorted(imports(f)))}")
            for directory, table in sibling_imports(crate).items():
                print(f"  {directory}/:")
                for name, named in sorted(table.items()):
                    print(f"    {name:14} -> {', '.join(sorted(named)) or '-'}")
        for module, imported in sorted(module_imports(crate).items()):
            print(f"| `{module}` | {', '.join(f'`{m}`' for m in sorted(imported)) or 'nothing'} |")
        if "--session" in argv and crate == "portal":
            for rel, (tops, beside) in sorted(file_rows(crate, "session").items()):
                print(f"| `{rel}` | {', '.join(f'`{m}`' for m in sorted(tops)) or 'nothing'} | "
                      f"{', '.join(f'`{m}`' for m in sorted(beside)) or 'nothing'} |")
        for problem in (check_lengths(crate) + check_headers(crate) + check_readme(crate)
                        + check_readme_files(crate) + check_circles(crate)):
            print("PROBLEM:", problem)
    return 0


def test_no_file_over_the_limit():
    assert [p for c in CRATE_NAMES for p in check_lengths(c)] == []


def test_may_import_lines_match_the_imports():
    assert [p for c in CRATE_NAMES for p in check_headers(c)] == []


def test_readme_tables_match_the_imports():
    assert [p for c in CRATE_NAMES for p in check_readme(c) + check_readme_files(c)] == []


def test_no_import_circle():
    assert [p for c in CRATE_NAMES for p in check_circles(c)] == []


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
