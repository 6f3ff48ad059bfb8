"""Stage 02: text anchors and the two-anchor softmax (notebook 02).

A compositional prompt ensemble in the WinCLIP style: state phrases ("flawless {}",
"damaged {}") are combined with photo templates ("a close-up photo of the {}."),
encoded by CLIP's text tower and averaged into one *normal* and one *anomalous* anchor
per class. Anything in the joint space (a patch token, an image embedding, a window
embedding) is then scored by :func:`anomaly_probability`, the softmax over its cosine
similarities to the two anchors, divided by a temperature T:

    p(anomalous | x) = exp(cos(x, a) / T) / (exp(cos(x, n) / T) + exp(cos(x, a) / T))

CLIP's logit scale 100 is T = 0.01 (the token method); WinCLIP uses T = 0.07.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

#: The token method's ensemble: 7 normal and 5 anomalous states x 12 of WinCLIP's templates
#: (144 prompts per class keeps CPU encoding short; the windows method uses all of WinCLIP's).
NORMAL_STATES: tuple[str, ...] = ("{}", "flawless {}", "perfect {}", "unblemished {}",
                                  "{} without flaw", "{} without defect", "{} without damage")
ANOMALOUS_STATES: tuple[str, ...] = ("damaged {}", "broken {}", "{} with flaw", "{} with defect",
                                     "{} with damage")
TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of the {}.", "a dark photo of the {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a photo of a {}.", "a photo of the small {}.",
    "a photo of the large {}.", "a photo of the {} for visual inspection.",
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

    The token method averages L2-normalised prompt embeddings; the window method (like
    WinCLIP and anomalib) averages the raw ones, which weights each prompt by its norm.

    Example:
        >>> average_anchor(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor([0.7071, 0.7071])
    """
    return F.normalize(prompt_embeddings.mean(dim=0), dim=-1)


def prompt_anchors(encode: Callable[..., torch.Tensor], class_name: str,
                   normal_states: Sequence[str], anomalous_states: Sequence[str],
                   templates: Sequence[str], normalize: bool = True) -> TextAnchors:
    """A class's anchors: every (state x template) prompt encoded by ``encode(prompts,
    normalize=...)`` and each half averaged (:func:`average_anchor`)."""
    normal, anomalous = build_prompts(class_name, normal_states, anomalous_states, templates)
    embeddings = encode(normal + anomalous, normalize=normalize)
    n = len(normal)
    return TextAnchors(average_anchor(embeddings[:n]), average_anchor(embeddings[n:]), class_name)


class TextAnchors(tuple):
    """The (normal, anomalous) anchors of one class: unpacks like the pair it is and
    keeps the class name (which decides, e.g., whether the class is a texture).

    The two tensors carry the name too (``normal.class_name``), so anchors unpacked into
    two tensors and passed on still say which class they belong to.

    Example:
        >>> anchors = TextAnchors(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), "screw")
        >>> normal, anomalous = anchors
        >>> anchors.class_name, anchors.stacked().shape
        ('screw', torch.Size([2, 2]))
    """

    class_name: str | None

    def __new__(cls, normal: torch.Tensor, anomalous: torch.Tensor,
                class_name: str | None = None) -> TextAnchors:
        class_name = getattr(normal, "class_name", None) if class_name is None else class_name
        for tensor in (normal, anomalous):  # tag new tensors; never rename tagged ones
            if getattr(tensor, "class_name", None) is None:
                tensor.class_name = class_name
        anchors = super().__new__(cls, (normal, anomalous))
        anchors.class_name = class_name
        return anchors

    def stacked(self) -> torch.Tensor:
        """(2, D): normal first."""
        return torch.stack([self[0], self[1]])


def anomaly_probability(embeddings: torch.Tensor, anchors: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """The two-anchor softmax: probability of "anomalous" for each embedding.

    ``softmax(cos(x, [normal, anomalous]) / temperature)[1]``; neither input needs to be
    normalised (cosines are taken).

    Args:
        embeddings: (..., D). anchors: (2, D), normal first.

    Returns:
        (...) values in (0, 1).

    Example:
        The patch (1, 0) is the normal anchor; at T = 1 it is 27 % anomalous:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> anomaly_probability(x, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), temperature=1.0)
        tensor([0.2689, 0.7311])
    """
    cos = F.normalize(embeddings.float(), dim=-1) @ F.normalize(anchors.float(), dim=-1).T
    return (cos / temperature).softmax(dim=-1)[..., 1]


def text_map(patch_tokens: torch.Tensor, anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-patch probability of "anomalous", averaged over layers.

    Args:
        patch_tokens: (B, L, N, D). anchors: (2, D), normal first.

    Returns:
        (B, N) values in (0, 1).

    Example:
        >>> tokens = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # B=1, L=1, N=2, D=2
        >>> text_map(tokens, torch.eye(2), 1.0)
        tensor([[0.2689, 0.7311]])
    """
    return anomaly_probability(patch_tokens, anchors, temperature).mean(dim=1)
