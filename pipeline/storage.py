"""fsspec at every edge: URLs in, URLs out, credentials kept out of everything we record."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
import re
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

import fsspec
from fsspec.asyn import sync

DEFAULT_RETRIES = 10  # retries per S3 request after the first try (botocore's adaptive mode)
WRITE_ATTEMPTS = 3  # Storage.write_bytes calls in all, each with the client's own retries inside
S3_PROTOCOLS = ("s3", "s3a")

_SECRET_KEY = re.compile(
    r"(secret|token|password|passwd|credential|signature|session|private|^key$|access_?key|^sig$)", re.I)
# What a write in progress is called on a local disk: a dot file beside its target (pyarrow's and Spark's dataset
# discovery skip names that start with "." or "_", so one left by a crash does not break readers).
TEMP = re.compile(r"^\.(?P<target>.+)\.tmp-[0-9a-f]{8}$")


@dataclass
class Storage:
    """One fsspec filesystem for a URL root, with the options it needs (endpoint, anon, credentials ...)."""

    root: str
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        self.fs, self.base = fsspec.core.url_to_fs(self.root, **fs_options(self.root, self.options))
        self.base = self.base.rstrip("/")

    @property
    def protocol(self) -> str:
        return self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]

    @property
    def is_local(self) -> bool:
        return _is_local(self.fs)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts) if parts else self.base

    def url(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def write_bytes(self, key: str, data: bytes) -> str:
        """Writes ``data`` at ``key`` under the root, atomically where the filesystem allows (rename on local
        disks; a single PUT on object stores), retrying transient failures (``errors.retry``: the client's own
        retries have already run inside each call). Returns the URL written."""
        from .errors import retry  # errors imports this module

        path = self.path(key)
        url = self.fs.unstrip_protocol(path)

        def write():
            if _is_local(self.fs):
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                folder, name = posixpath.split(path)
                tmp = posixpath.join(folder, f".{name}.tmp-{hashlib.sha1(data[:4096]).hexdigest()[:8]}")
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
            else:
                self.fs.pipe_file(path, data)

        retry(write, attempts=WRITE_ATTEMPTS, base=0.5, what=f"write {url}")
        return url

    def write_json(self, key: str, obj) -> str:
        return self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, key: str):
        return json.loads(self.fs.cat_file(self.path(key)))

    def remove(self, key: str) -> None:
        """Deletes the file at ``key``, if there is one, and that key only (never ``fs.rm``: s3fs expands each
        path as a glob, so a key with ``[1]`` or ``*`` in it would delete other keys, another output's, and keep
        its own). A delete that fails raises (S3's DeleteObject does; a bulk delete would not say)."""
        self._remove_path(self.path(key))

    def _remove_path(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def delete(self, paths: list[str]) -> None:
        """Deletes exactly these files (full paths, as ``remove`` does one); missing ones are fine. On S3 the keys
        go 1,000 a request (DeleteObjects), requests in parallel; s3fs does not report the keys it failed to
        delete, so callers must cope with some left (the next run's ``remove_orphans`` does)."""
        bulk = getattr(self.fs, "_bulk_delete", None)  # s3fs: DeleteObjects on exact keys, no expansion
        if bulk is None:
            for path in paths:
                self._remove_path(path)
            return

        async def delete_all():
            limit = asyncio.Semaphore(8)

            async def one(batch):
                async with limit:
                    await bulk(batch)

            await asyncio.gather(*(one(paths[i:i + 1000]) for i in range(0, len(paths), 1000)))

        if paths:
            sync(self.fs.loop, delete_all)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def open_url(url: str, options: dict):
    """(filesystem, path) for one URL; for inputs that are not under a Storage root (manifest rows)."""
    return fsspec.core.url_to_fs(url, **fs_options(url, options))


def storage_options(endpoint: str | None = None, anonymous: bool = False, extra: dict | None = None,
                    retries: int = DEFAULT_RETRIES) -> dict:
    """fsspec options from the CLI: an S3-compatible endpoint, anonymous access, raw key=value options, and
    ``retries`` per S3 request after its first try, in botocore's adaptive mode (client-side rate limiting
    when S3 throttles); a retry config in ``extra["config_kwargs"]`` is kept."""
    opts: dict = dict(extra or {})
    if endpoint:
        opts.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
    if anonymous:
        opts["anon"] = True
    return _with_retries(opts, retries)


@dataclass(frozen=True)
class URLOptions:
    """``fs_options`` of each URL, as a function: what scosparc_core's checkpoint readers take as storage
    options, so that a checkpoint on https:// or the local disk does not get the object store's."""

    options: dict

    def __call__(self, url: str) -> dict:
        return fs_options(url, self.options)


def fs_options(url: str, options: dict | None) -> dict:
    """The options for ``url``'s filesystem. S3 URLs get botocore's adaptive retry mode with DEFAULT_RETRIES
    retries unless the options set ``config_kwargs["retries"]`` themselves; other filesystems do not get
    ``config_kwargs`` (botocore's Config: it means nothing to them), and HTTP(S) URLs get none of them (aiohttp
    rejects the object store's keys, endpoint and credentials)."""
    opts = dict(options or {})
    if "::" in url:  # a chained URL: options belong to its layers, leave them as given
        return opts
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol in S3_PROTOCOLS:
        return _with_retries(opts, DEFAULT_RETRIES)
    if protocol in ("http", "https"):
        return {}  # the job's options are for its object store; an HTTP(S) URL (a signed one) carries its own
    opts.pop("config_kwargs", None)
    return opts


def _with_retries(opts: dict, retries: int) -> dict:
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("retries", {"mode": "adaptive", "max_attempts": int(retries)})
    return {**opts, "config_kwargs": config}


_SAFE = re.compile(r"[^A-Za-z0-9._ \-()\[\]+,=@~]")


def safe_component(name: str) -> str:
    """A user-supplied name (group, file stem) -> one safe path component: no separators, no '..', no control
    characters; non-ASCII letters are kept in NFC form. A name that had to change gets a short hash so that
    two different names never collide."""
    clean = unicodedata.normalize("NFC", name)
    clean = "".join(ch if ch.isprintable() and (ch.isalnum() or not _SAFE.match(ch)) else "_" for ch in clean)
    clean = clean.strip(" .") or "_"
    clean = clean.replace("..", "_.")
    if clean != name:
        clean = f"{clean[:80]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return clean


def canonical_location(url: str | None) -> str | None:
    """One spelling per input location, for comparing a run's settings: a local path absolute and normalised
    (``file://`` dropped), a URL without its trailing "/". ``out/in/`` and ``out/in`` are one input."""
    if not url:
        return url
    if "://" not in url or url.startswith("file://"):
        return os.path.abspath(os.path.expanduser(url.removeprefix("file://")))
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{rest.rstrip('/')}" if rest.rstrip("/") else url


def redact_url(url: str) -> str:
    """A URL for people (messages, logs, settings): user:password dropped, and the values of credential-like
    query parameters (signed URLs) replaced, on any scheme (a key with a ``?`` that only looks like a query may
    lose a part, which a message can afford); everything else byte for byte."""
    url = _URL_USERINFO.sub(r"\1", url, count=1)
    rest, f, fragment = url.partition("#")
    base, q, query = rest.partition("?")
    if not q:
        return url
    params = [p.split("=", 1) for p in query.split("&")]
    query = "&".join(f"{p[0]}=REDACTED" if len(p) == 2 and _SECRET_KEY.search(unquote_plus(p[0])) else "=".join(p)
                     for p in params)
    return f"{base}?{query}{f}{fragment}"


def recorded_url(url: str) -> str:
    """A URL as the rows record it, to be joined back to its object: for s3://, file://, other fsspec URLs and
    plain paths ``?`` and ``#`` belong to the key, so only user:password goes; an HTTP(S) URL (a signed one) has a
    query, whose credential values go as in ``redact_url``."""
    return redact_url(url) if re.match(r"https?://", url, re.I) else _URL_USERINFO.sub(r"\1", url, count=1)


_URL_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#@]*@")
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_USERINFO = re.compile(r"://[^/\s@'\"<>]*@")
_PARAM_IN_TEXT = re.compile(r"(?P<name>[A-Za-z][\w.\-]*)=(?P<value>[^&\s'\"<>,;]+)")


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) with every URL passed through ``redact_url`` and any
    credential-like ``name=value`` left outside URLs (a signed URL split at a space, s3fs's protocol-less
    paths) given the value REDACTED."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(_USERINFO.sub("://", m.group(0))), str(text))
    return _PARAM_IN_TEXT.sub(
        lambda m: f"{m['name']}=REDACTED" if _SECRET_KEY.search(m["name"].split(".")[-1]) else m.group(0), text)


def redact(obj):
    """Recursively replaces credential-like values in config dicts/lists/URLs/texts with 'REDACTED'."""
    if isinstance(obj, dict):
        return {k: ("REDACTED" if _SECRET_KEY.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and "://" in obj:
        return redact_url(obj) if _URL_IN_TEXT.fullmatch(obj) else redact_text(obj)
    return obj
