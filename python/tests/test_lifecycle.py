"""Workers are stopped and reaped on `del`, `with`, `shutdown()` and interpreter exit; Ctrl-C
cancels a running `generate` and leaves the engine usable; the GIL is released meanwhile."""

import gc
import os
import signal
import subprocess
import sys
import threading
import time

from conftest import alive, worker_children
from tpserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def test_del_stops_and_reaps_the_workers(model):
    before = worker_children()
    llm = LLM(model, max_model_len=1024)
    workers = worker_children() - before
    assert workers
    del llm
    gc.collect()
    assert not any(alive(p) for p in workers)


def test_leaving_a_with_block_stops_the_workers_and_later_use_is_refused(model):
    before = worker_children()
    with LLM(model, max_model_len=1024) as llm:
        workers = worker_children() - before
        assert "Paris" in llm.generate("The capital of France is", GREEDY)[0].outputs[0].text
    assert workers and not any(alive(p) for p in workers)
    try:
        llm.generate("Hello")
    except RuntimeError as e:
        assert str(e) == "the engine has been shut down"
    else:
        raise AssertionError("a shut-down engine generated")
    llm.shutdown()  # a second shutdown does nothing


EXIT_SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[2])
from conftest import worker_children
from tpserve import LLM
llm = LLM(sys.argv[1], max_model_len=1024)
print(" ".join(map(str, worker_children())), flush=True)
"""


def test_interpreter_exit_stops_the_workers(model):
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, model, os.path.dirname(__file__)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RUST_LOG": "warn"},
    )
    assert done.returncode == 0, done.stderr
    workers = [int(p) for p in done.stdout.split()]
    assert workers
    assert not any(alive(p) for p in workers)


CTRL_C_SCRIPT = """
import sys
from tpserve import LLM, SamplingParams
llm = LLM(sys.argv[1], max_model_len=4096)
try:
    # Printed inside the `try`: a signal that arrives before `generate` starts must not escape.
    print("GENERATING", flush=True)
    llm.generate(["Count to a million:"] * 8, SamplingParams(max_tokens=3000, ignore_eos=True))
    print("FINISHED", flush=True)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
print("AFTER", out[0].outputs[0].text, flush=True)
"""


def _default_sigint():
    # A shell without job control starts background commands with SIGINT ignored, the children
    # inherit that, and Python then installs no KeyboardInterrupt handler: give the child the
    # default disposition whatever launched the tests.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_cancels_generate_and_the_engine_stays_usable(model):
    child = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, model],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RUST_LOG": "warn"},
        preexec_fn=_default_sigint,
    )
    assert child.stdout.readline().strip() == "GENERATING"
    # 8 x 3,000 tokens take minutes on the CPU: a second later the child is inside `generate`.
    time.sleep(1)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err
    assert out.splitlines()[0] == "INTERRUPTED", out + err
    assert "Paris" in out.splitlines()[1] and out.splitlines()[1].startswith("AFTER")


def test_the_gil_is_released_while_the_engine_works(llm):
    ticks = 0
    worker = threading.Thread(
        target=llm.generate,
        args=(["Once upon a time"] * 4, SamplingParams(max_tokens=200, ignore_eos=True)),
        kwargs={"use_tqdm": False},
    )
    worker.start()
    # Python code on this thread runs only while the generating thread does not hold the GIL.
    while worker.is_alive():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    assert ticks > 10
