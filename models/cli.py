"""`unmask train | generate | infill` on the embedded (in-process) model.

With `--server HOST:PORT` (or `--stream`), `generate` and `infill` go through the gRPC client
instead (service/cli.py, imported only then: nothing here depends on gRPC).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unmask.errors import InvalidArgument
from unmask.models.sampler_params import MODEL_DEFAULTABLE, SamplerParams


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


_FLAGS = {"use_cache": "cache"}  # SamplerParams field -> argparse dest, where they differ


def params_from_args(args: argparse.Namespace) -> SamplerParams:
    values = {name: getattr(args, _FLAGS.get(name, name), None) for name in MODEL_DEFAULTABLE}
    given = {k: v for k, v in values.items() if v is not None}
    if given.get("block_length") == 0:
        given["block_length"] = None
    return SamplerParams(
        gen_length=args.length,
        seed=args.seed,
        grammar=not args.no_grammar,
        unset=tuple(k for k in MODEL_DEFAULTABLE if k not in given),
        **given,
    )


def _load(args: argparse.Namespace):
    from unmask.models.generation import Generator

    return Generator.load(args.model, device=args.device)


def _emit(gen, args: argparse.Namespace) -> int:
    if isinstance(gen.output, bytes):
        if not args.out:
            raise InvalidArgument("MIDI output needs --out FILE.mid", field="--out")
        Path(args.out).write_bytes(gen.output)
        print(f"wrote {args.out} ({len(gen.output)} bytes)", file=sys.stderr)
    elif args.out:
        Path(args.out).write_text(gen.output, encoding="utf-8")
    elif not args.json:
        print(gen.output)
    if args.json:
        record = {"usage": gen.usage()}
        if isinstance(gen.output, str):
            record["output"] = gen.output
        print(json.dumps(record))
    else:
        print(json.dumps(gen.usage()), file=sys.stderr)
    return 0


def _via_service(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "server", None) or getattr(args, "stream", False))


def cmd_generate(args: argparse.Namespace) -> int:
    if _via_service(args):
        from unmask.service import cli as service_cli

        return service_cli.cmd_generate(args)
    if args.prompt_file:
        prompt: str | bytes | None = Path(args.prompt_file).read_text(encoding="utf-8")
    elif args.prompt_midi:
        if args.modality != "midi":
            raise InvalidArgument("--prompt-midi needs --modality midi", field="--prompt-midi")
        prompt = Path(args.prompt_midi).read_bytes()
    else:
        prompt = args.prompt
    gen = _load(args).generate(args.modality, prompt, params_from_args(args))
    return _emit(gen, args)


def cmd_infill(args: argparse.Namespace) -> int:
    if _via_service(args):
        from unmask.service import cli as service_cli

        return service_cli.cmd_infill(args)
    generator = _load(args)
    params = params_from_args(args)
    if args.modality == "midi":
        if not args.midi or not args.bars:
            raise InvalidArgument("MIDI infill needs --midi FILE and --bars", field="--bars")
        bars = [int(b) for b in args.bars.split(",")]
        tracks = [int(t) for t in args.tracks.split(",")] if args.tracks else None
        gen = generator.infill_midi(Path(args.midi).read_bytes(), bars, tracks, params)
    else:
        template = Path(args.template_file).read_text() if args.template_file else args.template
        if not template:
            raise InvalidArgument("give a template with [MASK:n] gaps", field="template")
        gen = generator.infill(args.modality, template, params)
    return _emit(gen, args)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None,
        help="model directory (default: the shipped one); with --server: the model's name",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--out", default=None, help="write the output to FILE (MIDI: required)")
    p.add_argument("--json", action="store_true", help="print output and usage as JSON")
    from unmask.service.cli import add_client_args, add_stream_arg  # argparse only, no gRPC

    add_client_args(p)
    add_stream_arg(p)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from unmask.models.evaluate import add_eval_args
    from unmask.models.train import add_train_args

    p = sub.add_parser("train", help="train the diffusion model or the AR baseline")
    add_train_args(p)

    p = sub.add_parser("eval", help="held-out likelihood and sample metrics per modality")
    add_eval_args(p)

    p = sub.add_parser("generate", help="continue a prompt (text, code or MIDI)")
    p.add_argument("--modality", default="text", help="text | code | midi")
    p.add_argument("--prompt", default="", help="text or code prompt")
    p.add_argument("--prompt-file", default=None, help="read the prompt from a file")
    p.add_argument("--prompt-midi", default=None, help="a .mid file to continue (midi)")
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
