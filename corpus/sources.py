"""Corpus sources: each one small class that yields documents from an installed package.

Nothing is downloaded: code comes from the running interpreter's standard library, prose from
Debian packages (python3.11-doc, r-cran-janeaustenr unpacked with dpkg-deb), and MIDI from
music21's bundled corpus. A source that is not installed says why and is skipped.
To add a source: subclass `Source`, set its fields, implement `missing()` and `documents()`,
and list it in `ALL_SOURCES`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import sysconfig
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Voices of a chorale (and tracks of a folk tune) get distinct General MIDI programs so that
# MMM keeps them apart: 4 voices in, 4 tracks out.
VOICE_PROGRAMS = (40, 41, 42, 43, 71, 70, 68, 73)  # violin, viola, cello, contrabass, winds
FOLK_PROGRAMS = (73, 24, 32, 0)  # melody on flute, chords on guitar, bass, piano


@dataclass
class Document:
    doc_id: str  # stable across runs: decides the split
    content: str | bytes  # text/code, or MIDI file bytes


class Source:
    name: str = ""
    modality: str = ""  # text | code | midi
    licence: str = ""
    origin: str = ""  # the package it comes from

    def missing(self) -> str | None:
        """None when the source can be read, else a message saying what to install."""
        raise NotImplementedError

    def documents(self, limit: int | None = None) -> Iterator[Document]:
        raise NotImplementedError


def extra_roots() -> list[Path]:
    """Where unpacked Debian packages may live besides `/` (see scripts/setup.sh)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    roots = os.environ.get("UNMASK_DEB_ROOT", str(cache / "unmask" / "deb"))
    return [Path("/"), *(Path(r) for r in roots.split(os.pathsep) if r)]


class PythonStdlib(Source):
    name, modality = "python-stdlib", "code"
    licence = "PSF-2.0 (Python Software Foundation License)"
    origin = "the running interpreter's standard library (without its test suites)"
    _skip = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})

    def __init__(self) -> None:
        self.root = Path(sysconfig.get_paths()["stdlib"])

    def missing(self) -> str | None:
        return None if (self.root / "os.py").exists() else f"no stdlib sources at {self.root}"

    def documents(self, limit: int | None = None) -> Iterator[Document]:
        files = sorted(
            p
            for p in self.root.rglob("*.py")
            if not self._skip & set(p.relative_to(self.root).parts)
        )
        for path in files[:limit]:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(str(path.relative_to(self.root)), text)


class PythonDocs(Source):
    name, modality = "python-docs", "text"
    licence = "PSF-2.0 (Python documentation, Debian package python3.11-doc)"
    origin = "Debian package python3.11-doc: html/_sources/*.rst.txt"
    _rel = "usr/share/doc/python3.11/html/_sources"

    def _dir(self) -> Path | None:
        return next((r / self._rel for r in extra_roots() if (r / self._rel).is_dir()), None)

    def missing(self) -> str | None:
        return None if self._dir() else "install the Debian package python3.11-doc"

    def documents(self, limit: int | None = None) -> Iterator[Document]:
        root = self._dir()
        assert root is not None
        for path in sorted(root.rglob("*.rst.txt"))[:limit]:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(str(path.relative_to(root)), text)


class JaneAusten(Source):
    """Six novels from R's janeaustenr data, read without R (lazy-load database + rdata)."""

    name, modality = "jane-austen", "text"
    licence = "public domain texts (Project Gutenberg); janeaustenr package MIT"
    origin = "Debian package r-cran-janeaustenr (apt-get download + dpkg-deb -x), read with rdata"
    _rel = "usr/lib/R/site-library/janeaustenr/data"
    _chapter = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$")

    def _dir(self) -> Path | None:
        return next(
            (r / self._rel for r in extra_roots() if (r / self._rel / "Rdata.rdb").exists()), None
        )

    def missing(self) -> str | None:
        if self._dir() is None:
            return "unpack the Debian package r-cran-janeaustenr (scripts/setup.sh does it)"
        try:
            import rdata  # noqa: F401
        except ImportError:
            return "install the PyPI package rdata"
        return None

    def novels(self) -> dict[str, list[str]]:
        import rdata

        data = self._dir()
        assert data is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that the index has no RDS header
            index = rdata.conversion.convert(
                rdata.parser.parse_data(gzip.decompress((data / "Rdata.rdx").read_bytes()))
            )
            blob = (data / "Rdata.rdb").read_bytes()
            out = {}
            for name, (offset, length) in sorted(index["variables"].items()):
                # Each object: 4-byte big-endian uncompressed size, then a zlib stream.
                raw = zlib.decompress(blob[offset + 4 : offset + length])
                out[str(name)] = [
                    str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(raw))
                ]
        return out

    def documents(self, limit: int | None = None) -> Iterator[Document]:
        count = 0
        for novel, lines in self.novels().items():
            chapter, buf = 0, []
            for line in [*lines, "CHAPTER END"]:
                if self._chapter.match(line) or line == "CHAPTER END":
                    text = "\n".join(buf).strip()
                    if text:
                        yield Document(f"{novel}/{chapter:03d}", text + "\n")
                        count += 1
                        if limit is not None and count >= limit:
                            return
                    chapter, buf = chapter + 1, [line]
                else:
                    buf.append(line)


def _music21_corpus() -> Path | None:
    try:
        import music21
    except ImportError:
        return None
    return Path(music21.__file__).parent / "corpus"


class BachChorales(Source):
    name, modality = "bach-chorales", "midi"
    licence = "public domain music; encodings distributed with music21 (BSD-3-Clause)"
    origin = "music21 bundled corpus: bach/*.mxl, written to MIDI with one program per voice"

    def missing(self) -> str | None:
        root = _music21_corpus()
        return None if root and (root / "bach").is_dir() else "install the PyPI package music21"

    def documents(self, limit: int | None = None) -> Iterator[Document]:
        root = _music21_corpus()
        assert root is not None
        for path in sorted((root / "bach").glob("*.mxl"))[:limit]:
            data = chorale_to_midi(path)
            if data:
                yield Document(path.stem, data)


def chorale_to_midi(path: Path) -> bytes | None:
    from music21 import converter, instrument, midi

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = converter.parse(str(path))
        parts = list(score.parts)
        if not parts or len(parts) > len(VOICE_PROGRAMS):
            return None
        for part, program in zip(parts, VOICE_PROGRAMS, strict=False):
            for inst in list(part.recurse().getElementsByClass(instrument.Instrument)):
                inst.activeSite.remove(inst)
            part.insert(0, instrument.instrumentFromMidiProgram(program))
        return midi.translate.music21ObjectToMidiFile(score).writestr()


# ABC collections bundled with music21, with the licence each carries.
ABC_COLLECTIONS: dict[str, str] = {
    "essenFolksong": "Essen Folksong Collection: free for non-commercial research use only",
    "oneills1850": "O'Neill's Music of Ireland (1850): public domain",
    "ryansMammoth": "Ryan's Mammoth Collection (1883): public domain",
    "airdsAirs": "Aird's Airs (18th century): public domain",
    "nottingham-dataset": "Nottingham Music Database, distributed with music21 (free use, "
    "attribution to the NMD)",
}


class FolkTunes(Source):
    name, modality = "folk-abc", "midi"
    licence = "; ".join(ABC_COLLECTIONS.values())
    origin = "music21 bundled corpus: ABC collections, one document per tune (parsed with symusic)"
    _tune_start = re.compile(r"^X:", re.MULTILINE)

    def missing(self) -> str | None:
        root = _music21_corpus()
        return None if root and (root / "essenFolksong").is_dir() else "install music21"

    def documents(self, limit: int | None = None) -> Iterator[Document]:
        import symusic

        root = _music21_corpus()
        assert root is not None
        count = 0
        for collection in ABC_COLLECTIONS:
            for path in sorted((root / collection).glob("*.abc")):
                text = path.read_text(encoding="latin-1")
                starts = [m.start() for m in self._tune_start.finditer(text)]
                for a, b in zip(starts, [*starts[1:], len(text)], strict=True):
                    tune = text[a:b]
                    data = abc_to_midi(symusic, tune)
                    if data is None:
                        continue
                    digest = hashlib.sha1(tune.encode("utf-8", "replace")).hexdigest()[:10]
                    yield Document(f"{collection}/{path.stem}/{digest}", data)
                    count += 1
                    if limit is not None and count >= limit:
                        return


def abc_to_midi(symusic, tune: str) -> bytes | None:
    try:
        score = symusic.Score.from_abc(tune)
    except Exception:  # abc parse errors in a few transcriptions: skip that tune
        return None
    if score.note_num() == 0:
        return None
    for track, program in zip(score.tracks, FOLK_PROGRAMS, strict=False):
        track.program = program
    return bytes(score.dumps_midi())


ALL_SOURCES: tuple[type[Source], ...] = (
    PythonStdlib,
    PythonDocs,
    JaneAusten,
    BachChorales,
    FolkTunes,
)
