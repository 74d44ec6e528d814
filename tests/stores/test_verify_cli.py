"""Corruption is caught (verify, loader); the CLI gives one clear line for bad input; plain zarr/dask can read a store."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from saeforge.pipeline.cli import main
from saeforge.stores import ChecksumError, StoreLoader, StoreWriter, open_store, verify_store

HOOK = "blocks.3.hook_resid_post"


@pytest.fixture
def store_path(tmp_path, store_factory):
    path = tmp_path / "store"
    store_factory(str(path), n=1200, hooks={HOOK: 16}, dtype="bfloat16")
    return path


def flip_byte(path: Path, shard: int = 1, where: float = 0.3) -> str:
    f = path / HOOK / "c" / str(shard) / "0"
    data = bytearray(f.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    f.write_bytes(bytes(data))
    return f"{HOOK}/c/{shard}/0"


def cli(*args):
    return CliRunner().invoke(main, ["store", *map(str, args)])


def assert_one_clear_line(result, *needles):
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), f"traceback instead of a message: {result.exception!r}"
    lines = [ln for ln in result.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("where", [0.3, 0.999])  # a data byte, a shard-index byte
def test_flipped_byte_is_caught_by_verify_and_by_the_loader(store_path, where):
    assert verify_store(store_path).ok
    key = flip_byte(store_path, shard=1, where=where)
    report = verify_store(store_path)
    assert not report.ok
    assert f"file {key}" in report.first_bad_chunk
    if where < 0.9:
        assert "checksum" in report.problems[0]
    result = cli("verify", store_path)
    assert_one_clear_line(result, "damaged", f"file {key}")
    with pytest.raises(ChecksumError if where < 0.9 else Exception, match=HOOK):
        for _ in StoreLoader(store_path, hooks=[HOOK], batch_rows=100, epochs=1, read_chunks=1):
            pass


def test_info_and_verify_on_a_good_store(store_path):
    ok = cli("verify", store_path)
    assert ok.exit_code == 0 and ok.output.startswith("ok: ") and "1,200 rows" in ok.output
    info = cli("info", store_path)
    assert info.exit_code == 0 and HOOK in info.output and "bfloat16" in info.output and "scale=" in info.output
    as_json = json.loads(cli("info", store_path, "--json").output)
    assert as_json["n_rows"] == 1200 and as_json["hooks"] == {HOOK: 16} and as_json["saeforge_format_version"] == 1
    assert set(as_json["stats"][HOOK]) == {"mean", "mean_sq_norm", "mean_norm", "scale"}


def test_cli_errors_are_one_clear_line(tmp_path, store_path):
    assert_one_clear_line(cli("info", tmp_path / "missing"), "does not exist")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    assert_one_clear_line(cli("verify", tmp_path / "plain"), "not a saeforge store")
    meta = json.loads((store_path / "zarr.json").read_text())
    meta["attributes"]["saeforge_format_version"] = 99
    (store_path / "zarr.json").write_text(json.dumps(meta))
    assert_one_clear_line(cli("info", store_path), "format version 99")
    w = StoreWriter(tmp_path / "partial", {HOOK: 4}, dtype="float32", expected_rows=10)
    w.append({HOOK: np.ones((10, 4), np.float32)})
    w.abort()
    assert_one_clear_line(cli("info", tmp_path / "partial"), "incomplete", "rerun the same harvest command")
    assert_one_clear_line(cli("verify", tmp_path / "partial"), "incomplete")


def test_help_is_instant_and_documents_commands():
    for args in (["store", "--help"], ["store", "info", "--help"], ["store", "verify", "--help"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "Usage:" in result.output


def test_plain_zarr_and_dask_can_read_and_understand_a_store(store_path):
    import dask.array as da
    import zarr

    s = open_store(store_path)
    group = zarr.open_group(str(store_path), mode="r")
    attrs = dict(group.attrs)
    assert attrs["saeforge_format_version"] == 1 and attrs["hooks"] == {HOOK: 16}
    assert attrs["n_rows"] == 1200 and attrs["dtype"] == "bfloat16" and "uint16" in attrs["description"]
    assert group[HOOK].attrs["logical_dtype"] == "bfloat16"
    bits = da.from_zarr(str(store_path), component=HOOK)
    assert bits.shape == (1200, 16) and bits.dtype == np.uint16
    as_fp32 = ((bits.astype(np.uint32) << 16).compute()).view(np.float32)  # the recipe in the description
    np.testing.assert_array_equal(as_fp32, s.read(HOOK).numpy())
    tokens = da.from_zarr(str(store_path), component="token_ids").compute()
    assert np.array_equal(tokens, s.token_ids())
    mean = as_fp32.astype(np.float64).mean(0)
    np.testing.assert_allclose(mean, attrs["stats"][HOOK]["mean"], rtol=1e-9, atol=1e-12)


def test_a_complete_store_lists_cleanly_in_plain_zarr(store_path):
    import warnings

    import zarr

    assert not (store_path / ".saeforge").exists()  # writer state (lock, progress, staging) is gone
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr warns about any folder that is not part of the hierarchy
        names = sorted(name for name, _ in zarr.open_group(str(store_path), mode="r").members())
    assert names == sorted([HOOK, "pos", "seq_idx", "token_ids"])
