"""Lab handles for the integration tests: a fresh lab per test, always torn down."""

from __future__ import annotations

import secrets
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from overlay.lab import LAB_ROOT, Lab, teardown, wait_until

T = TypeVar("T")
_NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def unique_lab_name(letter: str) -> str:
    """A lab name no other run uses: `letter` (which test file made it) + 3 random characters."""
    return letter + "".join(secrets.choice(_NAME_CHARACTERS) for _ in range(3))


@contextmanager
def fresh_lab(letter: str) -> Iterator[Lab]:
    """A new, empty lab handle; everything the lab made is removed afterwards, also on failure."""
    # A name no lab has now (another run's lab must never be taken down by this one's teardown;
    # Lab.up itself refuses a name taken meanwhile, under its lock).
    name = next(candidate for candidate in (unique_lab_name(letter) for _ in range(100))
                if not Lab(candidate).leftovers() and not (LAB_ROOT / candidate).exists())
    try:
        with Lab(name) as handle:
            yield handle
    finally:
        teardown(name)


def wait_for(predicate: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll until predicate() is truthy (returned), or fail naming `what` after `timeout` s."""
    return wait_until(predicate, time.monotonic() + timeout, what)
