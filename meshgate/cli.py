"""The `meshgate` command: `up` runs the whole mesh locally, `status` says
how each of its processes is, `chat` talks to it, `sessions` lists, starts
and deletes the conversations it keeps, `top` watches it."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pathlib
import signal
import sys
import time
import uuid

import grpc
import uvloop

from meshgate import redis_access, serving
from meshgate.common.v1 import common_pb2
from meshgate.config import DEFAULT_DEV_API_KEY
from meshgate.errors import error_info
from meshgate.router.v1 import router_service_pb2 as pb
from meshgate.router.v1 import router_service_pb2_grpc

_POLICIES = {
    "use": pb.CACHE_POLICY_USE,
    "bypass": pb.CACHE_POLICY_BYPASS,
    "refresh": pb.CACHE_POLICY_REFRESH,
}

DEFAULT_MODEL = "smollm2"
# Greedy by default. The model's own default (temperature 1, as vLLM's)
# makes this 4-bit 135M-parameter model wander off into other languages, and
# even SmolLM2's recommended 0.2 / top_p 0.9 answered "What is the capital of
# France?" with "L'Étoile, la Marseillaise, ..." in 3 of 5 tries here, where
# greedy says "The capital of France is Paris." Greedy answers also repeat,
# so a repeated question is an exact cache hit of the same answer.
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_P = 1.0


async def chat(
    router: str,
    api_key: str,
    prompt: str,
    model: str = DEFAULT_MODEL,
    session_id: str = "",
    max_tokens: int | None = None,
    cache_policy: str = "use",
    out=sys.stdout,
    temperature: float | None = DEFAULT_TEMPERATURE,
    top_p: float | None = DEFAULT_TOP_P,
) -> pb.ChatCompletion:
    """Streams one answer to `out` as it arrives, then prints the summary.
    `router`: an address as a service's settings take it (see
    serving.channel_target): one host:port, a comma-separated list of
    ip:port replicas, or dns:///name:port. A parameter left None is left to
    the model."""
    parameters = common_pb2.GenerationParameters()
    if max_tokens is not None:
        parameters.max_tokens = max_tokens
    if temperature is not None:
        parameters.temperature = temperature
    if top_p is not None:
        parameters.top_p = top_p
    request = pb.ChatRequest(
        model=model,
        session_id=session_id,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=prompt)],
        parameters=parameters,
        cache_policy=_POLICIES[cache_policy],
        # The answer's last text may come on the completion (one message fewer).
        completion_may_carry_text=True,
    )
    # The channel the services reach each other with: a list or a name of
    # several replicas is balanced round-robin, a replica that refuses
    # connections is skipped. Untraced: the CLI exports no spans (the
    # router starts the trace).
    async with serving.client_channel(router, traced=False) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        started = time.perf_counter()
        first_token_s = None
        completion = None
        async for response in stub.Chat(request, metadata=[("authorization", f"Bearer {api_key}")]):
            if response.HasField("delta"):
                if first_token_s is None:
                    first_token_s = time.perf_counter() - started
                out.write(response.delta.text)
                out.flush()
            elif response.HasField("completion"):
                completion = response.completion
                if completion.text:
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - started
                    out.write(completion.text)
        total_s = time.perf_counter() - started
    if completion is None:
        # The router ends every answer with its completion: without one the
        # answer may be cut short, and must not pass for a whole one.
        raise IncompleteAnswer("the router's stream ended without a completion")
    out.write("\n\n")
    usage = completion.usage
    similarity = (
        f" (similarity {completion.cache_similarity:.3f})"
        if completion.cache_status == pb.CACHE_STATUS_SEMANTIC_HIT
        else ""
    )
    # An answer cut at max_tokens (the model's default_max_tokens unless
    # --max-tokens says) ends mid-sentence: say why.
    cut = " (cut at max_tokens; --max-tokens for more)" if completion.finish_reason == "length" else ""
    out.write(
        f"cache: {pb.CacheStatus.Name(completion.cache_status).removeprefix('CACHE_STATUS_').lower()}"
        f"{similarity}\n"
        f"tokens: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion{cut}\n"
        f"time to first token: {(first_token_s or total_s) * 1000:.1f} ms\n"
        f"total time: {total_s * 1000:.1f} ms\n"
        f"deployment: {completion.deployment or '-'}   trace: {completion.trace_id}\n"
    )
    if completion.rate_limits:
        # The key's tightest per-minute windows, as the router admitted the turn.
        told = (
            f"{window.remaining}/{window.limit} "
            f"{pb.RateLimitKind.Name(window.kind).removeprefix('RATE_LIMIT_KIND_').removesuffix('_PER_MINUTE').lower()}"
            f" a minute left (more in {window.reset_ms / 1000:.1f} s)"
            for window in completion.rate_limits
        )
        out.write(f"rate limits: {', '.join(told)}\n")
    return completion


async def sessions(router: str, api_key: str, action: str, session_id: str = "", out=sys.stdout) -> None:
    """`meshgate sessions`: ``list`` prints every session of the key's
    tenant, newest first, one line each (following the listing's pages to
    its end); ``new`` starts one and prints its id, for `chat --session`;
    ``delete`` deletes ``session_id``."""
    metadata = [("authorization", f"Bearer {api_key}")]
    async with serving.client_channel(router, traced=False) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        if action == "new":
            # A request id of its own: a resend of this request (grpc's own
            # retry of an UNAVAILABLE) makes no second session.
            created = await stub.CreateSession(
                pb.CreateSessionRequest(request_id=str(uuid.uuid4())), metadata=metadata
            )
            out.write(f"{created.session_id}\n")
            return
        if action == "delete":
            await stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), metadata=metadata)
            out.write(f"deleted {session_id}\n")
            return
        token = ""
        while True:
            page = await stub.ListSessions(
                pb.ListSessionsRequest(page_size=_SESSIONS_PAGE, page_token=token), metadata=metadata
            )
            if not token:
                # Only once the key is known good: a refusal prints no table.
                out.write(
                    f"{'session':<32}  {'version':>7}  {'turns':>5}  {'created (UTC)':<19}  updated (UTC)\n"
                )
            for summary in page.sessions:
                out.write(
                    f"{summary.session_id:<32}  {summary.version:>7}  {summary.turn_count:>5}  "
                    f"{_utc(summary.create_time_ms)}  {_utc(summary.update_time_ms)}\n"
                )
            out.flush()
            token = page.next_page_token
            if not token:
                return


# The listing's largest page: fewest round trips for a tenant of many sessions.
_SESSIONS_PAGE = 1000


def _utc(time_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time_ms / 1000))


class IncompleteAnswer(Exception):
    """The router's stream ended without the completion that ends every answer."""


def _router_address(address: str) -> str:
    try:
        serving.channel_target(address)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return address


def _utf8_text(value: str) -> str:
    """A prompt, model or session as protobuf strings carry them: UTF-8.
    Bytes that are not arrive from argv as lone surrogates, which protobuf
    refuses with a UnicodeEncodeError (the shell's locale, or a file read
    into the argument with another encoding)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8") from None
    return value


def _api_key(value: str) -> str:
    """A key gRPC can send: a metadata value is printable ASCII (anything
    else failed as INTERNAL: Invalid metadata, naming neither the key nor why)."""
    if not all(" " <= character <= "~" for character in value):
        raise argparse.ArgumentTypeError("an API key is printable ASCII")
    return value


# GenerationParameters.max_tokens is an int32: a larger number failed in
# protobuf (ValueError: Value out of range).
_MAX_TOKENS_LIMIT = 2**31 - 1


def _max_tokens(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= _MAX_TOKENS_LIMIT:
        raise argparse.ArgumentTypeError(f"a whole number from 1 to {_MAX_TOKENS_LIMIT}, got {value!r}")
    return number


def _interval(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    # time.sleep refuses a negative length (a traceback); 0 or NaN would
    # scrape every service in a busy loop.
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"a number of seconds above 0, got {value!r}")
    return seconds


def _describe_rpc_error(error: grpc.aio.AioRpcError) -> str:
    info = error_info(error)
    reason = f" [{info.reason}]" if info else ""
    return f"{error.code().name}{reason}: {error.details()}"


def _cmd_chat(args: argparse.Namespace) -> int:
    try:
        uvloop.run(
            chat(
                args.router,
                args.api_key,
                args.prompt,
                args.model,
                args.session,
                args.max_tokens,
                args.cache,
                temperature=args.temperature,
                top_p=args.top_p,
            )
        )
    except grpc.aio.AioRpcError as error:
        print(f"error: {_describe_rpc_error(error)}", file=sys.stderr)
        return 1
    except IncompleteAnswer as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: the runner cancelled chat() first, closing its channel,
        # so the router has stopped the turn; exit as the shell expects of
        # an interrupted command, without a traceback.
        return 128 + signal.SIGINT
    return 0


def _cmd_sessions(args: argparse.Namespace) -> int:
    if (args.action == "delete") != bool(args.session_id):
        print("meshgate sessions: delete takes a session id; list and new take none", file=sys.stderr)
        return 2
    try:
        uvloop.run(sessions(args.router, args.api_key, args.action, args.session_id))
    except grpc.aio.AioRpcError as error:
        print(f"error: {_describe_rpc_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0


def _needs_checkout(command: str) -> int:
    print(
        f"meshgate {command} is the local stack's, which runs from a source checkout (make run); "
        "an installed meshgate holds the services only. In a cluster, cert-manager makes the "
        "mesh's certificates: see deploy/k8s/README.md.",
        file=sys.stderr,
    )
    return 2


def _cmd_certs(args: argparse.Namespace) -> int:
    try:
        from meshgate.local import certs
    except ModuleNotFoundError:
        return _needs_checkout("certs")

    directory = pathlib.Path(args.out)
    try:
        written = certs.ensure(directory)
    except OSError as error:  # a file where the folder goes, no permission, a full disk
        print(f"meshgate certs: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{directory}: the CA and every service's certificate are there and valid")
    print(
        "each service's settings: [mesh] "
        f'ca_file = "{directory / "ca.pem"}", cert_file = "{directory / "{service}.pem"}", '
        f'key_file = "{directory / "{service}.key"}"'
    )
    return 0


# What stops `meshgate up`, each the same ordered stop: Ctrl-C, SIGTERM (a
# service manager, `timeout`), SIGHUP (its terminal closed, its ssh session
# dropped) and SIGQUIT (Ctrl-\). Its children lead their own sessions, so
# none of these reaches them: only the ordered stop ends them (or, if
# `meshgate up` is killed outright, the SIGTERM each has the kernel send it:
# meshgate/local/children.py).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _say(text: str, file=None) -> None:
    """print() that never fails: after SIGHUP the terminal is gone and every
    write to it fails (EIO), which must not break off the stop it reports."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=file or sys.stdout, flush=True)


# Where `meshgate chat` (and `up`) read an API key other than the
# development default from: unlike --api-key, it is in no process list
# (`ps`) and no shell history.
API_KEY_VARIABLE = "MESHGATE_DEV_API_KEY"


def _chat_suggestion(api_key: str) -> str:
    """The `meshgate chat` to try against a stack serving ``api_key``."""
    command = '.venv/bin/meshgate chat "your question"'
    if api_key == DEFAULT_DEV_API_KEY:
        return command
    return f"{command}  (with {API_KEY_VARIABLE} set to the development API key above)"


def _start_failure(error: Exception, log_dir: pathlib.Path) -> str:
    """A failed start in one line. The stack's own RuntimeErrors say what to
    do (a port taken) or name the log to read (a child that died); anything
    else (a timeout, a missing binary, a failed build script) is named by
    its type and pointed at the logs."""
    if isinstance(error, RuntimeError):
        return str(error)
    return f"{type(error).__name__}: {error} (logs: {log_dir})"


def _cmd_up(args: argparse.Namespace) -> int:
    try:
        from meshgate.local.stack import Stack, stack_owned_overrides
        from meshgate.local.supervisor import Supervisor
    except ModuleNotFoundError:
        return _needs_checkout("up")
    from meshgate import telemetry
    from meshgate.config import TelemetrySettings

    # The supervisor's restart lines, as JSON on stderr like every service's.
    telemetry.setup("meshgate-up", TelemetrySettings())

    base_settings = os.environ.get("MESHGATE_CONFIG")
    stack = Stack(
        pathlib.Path(args.state_dir),
        redis_url=os.environ.get("REDIS_URL"),
        dev_api_key=args.api_key,
        # A user's settings (tenants, limits, prices, models) count: the
        # stack's go over them, and the services read the file it writes.
        base_settings=pathlib.Path(base_settings) if base_settings else None,
        # Its addresses, TLS, Redis and key are what it writes and prints:
        # an override of one left in this shell would make the services
        # disagree with it. MESHGATE_DEV_API_KEY is --api-key's default, so
        # it still counts through that.
        owns_settings=True,
    )
    if base_settings:
        try:
            _, replaced = stack.settings_text()
        except (OSError, ValueError) as error:  # ValueError: not UTF-8, or not TOML
            _say(f"meshgate up: cannot read MESHGATE_CONFIG={base_settings}: {error}", file=sys.stderr)
            return 2
        _say(
            f"meshgate up: the settings of {base_settings}, with the stack's own over them"
            + (f" (its {', '.join(replaced)} replaced)" if replaced else "")
            + f": {stack.config_path}, which the services read",
            file=sys.stderr,
        )
    supervisor = Supervisor(stack)
    ignored = [name for name in stack_owned_overrides(os.environ) if name != API_KEY_VARIABLE]
    if ignored:
        _say(
            f"meshgate up: not passing {', '.join(ignored)} on to the services: the stack sets "
            f"addresses, TLS, Redis and the API key itself ({stack.config_path})",
            file=sys.stderr,
        )

    stopping = False

    def request_stop(signum, frame):
        # Only the first signal interrupts: a second Ctrl-C (or a signal sent
        # to the whole process group, as `timeout` does) must not break off
        # the ordered stop half-way and orphan every child; nor may the first
        # break off the stop that a failed start runs on its own.
        nonlocal stopping
        if stopping or stack.stopping:
            _say("already stopping ...")
            return
        stopping = True
        raise KeyboardInterrupt

    # Installed explicitly: a shell that starts us in the background leaves
    # SIGINT and SIGQUIT ignored, and Python would then never raise
    # KeyboardInterrupt. An ignored SIGHUP is left so: `nohup meshgate up`
    # asks to outlive its terminal.
    for signum in STOP_SIGNALS:
        if signum != signal.SIGHUP or signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, request_stop)
    _say("starting Redis, Triton and the four services ...")
    started = time.monotonic()
    try:
        stack.start()
    except KeyboardInterrupt:
        stopping = True
        # Stack.start has stopped what it had started; again only in case
        # the signal came before its own stop began.
        stack.stop()
        _say("\nstopped while starting.")
        return 0
    except Exception as error:  # noqa: BLE001 - a port taken, a child that died, a timeout, a missing binary
        stopping = True
        stack.stop()
        _say(f"meshgate up: {_start_failure(error, stack.log_dir)}", file=sys.stderr)
        return 1
    try:
        supervisor.start()
        print(f"\nmeshgate is up ({time.monotonic() - started:.1f} s):")
        for name in ("router", "context", "cache", "inference", "triton"):
            print(f"  {name:<10} {stack.address(name)}")
        print(f"  {'redis':<10} {redis_access.redacted(stack.redis_url)}")
        print(f"  {'http':<10} http://{stack.address('http')}/v1  (OpenAI-compatible, in the router)")
        print(f"metrics (Prometheus; `meshgate top --config {stack.config_path}` shows them):")
        for name in ("router", "context", "cache", "inference"):
            print(f"  {name:<10} http://{stack.metrics_address(name)}/metrics")
        print(f"\ndevelopment API key: {args.api_key}")
        print(f"logs: {stack.log_dir}   traces: {stack.traces_path}")
        print(f"mesh certificates (mutual TLS between the services): {stack.certs_dir}\n")
        if not args.no_demo:
            prompt = "What is the capital of France?"
            print(f"demo> {prompt}")
            try:
                uvloop.run(chat(stack.address("router"), args.api_key, prompt))
            except (grpc.aio.AioRpcError, IncompleteAnswer) as error:
                # The mesh is up and supervised: a demo that failed (a model
                # still warming up, a busy machine) is no reason to stop it.
                cause = _describe_rpc_error(error) if isinstance(error, grpc.aio.AioRpcError) else error
                print(f"\nwarning: the demo question failed: {cause} (see {stack.log_dir})", file=sys.stderr)
            print(f"try:  {_chat_suggestion(args.api_key)}")
        print("Ctrl-C stops everything; a process that exits, or stays not ready, is restarted.", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        _say("\nstopping: draining in-flight requests ...")
        return 0
    finally:
        # From here on every signal is a repeat: the stop below runs to its end.
        stopping = True
        # Supervision ends first, so no restart races the ordered stop.
        supervisor.stop()
        stack.stop()
        _say("stopped.")


# `meshgate status`'s exit codes, as an LSB init script's status action
# (and `systemctl status`): every child up; one not (or the stack is still
# starting); no `meshgate up` on the state directory.
STATUS_UP, STATUS_NOT_UP, STATUS_NOT_RUNNING = 0, 1, 3


def _clock(unix_time: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix_time))


def _describe_child(name: str, child: dict) -> str:
    line = f"  {name:<12} {child['state']:<9} since {_clock(child['since'])}"
    if child["pid"] is not None:
        line += f"  pid {child['pid']}"
    line += f"  restarts {child['restarts']}"
    if last_exit := child["last_exit"]:
        (how, value), *_ = last_exit.items()
        line += f"  last exit: {how.replace('_', ' ')} {value}"
    # Absent from the file of a `meshgate up` older than the field.
    if stopped_for := child.get("stopped_for"):
        line += f"  stopped by the supervisor: {stopped_for}"
    if child["state"] == "down" and child["restart_at"] is None:
        line += "  (exited since its supervisor last looked)"
    elif child["state"] == "down":
        line += f"  restart at {_clock(child['restart_at'])}"
        if child["error"]:
            line += f" (last try: {child['error']})"
        # Why it exited is in its own words there, not in an exit code.
        if log := child.get("log"):
            line += f"  log: {log}"
    return line


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and is no zombie (one exited,
    its parent, the supervisor, not yet having reaped it)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command's closing parenthesis.
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        from meshgate.local.stack import holder
        from meshgate.local.supervisor import read_status
    except ModuleNotFoundError:
        return _needs_checkout("status")

    state_dir = pathlib.Path(args.state_dir).resolve()
    pid = holder(state_dir)
    if pid is None:
        print(f"no `meshgate up` runs on {state_dir}")
        return STATUS_NOT_RUNNING
    status = read_status(state_dir)
    if status is None or status["pid"] != pid:
        # Its supervisor writes the file once every child is up: until then,
        # what is there is an earlier run's.
        print(f"meshgate up (pid {pid}) on {state_dir}: starting")
        return STATUS_NOT_UP
    children = status["children"]
    for child in children.values():
        if child["state"] != "down" and child["pid"] is not None and not _running(child["pid"]):
            # Exited since its supervisor last wrote (it notices within a
            # fifth of a second, unless it is itself stopped: Ctrl-Z).
            child["state"] = "down"
            child["restart_at"] = None
    up = sum(child["state"] == "up" for child in children.values())
    print(f"meshgate up (pid {pid}) on {state_dir}: {up} of {len(children)} up")
    for name, child in children.items():
        print(_describe_child(name, child))
    return STATUS_UP if up == len(children) else STATUS_NOT_UP


def _cmd_top(args: argparse.Namespace) -> int:
    from meshgate import top
    from meshgate.config import load_settings

    try:
        settings = load_settings(args.config)
    except (OSError, ValueError) as error:  # no such file, not TOML, a setting out of range
        print(f"meshgate top: cannot read the settings: {error}", file=sys.stderr)
        return 1
    targets = top.endpoints(settings)
    try:
        return top.run(targets, args.once, args.interval)
    except KeyboardInterrupt:
        return 0


def _add_router_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a client command finds the router, and the key it calls with."""
    parser.add_argument(
        "--router",
        default="127.0.0.1:50051",
        type=_router_address,
        help="host:port, a comma-separated list of ip:port replicas (balanced), or dns:///name:port",
    )
    parser.add_argument(
        "--api-key",
        type=_api_key,
        default=os.environ.get(API_KEY_VARIABLE, DEFAULT_DEV_API_KEY),
        help=f"default: ${API_KEY_VARIABLE}, else {DEFAULT_DEV_API_KEY}; "
        "the variable keeps a key out of `ps` and shell history",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshgate")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run Redis, Triton and the four services locally")
    up.add_argument("--state-dir", default=".meshgate", help="logs, traces, Redis data")
    up.add_argument(
        "--api-key",
        type=_api_key,
        default=os.environ.get(API_KEY_VARIABLE, DEFAULT_DEV_API_KEY),
        help=f"the development tenant's API key (default: ${API_KEY_VARIABLE}, else {DEFAULT_DEV_API_KEY})",
    )
    up.add_argument("--no-demo", action="store_true", help="skip the demo question")
    up.set_defaults(run=_cmd_up)

    status_parser = commands.add_parser(
        "status",
        help="whether each process of a `meshgate up` is up (ready), starting, unready or down, its restarts "
        "and last exit (exit code 0: all up, 1: not all, 3: none runs)",
    )
    status_parser.add_argument("--state-dir", default=".meshgate", help="the `meshgate up`'s --state-dir")
    status_parser.set_defaults(run=_cmd_status)

    certs_parser = commands.add_parser(
        "certs", help="create the mesh's CA and a certificate per service (reuses valid ones)"
    )
    certs_parser.add_argument("--out", default="certs", help="folder for ca.pem and <service>.pem/.key")
    certs_parser.set_defaults(run=_cmd_certs)

    top_parser = commands.add_parser(
        "top", help="live view of the mesh's rates, latencies, cache hit rate and errors (metrics endpoints)"
    )
    top_parser.add_argument(
        "--config", help="settings file naming each service's metrics_listen (default: $MESHGATE_CONFIG)"
    )
    top_parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top_parser.add_argument("--interval", type=_interval, default=1.0, help="seconds between refreshes")
    top_parser.set_defaults(run=_cmd_top)

    chat_parser = commands.add_parser("chat", help="stream one answer from the router")
    chat_parser.add_argument("prompt", type=_utf8_text)
    _add_router_arguments(chat_parser)
    chat_parser.add_argument("--model", type=_utf8_text, default=DEFAULT_MODEL)
    chat_parser.add_argument("--session", type=_utf8_text, default="", help="continue a server-side session")
    chat_parser.add_argument("--max-tokens", type=_max_tokens)
    chat_parser.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy (default %(default)s)"
    )
    chat_parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="(default %(default)s)")
    chat_parser.add_argument("--cache", choices=sorted(_POLICIES), default="use")
    chat_parser.set_defaults(run=_cmd_chat)

    sessions_parser = commands.add_parser(
        "sessions",
        help="list the API key's tenant's sessions (newest first), start one for `chat --session`, "
        "or delete one",
    )
    sessions_parser.add_argument("action", nargs="?", choices=("list", "new", "delete"), default="list")
    sessions_parser.add_argument(
        "session_id", nargs="?", type=_utf8_text, default="", help="the session to delete"
    )
    _add_router_arguments(sessions_parser)
    sessions_parser.set_defaults(run=_cmd_sessions)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # What read the output is gone (`meshgate chat ... | head -1`); the
        # call that wrote it has been cancelled on the way out. End as a
        # command killed by SIGPIPE does: quietly, after pointing stdout at
        # /dev/null, since Python flushes it again at exit and would print
        # that failure too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
