"""Compter's own settings, from flags and COMPTER_* variables, in one frozen object."""

from collections.abc import Mapping
from dataclasses import dataclass, field


class SettingsError(ValueError):
    """A setting has a value Compter cannot use; the message names the setting."""


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    store: str = "memory://"
    workers: int = 1
    metrics_max_debts: int = 10_000
    # From the environment only: a secret on the command line shows in `ps`.
    api_token: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, environ: Mapping[str, str], **flags: object) -> "Settings":
        """Flags win over COMPTER_* variables, which win over defaults."""
        defaults = cls()

        def pick(name: str, default: object) -> tuple[object, str]:
            flag = flags.get(name)
            if flag is not None:
                return flag, f"--{name.replace('_', '-')}"
            variable = f"COMPTER_{name.upper()}"
            return environ.get(variable, default), variable

        picked_host, host_source = pick("host", defaults.host)
        host = str(picked_host).strip()
        if not host:
            raise SettingsError(f"{host_source} is empty: give an address, such as 127.0.0.1 or 0.0.0.0")
        store, _ = pick("store", defaults.store)
        return cls(
            host=host,
            port=_integer(*pick("port", defaults.port), low=1, high=65535),
            store=str(store),
            workers=_integer(*pick("workers", defaults.workers), low=1, high=64),
            metrics_max_debts=_integer(*pick("metrics_max_debts", defaults.metrics_max_debts), low=0, high=10**7),
            api_token=environ.get("COMPTER_API_TOKEN") or None,
        )


def _integer(value: object, source: str, *, low: int, high: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise SettingsError(f"{source}: {value!r} is not a whole number") from None
    if not low <= number <= high:
        raise SettingsError(f"{source}: {number} is not between {low} and {high}")
    return number
