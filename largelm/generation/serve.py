"""``largelm-serve``: an OpenAI-style completion endpoint for one model, on aiohttp's web server.

    largelm-serve --checkpoint runs/gpt-tiny/checkpoints --port 8000
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "To be, or not", "max_tokens": 32, "temperature": 0.8, "top_p": 0.95, "seed": 1}'

``POST /v1/completions``: ``prompt`` (a string or a list of strings: one batch sharing one KV cache), ``max_tokens``
(default 16), ``temperature`` (default 1, 0 = greedy), ``top_p``, ``top_k`` (an extension), ``seed`` (default 0),
``model`` (ignored: one model is served). Answers OpenAI's ``text_completion`` object (choices with ``text`` and
``finish_reason`` ``stop`` at the end-of-document token or ``length``, and ``usage``). ``GET /v1/models`` lists the
model. A bad request answers 400 with ``{"error": {"message", "type": "invalid_request_error"}}``. Requests are
served one at a time (one model, one cache), off the event loop. Loads checkpoints as ``largelm-generate`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
import time
import uuid

import torch
from aiohttp import web

from largelm.checkpoint.manager import CheckpointError
from largelm.cli import positive_int
from largelm.config import ConfigError
from largelm.errors import ConversionError
from largelm.generation.load import LoadedModel, ModelLoadError, load_causal_lm
from largelm.model.generate import check_sampling, generate_batch
from largelm.quant import QuantizationError, single_process_parallel_state
from largelm.tokenizer import TokenizerError

MAX_PROMPTS = 64  # prompts per request (one batch)


class BadRequest(ValueError):
    pass


def _number(body: dict, key: str, default, kind=float, allow_none: bool = False):
    value = body.get(key, default)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def parse_request(body) -> dict:
    """The generation arguments of a completion request (BadRequest naming the field otherwise)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    prompt = body.get("prompt", "")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("'prompt' must be a string or a non-empty list of strings")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request")
    if body.get("n", 1) != 1:
        raise BadRequest("'n' must be 1 (send the prompt several times with different seeds instead)")
    args = {
        "prompts": prompts,
        "max_tokens": _number(body, "max_tokens", 16, int),
        "temperature": _number(body, "temperature", 1.0),
        "top_k": _number(body, "top_k", None, int, allow_none=True),
        "top_p": _number(body, "top_p", None, allow_none=True),
        "seed": _number(body, "seed", 0, int),
    }
    if args["max_tokens"] < 1:
        raise BadRequest(f"'max_tokens' must be >= 1, got {args['max_tokens']}")
    try:
        check_sampling(args["temperature"], args["top_k"], args["top_p"])
    except ValueError as err:
        raise BadRequest(str(err)) from None
    return args


def continuation(tok, prompt_ids: list[int], new: list[int]) -> str:
    """The text ``new`` adds to the prompt, with the space a word-initial piece carries (decoding ``new`` alone
    would drop it: sentencepiece strips the leading space of a text)."""
    full, head = tok.decode(prompt_ids + new), tok.decode(prompt_ids)
    return full[len(head):] if full.startswith(head) else tok.decode(new)


def complete(loaded: LoadedModel, args: dict) -> dict:
    """The OpenAI ``text_completion`` answer for parsed request ``args``."""
    tok = loaded.tokenizer
    ids = [tok.encode(p) or [tok.eos_id] for p in args["prompts"]]  # an empty prompt starts a document
    out = generate_batch(loaded.module, ids, args["max_tokens"], context=loaded.context, vocab_size=tok.vocab_size,
                         temperature=args["temperature"], top_k=args["top_k"], top_p=args["top_p"],
                         eos_id=tok.eos_id, seed=args["seed"])
    choices, completion_tokens = [], 0
    for index, (prompt_ids, row) in enumerate(zip(ids, out)):
        new = row[len(prompt_ids):]
        stopped = bool(new) and new[-1] == tok.eos_id
        completion_tokens += len(new)
        choices.append({"text": continuation(tok, prompt_ids, new[:-1] if stopped else new), "index": index,
                        "logprobs": None,
                        "finish_reason": "stop" if stopped else "length"})
    prompt_tokens = sum(len(i) for i in ids)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": loaded.describe, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


def build_app(loaded: LoadedModel) -> web.Application:
    lock = threading.Lock()  # one model, one generation at a time

    def locked_complete(args: dict) -> dict:
        with lock:
            return complete(loaded, args)

    async def completions(request: web.Request) -> web.Response:
        try:
            args = parse_request(await request.json())
        except ValueError as err:  # BadRequest, or JSON that does not parse (json.JSONDecodeError)
            return _error(400, str(err))
        answer = await asyncio.get_running_loop().run_in_executor(None, locked_complete, args)
        return web.json_response(answer)

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": loaded.describe, "object": "model", "owned_by": "largelm", "context_length": loaded.context}]})

    app = web.Application()
    app.add_routes([web.post("/v1/completions", completions), web.get("/v1/models", models)])
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="largelm-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="as for largelm-generate")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = a free port (printed)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the one the checkpoint records)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with single_process_parallel_state():
        try:
            with contextlib.redirect_stdout(sys.stderr):
                loaded = load_causal_lm(args.checkpoint, dtype, args.tokenizer)
        except (ModelLoadError, ConversionError, CheckpointError, ConfigError, QuantizationError,
                TokenizerError) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
        asyncio.run(_serve(build_app(loaded), args.host, args.port, loaded))
    return 0


async def _serve(app: web.Application, host: str, port: int, loaded: LoadedModel) -> None:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]  # the port given, or the free one chosen for --port 0
    print(f"serving {loaded.describe} on http://{host}:{bound}/v1/completions", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()  # until interrupted (Ctrl-C / SIGINT; SIGTERM ends the process)
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
