"""Tiny random teachers saved in the `save_pretrained` layout, for tests and benchmarks.

They load through exactly the code a real run uses (`from_pretrained(path)`), so the labelling
pipeline is exercised end to end on a 2-core machine without downloading anything. Their outputs
are meaningless; shapes, dtypes, batching and bookkeeping are what they test.
"""

from __future__ import annotations

from pathlib import Path

import torch

_IMAGE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_depth(path: str | Path, seed: int = 0) -> str:
    """A Depth-Anything model with a 4-layer, 32-wide DINOv2 backbone (~0.2 M params)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=518, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[16, 16, 16, 16], fusion_hidden_size=16,
                              head_hidden_size=8, reassemble_hidden_size=32, patch_size=14)
    model = DepthAnythingForDepthEstimation(cfg)
    with torch.no_grad():  # a positive bias so the random head's ReLU output is not all zeros
        model.head.conv3.bias.fill_(0.5)
    model.save_pretrained(str(path))
    return str(path)


def save_tiny_sam(path: str | Path, seed: int = 0, image_size: int = 64) -> str:
    """A SAM with a 2-layer ViT on 64 px inputs, plus its processor (PIL backend)."""
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.manual_seed(seed)
    patch = 8
    vision = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                             image_size=image_size, patch_size=patch, mlp_dim=64, window_size=4,
                             global_attn_indexes=[1], num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=image_size, patch_size=patch, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                   iou_head_hidden_dim=16)
    SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)) \
        .save_pretrained(str(path))
    mask_side = image_size // patch * 4
    processor = SamProcessor(image_processor=SamImageProcessorPil(
        size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": mask_side}, mask_pad_size={"height": mask_side, "width": mask_side}))
    processor.save_pretrained(str(path))
    return str(path)


def _tiny_word_tokenizer(extra: list[str]):  # -> PreTrainedTokenizerFast
    from versavit.models.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_tokens(extra, special_tokens=True)
    return tok


def save_tiny_describer(path: str | Path, seed: int = 0) -> str:
    """A LLaVA (2-layer CLIP vision + 2-layer Llama) with a processor and chat template."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    tok = _tiny_word_tokenizer(["<image>"])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=_IMAGE_TEMPLATE,
                               patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return str(path)


# Qwen2-VL's chat template, reduced to what a describer sends (default system turn, image + text turns)
_QWEN_VL_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_qwen2_vl_describer(path: str | Path, seed: int = 0, max_pixels: int = 112 * 112,
                                 model_type: str = "qwen2_vl") -> str:
    """A Qwen2-VL (1-block, 32-wide vision tower + 1-layer, 32-wide Qwen2 text model, ~0.1 M params).

    `model_type` "qwen2_5_vl" or "qwen3_vl" saves the same sizes as Qwen2.5-VL / Qwen3-VL (patch 16),
    whose box conventions differ. Laid out as a real checkpoint: config.json + weights
    (AutoModelForImageTextToText), preprocessor_config.json (Qwen2VLImageProcessor, processor_class as
    the family's), the tokenizer with Qwen's special tokens including <|box_start|>/<|box_end|>, and
    Qwen2-VL's chat template (tokenizer and chat_template.json). AutoProcessor itself needs torchvision
    for the family's video processor.
    """
    import json

    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    path = Path(path)
    tok = _tiny_word_tokenizer(["<|video_pad|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                                "<|box_end|>"])
    tok.chat_template = _QWEN_VL_TEMPLATE
    ids = tok.convert_tokens_to_ids
    head_dim = 16  # M-RoPE splits head_dim / 2 rotary frequencies over (time, height, width)
    text = {"vocab_size": len(tok), "hidden_size": 2 * head_dim, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": head_dim, "max_position_embeddings": 512,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    vision = {"depth": 1, "hidden_size": 2 * head_dim, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2}
    if model_type == "qwen2_vl":
        config_cls, model_cls, processor = Qwen2VLConfig, Qwen2VLForConditionalGeneration, "Qwen2VLProcessor"
        vision |= {"embed_dim": 32, "mlp_ratio": 2}
    elif model_type == "qwen2_5_vl":
        config_cls, model_cls, processor = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VLProcessor"
        vision |= {"out_hidden_size": 2 * head_dim, "intermediate_size": 64, "window_size": 56,
                   "fullatt_block_indexes": [0]}
    elif model_type == "qwen3_vl":
        config_cls, model_cls, processor = Qwen3VLConfig, Qwen3VLForConditionalGeneration, "Qwen3VLProcessor"
        vision |= {"out_hidden_size": 2 * head_dim, "intermediate_size": 64, "patch_size": 16,
                   "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
    else:
        raise ValueError(f"unknown model_type {model_type!r}; expected qwen2_vl, qwen2_5_vl or qwen3_vl")
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                     video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                     vision_end_token_id=ids("<|vision_end|>"))
    model = model_cls(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": max_pixels},
                             patch_size=vision["patch_size"]).save_pretrained(str(path))
    pre = json.loads((path / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps({**pre, "processor_class": processor}, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": _QWEN_VL_TEMPLATE}, indent=2))
    return str(path)


def save_tiny_embedder(path: str | Path, seed: int = 0, dim: int = 32) -> str:
    """A sentence-transformer from modules: a 2-layer BERT (word-level vocab) + mean pooling + normalise."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from versavit.models.tokenizer import _default_corpus

    torch.manual_seed(seed)
    path = Path(path)
    bert_dir = path / "_bert"
    bert_dir.mkdir(parents=True, exist_ok=True)
    words = sorted({w.strip(".,?:").lower() for line in _default_corpus() for w in line.split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (bert_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(bert_dir / "vocab.txt"), do_lower_case=True).save_pretrained(str(bert_dir))
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=2 * dim, max_position_embeddings=64)).save_pretrained(str(bert_dir))
    modules = [models.Transformer(str(bert_dir), max_seq_length=32), models.Pooling(dim, pooling_mode="mean"),
               models.Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(path / "model"))
    return str(path / "model")


TINY_TEACHERS = ("depth-anything", "sam", "describer", "embedder")


def save_tiny_teachers(folder: str | Path, seed: int = 0) -> dict[str, str]:
    """Every teacher of the label steps, tiny and random, in `folder`/<name> (TINY_TEACHERS): what
    configs/rehearsal.yaml's `labeling.teachers` point at. The describer is a Qwen2-VL (box-prompt mode)."""
    folder = Path(folder)
    return {"depth-anything": save_tiny_depth(folder / "depth-anything", seed),
            "sam": save_tiny_sam(folder / "sam", seed),
            "describer": save_tiny_qwen2_vl_describer(folder / "describer", seed),
            "embedder": save_tiny_embedder(folder / "embedder", seed)}
