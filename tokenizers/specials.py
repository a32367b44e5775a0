"""Special tokens of the unified vocabulary: fixed ids at the bottom of the id space.

PAD, MASK and EOS are distinct on purpose: PAD fills batches, MASK is the absorbing state of the
diffusion process (never a prediction target), EOS is a real token the model learns to write.
Ids 8..15 are reserved so new specials never shift the BPE and MIDI ranges of a trained model.
"""

from __future__ import annotations

MODALITIES: tuple[str, ...] = ("text", "code", "midi")

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<mask>",
    "<bos>",
    "<eos>",
    "<sep>",  # segment separator (between fixed segments of an infill canvas, or a prompt/answer)
    "<text>",
    "<code>",
    "<midi>",
)
NUM_SPECIAL = 16  # SPECIAL_TOKENS plus reserved slots

PAD_ID, MASK_ID, BOS_ID, EOS_ID, SEP_ID = range(5)
TAG_IDS: dict[str, int] = {"text": 5, "code": 6, "midi": 7}


def special_name(i: int) -> str:
    return SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else f"<reserved_{i}>"
