"""The public-domain books (mplus_fast.corpus): fetched from Debian's package pool at test time,
decoded without R, cached; the .deb and R-database decoders on hand-made inputs."""
from __future__ import annotations

import gzip
import io
import lzma
import tarfile

import pytest

from mplus_fast import corpus


def test_books_decode_to_their_known_texts():
    books = corpus.load_books()
    assert set(books) == set(corpus.BOOKS)
    assert books["prideprejudice"].startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen")
    assert "It is a truth universally acknowledged" in books["prideprejudice"]
    assert books["emma"].rstrip().endswith("FINIS")
    assert "Call me Ishmael." in books["mobydick"]
    assert "Project Gutenberg-tm" not in books["mobydick"], "the licence should be cut"
    words = {k: len(v.split()) for k, v in books.items()}
    assert 150_000 < words["emma"] < 165_000 and 200_000 < words["mobydick"] < 220_000, words


def test_cached_texts_need_no_fetch(tmp_path, monkeypatch):
    (tmp_path / "emma.txt").write_text("cached emma\n")
    monkeypatch.setattr(corpus, "fetch_deb", lambda *a: pytest.fail("nothing should be fetched"))
    assert corpus.load_books(["emma"], cache=tmp_path) == {"emma": "cached emma\n"}


def test_unknown_book_is_named():
    with pytest.raises(ValueError, match="'hamlet'"):
        corpus.load_books(["hamlet"])


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, body in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        out += header + body + (b"\n" if len(body) % 2 else b"")
    return out


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("ext,compress", [("xz", lzma.compress), ("gz", gzip.compress)])
def test_deb_members(tmp_path, ext, compress):
    deb = tmp_path / "x.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": lzma.compress(_tar({})),
                         f"data.tar.{ext}": compress(_tar({"./usr/a.txt": b"odd", "./usr/b": b"even"}))}))
    assert corpus.deb_members(deb) == {"usr/a.txt": b"odd", "usr/b": b"even"}


def test_not_a_deb_is_reported(tmp_path):
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"<html>404</html>")
    with pytest.raises(corpus.CorpusError, match="not a Debian package"):
        corpus.deb_members(bad)


def test_normalise_cuts_gutenberg_frame():
    text = corpus.normalise(["\ufeffHeader", "*** START OF THIS BOOK ***", "Body line.", "*** END OF THIS BOOK ***", "Licence"])
    assert text == "Body line.\n"
