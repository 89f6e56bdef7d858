"""Stores, chosen by URL scheme; each backend's module (and driver) is imported only when used."""

from importlib import import_module
from urllib.parse import urlsplit, urlunsplit

from compter.store.base import Store

# scheme -> (module:class, the extra that installs its driver, or None for the standard library)
_BACKENDS: dict[str, tuple[str, str | None]] = {
    "memory": ("compter.store.memory:MemoryStore", None),
    "sqlite": ("compter.store.sqlite:SQLiteStore", None),
    "postgresql": ("compter.store.postgres:PostgresStore", "postgres"),
    "postgres": ("compter.store.postgres:PostgresStore", "postgres"),
    "redis": ("compter.store.redis:RedisStore", "redis"),
    "rediss": ("compter.store.redis:RedisStore", "redis"),
}


def store_from_url(url: str) -> Store:
    """Build (not yet open) the store a URL names; ValueError, saying what to do, if it cannot."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    backend = _BACKENDS.get(scheme)
    if backend is None:
        raise ValueError(
            f"unsupported store URL {redact(url)!r}: use memory://, sqlite:///path/to/compter.db, "
            "postgresql://user@host/database or redis://host:6379/0"
        )
    target, extra = backend
    module_name, class_name = target.split(":")
    try:
        module = import_module(module_name)
    except ModuleNotFoundError as error:
        if extra is None:
            raise
        raise ValueError(f"the {scheme} store needs the {error.name} package: pip install 'compter[{extra}]'") from None
    store: Store = getattr(module, class_name)(url)
    return store


def redact(url: str) -> str:
    """The URL with any password replaced, fit for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


__all__ = ["Store", "redact", "store_from_url"]
