"""Held-out evaluation of a model directory: likelihood and sample quality per modality.

`evaluate_model(EvalConfig(...))` returns one JSON-serialisable dict; `unmask eval` prints it as
a table (or as JSON with --json). For every modality present in the chosen split:

Likelihood (the same deterministic batches as training's validation, `models.train.evaluate`):
  * diffusion model: `nelbo_per_token` = Monte-Carlo NELBO with `t_samples` antithetic
    (stratified) times per sequence, in nats per document token (content + EOS), and
    `ppl_bound` = exp(nelbo), an upper bound on the perplexity;
  * AR model: `nll_per_token` (exact) and `ppl`;
  * with `ar_model`: `ar_nll_per_token` / `ar_ppl` of the AR baseline on the same batches.

Samples: `n_samples` generations per modality through `Generator` (the AR baseline gets the same
prompts as `ar_samples`). Prompt i is the first `prompt_tokens` content ids of a held-out document
(documents evenly spaced over the split, cycling when there are fewer than n_samples; a MIDI
document without tokens falls back to the default MIDI start). MIDI samples start from scratch
(`midi_prompt_tokens` 0, the default new-piece canvas: the MIDI gates are set on pieces from
scratch); held-out continuations with `prompt_tokens` are reported beside them as
`continuations`. Generation i uses seed + i.
  * `unigram_entropy_bits`: mean over generations of the entropy (bits) of the unigram
    distribution of the generated content ids (specials dropped, cut at the first EOS);
  * `nfe`, `tokens_per_forward`, `latency_s`: means; `tokens_per_s` = generated / total latency.
  * code: `parse_rate` = share whose text (prompt + generation) parses with `ast.parse` AND
    whose generation holds code (`quality.adds_code`: a blank, comment-only or docstring-only
    completion leaves a parsing prompt parsing, and counts as a failure);
    `parse_rate_trimmed` = share whose longest prefix of complete lines that parses reaches past
    the prompt into generated code (the same test; a line is complete when a newline ends
    it, or it is the last line and the model stopped with EOS; the cut-off last line of a
    length-limited generation is not), and `parsed_char_share` = mean share of the generated
    characters inside that prefix.
  * midi: `valid_rate` = share whose output (prompt + generation) decodes to a MIDI file with at
    least one note (a MidiError counts as invalid); `new_notes_rate` = share where the
    generation itself added a note (notes of prompt + generation minus the prompt's own);
    `type_error_rate` = sum of `vocab.count_midi_type_errors` over each whole piece (prompt,
    fixed bar lines and generation: a generated token must fit the given ones around it) /
    generated ids; `prompt_kept_rate` = share whose output still holds every note of the prompt;
    `pitch_class_overlap` / `duration_overlap` = overlap area (models/music_metrics.py) between
    the pooled generated notes and the pooled notes of up to `midi_reference_docs` held-out
    documents (None when the generations hold no note).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unmask.corpus.shards import MODALITIES, DocArray, load_split
from unmask.errors import InvalidArgument, MidiError, TokenizerError, VocabMismatch
from unmask.models import music_metrics as mm
from unmask.models import quality as q
from unmask.models.data import PREFIX_LEN, SpecialIds, eval_batches
from unmask.models.generation import Generation, Generator, default_model_dir, fit_params
from unmask.models.objective import ar_nll
from unmask.models.sampler_params import CACHE_MODES, MODEL_DEFAULTABLE, SamplerParams
from unmask.models.train import TrainConfig, evaluate, resolve_device

SPLITS = ("val", "test")


@dataclass
class EvalConfig:
    # what to evaluate
    model: str = ""  # model directory ("" = the model shipped with unmask)
    corpus: str = "data/corpus"  # built corpus directory
    split: str = "test"  # "test" | "val"
    ar_model: str | None = None  # optional AR baseline directory, evaluated next to the model
    modalities: tuple[str, ...] = ()  # () = every modality present in the split
    # likelihood
    batches: int = 8  # evaluation batches per modality
    batch_size: int = 8  # rows per batch
    t_samples: int = 8  # antithetic diffusion times per sequence in the NELBO estimate
    eps: float = 1e-3  # smallest diffusion time
    # samples
    n_samples: int = 8  # generations per modality
    prompt_tokens: int = 16  # content ids of a held-out document used as the prompt
    # MIDI samples start from scratch, as the MIDI gates ask (the default new-piece canvas);
    # with prompt_tokens > 0 the same number of held-out continuations is reported beside them
    midi_prompt_tokens: int = 0
    gen_length: int = 128  # tokens to generate
    # decoding knobs: None = the model's own default for the modality (its sampler_defaults)
    steps: int | None = None  # denoising steps (diffusion)
    block_length: int | None = None  # semi-autoregressive block size (0 = one block)
    threshold: float | None = None  # confidence-threshold parallel decoding
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None  # nucleus sampling
    position_score: str | None = None  # probability | margin | entropy | left_to_right
    use_cache: str | None = None  # "none" | "prefix" | "dual"
    seed: int = 0  # generation i uses seed + i; the NELBO noise is seeded from it too
    midi_reference_docs: int = 30  # held-out MIDI documents pooled for the histograms
    function_headers: int = 30  # code: held-out `def` headers to complete (0 = skip)
    function_gen_length: int = 96  # tokens generated after each header
    midi_reference: str = "bach"  # "bach" (the chorales of music21's corpus) | "split"
    infill_rows: int = 16  # text/code: held-out windows with a middle gap (0 = skip)
    infill_gap: int = 16  # gap length in tokens
    # machine
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N" | "auto"
    num_threads: int = 0  # torch CPU threads while evaluating (0 = leave as is)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if self.split not in SPLITS:
            raise InvalidArgument(
                f"must be one of {', '.join(SPLITS)}", field="split", value=self.split
            )
        for m in self.modalities:
            if m not in MODALITIES:
                raise InvalidArgument(
                    f"unknown modality; expected one of {', '.join(MODALITIES)}",
                    field="modalities",
                    value=m,
                )
        minimum = {"batches": 1, "batch_size": 1, "t_samples": 1, "n_samples": 0}
        minimum |= {"prompt_tokens": 0, "midi_reference_docs": 0, "num_threads": 0, "seed": 0}
        minimum |= {"midi_prompt_tokens": 0}
        minimum |= {"function_headers": 0, "function_gen_length": 1}
        minimum |= {"infill_rows": 0, "infill_gap": 1}
        for name, lo in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise InvalidArgument(f"must be an integer >= {lo}", field=name, value=value)
        if not 0.0 <= self.eps < 1.0:
            raise InvalidArgument("must lie in [0, 1)", field="eps", value=self.eps)
        self.sampler_params(0)  # SamplerParams validates the decoding knobs

    def sampler_params(self, index: int) -> SamplerParams:
        """Decoding parameters of generation `index` (seed + index)."""
        knobs = {
            "steps": self.steps,
            "block_length": self.block_length,
            "threshold": self.threshold,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "position_score": self.position_score,
            "use_cache": self.use_cache,
        }
        given = {k: v for k, v in knobs.items() if v is not None}
        if given.get("block_length") == 0:
            given["block_length"] = None
        unset = tuple(k for k in MODEL_DEFAULTABLE if k not in given)
        return SamplerParams(
            gen_length=self.gen_length, seed=self.seed + index, unset=unset, **given
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        return d


# ---- small metrics -----------------------------------------------------------------------------


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy in bits of the unigram distribution of `ids` (0.0 for an empty sequence)."""
    if len(ids) == 0:
        return 0.0
    counts = np.array(list(Counter(int(i) for i in ids).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() + 0.0)  # + 0.0 turns -0.0 into 0.0


def parses(source: str) -> bool:
    """Whether `source` is valid Python (ast.parse without warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return False
    return True


def parsing_prefix(source: str, *, last_line_complete: bool = False) -> int:
    """Length in characters of the longest prefix of complete lines of `source` that parses.

    A line is complete when a newline ends it; the last line without one counts only when
    `last_line_complete` (e.g. the model ended the snippet with EOS). 0 when no such prefix."""
    lines = source.splitlines(keepends=True)
    if lines and not last_line_complete and not lines[-1].endswith(("\n", "\r")):
        lines.pop()
    ends = np.cumsum([len(line) for line in lines]).tolist()
    for k in range(len(lines), 0, -1):
        if parses(source[: ends[k - 1]]):
            return int(ends[k - 1])
    return 0


def _ppl(nats: float) -> float:
    return math.exp(min(nats, 700.0))


# ---- model loading -----------------------------------------------------------------------------


class _EvalGenerator(Generator):
    """A Generator that takes prompts as content ids (held-out documents are ids already, so they
    are not re-tokenised) and returns b"" instead of raising for MIDI that decodes to no notes.
    A prompt longer than the window allows keeps its most recent tokens (held-out prefixes with
    the largest gen_length `run` accepts overflow by a token)."""

    truncate_prompts = True

    def prompt_ids(self, modality: str, prompt: Any) -> list[int]:
        if isinstance(prompt, list):
            return [int(i) for i in prompt]
        return super().prompt_ids(modality, prompt)

    def _decode_midi(self, ids: list[int]) -> bytes:
        try:
            return super()._decode_midi(ids)
        except (MidiError, TokenizerError):
            return b""


def _model_info(gen: Generator, directory: str | Path) -> dict[str, Any]:
    meta, training = gen.meta, gen.meta.get("training", {}) or {}
    return {
        "dir": str(directory),
        "name": meta.get("name"),
        "objective": meta.get("objective", "ar" if gen.is_ar else "diffusion"),
        "parameters": meta.get("parameters"),
        "tokens_seen": training.get("tokens_seen"),
        "steps": training.get("steps"),
        "train_wall_time_s": training.get("wall_time_s"),
        "hardware": training.get("hardware"),
        "seq_len": gen.max_len,
        "vocab_hash": gen.vocab.content_hash,
    }


def _check_corpus(corpus: Path, docs: dict[str, DocArray], vocab: Any) -> None:
    manifest = corpus / "manifest.json"
    if manifest.exists():
        try:
            recorded = json.loads(manifest.read_text()).get("vocab", {}).get("content_hash")
        except (json.JSONDecodeError, AttributeError):
            recorded = None
        if recorded and recorded != vocab.content_hash:
            raise VocabMismatch(
                f"corpus {corpus} was tokenized with vocabulary {recorded}, the model uses "
                f"{vocab.content_hash}",
                field="corpus",
                value=str(corpus),
            )
    for m, d in docs.items():
        if d.n_tokens and int(d.tokens.max()) >= vocab.size:
            raise VocabMismatch(
                f"corpus {m} documents hold ids beyond the model's vocabulary of {vocab.size}",
                field="corpus",
                value=str(corpus),
            )


# ---- likelihood --------------------------------------------------------------------------------


def _likelihood(
    gen: Generator,
    docs: dict[str, DocArray],
    cfg: EvalConfig,
    seq_len: int,
    device,
    left_to_right: bool = False,
) -> dict[str, float]:
    """Nats per document token per modality, via training's own `evaluate` (same batches);
    `left_to_right`: a block-diffusion model's exact NLL in its left-to-right decoding order."""
    config = gen.model.config
    objective = {"causal": "ar", "block_causal": "block_diffusion"}.get(
        config.attention, "diffusion"
    )
    train_cfg = TrainConfig(
        objective=objective,
        block_size=config.block_size,
        seq_len=seq_len,
        batch_size=cfg.batch_size,
        eval_batches=cfg.batches,
        eval_samples=cfg.t_samples,
        eps=cfg.eps,
        seed=cfg.seed,
    )
    special = SpecialIds.from_vocab(gen.vocab)
    return evaluate(gen.model, docs, special, train_cfg, device, left_to_right=left_to_right)


def _batch_counts(docs: DocArray, modality: str, vocab, cfg: EvalConfig, seq_len: int):
    n_docs = n_tokens = 0
    for batch in eval_batches(
        docs,
        modality,
        SpecialIds.from_vocab(vocab),
        seq_len=seq_len,
        batch_size=cfg.batch_size,
        max_batches=cfg.batches,
    ):
        n_docs += len(batch)
        n_tokens += int(batch.doc_tokens.sum())
    return n_docs, n_tokens


# ---- samples -----------------------------------------------------------------------------------


def _pick(n_docs: int, n: int, eligible: list[int]) -> list[int]:
    pool = eligible or list(range(n_docs))
    if not pool:
        return []
    if n <= len(pool):
        return [pool[(i * len(pool)) // n] for i in range(n)]
    return [pool[i % len(pool)] for i in range(n)]


def held_out_prompts(docs: DocArray, n: int, k: int) -> list[list[int]]:
    """First k content ids of n held-out documents, evenly spaced over those longer than k."""
    eligible = [j for j in range(len(docs)) if len(docs[j]) > k]
    return [[int(i) for i in docs[j][:k]] for j in _pick(len(docs), n, eligible)]


def _reference_notes(docs: DocArray, vocab: Any, limit: int) -> tuple[list[mm.Note], int]:
    notes: list[mm.Note] = []
    used = 0
    for j in _pick(len(docs), min(limit, len(docs)), []):
        try:
            notes += mm.read_notes(vocab.decode([int(i) for i in docs[j]], "midi"))
            used += 1
        except (MidiError, TokenizerError):
            continue
    return notes, used


def _bach_reference(limit: int) -> tuple[list[mm.Note], int]:
    """Notes of the first `limit` Bach chorales of music21's corpus (installed data, sorted)."""
    try:
        import music21

        from unmask.corpus.sources import chorale_to_midi
    except ImportError:
        return [], 0
    root = Path(music21.__file__).parent / "corpus" / "bach"
    notes: list[mm.Note] = []
    used = 0
    for path in sorted(root.glob("bwv*.mxl")):
        if used >= limit:
            break
        data = chorale_to_midi(path)
        if data:
            notes += mm.read_notes(data)
            used += 1
    return notes, used


def held_out_headers(docs: DocArray, vocab: Any, n: int) -> list[str]:
    """n function headers spread over the held-out code documents (one per document first)."""
    per_doc: list[list[str]] = []
    for j in range(len(docs)):
        try:
            per_doc.append(q.function_headers(vocab.decode([int(i) for i in docs[j]], "code")))
        except TokenizerError:
            continue
    per_doc = [h for h in per_doc if h]
    out: list[str] = []
    depth = 0
    while len(out) < n and any(len(h) > depth for h in per_doc):
        out += [h[depth] for h in per_doc if len(h) > depth]
        depth += 1
    return _spread(out, n)


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    return [items[(i * len(items)) // n] for i in range(n)]


def _function_completions(
    gen: Generator, headers: list[str], cfg: EvalConfig, log: Callable[[str], None], label: str
) -> dict[str, Any]:
    """Complete each header; the share that forms a parsing function with a real body."""
    ok = []
    examples = []
    for i, header in enumerate(headers):
        length = min(cfg.function_gen_length, gen.max_len // 2)  # room for the header
        params = fit_params(cfg.sampler_params(i), length)
        g = gen.generate("code", header, params)
        completion = g.output[len(header) :] if g.output.startswith(header) else g.output
        ok.append(q.function_with_body(header, completion))
        if i < 3:
            examples.append(header + completion)
    log(f"  {label} code: {sum(ok)}/{len(ok)} function headers completed with a body")
    return {"n": len(ok), "function_body_rate": q.share(ok), "examples": examples}


def infill_windows(
    docs: DocArray, vocab: Any, modality: str, n: int, gap: int
) -> tuple[Tensor, Tensor]:
    """n rows [BOS, tag, window of 4*gap content ids] with a gap in the middle: (ids, gap mask)."""
    width = 4 * gap
    eligible = [j for j in range(len(docs)) if len(docs[j]) >= width]
    picked = _pick(len(docs), n, eligible) if eligible else []
    head = [int(vocab.bos_id), int(vocab.tag_id(modality))]
    rows = [head + [int(i) for i in docs[j][:width]] for j in picked]
    ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), PREFIX_LEN + width)
    gaps = torch.zeros_like(ids, dtype=torch.bool)
    start = PREFIX_LEN + (width - gap) // 2
    gaps[:, start : start + gap] = True
    return ids, gaps


@torch.no_grad()
def gap_nll(gen: Generator, ids: Tensor, gaps: Tensor, cfg: EvalConfig) -> float:
    """Nats per gap token: AR = exact NLL given the left context only; diffusion = NELBO given
    both sides (block diffusion in infill order)."""
    from unmask.models.block_diffusion import block_diffusion_loss, reorder_for_infill
    from unmask.models.objective import nelbo

    model, config = gen.model, gen.model.config
    device = next(model.parameters()).device
    ids, gaps = ids.to(device), gaps.to(device)
    n = gaps.sum().clamp(min=1)
    if config.attention == "causal":
        return ar_nll(model, ids, gaps)[0]
    g = torch.Generator(device=device).manual_seed(cfg.seed + 7)
    mask_id = int(gen.vocab.mask_id)
    if config.attention == "full":
        return nelbo(model, ids, gaps, mask_id, samples=cfg.t_samples, eps=cfg.eps, generator=g)[0]
    z, maskable, pos = reorder_for_infill(ids, gaps, gaps, torch.ones(len(ids), dtype=torch.bool))
    total = 0.0
    for _ in range(cfg.t_samples):
        _, stats = block_diffusion_loss(
            model, z, maskable, mask_id, block_size=config.block_size, t_min=cfg.eps, t_max=1.0,
            generator=g, positions=pos,
        )  # fmt: skip
        total += float(stats.row_loss.sum())
    return total * (1.0 - cfg.eps) / cfg.t_samples / float(n)


@torch.no_grad()
def gap_order_nll(gen: Generator, ids: Tensor, gaps: Tensor) -> float:
    """Nats per gap token of a block-diffusion model decoding the gap (in infill order, so it
    sees both sides) left to right, one token per step: the exact NLL of that decoding process,
    the default sampler's order for text and code (`block_order_nll`)."""
    from unmask.models.block_diffusion import block_order_nll, reorder_for_infill

    device = next(gen.model.parameters()).device
    ids, gaps = ids.to(device), gaps.to(device)
    z, maskable, pos = reorder_for_infill(ids, gaps, gaps, torch.ones(len(ids), dtype=torch.bool))
    block_size = gen.model.config.block_size
    mask_id = int(gen.vocab.mask_id)
    return block_order_nll(gen.model, z, maskable, mask_id, block_size=block_size, positions=pos)[0]


@torch.no_grad()
def end_of_span_nll(gen: Generator, ids: Tensor, gaps: Tensor, extra: int) -> float:
    """Nats of the EOS that ends a gap `extra` slots longer than its text: each gap is followed by
    EOS then PAD (as `lengthen_gaps` trains it), decoded in infill order left to right, and the
    loss is taken at the EOS only, given the gap's true text. ~0 means the model ends a gap where
    its text does; the prior of one EOS in a gap is ~log(gap length) nats."""
    from unmask.models.block_diffusion import block_order_nll, reorder_for_infill

    eos, pad = int(gen.vocab.eos_id), int(gen.vocab.pad_id)
    rows, spans = [], []
    for row, gap in zip(ids.tolist(), gaps.tolist(), strict=True):
        end = len(gap) - gap[::-1].index(True)  # one past the gap's last slot
        rows.append(row[:end] + [eos] + [pad] * (extra - 1) + row[end:])
        spans.append(gap[:end] + [True] * extra + gap[end:])
    device = next(gen.model.parameters()).device
    z, span = torch.tensor(rows, device=device), torch.tensor(spans, device=device)
    chosen = torch.ones(len(rows), dtype=torch.bool, device=device)
    z, maskable, pos = reorder_for_infill(z, span, span, chosen)
    ends = maskable & (z == eos)  # the window's text holds no EOS: the one we put in
    block_size = gen.model.config.block_size
    mask_id = int(gen.vocab.mask_id)
    return block_order_nll(gen.model, z, maskable, mask_id, block_size=block_size, positions=pos,
                           targets=ends)[0]  # fmt: skip


def _infills(
    gen: Generator, ids: Tensor, gaps: Tensor, modality: str, cfg, n: int, extra: int = 0
) -> list[tuple[bool, Any]]:
    """[MASK:n] infills of the first n windows, each gap `extra` slots longer than the text cut
    out of it: (text before and after the gap came back byte-identical, the Generation)."""
    out = []
    for i in range(min(n, len(ids))):
        row = ids[i].tolist()[PREFIX_LEN:]
        where = gaps[i].tolist()[PREFIX_LEN:]
        a, b = where.index(True), len(where) - where[::-1].index(True)
        left, right = gen.vocab.decode(row[:a], modality), gen.vocab.decode(row[b:], modality)
        template = f"{left}[MASK:{b - a + extra}]{right}"
        g = gen.infill(modality, template, cfg.sampler_params(i))
        out.append((g.output.startswith(left) and g.output.endswith(right), g))
    return out


def infill_keeps_fixed(gen: Generator, ids: Tensor, gaps: Tensor, modality: str, cfg) -> float:
    """Share of [MASK:n] infills whose text before and after the gap comes back byte-identical."""
    kept = [k for k, _ in _infills(gen, ids, gaps, modality, cfg, 4)]
    return sum(kept) / len(kept) if kept else 0.0


def infill_longer_gaps(gen: Generator, ids: Tensor, gaps: Tensor, modality: str, cfg) -> dict:
    """Variable-length infill: each gap is half again as long as the text cut out of it, so a
    good fill ends early with an end-of-span (EOS; the span's rest becomes PAD). Share of gaps
    ended early, of fixed text kept, and the mean tokens written before the end."""
    extra = max(1, int(gaps[0].sum()) // 2) if len(gaps) else 1
    runs = _infills(gen, ids, gaps, modality, cfg, 8, extra)
    eos = int(gen.vocab.eos_id)
    ended = [eos in g.generated_ids for _, g in runs]
    written = [g.generated_ids.index(eos) if e else len(g.generated_ids)
               for (_, g), e in zip(runs, ended, strict=True)]  # fmt: skip
    n = max(len(runs), 1)
    return {"rows": len(runs), "extra_slots": extra, "ends_early_rate": sum(ended) / n,
            "end_of_span_nll": end_of_span_nll(gen, ids, gaps, extra) if len(ids) else None,
            "fixed_kept_rate": sum(k for k, _ in runs) / n,
            "mean_tokens_written": sum(written) / n}  # fmt: skip


def _prompt_notes(vocab: Any, prompt: list[int]) -> Counter:
    if not prompt:
        return Counter()
    try:
        return Counter(mm.read_notes(vocab.decode(prompt, "midi")))
    except (MidiError, TokenizerError):
        return Counter()


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _samples(
    gen: Generator,
    modality: str,
    prompts: list[list[int]],
    cfg: EvalConfig,
    reference: tuple[list[mm.Note], int] | None,
    log: Callable[[str], None],
    label: str,
) -> dict[str, Any]:
    vocab = gen.vocab
    runs: list[tuple[list[int], Generation, list[int]]] = []
    for i, prompt in enumerate(prompts):
        call_prompt = prompt if (prompt or modality != "midi") else None
        g = gen.generate(modality, call_prompt, cfg.sampler_params(i))
        runs.append((prompt, g, vocab.strip_specials(g.generated_ids)))
        log(f"  {label} {modality} sample {i + 1}/{len(prompts)}: {g.latency_s:.2f} s")
    latency = sum(g.latency_s for _, g, _ in runs)
    generated = sum(len(c) for _, _, c in runs)
    out: dict[str, Any] = {
        "n": len(runs),
        "prompt_tokens_mean": _mean([len(p) for p, _, _ in runs]),
        "generated_tokens_mean": _mean([len(c) for _, _, c in runs]),
        "unigram_entropy_bits": _mean([unigram_entropy(c) for _, _, c in runs]),
        "nfe": _mean([g.nfe for _, g, _ in runs]),
        "tokens_per_forward": _mean([g.tokens_per_forward for _, g, _ in runs]),
        "latency_s": _mean([g.latency_s for _, g, _ in runs]),
        "tokens_per_s": generated / latency if latency > 0 else None,
        "finish_reasons": dict(Counter(g.finish_reason for _, g, _ in runs)),
    }
    if modality in ("text", "code"):
        texts = []
        ok = ok_trim = 0
        shares = []
        for prompt, g, content in runs:
            head = vocab.decode(prompt, modality) if prompt else ""
            full = vocab.decode(prompt + content, modality) if prompt + content else ""
            texts.append(full)
            if modality != "code":
                continue
            # a blank or docstring-only completion leaves a parsing prompt parsing: not code
            ok += parses(full) and q.adds_code(head, full[len(head) :])
            kept = parsing_prefix(full, last_line_complete=g.finish_reason == "eos")
            ok_trim += q.adds_code(head, full[len(head) : kept])
            shares.append(max(0, kept - len(head)) / max(1, len(full) - len(head)))
        if modality == "text" and runs:
            generated_texts = [vocab.decode(c, "text") if c else "" for _, _, c in runs]
            out["dictionary_word_share"] = q.mean(
                q.dictionary_word_share(t) for t in generated_texts
            )
            out["repeated_3gram_share"] = q.mean(q.repeated_ngram_share(t) for t in generated_texts)
            out["degenerate_samples"] = sum(q.is_degenerate(t) for t in generated_texts)
            if q.dictionary() is None:
                out["dictionary_word_share_note"] = "no word list: apt-get install wamerican"
        if modality == "code" and runs:
            out["parse_rate"] = ok / len(runs)
            out["parse_rate_trimmed"] = ok_trim / len(runs)
            out["parsed_char_share"] = _mean(shares)
        out["examples"] = [t[:400] for t in texts[:3]]
    elif modality == "midi":
        valid = new = errors = kept = 0
        pooled: list[mm.Note] = []
        entropies: list[float] = []
        for prompt, g, _ in runs:
            data = g.output if isinstance(g.output, bytes) else b""
            valid += mm.has_notes(data)
            # the whole piece: a generated note must also fit the fixed bar lines around it
            errors += vocab.count_midi_type_errors(vocab.strip_specials(g.ids))
            given = _prompt_notes(vocab, prompt)
            try:
                notes = Counter(mm.read_notes(data))
            except MidiError:
                notes = Counter()
            added = notes - given
            kept += not (given - notes)  # every note of the prompt is still there
            new += bool(added)
            pooled += list(added.elements())
            if added:
                entropies.append(q.entropy_bits(q.pitch_class_counts(n.pitch for n in added)))
        ref_notes, ref_docs = reference if reference else ([], 0)
        have = bool(pooled) and bool(ref_notes)
        out |= {
            "valid_rate": valid / len(runs) if runs else None,
            "new_notes_rate": new / len(runs) if runs else None,
            "type_error_rate": errors / generated if generated else None,
            "prompt_kept_rate": kept / len(runs) if runs else None,
            "pitch_class_overlap": (
                mm.overlap_area(
                    mm.pitch_class_histogram(pooled), mm.pitch_class_histogram(ref_notes)
                )
                if have
                else None
            ),
            "pitch_class_overlap_transposed": (
                q.best_transposed_overlap(
                    mm.pitch_class_histogram(pooled), mm.pitch_class_histogram(ref_notes)
                )
                if have
                else None
            ),
            "duration_overlap": (
                mm.overlap_area(mm.duration_histogram(pooled), mm.duration_histogram(ref_notes))
                if have
                else None
            ),
            "pitch_class_entropy_bits": q.mean(entropies),
            "pitch_class_entropy_min_bits": min(entropies) if entropies else None,
            "generated_notes": len(pooled),
            "reference_notes": len(ref_notes),
            "reference_docs": ref_docs,
        }
    return out


# ---- the whole evaluation ----------------------------------------------------------------------


def evaluate_model(cfg: EvalConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate cfg.model (and cfg.ar_model) on cfg.split of cfg.corpus; see the module doc."""
    log = log or (lambda _msg: None)
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _evaluate_model(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _evaluate_model(cfg: EvalConfig, log: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    model_dir = Path(cfg.model) if cfg.model else default_model_dir()
    # fp32: the gates measure the model, not a serving precision (bf16 changes the logits)
    gen = _EvalGenerator.load(model_dir, device=str(device), dtype="float32")
    ar_gen = (
        _EvalGenerator.load(cfg.ar_model, device=str(device), dtype="float32")
        if cfg.ar_model
        else None
    )
    if ar_gen is not None and ar_gen.vocab.content_hash != gen.vocab.content_hash:
        raise VocabMismatch(
            "the AR baseline and the model use different vocabularies",
            field="ar_model",
            value=cfg.ar_model,
        )
    seq_len = min(gen.max_len, ar_gen.max_len if ar_gen else gen.max_len)
    if cfg.n_samples and cfg.gen_length > seq_len - PREFIX_LEN - 1:
        raise InvalidArgument(
            f"must be <= {seq_len - PREFIX_LEN - 1} for this model (canvas of {seq_len})",
            field="gen_length",
            value=cfg.gen_length,
        )

    corpus = Path(cfg.corpus)
    split_docs = load_split(corpus, cfg.split)
    wanted = cfg.modalities or MODALITIES
    docs = {m: split_docs[m] for m in MODALITIES if m in wanted and len(split_docs.get(m, ())) > 0}
    if not docs:
        raise InvalidArgument(
            f"no {cfg.split} documents of {', '.join(wanted)} in {corpus}",
            field="corpus",
            value=str(corpus),
        )
    _check_corpus(corpus, docs, gen.vocab)

    log(f"likelihood on {cfg.split} ({', '.join(docs)})")
    t0 = time.perf_counter()
    nats = _likelihood(gen, docs, cfg, seq_len, device)
    ar_nats = _likelihood(ar_gen, docs, cfg, seq_len, device) if ar_gen else {}
    block = gen.model.config.attention == "block_causal"
    ltr_nats = _likelihood(gen, docs, cfg, seq_len, device, left_to_right=True) if block else {}
    likelihood_s = time.perf_counter() - t0

    per_modality: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for m, d in docs.items():
        n_docs, n_tokens = _batch_counts(d, m, gen.vocab, cfg, seq_len)
        row: dict[str, Any] = {"docs": len(d), "eval_docs": n_docs, "eval_tokens": n_tokens}
        if m in nats:
            key, ppl = ("nll_per_token", "ppl") if gen.is_ar else ("nelbo_per_token", "ppl_bound")
            row[key], row[ppl] = nats[m], _ppl(nats[m])
        if m in ar_nats:
            row["ar_nll_per_token"], row["ar_ppl"] = ar_nats[m], _ppl(ar_nats[m])
        if m in ltr_nats:  # exact, in the default decoding order; the NELBO gates stay as asked
            row["left_to_right_nll_per_token"] = ltr_nats[m]
        if cfg.n_samples:
            k = cfg.midi_prompt_tokens if m == "midi" else cfg.prompt_tokens
            prompts = held_out_prompts(d, cfg.n_samples, k)
            reference = None
            if m == "midi":
                reference = (
                    _bach_reference(cfg.midi_reference_docs)
                    if cfg.midi_reference == "bach"
                    else ([], 0)
                )
                if not reference[0]:  # no music21: the held-out documents instead
                    reference = _reference_notes(d, gen.vocab, cfg.midi_reference_docs)
            runs = [("samples", prompts)]
            if m == "midi" and cfg.prompt_tokens and not cfg.midi_prompt_tokens:
                runs.append(
                    ("continuations", held_out_prompts(d, cfg.n_samples, cfg.prompt_tokens))
                )
            for key, ps in runs:  # the model, and the AR baseline on the same prompts
                row[key] = _samples(gen, m, ps, cfg, reference, log, "model")
                if ar_gen is not None:
                    row[f"ar_{key}"] = _samples(ar_gen, m, ps, cfg, reference, log, "AR")
        if m in ("text", "code") and cfg.infill_rows:
            ids, gaps = infill_windows(d, gen.vocab, m, cfg.infill_rows, cfg.infill_gap)
            if len(ids):
                row["infill"] = {"rows": len(ids), "gap": cfg.infill_gap,
                                 "gap_nll": gap_nll(gen, ids, gaps, cfg)}  # fmt: skip
                if block:
                    row["infill"]["gap_nll_left_to_right"] = gap_order_nll(gen, ids, gaps)
                if ar_gen is not None:
                    row["infill"]["ar_left_only_gap_nll"] = gap_nll(ar_gen, ids, gaps, cfg)
                if cfg.n_samples and not gen.is_ar:
                    row["infill"]["fixed_kept_rate"] = infill_keeps_fixed(gen, ids, gaps, m, cfg)
                    row["infill"]["longer_gaps"] = infill_longer_gaps(gen, ids, gaps, m, cfg)
                log(f"  {m} infill: gap NLL {row['infill']['gap_nll']:.3f}")
        if m == "code" and cfg.function_headers:
            headers = held_out_headers(d, gen.vocab, cfg.function_headers)
            row["functions"] = _function_completions(gen, headers, cfg, log, "model")
            if ar_gen is not None:
                row["ar_functions"] = _function_completions(ar_gen, headers, cfg, log, "AR")
        per_modality[m] = row
    sampling_s = time.perf_counter() - t0

    return {
        "config": cfg.to_dict(),
        "model": _model_info(gen, model_dir),
        "ar_model": _model_info(ar_gen, cfg.ar_model) if ar_gen and cfg.ar_model else None,
        "corpus": {"dir": str(corpus), "split": cfg.split},
        "seq_len": seq_len,
        "device": str(device),
        "modalities": per_modality,
        "gates": quality_gates(per_modality),
        "timings": {"likelihood_s": round(likelihood_s, 3), "sampling_s": round(sampling_s, 3)},
        "wall_time_s": round(time.perf_counter() - start, 3),
    }


# ---- quality gates (the model issue's list; each reported as measured, met or not) ----------

GATES = {
    # name: (modality, where, key, comparison, threshold)
    "nelbo_over_ar": ("*", None, None, "<=", 1.10),
    "text_dictionary_words": ("text", "samples", "dictionary_word_share", ">=", 0.85),
    "text_repeated_3grams": ("text", "samples", "repeated_3gram_share", "<=", 0.25),
    "text_degenerate_samples": ("text", "samples", "degenerate_samples", "<=", 0),
    "code_function_body_rate": ("code", "functions", "function_body_rate", ">=", 0.40),
    "midi_pitch_class_overlap": ("midi", "samples", "pitch_class_overlap_transposed", ">=", 0.85),
    "midi_pitch_class_entropy": ("midi", "samples", "pitch_class_entropy_min_bits", ">=", 2.5),
    "midi_duration_overlap": ("midi", "samples", "duration_overlap", ">=", 0.8),
    "midi_valid": ("midi", "samples", "valid_rate", ">=", 1.0),
    "midi_grammar_errors": ("midi", "samples", "type_error_rate", "<=", 0.0),
    "midi_continuation_keeps_prompt": ("midi", "continuations", "prompt_kept_rate", ">=", 1.0),
}


def _meets(value: float | None, op: str, threshold: float) -> bool | None:
    if value is None:
        return None
    return value <= threshold + 1e-12 if op == "<=" else value >= threshold - 1e-12


def quality_gates(mods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every gate: the measured value, the threshold and whether it is met (None: not measured)."""
    gates: dict[str, dict[str, Any]] = {}
    for name, (modality, where, key, op, threshold) in GATES.items():
        if modality == "*":
            for m, r in mods.items():
                nat, ar = r.get("nelbo_per_token"), r.get("ar_nll_per_token")
                value = nat / ar if nat is not None and ar else None
                gates[f"{name}_{m}"] = {"value": value, "op": op, "threshold": threshold,
                                        "met": _meets(value, op, threshold)}  # fmt: skip
            continue
        value = ((mods.get(modality) or {}).get(where) or {}).get(key)
        gates[name] = {"value": value, "op": op, "threshold": threshold,
                       "met": _meets(value, op, threshold)}  # fmt: skip
    for m in ("text", "code"):
        inf = (mods.get(m) or {}).get("infill") or {}
        # a block-diffusion model is judged by the exact NLL of its default (left-to-right)
        # decoding of the gap; its NELBO (an upper bound over random orders) is kept beside it
        ours = inf.get("gap_nll_left_to_right", inf.get("gap_nll"))
        ar = inf.get("ar_left_only_gap_nll")
        gates[f"infill_gap_nll_vs_ar_left_only_{m}"] = {
            "value": ours, "op": "<=", "threshold": ar,
            "met": _meets(ours, "<=", ar) if ours is not None and ar is not None else None,
            "nelbo": inf.get("gap_nll"),
        }  # fmt: skip
        kept = inf.get("fixed_kept_rate")
        gates[f"infill_fixed_kept_{m}"] = {"value": kept, "op": ">=", "threshold": 1.0,
                                           "met": _meets(kept, ">=", 1.0)}  # fmt: skip
    code = mods.get("code") or {}
    ours = (code.get("functions") or {}).get("function_body_rate")
    ar = (code.get("ar_functions") or {}).get("function_body_rate")
    gates["code_function_body_rate_vs_ar"] = {
        "value": ours, "op": ">=", "threshold": ar,
        "met": _meets(ours, ">=", ar) if ar is not None else None,
    }  # fmt: skip
    return gates


# ---- report ------------------------------------------------------------------------------------


def _f(value: Any, fmt: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def _describe(info: dict[str, Any]) -> str:
    params = info.get("parameters")
    tokens = info.get("tokens_seen")
    bits = [info.get("objective") or "?"]
    if isinstance(params, int):
        bits.append(f"{params / 1e6:.2f}M params")
    if isinstance(tokens, int):
        bits.append(f"{tokens / 1e6:.1f}M tokens seen")
    return f"{info['dir']} ({', '.join(bits)})"


def format_report(result: dict[str, Any]) -> str:
    """A readable summary of an `evaluate_model` result."""
    cfg, mods = result["config"], result["modalities"]
    lines = [f"model    {_describe(result['model'])}"]
    if result.get("ar_model"):
        lines.append(f"AR       {_describe(result['ar_model'])}")
    lines.append(
        f"corpus   {result['corpus']['dir']}  split {result['corpus']['split']}  "
        f"canvas {result['seq_len']}  device {result['device']}  wall {result['wall_time_s']:.1f} s"
    )
    is_ar = result["model"].get("objective") == "ar"
    metric = "NLL" if is_ar else "NELBO"
    ppl_name = "ppl" if is_ar else "ppl<="
    lines += ["", f"likelihood: nats per document token ({metric}; t-samples {cfg['t_samples']})"]
    head = f"{'modality':<9}{'docs':>6}{'tokens':>9}{metric:>9}{ppl_name:>10}"
    has_ar = any("ar_ppl" in r for r in mods.values())
    if has_ar:
        head += f"{'AR NLL':>9}{'AR ppl':>10}"
    has_ltr = any("left_to_right_nll_per_token" in r for r in mods.values())
    if has_ltr:
        head += f"{'L2R NLL':>9}"  # exact NLL decoding each block left to right
    lines.append(head)
    for m, r in mods.items():
        nat = r.get("nll_per_token", r.get("nelbo_per_token"))
        ppl = r.get("ppl", r.get("ppl_bound"))
        line = f"{m:<9}{r['eval_docs']:>6}{r['eval_tokens']:>9}{_f(nat):>9}{_f(ppl, '.4g'):>10}"
        if has_ar:
            line += f"{_f(r.get('ar_nll_per_token')):>9}{_f(r.get('ar_ppl'), '.4g'):>10}"
        if has_ltr:
            line += f"{_f(r.get('left_to_right_nll_per_token')):>9}"
        lines.append(line)

    sampled = [(m, r) for m, r in mods.items() if "samples" in r]
    if sampled:
        lines += [
            "",
            f"samples: {cfg['n_samples']} per modality, prompt {cfg['prompt_tokens']} tokens "
            f"(MIDI {cfg.get('midi_prompt_tokens', cfg['prompt_tokens'])}; 0 = from scratch), "
            f"gen_length {cfg['gen_length']}, steps {cfg['steps']}, block {cfg['block_length']}, "
            f"threshold {cfg['threshold']}, cache {cfg['use_cache']}, T {cfg['temperature']}",
            f"{'modality':<9}{'model':<7}{'entropy':>8}{'NFE':>8}{'tok/fwd':>8}{'latency':>9}"
            f"{'tok/s':>8}  quality",
        ]
        for m, r in sampled:
            rows = (("model", "samples"), ("AR", "ar_samples"), ("model+", "continuations"),
                    ("AR+", "ar_continuations"))  # fmt: skip
            for label, key in rows:
                s = r.get(key)
                if s is None:
                    continue
                if m == "code":
                    quality = (
                        f"parse {_f(s.get('parse_rate'), '.2f')}, trimmed "
                        f"{_f(s.get('parse_rate_trimmed'), '.2f')} "
                        f"(kept {_f(s.get('parsed_char_share'), '.2f')})"
                    )
                elif m == "text":
                    quality = (
                        f"dict words {_f(s.get('dictionary_word_share'), '.2f')}, repeated "
                        f"3-grams {_f(s.get('repeated_3gram_share'), '.2f')}, degenerate "
                        f"{_f(s.get('degenerate_samples'))}"
                    )
                elif m == "midi":
                    quality = (
                        f"valid {_f(s.get('valid_rate'), '.2f')}, new notes "
                        f"{_f(s.get('new_notes_rate'), '.2f')}, type err "
                        f"{_f(s.get('type_error_rate'))}, pitch-class "
                        f"{_f(s.get('pitch_class_overlap_transposed'), '.2f')}, entropy min "
                        f"{_f(s.get('pitch_class_entropy_min_bits'), '.2f')}, duration "
                        f"{_f(s.get('duration_overlap'), '.2f')}"
                    )
                    if key.endswith("continuations"):  # "+": continuations of held-out prompts
                        quality += f", prompt kept {_f(s.get('prompt_kept_rate'), '.2f')}"
                else:
                    quality = ""
                lat = s.get("latency_s")
                lines.append(
                    f"{m:<9}{label:<7}{_f(s.get('unigram_entropy_bits'), '.2f'):>8}"
                    f"{_f(s.get('nfe'), '.1f'):>8}{_f(s.get('tokens_per_forward'), '.2f'):>8}"
                    f"{(_f(lat, '.3f') + 's') if lat is not None else '-':>9}"
                    f"{_f(s.get('tokens_per_s'), '.1f'):>8}  {quality}"
                )
    for m, r in mods.items():
        for label, key in (("model", "functions"), ("AR", "ar_functions")):
            if r.get(key):
                lines.append(
                    f"{m:<9}{label:<7}function headers completed with a body: "
                    f"{_f(r[key].get('function_body_rate'), '.2f')} of {r[key]['n']}"
                )
    if result.get("gates"):
        lines += ["", "quality gates"]
        for name, g in result["gates"].items():
            met = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
            lines.append(f"  {name:<36}{_f(g['value']):>8} {g['op']} {_f(g['threshold'])}  {met}")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def _modalities(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [m for m in items if m not in MODALITIES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown modality {bad[0]!r}")
    return items


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `unmask eval`; defaults are EvalConfig's."""
    d = EvalConfig()
    a = parser.add_argument
    a("--model", default=d.model, metavar="DIR", help="model directory (default: shipped model)")
    a("--ar-model", default=None, metavar="DIR", help="AR baseline evaluated next to it")
    a("--corpus", default=d.corpus, metavar="DIR", help=f"built corpus (default: {d.corpus})")
    a("--split", default=d.split, choices=SPLITS, help=f"held-out split (default: {d.split})")
    a("--modalities", type=_modalities, default=(), metavar="M,...", help="default: all present")
    a("--batches", type=int, default=d.batches, help=f"batches per modality ({d.batches})")
    a("--batch-size", type=int, default=d.batch_size, help=f"rows per batch ({d.batch_size})")
    a("--t-samples", type=int, default=d.t_samples, help=f"NELBO t-samples ({d.t_samples})")
    a("--samples", dest="n_samples", type=int, default=d.n_samples, metavar="N",
      help=f"generations per modality ({d.n_samples}; 0 = likelihood only)")  # fmt: skip
    a("--prompt-tokens", type=int, default=d.prompt_tokens, help=f"({d.prompt_tokens})")
    a("--midi-prompt-tokens", type=int, default=d.midi_prompt_tokens,
      help="MIDI samples' prompt; 0 = from scratch, continuations reported beside (0)")  # fmt: skip
    a("--gen-length", type=int, default=d.gen_length, help=f"({d.gen_length})")
    a("--steps", type=int, default=d.steps, help="denoising steps (default: the model's)")
    a("--block-length", type=int, default=d.block_length, help="semi-AR block (0 = one block)")
    a("--threshold", type=float, default=d.threshold, help="parallel-decoding threshold")
    a("--temperature", type=float, default=d.temperature, help="default: the model's")
    a("--top-p", type=float, default=d.top_p, help="default: the model's")
    a("--position-score", default=d.position_score, help="default: the model's")
    a("--use-cache", default=d.use_cache, choices=CACHE_MODES, help="default: the model's")
    a("--seed", type=int, default=d.seed, help=f"({d.seed})")
    a("--midi-reference-docs", type=int, default=d.midi_reference_docs)
    a("--midi-reference", default=d.midi_reference, choices=("bach", "split"))
    a("--function-headers", type=int, default=d.function_headers, help="code headers (30)")
    a("--function-gen-length", type=int, default=d.function_gen_length)
    a("--device", default=d.device, help=f"({d.device})")
    a("--threads", dest="num_threads", type=int, default=d.num_threads, help="0 = as is")
    a("--json", action="store_true", help="print the result as JSON")
    a("--out", metavar="FILE", help="also write the JSON result to FILE")
    a("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=run_eval)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    names = {f for f in EvalConfig.__dataclass_fields__}
    return replace(EvalConfig(), **{k: v for k, v in vars(args).items() if k in names})


def run_eval(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    quiet = getattr(args, "quiet", False)
    result = evaluate_model(cfg, log=None if quiet else lambda s: print(s, file=sys.stderr))
    text = json.dumps(result, indent=2)
    if getattr(args, "out", None):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text if getattr(args, "json", False) else format_report(result))
    return 0
