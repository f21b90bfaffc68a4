import os
import random

import numpy as np
import pytest
import timm
import torch
from hypothesis import HealthCheck, settings

# Property tests run the same examples every time (a CI failure can be replayed) and are not timed:
# on 2 busy cores generating an example can exceed hypothesis's default time checks.
settings.register_profile("project", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("project")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Each of pytest-xdist's worker processes takes its share of torch's threads, and so do the processes its
    # tests start (train.py runs): torch's default in every process, a thread per core, would oversubscribe the
    # machine, its threads spinning while they wait for cores another process holds.
    threads = max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(autouse=True)
def seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def tiny_vit(**kwargs):
    """A DINOv2-architecture ViT small enough to build and run in milliseconds.

    LayerScale starts at 0.5 rather than timm's 1e-5 so that, as in a pretrained DINOv2, the blocks
    (and so the adapters) visibly change the output.
    """
    args = dict(img_size=28, embed_dim=32, depth=2, num_heads=2, num_classes=0, init_values=0.5)
    args.update(kwargs)
    return timm.create_model("vit_small_patch14_dinov2", **args)


@pytest.fixture
def vit():
    return tiny_vit().eval()


@pytest.fixture(params=["float mask", "bool mask"])
def mask_kind(request, monkeypatch):
    """Runs a test with the CPU's dropout mask (x's dtype) and with the bool mask CUDA draws, from the same draw."""
    if request.param == "bool mask":
        from lora import LoRADropout
        draw = LoRADropout.keep_mask
        monkeypatch.setattr(LoRADropout, "keep_mask", lambda self, x: None if (m := draw(self, x)) is None else m.bool())
    return request.param


def offline_hub(monkeypatch) -> None:
    """timm as on a machine with no network and nothing cached: asking for pretrained weights fails with what timm
    raises there, and nothing is downloaded."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    build = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        return build(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)


def serving_hub(monkeypatch, weights: dict) -> None:
    """timm as if its hub served ``weights`` for the model asked for with ``pretrained=True``, loaded strictly as
    timm loads them. The dict is read at each call: a test changes what the hub serves by changing it."""
    build = timm.create_model

    def serving(name, pretrained=False, **kwargs):
        model = build(name, **kwargs)
        if pretrained:
            model.load_state_dict(weights)
        return model

    monkeypatch.setattr(timm, "create_model", serving)
