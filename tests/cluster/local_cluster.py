"""A real two-node Ray cluster on one machine: `ray start --head` plus `ray start --address ...` with its own
resources and ports, jobs submitted through the job API, faults injected by killing real processes.

Everything the cluster starts carries its own --temp-dir in its command line, so teardown kills exactly those
processes (never `ray stop`, which would also stop other Ray instances on the machine).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class LocalCluster:
    env: dict[str, str]
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="rdrill", dir="/tmp"))
    # The worker node gets its own temp dir, as a real second machine would: nodes sharing one session folder
    # would share (and garbage-collect each other's) unpacked job working directories.
    worker_temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="rdrillw", dir="/tmp"))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    worker_node_manager_port: int = field(default_factory=free_port)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray(self, *args: str) -> None:
        result = subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    def start(self, cpus_per_node: int = 2) -> LocalCluster:
        self._ray(
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1",
            f"--num-cpus={cpus_per_node}",
            f"--temp-dir={self.temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            '--resources={"drill_head": 1}',
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        )
        self.start_worker_node(cpus_per_node)
        return self

    def start_worker_node(self, cpus: int) -> None:
        self._ray(
            "start",
            f"--address=127.0.0.1:{self.gcs_port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            f"--node-manager-port={self.worker_node_manager_port}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            '--resources={"drill_worker": 1}',
            f"--temp-dir={self.worker_temp_dir}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        )
        self.wait_for_nodes(2)

    def alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [
            n.__dict__ if hasattr(n, "__dict__") else n
            for n in list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], detail=True)
        ]

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if len(self.alive_nodes()) == count:
                    return
            except Exception:  # the API server may still be starting
                pass
            time.sleep(1)
        raise TimeoutError(f"cluster did not reach {count} alive nodes")

    def node_ids(self) -> dict[str, str]:
        """node id -> "head" / "worker" (by the custom resource each node was started with)."""
        out = {}
        for node in self.alive_nodes():
            resources = node["resources_total"]
            out[node["node_id"]] = "head" if "drill_head" in resources else "worker"
        return out

    # ---- jobs ---------------------------------------------------------------------------------------------
    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard)

    def submit(self, *args: str, env_vars: dict[str, str] | None = None) -> str:
        return self.client().submit_job(
            entrypoint=shlex.join([sys.executable, *args]),  # arguments with spaces stay whole
            runtime_env={"working_dir": str(ROOT), "env_vars": env_vars or {}},
        )

    def wait(self, job_id: str, timeout: float = 900) -> str:
        deadline = time.time() + timeout
        client = self.client()
        while time.time() < deadline:
            status = str(client.get_job_status(job_id).value)
            if status in TERMINAL:
                return status
            time.sleep(1)
        raise TimeoutError(f"job {job_id} did not finish in {timeout} s")

    def logs(self, job_id: str) -> str:
        return self.client().get_job_logs(job_id)

    # ---- faults -------------------------------------------------------------------------------------------
    def actors(self, name_part: str, state: str | None = "ALIVE") -> list[dict]:
        from ray.util.state import list_actors

        filters = [("state", "=", state)] if state else None
        found = list_actors(address=self.dashboard, filters=filters, detail=True, limit=10_000)
        return [a.__dict__ if hasattr(a, "__dict__") else a for a in found if name_part in a.class_name]

    def wait_for_actors(self, name_part: str, count: int = 1, timeout: float = 300) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [a for a in self.actors(name_part) if a.get("pid")]
            if len(found) >= count:
                return found
            time.sleep(0.5)
        raise TimeoutError(f"no {count} alive {name_part} actor(s) within {timeout} s")

    @staticmethod
    def kill_pid(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    def kill_worker_node(self) -> None:
        """SIGKILL the worker node's raylet and every process it started (its workers and agents)."""
        marker = f"node_manager_port={self.worker_node_manager_port}"
        raylets = [
            p
            for p in psutil.process_iter(["cmdline"])
            if marker in " ".join(p.info["cmdline"] or []) and "raylet" in " ".join(p.info["cmdline"] or [])
        ]
        assert raylets, "worker node raylet not found"
        victims = []
        for raylet in raylets:
            victims += [raylet, *raylet.children(recursive=True)]
        for process in victims:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if self.temp_dir in cmdline or self.worker_temp_dir in cmdline:
                try:
                    process.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        shutil.rmtree(self.worker_temp_dir, ignore_errors=True)


def committed_outputs(folder: Path) -> int:
    return len(list(folder.glob("*/_manifest/*.json")))


def wait_until(predicate, timeout: float = 300, every: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise TimeoutError("condition not reached")


def read_summary(path: Path) -> dict:
    return json.loads(path.read_text())
