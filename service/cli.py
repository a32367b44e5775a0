"""`unmask generate | infill | midi | serve | batch | health | gateway`: the service's commands.

`generate`, `infill` and `midi` take one path: build the request (the client's proto builders,
mapped by `service.mapping` like any gRPC call), then hand it to a Dispatcher: a server with
`--server HOST:PORT` (only grpc is imported: no torch), else an in-process `LocalDispatcher`,
the same one `unmask serve` runs. `batch` always talks to a server (the batch store lives
there). Mistakes a user can make (a missing file, an unwritable --out, TLS files) are one
line and exit 2, checked before any work is sent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

COMMANDS = ("generate", "infill", "midi", "serve", "batch", "health", "gateway")  # torch-free


# ---- shared flags --------------------------------------------------------------------------


def add_client_args(p: argparse.ArgumentParser, *, required_server: bool = False) -> None:
    g = p.add_argument_group("server (gRPC client)")
    g.add_argument(
        "--server", default=os.environ.get("UNMASK_SERVER") or None,
        help="HOST:PORT of `unmask serve` (env UNMASK_SERVER)"
        + ("" if required_server else "; without it the model runs in-process"),
    )  # fmt: skip
    g.add_argument("--token", default=os.environ.get("UNMASK_TOKEN") or None,
                   help="bearer token (env UNMASK_TOKEN)")  # fmt: skip
    g.add_argument("--ca", default=os.environ.get("UNMASK_TLS_CA") or None,
                   help="PEM root certificate: use TLS (env UNMASK_TLS_CA)")  # fmt: skip
    g.add_argument("--server-name", default=None, help="TLS name to expect (tests, IPs)")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16"),
                   help="in-process: the weights' dtype; auto = bf16 where native "
                        "(env UNMASK_DTYPE)")  # fmt: skip


def apply_dtype_arg(args: argparse.Namespace) -> None:
    """--dtype sets UNMASK_DTYPE, which every model load reads (models/checkpoint.py)."""
    if getattr(args, "dtype", None):
        os.environ["UNMASK_DTYPE"] = args.dtype


def add_stream_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", action="store_true",
                   help="show the canvas being denoised, step by step (stderr)")  # fmt: skip


def client_from_args(args: argparse.Namespace) -> Any:
    from unmask.client import Client
    from unmask.settings import Settings

    target = args.server
    if not target:
        s = Settings.from_env()
        target = f"{s.host}:{s.port}"
    return Client(target, token=args.token, root_certificates=args.ca,
                  server_name=args.server_name, timeout=args.timeout)  # fmt: skip


# ---- running one request (remote or in-process) ------------------------------------------


def run(msg: Any, args: argparse.Namespace) -> Any:
    """A GenerateRequest through the server (--server) or an in-process LocalDispatcher."""
    from unmask.service.live_view import CanvasView

    apply_dtype_arg(args)
    modality = {1: "text", 2: "code", 3: "midi"}.get(msg.modality, "text")
    view = CanvasView(modality) if getattr(args, "stream", False) else None
    if args.server:
        with client_from_args(args) as client:
            if view is None:
                return client.run(msg)
            for event in client.run_stream(msg):
                view.update(event)
                if event["type"] == "final":
                    return event["generation"]
        raise RuntimeError("the stream ended without a final event")
    import asyncio

    return asyncio.run(_run_local(msg, args, view))


async def _run_local(msg: Any, args: argparse.Namespace, view: Any = None) -> Any:
    from unmask.client import Generation
    from unmask.service import mapping
    from unmask.service.dispatch import LocalDispatcher
    from unmask.settings import Settings

    settings = Settings.from_env().with_overrides(model=args.model, device=args.device,
                                                  max_batch=1)  # fmt: skip
    request = mapping.generation_request(msg, default_model=settings.model_name)
    dispatcher = LocalDispatcher(settings)
    await dispatcher.start()
    try:
        await dispatcher.wait_ready()
        job_id = await dispatcher.submit(request)
        async for event in dispatcher.events(job_id):
            if view is not None:
                view.update(event)
            if event.get("type") == "final":
                result = event["result"]
    finally:
        await dispatcher.close()
    if not result.ok:
        raise mapping.job_failed(result)
    return Generation(result.job_id, request.modality, result.output_text, result.output_midi,
                      result.usage, result.params, result.tokens)  # fmt: skip


def check_writable(path: str | None, flag: str = "--out") -> None:
    """Refuse an output path that cannot be written before any work is done."""
    from unmask.errors import InvalidArgument

    if not path:
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise InvalidArgument("is a directory; give a file name", field=flag, value=path)
    if not parent.is_dir():
        raise InvalidArgument(f"the folder {str(parent)!r} does not exist", field=flag, value=path)
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise InvalidArgument("cannot be written (permission denied)", field=flag, value=path)


def read_input(path: str, flag: str, binary: bool = False) -> str | bytes:
    """A file the user named, or one clear error naming the flag."""
    from unmask.errors import InvalidArgument

    try:
        return Path(path).read_bytes() if binary else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgument("no such file", field=flag, value=path) from None
    except IsADirectoryError:
        raise InvalidArgument("is a directory, not a file", field=flag, value=path) from None
    except PermissionError:
        raise InvalidArgument(
            "cannot be read (permission denied)", field=flag, value=path
        ) from None
    except UnicodeDecodeError:
        raise InvalidArgument("is not UTF-8 text", field=flag, value=path) from None


def emit(gen: Any, args: argparse.Namespace) -> int:
    from unmask.errors import InvalidArgument

    if gen.modality == "midi":
        if not args.out:
            raise InvalidArgument("MIDI output needs --out FILE.mid", field="--out")
        Path(args.out).write_bytes(gen.midi)
        print(f"wrote {args.out} ({len(gen.midi)} bytes)", file=sys.stderr)
        png = getattr(args, "png", None)
        if png is not None:
            from unmask.service.pianoroll import write_png

            path = write_png(gen.midi, png or Path(args.out).with_suffix(".png"))
            print(f"wrote {path} (piano roll)", file=sys.stderr)
    elif args.out:
        Path(args.out).write_text(gen.text, encoding="utf-8")
    elif not args.json:
        print(gen.text)
    if args.json:
        record: dict[str, Any] = {"job_id": gen.job_id, "usage": gen.usage, "params": gen.params}
        if gen.modality != "midi":
            record["output"] = gen.text
        print(json.dumps(record))
    else:
        print(json.dumps(gen.usage), file=sys.stderr)
    return 0


def _ints(text: str | None, flag: str) -> list[int]:
    from unmask.errors import InvalidArgument

    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument("comma-separated integers", field=flag, value=text) from None


def _params(args: argparse.Namespace) -> Any:
    return params_from_args(args)


def _model_name(args: argparse.Namespace) -> str:
    return (args.model or "") if args.server else ""


# ---- unmask generate / infill --server (called from models/cli.py) ---------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from unmask.client import chat_request, generate_request
    from unmask.errors import InvalidArgument

    check_writable(args.out)
    if args.chat is not None:
        if args.prompt or args.prompt_file or args.prompt_midi:
            raise InvalidArgument("--chat replaces the prompt", field="--chat")
        messages = ([("system", args.system)] if args.system else []) + [("user", args.chat)]
        msg = chat_request(messages, modality=args.modality, model=_model_name(args),
                           params=_params(args), stop=args.stop)  # fmt: skip
        return emit(run(msg, args), args)
    if args.prompt_file:
        prompt: str | bytes = read_input(args.prompt_file, "--prompt-file")
    elif args.prompt_midi:
        if args.modality != "midi":
            raise InvalidArgument("--prompt-midi needs --modality midi", field="--prompt-midi")
        prompt = read_input(args.prompt_midi, "--prompt-midi", binary=True)
    else:
        prompt = args.prompt or ""
    if isinstance(prompt, str) and args.modality == "midi":
        msg = _midi_msg(args, None)
    else:
        msg = generate_request(prompt, modality=args.modality, model=_model_name(args),
                               params=_params(args), stop=args.stop)  # fmt: skip
    return emit(run(msg, args), args)


def cmd_infill(args: argparse.Namespace) -> int:
    from unmask.client import infill_request, midi_request
    from unmask.errors import InvalidArgument

    check_writable(args.out)
    if args.modality == "midi":
        if not args.midi or not args.bars:
            raise InvalidArgument("MIDI infill needs --midi FILE and --bars", field="--bars")
        midi = read_input(args.midi, "--midi", binary=True)
        msg = midi_request(midi, bars=_ints(args.bars, "--bars"),
                           tracks=_ints(args.tracks, "--tracks"), model=_model_name(args),
                           params=_params(args))  # fmt: skip
    else:
        template = (read_input(args.template_file, "--template-file") if args.template_file
                    else args.template)  # fmt: skip
        if not template:
            raise InvalidArgument("give a template with [MASK:n] gaps", field="template")
        msg = infill_request(template, modality=args.modality, model=_model_name(args),
                             params=_params(args))  # fmt: skip
    return emit(run(msg, args), args)


# ---- unmask midi ---------------------------------------------------------------------------


def _midi_msg(args: argparse.Namespace, midi: bytes | None) -> Any:
    from unmask.client import midi_request

    return midi_request(
        midi, bars=_ints(getattr(args, "bars", None), "--bars") or None,
        tracks=_ints(getattr(args, "tracks", None), "--tracks") or None,
        time_signature=getattr(args, "time_signature", "") or "",
        tempo=getattr(args, "tempo", 0.0) or 0.0,
        programs=_ints(getattr(args, "programs", None), "--programs"),
        voices=getattr(args, "voices", 0) or 0, n_bars=getattr(args, "n_bars", 0) or 0,
        model=_model_name(args), params=_params(args),
    )  # fmt: skip


def cmd_midi(args: argparse.Namespace) -> int:
    from unmask.errors import InvalidArgument

    if args.bars and not args.midi:
        raise InvalidArgument("rewriting bars needs --midi FILE", field="--bars")
    check_writable(args.out)
    midi = read_input(args.midi, "--midi", binary=True) if args.midi else None
    args.json = getattr(args, "json", False)
    return emit(run(_midi_msg(args, midi), args), args)


# ---- unmask serve --------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from unmask.service.interceptors import configure_logging
    from unmask.service.server import serve
    from unmask.settings import Settings

    apply_dtype_arg(args)
    settings = Settings.from_env()
    tokens = tuple(args.auth_token) if args.auth_token else None
    settings = settings.with_overrides(
        host=args.host, port=args.port, broker_url=args.broker, model=args.model,
        model_name=args.model_name, device=args.device, auth_tokens=tokens,
        tls_cert=args.tls_cert, tls_key=args.tls_key, max_message_bytes=args.max_message_bytes,
        metrics_port=args.metrics_port, http_port=args.http_port,
    )  # fmt: skip
    configure_logging(args.log_level)
    if settings.broker_url:
        from unmask.workers.client import check_broker

        check_broker(settings.broker_url)  # fail at once with a clear message
    asyncio.run(serve(settings))
    return 0


# ---- unmask gateway -----------------------------------------------------------------------


def cmd_gateway(args: argparse.Namespace) -> int:
    """The HTTP gateway in front of a gRPC server (imports no torch)."""
    import asyncio

    from unmask.service.gateway import run_gateway
    from unmask.service.interceptors import configure_logging
    from unmask.settings import Settings

    s = Settings.from_env()
    target = args.server or f"{s.host}:{s.port}"
    configure_logging(args.log_level)
    asyncio.run(run_gateway(target, args.host, args.port, token=args.token,
                            root_certificates=args.ca, server_name=args.server_name,
                            timeout=args.timeout, max_body_bytes=2 * s.max_message_bytes))  # fmt: skip
    return 0


# ---- unmask health ------------------------------------------------------------------------


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when serving: the server's standard health check, or (--worker) this host's worker
    heartbeat in Redis. For container health checks."""
    if args.worker:
        import socket

        from unmask.settings import Settings
        from unmask.workers.client import JobQueue

        settings = Settings.from_env().with_overrides(
            broker_url=args.broker, model_name=args.model_name
        )
        with JobQueue(settings) as q:
            host = socket.gethostname()
            mine = [w for w in q.live_workers() if str(w.get("hostname", "")).endswith("@" + host)]
        print("SERVING" if mine else "NOT_SERVING")
        return 0 if mine else 1
    with client_from_args(args) as client:
        status = client.health(args.service, timeout=args.timeout or 5.0)
    print(status)
    return 0 if status == "SERVING" else 1


# ---- unmask batch --------------------------------------------------------------------------


def _print_job(job: Any) -> None:
    out = {"id": job.id, "status": job.status, "counts": job.counts, "model": job.model,
           "idempotency_key": job.idempotency_key, "created_at": job.created_at,
           "finished_at": job.finished_at}  # fmt: skip
    if job.note:
        out["note"] = job.note
    print(json.dumps(out))


def _wait(client: Any, batch_id: str) -> Any:
    from tqdm import tqdm

    job = client.get_batch(batch_id)
    with tqdm(total=job.counts["total"], desc=batch_id[:18], unit="item", file=sys.stderr) as bar:

        def progress(j: Any) -> None:
            bar.update(j.counts["total"] - j.counts["pending"] - bar.n)
            bar.set_postfix(ok=j.counts["succeeded"], failed=j.counts["failed"],
                            cancelled=j.counts["cancelled"], refresh=False)  # fmt: skip
            if j.note:
                bar.set_description_str(f"{batch_id[:18]} ({j.note})", refresh=False)

        return client.wait_batch(batch_id, on_progress=progress)


def cmd_batch(args: argparse.Namespace) -> int:
    from unmask.client import read_jsonl

    with client_from_args(args) as client:
        if args.batch_command == "submit":
            job = client.submit_batch(read_jsonl(args.file), idempotency_key=args.idempotency_key,
                                      model=args.model or "")  # fmt: skip
            if args.wait:
                job = _wait(client, job.id)
            _print_job(job)
        elif args.batch_command == "status":
            _print_job(_wait(client, args.id) if args.wait else client.get_batch(args.id))
        elif args.batch_command == "results":
            for row in client.batch_results(args.id, follow=args.follow):
                sys.stdout.write(json.dumps(row) + "\n")
                sys.stdout.flush()  # a reader that left (`| head -1`) ends us here, quietly
        elif args.batch_command == "cancel":
            _print_job(client.cancel_batch(args.id))
        elif args.batch_command == "list":
            jobs, _ = client.list_batches(page_size=args.page_size)
            for job in jobs:
                _print_job(job)
    return 0


# ---- parsers -------------------------------------------------------------------------------


def add_sampler_args(p: argparse.ArgumentParser, gen_length: int = 128) -> None:
    """Sampler flags; a knob left out is chosen by the model (its config's sampler_defaults)."""
    g = p.add_argument_group("sampler (unset knobs: the model's defaults for the modality)")
    g.add_argument("--length", type=int, default=gen_length, help="tokens to generate")
    g.add_argument("--steps", type=int, default=None, help="denoising steps")
    g.add_argument("--block-length", type=int, default=None, help="semi-AR block; 0 = full canvas")
    g.add_argument("--threshold", type=float, default=None, help="confidence threshold")
    g.add_argument("--position-score", default=None, help="probability|margin|entropy")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--remask-budget", type=int, default=None)
    g.add_argument("--remask-threshold", type=float, default=None)
    g.add_argument("--cache", default=None, help="none | prefix | dual")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-grammar", action="store_true", help="no MIDI grammar mask")
    g.add_argument("--speculative", action="store_true",
                   help="self-speculative decoding: same distribution, fewer forward passes")  # fmt: skip


_FLAGS = {"use_cache": "cache"}  # SamplerParams field -> argparse dest, where they differ


def params_from_args(args: argparse.Namespace) -> Any:
    """The flags given; the rest stay unset for the model's defaults (resolved by the model)."""
    from unmask.models.sampler_params import MODEL_DEFAULTABLE, SamplerParams

    values = {name: getattr(args, _FLAGS.get(name, name), None) for name in MODEL_DEFAULTABLE}
    given = {k: v for k, v in values.items() if v is not None}
    if given.get("block_length") == 0:
        given["block_length"] = None
    return SamplerParams(
        gen_length=args.length,
        seed=args.seed,
        grammar=not args.no_grammar,
        speculative=args.speculative,
        unset=tuple(k for k in MODEL_DEFAULTABLE if k not in given),
        **given,
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None,
        help="model directory (default: the shipped one); with --server: the model's name",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    add_dtype_arg(p)
    p.add_argument("--out", default=None, help="write the output to FILE (MIDI: required)")
    p.add_argument("--json", action="store_true", help="print output and usage as JSON")
    add_client_args(p)
    add_stream_arg(p)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt (text, code or MIDI)")
    p.add_argument("--modality", default="text", help="text | code | midi")
    p.add_argument("--prompt", default="", help="text or code prompt")
    p.add_argument("--prompt-file", default=None, help="read the prompt from a file")
    p.add_argument("--prompt-midi", default=None, help="a .mid file to continue (midi)")
    p.add_argument("--chat", default=None,
                   help="a user message, answered with the model's own chat template "
                        "(public checkpoints: LLaDA, Dream, SDAR, ...)")  # fmt: skip
    p.add_argument("--system", default=None, help="with --chat: a system message first")
    p.add_argument("--stop", action="append", default=[],
                   help="end the output before this string (repeatable; text and code)")  # fmt: skip
    _common(p)
    add_sampler_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("infill", help="fill [MASK:n] gaps of a template, or bars of a MIDI file")
    p.add_argument("--modality", default="text", help="text | code | midi")
    p.add_argument("template", nargs="?", default=None, help="text with [MASK:n] gaps")
    p.add_argument("--template-file", default=None)
    p.add_argument("--midi", default=None, help="MIDI file whose bars to rewrite")
    p.add_argument("--bars", default=None, help="comma-separated 0-based bar numbers")
    p.add_argument("--tracks", default=None, help="comma-separated 0-based tracks (default all)")
    _common(p)
    add_sampler_args(p, gen_length=32)
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("serve", help="run the gRPC front end (embedded model, or Redis + workers)")
    p.add_argument("--host", default=None, help="listen address (env UNMASK_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (env UNMASK_PORT, 50051)")
    p.add_argument("--broker", default=None,
                   help="redis://HOST:PORT/DB: dispatch to workers (env UNMASK_BROKER_URL); "
                        "without it the model runs in this process")  # fmt: skip
    p.add_argument("--model", default=None, help="model directory, embedded (env UNMASK_MODEL)")
    p.add_argument("--model-name", default=None, help="model name (env UNMASK_MODEL_NAME)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (env UNMASK_DEVICE)")
    add_dtype_arg(p)
    p.add_argument("--auth-token", action="append", default=None,
                   help="accept this bearer token (repeatable; env UNMASK_AUTH_TOKENS)")  # fmt: skip
    p.add_argument("--tls-cert", default=None, help="PEM certificate (env UNMASK_TLS_CERT)")
    p.add_argument("--tls-key", default=None, help="PEM private key (env UNMASK_TLS_KEY)")
    p.add_argument("--max-message-bytes", type=int, default=None,
                   help="gRPC message size limit (env UNMASK_MAX_MESSAGE_BYTES)")  # fmt: skip
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics on this port, 0 = off (env UNMASK_METRICS_PORT)")  # fmt: skip
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the HTTP gateway (OpenAI-compatible API, playground) on "
                        "this port, in this process; 0 = off (env UNMASK_HTTP_PORT)")  # fmt: skip
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("midi", help="write a MIDI file: from settings, continuing or rewriting one")
    p.add_argument("--out", required=True, help="FILE.mid to write")
    p.add_argument("--png", nargs="?", const="", default=None,
                   help="also draw a piano roll (default: next to --out)")  # fmt: skip
    p.add_argument("--midi", default=None, help="a MIDI file to continue (or with --bars rewrite)")
    p.add_argument("--bars", default=None, help="comma-separated 0-based bars to rewrite")
    p.add_argument("--tracks", default=None, help="comma-separated 0-based tracks (default all)")
    p.add_argument("--time-signature", default="", help="new piece: e.g. 3/4 (default 4/4)")
    p.add_argument("--tempo", type=float, default=0.0, help="new piece: bpm (default 120)")
    p.add_argument("--programs", default=None, help="new piece: GM program per voice, e.g. 40,42")
    p.add_argument("--voices", type=int, default=0, help="new piece: voices (default programs)")
    p.add_argument("--n-bars", type=int, default=0, help="new piece: bars (default 4)")
    p.add_argument("--model", default=None,
                   help="in-process: model directory; with --server: model name")  # fmt: skip
    p.add_argument("--device", default="cpu", help="in-process: cpu | cuda | auto")
    p.add_argument("--json", action="store_true", help="print the usage as JSON on stdout")
    add_stream_arg(p)
    add_client_args(p)
    add_sampler_args(p, gen_length=128)
    p.set_defaults(func=cmd_midi, temperature=1.0)

    p = sub.add_parser("gateway", help="HTTP gateway to a server: OpenAI-compatible API, "
                       "JSON/SSE endpoints, the playground")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--log-level", default="INFO")
    add_client_args(p, required_server=True)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("health", help="exit 0 if the server (or --worker: this host's worker) "
                       "is serving")  # fmt: skip
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.add_argument("--worker", action="store_true", help="check this host's worker heartbeat")
    p.add_argument("--broker", default=None, help="with --worker (env UNMASK_BROKER_URL)")
    p.add_argument("--model-name", default=None, help="with --worker (env UNMASK_MODEL_NAME)")
    add_client_args(p, required_server=True)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("batch", help="batch jobs on a server: submit | status | results | cancel")
    bsub = p.add_subparsers(dest="batch_command", required=True)
    b = bsub.add_parser("submit", help="submit FILE.jsonl ({'custom_id', 'body'} per line)")
    b.add_argument("file")
    b.add_argument("--idempotency-key", default="", help="resubmitting returns the same batch")
    b.add_argument("--model", default=None, help="model name for items that name none")
    b.add_argument("--wait", action="store_true", help="show progress until it finishes")
    add_client_args(b, required_server=True)
    b = bsub.add_parser("status", help="counts and status of a batch")
    b.add_argument("id")
    b.add_argument("--wait", action="store_true", help="show progress until it finishes")
    add_client_args(b, required_server=True)
    b = bsub.add_parser("results", help="item results as JSONL on stdout")
    b.add_argument("id")
    b.add_argument("--follow", action="store_true", help="until every item has finished")
    add_client_args(b, required_server=True)
    b = bsub.add_parser("cancel", help="cancel a batch (finished items are kept)")
    b.add_argument("id")
    add_client_args(b, required_server=True)
    b = bsub.add_parser("list", help="recent batches, newest first")
    b.add_argument("--page-size", type=int, default=20)
    add_client_args(b, required_server=True)
    p.set_defaults(func=cmd_batch)
