"""Issue 18, item 15: hub weights out of reach fail in seconds, in one line, and create nothing.

The hub is made unreachable for real, whatever network this machine has: HF_ENDPOINT points to
a local port that refuses connections, or to a socket that accepts and never answers (a network
that swallows packets), or the hub's own HF_HUB_OFFLINE is set. Each run is a real ``backbench
extract`` process with empty Hugging Face and torch hub caches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backbench.errors import WeightsError
from backbench.extract.backbones import load_backbone, state_dict_sha256
from backbench.extract.backbones.hub import answers

CLI_BOUND_S = 40.0  # the whole process, imports included, on a busy machine (it took 57 s and more)
LOAD_BOUND_S = 6.0  # the load itself, imports done: one probe of at most 3 s, then no retries


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def _extract(tmp_path: Path, name: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE")}
    full.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), **env)
    cmd = [sys.executable, "-m", "backbench", "extract", name, "--data", "digits", "--dataset", "digits",
           "--split", "train", "--limit", "8", "--device", "cpu", "--cache", str(tmp_path / "c.zarr")]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=full, timeout=300)
    return proc, time.monotonic() - start


def _assert_refused(proc: subprocess.CompletedProcess, seconds: float, tmp_path: Path, offline_hint: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: cannot get "), proc.stderr
    assert f"offline? use {offline_hint}" in lines[0]
    assert "Retrying" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert seconds < CLI_BOUND_S, f"took {seconds:.1f}s"
    assert not (tmp_path / "c.zarr").exists()  # no empty cache left behind


@pytest.mark.parametrize("name,hint", [
    ("timm:resnet18", "timm:resnet18@random"),
    ("open_clip:ViT-B-32/openai", "open_clip:ViT-B-32@random"),
])
def test_hub_refusing_connections(tmp_path, name, hint):
    proc, seconds = _extract(tmp_path, name, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    _assert_refused(proc, seconds, tmp_path, hint)
    assert "did not answer, so only the local Hugging Face cache was read" in proc.stderr


def test_hub_that_never_answers(tmp_path, silent_server):
    proc, seconds = _extract(tmp_path, "timm:resnet18", HF_ENDPOINT=silent_server)
    _assert_refused(proc, seconds, tmp_path, "timm:resnet18@random")
    assert f"{silent_server} did not answer" in proc.stderr


def test_hub_offline_mode_asks_nothing(tmp_path, silent_server):
    # HF_HUB_OFFLINE is respected: no probe, no wait (the endpoint would hang if asked)
    proc, seconds = _extract(tmp_path, "open_clip:ViT-B-32/openai", HF_HUB_OFFLINE="1", HF_ENDPOINT=silent_server)
    _assert_refused(proc, seconds, tmp_path, "open_clip:ViT-B-32@random")
    assert "HF_HUB_OFFLINE is set" in proc.stderr


def test_torchvision_weights_out_of_reach(tmp_path):
    if answers("https://download.pytorch.org/models/resnet18-f37072fd.pth"):
        pytest.skip("download.pytorch.org answers here: the weights would really download")
    proc, seconds = _extract(tmp_path, "torchvision:resnet18")
    _assert_refused(proc, seconds, tmp_path, "torchvision:resnet18@random")
    assert "download.pytorch.org did not answer" in proc.stderr and "Downloading" not in proc.stderr


def test_no_cache_made_when_the_data_source_fails(tmp_path):
    # the same promise through the Python API: nothing is created before the inputs load
    from backbench.extract.run import extract

    with pytest.raises(Exception):
        extract("timm:test_resnet@random", f"imagefolder:{tmp_path / 'missing'}", cache=str(tmp_path / "c.zarr"),
                dataset="d", split="train")
    assert not (tmp_path / "c.zarr").exists()


# ------------------------------------------------------------- in-process, with the load timed


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch, silent_server):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", silent_server)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return Path(constants.HF_HUB_CACHE)


def test_load_fails_within_seconds_and_restores_online_mode(unreachable_hub):
    from huggingface_hub import constants

    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"^cannot get pretrained weights for timm:test_resnet\.r160_in1k \("):
        load_backbone("timm:test_resnet.r160_in1k")
    assert time.monotonic() - start < LOAD_BOUND_S
    assert constants.HF_HUB_OFFLINE is False  # the offline switch is only for that load
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None


def test_weights_in_the_local_cache_load_when_the_hub_is_out_of_reach(unreachable_hub):
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(5)
    ref = timm.create_model("test_resnet", pretrained=False)
    repo, commit = unreachable_hub / "models--timm--test_resnet.r160_in1k", "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(repo / "snapshots" / commit / "model.safetensors"))
    start = time.monotonic()
    bb = load_backbone("timm:test_resnet.r160_in1k")
    assert time.monotonic() - start < LOAD_BOUND_S
    assert bb.weights_sha256 == state_dict_sha256(ref.state_dict())  # the cached file, not a random init
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        torch.testing.assert_close(bb.forward(x)[0], ref.eval().forward_head(ref.forward_features(x), pre_logits=True))


def test_probe_tells_answering_from_silent(silent_server):
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert answers(f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
    start = time.monotonic()
    assert not answers(silent_server, timeout=1.0)
    assert time.monotonic() - start < 2.0
    assert not answers(f"http://127.0.0.1:{_closed_port()}/")
