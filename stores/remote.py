"""Stores at URLs: what a remote filesystem's failure means, as one line that names the URL and the fix.

An object store fails in ways a local disk does not, and fsspec hands them on as whatever its backend raised
(s3fs: ``FileNotFoundError`` for a missing bucket, ``PermissionError`` for refused credentials or access,
botocore's ``EndpointConnectionError`` for an endpoint it cannot reach). :func:`remote_error` turns each into a
:class:`RemoteStoreError` (a missing bucket into a :class:`~saeforge.stores.errors.StoreNotFound`), and
:func:`check_remote` asks the filesystem, before anything is written, whether the bucket is there and the
credentials are accepted: a store is never written into a bucket fsspec would create on the way (s3fs's
``makedirs`` creates missing buckets).

Classes are recognised by name, so neither botocore nor aiohttp is imported here.
"""
from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Iterator

from saeforge.stores.errors import StoreError, StoreNotFound
from saeforge.stores.schema import Location, locate

OPTIONS_HINT = "--storage-options '{\"key\": ..., \"secret\": ..., \"client_kwargs\": {\"endpoint_url\": ...}}'"
"""How the fix is spelled on a command line (in a config file: the top-level table ``storage_options``)."""
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ServerTimeoutError",
                "ConnectionError", "TimeoutError"}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_BAD_CREDENTIALS = ("access key id", "invalidaccesskeyid", "signaturedoesnotmatch", "request signature",
                    "security token", "invalidtoken", "expiredtoken", "credential")
"""Words of S3's messages for a key it does not know, a secret that does not match it, an expired token."""


class RemoteStoreError(StoreError):
    """The filesystem holding a store at a URL cannot be reached, or refuses the credentials or the access."""


class BucketNotFound(StoreNotFound):
    """The bucket (or container) a store URL names does not exist."""


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _bucket(loc: Location) -> str | None:
    """The bucket of an object-store URL (s3fs, gcsfs, adlfs split paths so), else None."""
    split = getattr(loc.fs, "split_path", None)
    if loc.is_local or split is None:
        return None
    try:
        return split(loc.root)[0] or None
    except (TypeError, ValueError):
        return None


def remote_error(where: Location | str, exc: BaseException, *, writing: bool = False) -> StoreError | None:
    """``exc`` (raised by the filesystem of the store at ``where``) as the StoreError that says what to do, or
    None when it is no failure of a remote filesystem (a local path, a StoreError already, anything else)."""
    loc = where if isinstance(where, Location) else None
    url = loc.url if loc is not None else str(where)
    if isinstance(exc, StoreError) or (loc is not None and loc.is_local):
        return None
    names, text = _names(exc), str(exc).strip() or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        bucket = _bucket(loc) if loc is not None else None
        return BucketNotFound(f"{url}: the bucket {bucket or 'it names'} does not exist ({text}); create it first "
                              "(saeforge never creates buckets) or fix the URL")
    if names & _NO_CREDENTIALS:
        return RemoteStoreError(f"{url}: no credentials found ({text}); pass them with {OPTIONS_HINT}, or set "
                                "them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM)):
        if any(word in text.lower() for word in _BAD_CREDENTIALS):
            return RemoteStoreError(f"{url}: the credentials were refused ({text}); check the key and secret in "
                                    f"{OPTIONS_HINT} or in the environment")
        action = "write" if writing else "read"
        return RemoteStoreError(f"{url}: access denied ({text}); use credentials allowed to {action} it (in "
                                f"{OPTIONS_HINT}) or another URL")
    if names & _UNREACHABLE or isinstance(exc, (ConnectionError, TimeoutError)):
        return RemoteStoreError(f"{url}: cannot reach its storage endpoint ({text}); check the network, or the "
                                f"endpoint_url in {OPTIONS_HINT}")
    return None


@contextmanager
def remote_errors(where: Location | str, *, writing: bool = False) -> Iterator[None]:
    """Re-raise a remote filesystem's failure inside the block as the StoreError of :func:`remote_error`."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only failures remote_error recognises are replaced
        err = remote_error(where, e, writing=writing)
        if err is None:
            raise
        raise err from e


def check_remote(path_or_url, storage_options: dict | None = None, *, writing: bool = False) -> bool:
    """For a store at a URL: BucketNotFound when its bucket is missing, RemoteStoreError when the endpoint cannot be
    reached or the credentials are refused; else whether anything is at the URL. Lists the store's folder (one
    request), writes nothing. Local paths pass (True)."""
    loc = locate(path_or_url, storage_options)
    if loc.is_local:
        return True
    with remote_errors(loc, writing=writing):
        try:
            loc.fs.ls(loc.root, detail=False)
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise
            return False  # nothing at the URL yet: the writer creates it (inside an existing bucket)
    return True
