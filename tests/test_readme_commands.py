"""The README's commands in the form a user types them: from a fresh current directory (not the repo),
with relative paths (`--workdir=runs/x`, `--out conv/lm`, `--paths 'train=mmc4/*.jsonl'`), at toy
size. A relative path that reaches orbax (which takes only absolute ones) or a worker process fails
here; every test elsewhere uses absolute temporary paths.

`test_every_readme_command_is_covered` keeps this list honest: each kind of command the README and
launch/README.md show (module, subcommand, mode) must be run by a test here or be named in COVERED
with the test that runs it.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.data.web_fixtures import noise_png
from tests.train.configs_loader import ROOT

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture
def cwd(tmp_path):
  """A directory like a user's checkout seen from outside the package: configs/ and launch/ there,
  nothing else, and no absolute path in any command."""
  for name in ("configs", "launch"):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  return tmp_path


def _python(cwd, *args, timeout=600) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, f"{args}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  return proc


def _committed_checkpoints(pattern: str) -> list[str]:
  return [p for p in glob.glob(pattern) if os.path.basename(p).isdigit()]


@pytest.mark.slow
def test_train_killed_at_first_checkpoint_resumes_then_eval_and_generate(cwd):
  train = [sys.executable, "-m", "vlm_jax.main", "--config=configs/flamingo.py:tiny",
           "--workdir=runs/x"]
  log = open(cwd / "first.log", "w")
  proc = subprocess.Popen(train, cwd=cwd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while not _committed_checkpoints(str(cwd / "runs/x/lm_pretrain/checkpoints/*")):
    assert proc.poll() is None, (cwd / "first.log").read_text()[-3000:]
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  log.close()
  assert not (cwd / "runs/x/results.json").exists()
  first = (cwd / "first.log").read_text()
  assert f"workdir: {cwd}/runs/x" in first  # resolved and logged once, at the entry point

  second = subprocess.run(train, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-4000:]
  assert f"[lm_pretrain] resuming from checkpoint step 4 in {cwd}/runs/x/lm_pretrain" in \
      second.stderr, second.stderr[-3000:]
  assert "[lm_pretrain] step 1/4" not in second.stderr  # not retrained
  results = json.loads((cwd / "runs/x/results.json").read_text())
  assert results["step"] == 6 and "eval/accuracy" in results
  assert sorted(os.listdir(cwd / "runs/x/checkpoints")) == ["2", "4", "6"]

  # README: python -m vlm_jax.main --mode=eval --config=configs/eval_flamingo.py --workdir=runs/...
  _python(cwd, "-m", "vlm_jax.main", "--mode=eval", "--config=configs/eval_flamingo.py:tiny",
          "--workdir=runs/x")
  results = json.loads((cwd / "runs/x/results.json").read_text())
  assert results["step"] == 6 and results["fewshot"]["source"] == f"{cwd}/runs/x/checkpoints/6"

  # README: python -m vlm_jax.generate --config=... --checkpoint=conv/of3b --image a.jpg --prompt ...
  Image.fromarray(np.full((40, 40, 3), (220, 35, 35), np.uint8)).save(cwd / "a.png")
  out = _python(cwd, "-m", "vlm_jax.generate", "--config=configs/flamingo.py:tiny",
                "--checkpoint=runs/x", "--image", "a.png", "--max_new_tokens=2", "--dtype=bfloat16",
                "--prompt", "<image>Question: What colour is the shape? Answer:")
  assert out.stdout.strip()


@pytest.mark.slow
def test_compile_only_with_a_relative_workdir(cwd):
  out = _python(cwd, "-m", "vlm_jax.main", "--mode=compile_only", "--config=configs/flamingo.py:tiny",
                "--compile_devices=8", "--config.mesh.data=1", "--config.mesh.fsdp=8",
                "--device_memory_gb=16", "--workdir=runs/plan")
  assert "-> fits" in out.stdout
  report = json.loads((cwd / "runs/plan/compile_only.json").read_text())
  assert report["num_devices"] == 8 and report["fits"] is True


@pytest.mark.slow
def test_convert_and_back_with_relative_paths(cwd):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  hf.save_pretrained(cwd / "hf_lm")
  # README: python -m vlm_jax.convert lm path/to/hf_lm --out conv/lm; ... to-hf conv/lm --out hf_again
  _python(cwd, "-m", "vlm_jax.convert", "lm", "hf_lm", "--out", "conv/lm")
  model_json = json.loads((cwd / "conv/lm/model.json").read_text())
  assert model_json["source"]["path"] == f"{cwd}/hf_lm"  # recorded absolute
  _python(cwd, "-m", "vlm_jax.convert", "to-hf", "conv/lm", "--out", "hf_again")
  again = transformers.AutoModelForCausalLM.from_pretrained(cwd / "hf_again").eval()
  ids = torch.tensor([[5, 17, 33, 2, 40, 41, 8, 50]])
  with torch.no_grad():
    np.testing.assert_allclose(again(input_ids=ids).logits.numpy(), hf(input_ids=ids).logits.numpy(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_tfds_build_with_relative_paths(cwd):
  (cwd / "mmc4/images").mkdir(parents=True)
  docs = []
  for i in range(3):
    (cwd / f"mmc4/images/{i}.png").write_bytes(noise_png(i))
    docs.append({"text_list": [f"A picture {i}.", "More words here."],
                 "image_info": [{"image_name": f"{i}.png", "matched_text_index": 0,
                                 "matched_sim": 0.9}],
                 "similarity_matrix": [[0.9, 0.1]]})
  (cwd / "mmc4/docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  # README: python -m vlm_jax.data.tfds.build --source mmc4 --paths 'train=mmc4/*.jsonl' --out DIR
  out = _python(cwd, "-m", "vlm_jax.data.tfds.build", "--source", "mmc4",
                "--paths", "train=mmc4/*.jsonl", "--set", "image_dir=mmc4/images",
                "--set", "single_image_keep_prob=1.0", "--out", "tfds")
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["dataset_dir"] == f"{cwd}/tfds/mmc4/1.0.0"
  assert summary["splits"]["train"]["written"] == 3


# Commands the README shows that a test elsewhere runs (with its own fixtures), by key.
COVERED = {
  "launch/tpu_vm.py": "tests/test_launch.py::test_readme_dry_run_examples_are_current",
  "launch/slurm.py": "tests/test_launch.py::test_readme_dry_run_examples_are_current",
  "launch/make_colab.py": "tests/test_launch.py::test_colab_notebook",
  "vlm_jax.convert clip": "tests/convert/test_hf_clip.py",
  "vlm_jax.convert llava": "tests/convert/test_hf_llava.py",
  "vlm_jax.convert inf-llava": "tests/convert/test_inf_llava.py",
  "vlm_jax.convert openflamingo": "tests/convert/test_openflamingo.py",
  "vlm_jax.prompt": "tests/prompting/test_prompt_cli.py",
  "vlm_jax.prompting.synthetic_check": "tests/prompting/test_synthetic_check.py",
}
RUN_HERE = {"vlm_jax.main train", "vlm_jax.main eval", "vlm_jax.main compile_only",
            "vlm_jax.generate", "vlm_jax.convert lm", "vlm_jax.convert to-hf",
            "vlm_jax.data.tfds.build"}


def _command_keys(text: str) -> set[str]:
  keys = set()
  for line in text.splitlines():
    for m in re.finditer(r"python3? (?:-u )?(?:-m (vlm_jax[\w.]*)|(launch/\w+\.py))([^`'\"]*)", line):
      module, script, rest = m.groups()
      if script:
        keys.add(script)
      elif module == "vlm_jax.main":
        mode = re.search(r"--mode=(\w+)", rest)
        keys.add(f"vlm_jax.main {mode.group(1) if mode else 'train'}")
      elif module == "vlm_jax.convert":
        sub = re.match(r"\s+([\w-]+)", rest)
        if sub:
          keys.add(f"vlm_jax.convert {sub.group(1)}")
      else:
        keys.add(module)
  return keys


def test_every_readme_command_is_covered():
  text = "".join(open(os.path.join(ROOT, p)).read() for p in ("README.md", "launch/README.md"))
  keys = _command_keys(text)
  assert {"vlm_jax.main train", "vlm_jax.convert lm", "launch/slurm.py"} <= keys  # the parser works
  assert keys - RUN_HERE - set(COVERED) == set(), "a README command no test runs"
  for where in COVERED.values():
    assert os.path.exists(os.path.join(ROOT, where.split("::")[0])), where
