"""StrictStore: zarr reads of a store in which a chunk that is not there is an error, not fill values.

Zarr reads an absent chunk (or shard) file as the array's fill value: right for sparse arrays, wrong for a
store whose writer writes every chunk (``writer.py``), where an absent file is damage. The wrapper raises
StoreDamaged, naming the file, wherever zarr finds no chunk file; chunks absent from a shard's index are the
reader's to check (``Store.check_present``).
"""
from __future__ import annotations

from zarr.storage import WrapperStore

from saeforge.stores.errors import StoreDamaged


class StrictStore(WrapperStore):
    """A read-only zarr store whose chunk keys (``<array>/c/...``) must exist."""

    def __init__(self, store, url: str = ""):
        super().__init__(store)
        self._url = url

    def _with_store(self, store):
        return type(self)(store, self._url)

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None and key.split("/")[1:2] == ["c"]:
            raise StoreDamaged(f"{self._url}: chunk file {key} is missing, so its rows cannot be read; the store "
                               f"is damaged (run `saeforge store verify {self._url}`)")
        return buf
