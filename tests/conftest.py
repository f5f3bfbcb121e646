"""Shared fixtures: tiny random backbones built in code (no downloads)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama():
    from backbone_server.models import load_backbone

    return load_backbone("tiny-llama", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_roberta():
    from backbone_server.models import load_backbone

    return load_backbone("tiny-roberta", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from backbone_server.models import load_backbone

    return load_backbone("tiny-gpt2", device="cpu", dtype="float32")


@pytest.fixture(params=["tiny-llama", "tiny-roberta"])
def tiny_backbone(request):
    return request.getfixturevalue(request.param.replace("-", "_"))
