"""Pre-filled caches: pretrained tags and the LLaVA hub id load offline from the Hugging Face cache.

Random-init checkpoints are written into a temporary ``HF_HOME`` in the hub's cache layout
(``hub/models--ORG--NAME/{refs/main, snapshots/<commit>/<file>, blobs/<sha256>}``) under the
repo ids open_clip uses for the ``openai`` and ``laion400m_e31`` tags and under the default
LLaVA-OneVision id. Every load runs in a fresh subprocess (huggingface_hub reads ``HF_HOME``
and ``HF_HUB_OFFLINE`` when it is first imported), once with ``HF_HUB_OFFLINE=1`` and once
without it but with every socket connection refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from winclip_nb.hub.weights import hub_weight_files

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
#: Seed of the written checkpoints: not the package's default seed, so a random-init model
#: built by mistake never equals them.
CHECKPOINT_SEED = 1234
#: (model, tag, file name in the hub repo): one safetensors and one pickle checkpoint.
CLIP_CHECKPOINTS = (
    ("ViT-B-16", "openai", "open_clip_model.safetensors"),
    ("ViT-B-16-plus-240", "laion400m_e31", "open_clip_pytorch_model.bin"),
)
#: Environment variables that would point huggingface_hub or transformers elsewhere.
CACHE_VARS = (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_ENDPOINT",
)

#: Prepended to subprocess code: any socket connection fails and is recorded.
NO_NETWORK = """
import socket
ATTEMPTS = []
def _refuse(self, address, *args, **kwargs):
    ATTEMPTS.append(repr(address))
    raise OSError("network disabled in this test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
"""


def _hub_repo(hub: Path, repo_id: str) -> Path:
    return hub / ("models--" + repo_id.replace("/", "--"))


def _add_hub_file(hub: Path, repo_id: str, filename: str, data: bytes) -> Path:
    """Store ``data`` as the hub does: a blob named by its sha256, linked from the snapshot."""
    repo = _hub_repo(hub, repo_id)
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / COMMIT / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:  # no symlinks (Windows without developer mode): the hub copies too
        link.write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return link


def _clip_bytes(model_name: str, filename: str, scratch: Path) -> bytes:
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CHECKPOINT_SEED)
        model = open_clip.create_model(model_name, pretrained=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = scratch / filename
    if filename.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """A ``HF_HOME`` holding both CLIP checkpoints and the tiny LLaVA under the real ids."""
    import open_clip

    from winclip_nb.explain.llava import DEFAULT_LLAVA_MODEL
    from winclip_nb.explain.tiny_llava import build_tiny_llava

    home = tmp_path_factory.mktemp("hf_home")
    scratch = tmp_path_factory.mktemp("scratch")
    hub = home / "hub"
    for model_name, tag, filename in CLIP_CHECKPOINTS:
        repo_id, names = hub_weight_files(open_clip.get_pretrained_cfg(model_name, tag)["hf_hub"])
        assert filename in names, (model_name, tag, names)
        _add_hub_file(hub, repo_id, filename, _clip_bytes(model_name, filename, scratch))
    tiny = build_tiny_llava(scratch / "tiny_llava", seed=CHECKPOINT_SEED)
    for file in sorted(tiny.rglob("*")):
        if file.is_file():
            _add_hub_file(
                hub, DEFAULT_LLAVA_MODEL, file.relative_to(tiny).as_posix(), file.read_bytes()
            )
    (home / "tiny_llava_folder").write_text(str(tiny))
    return home


def _run(code: str, hf_home: Path, *, offline: bool, timeout: float = 600,
         cwd: Path = REPO_ROOT) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, returned as a dict.

    ``offline``: HF_HUB_OFFLINE=1; else no offline flag but every connection refused.
    """
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    env["HF_HOME"] = str(hf_home)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
        prelude = "ATTEMPTS = []\n"
    else:
        prelude = NO_NETWORK
    body = prelude + textwrap.dedent(code) + "\nRESULT['attempts'] = ATTEMPTS\n"
    body += "import json; print('RESULT ' + json.dumps(RESULT))\n"
    proc = subprocess.run(
        [sys.executable, "-c", body],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    result["stdout"], result["stderr"] = proc.stdout, proc.stderr
    return result


#: Compares a model's state dict with the checkpoint file it should have been loaded from.
SAME_AS_FILE = """
import torch

def same_as_file(model, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        saved = load_file(str(path))
    else:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    state = model.state_dict()
    return sorted(saved) == sorted(state) and all(
        torch.equal(state[k].float(), saved[k].float()) for k in saved
    )

def activation(model):
    return type(model.visual.transformer.resblocks[0].mlp.gelu).__name__
"""

CLIP_CODE = (
    SAME_AS_FILE
    + """
import numpy as np
from winclip_nb.hub.weights import cached_tag_file, load_open_clip, resolve_weights
from winclip_nb import WinCLIP

RESULT = {}
model, _, weights = load_open_clip("ViT-B-16", "openai", "cpu")
RESULT["openai"] = {
    "source": weights.source, "random": weights.random, "label": weights.label,
    "same": same_as_file(model, weights.source), "activation": activation(model),
}
plus, _, plus_weights = load_open_clip("ViT-B-16-plus-240", "laion400m_e31", "cpu", 240)
RESULT["plus"] = {
    "source": plus_weights.source, "random": plus_weights.random,
    "same": same_as_file(plus, plus_weights.source), "activation": activation(plus),
    "cached": cached_tag_file("ViT-B-16-plus-240", "laion400m_e31"),
}
del plus
# weights="auto" with the windows method's own tag: the cached file under that tag.
plus_auto = resolve_weights("ViT-B-16-plus-240", "auto", "laion400m_e31")
RESULT["plus_auto"] = {
    "source": plus_auto.source, "random": plus_auto.random, "label": plus_auto.label,
}
# ... and never another tag: asked for one the model lacks, it is random init even though
# the model's laion400m_e31 file is in the cache.
RESULT["plus_no_such_tag"] = resolve_weights("ViT-B-16-plus-240", "auto", "openai").random
winclip = WinCLIP(device="cpu", pretrained="auto")
auto_source = resolve_weights("ViT-B-16", "auto", "openai").source
image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
# Any unit anchors do for the flag (the text encoder's prompts are tested elsewhere).
normal, anomalous = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1)
result = winclip.detect(image, normal, anomalous)
RESULT["auto"] = {
    "label": winclip.weights_label, "random": winclip.random_weights,
    "result_random": result.random_weights, "source": auto_source,
    "same": same_as_file(winclip.backbone.model, auto_source),
    "activation": activation(winclip.backbone.model),
}
"""
)


def _snapshot(hf_home: Path, repo_id: str, filename: str) -> Path:
    return _hub_repo(hf_home / "hub", repo_id) / "snapshots" / COMMIT / filename


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no-network"])
def test_clip_tags_load_from_the_hub_cache(hf_home, offline):
    import open_clip

    result = _run(CLIP_CODE, hf_home, offline=offline)
    expected = {}
    for model_name, tag, filename in CLIP_CHECKPOINTS:
        repo_id, _ = hub_weight_files(open_clip.get_pretrained_cfg(model_name, tag)["hf_hub"])
        expected[model_name] = _snapshot(hf_home, repo_id, filename)
    openai, plus, auto = result["openai"], result["plus"], result["auto"]
    assert Path(openai["source"]) == expected["ViT-B-16"]
    assert Path(plus["source"]) == Path(plus["cached"]) == expected["ViT-B-16-plus-240"]
    # weights="auto" uses the method's own tag (windows: laion400m_e31), found in the cache.
    plus_auto = result["plus_auto"]
    assert Path(plus_auto["source"]) == expected["ViT-B-16-plus-240"]
    assert plus_auto["label"] == "laion400m_e31" and plus_auto["random"] is False
    assert result["plus_no_such_tag"] is True
    assert openai["same"] and plus["same"] and auto["same"]
    assert not openai["random"] and not plus["random"]
    # The openai checkpoint was trained with QuickGELU (open_clip's tag config says so).
    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai")["quick_gelu"]
    assert openai["activation"] == auto["activation"] == "QuickGELU"
    assert plus["activation"] == "GELU"
    # weights="auto" finds the cached default tag and results are not marked random.
    assert auto["label"] == "openai" and Path(auto["source"]) == expected["ViT-B-16"]
    assert auto["random"] is False and auto["result_random"] is False
    assert "RANDOM WEIGHTS" not in result["stdout"] + result["stderr"]
    assert result["attempts"] == []  # nothing tried the network (so no hub retry loop)


LLAVA_CODE = """
from winclip_nb.explain.llava import DEFAULT_LLAVA_MODEL, LlavaExplainer, resolve_llava_source
from transformers import LlavaOnevisionForConditionalGeneration
import torch

RESULT = {}
explainer = LlavaExplainer.from_pretrained(DEFAULT_LLAVA_MODEL, device="cpu")
folder = open(FOLDER_FILE).read()
direct = LlavaOnevisionForConditionalGeneration.from_pretrained(folder)
loaded, saved = explainer.model.state_dict(), direct.state_dict()
RESULT["source"] = resolve_llava_source(DEFAULT_LLAVA_MODEL)
RESULT["n_params"] = sum(p.numel() for p in explainer.model.parameters())
RESULT["same"] = sorted(loaded) == sorted(saved) and all(
    torch.equal(loaded[k], saved[k]) for k in saved
)
"""


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no-network"])
def test_llava_hub_id_loads_from_the_hub_cache(hf_home, offline):
    from winclip_nb.explain.llava import DEFAULT_LLAVA_MODEL

    code = f"FOLDER_FILE = {str(hf_home / 'tiny_llava_folder')!r}\n" + LLAVA_CODE
    result = _run(code, hf_home, offline=offline)
    assert Path(result["source"]) == _hub_repo(hf_home / "hub", DEFAULT_LLAVA_MODEL) / (
        "snapshots/" + COMMIT
    )
    assert result["same"]
    assert result["n_params"] < 10_000_000  # the tiny model, not a downloaded 0.5B one
    assert result["attempts"] == []


def test_auto_weights_with_a_tag_the_model_lacks_fall_back_to_random(caplog):
    """``auto`` asks for the method's own tag, never another of the model's tags: a tag
    the model does not have gives random init with a warning naming both."""
    import open_clip

    from winclip_nb.hub.weights import resolve_weights

    assert "openai" not in open_clip.list_pretrained_tags_by_model("ViT-B-16-plus-240")
    with caplog.at_level("WARNING", logger="winclip_nb.hub.weights"):
        resolved = resolve_weights("ViT-B-16-plus-240", "auto", "openai")
    assert resolved.random and resolved.source is None and resolved.label.startswith("random")
    (record,) = [r for r in caplog.records if r.name == "winclip_nb.hub.weights"]
    assert record.levelname == "WARNING"
    message = record.getMessage()
    assert "ViT-B-16-plus-240" in message and "'openai'" in message and "random" in message
    assert "laion400m_e31" in message  # the tags it does have are listed


PREFETCH_CODE = """
import sys
from winclip_nb.cli import main
RESULT = {"codes": [main(ARGV) for ARGV in ARGVS]}
"""


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no-network"])
def test_prefetch_reports_the_cached_files(hf_home, offline):
    import open_clip

    from winclip_nb.explain.llava import DEFAULT_LLAVA_MODEL

    argvs = [
        ["prefetch"],
        ["prefetch", "--model", "ViT-B-16-plus-240", "--weights", "laion400m_e31", "--no-llava"],
        ["prefetch", "--method", "windows", "--no-llava"],  # that method's model and tag
    ]
    if not offline:
        argvs.append(["prefetch", "--offline", "--weights", "auto", "--no-llava"])
    result = _run(f"ARGVS = {argvs!r}\n" + PREFETCH_CODE, hf_home, offline=offline)
    assert result["codes"] == [0] * len(argvs), result["stderr"][-3000:]
    out = result["stdout"]
    for model_name, tag, filename in CLIP_CHECKPOINTS:
        repo_id, _ = hub_weight_files(open_clip.get_pretrained_cfg(model_name, tag)["hf_hub"])
        path = _snapshot(hf_home, repo_id, filename)
        # the windows model twice: named explicitly and as --method windows
        expected_count = 2 if model_name == "ViT-B-16-plus-240" else 1
        assert out.count(f"CLIP {model_name}/{tag}: already cached at {path}") == expected_count
    llava = _hub_repo(hf_home / "hub", DEFAULT_LLAVA_MODEL) / "snapshots" / COMMIT
    assert f"LLaVA {DEFAULT_LLAVA_MODEL}: already cached at {llava}" in out
    assert f"Hugging Face cache: {hf_home / 'hub'}" in out
    assert result["attempts"] == []


def test_cached_tag_file_finds_a_named_hub_file(tmp_path):
    """Tags whose ``hf_hub`` names a file (``org/name/file.bin``) are found in the cache too."""
    import open_clip

    tags = [
        (m, t)
        for m, t in open_clip.list_pretrained()
        if not open_clip.get_pretrained_cfg(m, t).get("hf_hub", "/").endswith("/")
    ]
    if not tags:
        pytest.skip("this open_clip version names no checkpoint file in its hub entries")
    model_name, tag = tags[0]
    hf_hub = open_clip.get_pretrained_cfg(model_name, tag)["hf_hub"]
    repo_id, filename = hf_hub.rsplit("/", 1)
    assert hub_weight_files(hf_hub) == (repo_id, (filename[:-4] + ".safetensors", filename))
    link = _add_hub_file(tmp_path / "hub", repo_id, filename, b"not a real checkpoint")
    code = f"""
from winclip_nb.hub.weights import cached_tag_file
RESULT = {{"found": cached_tag_file({model_name!r}, {tag!r})}}
"""
    result = _run(code, tmp_path, offline=True, timeout=120)
    assert result["found"] == str(link)


def test_hub_weight_files_follows_open_clip_order():
    """The file open_clip asks the hub for first is looked up first."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    assert hub_weight_files("org/name/") == ("org/name", (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME))
    assert hub_weight_files("org/name/ckpt.pth") == ("org/name", ("ckpt.safetensors", "ckpt.pth"))
    assert hub_weight_files("org/name/model.safetensors") == ("org/name", ("model.safetensors",))
    assert hub_weight_files("") == ("", ())
