"""Runs llama-cpp-python's own OpenAI-compatible server as a real upstream for satstream's tests
and benchmarks, plus one instrumentation route, GET /satstream/stats:
    {"sampled": tokens the engine sampled since start (an EOS token included),
     "requests": completion/chat requests that got the model, "active": those still holding it}
so a test can see, on the upstream's own side, how far generation went after its client left.

Usage (PY from scripts/setup-upstream.sh):
    $PY scripts/upstream.py --model M.gguf --port P [--n_threads 1] [--n_ctx 2048] [--any
        other llama_cpp.server setting, e.g. --n_batch 512 --verbose true]
Listens on 127.0.0.1 (--port 0 picks a free port) and prints `upstream ready on 127.0.0.1:P` on
stdout once it accepts connections. interrupt_requests defaults to False: llama-cpp-python's
default cuts a running stream short with [DONE] as soon as another request queues, and satstream
sends concurrent requests that must queue instead.
"""

import argparse
import contextlib
import socket
import sys
import threading

import uvicorn
from llama_cpp import Llama
from llama_cpp.server import app as server_app
from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

stats = {"sampled": 0, "requests": 0, "active": 0}
_lock = threading.Lock()  # sample() runs on worker threads, the stats route on the event loop

# Every token the engine generates goes through Llama.sample (Llama.generate calls it once per
# token, for completions and chats alike), and nothing else calls it in the server, so counting
# here counts each generated token exactly once, whether the request ran to its end or not.
_sample = Llama.sample


def _counting_sample(self, *args, **kwargs):
    token = _sample(self, *args, **kwargs)
    with _lock:
        stats["sampled"] += 1
    return token


Llama.sample = _counting_sample

# A request can only advance its token generator while it holds the model through
# get_llama_proxy: the completion and chat routes look that function up at call time, and
# cancelling a request on disconnect waits for the worker thread's current next() (starlette's
# iterate_in_threadpool does not abandon it) before the model is released. So once "active" is
# back to 0, "sampled" is final for every request that has ended.
_get_llama_proxy = server_app.get_llama_proxy


async def _counting_get_llama_proxy():
    async with contextlib.asynccontextmanager(_get_llama_proxy)() as proxy:
        with _lock:
            stats["requests"] += 1
            stats["active"] += 1
        try:
            yield proxy
        finally:
            with _lock:
                stats["active"] -= 1


server_app.get_llama_proxy = _counting_get_llama_proxy


def main():
    # stdout carries only the ready line: the server's own chatter (print()s) goes to stderr.
    out, sys.stdout = sys.stdout, sys.stderr
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args_from_model(parser, Settings)
    parser.set_defaults(host="127.0.0.1", n_threads=1, n_ctx=2048, interrupt_requests=False,
                        verbose=False)
    args = parser.parse_args()
    server_settings = parse_model_from_args(ServerSettings, args)
    model_settings = parse_model_from_args(ModelSettings, args)
    app = server_app.create_app(server_settings=server_settings, model_settings=[model_settings])

    @app.get("/satstream/stats")
    def satstream_stats():
        with _lock:
            return dict(stats)

    # Bound here rather than by uvicorn so that --port 0 works and the ready line has the port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((server_settings.host, server_settings.port))
    host, port = sock.getsockname()[:2]

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                print(f"upstream ready on {host}:{port}", file=out, flush=True)

    Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
