"""Few-shot evaluation in OpenFlamingo's protocol (reference/flamingo.md section 5).

For every task, number of shots k and trial seed:

1. `np.random.RandomState(seed)` draws the evaluated queries (`num_samples` of the test split without
   replacement; all of it, permuted, when -1) and then the fixed random query set (`query_set_size`
   train records), the same two draws in the same order as OpenFlamingo's `np.random.seed(seed)`, so
   the same seed gives the same query set as OpenFlamingo over the same files. Demonstrations of each
   query are `random.Random(seed).sample(query_set, k)` (uniform, without replacement), or with
   `rices=True` its k most similar train images by CLIP embedding, the most similar last
   (`vlm_jax.eval.rices`).
2. Zero-shot uses two demonstrations with their `<image>` tags removed and no images
   (`prompts.effective_num_shots`).
3. Prompts are OpenFlamingo's strings (`vlm_jax.eval.prompts`), tokenized and left-padded
   (`vlm_jax.eval.inputs`); images are CLIP-preprocessed uint8 [B, k + 1, S, S, 3].
4. Captioning / VQA decode with `vlm_jax.eval.generate.generate`: beam search (3 beams, length penalty
   0), max 20 / 5 (TextVQA 10) new tokens, stopping at `<|endofchunk|>`; only the new tokens are
   decoded, special tokens skipped, then post-processed and scored by `vlm_jax.eval.metrics` (CIDEr,
   VQA accuracy). Classification ranks class names by mean token log-likelihood
   (`vlm_jax.eval.scoring`): top-1 accuracy, or ROC AUC of p("yes") for HatefulMemes.
5. Each (task, k) reports the mean and (population) standard deviation over seeds and every seed's
   score, like OpenFlamingo's results file.

`config.fewshot` (all optional; `DEFAULTS` below) selects tasks, shots, seeds and decoding; with no
`config.fewshot` the tasks are built from the synthetic corpus, so the evaluation runs anywhere.

Multi-host: every process runs the same loop over the same examples (the seeds fix everything) and
hands full batches to the device computations, which split them over the mesh's batch axes; only the
chief writes files.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from typing import Any, Mapping

import jax
import numpy as np

from vlm_jax import converted, sharding
from vlm_jax.data import files, tokenizer as tok_lib
from vlm_jax.eval import inputs, metrics, prompts, rices as rices_lib, scoring
from vlm_jax.eval.generate import generate
from vlm_jax.eval.tasks import Task, build_task

SYNTHETIC_TASKS = {
  "synthetic_caption": {"dataset": "synthetic_caption", "num_train": 256, "num_test": 64},
  "synthetic_vqa": {"dataset": "synthetic_vqa", "num_train": 256, "num_test": 64},
  "synthetic_classification": {"dataset": "synthetic_classification", "num_train": 256,
                               "num_test": 64},
}
DEFAULTS = dict(
  tasks=SYNTHETIC_TASKS,     # name -> {"dataset", files..., [template], [max_new_tokens], [num_samples]}
  shots=(0, 4, 8, 16, 32),
  trial_seeds=(42,),         # one trial per seed (OpenFlamingo's paper: 3)
  query_set_size=2048,       # demonstrations are drawn from this many random train records
  num_samples=-1,            # queries per trial (-1 = the whole test split)
  batch_size=8,
  rices=False,               # retrieval-based demonstrations instead of random ones
  rices_vision="",           # "" = the model's own vision tower; else a converted CLIP directory
  rices_projection="",       # optional float[D, E] .npy applied to the pooled CLIP features
  num_beams=3,
  length_penalty=0.0,        # OpenFlamingo's code (its docstrings say -2.0)
  max_prompt_tokens=2000,    # longer prompts are right-truncated (OpenFlamingo's tokenizer call)
  length_bucket=64,          # prompt lengths are padded up to a multiple (fewer compilations)
  classification_rows=16,    # (example, class) rows per forward pass for multi-token class names
  image_cache=4096,          # decoded images kept in memory
  num_threads=4,             # image decoding threads
  log_every_sec=30.0,
)
RESULTS_KEY = "fewshot"


def settings(config, overrides: Mapping[str, Any] | None = None) -> dict:
  """DEFAULTS <- `config.fewshot` <- `overrides` (an evaluator's own fields)."""
  out = copy.deepcopy(DEFAULTS)
  for source in (config.get("fewshot") if config is not None else None, overrides):
    if source:
      for k, v in dict(source).items():
        if k in ("type", "suffix"):
          continue
        if k not in DEFAULTS:
          raise ValueError(f"fewshot setting {k!r} is not one of {sorted(DEFAULTS)}")
        out[k] = v
  out["tasks"] = {name: dict(t) for name, t in dict(out["tasks"]).items()}
  out["shots"] = [int(s) for s in out["shots"]]
  out["trial_seeds"] = [int(s) for s in out["trial_seeds"]]
  for k in out["shots"]:
    prompts.effective_num_shots(k)  # rejects negatives
  if not out["tasks"] or not out["shots"] or not out["trial_seeds"]:
    raise ValueError("fewshot: tasks, shots and trial_seeds must all be non-empty")
  return out


class Progress:
  """One log line every `every` seconds: examples done of the whole evaluation, rate and ETA."""

  def __init__(self, total: int, every: float, prefix: str):
    self.total, self.every, self.prefix = total, every, prefix
    self.done, self.t0, self.last = 0, time.perf_counter(), time.perf_counter()

  def update(self, n: int, what: str) -> None:
    self.done += n
    now = time.perf_counter()
    if now - self.last < self.every and self.done < self.total:
      return
    self.last = now
    rate = self.done / max(now - self.t0, 1e-9)
    eta = (self.total - self.done) / max(rate, 1e-9)
    if jax.process_index() == 0:
      logging.info("%s%s | %d/%d examples | %.2f ex/s | ETA %dm%02ds", self.prefix, what, self.done,
                   self.total, rate, eta // 60, eta % 60)


class Runner:
  """Evaluates a Flamingo `model` (params passed to `evaluate`) on the tasks of `cfg` (`settings`).

  Args:
    model: a `vlm_jax.models.flamingo.Model`.
    tokenizer_spec: `config.data.tokenizer`.
    image_size: the vision tower's input side.
    vision_kwargs: `config.model.vision` (the RICES encoder when `rices_vision` is "").
    mesh, rules: where the params live.
    workdir: where RICES features are cached (None: memory only).
  """

  def __init__(self, model, cfg: dict, tokenizer_spec: str, image_size: int, vision_kwargs: dict,
               mesh, rules, workdir: str | None = None):
    self.model, self.cfg, self.mesh, self.rules, self.workdir = model, cfg, mesh, rules, workdir
    self.image_size, self.vision_kwargs = image_size, dict(vision_kwargs)
    self.tokenizer, self.ids = tok_lib.tokenizer_and_special_ids(tokenizer_spec)
    model_media = getattr(model, "media_token_id", self.ids["media"])
    if model_media != self.ids["media"]:
      raise ValueError(f"model.media_token_id={model_media} but tokenizer {tokenizer_spec!r} gives "
                       f"<image> the id {self.ids['media']}")
    self.tasks = {name: build_task(name, t, image_size) for name, t in cfg["tasks"].items()}
    shards = sharding.data_shards(mesh)
    self.batch = inputs.bucket(int(cfg["batch_size"]), shards)
    self.loader = inputs.ImageLoader(image_size, int(cfg["image_cache"]), int(cfg["num_threads"]))
    self.scorer = scoring.Scorer(model, mesh, rules,
                                 inputs.bucket(int(cfg["classification_rows"]), shards))
    self._rices: dict[tuple, rices_lib.Rices] = {}   # (task, encoder digest) -> retriever
    self._clip: dict[str, Any] = {}                   # rices_vision directory -> params
    self._class_ids = {name: scoring.class_token_ids(self.tokenizer, t.class_names)
                       for name, t in self.tasks.items() if t.kind == "classification"}

  # ------------------------------------------------------------------------------------------------

  def evaluate(self, params, log_prefix: str = "[fewshot] ") -> dict:
    """-> {task: {"metric", "rices", "shots": {k: {"mean", "std", "trials", "seeds"}}}}."""
    total = sum(self._num_queries(t) for t in self.tasks.values())
    total *= len(self.cfg["shots"]) * len(self.cfg["trial_seeds"])
    progress = Progress(total, float(self.cfg["log_every_sec"]), log_prefix)
    out = {}
    for name, task in self.tasks.items():
      per_shot = {}
      for k in self.cfg["shots"]:
        trials = [self.evaluate_trial(params, task, k, seed, progress)
                  for seed in self.cfg["trial_seeds"]]
        per_shot[str(k)] = {"mean": float(np.nanmean(trials)), "std": float(np.nanstd(trials)),
                            "trials": [float(t) for t in trials], "seeds": self.cfg["trial_seeds"]}
        if jax.process_index() == 0:
          logging.info("%s%s %d-shot %s: %.2f +- %.2f over seeds %s", log_prefix, name, k,
                       task.metric, per_shot[str(k)]["mean"], per_shot[str(k)]["std"],
                       self.cfg["trial_seeds"])
      out[name] = {"metric": task.metric, "rices": bool(self.cfg["rices"]), "shots": per_shot}
    return out

  def _num_queries(self, task: Task) -> int:
    n = int(self.cfg["tasks"][task.name].get("num_samples", self.cfg["num_samples"]))
    return len(task.test) if n <= 0 else min(n, len(task.test))

  def sample(self, task: Task, num_shots: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """(query indices into task.test, per query its demonstration indices into task.train) for random
    demonstrations; OpenFlamingo's draws (module docstring)."""
    rs = np.random.RandomState(seed)
    queries = rs.choice(len(task.test), self._num_queries(task), replace=False)
    size = min(int(self.cfg["query_set_size"]), len(task.train))
    query_set = [int(i) for i in rs.choice(len(task.train), size, replace=False)]
    k = prompts.effective_num_shots(num_shots)
    if k > len(query_set):
      raise ValueError(f"task {task.name}: {k} demonstrations needed but the query set has "
                       f"{len(query_set)} records")
    py = random.Random(seed)
    return queries, [py.sample(query_set, k) for _ in queries]

  def evaluate_trial(self, params, task: Task, num_shots: int, seed: int,
                     progress: Progress | None = None) -> float:
    """One (task, shots, seed) trial -> the task's metric (x100)."""
    k = prompts.effective_num_shots(num_shots)
    use_rices = bool(self.cfg["rices"])
    if use_rices:
      queries = np.random.RandomState(seed).choice(len(task.test), self._num_queries(task),
                                                   replace=False)
      retriever = self._retriever(params, task)
    else:
      queries, demos = self.sample(task, num_shots, seed)
    predictions, scores = [], []
    for s in range(0, len(queries), self.batch):
      q_idx = [int(i) for i in queries[s:s + self.batch]]
      q_recs = [task.test[i] for i in q_idx]
      q_imgs = self.loader.load(q_recs, [(task.name, "test", i) for i in q_idx], task.name)
      if use_rices:
        batch_demos = retriever.find(np.stack(q_imgs), k, batch_size=self.batch)
      else:
        batch_demos = demos[s:s + self.batch]
      texts, images = [], []
      for rec, img, d_idx in zip(q_recs, q_imgs, batch_demos):
        d_recs = [task.train[j] for j in d_idx]
        texts.append(prompts.build_prompt(task.template, d_recs, rec, num_shots, task.separator))
        d_imgs = (self.loader.load(d_recs, [(task.name, "train", j) for j in d_idx], task.name)
                  if num_shots > 0 else [])
        images.append(d_imgs + [img])
      if task.kind == "classification":
        scores.append(self._score(params, task, texts, images, num_shots))
      else:
        predictions += self._generate(params, task, texts, images, num_shots)
      if progress is not None:
        progress.update(len(q_idx), f"{task.name} {num_shots}-shot seed {seed}")
    return self._metric(task, [task.test[int(i)] for i in queries], predictions, scores)

  # ------------------------------------------------------------------------------------------------

  def _batch_inputs(self, texts, images, num_shots):
    ids, truncated = inputs.encode(self.tokenizer, texts, int(self.cfg["max_prompt_tokens"]))
    if truncated:
      logging.warning("fewshot: %d prompts longer than max_prompt_tokens=%d were right-truncated",
                      truncated, self.cfg["max_prompt_tokens"])
    length = inputs.bucket(max(len(x) for x in ids), int(self.cfg["length_bucket"]))
    input_ids, mask = inputs.left_pad(ids, length, self.ids["pad"])
    vision_x = inputs.stack_vision(images, prompts.num_prompt_images(num_shots), self.image_size)
    return (inputs.pad_rows(input_ids, self.batch), inputs.pad_rows(mask, self.batch),
            inputs.pad_rows(vision_x, self.batch))

  def _generate(self, params, task: Task, texts, images, num_shots) -> list[str]:
    input_ids, mask, vision_x = self._batch_inputs(texts, images, num_shots)
    out = generate(
      self.model, params, input_ids, mask, max_new_tokens=task.max_new_tokens,
      num_beams=int(self.cfg["num_beams"]), length_penalty=float(self.cfg["length_penalty"]),
      min_new_tokens=0, stop_token_ids=(self.ids["endofchunk"],), pad_token_id=self.ids["pad"],
      mesh=self.mesh, rules=self.rules, vision_x=vision_x)
    out = np.asarray(jax.device_get(out))[:len(texts)]
    return [self.tokenizer.decode([int(t) for t in row], skip_special_tokens=True) for row in out]

  def _score(self, params, task: Task, texts, images, num_shots) -> np.ndarray:
    input_ids, mask, vision_x = self._batch_inputs(texts, images, num_shots)
    return self.scorer.score(params, vision_x, input_ids, mask, self._class_ids[task.name],
                             self.ids["pad"])[:len(texts)]

  def _metric(self, task: Task, records, predictions, scores) -> float:
    if task.kind == "classification":
      logprobs = np.concatenate(scores)  # [N, K]
      labels = [int(r["label"]) for r in records]
      if task.metric == "roc_auc":  # p("yes") among the two classes (OpenFlamingo's pred_score)
        yes = task.class_names.index("yes")
        p = np.exp(logprobs - np.logaddexp.reduce(logprobs, axis=-1, keepdims=True))[:, yes]
        if len(set(labels)) < 2:  # e.g. a few num_samples: AUC is undefined, the other trials stand
          logging.warning("fewshot: %s trial has one class only; ROC AUC is NaN", task.name)
          return float("nan")
        return float(metrics.roc_auc(labels, [float(x) for x in p]))
      return float(metrics.top1_accuracy([int(x) for x in logprobs.argmax(-1)], labels))
    if task.postprocess == "caption":
      preds = [metrics.postprocess_caption(p) for p in predictions]
      return float(metrics.cider(preds, [list(r["references"]) for r in records]))
    post = metrics.postprocess_ok_vqa if task.postprocess == "ok_vqa" else metrics.postprocess_vqa
    return float(metrics.vqa_accuracy([post(p) for p in predictions],
                                      [list(r["references"]) for r in records]))

  # ------------------------------------------------------------------------------------------------

  def _retriever(self, params, task: Task) -> rices_lib.Rices:
    vision_kwargs, vision_params, source = self._rices_encoder(params)
    projection = self.cfg.get("rices_projection") or ""
    proj = np.load(projection) if projection else None
    digest = rices_lib.params_digest(vision_params) + (f":{projection}" if projection else "")
    key = (task.name, digest)
    if key not in self._rices:
      cache = None
      if self.workdir:
        cache = rices_lib.cache_file(os.path.join(self.workdir, "rices"), task.name, task.train,
                                     self.image_size, digest)
      logging.info("fewshot: RICES features of %d %s train records (%s)", len(task.train),
                   task.name, source)
      encode = rices_lib.make_encoder(vision_kwargs, vision_params, proj)
      self._rices[key] = rices_lib.Rices(
        encode, lambda idx: np.stack(self.loader.load([task.train[int(i)] for i in idx],
                                                      [(task.name, "train", int(i)) for i in idx],
                                                      task.name)),
        len(task.train), self.batch, cache)
    return self._rices[key]

  def _rices_encoder(self, params):
    directory = self.cfg.get("rices_vision") or ""
    if not directory:
      return self.vision_kwargs, params["vision"], "the model's vision tower"
    stored = converted.read_model_config(directory)
    if stored["model_name"] != "vit":
      raise ValueError(f"fewshot.rices_vision={directory}: model.json names {stored['model_name']!r},"
                       " expected a converted CLIP vision tower ('vit')")
    if directory not in self._clip:
      self._clip[directory] = converted.load_converted(directory)
    if stored["model"].get("image_size", self.image_size) != self.image_size:
      raise ValueError(f"fewshot.rices_vision={directory}: image_size "
                       f"{stored['model'].get('image_size')} differs from the model's "
                       f"{self.image_size}")
    return stored["model"], self._clip[directory], directory


# ---------------------------------------------------------------------------------------------------
# Results: <workdir>/results.json["fewshot"] and TensorBoard.


def flat_metrics(results: dict, prefix: str = "fewshot/", sep: str = "/") -> dict[str, float]:
  """{task: {"shots": {k: {"mean"}}}} -> {"<prefix><task><sep><k>shot": mean}."""
  return {f"{prefix}{task}{sep}{k}shot": r["mean"]
          for task, res in results.items() for k, r in res["shots"].items()}


def write_results(workdir: str, results: dict, info: Mapping[str, Any], step: int) -> str:
  """Merges `results` (+ `info`) into `<workdir>/results.json` under "fewshot" (other keys, e.g. the
  trainer's, are kept) and writes the means to TensorBoard at `step`. Chief only."""
  path = os.path.join(workdir, "results.json")
  if jax.process_index() != 0:
    return path
  files.makedirs(workdir)
  existing = files.read_json(path) if files.exists(path) else {}
  existing[RESULTS_KEY] = {**dict(info), "step": step, "tasks": results}
  files.write_json(path, existing)
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  for name, value in flat_metrics(results).items():
    writer.add_scalar(name, value, step)
  writer.close()
  return path


def runner_from_config(config, model, mesh, rules, overrides: Mapping[str, Any] | None = None,
                       workdir: str | None = None) -> Runner:
  """A Runner for a Flamingo `model` built from `config` (tokenizer: `config.data.tokenizer`)."""
  vision = dict(getattr(model, "vision", None) or {})
  if not vision or not hasattr(model, "media_token_id"):
    raise ValueError(f"few-shot evaluation needs a Flamingo model, got {type(model).__module__}")
  spec = (config.get("data") or {}).get("tokenizer")
  if not spec:
    raise ValueError("few-shot evaluation needs config.data.tokenizer (e.g. openflamingo:/path/lm)")
  return Runner(model, settings(config, overrides), spec, int(vision.get("image_size", 224)),
                vision, mesh, rules, workdir)


def evaluate_and_write(config, workdir: str, model, params, mesh, rules, *, step: int = 0,
                       source: str = "") -> dict:
  """`--mode=eval`: every task of `config.fewshot` (or the synthetic ones), results merged into
  `<workdir>/results.json["fewshot"]` and TensorBoard (`fewshot/<task>/<k>shot`)."""
  runner = runner_from_config(config, model, mesh, rules, workdir=workdir)
  t0 = time.perf_counter()
  try:
    results = runner.evaluate(params)
  finally:
    runner.loader.close()
  seconds = time.perf_counter() - t0
  protocol = {k: v for k, v in runner.cfg.items() if k != "tasks"}
  info = {"source": source, "seconds": round(seconds, 1), "protocol": protocol,
          "task_configs": runner.cfg["tasks"]}
  path = write_results(workdir, results, info, step)
  if jax.process_index() == 0:
    logging.info("fewshot: %d tasks in %.1fs -> %s: %s", len(results), seconds, path,
                 {k: round(v, 2) for k, v in flat_metrics(results, "", " ").items()})
  return results
