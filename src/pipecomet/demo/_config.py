"""
``[demo]``: the demo gateway's app keys and their rates.
"""

from __future__ import annotations

import attrs

__all__ = ["DemoConfig", "AppKey"]


@attrs.frozen
class AppKey:
    """
    One registered app and its rate limit (a token bucket).

    :ivar rate: requests per second.
    :ivar burst: requests that may come at once; ``rate`` when 0.
    """

    rate: float = attrs.field(default=100_000.0, converter=float, validator=attrs.validators.gt(0))
    burst: float = attrs.field(default=0.0, converter=float, validator=attrs.validators.ge(0))

    @property
    def capacity(self) -> float:
        return self.burst or self.rate


def _default_keys() -> dict[str, AppKey]:
    return {"demo-key": AppKey(rate=100_000.0), "demo-limited": AppKey(rate=5.0, burst=5.0)}


@attrs.frozen
class DemoConfig:
    """
    ``[demo]``: the demo gateway's app keys, one table per key.

    :ivar keys: app key → its rate.
    :ivar max_image_pixels: largest image (width × height) ``/api/image.resize``
        decodes; a larger one gets 413 ``image_too_large`` before decoding.
    """

    keys: dict[str, AppKey] = attrs.field(factory=_default_keys)
    max_image_pixels: int = attrs.field(default=40_000_000, converter=int,
                                        validator=attrs.validators.gt(0))
