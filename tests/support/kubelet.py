"""A node for the test control plane: a Python stand-in for the kubelet (and the scheduler).

No container runtime runs here, so pods run as local processes. Every 0.2 s the node lists
the cluster's pods and, like kube-scheduler and the kubelet together:

- binds each pending pod whose nodeSelector matches this node (a pod that does not match gets
  `PodScheduled=False, reason Unschedulable`, as the scheduler would say);
- starts a bound pod once its ConfigMap and Secret volumes exist: volumes become folders
  (configMap, secret, emptyDir; the service-account projected volume gets a bound
  TokenRequest token, the CA and a kubeconfig; a persistentVolumeClaim is one folder per
  claim in the namespace, shared by every pod that mounts it, as a ReadWriteMany volume would
  be, with `subPath` honoured), mount paths in the command and env values are rewritten to
  those folders, env/envFrom/valueFrom (fieldRef included) are resolved from the API,
  `$(VAR)` is expanded and pod DNS names are resolved as support.podenv says, `python` is
  this interpreter, and an image with no command runs its entrypoint from `ENTRYPOINTS`;
  a missing env Secret or key gives `CreateContainerConfigError`, an image `unpullable`
  says so gives `ImagePullBackOff` (both waiting, as the kubelet reports them);
- reports Running (Ready when the readiness probe, if any, answers), then Succeeded or Failed
  with the exit code (128 + n for a process killed by signal n), reason and termination
  message (the log tail, FallbackToLogsOnError), built by support.podstatus;
- kills the pod's processes (its whole tree, as a runtime kills a container's cgroup) when the
  pod is deleted, then removes the pod (grace period 0).

`node.kill(namespace, pod)` SIGKILLs a running pod's processes, as an OOM kill or a dying
container would. The Job controller does the rest: nothing here writes Job status.
Per-namespace behaviour is set with `node.configure(namespace, NodeOptions(...))` (failure
injection by Job name, no running at all for the scale bench, the environment pods start from).

The pod that runs the operator has no MERITRUN_KUBECONFIG in its spec; the node adds one that
points at the kubeconfig it writes into the service-account volume, because the in-cluster
paths (/var/run/secrets/...) cannot be made per pod on a shared machine; and it binds the
metrics endpoint to 127.0.0.1 (the pod IP here), as tests bind nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import podstatus
from .apiclient import Api, ApiStatus
from .podenv import FieldError, expand, field_value, resolve_pod_names
from .processes import process_tree, signal_process_tree, spawn, stop_process_tree

if TYPE_CHECKING:
    from .controlplane import ControlPlane

NODE_NAME = "meritrun-node"
NODE_LABELS = {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux",
               "kubernetes.io/arch": "amd64"}
CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "500", "nvidia.com/gpu": "8",
            "ephemeral-storage": "100Gi"}
ENTRYPOINTS = {"meritrun-operator": ["python", "-m", "merit_operator"]}
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
FAIL_CODE = "import sys; print('MERITRUN_ERROR: injected failure', file=sys.stderr); sys.exit(1)"
TICK_S = 0.2
KILL_GRACE_S = 3.0


def base_env() -> dict[str, str]:
    """This process's environment minus what would point a pod at the tests' own settings."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "KUBECONFIG", "MERITRUN_"))}


@dataclass
class NodeOptions:
    fail: Callable[[str], bool] = lambda job_name: False  # inject a failure by Job name
    run: bool = True  # False: pods stay pending, unbound (the scale bench)
    env: dict[str, str] = field(default_factory=base_env)
    unpullable: Callable[[str], bool] = lambda image: "does-not-exist" in image


class Waiting(Exception):
    """The pod cannot start yet (reason, message), as the kubelet reports it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass
class Running:
    pod: dict[str, Any]
    proc: subprocess.Popen[bytes]
    folder: Path
    ready: bool = False
    reported: bool = False
    probe_at: float = 0.0


class Node:
    def __init__(self, plane: ControlPlane, *, token: str) -> None:
        self.plane = plane
        self.api = Api(plane.url, token=token, ca_pem=plane.ca_pem, timeout=15)
        self.workdir = plane.workdir / "node"
        self.options: dict[str, NodeOptions] = {}
        self.running_pods: dict[str, Running] = {}  # pod uid -> its process
        self.started: list[str] = []  # "namespace/job-or-pod" in the order they started
        self.errors: list[str] = []
        self._waiting: dict[str, str] = {}  # pod uid -> last reported waiting reason
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self._lock = threading.Lock()

    # --- public ----------------------------------------------------------------------------

    def configure(self, namespace: str, options: NodeOptions) -> None:
        self.options[namespace] = options

    def running(self, namespace: str | None = None) -> list[str]:
        with self._lock:
            return [r.pod["metadata"]["name"] for r in self.running_pods.values()
                    if r.proc.poll() is None
                    and (namespace is None or r.pod["metadata"]["namespace"] == namespace)]

    def log(self, namespace: str, pod: str) -> str:
        for path in (self.workdir / namespace).glob(f"{pod}-*/log.txt"):
            return path.read_text(errors="replace")
        return ""

    def kill(self, namespace: str, pod: str) -> bool:
        """SIGKILL a running pod's process group; False if no such pod runs here."""
        with self._lock:
            procs = [r.proc for r in self.running_pods.values()
                     if r.pod["metadata"]["namespace"] == namespace
                     and r.pod["metadata"]["name"] == pod and r.proc.poll() is None]
        for proc in procs:
            signal_process_tree(proc.pid, process_tree(proc.pid), signal.SIGKILL)
        return bool(procs)

    def claim_folder(self, namespace: str, claim: str) -> Path:
        """Where a PersistentVolumeClaim's files live on this node."""
        return self.workdir / namespace / "claims" / claim

    def start(self) -> Node:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._register()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        with self._lock:
            for r in self.running_pods.values():
                stop_process_tree(r.proc, KILL_GRACE_S)

    # --- the loop --------------------------------------------------------------------------

    def _register(self) -> None:
        with contextlib.suppress(ApiStatus):
            self.api.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": NODE_NAME, "labels": NODE_LABELS}})
        t = podstatus.now()
        self.api.merge_patch(f"/api/v1/nodes/{NODE_NAME}/status", {"status": {
            "capacity": CAPACITY, "allocatable": CAPACITY,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": NODE_NAME}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "the test node stand-in is ready",
                            "lastHeartbeatTime": t, "lastTransitionTime": t}]}})

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as e:  # the API may be down (fault tests): try again
                self.errors.append(repr(e))
                del self.errors[:-50]
            self._stop.wait(TICK_S)

    def _tick(self) -> None:
        pods = self.api.list("/api/v1/pods")
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            opts = self.options.get(pod["metadata"]["namespace"]) or NodeOptions()
            if pod["metadata"].get("deletionTimestamp"):
                self._delete(pod)
            elif not pod["spec"].get("nodeName"):
                if opts.run:
                    self._schedule(pod)
            elif pod["spec"]["nodeName"] == NODE_NAME:
                self._sync(pod, opts)
        with self._lock:
            for uid, r in list(self.running_pods.items()):
                if uid not in seen:  # gone without a graceful delete
                    stop_process_tree(r.proc, KILL_GRACE_S)
                    if r.proc.poll() is not None:
                        del self.running_pods[uid]

    def _schedule(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        selector = pod["spec"].get("nodeSelector") or {}
        misfit = {k: v for k, v in selector.items() if NODE_LABELS.get(k) != v}
        if misfit:
            if self._waiting.get(meta["uid"]) != "Unschedulable":
                self._waiting[meta["uid"]] = "Unschedulable"
                self._status(pod, {"phase": "Pending", "conditions": [podstatus.cond(
                    "PodScheduled", "False", "Unschedulable",
                    f"0/1 nodes are available: 1 node(s) didn't match Pod's node "
                    f"affinity/selector ({misfit}).")]})
            return
        self.api.create(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", {
            "apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME}})

    def _sync(self, pod: dict[str, Any], opts: NodeOptions) -> None:
        uid = pod["metadata"]["uid"]
        r = self.running_pods.get(uid)
        if r is None:
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return
            try:
                self._start(pod, opts)
            except Waiting as w:
                if self._waiting.get(uid) != w.reason:
                    self._waiting[uid] = w.reason
                    self._report_waiting(pod, w)
            return
        code = r.proc.poll()
        if code is None:
            if not r.ready and time.monotonic() >= r.probe_at:
                r.probe_at = time.monotonic() + 1.0
                if _probe(pod):
                    r.ready = True
                    self._report_running(r)
        elif not r.reported:
            self._report_exit(r, code)
            r.reported = True

    # --- starting a pod --------------------------------------------------------------------

    def _start(self, pod: dict[str, Any], opts: NodeOptions) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        if opts.unpullable(container.get("image", "")):
            raise Waiting("ImagePullBackOff",
                          f'Back-off pulling image "{container.get("image")}"')
        folder = self.workdir / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
        mounts = self._volumes(pod, folder)  # raises Waiting until ConfigMaps exist
        declared = self._env(pod, container)  # what $(VAR) in the command may name
        env = {**opts.env, "HOSTNAME": spec.get("hostname") or meta["name"],
               **{k: _rewrite(resolve_pod_names(v, pod), mounts) for k, v in declared.items()}}
        if SA_MOUNT in mounts and "MERITRUN_KUBECONFIG" not in env:
            env["MERITRUN_KUBECONFIG"] = str(mounts[SA_MOUNT] / "kubeconfig")
            env.setdefault("MERITRUN_METRICS_ADDRESS", "127.0.0.1")  # the pod IP here
        argv = container.get("command") or _entrypoint(container.get("image", ""))
        argv = [_rewrite(resolve_pod_names(expand(a, declared), pod), mounts)
                for a in argv + container.get("args", [])]
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        job = (meta.get("labels") or {}).get("job-name", meta["name"])
        if opts.fail(job):
            argv = [sys.executable, "-c", FAIL_CODE]
        proc = spawn(argv, folder / "log.txt", env=env, cwd=folder)
        r = Running(pod=pod, proc=proc, folder=folder,
                    ready=not container.get("readinessProbe"))
        with self._lock:
            self.running_pods[meta["uid"]] = r
        self.started.append(f"{meta['namespace']}/{job}")
        self._report_running(r)

    def _volumes(self, pod: dict[str, Any], folder: Path) -> dict[str, Path]:
        """mountPath -> local folder; Waiting while a ConfigMap or Secret is missing."""
        ns = pod["metadata"]["namespace"]
        local: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            path = folder / "volumes" / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol or "secret" in vol:
                secret = "secret" in vol
                src = vol["secret"] if secret else vol["configMap"]
                name = src.get("secretName") if secret else src.get("name")
                values = self._values(ns, name, secret=secret)
                if values is None:
                    if src.get("optional"):
                        values = {}
                    else:
                        kind = "secret" if secret else "configmap"
                        raise Waiting("ContainerCreating", f'{kind} "{name}" not found')
                items = src.get("items") or [{"key": k, "path": k} for k in values]
                for item in items:
                    (path / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                    (path / item["path"]).write_text(values.get(item["key"], ""))
            elif "projected" in vol:
                self._service_account(pod, path)
            elif "persistentVolumeClaim" in vol:
                path = self._claim(ns, vol["persistentVolumeClaim"]["claimName"])
            local[vol["name"]] = path
        container = pod["spec"]["containers"][0]
        mounts = {}
        for m in container.get("volumeMounts") or []:
            if m["name"] in local:
                mounts[m["mountPath"]] = local[m["name"]] / m.get("subPath", "")
                mounts[m["mountPath"]].mkdir(parents=True, exist_ok=True)
        return mounts

    def _claim(self, ns: str, claim: str) -> Path:
        """A claim's folder; Waiting (as the scheduler's message) while the claim is missing."""
        if self.api.get_or_none(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}") is None:
            raise Waiting("ContainerCreating", f'persistentvolumeclaim "{claim}" not found')
        path = self.claim_folder(ns, claim)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _service_account(self, pod: dict[str, Any], path: Path) -> None:
        ns, sa = pod["metadata"]["namespace"], pod["spec"].get("serviceAccountName", "default")
        token = self.plane.service_account_token(ns, sa, bound_pod=pod)
        (path / "token").write_text(token)
        (path / "ca.crt").write_text(self.plane.ca_pem)
        (path / "namespace").write_text(ns)
        self.plane.kubeconfig(path / "kubeconfig", token=token, namespace=ns,
                              user=f"system:serviceaccount:{ns}:{sa}")

    def _values(self, ns: str, name: str, *, secret: bool) -> dict[str, str] | None:
        kind = "secrets" if secret else "configmaps"
        obj = self.api.get_or_none(f"/api/v1/namespaces/{ns}/{kind}/{name}")
        if obj is None:
            return None
        out = dict(obj.get("stringData") or {})
        for k, v in (obj.get("data") or {}).items():
            out[k] = base64.b64decode(v).decode() if secret else v
        return out

    def _env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        """envFrom, then env in order: a value expands the variables defined before it."""
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            secret = "secretRef" in src
            ref = src["secretRef"] if secret else src["configMapRef"]
            values = self._values(ns, ref["name"], secret=secret)
            if values is None and not ref.get("optional"):
                what = "secret" if secret else "configmap"
                raise Waiting("CreateContainerConfigError", f'{what} "{ref["name"]}" not found')
            env.update({src.get("prefix", "") + k: v for k, v in (values or {}).items()})
        for item in container.get("env") or []:
            if "valueFrom" not in item:
                env[item["name"]] = expand(item.get("value", ""), env)
                continue
            src = item["valueFrom"]
            if "fieldRef" in src:
                try:
                    env[item["name"]] = field_value(pod, src["fieldRef"]["fieldPath"])
                except FieldError as e:
                    raise Waiting("CreateContainerConfigError", str(e)) from e
                continue
            secret = "secretKeyRef" in src
            ref = src.get("secretKeyRef") or src.get("configMapKeyRef")
            if ref is None:
                continue  # resourceFieldRef: nothing the stages read
            values = self._values(ns, ref["name"], secret=secret) or {}
            if ref["key"] in values:
                env[item["name"]] = values[ref["key"]]
            elif not ref.get("optional"):
                what = "secret" if secret else "configmap"
                raise Waiting("CreateContainerConfigError",
                              f'couldn\'t find key {ref["key"]} in {what} {ns}/{ref["name"]}')
        return env

    # --- reporting -------------------------------------------------------------------------

    def _status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.api.merge_patch(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                {"status": status})
        except ApiStatus as e:
            if e.code != 404:
                raise

    def _report_waiting(self, pod: dict[str, Any], w: Waiting) -> None:
        self._status(pod, podstatus.waiting(pod, w.reason, w.message))

    def _report_running(self, r: Running) -> None:
        self._status(r.pod, podstatus.running(r.pod, ready=r.ready))

    def _report_exit(self, r: Running, code: int) -> None:
        container = r.pod["spec"]["containers"][0]
        message = ""
        if code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = (r.folder / "log.txt").read_text(errors="replace").splitlines()[-80:]
            message = "\n".join(lines)[-2048:]
        self._status(r.pod, podstatus.exited(r.pod, code, message))

    def _delete(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        with self._lock:
            r = self.running_pods.pop(meta["uid"], None)
        if r is not None:
            stop_process_tree(r.proc, KILL_GRACE_S)
        terminal = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        if pod["spec"].get("nodeName") == NODE_NAME and not terminal:
            self._report_killed(pod)
        with contextlib.suppress(ApiStatus):
            self.api.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                            grace_seconds=0)

    def _report_killed(self, pod: dict[str, Any]) -> None:
        self._status(pod, podstatus.killed(pod))


def _entrypoint(image: str) -> list[str]:
    for key, argv in ENTRYPOINTS.items():
        if key in image:
            return list(argv)
    raise Waiting("CreateContainerError", f"image {image}: no command and no known entrypoint")


def _rewrite(value: str, mounts: dict[str, Path]) -> str:
    for mount, local in mounts.items():
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(local) + value[len(mount.rstrip("/")):]
    return value


def _probe(pod: dict[str, Any]) -> bool:
    container = pod["spec"]["containers"][0]
    get = (container.get("readinessProbe") or {}).get("httpGet")
    if not get:
        return True
    port = get["port"]
    if isinstance(port, str):
        port = next((p["containerPort"] for p in container.get("ports") or []
                     if p.get("name") == port), 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{get.get('path', '/')}",
                                    timeout=1) as r:
            return r.status < 400
    except OSError:
        return False
