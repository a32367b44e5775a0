"""From a user's request to output: prompt/template → canvas → sampler → text or MIDI bytes.

`Generator` holds one loaded model and its vocabulary. It serves the diffusion model (masked
spans, any number of gaps) and the autoregressive baseline (prompt continuation only) with the
same calls, so the CLI, the Engine and the benchmarks share one code path.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unmask.errors import InvalidArgument, MidiError, NoNotesGenerated
from unmask.models import checkpoint
from unmask.models.ar_decoding import generate_ar
from unmask.models.canvas import Canvas, Fixed, Masked, Segment
from unmask.models.constraints import SamplerVocab
from unmask.models.sampler import (
    SampleResult,
    StepEvent,
    generate,
)
from unmask.models.sampler_params import ARParams, SamplerParams
from unmask.models.speculative import SpeculativeDecoder
from unmask.models.template import parse_template
from unmask.tokenizers.healing import healing_table
from unmask.tokenizers.specials import BOS_ID, NUM_SPECIAL
from unmask.tokenizers.vocab import UnifiedVocab, check_modality

DEFAULT_MIDI_PREFIX = ("Track_Start", "Program_73", "Bar_None", "TimeSig_4/4")
HEADER_LEN = 2  # BOS and the modality tag before every canvas
# Bars of generated MIDI are masked gaps between fixed `Bar_None TimeSig_n/d` tokens. A gap gets
# gen_length / (voices * bars) tokens; BAR_TOKENS (about five notes of Position Pitch Duration)
# sets how many bars a gen_length asks for, MIN_BAR_TOKENS (one note) is the least a gap holds.
BAR_TOKENS = 16
MIN_BAR_TOKENS = 3
BAR_FIXED = 2  # Bar_None TimeSig_n/d
VOICE_FIXED = 5  # Track_Start Program_p, Position_0 Tempo_t in the first bar, Track_End


def default_model_dir(name: str = "model") -> Path:
    import unmask

    return Path(unmask.__file__).parent / "assets" / name


@dataclass
class Generation:
    """One finished generation with the usage numbers the service reports."""

    modality: str
    output: str | bytes  # text/code, or a standard MIDI file
    ids: list[int]  # the whole canvas (prompt + generated), specials included
    generated_ids: list[int]
    prompt_tokens: int
    nfe: int
    steps: int
    tokens_per_forward: float
    latency_s: float
    finish_reason: str

    @property
    def generated_tokens(self) -> int:
        return len(self.generated_ids)

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "nfe": self.nfe,
            "steps": self.steps,
            "tokens_per_forward": round(self.tokens_per_forward, 3),
            "latency_s": round(self.latency_s, 4),
            "finish_reason": self.finish_reason,
        }


def fit_params(params: SamplerParams, n_masked: int) -> SamplerParams:
    """The same knobs for a canvas with `n_masked` positions (infill decides the length)."""
    if params.gen_length == n_masked:
        return params
    block = params.block_length if params.block_length and params.block_length <= n_masked else None
    n_blocks = -(-n_masked // block) if block else 1
    steps = min(max(round(params.steps * n_masked / params.gen_length), n_blocks), n_masked)
    return dataclasses.replace(
        params,
        gen_length=n_masked,
        block_length=block,
        steps=steps,
        remask_budget=min(params.remask_budget, n_masked),
    )


@dataclass
class Prepared:
    """A job ready to sample: its canvas (None for the AR baseline: `ar_prompt` instead), the
    parameters fitted to it, and how to turn the sampler's result into the user's output."""

    modality: str
    canvas: Canvas | None
    params: SamplerParams
    ar_prompt: list[int] | None
    prompt_tokens: int
    decode: Callable[[SampleResult], str | bytes]
    # token healing (tokenizers/healing.py): the text of the prompt's last token, left out of
    # the canvas, and the only ids the first generated position may take ("" and () = none)
    healed: str = ""
    first_allowed: tuple[int, ...] = ()


def strip_healed(text: str, healed: str) -> str:
    """Generated text without the healed prompt text it starts with (token healing: the first
    new token re-spells the prompt's last one, which the prompt already holds)."""
    return text[len(healed) :] if healed and text.startswith(healed) else text


class Generator:
    # Prompts longer than the window are refused (InvalidArgument naming the prompt); evaluation,
    # which samples from held-out document prefixes, keeps their most recent tokens instead.
    truncate_prompts: bool = False
    # Token healing (tokenizers/healing.py): a text/code prompt given as a string loses its last
    # token when other tokens extend it (a bare newline, a space), and the first generated token
    # must start with its text; the output still starts with the exact prompt. Never for infill,
    # MIDI or prompts given as ids. A switch for comparisons (set on an instance), not a request
    # parameter (the wire format has no field for it).
    token_healing: bool = True

    def __init__(self, model: torch.nn.Module, vocab: UnifiedVocab, meta: dict) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.meta = meta
        self.sampler_vocab = SamplerVocab.from_vocab(vocab)
        self.is_ar = bool(getattr(model.config, "causal", False))

    @classmethod
    def load(
        cls, model_dir: str | Path | None = None, device: str = "cpu", dtype: str = "auto"
    ) -> Generator:
        """A model directory ready to serve. dtype "auto": bf16 where the hardware runs it
        natively (AMX / AVX512-BF16 CPUs, CUDA), else fp32 (`checkpoint.inference_dtype`;
        UNMASK_DTYPE overrides); "float32" for runs that must match fp32 token for token."""
        path = Path(model_dir) if model_dir else default_model_dir()
        if checkpoint.is_public(path):  # LLaDA, Dream, SDAR, ...: models/families/
            from unmask.models.families.generator import PublicGenerator

            return PublicGenerator.load(path, device=device, dtype=dtype)
        model, vocab, meta = checkpoint.load(path, device=device, dtype=dtype)
        return cls(model, vocab, meta)

    def describe(self) -> dict[str, Any]:
        """What ListModels / GetModel report beyond name and readiness (plain JSON values; a
        public checkpoint's Generator reports its family's facts: models/families/)."""
        model, cfg = self.model, self.model.config
        param = next(model.parameters(), None)
        return {
            "family": "unmask",
            "architecture": "autoregressive" if self.is_ar else "diffusion",
            "parameters": int(model.num_parameters()),
            "dtype": str(param.dtype).removeprefix("torch.") if param is not None else "",
            "mask_id": cfg.mask_id if cfg.mask_id is not None else -1,
            "attention": cfg.attention,
            "block_size": cfg.block_size if cfg.attention == "block_causal" else 0,
            "modalities": ["text", "code", "midi"],
            "content_hash": str(getattr(self.vocab, "content_hash", "")),
        }

    def resolve(self, params: SamplerParams, modality: str) -> SamplerParams:
        """Fill the request's unset sampler fields from this model's per-modality defaults
        (config.json `sampler_defaults`, chosen by measurement; see the model card). The one place
        defaults are resolved: the CLI, gRPC, batch jobs and the Engine all prepare jobs here."""
        defaults = (self.meta.get("sampler_defaults") or {}).get(modality)
        return params.with_defaults(defaults)

    @property
    def max_len(self) -> int:
        return int(self.model.config.max_seq_len)

    # ---- canvases --------------------------------------------------------------------------
    def header(self, modality: str) -> list[int]:
        return [BOS_ID, self.vocab.tag_id(modality)]

    def prompt_ids(self, modality: str, prompt: str | bytes | None) -> list[int]:
        """Content ids of a prompt; a MIDI prompt without a file starts a flute track in 4/4."""
        check_modality(modality)
        if modality == "midi":
            if prompt:
                return self.vocab.encode(prompt, "midi")
            midi = self.vocab.midi
            return [
                self.vocab.ranges.midi_start + midi.tokens.index(t) for t in DEFAULT_MIDI_PREFIX
            ]
        if isinstance(prompt, bytes):
            raise InvalidArgument("a text/code prompt must be a string", field="prompt")
        return self.vocab.encode_text(prompt or "")

    def _fit_prompt(
        self, ids: list[int], gen_length: int, *, field: str = "prompt", truncate: bool = False
    ) -> list[int]:
        """The prompt if it fits the model's window with the header and gen_length; else an
        InvalidArgument naming `field` and the limit, or (`truncate`) its most recent tokens."""
        room = self.max_len - gen_length - HEADER_LEN
        if room < 0:
            raise InvalidArgument(
                f"must be <= {self.max_len - HEADER_LEN} for this model",
                field="gen_length",
                value=gen_length,
            )
        if len(ids) <= room:
            return ids
        if truncate:
            return ids[-room:] if room else []
        raise InvalidArgument(
            f"is {len(ids)} tokens; at most {room} fit with gen_length {gen_length} in this "
            f"model's {self.max_len}-token window",
            field=field,
            value=len(ids),
        )

    # ---- prepare: request -> canvas + how to decode -------------------------------------
    def prepare(self, request: Any) -> Prepared:
        """A `GenerationRequest` (engine/request.py) → a job the sampler (or Engine) can run."""
        if getattr(request, "chat", None):  # public checkpoints only (models/families/)
            raise InvalidArgument("this model has no chat template; send a prompt", field="chat")
        if request.kind == "infill":
            return self.prepare_infill(request.modality, request.segments, request.params)
        if request.kind == "midi_infill":
            tracks = list(request.tracks) if request.tracks is not None else None
            return self.prepare_infill_midi(
                request.midi, list(request.bars), tracks, request.params
            )
        if getattr(request, "midi_settings", None) is not None:
            return self.prepare_midi_settings(request.midi_settings, request.params)
        prompt = request.midi if request.modality == "midi" else request.prompt
        return self.prepare_generate(request.modality, prompt, request.params)

    def prepare_generate(
        self, modality: str, prompt: str | bytes | None, params: SamplerParams
    ) -> Prepared:
        params = self.resolve(params, modality)
        if modality == "midi" and not prompt and not self.is_ar:
            # a new piece: fixed bar structure (one flute voice, 4/4) with the notes generated;
            # more robust than asking a small model for the structure too
            from unmask.engine.request import MidiSettings

            bars = max(1, min(16, params.gen_length // BAR_TOKENS))
            return self.prepare_midi_settings(MidiSettings(programs=(73,), bars=bars), params)
        if modality == "midi" and isinstance(prompt, bytes | bytearray):
            if not self.is_ar:
                return self.prepare_continue_midi(bytes(prompt), params)
            # a file ends with Track_End, after which a piece is over: open its last track again
            # so the baseline continues it rather than writing EOS
            ids = self.prompt_ids(modality, prompt)
            if ids and ids[-1] == self._midi_id("Track_End"):
                ids = ids[:-1]
            return self.prepare_from_ids(modality, ids, params, field="midi")
        text_prefix = prompt if isinstance(prompt, str) else ""
        return self.prepare_from_ids(
            modality, self.prompt_ids(modality, prompt), params, text_prefix,
            heal=isinstance(prompt, str) and modality != "midi" and self.token_healing,
        )  # fmt: skip

    def prepare_from_ids(
        self,
        modality: str,
        prompt_ids: list[int],
        params: SamplerParams,
        text_prefix: str = "",
        *,
        field: str = "prompt",
        truncate: bool | None = None,
        heal: bool = False,
    ) -> Prepared:
        """Continue content ids (no BOS/tag). Text output = `text_prefix` + the new text; MIDI
        output = the whole piece (prompt + new tokens) as a file. A prompt longer than the window
        allows is refused (`field` names it), or cut from the left when `truncate` (default: the
        class's `truncate_prompts`). `heal` (text/code): token healing (`_heal`); the output
        still starts with `text_prefix`, and prompt_tokens still counts the healed token."""
        params = self.resolve(params, modality)
        check_modality(modality)
        cut = self.truncate_prompts if truncate is None else truncate
        kept = self._fit_prompt(prompt_ids, params.gen_length, field=field, truncate=cut)
        healed, first = self._heal(kept) if heal and modality != "midi" else ("", ())
        head = self.header(modality) + (kept[:-1] if healed else kept)
        prompt_tokens = len(head) + (1 if healed else 0)

        def decode(result: SampleResult) -> str | bytes:
            new = self.vocab.strip_specials(result.generated_ids)
            if modality == "midi":  # continue the whole piece, not only the window the model saw
                return self._decode_midi(prompt_ids + new)
            text = self.vocab.decode(new, modality) if new else ""
            return text_prefix + strip_healed(text, healed)

        if self.is_ar:
            return Prepared(modality, None, params, head, prompt_tokens, decode, healed, first)
        canvas = Canvas([Fixed(head), Masked(params.gen_length, modality, first)])
        return Prepared(modality, canvas, params, None, prompt_tokens, decode, healed, first)

    def _heal(self, ids: list[int]) -> tuple[str, tuple[int, ...]]:
        """(text of the last prompt token, ids the first new token may take) when that token is
        a strict prefix of other tokens (a bare newline, a space, an open parenthesis), else
        ("", ()). Only for the unified vocabulary, and only for a token that decodes to whole
        characters on its own (so the output's prompt stays byte-identical)."""
        if not ids or not isinstance(self.vocab, UnifiedVocab):
            return "", ()
        first = healing_table(self.vocab).allowed_after(ids[-1])
        if not first:
            return "", ()
        text = self.vocab.decode(ids[-1:], "text")
        if not text or "\ufffd" in text:
            return "", ()
        return str(text), first

    def prepare_infill(
        self, modality: str, template: str | Sequence[str | int], params: SamplerParams
    ) -> Prepared:
        """Fill every gap of a text or code template (segments, or a '[MASK:n]' string); fixed
        text stays byte-identical."""
        params = self.resolve(params, modality)
        if modality == "midi":
            raise InvalidArgument("MIDI infill takes a file and bars", field="modality")
        parts = parse_template(template) if isinstance(template, str) else tuple(template)
        segments: list[Segment] = [Fixed(self.header(modality))]
        for p in parts:
            if isinstance(p, int):
                segments.append(Masked(p, modality))
            else:
                segments.append(Fixed(self.vocab.encode_text(p)))
        canvas = self._check_canvas(Canvas(segments))

        def decode(result: SampleResult) -> str:
            ids = result.ids.tolist()
            out, pos = [], 2  # decode gap by gap: the fixed text is returned exactly as given
            for p in parts:
                if isinstance(p, int):
                    gap = self.vocab.strip_specials(ids[pos : pos + p])
                    out.append(self.vocab.decode(gap, modality) if gap else "")
                    pos += p
                else:
                    out.append(p)
                    pos += len(self.vocab.encode_text(p))
            return "".join(out)

        return Prepared(
            modality, canvas, fit_params(params, canvas.n_masked), None,
            canvas.length - canvas.n_masked, decode,
        )  # fmt: skip

    def prepare_infill_midi(
        self, midi: bytes, bars: list[int], tracks: list[int] | None, params: SamplerParams
    ) -> Prepared:
        """Re-write chosen bars (0-based) of chosen tracks (0-based; None = all); the structural
        tokens (track, program, bar, time signature) stay, the notes between them are masked."""
        params = self.resolve(params, "midi")
        ids = self.vocab.encode(midi, "midi")
        spans = midi_bar_spans(self.vocab, ids, bars, tracks)
        if not spans:
            raise InvalidArgument("no such bars/tracks in the file", field="bars", value=bars)
        lo, hi = spans[0][0], spans[-1][1]
        context = max(0, (self.max_len - 2 - (hi - lo)) // 2)
        w_lo, w_hi = max(0, lo - context), min(len(ids), hi + context)
        segments: list[Segment] = [Fixed(self.header("midi") + ids[w_lo:lo])]
        prev = lo
        for a, b in spans:
            if a > prev:
                segments.append(Fixed(ids[prev:a]))
            segments.append(Masked(b - a, "midi_bar"))
            prev = b
        segments.append(Fixed(ids[prev:w_hi]))
        canvas = self._check_canvas(Canvas([s for s in segments if len(s)]), field="bars")

        def decode(result: SampleResult) -> bytes:
            window = [i for i in result.ids.tolist()[2:] if i >= NUM_SPECIAL]
            return self._decode_midi(ids[:w_lo] + window + ids[w_hi:])

        return Prepared(
            "midi", canvas, fit_params(params, canvas.n_masked), None,
            canvas.length - canvas.n_masked, decode,
        )  # fmt: skip

    def prepare_continue_midi(self, midi: bytes, params: SamplerParams) -> Prepared:
        """Add bars to every track of a MIDI file: each track gets the same number of new bars
        (gen_length / (BAR_TOKENS * tracks), at least 1) after the piece's last bar, each a
        `Bar_None TimeSig` (the track's last time signature) followed by a gap for its notes;
        tempo changes are not generated (the piece keeps its tempo). The file's own tokens stay
        as they are; shorter tracks are padded with empty bars so the new bars line up."""
        params = self.resolve(params, "midi")
        ids = self.prompt_ids("midi", midi)
        tracks = self._midi_tracks(ids)
        n_tracks = len(tracks)
        bars = max(1, params.gen_length // (BAR_TOKENS * n_tracks))
        gap = max(MIN_BAR_TOKENS, params.gen_length // (n_tracks * bars))
        bar, end = self._midi_id("Bar_None"), self._midi_id("Track_End")
        type_of = self.vocab.midi_type_of_id()
        time_sig_type = self.vocab.midi_types.index("TimeSig")
        n_bars = max(body.count(bar) for body in tracks)
        segments: list[Segment] = []
        fixed = self.header("midi")
        for body in tracks:
            sigs = [t for t in body if type_of[t] == time_sig_type]
            time_sig = sigs[-1] if sigs else self._midi_id("TimeSig_4/4")
            fixed += body + [bar, time_sig] * (n_bars - body.count(bar))  # line the tracks up
            for _ in range(bars):
                segments += [Fixed(fixed + [bar, time_sig]), Masked(gap, "midi_notes")]
                fixed = []
            fixed = [end]
        segments.append(Fixed(fixed))
        canvas = Canvas(segments)
        if canvas.length > self.max_len:
            new = canvas.n_masked + n_tracks * bars * BAR_FIXED
            room = self.max_len - HEADER_LEN - new
            raise InvalidArgument(
                f"is {canvas.length - HEADER_LEN - new} tokens; at most {max(room, 0)} fit with "
                f"gen_length {params.gen_length} ({bars} new bar(s) in each of {n_tracks} "
                f"track(s)) in this model's {self.max_len}-token window",
                field="midi",
                value=len(ids),
            )
        canvas = self._check_canvas(canvas, field="midi")
        return self._midi_job(canvas, params)

    def midi_settings_limits(self, voices: int) -> tuple[int, int]:
        """(most voices, most bars with `voices` voices) a settings piece can have in this model's
        window, every bar of every voice holding at least one note (MIN_BAR_TOKENS)."""
        room = self.max_len - HEADER_LEN
        most_voices = room // (VOICE_FIXED + BAR_FIXED + MIN_BAR_TOKENS)
        most_bars = (room // voices - VOICE_FIXED) // (BAR_FIXED + MIN_BAR_TOKENS)
        return most_voices, max(most_bars, 0)

    def prepare_midi_settings(self, settings: Any, params: SamplerParams) -> Prepared:
        """A new piece from `MidiSettings` (engine/request.py): the structural tokens of every
        track and bar are fixed (`Track_Start Program_p`, then per bar `Bar_None TimeSig_n/d`,
        the first bar also `Position_0 Tempo_t`, then `Track_End`); the notes of each bar are a
        masked gap of gen_length / (voices * bars) tokens."""
        params = self.resolve(params, "midi")
        tokens = self.vocab.midi.tokens
        base = self.vocab.ranges.midi_start

        def tid(name: str, field: str, allowed: str) -> int:
            if name not in tokens:
                raise InvalidArgument(f"not in the vocabulary; allowed: {allowed}", field=field)
            return base + tokens.index(name)

        time_sigs = [t.split("_", 1)[1] for t in tokens if t.startswith("TimeSig_")]
        time_sig = tid(
            f"TimeSig_{settings.time_signature}", "midi_settings.time_signature",
            ", ".join(time_sigs),
        )  # fmt: skip
        tempos = [t for t in tokens if t.startswith("Tempo_")]
        tempo = base + tokens.index(
            min(tempos, key=lambda t: abs(float(t.split("_", 1)[1]) - settings.tempo))
        )
        programs = [
            tid(f"Program_{p}", "midi_settings.programs", "0..127") for p in settings.voice_programs
        ]
        track_start = tid("Track_Start", "midi_settings", "")
        track_end = tid("Track_End", "midi_settings", "")
        bar = tid("Bar_None", "midi_settings", "")
        position0 = tid("Position_0", "midi_settings", "")
        voices, bars = len(programs), settings.bars
        gap = self._settings_gap(voices, bars, params.gen_length)
        segments: list[Segment] = []
        fixed = self.header("midi")
        for program in programs:
            fixed += [track_start, program]
            for b in range(bars):
                fixed += [bar, time_sig] + ([position0, tempo] if b == 0 else [])
                # "midi_notes": no tempo or time signature tokens, so the requested ones hold
                segments += [Fixed(fixed), Masked(gap, "midi_notes")]
                fixed = []
            fixed = [track_end]
        segments.append(Fixed(fixed))
        canvas = self._check_canvas(Canvas(segments), field="midi_settings")
        return self._midi_job(canvas, params)

    def _midi_job(self, canvas: Canvas, params: SamplerParams) -> Prepared:
        """A MIDI job whose output is the whole canvas decoded (a continued or new piece)."""

        def decode(result: SampleResult) -> bytes:
            return self._decode_midi([i for i in result.ids.tolist() if i >= NUM_SPECIAL])

        return Prepared(
            "midi", canvas, fit_params(params, canvas.n_masked), None,
            canvas.length - canvas.n_masked, decode,
        )  # fmt: skip

    # ---- run -------------------------------------------------------------------------------
    def run(self, job: Prepared, on_step: Callable[[StepEvent], None] | None = None) -> Generation:
        start = time.perf_counter()
        if job.params.speculative:
            decoder = self.decoder(job)
            while not decoder.done:
                event = decoder.decode_step()
                if on_step is not None:
                    on_step(event)
            result = decoder.result()
        elif job.canvas is None:
            assert job.ar_prompt is not None
            result = generate_ar(
                self.model, job.ar_prompt, ar_params(job.params), self.sampler_vocab,
                modality=job.modality, on_step=on_step, first_allowed=job.first_allowed,
            )  # fmt: skip
        else:
            result = generate(self.model, job.canvas, job.params, self.sampler_vocab, on_step)
        return self.finish(job, result, time.perf_counter() - start)

    def decoder(self, job: Prepared) -> SpeculativeDecoder:
        """The self-speculative decoder of a job that asked for one (`params.speculative`)."""
        if job.canvas is None:
            raise InvalidArgument(
                "speculative decoding needs a block-causal diffusion model, not an AR one",
                field="speculative",
            )
        return SpeculativeDecoder(self.model, job.canvas, job.params, self.sampler_vocab)

    def finish(self, job: Prepared, result: SampleResult, latency: float) -> Generation:
        return Generation(
            modality=job.modality,
            output=job.decode(result),
            ids=result.ids.tolist(),
            generated_ids=result.generated_ids,
            prompt_tokens=job.prompt_tokens,
            nfe=result.nfe,
            steps=result.steps,
            tokens_per_forward=result.tokens_per_forward,
            latency_s=latency,
            finish_reason=result.finish_reason,
        )

    def generate(self, modality, prompt, params, on_step=None) -> Generation:
        return self.run(self.prepare_generate(modality, prompt, params), on_step)

    def infill(self, modality, template, params, on_step=None) -> Generation:
        return self.run(self.prepare_infill(modality, template, params), on_step)

    def infill_midi(self, midi, bars, tracks, params, on_step=None) -> Generation:
        return self.run(self.prepare_infill_midi(midi, bars, tracks, params), on_step)

    # ---- internals -------------------------------------------------------------------------
    def _settings_gap(self, voices: int, bars: int, gen_length: int) -> int:
        """Tokens per bar of a settings piece, or an InvalidArgument naming what does not fit the
        model's window (request.py's MAX_VOICES / MAX_BARS are sanity caps only)."""
        most_voices, most_bars = self.midi_settings_limits(voices)
        window = f"this model's {self.max_len}-token window"
        if voices > most_voices:
            raise InvalidArgument(
                f"at most {most_voices} voices fit {window}",
                field="midi_settings.voices", value=voices,
            )  # fmt: skip
        if bars > most_bars:
            raise InvalidArgument(
                f"at most {most_bars} bars with {voices} voice(s) fit {window} "
                f"(at least one note per bar)",
                field="midi_settings.bars", value=bars,
            )  # fmt: skip
        free = self.max_len - HEADER_LEN - voices * (VOICE_FIXED + bars * BAR_FIXED)
        most_gap = free // (voices * bars)
        gap = max(MIN_BAR_TOKENS, gen_length // (voices * bars))
        if gap > most_gap:
            raise InvalidArgument(
                f"must be <= {most_gap * voices * bars} for {voices} voice(s) x {bars} bars in "
                f"{window}",
                field="gen_length", value=gen_length,
            )  # fmt: skip
        return gap

    def _midi_id(self, token: str) -> int:
        return self.vocab.ranges.midi_start + self.vocab.midi.tokens.index(token)

    def _midi_tracks(self, ids: list[int]) -> list[list[int]]:
        """A MIDI piece's ids as one list per track, without its Track_End."""
        start, end = self._midi_id("Track_Start"), self._midi_id("Track_End")
        tracks: list[list[int]] = []
        for t in ids:
            if t == start or not tracks:
                tracks.append([])
            if t != end:
                tracks[-1].append(t)
        return [body for body in tracks if body]

    def _check_canvas(self, canvas: Canvas, field: str = "template") -> Canvas:
        if self.is_ar:
            raise InvalidArgument("the autoregressive baseline cannot fill gaps", field="model")
        if canvas.length > self.max_len:
            raise InvalidArgument(
                f"canvas of {canvas.length} tokens exceeds the model's {self.max_len}", field=field
            )
        return canvas

    def _decode_midi(self, ids: list[int]) -> bytes:
        try:
            return self.vocab.decode(ids, "midi")  # type: ignore[return-value]
        except MidiError:
            raise NoNotesGenerated(
                "the generated MIDI tokens hold no playable notes; try another seed or more steps",
                field="output",
            ) from None


def ar_params(p: SamplerParams) -> ARParams:
    return ARParams(
        max_new_tokens=p.gen_length, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
        seed=p.seed, stop_at_eos=p.stop_at_eos, grammar=p.grammar,
    )  # fmt: skip


def midi_bar_spans(
    vocab: UnifiedVocab, ids: list[int], bars: list[int], tracks: list[int] | None
) -> list[tuple[int, int]]:
    """[start, end) spans of the non-structural tokens inside the chosen bars of chosen tracks."""
    structural = vocab.midi_structural_mask()
    tok = vocab.midi.tokens
    start_id = vocab.ranges.midi_start + tok.index("Track_Start")
    bar_id = vocab.ranges.midi_start + tok.index("Bar_None")
    spans, track, bar = [], -1, -1
    i = 0
    while i < len(ids):
        t = ids[i]
        if t == start_id:
            track, bar = track + 1, -1
        elif t == bar_id:
            bar += 1
            if bar in bars and (tracks is None or track in tracks):
                j = i + 1
                while j < len(ids) and structural[ids[j]]:
                    j += 1  # keep the bar's time signature etc. visible
                k = j
                while k < len(ids) and ids[k] != bar_id and not structural[ids[k]]:
                    k += 1
                if k > j:
                    spans.append((j, k))
                i = k
                continue
        i += 1
    return spans
