"""Three domains no moekit recipe was tuned on, from text every Debian machine with Python has.

- ``perl``: Perl modules (``*.pm`` under /usr/share/perl* and /usr/lib/*/perl*; perl-base is
  essential on Debian): code in another language than the demo's Python;
- ``licenses``: /usr/share/common-licenses (base-files): legal English prose, unlike pydoc's;
- ``german``: the German translations of Debian's programs (``msgstr`` of every
  /usr/share/locale/de/LC_MESSAGES/*.mo, read with Python's gettext): another natural language.

Writes one ``DOMAIN.jsonl`` per domain (``{"text": ...}`` records, at most ``--bytes`` of text
each) into ``--out`` and prints the recipe override that trains on them:

    python bench/unseen_domains.py --out /scratch/unseen
    python bench/baselines.py --recipe recipes/btx-converged-seed.yaml \
        --set "$(python bench/unseen_domains.py --out /scratch/unseen --print-override)" \
        --variants bam-shared,bam-expert --repeats 3 --work /scratch/unseen-runs
"""

from __future__ import annotations

import argparse
import gettext
import glob
import json
from collections.abc import Iterator
from pathlib import Path

PERL_GLOBS = ("/usr/share/perl*/**/*.pm", "/usr/lib/*/perl*/**/*.pm", "/usr/share/perl5/**/*.pm")


def _perl() -> Iterator[str]:
    seen: set[str] = set()
    for pattern in PERL_GLOBS:
        for path in sorted(glob.glob(pattern, recursive=True)):
            real = str(Path(path).resolve())
            if real not in seen:
                seen.add(real)
                yield Path(path).read_text(encoding="utf-8", errors="replace")


def _licenses() -> Iterator[str]:
    for path in sorted(Path("/usr/share/common-licenses").iterdir()):
        if path.is_file() and not path.is_symlink():
            yield path.read_text(encoding="utf-8", errors="replace")


def _german() -> Iterator[str]:
    for path in sorted(Path("/usr/share/locale/de/LC_MESSAGES").glob("*.mo")):
        try:
            with open(path, "rb") as handle:
                catalog = gettext.GNUTranslations(handle)._catalog  # type: ignore[attr-defined]
        except (OSError, UnicodeDecodeError):
            continue
        strings = [v for k, v in catalog.items() if k and isinstance(v, str) and len(v) > 20]
        if strings:
            yield "\n".join(strings)


SOURCES = {"perl": _perl, "licenses": _licenses, "german": _german}


def write(out: Path, budget: int) -> dict[str, Path]:
    """Each domain's JSONL file (records of at most 4000 characters, about ``budget`` characters in all)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, source in SOURCES.items():
        path, written = out / f"{name}.jsonl", 0
        with open(path, "w", encoding="utf-8") as handle:
            for text in source():
                for start in range(0, len(text), 4000):
                    piece = text[start : start + 4000]
                    handle.write(json.dumps({"text": piece}, ensure_ascii=False) + "\n")
                    written += len(piece)
                if written >= budget:
                    break
        if written == 0:
            raise SystemExit(f"no {name} text found on this machine")
        files[name] = path
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bytes", type=int, default=3_000_000, help="characters of text per domain")
    parser.add_argument("--print-override", action="store_true", help="print only the recipe's domains override")
    args = parser.parse_args()
    files = write(args.out, args.bytes)
    override = "domains={" + ", ".join(f"{d}: {{data: [{p}]}}" for d, p in files.items()) + "}"
    if not args.print_override:
        for domain, path in files.items():
            print(f"{domain}: {path} ({path.stat().st_size:,} bytes)")
    print(override)


if __name__ == "__main__":
    main()
