"""fsspec at every edge: URLs in, URLs out, credentials kept out of everything we record."""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec

_SECRET_KEY = re.compile(r"(secret|token|password|passwd|credential|signature|session|private|^key$|access_key)", re.I)


@dataclass
class Storage:
    """One fsspec filesystem for a URL root, with the options it needs (endpoint, anon, credentials ...)."""

    root: str
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        self.fs, self.base = fsspec.core.url_to_fs(self.root, **self.options)
        self.base = self.base.rstrip("/")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts) if parts else self.base

    def url(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def write_bytes(self, key: str, data: bytes) -> str:
        """Writes ``data`` at ``key`` under the root, atomically where the filesystem allows (rename on local
        disks; a single PUT on object stores). Returns the URL written."""
        path = self.path(key)
        parent = posixpath.dirname(path)
        if _is_local(self.fs):
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{hashlib.sha1(data[:4096]).hexdigest()[:8]}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)
        return self.fs.unstrip_protocol(path)

    def write_json(self, key: str, obj) -> str:
        return self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, key: str):
        return json.loads(self.fs.cat_file(self.path(key)))

    def remove(self, key: str) -> None:
        path = self.path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def open_url(url: str, options: dict):
    """(filesystem, path) for one URL; for inputs that are not under a Storage root (manifest rows)."""
    return fsspec.core.url_to_fs(url, **options)


def storage_options(endpoint: str | None = None, anonymous: bool = False, extra: dict | None = None) -> dict:
    """fsspec options from the CLI: an S3-compatible endpoint, anonymous access, and raw key=value options."""
    opts: dict = dict(extra or {})
    if endpoint:
        opts.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
    if anonymous:
        opts["anon"] = True
    return opts


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


def redact_url(url: str) -> str:
    """Drops user:password from a URL and the values of credential-like query parameters (signed URLs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
    query = urlencode([(k, "REDACTED" if _SECRET_KEY.search(k) else v) for k, v in parse_qsl(parts.query, True)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(obj):
    """Recursively replaces credential-like values in config dicts/lists/URLs with 'REDACTED'."""
    if isinstance(obj, dict):
        return {k: ("REDACTED" if _SECRET_KEY.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and "://" in obj:
        return redact_url(obj)
    return obj
