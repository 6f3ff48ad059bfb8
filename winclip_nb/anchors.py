"""Stage 02: text anchors and the text map (notebook 02).

A compositional prompt ensemble in the WinCLIP style: state phrases ("flawless
{}", "damaged {}") are combined with photo templates ("a close-up photo of
the {}."), encoded by CLIP's text tower, averaged and L2-normalised into one
*normal* and one *anomalous* anchor per class. Each patch token is then compared
with both anchors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import DEFAULT_TEXT_TEMPERATURE

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
#: A subset of WinCLIP's templates (12 x 12 = 144 prompts per class keeps CPU encoding short).
TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for anomaly detection.",
)


#: WinCLIP's full compositional ensemble (``method="windows"``): the state and template
#: lists of the paper's supplement as anomalib's ``prompting.py`` uses them, 7 x 21 normal
#: and 4 x 21 anomalous prompts. The repeated jpeg template is part of that list.
WINCLIP_NORMAL_STATES: tuple[str, ...] = NORMAL_STATES
WINCLIP_ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
WINCLIP_TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def readable_class_name(class_name: str) -> str:
    """``"metal_nut"`` -> ``"metal nut"`` (what goes into the prompts)."""
    return class_name.replace("_", " ").replace("-", " ").strip()


def build_prompts(
    class_name: str,
    normal_states: Sequence[str] = NORMAL_STATES,
    anomalous_states: Sequence[str] = ANOMALOUS_STATES,
    templates: Sequence[str] = TEMPLATES,
) -> tuple[list[str], list[str]]:
    """All (state x template) prompts for one class, normal and anomalous.

    Example:
        >>> normal, anomalous = build_prompts("screw", ["flawless {}"], ["broken {}"], ["a {}."])
        >>> normal, anomalous
        (['a flawless screw.'], ['a broken screw.'])
    """
    name = readable_class_name(class_name)
    normal = [t.format(s.format(name)) for s in normal_states for t in templates]
    anomalous = [t.format(s.format(name)) for s in anomalous_states for t in templates]
    return normal, anomalous


def average_anchor(prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """(P, D) prompt embeddings -> (D,) normalised mean.

    The token method averages L2-normalised prompt embeddings; the window method
    (like WinCLIP and anomalib) averages the raw ones, which weights each prompt by
    its norm.

    Example:
        >>> average_anchor(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor([0.7071, 0.7071])
    """
    return F.normalize(prompt_embeddings.mean(dim=0), dim=-1)


def text_map(
    patch_tokens: torch.Tensor,
    normal_anchor: torch.Tensor,
    anomalous_anchor: torch.Tensor,
    temperature: float = DEFAULT_TEXT_TEMPERATURE,
) -> torch.Tensor:
    """Per-patch probability of "anomalous", averaged over layers.

    ``softmax(temperature * [cos(p, normal), cos(p, anomalous)])[anomalous]``.

    Args:
        patch_tokens: (B, L, N, D) L2-normalised patch tokens.
        normal_anchor, anomalous_anchor: (D,) L2-normalised anchors.

    Returns:
        (B, N) values in [0, 1].

    Example:
        >>> tokens = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # B=1, L=1, N=2, D=2
        >>> text_map(tokens, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 1.0)
        tensor([[0.2689, 0.7311]])
    """
    anchors = torch.stack([normal_anchor, anomalous_anchor]).to(patch_tokens)  # (2, D)
    logits = (patch_tokens @ anchors.T) * temperature  # (B, L, N, 2)
    return logits.softmax(dim=-1)[..., 1].mean(dim=1)


def global_text_score(
    image_embedding: torch.Tensor,
    normal_anchor: torch.Tensor,
    anomalous_anchor: torch.Tensor,
    temperature: float = DEFAULT_TEXT_TEMPERATURE,
) -> torch.Tensor:
    """Image-level probability of "anomalous" from the global image embedding.

    Args:
        image_embedding: (B, D) L2-normalised.

    Returns:
        (B,) values in [0, 1].
    """
    anchors = torch.stack([normal_anchor, anomalous_anchor]).to(image_embedding)
    return (temperature * image_embedding @ anchors.T).softmax(dim=-1)[:, 1]
