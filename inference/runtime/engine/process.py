"""The engine in a process of its own, as vLLM v1 runs its EngineCore: the server's event loop (HTTP,
detokenizing, streaming) and the engine's steps then never wait for each other's turn at Python's GIL.

`EngineProcess(package_dir, ...)` starts a child process that verifies and loads the package, builds the
Engine (compiling its step when asked: inference.runtime.engine.compiled) and runs it: it takes requests and
aborts from a pipe, steps while there is work, and after each
step sends back, as one message, every request's outputs and a snapshot of its state (running and waiting
requests, KV blocks, counters). A thread in the server process reads those messages and calls each
request's on_output, as the in-process Engine would, so the serving layer uses either one alike.

The checks that answer a request at once (its length against the context and the cache, a full queue)
run in the server process, from the engine's configuration and its last snapshot. The child exits when
its pipe closes, so it never outlives the server.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from pathlib import Path

from inference.runtime.engine.engine import EngineConfig, EngineSnapshot, EngineStats, QueueFull, check_request
from inference.runtime.engine.sampler import SamplingParams
from inference.runtime.engine.scheduler import SequenceOutput


def _child(package_dir: str, kv_cache: str | None, config: EngineConfig, speculative: bool, threads: int | None,
           compile: bool, requests, outputs) -> None:  # fmt: skip
    """The engine process: load (and compile the step), say ready (or why not), then serve the pipe until it
    closes."""
    import torch

    from inference.runtime.engine.engine import Engine
    from inference.runtime.package import load_package

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        package = load_package(Path(package_dir), kv_cache=kv_cache)
        config.gamma = package.gamma
        if not speculative:
            config.proposer = "none"
        engine = Engine(package.target, package.draft, config)
        compile_seconds = engine.compile() if compile else None
    except Exception as e:  # the server reports it and exits
        outputs.send(("failed", f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)))
        return
    tokenizer = package.target.tokenizer
    outputs.send(("ready", package.name, tokenizer.to_str(), engine.max_seq_len, engine.pool.num_blocks,
                  compile_seconds, engine.proposer))  # fmt: skip
    pending: list[SequenceOutput] = []
    while True:
        try:
            wait = 0 if engine.has_work() else None
            while requests.poll(wait):
                message = requests.recv()
                if message[0] == "stop":
                    return
                if message[0] == "add":
                    _, request_id, prompt_ids, params, timeout = message
                    try:
                        engine.add(request_id, prompt_ids, params, pending.append, timeout)
                    except (ValueError, QueueFull) as e:
                        pending.append(SequenceOutput(request_id, [], finish_reason="error", error=str(e)))
                else:
                    engine.abort(message[1], message[2])
                wait = 0
        except EOFError:  # the server is gone
            return
        if engine.has_work():
            engine.step()
        outputs.send(("outputs", pending, engine.snapshot()))  # pickled here and now
        pending.clear()  # the same list: the engine holds its append


class EngineProcess:
    """The Engine's interface (add, abort, snapshot, start, stop, config, max_seq_len), served by a child
    process. Construction waits until the child has loaded the package; a ValueError says why it could not."""

    def __init__(self, package_dir: Path, kv_cache: str | None, config: EngineConfig, speculative: bool = True,
                 threads: int | None = None, compile: bool = False, start_timeout: float = 1800):  # fmt: skip
        config.check()
        self.config = config
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks inherited
        requests_in, self._requests = ctx.Pipe(duplex=False)  # (receiving end, sending end)
        self._outputs, outputs_out = ctx.Pipe(duplex=False)
        args = (str(package_dir), kv_cache, config, speculative, threads, compile, requests_in, outputs_out)
        self._process = ctx.Process(target=_child, args=args, name="frugal-engine", daemon=True)
        self._process.start()
        requests_in.close()  # the child's ends: closed here, so a child that dies reads as EOF
        outputs_out.close()
        if not self._outputs.poll(start_timeout):
            self._process.kill()
            raise ValueError(f"the engine process did not start within {start_timeout} s")
        try:
            message = self._outputs.recv()
        except EOFError:
            raise ValueError(f"the engine process exited at start (exit code {self._process.exitcode})") from None
        if message[0] == "failed":
            self._process.join(timeout=10)
            raise ValueError(message[1])
        from tokenizers import Tokenizer

        _, self.name, tokenizer_json, self.max_seq_len, self.num_blocks, self.compile_seconds, self.proposer = message
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self._callbacks: dict[str, Callable[[SequenceOutput], None]] = {}
        self._lock = threading.Lock()
        self._snapshot = EngineSnapshot(0, 0, {"total": self.num_blocks, "used": 0, "cached": 0,
                                               "free": self.num_blocks}, 0, 0, EngineStats())  # fmt: skip
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="frugal-engine-reader", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        try:
            with self._lock:
                self._requests.send(("stop",))
        except (OSError, BrokenPipeError):
            pass
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _read(self) -> None:
        while True:
            try:
                _, outputs, snapshot = self._outputs.recv()
            except (EOFError, OSError):
                return
            with self._lock:
                self._snapshot = snapshot
                calls = [(self._callbacks.get(out.request_id), out) for out in outputs]
                for out in outputs:
                    if out.finish_reason is not None:
                        self._callbacks.pop(out.request_id, None)
            for callback, out in calls:
                if callback is not None:
                    callback(out)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
            on_output: Callable[[SequenceOutput], None], timeout: float | None = None) -> None:  # fmt: skip
        """Queue a request in the engine process; the same checks, raised here, as Engine.add."""
        check_request(prompt_ids, params, self.max_seq_len, self.config.block_size, self.num_blocks)
        with self._lock:
            if request_id in self._callbacks:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self._callbacks) - self._snapshot.running >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are waiting")
            self._callbacks[request_id] = on_output
            self._requests.send(("add", request_id, list(prompt_ids), params, timeout))

    def abort(self, request_id: str, reason: str = "abort") -> None:
        with self._lock:
            if request_id in self._callbacks:
                self._requests.send(("abort", request_id, reason))

    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            return self._snapshot
