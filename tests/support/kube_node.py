"""The "node" of the emulated cluster: runs each Job's container command as a local process.

Nothing runs Pods in kmock, so this plays kubelet and Job controller together: it waits for
the Job's ConfigMap volumes (materialized as temp folders; emptyDirs too), resolves the env
(values, secretKeyRef/configMapKeyRef, envFrom) from the emulated objects, replaces the
image's `python` with this interpreter and the mount paths with the temp folders, runs the
command, and writes what the controllers would: a Pod with the termination message (the log
tail, FallbackToLogsOnError) and the Job's status with Complete/Failed conditions. A deleted
Job's process is killed. Writes go over HTTP as user "node", so they are real API writes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kmock

from .kube_emulator import Emulator, now_rfc3339

JOBS = kmock.resource("batch", "v1", "jobs")
CONFIGMAPS = kmock.resource("", "v1", "configmaps")
SECRETS = kmock.resource("", "v1", "secrets")
MOUNT_WAIT_S = 30.0
FAIL_CODE = "import sys; print('MERITRUN_ERROR: injected failure', file=sys.stderr); sys.exit(1)"


@dataclass
class NodeOptions:
    fail: Callable[[str], bool] = lambda job_name: False  # inject a failure by Job name
    run_jobs: bool = True  # False: Jobs stay active and nothing runs (the scale bench)
    env: dict[str, str] = field(default_factory=dict)  # the node's own environment


class Node:
    def __init__(self, emulator: Emulator, *, url: str, token: str, workdir: Path,
                 options: NodeOptions) -> None:
        self.emulator, self.url, self.token = emulator, url, token
        self.workdir, self.options = workdir, options
        self.tasks: dict[tuple[str, str, str], asyncio.Task] = {}
        self.procs: dict[tuple[str, str, str], asyncio.subprocess.Process] = {}
        self.started: list[str] = []  # job names, in the order they ran
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        self._session = aiohttp.ClientSession(
            self.url, headers={"Authorization": f"Bearer {self.token}"})
        try:
            while True:
                self._scan()
                await asyncio.sleep(0.1)
        finally:
            await self._shutdown()

    def _scan(self) -> None:
        live = set()
        for (res, ns, name), obj in list(self.emulator.objects.items()):
            if res != JOBS or obj.deleted:
                continue
            job = obj.raw
            key = (ns, name, job["metadata"]["uid"])
            live.add(key)
            if key not in self.tasks and not job["spec"].get("suspend") and not job.get(
                    "status", {}).get("conditions"):
                self.tasks[key] = asyncio.create_task(self._run(key, job), name=f"node-{name}")
        for key, proc in list(self.procs.items()):
            if key not in live and proc.returncode is None:  # the Job was deleted
                _kill(proc)

    async def _shutdown(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                _kill(proc)
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for proc in self.procs.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 10)
        if self._session is not None:
            await self._session.close()

    async def _patch(self, path: str, body: dict[str, Any]) -> None:
        assert self._session is not None
        async with self._session.patch(
                path, json=body, headers={"Content-Type": "application/merge-patch+json"}) as r:
            if r.status >= 400 and r.status != 404:
                raise RuntimeError(f"node: PATCH {path}: {r.status} {await r.text()}")

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        assert self._session is not None
        async with self._session.post(path, json=body) as r:
            if r.status >= 400:
                raise RuntimeError(f"node: POST {path}: {r.status} {await r.text()}")

    async def _run(self, key: tuple[str, str, str], job: dict[str, Any]) -> None:
        ns, name, _ = key
        job_path = f"/apis/batch/v1/namespaces/{ns}/jobs/{name}/status"
        await self._patch(job_path, {"status": {"active": 1, "startTime": now_rfc3339()}})
        if not self.options.run_jobs:
            return
        pod_spec = job["spec"]["template"]["spec"]
        folder = self.workdir / f"{name}-{key[2][:8]}"
        mounts = await self._materialize(ns, pod_spec, folder)
        container = pod_spec["containers"][0]
        argv = [_rewrite(a, mounts) for a in container.get("command", []) + container.get(
            "args", [])]
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        if self.options.fail(name):
            argv = [sys.executable, "-c", FAIL_CODE]
        env = {**self.options.env, **{k: _rewrite(v, mounts)
                                      for k, v in self._env(ns, container).items()}}
        pod_name = f"{name}-{uuid.uuid4().hex[:5]}"
        await self._post(f"/api/v1/namespaces/{ns}/pods", {"metadata": {
            "name": pod_name, "labels": {"job-name": name, "batch.kubernetes.io/job-name": name,
                                         **job["spec"]["template"]["metadata"]["labels"]}},
            "spec": pod_spec})
        log = folder / "log.txt"
        self.started.append(name)
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=out, stderr=asyncio.subprocess.STDOUT, env=env, cwd=folder,
                start_new_session=True)
        self.procs[key] = proc
        code = await proc.wait()
        if key not in {k for k in self._live_keys()}:
            return  # deleted while running: nobody reports on a deleted Job
        tail = log.read_text(errors="replace")[-4096:]
        await self._patch(f"/api/v1/namespaces/{ns}/pods/{pod_name}/status", {"status": {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [{"name": container["name"], "state": {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error",
                "message": "" if code == 0 else tail}}}]}})
        now = now_rfc3339()
        if code == 0:
            status = {"active": None, "succeeded": 1, "completionTime": now, "conditions": [
                _cond("SuccessCriteriaMet", "CompletionsReached", "Reached expected number "
                      "of succeeded pods", now),
                _cond("Complete", "CompletionsReached", "Reached expected number of succeeded "
                      "pods", now)]}
        else:
            status = {"active": None, "failed": 1, "conditions": [
                _cond("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified "
                      "backoff limit", now),
                _cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff "
                      "limit", now)]}
        await self._patch(job_path, {"status": status})

    def _live_keys(self) -> set[tuple[str, str, str]]:
        return {(ns, name, obj.raw["metadata"]["uid"])
                for (res, ns, name), obj in list(self.emulator.objects.items())
                if res == JOBS and not obj.deleted}

    def _object(self, res: Any, ns: str, name: str) -> dict[str, Any] | None:
        key = (res, ns, name)
        if key in self.emulator.objects and not self.emulator.objects[key].deleted:
            return self.emulator.objects[key].raw
        return None

    async def _materialize(self, ns: str, pod: dict[str, Any], folder: Path) -> dict[str, Path]:
        """mountPath -> local folder, after the ConfigMaps exist (as the kubelet waits)."""
        volumes = {}
        for vol in pod.get("volumes", []):
            local = folder / "volumes" / vol["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                data = await self._wait_for(CONFIGMAPS, ns, vol["configMap"]["name"])
                for k, v in (data.get("data") or {}).items():
                    (local / k).write_text(v)
            volumes[vol["name"]] = local
        container = pod["containers"][0]
        return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}

    async def _wait_for(self, res: Any, ns: str, name: str) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + MOUNT_WAIT_S
        while (obj := self._object(res, ns, name)) is None:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"node: {res.plural} {ns}/{name} never appeared")
            await asyncio.sleep(0.1)
        return obj

    def _env(self, ns: str, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in container.get("envFrom", []):
            ref = src.get("secretRef") or src.get("configMapRef")
            obj = self._object(SECRETS if "secretRef" in src else CONFIGMAPS, ns, ref["name"])
            env.update(_values(obj or {}, secret="secretRef" in src))
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            src = item.get("valueFrom", {})
            ref = src.get("secretKeyRef") or src.get("configMapKeyRef")
            obj = self._object(SECRETS if "secretKeyRef" in src else CONFIGMAPS, ns, ref["name"])
            values = _values(obj or {}, secret="secretKeyRef" in src)
            if ref["key"] not in values:
                raise RuntimeError(f"node: {ref['name']} has no key {ref['key']}")
            env[item["name"]] = values[ref["key"]]
        return env


def _values(obj: dict[str, Any], *, secret: bool) -> dict[str, str]:
    out = dict(obj.get("stringData") or {})
    for k, v in (obj.get("data") or {}).items():
        out[k] = base64.b64decode(v).decode() if secret else v
    return out


def _rewrite(value: str, mounts: dict[str, Path]) -> str:
    for mount, local in mounts.items():
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(local) + value[len(mount.rstrip("/")):]
    return value


def _cond(type_: str, reason: str, message: str, now: str) -> dict[str, str]:
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": now, "lastTransitionTime": now}


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
