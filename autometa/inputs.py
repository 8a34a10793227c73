"""What an encoder receives: the modalities, their per-row shapes (``InputSpec``), and the keys
of presence masks and of encoders' derived inputs. Plain data, no torch: commands that only
name modalities (``autometa plugins new``) import this and nothing heavier.
"""

from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("tabular", "text", "image", "vector")


# Model inputs carry, beside each modality's tensor, a bool [batch] tensor under
# MASK_PREFIX + modality: True where the row has that modality (missing-modality rows).
MASK_PREFIX = "present:"


@dataclass(frozen=True)
class InputSpec:
    """What an encoder receives for one modality: per-row shape (and vocabulary for text).

    tabular/vector: float ``[batch, features]``; text: int64 token ids ``[batch, length]``
    with 0 as padding and ids below ``vocab_size``; image: float ``[batch, C, H, W]``.
    """

    modality: str
    shape: tuple[int, ...]
    vocab_size: int | None = None

    @staticmethod
    def example(modality: str) -> "InputSpec":
        """A small spec used to check that a component constructs with its defaults."""
        return {
            "tabular": InputSpec("tabular", (6,)),
            "vector": InputSpec("vector", (8,)),
            "text": InputSpec("text", (12,), vocab_size=64),
            "image": InputSpec("image", (1, 28, 28)),
        }[modality]


def derived_key(modality: str, encoder: str) -> str:
    """The input name under which an encoder's prepared input is stored."""
    return f"{modality}@{encoder}"
