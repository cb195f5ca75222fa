#!/usr/bin/env python3
"""The soak under faults behind scripts/soak.sh (issue 14 item 5); standard library only.

Starts `tpserve serve` (the default model, TP=3 CPU workers, a small --max-waiting-requests),
then, until both SOAK_MINUTES have passed and SOAK_REQUESTS steady requests have been sent (or
SOAK_MAX_MINUTES, twice SOAK_MINUTES by default, have passed: the request count then fails):

- SOAK_CONCURRENCY steady clients, each sending one request after another over a fresh
  HTTP/1.1 connection: chat or completions, streamed or not, prompts of 3 to 200 words,
  max_tokens 1 to 16, greedy or sampled. 20% of them are cancelled (the client closes the
  connection) at a random point: after 0 to max_tokens streamed events, or 0 to 1.5 s into a
  non-streamed request. 5% stop reading once the response starts, for a few seconds, behind a
  small receive buffer, and then read it to the end.
- every 1/12 of the run, a burst of requests at once, several times --max-waiting-requests: some
  must get 429.
- at 35% and 70% of the run, SIGKILL of a worker (rank 1, then rank 0); the server fails the
  requests it was running, answers 503 while the group re-forms and serves again.
- every SAMPLE_SECONDS, the resident memory of the coordinator and of each worker, and the KV
  usage, running and waiting counts from /metrics.

Then it checks: no request passed its deadline (none hung), every one ended in a completion, a
cancellation by the client, a 429, or (only when it overlapped a worker's loss) an error event
or a 5xx; no stream was cut short; KV usage, running and waiting return to 0; each process's
memory is flat after warm-up (the mean of the last quarter of its samples within 5% + 8 MiB of
the first quarter's); the same greedy request answers as it did before the load, a stream ends
with [DONE], the log holds no panic, and SIGTERM stops the server cleanly. It prints the figures
and the memory curve and writes summary.json, memory.csv and requests.csv to SOAK_OUT.
"""

import argparse
import asyncio
import csv
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

MODEL_NAME = "smollm2"
# SmolLM2-135M's 9 attention heads split over 3 ranks (not 2).
TP = 3
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 48
MAX_WAITING = 16
# KV cache per worker, GiB: small enough that the whole pool has been written during warm-up (the
# prefix cache hands out free blocks least recently used first, so a large pool's pages would
# keep being touched for the first time long after warm-up and read as growth), large enough
# for MAX_NUM_SEQS typical requests (~260 blocks of 16 tokens a rank at TP=3): a run of long
# prompts preempts, which the soak then covers too.
KV_CACHE_GIB = 0.06
# A worker's warm-up: long enough for its whole (small) KV pool to have been written once.
WORKER_WARMUP_S = 120.0
BURST = 4 * MAX_WAITING + MAX_NUM_SEQS
# A request that has not ended this long after it was sent has hung. Far above the slowest
# legitimate one: on two cores shared with builds a full batch's step can take seconds, and a
# stalled client's 48 tokens then take minutes (the summary reports the slowest that ended).
DEADLINE_S = 600.0
SAMPLE_SECONDS = 5.0
CANCEL_FRACTION = 0.20
STALL_FRACTION = 0.05
# Memory is flat when the last quarter's mean is within this of the first quarter's.
FLAT_RATIO = 0.05
FLAT_SLACK_MIB = 8.0
GREEDY = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 16,
          "messages": [{"role": "user", "content": "What is the capital of France?"}]}

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first water "
    "been call who oil its now find long down day did get come made may part sea river city "
    "mountain story cat dog house garden light music bread window morning evening friend"
).split()


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


# --- HTTP/1.1 over asyncio streams (each request on its own connection) ---------------------

class Http:
    def __init__(self, host, port):
        self.host, self.port = host, port

    async def open(self, small_buffer=False):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if small_buffer:
            # The kernel's smallest receive window: the server meets backpressure soon.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        return await asyncio.open_connection(sock=sock, limit=2048 if small_buffer else 2**16)

    @staticmethod
    async def send(writer, method, path, body=None):
        head = f"{method} {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n"
        data = b""
        if body is not None:
            data = json.dumps(body).encode()
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        writer.write(head.encode() + b"\r\n" + data)
        await writer.drain()

    @staticmethod
    async def head(reader):
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed before a status line")
        status = int(line.split()[1])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                return status, headers
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()

    @staticmethod
    async def chunks(reader, headers):
        """The body's pieces as they come (chunked, Content-Length or to the end)."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readline()
                if not size_line:
                    raise ConnectionError("chunked body cut short")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield await reader.readexactly(size)
                await reader.readexactly(2)
        elif "content-length" in headers:
            yield await reader.readexactly(int(headers["content-length"]))
        else:
            while piece := await reader.read(65536):
                yield piece

    async def get(self, path):
        reader, writer = await self.open()
        try:
            await self.send(writer, "GET", path)
            status, headers = await self.head(reader)
            body = b"".join([c async for c in self.chunks(reader, headers)])
            return status, body
        finally:
            writer.close()

    async def post_json(self, path, body):
        reader, writer = await self.open()
        try:
            await self.send(writer, "POST", path, body)
            status, headers = await self.head(reader)
            data = b"".join([c async for c in self.chunks(reader, headers)])
            return status, json.loads(data)
        finally:
            writer.close()


def sse_events(buffer):
    """Splits complete SSE events off `buffer`; returns (their data strings, the rest)."""
    out = []
    while b"\n\n" in buffer:
        block, buffer = buffer.split(b"\n\n", 1)
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                out.append(line[6:].decode())
    return out, buffer


# --- One request --------------------------------------------------------------------------

class Plan:
    """What one client does: the request, and whether it cancels or stalls."""

    def __init__(self, rng, kind, stall_range):
        self.kind = kind
        self.chat = rng.random() < 0.5
        self.stream = rng.random() < 0.5
        roll = rng.random()
        words = rng.randint(3, 12) if roll < 0.7 else rng.randint(20, 60) if roll < 0.95 \
            else rng.randint(100, 200)
        self.prompt_words = words
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        self.max_tokens = rng.randint(1, 16)
        body = {"model": MODEL_NAME, "max_tokens": self.max_tokens}
        if rng.random() < 0.5:
            body["temperature"] = 0
        else:
            body.update(temperature=0.8, top_p=0.95, seed=rng.randint(0, 2**31))
        self.behaviour = "normal"
        self.cancel_after_events = self.cancel_after_s = self.stall_s = None
        if kind == "burst":
            self.chat, self.stream, self.max_tokens = False, False, 4
            body["max_tokens"] = 4
        elif kind == "final":
            self.stream = True
        else:
            roll = rng.random()
            if roll < CANCEL_FRACTION:
                self.behaviour = "cancel"
                if self.stream:
                    self.cancel_after_events = rng.randint(0, self.max_tokens - 1)
                else:
                    self.cancel_after_s = rng.uniform(0, 1.5)
            elif roll < CANCEL_FRACTION + STALL_FRACTION:
                # Enough output to fill the socket buffers behind a stalled reader.
                self.behaviour = "stall"
                self.max_tokens = 48
                body.update(max_tokens=48, ignore_eos=True)
                self.stall_s = rng.uniform(*stall_range)
        if self.stream:
            body["stream"] = True
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
            self.path = "/v1/chat/completions"
        else:
            body["prompt"] = prompt
            self.path = "/v1/completions"
        self.body = body


async def run_request(http, plan, t0):
    """Runs `plan`; returns its record (outcome, status, times, detail)."""
    rec = {"kind": plan.kind, "behaviour": plan.behaviour, "path": plan.path,
           "stream": plan.stream, "max_tokens": plan.max_tokens,
           "prompt_words": plan.prompt_words, "start": time.monotonic() - t0,
           "status": None, "outcome": None, "detail": "", "retry_after": None,
           "events": 0, "last_event": None, "t0": t0}
    deadline = DEADLINE_S + (plan.stall_s or 0)
    writer = None
    try:
        async with asyncio.timeout(deadline):
            reader, writer = await http.open(small_buffer=plan.behaviour == "stall")
            await Http.send(writer, "POST", plan.path, plan.body)
            if plan.cancel_after_s is not None:
                try:
                    async with asyncio.timeout(plan.cancel_after_s):
                        status, headers = await Http.head(reader)
                except TimeoutError:
                    rec["outcome"] = "cancelled"
                    return rec
            else:
                status, headers = await Http.head(reader)
            rec["status"] = status
            if plan.stall_s is not None:
                await asyncio.sleep(plan.stall_s)
            if status != 200:
                data = b"".join([c async for c in Http.chunks(reader, headers)])
                err = json.loads(data).get("error", {})
                rec["outcome"] = f"http_{status}"
                rec["detail"] = f"{err.get('code')}: {err.get('message')}"
                rec["retry_after"] = headers.get("retry-after")
                return rec
            if not plan.stream:
                data = b"".join([c async for c in Http.chunks(reader, headers)])
                body = json.loads(data)
                rec["outcome"], rec["detail"] = check_completion(body, plan)
                return rec
            rec["outcome"], rec["detail"] = await read_stream(reader, headers, plan, rec)
            return rec
    except TimeoutError:
        rec["outcome"] = "hung"
        rec["detail"] = (f"no end within {deadline:.0f} s (status {rec['status']}, "
                         f"{rec['events']} events, the last {rec['last_event']} s into the run)")
        return rec
    except (ConnectionError, asyncio.IncompleteReadError, OSError, ValueError) as e:
        rec["outcome"] = "broken"
        rec["detail"] = f"{type(e).__name__}: {e}"
        return rec
    finally:
        rec["end"] = time.monotonic() - t0
        del rec["t0"]
        if writer is not None:
            writer.close()


def check_completion(body, plan):
    choices = body.get("choices") or []
    if not choices:
        return "bad", f"no choices: {str(body)[:200]}"
    for c in choices:
        if c.get("finish_reason") not in ("stop", "length"):
            return "bad", f"finish_reason {c.get('finish_reason')!r}"
    used = body.get("usage", {}).get("completion_tokens", 0)
    if used > plan.max_tokens:
        return "bad", f"{used} completion tokens over max_tokens {plan.max_tokens}"
    return "completed", ""


async def read_stream(reader, headers, plan, rec):
    """Reads an SSE body, counting its events into `rec` (so a hang says how far it got)."""
    buffer, events, finished, done = b"", 0, False, False
    async for piece in Http.chunks(reader, headers):
        new, buffer = sse_events(buffer + piece)
        for data in new:
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                err = event["error"]
                return "error_event", f"{err.get('code')}: {err.get('message')}"
            events += 1
            rec["events"], rec["last_event"] = events, round(time.monotonic() - rec["t0"], 1)
            if any(c.get("finish_reason") for c in event.get("choices", [])):
                finished = True
            if plan.cancel_after_events is not None and events > plan.cancel_after_events:
                return "cancelled", f"after {events} events"
    if done and finished:
        return "completed", ""
    return "truncated", f"{events} events, [DONE] {done}, finish_reason {finished}"


# --- The server and its processes -------------------------------------------------------------

def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return out


def workers_of(server_pid):
    """{rank: pid} of the server's live tpserve-worker children."""
    found = {}
    for pid in children(server_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"tpserve-worker" not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            found[int(env.get(b"TPSERVE_RANK", b"-1"))] = pid
        except OSError:
            pass
    return found


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def parse_metrics(text):
    values = {}
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "vllm:num_requests_waiting"):
        m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        values[name] = float(m.group(1)) if m else None
    return values


def start_server(args, out_dir):
    log_file = open(os.path.join(out_dir, "server.log"), "w")
    cmd = [args.tpserve, "serve", "--model", args.model, "--served-model-name", MODEL_NAME,
           "--device", "cpu", "-t", str(TP), "--max-model-len", str(MAX_MODEL_LEN),
           "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting-requests", str(MAX_WAITING),
           "--kv-cache-space", str(KV_CACHE_GIB),
           "--host", "127.0.0.1", "--port", "0", "--print-listening-url", "--progress", "off"]
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, env=env, text=True)
    for line in proc.stdout:
        if line.startswith("TPSERVE_LISTENING "):
            url = line.split()[1]
            break
    else:
        sys.exit(f"tpserve did not start (exit {proc.wait()}); see {out_dir}/server.log")
    # Keep draining stdout so the server never blocks on a full pipe.
    asyncio.get_running_loop().run_in_executor(None, lambda: [None for _ in proc.stdout])
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return proc, host, int(port), log_file


# --- The run ----------------------------------------------------------------------------------

class Soak:
    def __init__(self, args, http, server, t0):
        self.args, self.http, self.server, self.t0 = args, http, server, t0
        self.minutes = float(os.environ.get("SOAK_MINUTES", "30"))
        self.target = int(os.environ.get("SOAK_REQUESTS", "10000"))
        self.concurrency = int(os.environ.get("SOAK_CONCURRENCY", "32"))
        self.max_minutes = float(os.environ.get("SOAK_MAX_MINUTES", 2 * self.minutes))
        self.rng = random.Random(int(os.environ.get("SOAK_SEED", "0")))
        self.stall_range = (5.0, 30.0) if self.minutes >= 10 else (2.0, 8.0)
        self.records, self.samples, self.faults = [], [], []
        self.steady_sent = 0
        self.stopping = False

    def now(self):
        return time.monotonic() - self.t0

    def done(self):
        """At least SOAK_MINUTES and SOAK_REQUESTS, but no longer than SOAK_MAX_MINUTES (a slow
        machine then fails the request count, and says by how much)."""
        if self.now() >= self.max_minutes * 60:
            return True
        return self.now() >= self.minutes * 60 and self.steady_sent >= self.target

    async def steady_client(self):
        while not self.stopping:
            if self.done():
                return
            self.steady_sent += 1
            rec = await run_request(self.http, Plan(self.rng, "steady", self.stall_range), self.t0)
            self.records.append(rec)
            # Back off as a real client does: Retry-After on 503, a moment on 429.
            if rec["outcome"] == "http_503":
                await asyncio.sleep(min(float(rec["retry_after"] or 1), 2.0))
            elif rec["outcome"] == "http_429":
                await asyncio.sleep(self.rng.uniform(0.2, 1.0))

    async def bursts(self):
        interval = max(20.0, self.minutes * 60 / 12)
        while not self.stopping:
            await asyncio.sleep(interval)
            if self.stopping:
                return
            plans = [Plan(self.rng, "burst", self.stall_range) for _ in range(BURST)]
            recs = await asyncio.gather(*(run_request(self.http, p, self.t0) for p in plans))
            self.records.extend(recs)
            refused = sum(r["outcome"] == "http_429" for r in recs)
            log(f"[{self.now():7.1f} s] burst of {BURST}: {refused} got 429")

    async def faults_task(self):
        for fraction, rank in ((0.35, 1), (0.70, 0)):
            await asyncio.sleep(max(0.0, fraction * self.minutes * 60 - self.now()))
            before = workers_of(self.server.pid)
            if rank not in before:
                self.faults.append({"rank": rank, "error": f"no worker of rank {rank}: {before}"})
                continue
            killed_at = self.now()
            os.kill(before[rank], signal.SIGKILL)
            log(f"[{killed_at:7.1f} s] SIGKILL worker rank {rank} (pid {before[rank]})")
            saw_unready, ready_at = False, None
            while self.now() - killed_at < 300:
                try:
                    status, _ = await self.http.get("/health")
                except OSError:
                    status = None
                if status != 200:
                    saw_unready = True
                elif saw_unready or self.now() - killed_at > 30:
                    ready_at = self.now()
                    break
                await asyncio.sleep(0.25)
            after = workers_of(self.server.pid)
            fault = {"rank": rank, "killed_pid": before[rank], "killed_at": killed_at,
                     "ready_at": ready_at, "saw_unready": saw_unready, "workers_after": after}
            self.faults.append(fault)
            log(f"[{self.now():7.1f} s] ready again: {ready_at is not None}, workers {after}")

    async def sampler(self):
        while not self.stopping:
            await self.sample()
            await asyncio.sleep(SAMPLE_SECONDS)

    async def sample(self):
        t = self.now()
        row = {"t": t, "coordinator": rss_mib(self.server.pid),
               "completed": sum(r["outcome"] == "completed" for r in self.records)}
        for rank, pid in workers_of(self.server.pid).items():
            row[f"worker{rank}"] = rss_mib(pid)
            row[f"worker{rank}_pid"] = pid
        try:
            status, body = await self.http.get("/metrics")
            row.update(parse_metrics(body.decode()) if status == 200 else {})
        except OSError:
            pass
        self.samples.append(row)
        return row

    async def run(self):
        sampler = asyncio.create_task(self.sampler())
        side = [asyncio.create_task(self.bursts()), asyncio.create_task(self.faults_task())]
        clients = [asyncio.create_task(self.steady_client()) for _ in range(self.concurrency)]
        progress = asyncio.create_task(self.progress())
        await asyncio.gather(*clients)
        # The faults belong to the run: let a late one finish (a slow run reaches 70% late).
        await side[1]
        self.stopping = True
        side[0].cancel()
        progress.cancel()
        await asyncio.gather(side[0], progress, return_exceptions=True)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)

    async def progress(self):
        while True:
            await asyncio.sleep(60)
            counts = {}
            for r in self.records:
                counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
            last = self.samples[-1] if self.samples else {}
            log(f"[{self.now():7.1f} s] sent {self.steady_sent} steady; {counts}; "
                f"rss coordinator {last.get('coordinator') or 0:.0f} MiB")


# --- Checks and the report --------------------------------------------------------------------

def overlaps_fault(rec, faults):
    for f in faults:
        start = f.get("killed_at")
        if start is None:
            continue
        end = (f.get("ready_at") or float("inf")) + 2.0
        if rec["start"] <= end and rec["end"] >= start - 0.5:
            return True
    return False


def classify(records, faults):
    """(counts by outcome and detail, the unexpected records)."""
    kinds, unexpected = {}, []
    for r in records:
        key = r["outcome"]
        if r["outcome"] not in ("completed", "cancelled"):
            key += " " + re.sub(r"\d+", "N", r["detail"])[:90]
        kinds[key] = kinds.get(key, 0) + 1
        ok = r["outcome"] in ("completed", "cancelled", "http_429") or (
            r["outcome"] in ("error_event", "http_500", "http_503") and overlaps_fault(r, faults))
        if not ok:
            unexpected.append(r)
    return kinds, unexpected


def memory_series(samples, key, pid_key=None):
    """(t, MiB) for `key`, split into one series per process (a worker's pid changes)."""
    series, current, pid = [], [], None
    for s in samples:
        if s.get(key) is None:
            continue
        if pid_key and s.get(pid_key) != pid:
            if current:
                series.append((pid, current))
            current, pid = [], s.get(pid_key)
        current.append((s["t"], s[key]))
    if current:
        series.append((pid, current))
    return series


def flatness(points, warmup_s):
    """Mean RSS of the first and last quarter after warm-up; None when too few samples."""
    start = points[0][0]
    after = [v for t, v in points if t - start >= warmup_s]
    if len(after) < 8:
        return None
    q = len(after) // 4
    first, last = sum(after[:q]) / q, sum(after[-q:]) / q
    return {"samples": len(after), "first_quarter_mib": round(first, 1),
            "last_quarter_mib": round(last, 1), "max_mib": round(max(after), 1),
            "flat": last <= first * (1 + FLAT_RATIO) + FLAT_SLACK_MIB}


def memory_table(samples):
    keys = ["coordinator"] + [f"worker{r}" for r in range(TP)]
    lines = ["minute | " + " | ".join(f"{k} MiB" for k in keys) + " | kv % | running | waiting"]
    by_minute = {}
    for s in samples:
        by_minute.setdefault(int(s["t"] // 60), s)
    for minute, s in sorted(by_minute.items()):
        cells = [f"{s.get(k) or 0:.0f}" for k in keys]
        kv = s.get("vllm:kv_cache_usage_perc")
        lines.append(f"{minute:6d} | " + " | ".join(cells) +
                     f" | {(kv or 0) * 100:.1f} | {s.get('vllm:num_requests_running')}"
                     f" | {s.get('vllm:num_requests_waiting')}")
    return "\n".join(lines)


async def wait_idle(http):
    last = {}
    for _ in range(240):
        status, body = await http.get("/metrics")
        last = parse_metrics(body.decode())
        if all(v == 0 for v in last.values()):
            return True, last
        await asyncio.sleep(0.25)
    return False, last


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tpserve", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    out_dir = os.environ.get("SOAK_OUT", "target/soak")
    os.makedirs(out_dir, exist_ok=True)
    server, host, port, log_file = start_server(args, out_dir)
    failures = []
    try:
        http = Http(host, port)
        status, before = await http.post_json("/v1/chat/completions", GREEDY)
        assert status == 200, before
        t0 = time.monotonic()
        soak = Soak(args, http, server, t0)
        log(f"soak: {soak.minutes} min, >= {soak.target} steady requests, "
            f"{soak.concurrency} clients, server pid {server.pid} on {host}:{port}")
        await soak.run()
        elapsed = soak.now()
        idle, idle_metrics = await wait_idle(http)
        await soak.sample()
        status, after = await http.post_json("/v1/chat/completions", GREEDY)
        stream = await run_request(http, Plan(random.Random(1), "final", (0, 0)), t0)
        if not idle:
            failures.append(f"the server did not return to idle: {idle_metrics}")
        answer = (before["choices"][0]["message"]["content"],
                  after.get("choices", [{}])[0].get("message", {}).get("content"))
        if status != 200 or answer[0] != answer[1]:
            failures.append(f"the greedy answer changed: {answer} (status {status})")
        if stream["outcome"] != "completed":
            failures.append(f"the final request did not complete: {stream}")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            exit_code = server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_code = "killed after 90 s"
        log_file.close()
    if exit_code != 0:
        failures.append(f"the server did not exit cleanly after SIGTERM: {exit_code}")
    with open(os.path.join(out_dir, "server.log"), errors="replace") as f:
        panics = [line.strip() for line in f if "panicked" in line]
    if panics:
        failures.append(f"{len(panics)} panics in the server log, first: {panics[0]}")

    records, faults = soak.records, soak.faults
    kinds, unexpected = classify(records, faults)
    for r in unexpected[:20]:
        failures.append(f"unexpected outcome: {r}")
    if len(unexpected) > 20:
        failures.append(f"... {len(unexpected) - 20} more unexpected outcomes")
    hung = [r for r in records if r["outcome"] == "hung"]
    steady = [r for r in records if r["kind"] == "steady"]
    if len(steady) < soak.target:
        failures.append(f"only {len(steady)} steady requests of {soak.target}")
    for i, f in enumerate(faults):
        if f.get("ready_at") is None or not f.get("saw_unready"):
            failures.append(f"worker loss {i + 1} did not unready and recover: {f}")
        elif f["killed_pid"] in f["workers_after"].values() or len(f["workers_after"]) != TP:
            failures.append(f"the killed worker was not replaced: {f}")
    if len(faults) != 2:
        failures.append(f"{len(faults)} worker losses happened, not 2")
    bursts = [r for r in records if r["kind"] == "burst"]
    if not any(r["outcome"] == "http_429" for r in bursts):
        failures.append("no burst was refused with 429: the bursts did not exceed the queue")

    warmup = max(60.0, 0.2 * soak.minutes * 60)
    memory = {}
    for key in ["coordinator"] + [f"worker{r}" for r in range(TP)]:
        pid_key = None if key == "coordinator" else f"{key}_pid"
        for pid, points in memory_series(soak.samples, key, pid_key):
            name = key if pid is None else f"{key} (pid {pid})"
            # A worker started mid-run warms up like a fresh one.
            result = flatness(points, warmup if pid is None else WORKER_WARMUP_S)
            memory[name] = result or {"samples": len(points), "flat": None}
            if result and not result["flat"]:
                failures.append(f"{name}'s memory grew after warm-up: {result}")
    latency = sorted(r["end"] - r["start"] for r in records if r["outcome"] == "completed")
    summary = {
        "minutes": round(elapsed / 60, 1), "steady_requests": len(steady),
        "completed_seconds": {
            "median": round(latency[len(latency) // 2], 1) if latency else None,
            "p99": round(latency[int(len(latency) * 0.99)], 1) if latency else None,
            "max": round(latency[-1], 1) if latency else None},
        "burst_requests": len(bursts), "requests": len(records),
        "cancelled": sum(r["outcome"] == "cancelled" for r in records),
        "cancel_planned": sum(r["behaviour"] == "cancel" for r in records),
        "stalled": sum(r["behaviour"] == "stall" for r in records),
        "streamed": sum(r["stream"] for r in records),
        "hung": len(hung), "unexpected": len(unexpected), "outcomes": kinds,
        "faults": faults, "memory": memory, "idle_after": idle_metrics,
        "final_answer": answer[1], "server_exit": exit_code, "failures": failures,
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    with open(os.path.join(out_dir, "memory.csv"), "w", newline="") as f:
        fields = sorted({k for s in soak.samples for k in s}, key=lambda k: (k != "t", k))
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(soak.samples)
    with open(os.path.join(out_dir, "requests.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0].keys()) if records else ["kind"])
        w.writeheader()
        w.writerows(records)
    print(memory_table(soak.samples))
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=2,
                     default=str))
    print(f"written: {out_dir}/summary.json, memory.csv, requests.csv, server.log")
    if failures:
        print("SOAK FAILED:", *failures, sep="\n  ")
        sys.exit(1)
    print("SOAK PASSED")


if __name__ == "__main__":
    asyncio.run(main())
