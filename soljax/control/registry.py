"""Controllers registered by name: ``make_controller("emc", grid=...)``.

Every controller module of :mod:`soljax.control` registers its classes when the package is
imported, so the registry is complete as soon as anything from :mod:`soljax.control` is.
"""

from __future__ import annotations

from typing import Callable

from soljax.engine.observe import Controller
from soljax.errors import SoljaxError

CONTROLLERS: dict[str, Callable[..., Controller]] = {}


def register_controller(name: str):
    """Class decorator: registers a controller class under ``name``."""

    def wrap(cls):
        if name in CONTROLLERS:
            raise SoljaxError(f"controller {name!r} is already registered")
        CONTROLLERS[name] = cls
        return cls

    return wrap


def make_controller(name: str, **kwargs) -> Controller:
    """Builds a registered controller by name."""
    if name not in CONTROLLERS:
        raise SoljaxError(f"unknown controller {name!r} (known: {', '.join(sorted(CONTROLLERS))})")
    controller = CONTROLLERS[name](**kwargs)
    if not isinstance(controller, Controller):
        raise SoljaxError(f"controller {name!r} does not implement the Controller protocol")
    return controller
