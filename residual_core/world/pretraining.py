"""Pretraining the embedded default model on the synthetic world.

:func:`pretrain_embedded` trains the ``residual-tiny`` open_clip CLIP from scratch on image-caption
pairs of :mod:`residual_core.world.rendering` with open_clip's contrastive loss and caches the state dict
under a name keyed by the training config and the world version; the file loads through
``load_model(EMBEDDED_MODEL, path)`` like any user checkpoint.

Training has two caption stages (:class:`PretrainConfig`). For the first ``digit_caption_steps``
steps every caption is the bare digit name (``"seven"``), then captions describe a random subset
of the attributes (:class:`residual_core.world.rendering.CaptionMix`). Why: from a random start both towers
first collapse onto one direction; descriptive captions then teach colour and background, which
the collapsed towers can tell apart, but not digits (zero-shot at chance even after 77k pairs, 3x
the budget, in an earlier version of the world), whereas with class-name captions the image tower
leaves the collapse after ~100-150 steps, as a supervised classifier of the same tower does.

What makes training fit about two CPU minutes: the text tower is causal, so running it on tokens
cut after the longest caption of a batch gives the features of the full 32-token context
(:func:`encode_text_truncated`), done in buckets of similar length; each distinct caption of a
batch is encoded once; the token embedding table (49,408 x 128, of which the world uses ~60 rows)
stays frozen at its seeded initialisation, because its dense gradient and AdamW update cost more
than the rest of the text tower's (unfreezing it did not help in a trial run); and one torch
thread (see :func:`pretrain_embedded`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from open_clip.loss import ClipLoss
from open_clip.transformer import text_global_pool

from residual_core.identity import EMBEDDED_MODEL, config_hash
from residual_core.layout import Layout
from residual_core.method.models import LoadedModel, load_model
from residual_core.world import rendering


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained weights besides the seed (hashed into the name).

    ``steps`` batches of ``batch_size`` fresh pairs each (every pair is seen once); the first
    ``digit_caption_steps`` of them are captioned with the bare digit name, the rest by
    :func:`residual_core.world.rendering.caption` with the mix ``captions``. AdamW (``betas``, ``eps`` as in
    open_clip's training) with ``weight_decay`` on matrices only; learning rate warmed up linearly
    over ``warmup_steps``, then cosine-decayed to 0.
    """

    steps: int = 520
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 30
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    digit_caption_steps: int = 200
    captions: rendering.CaptionMix = field(default_factory=rendering.CaptionMix)


def _config_hash(config: PretrainConfig) -> str:
    keyed = {"config": asdict(config), "world_version": rendering.WORLD_VERSION,
             "model": EMBEDDED_MODEL}
    return config_hash(keyed)[:12]


def checkpoint_name(config: PretrainConfig, seed: int) -> str:
    """File name of the checkpoint of ``config`` and ``seed``."""
    return f"{EMBEDDED_MODEL}-world-seed{seed}-{_config_hash(config)}.pt"


def encode_text_truncated(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed on the tokens up to the longest caption's end.

    Exact for open_clip's causal text tower with end-of-text pooling: no position before the end
    token attends to the padding after it. ``tokens [N, context]`` -> ``[N, E]`` (unnormalised).
    """
    length = int((tokens != 0).sum(1).max())  # open_clip pads with 0
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, getattr(model, "text_eos_id", None))
    return x @ model.text_projection


def _encode_captions(model: torch.nn.Module, tokens: torch.Tensor, buckets: int = 3
                     ) -> torch.Tensor:
    """:func:`encode_text_truncated` in ``buckets`` groups of similar caption length (exact, and
    cheaper than padding every caption to the longest)."""
    order = torch.argsort((tokens != 0).sum(1), stable=True)
    parts = order.chunk(buckets)
    features = torch.cat([encode_text_truncated(model, tokens[part]) for part in parts])
    return features[torch.argsort(order)]


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads (``None``: leave as is), restoring the previous count."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, embeddings' 1-d params, logit scale."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (rest if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _lr_factor(step: int, config: PretrainConfig) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to 0 at ``config.steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _pretraining_data(loaded: LoadedModel, config: PretrainConfig, seed: int):
    """All ``n = steps·batch_size`` pairs, prepared up front: images ``[n, 3, 32, 32]`` (normalised
    model input), caption ids ``[n]`` and the tokens ``[n_distinct, context]`` of the distinct
    captions (tokenised once)."""
    n = config.steps * config.batch_size
    samples = rendering.pretraining_samples(n, seed)
    visual = loaded.model.visual
    images = rendering.to_model_input(rendering.render_batch(samples), visual.image_mean, visual.image_std)
    n_first = config.digit_caption_steps * config.batch_size
    texts = ([rendering.CLASSNAMES["digit"][d] for d in samples.digit[:n_first]]
             + rendering.captions(samples.take(np.arange(n_first, n)), seed + 1, config.captions))
    distinct, caption_ids = np.unique(np.asarray(texts), return_inverse=True)
    return images, torch.from_numpy(caption_ids.astype(np.int64)), loaded.tokenizer(list(distinct))


def _train(config: PretrainConfig, seed: int, progress: bool) -> torch.nn.Module:
    """The training loop; returns the trained model in eval mode."""
    from tqdm.auto import tqdm

    loaded = load_model(EMBEDDED_MODEL, None, device="cpu", seed=seed)
    model = loaded.model
    images, caption_ids, tokens = _pretraining_data(loaded, config, seed)
    model.token_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=config.betas, eps=config.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    loss_fn = ClipLoss()
    torch.manual_seed(seed)  # the loop draws nothing random today (no dropout); stay seeded
    model.train()
    bar = tqdm(range(config.steps), desc="pretraining residual-tiny", disable=not progress)
    start = time.perf_counter()
    for step in bar:
        batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
        distinct, inverse = torch.unique(caption_ids[batch], return_inverse=True)
        image_features = model.encode_image(images[batch], normalize=True)
        text_features = _encode_captions(model, tokens[distinct])[inverse]
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # as open_clip's training: temperature at most 100
            model.logit_scale.clamp_(0, math.log(100))
        rate = (step + 1) * config.batch_size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
    return model.eval()


def _resolve(config: PretrainConfig | None, steps: int | None, batch_size: int | None
             ) -> PretrainConfig:
    overrides = {k: v for k, v in {"steps": steps, "batch_size": batch_size}.items()
                 if v is not None}
    return replace(config or PretrainConfig(), **overrides)


def checkpoint_path(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int | None = None,
    config: PretrainConfig | None = None,
) -> Path:
    """Where :func:`pretrain_embedded` with the same arguments writes (or finds) its checkpoint."""
    out_dir = Path(out_dir) if out_dir is not None else Layout.of().checkpoints
    return out_dir / checkpoint_name(_resolve(config, steps, batch_size), seed)


def pretrain_embedded(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int | None = None,
    config: PretrainConfig | None = None,
    progress: bool = True,
    num_threads: int | None = 1,
) -> Path:
    """Pretrain the embedded ``residual-tiny`` CLIP on the synthetic world (or reuse the cache).

    Args:
        out_dir: checkpoint folder (default ``Layout.of().checkpoints``).
        seed: seeds the initialisation, the pretraining samples, captions and data order.
        steps, batch_size: override those fields of ``config``.
        config: the training config (default :class:`PretrainConfig`).
        progress: show a tqdm bar with the loss and images per second.
        num_threads: torch threads while training (restored after; ``None``: unchanged). One by
            default: on a shared CPU, OpenMP threads waiting for a busy core cost more than a
            second core gives (measured 3.4x slower with 2 threads on 2 cores at load 5).

    Returns:
        The checkpoint path (:func:`checkpoint_path`); if that file exists it is returned without
        training. It holds ``model.state_dict()`` and loads through
        ``load_model(EMBEDDED_MODEL, path)``.
    """
    config = _resolve(config, steps, batch_size)
    path = checkpoint_path(out_dir, seed=seed, config=config)
    if path.is_file():
        return path
    with _threads(num_threads):
        model = _train(config, seed, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a reader never sees a partial file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
