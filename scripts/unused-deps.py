#!/usr/bin/env python3
"""Fails when a workspace crate declares a dependency its code never names.

`cargo machete` does this, but it is not on a fresh machine and installing it needs the
network; this check reads `cargo metadata` (offline) instead. A dependency counts as used
when its library name (or the name it is renamed to) appears as a word in the crate's Rust
sources: normal and build dependencies in `src/` (and `build.rs`), dev-dependencies in
`src/`, `tests/`, `benches/` and `examples/`. A dependency listed only to turn on a feature of
another (a `[dependencies]` entry the code does not name) must be named in ALLOWED below,
with the reason.
"""
import json
import os
import re
import subprocess
import sys

# (package, dependency): why it is declared though no source names it.
ALLOWED = {}


def rust_files(root, dirs):
    for d in dirs:
        top = os.path.join(root, d)
        if os.path.isfile(top) and top.endswith(".rs"):
            yield top
            continue
        for base, subdirs, files in os.walk(top):
            subdirs[:] = [s for s in subdirs if s != "target"]
            for f in files:
                if f.endswith(".rs"):
                    yield os.path.join(base, f)


def main():
    host = re.search(r"^host: (\S+)", subprocess.check_output(["rustc", "-vV"], text=True), re.M).group(1)
    # Only this platform's packages: the others (Windows crates) are not in the local cache.
    meta = json.loads(
        subprocess.check_output(
            ["cargo", "metadata", "--format-version", "1", "--offline", "--filter-platform", host]
        )
    )
    lib_name = {}
    for p in meta["packages"]:
        for t in p["targets"]:
            if "lib" in t["kind"] or "proc-macro" in t["kind"] or "rlib" in t["kind"]:
                lib_name[p["name"]] = t["name"].replace("-", "_")
    members = set(meta["workspace_members"])
    unused = []
    for p in meta["packages"]:
        if p["id"] not in members:
            continue
        root = os.path.dirname(p["manifest_path"])
        # The root package's sources are src/ only: the other crates live in subdirectories.
        texts = {}
        for kind, dirs in (
            ("normal", ["src", "build.rs"]),
            ("build", ["build.rs"]),
            ("dev", ["src", "tests", "benches", "examples"]),
        ):
            texts[kind] = "\n".join(open(f, encoding="utf-8").read() for f in rust_files(root, dirs))
        for d in p["dependencies"]:
            kind = d["kind"] or "normal"
            name = (d.get("rename") or lib_name.get(d["name"], d["name"])).replace("-", "_")
            if (p["name"], d["name"]) in ALLOWED:
                continue
            if not re.search(r"\b" + re.escape(name) + r"\b", texts[kind]):
                unused.append(f"{p['name']}: {kind} dependency {d['name']} is never named in its code")
    seen = set()
    for u in unused:
        if u not in seen:
            print(u, file=sys.stderr)
            seen.add(u)
    return 1 if unused else 0


if __name__ == "__main__":
    sys.exit(main())
