#!/usr/bin/env python3
"""Lists the import edges between the files of each crate in the workspace and
fails if any files import each other, directly or around a longer cycle.

An edge A -> B means a path in file A names an item of (or under) the module
file B: `use super::l1::X`, `crate::server::disk::Y` in a type, `l1::L1Store`
from the parent module, `use super::{a::X, b}`. Paths into a module's
re-exports (`crate::Arena` where lib.rs says `pub use arena::Arena`) count
against the defining file. External crates (`kvcoord_memory::...`) are not
edges: Cargo already forbids cycles between crates. `#[cfg(test)] mod` blocks
are skipped: a unit test may reach anywhere.

Usage: scripts/import-cycles.py [--edges] [ROOT]
Exit status: 0 when there is no cycle, 1 otherwise.
"""

import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip(text):
    """Source without comments, string and char literals (same length per line not kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not re.match(r"\w", text[i - 1])):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            out.append('""')
            i = n if end < 0 else end + 1 + len(m.group(1))
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            out.append('""')
            i += 1
        elif c == "'" and re.match(r"'(\\.|[^'\\])'", text[i:]):
            m = re.match(r"'(\\.|[^'\\])'", text[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def drop_test_modules(src):
    """Removes `#[cfg(test)] mod x { ... }` blocks."""
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+" + IDENT + r"\s*\{", src)
        if not m:
            return src
        depth, i = 1, m.end()
        while i < len(src) and depth:
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            i += 1
        src = src[: m.start()] + src[i:]


def expand_use(tree):
    """Expands a use tree (`a::{b::C, d}`) into its paths."""
    tree = re.sub(r"\s+", "", tree)
    m = re.match(r"^(.*?)\{(.*)\}$", tree)
    if not m:
        return [tree]
    prefix, inner = m.group(1), m.group(2)
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        cur += ch
    parts.append(cur)
    paths = []
    for p in filter(None, parts):
        for q in expand_use(p):
            paths.append(prefix[:-2] if q == "self" else prefix + q)
    return paths


class Crate:
    def __init__(self, root_file):
        self.files = {}  # module path (tuple) -> file
        self.modules = {}  # file -> module path
        self.load(root_file, ())

    def load(self, path, module):
        self.files[module] = path
        self.modules[path] = module
        src = drop_test_modules(strip(open(path, encoding="utf-8").read()))
        is_dir_owner = not module or os.path.basename(path) == "mod.rs"
        base = os.path.dirname(path) if is_dir_owner else path[: -len(".rs")]
        for name in re.findall(r"(?:^|[;}\s])(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", src):
            for cand in (os.path.join(base, name + ".rs"), os.path.join(base, name, "mod.rs")):
                if os.path.exists(cand):
                    self.load(cand, module + (name,))
                    break

    def owner(self, path):
        """The file of the longest module prefix of `path`, and the rest."""
        for k in range(len(path), -1, -1):
            if tuple(path[:k]) in self.files:
                return self.files[tuple(path[:k])], path[k:]
        return None, path


def reexports(src):
    """`pub use a::b::X;` / `pub use a::{X, Y as Z}` -> {exported name: path}."""
    out = {}
    for tree in re.findall(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", src):
        for p in expand_use(tree):
            m = re.match(r"^(.*?)(?:as(" + IDENT + r"))?$", p)
            path = m.group(1)
            name = m.group(2) or path.split("::")[-1]
            out[name] = path.split("::")
    return out


def absolute(crate, module, path):
    """Resolves a path written in `module` to an absolute module path, or None."""
    segs = [s for s in path if s]
    if not segs:
        return None
    cur = list(module)
    if segs[0] == "crate":
        cur, segs = [], segs[1:]
    elif segs[0] == "self":
        segs = segs[1:]
    elif segs[0] == "super":
        while segs and segs[0] == "super":
            cur, segs = cur[:-1], segs[1:]
    elif tuple(module) + (segs[0],) not in crate.files:
        return None  # an external crate, a local item, or a std path
    return cur + segs


def resolve(crate, srcs, module, path, seen=0):
    """The file that defines what `path` (absolute) names, following re-exports."""
    file, rest = crate.owner(path)
    if file is None or seen > 8:
        return file
    if rest and rest[0] in srcs[file][1] and rest[0] != "*":
        target = srcs[file][1][rest[0]]
        owner_module = crate.modules[file]
        nxt = absolute(crate, owner_module, target)
        if nxt is not None:
            return resolve(crate, srcs, owner_module, nxt + rest[1:], seen + 1)
    return file


def paths_in(src, module, crate):
    """Every module path a file's code names (use trees and inline paths)."""
    found = []
    for tree in re.findall(r"\buse\s+([^;]+);", src):
        found += [p.split("::") for p in expand_use(tree)]
    body = re.sub(r"\buse\s+[^;]+;", ";", src)
    children = [m[-1] for m in crate.files if len(m) == len(module) + 1 and tuple(m[:-1]) == tuple(module)]
    heads = ["crate", "super", "self"] + children
    pattern = r"(?<![\w:])((?:" + "|".join(map(re.escape, heads)) + r")(?:::" + IDENT + r")+)"
    found += [m.split("::") for m in re.findall(pattern, body)]
    return found


def crate_roots(root):
    """(name, root file) of every library, binary, test and example crate."""
    roots = []
    workspace = open(os.path.join(root, "Cargo.toml"), encoding="utf-8").read()
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", workspace)
    dirs = re.findall(r"\"([^\"]+)\"", members.group(1)) if members else ["."]
    for manifest_dir in [os.path.normpath(os.path.join(root, d)) for d in dirs]:
        manifest = os.path.join(manifest_dir, "Cargo.toml")
        if not os.path.exists(manifest):
            continue
        text = open(manifest, encoding="utf-8").read()
        lib = re.search(r"\[lib\][^\[]*?path\s*=\s*\"([^\"]+)\"", text)
        lib_path = os.path.join(manifest_dir, lib.group(1) if lib else "src/lib.rs")
        if os.path.exists(lib_path):
            roots.append(lib_path)
        for m in re.finditer(r"\[\[bin\]\][^\[]*?path\s*=\s*\"([^\"]+)\"", text):
            roots.append(os.path.join(manifest_dir, m.group(1)))
        for d in ("tests", "examples", "benches", "src/bin"):
            full = os.path.join(manifest_dir, d)
            if os.path.isdir(full):
                roots += [os.path.join(full, f) for f in sorted(os.listdir(full)) if f.endswith(".rs")]
    return roots


def cycles(graph):
    """Strongly connected components with more than one file (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    show_edges = "--edges" in sys.argv
    root = os.path.abspath(args[0] if args else os.path.join(os.path.dirname(__file__), ".."))
    failed = False
    done = set()
    for root_file in crate_roots(root):
        crate = Crate(root_file)
        srcs = {}
        for f in crate.modules:
            src = drop_test_modules(strip(open(f, encoding="utf-8").read()))
            srcs[f] = (src, reexports(src))
        graph = {}
        for f, module in crate.modules.items():
            for path in paths_in(srcs[f][0], module, crate):
                abs_path = absolute(crate, module, path)
                if abs_path is None:
                    continue
                target = resolve(crate, srcs, module, abs_path)
                if target and target != f:
                    graph.setdefault(f, set()).add(target)
        rel = lambda p: os.path.relpath(p, root)
        if show_edges:
            for f in sorted(graph):
                if (f, tuple(sorted(graph[f]))) in done:
                    continue
                done.add((f, tuple(sorted(graph[f]))))
                print(f"{rel(f)} -> {', '.join(rel(t) for t in sorted(graph[f]))}")
        for comp in cycles(graph):
            failed = True
            print(f"import cycle in crate {rel(root_file)}: {' <-> '.join(rel(c) for c in comp)}")
            for a in comp:
                for b in sorted(graph.get(a, ())):
                    if b in comp:
                        print(f"    {rel(a)} -> {rel(b)}")
    if failed:
        return 1
    print("no import cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
