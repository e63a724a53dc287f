"""Reading the Prometheus text a server exposes, in tests."""
from __future__ import annotations

import re
import urllib.request

_SERIES = re.compile(r'([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _canonical(series: str) -> tuple[str, frozenset]:
    """``name{a="x",b="y"}`` -> (name, its labels): label order means nothing in the format, nor here."""
    m = _SERIES.match(series.strip())
    if m is None:
        raise ValueError(f"not a series: {series!r}")
    return m.group(1), frozenset(_LABEL.findall(m.group(2) or ""))


class Series(dict):
    """``name{labels}`` -> value of every sample line; looked up in any label order."""

    def __getitem__(self, series: str) -> float:
        return super().__getitem__(_canonical(series))

    def __contains__(self, series) -> bool:
        return super().__contains__(_canonical(series))

    def get(self, series: str, default=None):
        return super().get(_canonical(series), default)

    def keys(self):
        return [name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels)) + "}" if labels else "")
                for name, labels in super().keys()]

    def __iter__(self):
        return iter(self.keys())

    def matching(self, name: str) -> dict[frozenset, float]:
        """The samples of ``name``: their labels -> value."""
        return {labels: value for (n, labels), value in self.items() if n == name}


def series(text: str) -> Series:
    out = Series()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            dict.__setitem__(out, _canonical(name), float(value))
    return out


def scrape(port: int, host: str = "127.0.0.1") -> Series:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        return series(response.read().decode())
