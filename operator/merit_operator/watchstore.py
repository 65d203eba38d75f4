"""Watch-fed stores of our children (client-go's informer store, for plain dicts).

A store follows one path (list, then watch from the list's resourceVersion) with the
server-side filter `labelSelector=<run label>` (only our children carry it), and keeps every
object it saw, by namespace and run. A round reads its run's Jobs and pods from here instead
of a LIST per round. A 410 Gone (history compacted) or a broken stream relists after a short
pause, and the relisted objects replace the store whole, so a round never reads a half-built
one; before the first list a store answers None and the round lists for itself.

A store may lag the API server by a watch event: an object created a moment ago may be
missing (a round then decides to create its Job again: the same name, a 409, adopted), one
deleted a moment ago may still show (the next round sees it gone). Both are the stale reads
every level-based controller is built for. Each store runs in its own daemon thread
(blocking HTTP).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from meritrun.errors import MeritRunError

from .kubeapi import ApiError, KubeApi
from .manifests import LABEL_RUN

log = logging.getLogger(__name__)
WATCH_TIMEOUT_SECONDS = 300
RELIST_PAUSE_SECONDS = 1.0
Where = tuple[str, str]  # (namespace, run)


def watch_paths(group_version: str, plural: str, namespaces: tuple[str, ...]) -> list[str]:
    """One watch per served namespace (a namespaced install needs no cluster-wide rights),
    or one cluster-wide."""
    base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    if not namespaces:
        return [f"{base}/{plural}"]
    return [f"{base}/namespaces/{ns}/{plural}" for ns in namespaces]


def run_of(obj: dict[str, Any]) -> Where | None:
    meta = obj.get("metadata") or {}
    run = (meta.get("labels") or {}).get(LABEL_RUN)
    return (meta.get("namespace") or "", run) if run and meta.get("namespace") else None


def name_of(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("name") or ""


def _version(obj: dict[str, Any]) -> int | None:
    """An object's resourceVersion as a number (etcd's revision), None if it is not one."""
    version = (obj.get("metadata") or {}).get("resourceVersion") or ""
    return int(version) if version.isdigit() else None


class WatchStore:
    """Follow one path's objects until stopped and keep them; subclasses react to changes
    (`changed`, `relisted`)."""

    def __init__(self, api: KubeApi, path: str, *,
                 timeout_seconds: int = WATCH_TIMEOUT_SECONDS) -> None:
        self.api, self.path, self.timeout_seconds = api, path, timeout_seconds
        self.events = 0  # watch events received (the tests check the filter with it)
        self._store: dict[Where, dict[str, dict[str, Any]]] = {}  # -> {name: object}
        self._lock = threading.Lock()
        self.synced = threading.Event()  # the first list is in the store
        self._version = 0  # the newest resourceVersion the list or the stream brought
        self._ours: dict[tuple[Where, str], dict[str, Any]] = {}  # `remember`ed, not streamed

    def objects(self, namespace: str, run: str) -> list[dict[str, Any]] | None:
        """The run's objects as last seen (None before the first list)."""
        if not self.synced.is_set():
            return None
        with self._lock:
            return list((self._store.get((namespace, run)) or {}).values())

    def remember(self, obj: dict[str, Any]) -> None:
        """An object we just wrote (the API server's answer), in the store before its watch
        event: a round after the write must see it (controller-runtime's expectations serve
        the same end). Skipped when the stream has passed its version already: the store
        then holds it, or its deletion, and that is newer. Its event replaces it."""
        where, version = run_of(obj), _version(obj)
        if where is None or version is None:
            return
        with self._lock:
            if version <= self._version:
                return
            objects = self._store.setdefault(where, {})
            if (_version(objects.get(name_of(obj)) or {}) or 0) < version:
                objects[name_of(obj)] = obj
            self._ours[(where, name_of(obj))] = obj

    def changed(self, obj: dict[str, Any], where: Where, *, deleted: bool) -> None:
        """One object changed (in the store already)."""

    def relisted(self, objects: list[dict[str, Any]]) -> None:
        """The store was replaced by a fresh list."""

    def _list(self) -> str:
        listed = self.api.request("GET", self.path, query={"labelSelector": LABEL_RUN})
        fresh: dict[Where, dict[str, dict[str, Any]]] = {}
        items = [obj for obj in listed.get("items") or [] if run_of(obj) is not None]
        for obj in items:
            fresh.setdefault(run_of(obj), {})[name_of(obj)] = obj  # type: ignore[arg-type]
        version = (listed.get("metadata") or {}).get("resourceVersion") or ""
        with self._lock:
            self._version = int(version) if version.isdigit() else self._version
            self._passed()
            for (where, name), obj in self._ours.items():  # written after the list's version
                fresh.setdefault(where, {}).setdefault(name, obj)
            self._store = fresh
        self.synced.set()
        self.relisted(items)
        return version

    def _notify(self, obj: dict[str, Any], *, deleted: bool) -> None:
        """One watch event: into the store, then `changed`."""
        where = run_of(obj)
        if where is None:
            return
        with self._lock:
            self._version = max(self._version, _version(obj) or 0)
            self._passed()
            objects = self._store.setdefault(where, {})
            if deleted:
                objects.pop(name_of(obj), None)
                if not objects:
                    self._store.pop(where, None)
            else:
                objects[name_of(obj)] = obj
        self.changed(obj, where, deleted=deleted)

    def _passed(self) -> None:
        """Forget remembered objects the list or stream has reached (under the lock)."""
        if self._ours:
            self._ours = {k: o for k, o in self._ours.items()
                          if (_version(o) or 0) > self._version}

    def _follow(self, version: str, stop: threading.Event) -> str | None:
        """Watch from version; the last version seen, or None when the server says 410."""
        query = {"labelSelector": LABEL_RUN, "resourceVersion": version,
                 "allowWatchBookmarks": "true"}
        for event in self.api.watch(self.path, query=query,
                                    timeout_seconds=self.timeout_seconds):
            obj = event.get("object") or {}
            if event.get("type") == "ERROR":
                if obj.get("code") == 410:
                    return None
                raise ApiError(int(obj.get("code") or 500), obj.get("reason") or "",
                               obj.get("message") or "")
            version = (obj.get("metadata") or {}).get("resourceVersion") or version
            if event.get("type") != "BOOKMARK":
                self.events += 1
                self._notify(obj, deleted=event.get("type") == "DELETED")
            if stop.is_set():
                break
        return version

    def run(self, stop: threading.Event) -> None:
        version: str | None = None
        while not stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._follow(version, stop)
                continue
            except MeritRunError as e:  # ApiError, TransientError: relist after a pause
                log.warning("watch %s: %s; relisting", self.path, str(e)[:300])
                version = None
            stop.wait(RELIST_PAUSE_SECONDS)

    def start(self, stop: threading.Event) -> WatchStore:
        """Follow in a daemon thread until stop is set (or the process ends)."""
        threading.Thread(target=self.run, args=(stop,), name=f"watch {self.path}",
                         daemon=True).start()
        return self


class Stores:
    """One kind's stores for every served namespace (one per namespace, or one)."""

    def __init__(self, stores: list[WatchStore], namespaces: tuple[str, ...]) -> None:
        self.stores = stores
        self._by_namespace = dict(zip(namespaces, stores, strict=True)) if namespaces else {}

    def store_for(self, namespace: str) -> WatchStore | None:
        if self._by_namespace:
            return self._by_namespace.get(namespace)
        return self.stores[0] if self.stores else None

    def objects(self, namespace: str, run: str) -> list[dict[str, Any]] | None:
        """The run's objects, or None when no synced store covers the namespace."""
        store = self.store_for(namespace)
        return store.objects(namespace, run) if store is not None else None

    def remember(self, obj: dict[str, Any]) -> None:
        """An object we just wrote, before its watch event (`WatchStore.remember`)."""
        store = self.store_for((obj.get("metadata") or {}).get("namespace") or "")
        if store is not None:
            store.remember(obj)
