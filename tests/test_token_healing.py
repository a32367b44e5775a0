"""Token healing: a text/code prompt's last token, when other tokens extend it, is re-chosen by the
model (tokenizers/healing.py, models/generation.py), on the shipped diffusion and AR models."""

from __future__ import annotations

import pytest

from unmask.engine.engine import SUCCEEDED, Engine
from unmask.engine.request import GenerationRequest
from unmask.models.generation import Generator, default_model_dir
from unmask.models.sampler_params import SamplerParams
from unmask.tokenizers.healing import healing_table

pytestmark = pytest.mark.usefixtures("one_thread")

HEADER = "def read_config(path):\n"
# model defaults for everything but the length (as a request that sets only gen_length)
UNSET = ("steps", "block_length", "threshold", "threshold_factor", "position_score",
         "temperature", "top_k", "top_p", "remask_budget", "remask_threshold", "use_cache")  # fmt: skip


@pytest.fixture(scope="module", params=["model", "model-ar"])
def generator(request) -> Generator:
    return Generator.load(default_model_dir(request.param), dtype="float32")


def _params(**kw) -> SamplerParams:
    return SamplerParams(**{"gen_length": 24, "unset": UNSET, **kw})


def _ids(gen: Generator, text: str) -> int:
    (i,) = gen.vocab.encode_text(text)
    return i


def test_the_prefix_table_lets_a_newline_grow_into_indentation(generator):
    vocab = generator.vocab
    table = healing_table(vocab)
    assert healing_table(vocab) is table  # built once per vocabulary
    newline, indent = _ids(generator, "\n"), vocab.encode_text("\n    x")[0]
    allowed = table.allowed_after(newline)
    assert vocab.token_str(indent).startswith(vocab.token_str(newline)) and indent in allowed
    assert newline in allowed and _ids(generator, "x") not in allowed
    assert all(vocab.token_str(i).startswith(vocab.token_str(newline)) for i in allowed)
    assert table.allowed_after(vocab.eos_id) == ()  # not a BPE id: nothing to heal
    longest = max(range(vocab.bpe.size), key=lambda i: len(vocab.bpe.token(i)))
    assert table.allowed_after(vocab.ranges.bpe_start + longest) == ()  # nothing extends it


def test_a_prompt_ending_in_a_newline_starts_the_output_and_the_first_token(generator):
    prompt = "The first line.\n"
    g = generator.generate("text", prompt, _params(seed=1))
    assert g.output.startswith(prompt)
    first = generator.vocab.decode(g.generated_ids[:1], "text")
    assert first.startswith("\n")
    # the healed token still counts as the prompt's: BOS, tag and every prompt token
    assert g.prompt_tokens == 2 + len(generator.vocab.encode_text(prompt))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_function_header_is_completed_with_an_indented_body(generator, seed):
    g = generator.generate("code", HEADER, _params(seed=seed))
    assert g.output.startswith(HEADER)
    body = g.output[len(HEADER) :]
    indent = len(body) - len(body.lstrip(" "))
    assert indent >= 4, repr(body[:40])


def test_healing_off_runs_the_whole_prompt_as_before(generator):
    params = _params(seed=2)
    generator.token_healing = False
    try:
        off = generator.generate("code", HEADER, params)
    finally:
        del generator.token_healing
    head = generator.header("code") + generator.vocab.encode_text(HEADER)
    assert off.ids[: len(head)] == head
    old = generator.run(
        generator.prepare_from_ids("code", generator.vocab.encode_text(HEADER), params, HEADER)
    )
    assert (off.ids, off.output) == (old.ids, old.output)
    on = generator.generate("code", HEADER, params)
    assert on.ids[: len(head) - 1] == head[:-1] and on.prompt_tokens == off.prompt_tokens


def test_infill_and_midi_are_never_healed(generator):
    if generator.is_ar:
        pytest.skip("the AR baseline fills no gaps")
    job = generator.prepare_infill("code", ["def f(x):\n", 6, "\n"], _params(gen_length=6))
    assert job.first_allowed == () and job.canvas.layout(generator.vocab.mask_id).pinned == ()
    midi = generator.prepare_generate("midi", None, _params(gen_length=16))
    assert midi.first_allowed == () and midi.healed == ""


def test_engine_batches_a_healed_job_with_another_as_if_each_ran_alone(generator):
    healed = GenerationRequest("code", prompt=HEADER, params=_params(seed=4))
    plain = GenerationRequest("text", prompt="", params=_params(seed=5))  # nothing to heal
    assert generator.prepare(healed).first_allowed and not generator.prepare(plain).first_allowed
    alone = {r.job_id: generator.run(generator.prepare(r)).output for r in (healed, plain)}
    with Engine(generator, max_batch=4) as engine:
        handles = [engine.submit(r) for r in (healed, plain)]
        events = list(handles[0].events(timeout=120))
        results = {h.job_id: h.result(timeout=120) for h in handles}
    for r in (healed, plain):
        assert results[r.job_id].status == SUCCEEDED, results[r.job_id].error
        assert results[r.job_id].output_text == alone[r.job_id]
    # streamed blocks add up to the completion: the healed newline is not sent twice
    streamed = "".join(e["text"] for e in events if e["type"] == "block")
    completion = alone[healed.job_id][len(HEADER) :]
    assert completion.startswith(streamed) or streamed.startswith(completion)
    assert streamed[:1] == completion[:1]


def test_a_pinned_position_keeps_only_its_ids_and_other_rows_stay():
    import torch

    from unmask.models.canvas import Canvas, Fixed, Masked
    from unmask.models.constraints import apply_pinned, pin_masks

    layout = Canvas([Fixed([2, 5]), Masked(3, "text", (7, 9))]).layout(mask_id=1)
    assert layout.pinned == ((2, (7, 9)),)
    logits = torch.zeros(2, 12)
    out = apply_pinned(logits, torch.tensor([2, 3]), pin_masks(layout.pinned, 12, "cpu"))
    assert out[0].isfinite().nonzero().flatten().tolist() == [7, 9]
    assert out[1].isfinite().all() and logits.isfinite().all()  # the input is not changed
