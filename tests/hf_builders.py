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
    return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=int(1.5 * width), patch_size=patch, image_size=image_size)


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
