"""Small random-init ``transformers`` towers built from configs (offline), for the HF tests."""

import torch
from transformers import (
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipVisionConfig,
    BlipVisionModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTModel,
)

TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
            vocab_size=128, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _vision(width, layers, heads, image_size=32, patch=8):
    # BLIP's vision config initialises every weight at std 1e-10 by default (its checkpoints
    # are loaded, never trained from scratch): 0.02, as the other families, so heads matter
    return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=int(1.5 * width), patch_size=patch, image_size=image_size,
                initializer_range=0.02)


def build(kind: str, *, width=48, layers=3, heads=3, image_size=32, seed=0, attn="sdpa",
          **extra):
    """A small eval-mode tower of ``kind`` (a transformers class name). ``attn="eager"`` makes
    ``output_attentions`` work (its softmax runs in float32 in some families, so float64
    references use ``sdpa``)."""
    torch.manual_seed(seed)
    vision = {**_vision(width, layers, heads, image_size), **extra}
    if kind == "Dinov2Model":
        vision.pop("intermediate_size")
        model = Dinov2Model(Dinov2Config(mlp_ratio=2, **vision))
    elif kind == "ViTModel":
        model = ViTModel(ViTConfig(**vision))
    elif kind == "CLIPModel":
        model = CLIPModel(CLIPConfig(vision_config=vision, text_config=TEXT, projection_dim=24))
    elif kind == "CLIPVisionModel":
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    elif kind == "CLIPVisionModelWithProjection":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=24, **vision))
    elif kind == "BlipForImageTextRetrieval":
        text = {**TEXT, "encoder_hidden_size": width, "sep_token_id": 2}
        model = BlipForImageTextRetrieval(BlipConfig(vision_config=vision, text_config=text,
                                                     image_text_hidden_size=24))
    elif kind == "BlipVisionModel":
        model = BlipVisionModel(BlipVisionConfig(**vision))
    else:
        raise ValueError(kind)
    model.set_attn_implementation(attn)
    return model.eval()


def perturb(model, seed=0, scale=0.3):
    """Random init leaves norms at the identity and LayerScale constant; move them away."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith(("weight", "bias", "lambda1")):
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def _clip_tokenizer(folder):
    """A CLIP tokenizer over single byte-level characters (no merges): real CLIP tokenisation
    with a 514-token vocabulary (the text config's ``vocab_size``)."""
    import json

    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _bert_tokenizer(folder, words=("a", "photo", "of", "the", "digit")):
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    (folder / "vocab.txt").write_text("\n".join(specials + list(words) + letters
                                                + [f"##{c}" for c in letters]))
    return BertTokenizer(str(folder / "vocab.txt"))


CLIP_TEXT = dict(TEXT, vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                 max_position_embeddings=40)
BLIP_TEXT = dict(TEXT, vocab_size=64, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                 max_position_embeddings=40, sep_token_id=3)


def save_hf(kind: str, folder, *, image_size=32, seed=0, **build_kwargs):
    """Build a small random-init ``kind`` tower, save it with its image processor (and
    tokenizer) by ``save_pretrained`` into ``folder``, as a Hub checkpoint is laid out; returns
    the in-memory model (the reference the loaded one is compared with)."""
    from pathlib import Path

    from transformers import (
        BitImageProcessor,
        BlipImageProcessor,
        CLIPImageProcessor,
        ViTImageProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = {"CLIPModel": CLIP_TEXT, "BlipForImageTextRetrieval": BLIP_TEXT}.get(kind)
    if kind == "CLIPModel":
        torch.manual_seed(seed)
        vision = _vision(build_kwargs.pop("width", 48), build_kwargs.pop("layers", 2),
                         build_kwargs.pop("heads", 3), image_size)
        model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text,
                                     projection_dim=24)).eval()
    elif kind == "BlipForImageTextRetrieval":
        torch.manual_seed(seed)
        width = build_kwargs.pop("width", 48)
        vision = _vision(width, build_kwargs.pop("layers", 2), build_kwargs.pop("heads", 3),
                         image_size)
        model = BlipForImageTextRetrieval(BlipConfig(
            vision_config=vision, text_config={**text, "encoder_hidden_size": width},
            image_text_hidden_size=24)).eval()
    else:
        model = build(kind, image_size=image_size, seed=seed, **build_kwargs)
    perturb(model, seed)
    model.save_pretrained(folder)
    square = {"height": image_size, "width": image_size}
    if kind == "Dinov2Model":
        processor = BitImageProcessor(size={"shortest_edge": image_size}, crop_size=square)
    elif kind.startswith("CLIP"):
        processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=square)
    elif kind.startswith("Blip"):
        processor = BlipImageProcessor(size=square)
    else:
        processor = ViTImageProcessor(size=square)
    processor.save_pretrained(folder)
    if kind == "CLIPModel":
        _clip_tokenizer(folder).save_pretrained(folder)
    elif kind == "BlipForImageTextRetrieval":
        _bert_tokenizer(folder).save_pretrained(folder)
    return model
