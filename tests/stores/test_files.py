"""Atomic writes leave the old file or the new one, never a temporary; JSON on local and memory://; sha256; the bar."""
from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from saeforge.stores.files import (atomic_path, read_json, sha256_bytes, sha256_file, write_atomic,
                                   write_bytes_durable, write_json_atomic)
from saeforge.stores.progress import progress_bar
from saeforge.stores.schema import locate


def test_write_atomic_bytes_and_text_and_no_temporaries(tmp_path):
    p = tmp_path / "cfg.json"
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    write_atomic(str(p), "héllo\n", durable=True)
    assert p.read_bytes() == "héllo\n".encode()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cfg.json"]


def test_atomic_path_renames_on_success_and_cleans_up_on_failure(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"old")
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp != p
        tmp.write_bytes(b"new")
        assert p.read_bytes() == b"old"  # nothing visible before the rename
    assert p.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("torch.save failed")
    assert p.read_bytes() == b"new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["weights.bin"]


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_json_round_trip_and_missing_file(tmp_path, backend):
    url = str(tmp_path / "s") if backend == "local" else f"memory://saeforge-files-{uuid.uuid4().hex}/s"
    loc = locate(url)
    loc.fs.makedirs(loc.root, exist_ok=True)
    obj = {"b": [1, 2.5, None], "a": "é"}
    write_json_atomic(loc, loc.sub("x.json"), obj)
    assert read_json(loc, loc.sub("x.json")) == obj
    with loc.fs.open(loc.sub("x.json"), "rb") as f:
        assert f.read() == json.dumps(obj, indent=1).encode()  # the store format's JSON encoding
    assert read_json(loc, loc.sub("missing.json")) is None
    write_bytes_durable(loc, loc.sub("raw.bin"), b"abc")
    assert loc.fs.cat_file(loc.sub("raw.bin")) == b"abc"
    assert sorted(p.rsplit("/", 1)[-1] for p in loc.fs.ls(loc.root, detail=False)) == ["raw.bin", "x.json"]
    with pytest.raises(ValueError):
        write_json_atomic(loc, loc.sub("nan.json"), {"x": float("nan")})


def test_sha256(tmp_path):
    data = bytes(range(256)) * 5000  # more than one read block
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == sha256_bytes(data) == hashlib.sha256(data).hexdigest()


def test_progress_bar_goes_to_stderr_and_is_silent_when_disabled(capsys):
    with progress_bar(10, desc="shuffle+write", unit="row", enabled=False, initial=2) as bar:
        bar.update(3)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    with progress_bar(10, desc="shuffle+write", unit="row", enabled=True, initial=2) as bar:
        bar.update(3)
    out = capsys.readouterr()
    assert out.out == "" and "shuffle+write" in out.err and "5/10" in out.err


def test_the_python_api_expands_a_home_path_as_the_cli_does(tmp_path, monkeypatch):
    """`open_store("~/acts")` from a notebook names the folder under the home directory, not one called `~`."""
    from saeforge.stores import open_store
    from saeforge.stores.schema import locate
    from tests.stores.helpers import write_store

    monkeypatch.setenv("HOME", str(tmp_path))
    write_store(str(tmp_path / "acts"))
    assert locate("~/acts").root == str(tmp_path / "acts")
    assert open_store("~/acts").n_rows > 0
    assert locate("memory://~/x").url == "memory://~/x"  # a URL is never expanded
