"""The loader that feeds a GPU: worker rule, pinned memory/prefetch wiring, JPEG draft decoding, uint8 transfer."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import training  # noqa: F401  (torchvision compatibility before open_clip)
from shards.samples import decode_image, draft_scale
from shards.writer import ShardSetWriter
from training import accelerator, data
from training.config import DataConfig
from training.validation import config_from_dict
from training.distributed import DistInfo

from conftest import ROOT, tiny_config


def photo_jpeg(width: int = 500, height: int = 375, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth gradients, sensor-like noise and a few hard-edged shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 200 + 30, y / height * 180 + 40, (x + y) / (width + height) * 150 + 60], -1)
    img += rng.normal(0, 8, img.shape)
    for _ in range(6):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(width // 25, width // 4)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[inside] = img[inside] * 0.4 + rng.integers(0, 255, 3) * 0.6
    buffer = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png_of(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_backbone():
    from training.config import ModelConfig
    from training.backbone import create_backbone

    return create_backbone(ModelConfig(name="tiny-vit", model_config_dir=str(ROOT / "configs" / "models")))


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory) -> Path:
    """4 train shards x 8 retrieval samples of 500x375 JPEGs, plus a val shard."""
    root = tmp_path_factory.mktemp("jpeg_shards")
    for split, n, shard_size in (("train", 32, 8), ("val", 8, 8)):
        with ShardSetWriter(root / split, shard_size=shard_size) as writer:
            for i in range(n):
                writer.write(f"{split}{i:03d}", {"jpg": photo_jpeg(seed=i)},
                             {"task": "retrieval", "caption": f"photo {i}", "label": f"photo {i}"})
    return root


# --------------------------------------------------------------------------- workers


def test_auto_worker_rule_from_cores_and_ranks():
    rule = data.auto_num_workers
    assert rule(2, 1) == 1 and rule(2, 2) == 1 and rule(1, 1) == 1  # never 0, even on one core
    assert rule(16, 2) == 7 and rule(32, 4) == 7 and rule(6, 1) == 5  # cores // ranks - 1
    assert rule(64, 1) == data.MAX_AUTO_WORKERS == 8 and rule(96, 8) == 8 and rule(64, 8) == 7  # capped at 8
    assert rule(16, 1, shards_per_rank=3) == 3 and rule(16, 1, shards_per_rank=0) == 1  # shards cap
    assert data.resolve_num_workers(3, 8, 1, 1, False) == 3  # an explicit count is kept as given
    assert data.resolve_num_workers("auto", 2, 10, 4, False, cores=64) == 2  # 10 shards // 4 ranks
    assert data.resolve_num_workers("auto", 2, 10, 4, True, cores=64) == 8  # resampling: no shard cap


def test_auto_workers_never_fail_a_valid_config_explicit_ones_still_get_the_clear_error(
        jpeg_shards, tiny_backbone, tmp_path, monkeypatch):
    from training.registry import get_task_class

    monkeypatch.setattr(data, "available_cores", lambda: 64)  # a big node: 64 // 2 - 1 = 31 workers wanted
    two_ranks = DistInfo(0, 2, 0, 2, torch.device("cpu"))
    task_class = get_task_class("retrieval")
    task = task_class(task_class.Options(), tiny_backbone)
    cfg = config_from_dict(tiny_config(jpeg_shards, tmp_path, data={"num_workers": "auto"}))
    assert cfg.data.num_workers == "auto" and DataConfig().num_workers == "auto"
    loader = data.train_loader(cfg, task, tiny_backbone, two_ranks, tmp_path, 0)
    assert loader.num_workers == 2  # 4 shards // 2 ranks, not 8 (which check_enough_shards would refuse)
    assert loader.prefetch_factor == 4 and loader.persistent_workers and not loader.pin_memory  # CPU
    explicit = config_from_dict(tiny_config(jpeg_shards, tmp_path, data={"num_workers": 3}))
    with pytest.raises(ValueError, match=r"4 shard\(s\) cannot be split over 2 rank\(s\) x 3 worker\(s\)"):
        data.train_loader(explicit, task, tiny_backbone, two_ranks, tmp_path, 0)
    with pytest.raises(Exception, match="num_workers"):
        config_from_dict(tiny_config(jpeg_shards, tmp_path, data={"num_workers": -1}))


def test_pin_memory_follows_the_deepspeed_accelerator(monkeypatch):
    assert accelerator.device_type() == "cpu"  # this test machine
    assert data.resolve_pin_memory("auto") is False and data.resolve_pin_memory(True) is True
    monkeypatch.setattr(accelerator, "device_type", lambda: "cuda")
    assert data.resolve_pin_memory("auto") is True and data.resolve_pin_memory(False) is False


# --------------------------------------------------------------------------- JPEG draft decoding


def test_draft_scale_is_the_smallest_scale_still_large_enough():
    assert draft_scale(500, 375, 73) == 4  # 125 x 94: >= 73, while 1/8 (63 x 47) would not be
    assert draft_scale(500, 375, 250) == 1  # 1/2 gives 188 < 250: full size
    assert draft_scale(1024, 768, 250) == 2 and draft_scale(4000, 3000, 224) == 8
    assert draft_scale(60, 40, 73) == 1 and draft_scale(500, 375, None) == 1  # never upscale; off


def test_decode_size_follows_open_clip_transforms():
    # RandomResizedCrop(s, scale=(0.9, 1)): ceil((s + 1) / 0.9); Resize(s) + CenterCrop: s
    assert data.decode_size_for(open_clip.image_transform(224, is_train=True)) == 250
    assert data.decode_size_for(open_clip.image_transform(64, is_train=True)) == 73
    assert data.decode_size_for(open_clip.image_transform(224, is_train=False)) == 224
    assert data.decode_size_for(open_clip.image_transform((224, 256), is_train=False)) == 256
    assert data.decode_size_for(T.Compose([T.CenterCrop(32), T.ToTensor()])) is None  # unknown: full decode
    assert data.decode_size_for(T.Compose([T.ToTensor()])) is None


@pytest.mark.parametrize("size, source, drafted", [(64, (500, 375), (125, 94)), (224, (1024, 768), (512, 384))])
def test_jpeg_is_draft_decoded_yet_never_smaller_than_the_transform_needs(size, source, drafted):
    jpeg = photo_jpeg(*source)
    train, val = (open_clip.image_transform(size, is_train=t) for t in (True, False))
    need = data.decode_size_for(train)
    image = decode_image(jpeg, need)
    assert image.size == drafted and image.mode == "RGB"
    assert min(image.size) >= need and min(image.size) < min(source)
    # every crop RandomResizedCrop can take from the drafted image still holds >= size x size pixels
    torch.manual_seed(0)
    crops = [T.RandomResizedCrop.get_params(image, train.transforms[0].scale, train.transforms[0].ratio)
             for _ in range(2000)]
    assert min(min(h, w) for _, _, h, w in crops) >= size
    # other formats are decoded at full size
    assert decode_image(png_of(jpeg), need).size == source
    assert decode_image(jpeg).size == source


@pytest.mark.parametrize("size, source", [(64, (500, 375)), (224, (1024, 768))])
def test_draft_decoded_tensor_is_close_to_the_full_decode(size, source):
    """Evaluation transform (deterministic), draft vs full decode, in normalised units: mean |diff| < 0.02,
    i.e. ~1.4 grey levels of 255 (std ~0.27). Measured on these images: 0.008-0.009 (64 px from 1/4 scale),
    0.006 (224 px from 1/2 scale)."""
    val = open_clip.image_transform(size, is_train=False)
    for seed in range(3):
        jpeg = photo_jpeg(*source, seed=seed)
        full, draft = val(decode_image(jpeg)), val(decode_image(jpeg, data.decode_size_for(val)))
        assert full.shape == draft.shape == (3, size, size)
        assert 0 < (full - draft).abs().mean() < 0.02


# --------------------------------------------------------------------------- uint8 transfer


def test_uint8_transform_plus_device_normalisation_equals_the_fp32_path(tiny_backbone):
    u8_backbone, norm = data.uint8_backbone(tiny_backbone)
    assert norm == (tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))
    assert isinstance(u8_backbone.preprocess_train.transforms[-1], T.PILToTensor)
    assert u8_backbone.model is tiny_backbone.model  # a modified copy; the original is untouched
    assert isinstance(tiny_backbone.preprocess_train.transforms[-1], T.Normalize)
    images = [decode_image(photo_jpeg(seed=s)) for s in range(4)]
    for name in ("preprocess_train", "preprocess_val"):
        torch.manual_seed(1)
        fp32 = torch.stack([getattr(tiny_backbone, name)(im) for im in images])
        torch.manual_seed(1)  # the same random crops
        u8 = torch.stack([getattr(u8_backbone, name)(im) for im in images])
        assert u8.dtype == torch.uint8 and u8.shape == fp32.shape == (4, 3, 64, 64)
        moved = data.to_device({"image": u8, "frames": u8[None], "text": torch.arange(3), "task": "t"},
                               torch.device("cpu"), norm)
        assert moved["image"].dtype == torch.float32 and moved["task"] == "t"
        assert (moved["image"] - fp32).abs().max() < 1e-5  # far below one grey level (1/255/std ~ 0.015)
        assert torch.allclose(moved["frames"][0], moved["image"]) and moved["text"].dtype == torch.int64
    # without image_norm nothing is converted, and floats keep their dtype (no cast: autocast does precision)
    kept = data.to_device({"image": u8, "x": torch.ones(2, dtype=torch.float32)}, torch.device("cpu"))
    assert kept["image"].dtype == torch.uint8 and kept["x"].dtype == torch.float32


def test_uint8_needs_a_transform_ending_in_to_tensor_normalize():
    with pytest.raises(ValueError, match="ToTensor \\+ Normalize"):
        data.uint8_transform(T.Compose([T.Resize(8), T.ToTensor()]))


def test_train_loader_uint8_batches_match_fp32_batches(jpeg_shards, tiny_backbone, tmp_path):
    """Through the real train loader (draft decoding on in both): uint8 + device normalisation == fp32."""
    from training.registry import get_task_class

    one = DistInfo(0, 1, 0, 1, torch.device("cpu"))
    task_class = get_task_class("retrieval")
    task = task_class(task_class.Options(), tiny_backbone)
    batches = {}
    for uint8 in (False, True):
        cfg = config_from_dict(tiny_config(jpeg_shards, tmp_path, data={"num_workers": 0, "uint8_images": uint8},
                                           optim={"micro_batch_size": 4}))
        torch.manual_seed(3)  # workers=0: the crops draw from this process's generator, in the same order
        batch = next(iter(data.train_loader(cfg, task, tiny_backbone, one, tmp_path, 0)))
        batches[uint8] = data.to_device(batch, one.device, data.device_image_norm(cfg, tiny_backbone))
        assert (data.device_image_norm(cfg, tiny_backbone) is None) != uint8
    assert batches[True]["key"] == batches[False]["key"]
    assert batches[True]["image"].dtype == batches[False]["image"].dtype == torch.float32
    assert (batches[True]["image"] - batches[False]["image"]).abs().max() < 1e-5


def test_data_workers_get_transforms_and_tokenizer_not_the_model(jpeg_shards, tiny_backbone, tmp_path):
    """The sample mapping a worker runs holds a SampleContext (picklable, small), never the open_clip model."""
    import pickle

    from training.backbone import SampleContext
    from training.registry import get_task_class

    task_class = get_task_class("retrieval")
    task = task_class(task_class.Options(), tiny_backbone)
    cfg = config_from_dict(tiny_config(jpeg_shards, tmp_path))
    one = DistInfo(0, 1, 0, 1, torch.device("cpu"))
    map_fn = data.train_loader(cfg, task, tiny_backbone, one, tmp_path, 0).dataset.spec.map_fn
    context = map_fn.keywords["backbone"]
    assert isinstance(context, SampleContext) and not any(isinstance(v, torch.nn.Module) for v in vars(context).values())
    assert len(pickle.dumps(context)) < len(pickle.dumps(tiny_backbone.model)) / 4
