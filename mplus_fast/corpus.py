"""Public-domain books for training and evaluation, from Debian's R data packages.

Jane Austen's six novels ship in `r-cran-janeaustenr`, Moby-Dick in `r-cran-tokenizers`, as R
lazy-load databases (`data/Rdata.rdx` index + `data/Rdata.rdb` objects). We fetch the `.deb`
files from a Debian package mirror at set-up or test time (never committed), unpack them in
Python (ar archive → data.tar.*), decode the R objects with the `rdata` package (no R needed),
and cache the plain texts:

    from mplus_fast.corpus import load_books
    books = load_books()          # {"emma": "EMMA\\n\\nBy Jane Austen\\n…", …, "mobydick": "…"}

Cache: `$MPLUS_FAST_DATA/corpus` (default `~/.cache/mplus_fast/corpus`): the `.deb` files and
one UTF-8 `<book>.txt` per book, written atomically. With the texts cached nothing is fetched
and `rdata` is not needed. Offline machines: put the two `.deb` files (names in `PACKAGES`) in the
cache folder, or install the Debian packages (`/usr/lib/R/site-library` is read first).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from mplus_fast.atomic import write_bytes_atomic


@dataclass(frozen=True)
class Package:
    name: str            # the Debian package
    r_name: str          # the R package inside it
    deb: str             # a known file in the Debian pool, with its checksum
    sha256: str
    books: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"{MIRROR}/pool/main/r/{self.name}/{self.deb}"


MIRROR = os.environ.get("MPLUS_FAST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = (
    Package("r-cran-janeaustenr", "janeaustenr", "r-cran-janeaustenr_1.0.0-1_all.deb",
            "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
            ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")),
    Package("r-cran-tokenizers", "tokenizers", "r-cran-tokenizers_0.3.0-1_amd64.deb",
            "6312f013ebfde5650235bfd7ba5c44d9e4cf9f2da9855337c9483fe778f0d8c7", ("mobydick",)),
)
BOOKS = tuple(b for p in PACKAGES for b in p.books)
AUSTEN = PACKAGES[0].books
SYSTEM_R_LIBRARY = Path("/usr/lib/R/site-library")


class CorpusError(RuntimeError):
    """The books could not be fetched or decoded (the message says what to do)."""


def cache_dir() -> Path:
    root = os.environ.get("MPLUS_FAST_DATA")
    return (Path(root) if root else Path.home() / ".cache" / "mplus_fast") / "corpus"


def load_books(names=None, cache: str | Path | None = None) -> dict[str, str]:
    """The books' texts by name (all of `BOOKS` by default), fetched and decoded once."""
    names = tuple(BOOKS if names is None else names)
    unknown = [n for n in names if n not in BOOKS]
    if unknown:
        raise ValueError(f"unknown book(s) {unknown}: choose from {list(BOOKS)}")
    folder = Path(cache) if cache is not None else cache_dir()
    missing = [n for n in names if not (folder / f"{n}.txt").is_file()]
    for package in PACKAGES:
        if any(n in package.books for n in missing):
            folder.mkdir(parents=True, exist_ok=True)
            for book, text in decode_package(package, folder).items():
                write_bytes_atomic(folder / f"{book}.txt", text.encode("utf-8"))
    return {n: (folder / f"{n}.txt").read_text(encoding="utf-8") for n in names}


# ---------------------------------------------------------------------- fetching
def decode_package(package: Package, folder: Path) -> dict[str, str]:
    """{book: text} of one package: from an installed R library, else from its .deb."""
    installed = SYSTEM_R_LIBRARY / package.r_name / "data"
    if (installed / "Rdata.rdx").is_file():
        rdx, rdb = (installed / "Rdata.rdx").read_bytes(), (installed / "Rdata.rdb").read_bytes()
    else:
        members = deb_members(fetch_deb(package, folder))
        prefix = f"usr/lib/R/site-library/{package.r_name}/data/"
        try:
            rdx, rdb = members[prefix + "Rdata.rdx"], members[prefix + "Rdata.rdb"]
        except KeyError:
            raise CorpusError(f"{package.deb}: no R data files under {prefix}") from None
    objects = decode_lazyload(rdx, rdb)
    return {book: normalise(objects[book]) for book in package.books}


def fetch_deb(package: Package, folder: Path) -> Path:
    """The package's .deb in `folder`: already there, downloaded from the pool, or by apt-get."""
    target = folder / package.deb
    if target.is_file():
        return target
    for p in folder.glob(f"{package.name}_*.deb"):
        return p
    errors = []
    try:
        with urllib.request.urlopen(package.url, timeout=60) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != package.sha256:
            raise CorpusError(f"{package.url}: checksum mismatch")
        write_bytes_atomic(target, data)
        return target
    except (OSError, CorpusError) as exc:
        errors.append(f"{package.url}: {exc}")
    if shutil.which("apt-get"):  # another version, from the machine's configured mirror
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            run = subprocess.run(["apt-get", "download", package.name], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("*.deb"))
            if run.returncode == 0 and debs:
                final = folder / debs[0].name
                os.replace(debs[0], final)
                return final
            errors.append(f"apt-get download {package.name}: {run.stderr.strip() or run.returncode}")
    raise CorpusError(f"could not fetch {package.name} ({'; '.join(errors)}). Put {package.deb} in {folder}, "
                      f"or install the Debian package {package.name}")


def deb_members(deb: Path) -> dict[str, bytes]:
    """Files of a .deb's data archive: {path without leading './': bytes}."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise CorpusError(f"{deb}: not a Debian package (no ar header)")
    pos, data = 8, None
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        body = blob[pos + 60: pos + 60 + size]
        if name.startswith("data.tar"):
            data = (name, body)
        pos += 60 + size + (size % 2)
    if data is None:
        raise CorpusError(f"{deb}: no data.tar member")
    name, body = data
    if name.endswith(".xz"):
        body = lzma.decompress(body)
    elif name.endswith(".gz"):
        body = gzip.decompress(body)
    elif name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise CorpusError(f"{deb}: {name} needs the `zstandard` package") from None
        body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                out[member.name.lstrip("./")] = tar.extractfile(member).read()
    return out


# ---------------------------------------------------------------------- decoding
def decode_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """An R lazy-load database → {variable: decoded object}. The index is a gzip'd serialised
    list whose `variables` maps each name to (offset, length) in the .rdb; each object there is
    a 4-byte big-endian length followed by a zlib stream of the serialised object."""
    try:
        import rdata
    except ImportError:
        raise CorpusError("decoding the books needs the `rdata` package: pip install rdata "
                          "(or pip install 'mplus_fast[data]')") from None

    def parse(raw: bytes):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": these are bare serialisations
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = rdb[int(offset): int(offset) + int(length)]
        (size,) = struct.unpack(">I", chunk[:4])
        raw = zlib.decompress(chunk[4:])
        if len(raw) != size:
            raise CorpusError(f"R object {name!r}: {len(raw)} bytes decoded, {size} expected")
        out[str(name)] = parse(raw)
    return out


def normalise(obj) -> str:
    """A character vector (one line per element, or one string) → text with '\\n' line ends,
    without a Project Gutenberg header and licence (Moby-Dick ships with them)."""
    lines = [str(x) for x in (obj.tolist() if hasattr(obj, "tolist") else obj)]
    text = "\n".join(lines).replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    start, end = text.find("*** START OF"), text.find("*** END OF")
    if 0 <= start < end:
        text = text[text.index("\n", start) + 1: end]
    return text.strip("\n") + "\n"
