"""The model registry: published checkpoint versions, and which version each A/B arm serves.

Storage sits behind a filesystem URI (a plain local path, or any ``pyarrow.fs`` URI such as
``file:///srv/registry``, ``s3://bucket/prefix`` or ``gs://bucket/prefix``) and all I/O goes
through the ``pyarrow.fs`` API, so the same code runs on a laptop and on a cluster's object
store. Layout under the root::

    lineages/<lineage>/<version>/model.safetensors
                                 tokenizer.safetensors
                                 config.json
                                 metrics.json
                                 _COMPLETE          written last: sha256 + size of every file
    arms/<arm>.json                                  current version + promote/rollback history

A version is visible iff its ``_COMPLETE`` marker exists. On a local filesystem a version is
written into a hidden staging directory and renamed into place, so readers never see a partial
version; on object stores (no atomic directory rename) the files go straight into the final
directory and ``_COMPLETE`` is written last. ``fetch`` re-hashes every file against the marker,
so a torn or corrupted upload is never loaded. Arm records are replaced whole (temp file, then
``move``): concurrent writers never corrupt one, and the last writer wins.

Checkpoints are validated with ``recloop.checkpoint.load_checkpoint`` before publishing, so
non-finite or mismatched weights never enter the registry. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from recloop.config import StackConfig

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
METRICS_FILE = "metrics.json"
COMPLETE_MARKER = "_COMPLETE"
_RESERVED = {METRICS_FILE, COMPLETE_MARKER}
_CHUNK = 1 << 20


class RegistryError(ValueError):
    """A registry operation that was refused; the message says what went wrong and how to fix it."""


def _now() -> str:
    """UTC time, ISO 8601 with microseconds, so timestamps sort as strings in time order."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def default_version() -> str:
    """A fresh version name: ``v<UTC %Y%m%d-%H%M%S>-<4 hex>``; sorts in publish-time order."""
    return f"v{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid lineage/version/arm name, else raise RegistryError.

    Names become path components on every backend, so they are restricted to lowercase
    letters, digits, ``.``, ``_`` and ``-``, start with a letter or digit, and are at most
    64 characters (which also rules out ``..``, hidden names and separators).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(
            f"invalid {kind} name {name!r}: use 1-64 characters of lowercase letters, digits, "
            f"'.', '_' or '-', starting with a letter or digit (pattern {NAME_PATTERN})"
        )
    return name


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Split a registry URI into (filesystem, root path); a string without ``://`` is local."""
    if not isinstance(uri, str) or not uri.strip():
        raise RegistryError(
            f"registry URI must be a non-empty string (a local path or a pyarrow.fs URI such "
            f"as file:///srv/registry or s3://bucket/prefix), got {uri!r}"
        )
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError depending on the scheme
        raise RegistryError(
            f"cannot open registry URI {uri!r}: {exc}. Use a local path or a URI that "
            f"pyarrow.fs.FileSystem.from_uri understands (file://, s3://, gs://, hdfs://)"
        ) from exc
    return fs, root


class ModelRegistry:
    """Versions of checkpoints per lineage, and the version each A/B arm currently serves.

    ``uri`` is a local path or a ``pyarrow.fs`` URI. ``filesystem`` (optional) supplies the
    filesystem directly, ``uri`` then being the root path inside it; it exists so tests and
    callers with a pre-configured filesystem (credentials, endpoints) can use it as is.
    """

    def __init__(self, uri: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        if isinstance(uri, os.PathLike):
            uri = os.fspath(uri)
        self.uri = uri
        if filesystem is None:
            self._fs, root = _resolve(uri)
        else:
            self._fs, root = filesystem, str(uri)
        self._root = root.rstrip("/") or ("/" if root.startswith("/") else "")
        # Only the local filesystem gives us an atomic directory rename; everything else
        # (object stores, wrappers) uses the "_COMPLETE written last" protocol.
        self._local = isinstance(self._fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"ModelRegistry({self.uri!r})"

    # ------------------------------------------------------------------ low-level helpers
    def _path(self, *parts: str) -> str:
        """The backend path of ``parts`` under the registry root."""
        if self._root in ("", "/"):
            return self._root + "/".join(parts)
        return "/".join([self._root, *parts])

    def _exists(self, path: str) -> bool:
        return self._fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read_bytes(self, path: str) -> bytes:
        with self._fs.open_input_stream(path, compression=None) as f:
            return f.read()

    def _read_json(self, path: str) -> Any:
        return json.loads(self._read_bytes(path).decode("utf-8"))

    def _write_bytes(self, path: str, data: bytes) -> None:
        with self._fs.open_output_stream(path, compression=None) as f:
            f.write(data)

    def _write_json_atomic(self, path: str, obj: Any) -> None:
        """Write JSON to a unique temp name beside ``path``, then move it over ``path``."""
        parent, name = path.rsplit("/", 1)
        tmp = f"{parent}/.{name}.{secrets.token_hex(8)}.tmp"
        data = _dumps(obj)
        try:
            self._write_bytes(tmp, data)
            self._fs.move(tmp, path)
        except BaseException:
            try:
                self._fs.delete_file(tmp)
            except OSError:
                pass
            raise

    def _list(self, path: str) -> list[pafs.FileInfo]:
        return self._fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))

    # ------------------------------------------------------------------ versions
    def _version_dir(self, lineage: str, version: str) -> str:
        return self._path("lineages", lineage, version)

    def _manifest(self, lineage: str, version: str) -> dict:
        """The version's ``_COMPLETE`` record; RegistryError if missing, incomplete or bad."""
        check_name("lineage", lineage)
        check_name("version", version)
        vdir = self._version_dir(lineage, version)
        try:
            manifest = self._read_json(f"{vdir}/{COMPLETE_MARKER}")
        except FileNotFoundError:
            if self._exists(vdir):
                raise RegistryError(
                    f"version {lineage}/{version} in {self.uri} is incomplete (no "
                    f"{COMPLETE_MARKER}; a publish is in progress or crashed). Wait for it, or "
                    f"delete {vdir} and publish again"
                ) from None
            known = self.versions(lineage)
            raise RegistryError(
                f"no version {version!r} in lineage {lineage!r} of {self.uri}; "
                f"known versions: {known or 'none (publish one first)'}"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(
                f"{vdir}/{COMPLETE_MARKER} is not valid JSON ({exc}); the version is damaged: "
                f"delete it and publish again"
            ) from exc
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if (
            not isinstance(files, dict)
            or not files
            or any(not isinstance(n, str) or "/" in n or n.startswith(".") for n in files)
        ):
            raise RegistryError(
                f"{vdir}/{COMPLETE_MARKER} has no valid 'files' table; the version is damaged: "
                f"delete it and publish again"
            )
        return manifest

    def publish(
        self,
        lineage: str,
        checkpoint_dir: str | os.PathLike[str],
        version: str | None = None,
        metrics: dict | None = None,
    ) -> str:
        """Publish the local checkpoint directory as a new version of ``lineage``; return it.

        The checkpoint is loaded first (``load_checkpoint``), so weights that would be refused
        at serving time are refused here. Every top-level file is copied, ``metrics.json`` is
        written, and ``_COMPLETE`` (sha256 + size per file) is written last. Version names are
        write-once: publishing an existing name is refused.
        """
        check_name("lineage", lineage)
        version = check_name("version", version) if version is not None else default_version()
        src = Path(checkpoint_dir)
        if not src.is_dir():
            raise RegistryError(
                f"checkpoint directory {src} does not exist or is not a directory; pass the "
                f"directory written by recloop.checkpoint.save_checkpoint"
            )
        from recloop.checkpoint import FILES, FORMAT, CheckpointError, checkpoint_format

        try:
            fmt = checkpoint_format(src)
        except CheckpointError as exc:
            raise RegistryError(f"refusing to publish {src}: {exc}") from exc
        required = FILES.get(fmt, FILES[FORMAT])  # an unknown format fails validation below
        missing = [f for f in required if not (src / f).is_file()]
        if missing:
            raise RegistryError(
                f"{src} is not a complete checkpoint: missing {', '.join(missing)}; write it "
                f"with recloop.checkpoint.save_checkpoint"
            )
        files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
        clash = [p.name for p in files if p.name in _RESERVED]
        if clash:
            raise RegistryError(
                f"{src} contains {', '.join(clash)}, which the registry writes itself; remove "
                f"it and pass metrics via publish(metrics=...)"
            )
        if metrics is not None and not isinstance(metrics, dict):
            raise RegistryError(f"metrics must be a dict, got {type(metrics).__name__}")
        try:
            metrics_bytes = _dumps(metrics or {})
        except (TypeError, ValueError) as exc:
            raise RegistryError(
                f"metrics must be JSON-serialisable with finite numbers (no NaN/inf): {exc}"
            ) from exc

        final = self._version_dir(lineage, version)
        if self._exists(final):
            if not self._exists(f"{final}/{COMPLETE_MARKER}"):
                raise RegistryError(
                    f"version {lineage}/{version} exists in {self.uri} but is incomplete (a "
                    f"publish in progress, or one that crashed); pick another name, or delete "
                    f"{final} if no publish is running"
                )
            raise RegistryError(
                f"version {lineage}/{version} already exists in {self.uri}; versions are "
                f"write-once: pick another name (or omit version= for a fresh one)"
            )

        from recloop.checkpoint import validate_checkpoint  # torch: only publish needs it

        try:
            validate_checkpoint(src)
        except (ValueError, KeyError) as exc:  # CheckpointError, or a malformed tokenizer/config
            raise RegistryError(f"refusing to publish {src} as {lineage}/{version}: {exc}") from exc

        lineage_dir = self._path("lineages", lineage)
        self._fs.create_dir(lineage_dir, recursive=True)
        target = (
            f"{lineage_dir}/.staging-{version}-{secrets.token_hex(4)}" if self._local else final
        )
        self._fs.create_dir(target, recursive=True)
        try:
            table: dict[str, dict[str, Any]] = {}
            for p in files:
                table[p.name] = self._upload(p, f"{target}/{p.name}")
            self._write_bytes(f"{target}/{METRICS_FILE}", metrics_bytes)
            table[METRICS_FILE] = {
                "sha256": hashlib.sha256(metrics_bytes).hexdigest(),
                "size": len(metrics_bytes),
            }
            manifest = {
                "version": version,
                "lineage": lineage,
                "published_at": _now(),
                "files": table,
            }
            self._write_bytes(f"{target}/{COMPLETE_MARKER}", _dumps(manifest))
            if self._local:
                if self._exists(final):  # lost a race for the same name
                    raise RegistryError(
                        f"version {lineage}/{version} was published concurrently; pick another name"
                    )
                self._fs.move(target, final)  # atomic rename: all or nothing is visible
        except BaseException:
            if self._local:
                try:
                    self._fs.delete_dir(target)
                except OSError:
                    pass
            raise
        return version

    def _upload(self, src: Path, dest: str) -> dict[str, Any]:
        """Copy a local file to ``dest`` in chunks; return its sha256 and size."""
        h, size = hashlib.sha256(), 0
        with open(src, "rb") as fin, self._fs.open_output_stream(dest, compression=None) as out:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
        return {"sha256": h.hexdigest(), "size": size}

    def versions(self, lineage: str) -> list[str]:
        """Complete versions of ``lineage``, oldest first (by ``published_at``, then name).

        Hidden entries (staging directories) and versions without ``_COMPLETE`` are skipped;
        an unknown lineage has no versions.
        """
        check_name("lineage", lineage)
        found: list[tuple[str, str]] = []
        for info in self._list(self._path("lineages", lineage)):
            if info.type != pafs.FileType.Directory or info.base_name.startswith("."):
                continue
            if not _NAME_RE.match(info.base_name):
                continue
            try:
                manifest = self._read_json(f"{info.path}/{COMPLETE_MARKER}")
            except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            published = manifest.get("published_at", "") if isinstance(manifest, dict) else ""
            found.append((str(published), info.base_name))
        return [name for _, name in sorted(found)]

    def lineages(self) -> list[str]:
        """Names of all lineages that have a directory in the registry (sorted)."""
        return sorted(
            i.base_name
            for i in self._list(self._path("lineages"))
            if i.type == pafs.FileType.Directory and _NAME_RE.match(i.base_name)
        )

    def metrics(self, lineage: str, version: str) -> dict:
        """The metrics recorded when ``lineage/version`` was published."""
        self._manifest(lineage, version)
        return self._read_json(f"{self._version_dir(lineage, version)}/{METRICS_FILE}")

    def config(self, lineage: str, version: str) -> dict:
        """The published checkpoint's ``config.json`` (its format, kind and metadata),
        read without fetching its weights."""
        self._manifest(lineage, version)
        return self._read_json(f"{self._version_dir(lineage, version)}/config.json")

    def manifest(self, lineage: str, version: str) -> dict:
        """The ``_COMPLETE`` record of a version (published_at, per-file sha256 and size)."""
        return self._manifest(lineage, version)

    def fetch(
        self,
        lineage: str,
        version: str,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Path:
        """A local directory holding ``lineage/version``, every file verified against
        ``_COMPLETE`` (sha256 and size); pass it to ``load_checkpoint``.

        On a local filesystem this is the version directory itself. Otherwise the files are
        downloaded into ``cache_dir/<lineage>/<version>`` (default: a fresh temp directory),
        through a hidden temp directory that is renamed into place once verified; an already
        cached copy is re-verified and reused.
        """
        manifest = self._manifest(lineage, version)
        vdir = self._version_dir(lineage, version)
        files: dict[str, dict[str, Any]] = manifest["files"]
        if self._local:
            for name, want in files.items():
                self._verify(lineage, version, name, self._hash_remote(f"{vdir}/{name}"), want)
            return Path(vdir)

        base = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp("-registry"))
        dest = base / lineage / version
        if dest.is_dir():
            try:
                for name, want in files.items():
                    self._verify(lineage, version, name, _hash_local(dest / name), want)
                return dest
            except (RegistryError, FileNotFoundError):
                shutil.rmtree(dest, ignore_errors=True)  # stale or damaged cache: refetch
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent))
        try:
            for name, want in files.items():
                got = self._download(f"{vdir}/{name}", tmp / name)
                self._verify(lineage, version, name, got, want)
            (tmp / COMPLETE_MARKER).write_bytes(_dumps(manifest))
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():  # anything but "a concurrent fetch won the race"
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def _hash_remote(self, path: str) -> dict[str, Any] | None:
        h, size = hashlib.sha256(), 0
        try:
            with self._fs.open_input_stream(path, compression=None) as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            return None
        return {"sha256": h.hexdigest(), "size": size}

    def _download(self, path: str, dest: Path) -> dict[str, Any] | None:
        h, size = hashlib.sha256(), 0
        try:
            with self._fs.open_input_stream(path, compression=None) as f, open(dest, "wb") as out:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            return None
        return {"sha256": h.hexdigest(), "size": size}

    def _verify(self, lineage: str, version: str, name: str, got: dict | None, want: dict) -> None:
        if got is None:
            raise RegistryError(
                f"{lineage}/{version}: file {name} listed in {COMPLETE_MARKER} is missing from "
                f"{self.uri}; the version is damaged: delete it and publish again"
            )
        if got["size"] != want.get("size") or got["sha256"] != want.get("sha256"):
            raise RegistryError(
                f"{lineage}/{version}: {name} does not match {COMPLETE_MARKER} (size "
                f"{got['size']} vs {want.get('size')}, sha256 {got['sha256'][:12]}.. vs "
                f"{str(want.get('sha256'))[:12]}..); the stored file is corrupt: delete the "
                f"version and publish it again, and do not serve it"
            )

    # ------------------------------------------------------------------ arms
    def _arm_path(self, arm: str) -> str:
        return self._path("arms", f"{arm}.json")

    def _read_arm(self, arm: str) -> dict | None:
        check_name("arm", arm)
        try:
            record = self._read_json(self._arm_path(arm))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(
                f"{self._arm_path(arm)} is not valid JSON ({exc}); restore it or recreate "
                f"the arm with create_arm"
            ) from exc
        return record

    def _write_arm(self, record: dict) -> None:
        self._fs.create_dir(self._path("arms"), recursive=True)
        self._write_json_atomic(self._arm_path(record["arm"]), record)

    def create_arm(self, arm: str, lineage: str) -> dict:
        """Create arm ``arm`` serving versions of ``lineage`` (nothing current yet).

        Idempotent for the same lineage; an arm is never silently re-pointed to another
        lineage.
        """
        check_name("lineage", lineage)
        existing = self._read_arm(arm)
        if existing is not None:
            if existing.get("lineage") != lineage:
                raise RegistryError(
                    f"arm {arm!r} already exists with lineage {existing.get('lineage')!r}, not "
                    f"{lineage!r}; use another arm name or the existing lineage"
                )
            return existing
        record = {"arm": arm, "lineage": lineage, "current": None, "history": []}
        self._write_arm(record)
        return record

    def arm(self, arm: str) -> dict:
        """The record of ``arm``: lineage, current version and history."""
        record = self._read_arm(arm)
        if record is None:
            known = sorted(self.arms())
            raise RegistryError(
                f"unknown arm {arm!r} in {self.uri}; known arms: "
                f"{known or 'none'} (create it with create_arm(arm, lineage))"
            )
        return record

    def arms(self) -> dict[str, dict]:
        """All arm records, keyed by arm name."""
        out: dict[str, dict] = {}
        for info in self._list(self._path("arms")):
            name = info.base_name
            if (
                info.type != pafs.FileType.File
                or name.startswith(".")
                or not name.endswith(".json")
            ):
                continue
            arm = name[: -len(".json")]
            if not _NAME_RE.match(arm):
                continue
            record = self._read_arm(arm)
            if record is not None:
                out[arm] = record
        return out

    def current(self, arm: str) -> str | None:
        """The version ``arm`` serves now, or None if nothing was promoted yet."""
        return self.arm(arm)["current"]

    def history(self, arm: str) -> list[dict]:
        """Promote/rollback entries of ``arm``, oldest first."""
        return list(self.arm(arm)["history"])

    def served(self, arm: str) -> list[str]:
        """The versions ``arm`` has served that a rollback could return to, oldest first
        (the current one last)."""
        return _served_stack(self.arm(arm)["history"])

    def promote(self, arm: str, version: str) -> dict:
        """Make ``version`` (complete, in the arm's lineage) current for ``arm``.

        Promoting the version that is already current is a no-op (safe to retry). Returns
        the arm record.
        """
        record = self.arm(arm)
        self._manifest(record["lineage"], version)  # complete in this lineage, or refuse
        if record["current"] == version:
            return record
        record["history"].append(
            {"version": version, "action": "promote", "at": _now(), "previous": record["current"]}
        )
        record["current"] = version
        self._write_arm(record)
        return record

    def rollback(self, arm: str) -> dict:
        """Serve again the version that was current before the current one; return the record.

        History is replayed as a stack (promote pushes, rollback pops), so successive
        rollbacks walk further back through promotions (v1, v2, v3 -> v2 -> v1) instead of
        toggling between the last two versions; a rollback never re-serves the version it
        rolled away from.
        """
        record = self.arm(arm)
        stack = _served_stack(record["history"])
        if len(stack) < 2:
            raise RegistryError(
                f"arm {arm!r} has no earlier version to roll back to (current: "
                f"{record['current']!r}); promote a specific version instead"
            )
        target = stack[-2]
        self._manifest(record["lineage"], target)  # still complete and intact
        record["history"].append(
            {"version": target, "action": "rollback", "at": _now(), "previous": record["current"]}
        )
        record["current"] = target
        self._write_arm(record)
        return record


def open_registry(cfg: StackConfig) -> ModelRegistry:
    """The stack's registry (``cfg.registry_uri``)."""
    return ModelRegistry(cfg.registry_uri)


def reward_arm(arm: str) -> str:
    """The registry pseudo-arm (and lineage) of an arm's session reward model."""
    return f"{arm}.reward"


def _served_stack(history: list[dict]) -> list[str]:
    """Replay promote/rollback history into the stack of versions that can be rolled back to."""
    stack: list[str] = []
    for entry in history:
        if entry.get("action") == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != entry.get("version"):  # tolerate hand-edited history
                stack.append(entry["version"])
        else:
            prev = entry.get("previous")
            if not stack and prev is not None:
                stack.append(prev)
            stack.append(entry["version"])
    return stack


def _hash_local(path: Path) -> dict[str, Any]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "size": size}


def _dumps(obj: Any) -> bytes:
    """Strict JSON (no NaN/Infinity), stable key order, UTF-8."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
