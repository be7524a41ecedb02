"""``dropup data corpus``: a domain-labelled text corpus harvested from this machine, no download.

Domains (the paper routes by domain: English, Japanese, code; any machine with Python has these):

- ``code``: Python source of the standard library and the installed packages;
- ``prose``: English prose: docstrings of those modules (one document per module), the
  reStructuredText / Markdown / plain-text documentation shipped with packages and in
  /usr/share/doc, and man pages with their troff markup stripped;
- ``c``: C and C++ headers (/usr/include, Python's include directory, headers shipped in packages).

Output: ``OUT/<domain>.jsonl`` (``{"text": ..., "source": path}`` per line, ready for ``dropup data
prepare``) and ``OUT/manifest.json`` (per domain: documents, characters, files seen, duplicates
dropped, and every document's source path and SHA-256).

Determinism: candidate files are listed in sorted order, then visited in a permutation drawn from
``seed``; documents whose text was already taken (in any domain) are dropped; a domain stops at
``max_mb`` of text. The same machine, options and seed give the same bytes.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dropup.data.prepare import MAX_MB
from dropup.errors import UserError
from dropup.hub.atomic import atomic_dir
from dropup.options import check_ranges, ranged

DOMAINS = ("code", "prose", "c")
_NOT_FLAGS = ("min_chars", "max_file_kb")  # Python-only options: named as fields, not flags
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "dist-packages"}
_NOT_PROSE = re.compile(r"^(license|licence|copying|notice|authors|contributors|requirements|"
                        r"entry_points|top_level|sources|dependency_links|installer|record|wheel)",
                        re.IGNORECASE)


@dataclass
class CorpusOptions:
    out: str
    max_mb: float = ranged(8.0, ge=0, le=MAX_MB, hint="0: everything found")  # text per domain (MB of UTF-8)
    domains: tuple[str, ...] = DOMAINS
    seed: int = ranged(0, ge=0, le=2**64 - 1, integer=True)
    min_chars: int = ranged(200, ge=0, le=2**63 - 1, integer=True)  # shorter documents carry little text
    # larger files are mostly generated tables (unicode data, API dumps)
    max_file_kb: int = ranged(256, ge=1, le=2**53, integer=True)

    def validate(self) -> None:
        """Every option checked at once, before anything is read or written."""
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise UserError(f"unknown domain {unknown[0]!r}; choose from {', '.join(DOMAINS)}")
        if not self.domains or len(set(self.domains)) != len(self.domains):
            # A domain named twice would rewrite its own file with nothing (all duplicates).
            raise UserError(f"--domains {' '.join(self.domains) or '(none)'}: name each domain once, "
                            f"from {', '.join(DOMAINS)}")
        check_ranges(self, label=lambda n: n if n in _NOT_FLAGS else "--" + n.replace("_", "-"))


# ---- where the text is ---------------------------------------------------------------------------


def python_roots() -> list[Path]:
    """The standard library and every installed-package directory of this interpreter."""
    paths = sysconfig.get_paths()
    roots = {paths["stdlib"], paths["purelib"], paths["platlib"]}
    roots |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    return sorted({Path(r).resolve() for r in roots if r and Path(r).is_dir()})


def include_roots() -> list[Path]:
    roots = {"/usr/include", "/usr/local/include", sysconfig.get_paths().get("include", "")}
    return sorted({Path(r).resolve() for r in roots if r and Path(r).is_dir()})


def _walk(root: Path, suffixes: tuple[str, ...], skip_site: bool) -> Iterator[Path]:
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".dist-info")
                         and not (skip_site and d in _SKIP_DIRS) and d != "__pycache__")
        for name in sorted(files):
            if name.endswith(suffixes) and not name.startswith("."):
                yield Path(dirpath) / name


def _candidates(domain: str) -> list[Path]:
    """Every file that may feed ``domain``, sorted and without duplicates paths."""
    py_roots = python_roots()
    found: set[Path] = set()
    if domain in ("code", "prose"):
        for r in py_roots:
            # The stdlib directory can hold site-packages: that tree is its own root.
            found.update(_walk(r, (".py",), skip_site=r.name not in ("site-packages", "dist-packages")))
    if domain == "prose":
        for r in py_roots:
            found.update(p for p in _walk(r, (".rst", ".md", ".txt"), skip_site=False)
                         if not _NOT_PROSE.match(p.name))
        doc = Path("/usr/share/doc")
        if doc.is_dir():
            found.update(p for p in _walk(doc, (".md", ".rst", ".txt", "README", "README.gz"), skip_site=False)
                         if not _NOT_PROSE.match(p.name))
        man = Path("/usr/share/man")
        if man.is_dir():  # the English pages live directly in man1..man8 (translations elsewhere)
            for section in sorted(man.glob("man[1-8]")):
                found.update(p for p in section.iterdir() if p.is_file())
    if domain == "c":
        for r in include_roots() + py_roots:
            found.update(_walk(r, (".h", ".hpp", ".hh", ".hxx"), skip_site=False))
    return sorted(found)


# ---- text out of a file --------------------------------------------------------------------------


def _read(path: Path, max_bytes: int) -> str | None:
    """UTF-8 text of a file (gunzipped if .gz), or None when too large or not UTF-8."""
    try:
        if path.stat().st_size > max_bytes:
            return None
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
            if len(data) > max_bytes:
                return None
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def docstrings(source: str) -> str | None:
    """A module's docstrings (module, classes, functions) as one document, blank-line separated."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:  # "Return x." carries no prose
                parts.append(doc)
    return "\n\n".join(parts) or None


_TROFF_ESCAPES = [(re.compile(r"\\f(\(..|\[[^\]]*\]|.)"), ""), (re.compile(r"\\\((em|en)"), "-"),
                  (re.compile(r"\\\((aq|cq)"), "'"), (re.compile(r"\\\((lq|rq|dq)"), '"'),
                  (re.compile(r"\\\(bu"), "*"), (re.compile(r"\\\*\(..|\\\*."), ""),
                  (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == r"\-" else "\\"),
                  (re.compile(r"\\[&|^ ~0]"), lambda m: " " if m.group(0) in (r"\ ", r"\~", r"\0") else ""),
                  (re.compile(r"\\s[-+]?\d"), "")]
_TEXT_MACROS = {"B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB", "SH", "SS", "TP", "IP", "TH"}


def man_to_text(src: str) -> str:
    """Plain text of a troff man page: comments and layout requests dropped, font escapes removed,
    the words of text macros (.B, .SH, ...) kept."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            if name not in _TEXT_MACROS or not rest:
                if name in ("PP", "LP", "P", "SH", "SS", "sp", "br"):
                    out.append("")
                continue
            line = rest.replace('"', "") if name != "TH" else rest.split(" ")[0].strip('"')
            if name in ("SH", "SS"):
                out.append("")
        for pattern, repl in _TROFF_ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _document(domain: str, path: Path, max_bytes: int) -> str | None:
    text = _read(path, max_bytes)
    if text is None:
        return None
    if domain == "prose" and path.suffix == ".py":
        return docstrings(text)
    if domain == "prose" and _kind(path) == "man":
        return man_to_text(text)
    return text


# ---- the corpus ----------------------------------------------------------------------------------


def _kind(path: Path) -> str:
    p = path.as_posix()
    return "man" if "/man/" in p else "docstrings" if path.suffix == ".py" else "docs"


def _order(paths: list[Path], seed: int, domain: str, taken: dict[str, int]) -> Iterator[tuple[str, Path]]:
    """(kind, path) in a seeded permutation of the sorted candidates: under the cap, a uniform
    sample of files. Prose draws its three kinds (docstrings, documentation files, man pages) in
    equal shares of text: the caller reports each document's size through ``taken``, so that one
    kind with many files (a cloud SDK's thousands of man pages) cannot crowd out the rest."""
    key = int.from_bytes(hashlib.sha256(domain.encode()).digest()[:4], "little")
    rng = np.random.default_rng([seed, key])
    groups: dict[str, list[Path]] = {}
    for p in paths:
        groups.setdefault(_kind(p) if domain == "prose" else domain, []).append(p)
    queues = {k: iter([g[i] for i in rng.permutation(len(g))]) for k, g in sorted(groups.items())}
    while queues:
        kind = min(queues, key=lambda k: (taken.get(k, 0), k))
        path = next(queues[kind], None)
        if path is None:
            del queues[kind]
        else:
            yield kind, path


def build_corpus(opts: CorpusOptions) -> dict:
    """Write OUT/<domain>.jsonl and OUT/manifest.json; returns the manifest."""
    opts.validate()
    cap = int(opts.max_mb * 1e6) if opts.max_mb else None
    seen: set[bytes] = set()  # content hashes over every domain
    manifest = {"format": "dropup-corpus", "version": 1, "seed": opts.seed, "max_mb": opts.max_mb,
                "min_chars": opts.min_chars, "max_file_kb": opts.max_file_kb, "domains": {}}
    with atomic_dir(opts.out, label="output directory", advice="choose a new one or remove it") as tmp:
        for domain in opts.domains:
            paths = _candidates(domain)
            docs, size, dups, unreadable = [], 0, 0, 0
            taken: dict[str, int] = {}  # bytes per kind of source, steering _order
            with open(tmp / f"{domain}.jsonl", "w", encoding="utf-8") as f:
                for kind, path in _order(paths, opts.seed, domain, taken):
                    if cap is not None and size >= cap:
                        break
                    text = _document(domain, path, opts.max_file_kb * 1024)
                    if text is None or len(text) < opts.min_chars:
                        unreadable += text is None
                        continue
                    digest = hashlib.sha256(text.encode("utf-8")).digest()
                    if digest in seen:
                        dups += 1
                        continue
                    seen.add(digest)
                    f.write(json.dumps({"text": text, "source": str(path)}, ensure_ascii=False) + "\n")
                    n = len(text.encode("utf-8"))
                    size += n
                    taken[kind] = taken.get(kind, 0) + n
                    docs.append({"source": str(path), "sha256": digest.hex(), "bytes": n})
            manifest["domains"][domain] = {
                "file": f"{domain}.jsonl", "docs": len(docs), "bytes": size, "candidates": len(paths),
                "duplicates_dropped": dups, "unreadable_or_too_large": unreadable,
                "capped": cap is not None and size >= cap, "documents": docs}
        if not any(m["docs"] for m in manifest["domains"].values()):
            raise UserError("no text found for any domain on this machine")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def format_report(manifest: dict) -> str:
    lines = ["domain   documents        MB  candidates  duplicates  capped"]
    for d, m in manifest["domains"].items():
        lines.append(f"{d:<8} {m['docs']:>9,} {m['bytes'] / 1e6:>9.2f} {m['candidates']:>11,} "
                     f"{m['duplicates_dropped']:>11,}  {'yes' if m['capped'] else 'no'}")
    return "\n".join(lines)
