"""Command-line pieces the three jobs share: KEY=VALUE options, the storage flags, --extensions' values, the help
format."""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.listing import normal_extensions  # noqa: E402
from pipeline.storage import DEFAULT_RETRIES, redact_text, storage_options  # noqa: E402


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows the defaults there are to show (not for flags, nor options that default to nothing) and keeps the
    description's layout."""

    def _get_help_string(self, action):
        if action.default is None or action.default == () or isinstance(action.default, (bool, list, dict)):
            return action.help
        return super()._get_help_string(action)


def key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value); the value is read as JSON when it is JSON (numbers, true, {...}): an
    architecture's numbers (embed_dim=96)."""
    key, value = _split(text)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


STORAGE_WORDS = {"true": True, "false": False, "null": None}


def storage_key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value) for fsspec: the value as written, except ``true``/``false``/``null`` (flags
    such as anon=true: s3fs takes any string as true), numbers that read back as written (max_concurrency=4,
    default_block_size=5242880) and JSON objects or arrays (client_kwargs={...}). Anything a number would
    change stays text (key=1e5, secret=007)."""
    key, value = _split(text)
    if value in STORAGE_WORDS:
        return key, STORAGE_WORDS[value]
    try:
        number = json.loads(value)
    except json.JSONDecodeError:
        number = None
    if isinstance(number, (int, float)) and not isinstance(number, bool) and json.dumps(number) == value:
        return key, number
    if value.startswith(("{", "[")):
        try:
            return key, json.loads(value)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{key}: a value in braces or brackets must be JSON ({exc})") from None
    return key, value


def refused(exc: Exception) -> int:
    """A job's exception: one found before any work (``before_work``: the settings, input, weights, storage or
    cluster do not allow the job) prints one line, ``error: <why>``, and gives exit code 2; any other is raised
    again, its traceback the report."""
    if not getattr(exc, "before_work", False):
        raise exc
    print(f"error: {redact_text(str(exc))}", file=sys.stderr, flush=True)
    return 2


def extension_list(text: str) -> tuple[str, ...]:
    """--extensions' value (inference and training): "jpg,PNG" -> ("jpg", "png"); one that names none is
    refused."""
    try:
        return normal_extensions(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _split(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


class KeyValues(argparse.Action):
    """``--flag K=V [K=V ...]``, the flag repeatable: every pair lands in one dict, later pairs winning."""

    def __call__(self, parser, namespace, values, option_string=None):
        merged = dict(getattr(namespace, self.dest, None) or {})
        merged.update(values)
        setattr(namespace, self.dest, merged)


def add_storage_args(ap: argparse.ArgumentParser) -> None:
    store = ap.add_argument_group("storage")
    store.add_argument("--endpoint", help="S3-compatible endpoint URL (MinIO, R2, a test server)")
    store.add_argument("--anonymous", action="store_true", help="unsigned requests (public buckets)")
    store.add_argument("--storage-option", type=storage_key_value, nargs="+", action=KeyValues, default={},
                       metavar="KEY=VALUE", help="fsspec options, e.g. key=... secret=... or profile=prod "
                                                 "(repeatable; never logged). Values are text except true, "
                                                 "false, null, numbers that read back as written (4, 0.5) and "
                                                 "JSON in {...} or [...]")
    store.add_argument("--s3-retries", type=int, default=DEFAULT_RETRIES,
                       help="retries per S3 request (botocore's adaptive mode: backs off when S3 throttles)")


def storage_from(a: argparse.Namespace) -> dict:
    return storage_options(a.endpoint, a.anonymous, dict(a.storage_option), retries=a.s3_retries)
