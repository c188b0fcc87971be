"""Small, dependency-free utilities shared by every script (EasyDict, logging, URLs, option parsing)."""

from .util import EasyDict  # noqa: F401
