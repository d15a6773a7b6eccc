"""`python -m vlm_jax.prompt` end to end on tiny checkpoints saved by transformers: the files it
writes, their sizes, that they agree with the library calls and with each other (prompted image =
image x mask for gray 0), presets and flag overrides, relative paths from a fresh cwd, and the
errors for a missing tokenizer, image or wrong query count."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.prompting import checkpoints as ck  # noqa: E402
from vlm_jax import prompt  # noqa: E402
from vlm_jax.data.images import clip_preprocess  # noqa: E402
from vlm_jax.prompting import api, maps  # noqa: E402
from vlm_jax.prompting.clip_model import load_hf_clip  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = {"wide.png": (60, 36), "tall.png": (30, 50)}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  """A user's directory: clip/, llava/ (HF save_pretrained + tokenizer.json) and two images."""
  root = tmp_path_factory.mktemp("work")
  ck.save_clip(str(root / "clip"), torch, transformers)
  ck.save_llava(str(root / "llava"), torch, transformers)
  rgb = {name: ck.noise_image(str(root / name), w, h, seed=i)
         for i, (name, (w, h)) in enumerate(SIZES.items())}
  return root, rgb


def _read(out, name):
  return np.asarray(Image.open(os.path.join(out, name)))


def test_clip_cli_relative_paths_files_and_values(work, monkeypatch, capsys):
  root, rgb = work
  monkeypatch.chdir(root)
  prompt.main(["--model", "clip", "--checkpoint", "clip", "--image", "wide.png", "tall.png",
               "--query", "what is on the mat?", "--out", "out_clip", "--preset", "mmvet",
               "--layer", "1"])
  assert "prompted 2 image(s)" in capsys.readouterr().out
  out = root / "out_clip"
  summary = json.load(open(out / "prompt.json"))
  assert summary["settings"] == {"enhance_coe": 1.0, "kernel_size": 3, "interpolation": "bicubic",
                                 "gray": 0.0, "layers": [1], "floor": 0.0,
                                 "geometry": "reference"}
  model, params = load_hf_clip(str(root / "clip"))
  crops = np.stack([clip_preprocess(rgb[n], 48, normalize=False) for n in SIZES])
  ids = prompt.clip_ids(ck.clip_tokenizer(), model, ["what is on the mat?"] * 2, "clip")
  assert ids[0, :8].tolist() == [48, 2, 3, 4, 5, 6, 10, 49] and ids.shape == (2, 12)
  want = np.asarray(api.clip_attribution(model, params, crops, ids, layers=1, enhance_coe=1.0,
                                         kernel_size=3)["map"])
  for j, (name, (w, h)) in enumerate(SIZES.items()):
    stem = name[:-4]
    psi = np.load(out / f"{stem}_map.npy")
    assert psi.shape == (6, 6) and psi.dtype == np.float32
    np.testing.assert_allclose(psi, want[j], atol=1e-6)
    assert psi.min() == 0.0 and abs(psi.max() - 1.0) < 1e-6
    prompted, heat = _read(out, f"{stem}_api.png"), _read(out, f"{stem}_heatmap.png")
    assert prompted.shape == heat.shape == (h, w, 3)
    mask = maps.mask_for_image(psi, w, h, method="bicubic")
    np.testing.assert_array_equal(
      prompted, (rgb[name].astype(np.float32) * (mask / np.float32(255))[..., None]).astype(
        np.uint8))
    assert summary["images"][j]["size"] == [w, h] and "answer" not in summary["images"][j]


def test_llava_cli_preset_overrides_and_aligned_geometry(work, monkeypatch):
  root, rgb = work
  monkeypatch.chdir(root)
  prompt.main(["--model", "llava", "--checkpoint", "llava", "--image", "wide.png", "tall.png",
               "--query", "what is on the mat?", "what color is the cat?", "--out", "out_llava",
               "--preset", "llava_wild", "--gray", "0", "--layer", "-2", "--max-new-tokens", "4",
               "--geometry", "aligned", "--floor", "0.2"])
  out = root / "out_llava"
  summary = json.load(open(out / "prompt.json"))
  assert summary["settings"]["kernel_size"] == 7 and summary["settings"]["gray"] == 0.0
  assert summary["settings"]["enhance_coe"] == 10.0 and summary["settings"]["layers"] == [-2]
  for j, (name, (w, h)) in enumerate(SIZES.items()):
    stem = name[:-4]
    psi = np.load(out / f"{stem}_map.npy")
    assert psi.shape == (4, 4) and 0.0 <= psi.min() and psi.max() <= 1.0
    prompted = _read(out, f"{stem}_api.png")
    assert prompted.shape == (h, w, 3)
    mask = maps.mask_for_image(psi, w, h, method="lanczos", geometry="aligned",
                               box=maps.pad_box(w, h))
    m = np.maximum(mask / np.float32(255), np.float32(0.2))
    np.testing.assert_array_equal(prompted, (rgb[name] * m[..., None]).astype(np.uint8))
    rec = summary["images"][j]
    assert isinstance(rec["answer"], str) and rec["query"] in ("what is on the mat?",
                                                               "what color is the cat?")


def test_llava_prompt_layout():
  class _M:
    image_token_id, num_image_tokens = 99, 3
  tok = ck.llava_tokenizer()
  ids, mask = prompt.llava_ids(tok, _M, ["what is on the mat?", "cat?"], "llava")
  assert ids.shape == mask.shape and (mask[:, -1] == 1).all()
  row = ids[1][mask[1] == 1].tolist()
  assert row[0] == 1 and row.count(99) == 3  # <s> first, one image run
  after = row[row.index(99) + 3:]
  assert after == tok.encode("\ncat? ASSISTANT:", add_special_tokens=False).ids
  assert mask[1].sum() < mask[0].sum() and ids[1, 0] == 0  # the shorter prompt is left-padded


def test_cli_errors_name_what_is_missing(work, tmp_path):
  root, _ = work
  base = ["--model", "clip", "--out", str(tmp_path / "o"), "--query", "cat"]
  no_tok = tmp_path / "clip_no_tok"
  no_tok.mkdir()
  for f in os.listdir(root / "clip"):
    if f != "tokenizer.json":
      os.symlink(root / "clip" / f, no_tok / f)
  with pytest.raises(SystemExit, match="no tokenizer.json"):
    prompt.main(base + ["--checkpoint", str(no_tok), "--image", str(root / "wide.png")])
  with pytest.raises(SystemExit, match=r"--image .*nope.png"):
    prompt.main(base + ["--checkpoint", str(root / "clip"), "--image", str(root / "nope.png")])
  with pytest.raises(SystemExit, match="no such directory"):
    prompt.main(base + ["--checkpoint", str(tmp_path / "absent"), "--image",
                        str(root / "wide.png")])
  with pytest.raises(SystemExit, match="one query or one per --image"):
    prompt.main(["--model", "clip", "--checkpoint", str(root / "clip"), "--out", str(tmp_path),
                 "--image", str(root / "wide.png"), "--query", "a", "b", "c"])
  with pytest.raises(SystemExit, match="model_type 'llava'|CLIPModel"):
    prompt.main(base + ["--checkpoint", str(root / "llava"), "--image", str(root / "wide.png")])


def test_module_runs_as_a_program(work, tmp_path):
  root, _ = work
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, "-m", "vlm_jax.prompt", "--model", "clip", "--checkpoint",
                         str(root / "clip"), "--image", "wide.png", "--query", "a cat",
                         "--out", "o"], cwd=root, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1].startswith("prompted 1 image(s)")
  assert sorted(os.listdir(root / "o")) == ["prompt.json", "wide_api.png", "wide_heatmap.png",
                                            "wide_map.npy"]
