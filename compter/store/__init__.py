"""Stores, chosen by URL scheme; each backend's module is imported only when used."""

from importlib import import_module

from compter.store.base import Store

_BACKENDS = {"memory": "compter.store.memory:MemoryStore"}


def store_from_url(url: str) -> Store:
    """Build (not yet open) the store a URL names; ValueError for an unknown scheme."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    backend = _BACKENDS.get(scheme)
    if backend is None:
        raise ValueError(f"unsupported store URL {redact(url)!r}: use memory://")
    module, cls = backend.split(":")
    store: Store = getattr(import_module(module), cls)(url)
    return store


def redact(url: str) -> str:
    """The URL with any password replaced, fit for logs and errors."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


__all__ = ["Store", "redact", "store_from_url"]
