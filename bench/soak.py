"""Bounded soak: N concurrent clients for a bounded time against `vlmprune serve` on `demo`.

Starts `python -m vlmprune serve --model demo` (the real launcher: a vLLM CPU child with the plugin
and the gateway), warms it up, then runs ``--clients`` asyncio clients (httpx) for ``--duration``
seconds. Each client sends, one after another, requests drawn from a seeded mix: every method that
serves the model, ratios 0 / .5 / .75 / .9 / .95 or a named policy, streaming or not, on demo scenes
with their questions; a ``--bad-share`` of the requests is malformed in one of several ways and
must be refused with its 4xx in OpenAI's error shape.

Reported (markdown and JSON, ``bench/results/<tag>.{md,json}``): requests sent / answered / failed
by class, p50 / p99 latency of the good requests (streams to their last event), answer accuracy,
gateway and engine RSS (psutil; engine = every process under the vLLM child) after warm-up, at the
end and at peak (vLLM's multimodal processor cache is off unless ``--mm-cache-gb``: it fills
with every distinct image and policy pair, which would read as growth). The run fails (exit 1) if
a good request is lost (anything but a complete 200), a bad one is not refused as it should be,
the gateway holds requests open afterwards, RSS grows past ``--max-gateway-growth-mib`` /
``--max-engine-growth-mib``, or `vlmprune serve` does not stop cleanly.

asyncio + httpx rather than Locust: the checks per answer (header, event stream, error shape)
are the point, and Locust's gevent monkey-patching would also reach the psutil sampling here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from server.chat.protocol import AppliedPolicy  # noqa: E402

RESULTS = REPO / "bench" / "results"
RATIOS = (0.0, 0.5, 0.75, 0.9, 0.95)
NAMED_POLICIES = ("quality", "balanced", "fast")
CHAT = "/v1/chat/completions"


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    data_url: str
    text: str
    answer: str


def demo_questions(count: int) -> list[Question]:
    """Test-split scenes of the synthetic task with their questions (what `demo` was trained on)."""
    from vlmprune.testbed import scenes

    out = []
    for i in range(count):
        s = scenes.sample("test", i)
        buf = io.BytesIO()
        scenes.render(s.scene).save(buf, format="PNG")
        out.append(Question("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), s.question, s.answer))
    return out


@dataclass
class Planned:
    """One request to send: what it is, and what a correct gateway must answer."""

    kind: str
    """``good`` or the name of the malformation."""
    stream: bool
    headers: dict[str, str]
    body: bytes
    expect_status: int
    method: str | None = None
    ratio: float | None = None
    answer: str | None = None


def _messages(q: Question, images: int = 1, url: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url or q.data_url}} for _ in range(images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": q.text}]}]


# Each malformation: how to spoil a good request (headers, body) and the status it must get.
BAD_KINDS = {
    "ratio_out_of_range": ({"X-VLMPrune-Ratio": "1.5"}, None, 400),
    "unknown_method": ({"X-VLMPrune-Method": "nope"}, None, 400),
    "method_not_for_this_model": ({"X-VLMPrune-Method": "globalcom2"}, None, 400),
    "unknown_policy": ({"X-VLMPrune-Policy": "nope"}, None, 400),
    "corrupt_image": ({}, {"image_url": "data:image/png;base64,AAAA"}, 400),
    "too_many_images": ({}, {"images": 9}, 400),
    "remote_image_disabled": ({}, {"image_url": "https://example.com/cat.png"}, 400),
    "messages_not_a_list": ({}, {"messages": "what colour is the circle ?"}, 400),
    "invalid_json": ({}, {"raw": b'{"model": "demo", "messages": [}'}, 400),
}


class Mix:
    """The seeded request mix."""

    def __init__(self, model: str, methods: list[str], questions: list[Question], *, bad_share: float,
                 stream_share: float, max_tokens: int, seed: int) -> None:
        self.model, self.methods, self.questions = model, methods, questions
        self.bad_share, self.stream_share, self.max_tokens = bad_share, stream_share, max_tokens
        self.rng = random.Random(seed)

    def next(self) -> Planned:
        rng = self.rng
        q = rng.choice(self.questions)
        stream = rng.random() < self.stream_share
        headers: dict[str, str] = {}
        method = ratio = None
        if rng.random() < 0.2:
            headers["X-VLMPrune-Policy"] = rng.choice(NAMED_POLICIES)
        else:
            method, ratio = rng.choice(self.methods), rng.choice(RATIOS)
            headers["X-VLMPrune-Method"], headers["X-VLMPrune-Ratio"] = method, str(ratio)
        body: dict[str, Any] = {"model": self.model, "messages": _messages(q), "max_tokens": self.max_tokens,
                                "temperature": 0.0, "stream": stream}
        if rng.random() >= self.bad_share:
            return Planned("good", stream, headers, json.dumps(body).encode(), 200, method, ratio, q.answer)
        kind = rng.choice(sorted(BAD_KINDS))
        extra_headers, change, status = BAD_KINDS[kind]
        change = change or {}
        if "image_url" in change:
            body["messages"] = _messages(q, url=change["image_url"])
        if "images" in change:
            body["messages"] = _messages(q, images=change["images"])
        if "messages" in change:
            body["messages"] = change["messages"]
        raw = change.get("raw") or json.dumps(body).encode()
        return Planned(kind, stream, {**headers, **extra_headers}, raw, status)


# --- one request --------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    stream: bool
    ok: bool
    status: int | None
    seconds: float
    failure: str | None = None
    correct: bool | None = None


def _check_good(p: Planned, r: httpx.Response, text: str) -> tuple[str | None, bool | None]:
    """(what is wrong or None, answer correct)."""
    if r.status_code != 200:
        return f"status {r.status_code}", None
    try:
        applied = AppliedPolicy.parse(r.headers["x-vlmprune-applied"])
    except Exception as exc:  # a good answer always says what it applied
        return f"bad X-VLMPrune-Applied ({type(exc).__name__})", None
    if p.method is not None and (applied.method != p.method or applied.ratio != p.ratio):
        return "X-VLMPrune-Applied does not match the request", None
    if not 0 < applied.kept <= applied.visual_tokens:
        return "kept count out of range", None
    if p.stream:
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return "stream without [DONE]", None
        payloads = [json.loads(e) for e in events[:-1]]
        if any("error" in e for e in payloads):
            return "stream ended with an error event", None
        content = "".join((c.get("delta") or {}).get("content") or "" for e in payloads for c in e.get("choices", []))
    else:
        content = r.json()["choices"][0]["message"]["content"] or ""
    if not content.strip():
        return "empty answer", None
    return None, content.strip().rstrip(" .").lower() == (p.answer or "").lower()


def _check_bad(p: Planned, r: httpx.Response) -> str | None:
    if r.status_code != p.expect_status:
        return f"status {r.status_code}, expected {p.expect_status}"
    try:
        error = r.json()["error"]
    except Exception:  # not JSON or no "error": not OpenAI's shape
        return "error not in OpenAI's shape"
    if set(error) != {"message", "type", "param", "code"} or error["code"] != p.expect_status:
        return "error not in OpenAI's shape"
    return None


async def send(client: httpx.AsyncClient, url: str, p: Planned) -> Outcome:
    t0 = time.perf_counter()
    headers = {"content-type": "application/json", **p.headers}
    try:
        async with client.stream("POST", url + CHAT, content=p.body, headers=headers) as r:
            text = (await r.aread()).decode(errors="replace")
    except Exception as exc:  # timeouts, dropped connections: a lost request
        return Outcome(p.kind, p.stream, False, None, time.perf_counter() - t0, f"exception {type(exc).__name__}")
    seconds = time.perf_counter() - t0
    try:
        if p.kind == "good":
            failure, correct = _check_good(p, r, text)
        else:
            failure, correct = _check_bad(p, r), None
    except Exception as exc:  # an unparseable answer
        failure, correct = f"unparseable answer ({type(exc).__name__})", None
    return Outcome(p.kind, p.stream, failure is None, r.status_code, seconds, failure, correct)


async def drive(url: str, mix: Mix, clients: int, duration_s: float, timeout_s: float) -> list[Outcome]:
    """``clients`` loops, each sending its next request when the previous one is answered."""
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def loop() -> None:
            while time.monotonic() < deadline:
                outcomes.append(await send(client, url, mix.next()))

        await asyncio.gather(*(loop() for _ in range(clients)))
    return outcomes


# --- the server and its memory ------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    log: Path
    startup_s: float


def start_serve(model: str, log: Path, timeout_s: float, mm_cache_gb: float, vllm_args: list[str] = ()) -> Served:
    port = free_port()
    cmd = [sys.executable, "-m", "vlmprune", "serve", "--model", model, "--port", str(port),
           "--vllm-log", str(log.with_suffix(".vllm.log")), "--log-level", "warning",
           f"--vllm-arg=--mm-processor-cache-gb={mm_cache_gb:g}", *(f"--vllm-arg={a}" for a in vllm_args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    while "started in" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
            stop_serve(proc)  # SIGTERM: `vlmprune serve` then stops its vLLM process group too
            raise RuntimeError(f"vlmprune serve did not start (rc={proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return Served(proc, f"http://127.0.0.1:{port}", log, time.monotonic() - t0)


def stop_serve(proc: subprocess.Popen) -> int | str:
    """SIGTERM (the launcher stops vLLM's whole process group), SIGKILL after 120 s; the exit code."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "killed after 120 s"


def rss_mib(serve_pid: int) -> dict[str, float]:
    """Gateway = the `vlmprune serve` process (uvicorn runs in it); engine = everything under it."""
    gateway = psutil.Process(serve_pid)
    engine = 0
    for child in gateway.children(recursive=True):
        try:
            engine += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return {"gateway": gateway.memory_info().rss / 2**20, "engine": engine / 2**20}


def per_minute(samples: list[dict[str, float]]) -> list[dict[str, float]]:
    """The last RSS sample of each whole minute of the load, and its growth over the minute before."""
    out: list[dict[str, float]] = []
    for minute in range(1, int(max((x["t"] for x in samples), default=0) // 60) + 1):
        upto = [x for x in samples if x["t"] <= minute * 60]
        if not upto:
            continue
        last = upto[-1]
        prev = out[-1] if out else samples[0]
        out.append({"minute": minute, "gateway": last["gateway"], "engine": last["engine"],
                    "engine_growth": last["engine"] - prev["engine"], "gateway_growth": last["gateway"] - prev["gateway"]})
    return out


async def sample_rss(pid: int, every_s: float, into: list[dict[str, float]], stop: asyncio.Event) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        into.append({"t": round(time.monotonic() - t0, 1), **rss_mib(pid)})
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


def served_methods(model: str) -> list[str]:
    """The methods the vLLM plugin serves whose model families include the served model's
    (globalcom2 is LLaVA-NeXT only; fastv is reference-backend only for now)."""
    from server.model_info import ServedModel
    from vlmprune.methods import METHODS, vllm_serves
    from vlmprune.testbed.registry import resolve_model

    family = ServedModel(str(resolve_model(model))).family
    return [name for name in METHODS if vllm_serves(name, family)]


# --- report -------------------------------------------------------------------------------------


def summarize(outcomes: list[Outcome], rss: dict[str, dict[str, float]], args: argparse.Namespace,
              extra: dict[str, Any]) -> dict[str, Any]:
    good = [o for o in outcomes if o.kind == "good"]
    bad = [o for o in outcomes if o.kind != "good"]
    failures = Counter(f"{'good' if o.kind == 'good' else 'bad/' + o.kind}: {o.failure}" for o in outcomes if not o.ok)

    def pct(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p99": None}
        return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}

    growth = {k: rss["end"][k] - rss["start"][k] for k in ("gateway", "engine")}
    bounds = {"gateway": args.max_gateway_growth_mib, "engine": args.max_engine_growth_mib}
    judged = [o.correct for o in good if o.correct is not None]
    summary = {
        "config": {"model": args.model, "clients": args.clients, "duration_s": args.duration,
                   "vllm_args": list(args.vllm_arg),
                   "mm_processor_cache_gb": args.mm_cache_gb,
                   "bad_share": args.bad_share, "stream_share": args.stream_share, "max_tokens": args.max_tokens,
                   "seed": args.seed, "methods": extra["methods"]},
        "requests": {
            "sent": len(outcomes),
            "answered": sum(o.status is not None for o in outcomes),
            "good": {"sent": len(good), "ok": sum(o.ok for o in good), "lost": sum(not o.ok for o in good)},
            "bad": {"sent": len(bad), "refused_correctly": sum(o.ok for o in bad),
                    "wrong": sum(not o.ok for o in bad),
                    "by_kind": dict(sorted(Counter(o.kind for o in bad).items()))},
            "failures_by_class": dict(sorted(failures.items())),
            "per_second": len(outcomes) / args.duration,
        },
        "latency_s": {"good": pct([o.seconds for o in good if o.ok]),
                      "good_stream": pct([o.seconds for o in good if o.ok and o.stream]),
                      "good_non_stream": pct([o.seconds for o in good if o.ok and not o.stream]),
                      "bad": pct([o.seconds for o in bad])},
        "accuracy": sum(judged) / len(judged) if judged else None,
        "rss_mib": {**rss, "growth": growth, "bound": bounds, "per_minute": per_minute(rss["samples"])},
        **extra["checks"],
    }
    problems = []
    if summary["requests"]["good"]["lost"]:
        problems.append(f"{summary['requests']['good']['lost']} good requests lost")
    if summary["requests"]["bad"]["wrong"]:
        problems.append(f"{summary['requests']['bad']['wrong']} bad requests not refused as they should be")
    for k in ("gateway", "engine"):
        if growth[k] > bounds[k]:
            problems.append(f"{k} RSS grew {growth[k]:.0f} MiB, over the bound of {bounds[k]:.0f} MiB")
    if summary["in_flight_after"] != 0:
        problems.append(f"gateway reports {summary['in_flight_after']} requests in flight after the run")
    if summary["serve_exit_code"] != 0:
        problems.append(f"vlmprune serve exited {summary['serve_exit_code']} on SIGTERM")
    if not good:
        problems.append("no good request was sent")
    summary["problems"] = problems
    summary["passed"] = not problems
    return summary


def markdown(s: dict[str, Any]) -> str:
    c, r, lat, rss = s["config"], s["requests"], s["latency_s"], s["rss_mib"]

    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    accuracy = "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"

    lines = [
        f"# Soak: {c['clients']} clients for {c['duration_s']:g} s against `vlmprune serve --model {c['model']}`",
        "",
        f"**{'PASSED' if s['passed'] else 'FAILED'}**" + ("" if s["passed"] else ": " + "; ".join(s["problems"])),
        "",
        f"Mix: methods {', '.join(c['methods'])} at ratios {', '.join(f'{x:g}' for x in RATIOS)} or a named "
        f"policy; {c['stream_share']:.0%} streaming; {c['bad_share']:.0%} malformed; max_tokens {c['max_tokens']}; "
        f"seed {c['seed']}; vLLM `--mm-processor-cache-gb {c['mm_processor_cache_gb']:g}`. Host: {s['host']}.",
        "",
        "| requests | count |",
        "|---|---:|",
        f"| sent | {r['sent']} ({r['per_second']:.1f}/s) |",
        f"| answered (any HTTP status) | {r['answered']} |",
        f"| good: complete 200 | {r['good']['ok']} of {r['good']['sent']} |",
        f"| good: lost | {r['good']['lost']} |",
        f"| bad: refused with the right 4xx, OpenAI shape | {r['bad']['refused_correctly']} of {r['bad']['sent']} |",
        f"| bad: wrong answer | {r['bad']['wrong']} |",
    ]
    for cls, n in r["failures_by_class"].items():
        lines.append(f"| failed: {cls} | {n} |")
    lines += [
        "",
        "| latency (ms) | p50 | p99 |",
        "|---|---:|---:|",
        *(f"| {name.replace('_', ' ')} | {ms(v['p50'])} | {ms(v['p99'])} |" for name, v in lat.items()),
        "",
        f"Answer accuracy of the good requests (all ratios and methods): {accuracy}.",
        "",
        "| RSS (MiB) | after warm-up | end | peak | growth | bound |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {k} | {rss['start'][k]:.0f} | {rss['end'][k]:.0f} | {rss['peak'][k]:.0f} | {rss['growth'][k]:+.0f} | "
          f"{rss['bound'][k]:.0f} |" for k in ("gateway", "engine")),
        "",
        *(["| minute | engine RSS (MiB) | engine growth | gateway RSS | gateway growth |",
           "|---:|---:|---:|---:|---:|",
           *(f"| {m['minute']} | {m['engine']:.0f} | {m['engine_growth']:+.0f} | {m['gateway']:.0f} | "
             f"{m['gateway_growth']:+.0f} |" for m in rss["per_minute"]), ""] if rss["per_minute"] else []),
        f"After the run: gateway in-flight {s['in_flight_after']}, /health {s['health_after']}; "
        f"`vlmprune serve` exit code on SIGTERM {s['serve_exit_code']}; start-up {s['startup_s']:.0f} s.",
        "",
        f"Reproduce: `python bench/soak.py --clients {c['clients']} --duration {c['duration_s']:g}"
        + "".join(f" --vllm-arg={a}" for a in c.get("vllm_args", [])) + "`",
    ]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    methods = served_methods(args.model)
    questions = demo_questions(32)
    tmp = Path(tempfile.mkdtemp(prefix="vlmprune-soak."))
    served = start_serve(args.model, tmp / "serve.log", args.startup_timeout, args.mm_cache_gb, args.vllm_arg)
    print(f"soak: vlmprune serve up at {served.url} in {served.startup_s:.0f} s (log {served.log})", flush=True)
    checks: dict[str, Any] = {"startup_s": served.startup_s, "host": f"{os.cpu_count()} CPUs"}
    try:
        model_id = httpx.get(served.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        warm = Mix(model_id, methods, questions, bad_share=0.0, stream_share=0.5, max_tokens=args.max_tokens,
                   seed=args.seed + 1)
        warm_up = await drive(served.url, warm, args.clients, args.warmup, args.timeout)
        if not all(o.ok for o in warm_up):
            raise RuntimeError(f"warm-up failed: {Counter(o.failure for o in warm_up if not o.ok)}")
        start = rss_mib(served.proc.pid)
        checks["host"] += f", load average {os.getloadavg()[0]:.1f} when the load began"
        samples: list[dict[str, float]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(served.proc.pid, 5.0, samples, stop))
        mix = Mix(model_id, methods, questions, bad_share=args.bad_share, stream_share=args.stream_share,
                  max_tokens=args.max_tokens, seed=args.seed)
        print(f"soak: {args.clients} clients for {args.duration:g} s", flush=True)
        outcomes = await drive(served.url, mix, args.clients, args.duration, args.timeout)
        stop.set()
        await sampler
        await asyncio.sleep(2.0)  # let the engine finish any step it was in
        end = rss_mib(served.proc.pid)
        peak = {k: max([start[k], end[k], *(x[k] for x in samples)]) for k in ("gateway", "engine")}
        metrics = httpx.get(served.url + "/metrics", timeout=30).text
        in_flight = next(float(line.split()[-1]) for line in metrics.splitlines()
                         if line.startswith("vlmprune_in_flight_requests "))
        checks.update(in_flight_after=in_flight, health_after=httpx.get(served.url + "/health", timeout=30).status_code)
    finally:
        checks["serve_exit_code"] = stop_serve(served.proc)
    rss = {"start": start, "end": end, "peak": peak, "samples": samples}
    return summarize(outcomes, rss, args, {"methods": methods, "checks": checks})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default: %(default)s)")
    p.add_argument("--model", default="demo", help="model to serve (default: %(default)s)")
    p.add_argument("--bad-share", type=float, default=0.1, help="share of malformed requests (default: %(default)s)")
    p.add_argument("--stream-share", type=float, default=0.5, help="share of streaming requests (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=float, default=30.0,
                   help="seconds of good requests from every client before RSS is first read, so that the "
                        "engine's batch sizes and kernel shapes are warm (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--max-gateway-growth-mib", type=float, default=100.0,
                   help="gateway RSS growth allowed from warm-up to the end (default: %(default)s)")
    p.add_argument("--max-engine-growth-mib", type=float, default=300.0,
                   help="engine RSS growth allowed from warm-up to the end (default: %(default)s)")
    p.add_argument("--mm-cache-gb", type=float, default=0.0,
                   help="vLLM's --mm-processor-cache-gb (default: %(default)s = off; vLLM's own default, 4 GiB "
                        "in each of its two processes, fills with every distinct image and policy pair and "
                        "would read as RSS growth: raise the engine bound past twice it when you turn it on)")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for vLLM, passed on by vlmprune serve (repeatable, e.g. "
                        "--vllm-arg=--tensor-parallel-size=2)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default: bench/results)")
    p.add_argument("--tag", default="soak", help="file stem of the results (default: %(default)s)")
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or not 0 <= args.bad_share <= 1 or not 0 <= args.stream_share <= 1:
        p.error("--clients >= 1, --duration > 0, --bad-share and --stream-share in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(soak(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    (args.out / f"{args.tag}.md").write_text(text)
    print(text, flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
