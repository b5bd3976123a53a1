"""Getting pretrained weights: one load at a time, quiet and weights-only, and a quick answer
when the weights server is out of reach instead of a library's minutes of retries.

Shared by the timm, open_clip, torchvision and hf sources.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

from backbench.errors import WeightsError

PROBE_TIMEOUT_S = 3.0  # how long one request may take to tell a reachable weights server from none


def answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the server of ``url`` answers one HEAD request within ``timeout`` (any HTTP status
    counts). It runs in a daemon thread, so a DNS lookup that hangs is bounded too."""
    import urllib.error
    import urllib.request

    answered: list[bool] = []

    def head() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # an HTTP error status is an answer
        except Exception:
            return
        answered.append(True)

    thread = threading.Thread(target=head, name="backbench-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


_LOADING = threading.RLock()  # the settings below are process-wide: one load at a time sets them


@contextmanager
def loading() -> Iterator[None]:
    """While a library loads a model: third-party logging is off (no "Retrying in 8s" lines, no
    root logger configured behind our back) and every ``torch.load`` is weights-only, also where
    a library asks for a full unpickle (torch.hub, under torchvision)."""
    with _LOADING, _quiet_and_weights_only():
        yield


@contextmanager
def _quiet_and_weights_only() -> Iterator[None]:
    root, guard = logging.getLogger(), logging.NullHandler()
    added = not root.handlers  # a handler stops logging.error() from calling basicConfig()
    if added:
        root.addHandler(guard)
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    disabled = logging.root.manager.disable
    logging.disable(max(disabled, logging.ERROR))
    try:
        yield
    finally:
        logging.disable(disabled)
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
        if added:
            root.removeHandler(guard)


@contextmanager
def hub_or_offline() -> Iterator[str]:
    """Load through the Hugging Face hub if it answers one quick request; else in huggingface_hub's
    own offline mode, where files in the local cache load and others fail at once (no retries).
    Yields why the hub was not asked ("" when it was)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        yield "; HF_HUB_OFFLINE is set, so only the local Hugging Face cache was read"
        return
    if answers(constants.ENDPOINT):
        yield ""
        return
    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield f"; {constants.ENDPOINT} did not answer, so only the local Hugging Face cache was read"
    finally:
        constants.HF_HUB_OFFLINE = before


@contextmanager
def fetching(what: str, instead: str, hub: bool = True) -> Iterator[None]:
    """A failed download of pretrained weights becomes one line: what could not be had, why, and
    what to use offline instead. ``hub``: the weights come through the Hugging Face hub."""
    with loading(), (hub_or_offline() if hub else nullcontext("")) as why:
        try:
            yield
        except Exception as exc:
            raise WeightsError(f"cannot get {what} ({type(exc).__name__}{why}); offline? use {instead}") from exc


def cached_repos() -> list[Any]:
    """The repos of the local Hugging Face hub cache (huggingface_hub's ``CachedRepoInfo``: where
    timm, open_clip, transformers and diffusers keep downloaded weights); [] when it cannot be read."""
    try:
        from huggingface_hub import scan_cache_dir

        return list(scan_cache_dir().repos)
    except Exception:
        return []


def hub_cached() -> set[str]:
    """The ids of the repos in the local Hugging Face hub cache."""
    return {repo.repo_id for repo in cached_repos()}
