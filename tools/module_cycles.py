#!/usr/bin/env python3
"""Import cycles between the modules of a crate.

Each file of `src/` is a module (`a/b.rs` and `a/b/mod.rs` are `a::b`). A
module uses another when its code (tests excluded) names it by path:
`crate::x::y`, `super::y`, `self::y`, or a `use` of those, braces included.
A name is resolved to the deepest module that exists, and a module's own
submodules and ancestors do not count (a parent declares its children).
Prints every cycle found (each group of modules that reach each other) and
exits 1 when there is one.

Usage: tools/module_cycles.py [SRC_DIR ...]   (default: src cli/src)
"""
import os
import re
import sys


def modules(src):
    found = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["lib"], ["main"]):
                rel = []
            found[tuple(rel)] = os.path.join(root, f)
    return found


def code_of(path):
    text = open(path, encoding="utf-8").read()
    # Drop `#[cfg(test)] mod tests { ... }` (to the end of the file, as written here).
    m = re.search(r"#\[cfg\(test\)\]\s*mod \w+\s*\{", text)
    if m:
        text = text[: m.start()]
    text = re.sub(r"//[^\n]*", "", text)
    return text


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    tree = tree.replace(" ", "").replace("\n", "")
    depth, start = 0, None
    for i, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                prefix, inner = tree[:start], tree[start + 1 : i]
                parts, d, cur = [], 0, ""
                for c in inner:
                    if c == "," and d == 0:
                        parts.append(cur)
                        cur = ""
                        continue
                    d += c == "{"
                    d -= c == "}"
                    cur += c
                parts.append(cur)
                out = []
                for p in parts:
                    if p:
                        out += expand_use(prefix + p)
                return out
    return [tree]


def references(mod, code):
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", code):
        paths += expand_use(m.group(1))
    paths += re.findall(r"\b((?:crate|super|self)(?:::\w+)+)", code)
    out = []
    for p in paths:
        p = re.sub(r"\bas\s+\w+$", "", p).strip(":")
        parts = [x for x in p.split("::") if x]
        if not parts:
            continue
        if parts[0] == "crate":
            out.append(parts[1:])
        elif parts[0] in ("super", "self"):
            base = list(mod)
            while parts and parts[0] in ("super", "self"):
                if parts[0] == "super":
                    base = base[:-1]
                parts = parts[1:]
            out.append(base + parts)
    return out


def resolve(path, mods):
    for n in range(len(path), 0, -1):
        if tuple(path[:n]) in mods:
            return tuple(path[:n])
    return None


def graph(src):
    mods = modules(src)
    edges = {m: set() for m in mods}
    for mod, file in mods.items():
        for ref in references(mod, code_of(file)):
            target = resolve(ref, mods)
            if target is None or target == mod:
                continue
            # A parent names its children and a child its parent's items: not a use between peers.
            if target[: len(mod)] == mod or mod[: len(target)] == target:
                continue
            edges[mod].add(target)
    return edges


def cycles(edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def main():
    dirs = sys.argv[1:] or ["src", "cli/src"]
    found = False
    for src in dirs:
        edges = graph(src)
        for group in cycles(edges):
            found = True
            names = ["::".join(m) or "crate" for m in group]
            print(f"{src}: cycle between {', '.join(names)}")
            for m in group:
                for t in sorted(edges[m] & set(group)):
                    print(f"    {'::'.join(m) or 'crate'} -> {'::'.join(t) or 'crate'}")
        print(f"{src}: {len(edges)} modules, {sum(len(e) for e in edges.values())} uses")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
