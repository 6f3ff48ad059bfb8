"""A tiny random-init LLaVA-OneVision model saved to a folder, for offline tests and demos.

The folder has the same layout as a hub checkpoint (``config.json``, weights, tokenizer,
image/video processor, chat template), so it loads through exactly the same
``from_pretrained`` calls as ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``. Its answers are
random byte soup: it exercises the code path, not the language.

Example:
    >>> folder = build_tiny_llava("tiny-llava")  # doctest: +SKIP
    >>> LlavaExplainer.from_pretrained(folder)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Vision tower input side in pixels and patch side: (32 / 8)^2 = 16 image tokens per tile.
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
TINY_TEXT_HIDDEN = 64
TINY_TEXT_LAYERS = 2
TINY_TEXT_HEADS = 4
TINY_TEXT_KV_HEADS = 2
TINY_VISION_HIDDEN = 32
TINY_VISION_LAYERS = 2
TINY_VISION_HEADS = 2
TINY_MAX_POSITIONS = 4096
#: Anyres tiles the image processor may choose from (multiples of the tile side).
TINY_GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64], [96, 96]]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

#: Qwen-style template of the LLaVA-OneVision checkpoints: images, then videos, then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _build_tokenizer():
    """Byte-level BPE with the 256 byte symbols and no merges, plus the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(byte_symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


def build_tiny_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-init LLaVA-OneVision checkpoint (~0.2 M parameters) to ``out_dir``.

    Deterministic: the same ``seed`` gives the same weights (the global torch RNG is
    forked, so callers' random state is untouched). No network access. Returns the folder.
    """
    from transformers import (
        GenerationConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=2 * TINY_TEXT_HIDDEN,
        num_hidden_layers=TINY_TEXT_LAYERS,
        num_attention_heads=TINY_TEXT_HEADS,
        num_key_value_heads=TINY_TEXT_KV_HEADS,
        max_position_embeddings=TINY_MAX_POSITIONS,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=TINY_VISION_HIDDEN,
        intermediate_size=2 * TINY_VISION_HIDDEN,
        num_hidden_layers=TINY_VISION_LAYERS,
        num_attention_heads=TINY_VISION_HEADS,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=TINY_GRID_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False, max_new_tokens=60
    )

    siglip_mean_std = [0.5, 0.5, 0.5]
    tile = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    image_processor = LlavaOnevisionImageProcessor(
        size=tile,
        image_grid_pinpoints=TINY_GRID_PINPOINTS,
        image_mean=siglip_mean_std,
        image_std=siglip_mean_std,
    )
    video_processor = LlavaOnevisionVideoProcessor(
        size=tile, image_mean=siglip_mean_std, image_std=siglip_mean_std
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
