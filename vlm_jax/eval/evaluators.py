"""Evaluators run periodically inside training and at its end; built from `config.evals`.

`config.evals` maps a name to a dict with `type` and options; each evaluator returns metrics named
`eval/<metric><suffix>`. Types:
- `synthetic_vqa`: accuracy of the next token after "<image>Question: ... Answer:" on held-out synthetic
  images (colour and shape questions; answers are single tokens, the argmax is over the whole vocab).
  `zero_params` (regex) zeroes matching params first: with `xattn_\\d+/(attn|ff)_gate` it evaluates the same
  model with every tanh gate forced to 0, i.e. the bare LM, which can only guess.
- `llava_vqa`: the same accuracy for the LLaVA family (llava, llava_flex, inf_llava) on held-out
  synthetic conversations of `config.data` (its template, image sizes and kind, or the evaluator's
  `kind`: vqa | hires): each example goes through the training transform, the prompt is everything
  before the first answer token, and the prediction is the argmax at the prompt's last row (the row
  FlexAttention selects from at inference). Metrics `eval/accuracy{suffix}` and per question type.
- `loss`: mean training loss and token accuracy over held-out batches of `config.data`.
- `classification`: top-1 (and top-5) accuracy and plain CE (no smoothing, no aux terms) of a
  classifier (logits[B, C]) over the held-out split of `config.data`, batch `batch_size` (default
  config.batch_size), the first ceil(`num_examples` / batch_size) batches (default: the whole
  split, less its partial last batch); `eval/num_examples` says how many were scored.
- `param_count`: `eval/num_params`, the number of parameters of the evaluated model.
- `fewshot`: OpenFlamingo's few-shot protocol (`vlm_jax.eval.fewshot`) on the tasks of the evaluator's
  own fields, over `config.fewshot`, over the synthetic defaults (`tasks`, `shots`, `trial_seeds`,
  `num_samples`, ...); metrics `eval/fewshot_<task>_<k>shot<suffix>` (mean over seeds).

Evaluators get the training loss function from the caller, so this room does not import the trainer.

Multi-host: `run` is collective (every process calls it with the same params) and returns the same
metrics on every process: `synthetic_vqa` holds the whole (small) eval set on every process, each
process feeds only the rows of its own devices and the predictions come back replicated; `loss`
reads each process's shard of the eval split and reduces on the devices.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from vlm_jax import sharding
from vlm_jax.data.images import stack_images
from vlm_jax.data.interleaved import IGNORE_INDEX, encode_prompt
from vlm_jax.data.pipeline import make_dataset, source_and_transform
from vlm_jax.data.synthetic import SyntheticSource
from vlm_jax.data.tokenizer import load_tokenizer
from vlm_jax.eval.inputs import pad_rows
from vlm_jax.param_paths import flatten, matching, unflatten


def zero_matching(params: Any, regex: str | None) -> Any:
  """Params with every leaf whose path matches `regex` replaced by zeros."""
  if not regex:
    return params
  flat = flatten(params)
  hits = matching(flat, regex)
  if not hits:
    raise ValueError(f"evals.*.zero_params={regex!r} matches no parameter")
  # Keep each param's sharding: a default-device array could not meet the others in a multi-host
  # jit.
  return unflatten({k: (jnp.zeros_like(v, device=getattr(v, "sharding", None)) if k in hits else v)
                    for k, v in flat.items()})


class SyntheticVQA:
  """Next-token answer accuracy on the held-out synthetic VQA split (+ per question type)."""

  def __init__(self, name: str, cfg, config, model, mesh, rules, loss_fn):
    del loss_fn  # accuracy only
    self.name, self.mesh = name, mesh
    self.suffix = cfg.get("suffix", "")
    self.zero_params = cfg.get("zero_params")
    self.batch_size = int(cfg.get("batch_size", 64))
    data = config.data
    tok = load_tokenizer(data.tokenizer)
    source = SyntheticSource("vqa", split="eval", num_records=int(cfg.num_examples),
                             image_size=data.image_size, max_images=1, seed=data.seed)
    ids, lengths, images, answers, kinds = [], [], [], [], []
    for i in range(len(source)):
      rec = source[i]
      x, n = encode_prompt(tok, rec["prompt"], data.max_text_len)
      answer_id = tok.token_to_id(rec["answer"])
      if answer_id is None:
        raise ValueError(f"answer {rec['answer']!r} is not a single token of {data.tokenizer}")
      ids.append(x)
      lengths.append(n)
      images.append(stack_images(rec["images"], 1, data.image_size)[0])
      answers.append(answer_id)
      kinds.append(rec["question_type"])
    self.ids, self.lengths = np.stack(ids), np.asarray(lengths)
    self.images, self.answers, self.kinds = np.stack(images), np.asarray(answers), np.asarray(kinds)

    def predict(params, vision_x, input_ids, attention_mask, last):
      logits, _ = model.apply({"params": params}, vision_x, input_ids, attention_mask)
      return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0].argmax(-1)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      # Replicated predictions: every process can read all of them (a few ints per example).
      self._predict = jax.jit(predict, out_shardings=sharding.replicated(mesh))
    self._rules = rules

  def run(self, params) -> dict[str, float]:
    params = zero_matching(params, self.zero_params)
    n, bs = len(self.ids), self.batch_size
    preds = []
    for s in range(0, n, bs):
      sl = slice(s, min(n, s + bs))
      # The whole (padded) batch on every process; each feeds only its own devices' rows.
      batch = [sharding.full_batch(pad_rows(x, bs), self.mesh) for x in (
        self.images[sl], self.ids[sl], (self.ids[sl] != 0).astype(np.int32), self.lengths[sl] - 1)]
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self._rules):
        out = self._predict(params, *batch)
      preds.append(np.asarray(jax.device_get(out))[: sl.stop - sl.start])
    correct = np.concatenate(preds) == self.answers
    res = {f"eval/accuracy{self.suffix}": float(correct.mean())}
    for kind in np.unique(self.kinds):
      res[f"eval/accuracy_{kind}{self.suffix}"] = float(correct[self.kinds == kind].mean())
    return res


class LlavaVQA:
  """First-answer-token accuracy of a LLaVA-family model on held-out synthetic conversations."""

  def __init__(self, name: str, cfg, config, model, mesh, rules, loss_fn):
    del loss_fn
    self.name, self.mesh, self.rules = name, mesh, rules
    self.suffix = cfg.get("suffix", "")
    self.zero_params = cfg.get("zero_params")
    self.batch_size = int(cfg.get("batch_size", 32))
    data = dict(config.data)
    if data.get("source") != "synthetic" or data.get("template") is None:
      raise ValueError(f"config.evals.{name}: llava_vqa needs config.data.source='synthetic' with "
                       "a template (LLaVA conversations)")
    # The model's inputs as in training, minus the training-path rows (the eval is inference).
    data.update(kind=cfg.get("kind", data.get("kind")), num_records=int(cfg.num_examples),
                answer_rows=False)
    source, transform, self.collate = source_and_transform(data, "eval")
    self.examples, lasts, answers, kinds = [], [], [], []
    for i in range(len(source)):
      record = source[i]
      ex = transform.map(record)
      first = int(np.argmax(ex["labels"] != IGNORE_INDEX))  # the first answer token
      ex["attention_mask"] = np.where(np.arange(ex["attention_mask"].shape[0]) < first,
                                      ex["attention_mask"], 0).astype(ex["attention_mask"].dtype)
      self.examples.append(ex)
      lasts.append(first - 1)
      answers.append(int(ex["input_ids"][first]))
      kinds.append(record["question_type"])
    self.lasts, self.answers, self.kinds = np.asarray(lasts), np.asarray(answers), np.asarray(kinds)

    def predict(params, inputs, last):
      logits, _ = model.apply({"params": params}, **inputs)
      return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0].argmax(-1)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      self._predict = jax.jit(predict, out_shardings=sharding.replicated(mesh))

  def run(self, params) -> dict[str, float]:
    params = zero_matching(params, self.zero_params)
    n, bs = len(self.examples), self.batch_size
    preds = []
    for s in range(0, n, bs):
      chunk = self.examples[s:s + bs]
      inputs = self.collate(chunk + [chunk[-1]] * (bs - len(chunk)))["inputs"]
      last = pad_rows(self.lasts[s:s + bs], bs)
      batch = jax.tree.map(lambda x: sharding.full_batch(x, self.mesh), (inputs, last))
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        out = self._predict(params, *batch)
      preds.append(np.asarray(jax.device_get(out))[:len(chunk)])
    correct = np.concatenate(preds) == self.answers
    res = {f"eval/accuracy{self.suffix}": float(correct.mean())}
    for kind in np.unique(self.kinds):
      res[f"eval/accuracy_{kind}{self.suffix}"] = float(correct[self.kinds == kind].mean())
    return res


class HeldOutLoss:
  """Mean next-token CE over `num_batches` held-out batches of `config.data`."""

  def __init__(self, name: str, cfg, config, model, mesh, rules, loss_fn):
    self.name, self.mesh, self.rules = name, mesh, rules
    self.suffix = cfg.get("suffix", "")
    self.num_batches = int(cfg.get("num_batches", 4))
    self.config = config

    def eval_loss(params, batch):
      logits, _ = model.apply({"params": params}, **batch["inputs"])
      loss, aux = loss_fn(logits, batch["labels"])
      return loss * aux["num_tokens"], aux["num_tokens"], aux["correct"]

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      self._eval = jax.jit(eval_loss)

  def run(self, params) -> dict[str, float]:
    ds = make_dataset(self.config.data, split="eval",
                      batch_size=self.config.batch_size // jax.process_count(), repeat=False)
    total, count, correct = 0.0, 0, 0
    for i, local in enumerate(ds):
      if i >= self.num_batches:
        break
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        s, c, k = jax.device_get(self._eval(params, sharding.global_batch(local, self.mesh)))
      total, count, correct = total + float(s), count + int(c), correct + int(k)
    return {f"eval/loss{self.suffix}": total / max(count, 1),
            f"eval/token_accuracy{self.suffix}": correct / max(count, 1)}


class FewShot:
  """OpenFlamingo's few-shot evaluation (captioning / VQA by generation, classification by ranked
  log-likelihood) of the params being trained."""

  def __init__(self, name: str, cfg, config, model, mesh, rules, loss_fn):
    del loss_fn
    from vlm_jax.eval import fewshot  # pylint: disable=g-import-not-at-top  (fewshot is heavier)

    self.name = name
    self.suffix = cfg.get("suffix", "")
    self.runner = fewshot.runner_from_config(config, model, mesh, rules, overrides=dict(cfg))
    self._flat = fewshot.flat_metrics

  def run(self, params) -> dict[str, float]:
    results = self.runner.evaluate(params, log_prefix=f"[eval {self.name}] ")
    return {f"{k}{self.suffix}": v for k, v in self._flat(results, "eval/fewshot_", "_").items()}


class Classification:
  """Top-1 / top-5 accuracy and CE of a classifier on the held-out split of `config.data`."""

  def __init__(self, name: str, cfg, config, model, mesh, rules, loss_fn):
    del loss_fn  # the plain CE: label smoothing and aux losses are training terms
    self.name, self.mesh, self.rules, self.config = name, mesh, rules, config
    self.suffix = cfg.get("suffix", "")
    self.batch_size = int(cfg.get("batch_size") or config.batch_size)
    self.num_examples = cfg.get("num_examples")

    def evaluate(params, batch):
      logits, _ = model.apply({"params": params}, **batch["inputs"])
      logits, labels = logits.astype(jnp.float32), batch["labels"]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
      k = min(5, logits.shape[-1])
      top = jax.lax.top_k(logits, k)[1]
      return ce, (top[:, 0] == labels).sum(), (top == labels[:, None]).any(-1).sum()

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      self._eval = jax.jit(evaluate)

  def run(self, params) -> dict[str, float]:
    ds = make_dataset(self.config.data, split="eval",
                      batch_size=self.batch_size // jax.process_count(), repeat=False)
    total = np.zeros(3)
    count = 0
    for local in ds:
      if self.num_examples and count >= int(self.num_examples):
        break
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        out = self._eval(params, sharding.global_batch(local, self.mesh))
      total += np.asarray(jax.device_get(out), np.float64)
      count += self.batch_size
    ce, top1, top5 = (float(v) / max(count, 1) for v in total)
    return {f"eval/accuracy{self.suffix}": top1, f"eval/top5_accuracy{self.suffix}": top5,
            f"eval/loss{self.suffix}": ce, f"eval/num_examples{self.suffix}": float(count)}


class ParamCount:
  """The number of parameters of the evaluated model (trainable and frozen)."""

  def __init__(self, name: str, cfg, config, model, mesh, rules, loss_fn):
    del config, model, mesh, rules, loss_fn
    self.name, self.suffix = name, cfg.get("suffix", "")

  def run(self, params) -> dict[str, float]:
    return {f"eval/num_params{self.suffix}": float(sum(x.size for x in jax.tree.leaves(params)))}


EVALUATORS = {"synthetic_vqa": SyntheticVQA, "llava_vqa": LlavaVQA, "loss": HeldOutLoss,
              "fewshot": FewShot, "classification": Classification, "param_count": ParamCount}


def build_evaluators(config, model, mesh, rules, loss_fn) -> list:
  """loss_fn(logits, labels) -> (loss, {"num_tokens", "correct"}), as in `vlm_jax.train.losses`."""
  out = []
  for name, cfg in sorted(dict(config.get("evals") or {}).items()):
    kind = cfg.get("type")
    if kind not in EVALUATORS:
      raise ValueError(f"config.evals.{name}.type={kind!r} is not one of {sorted(EVALUATORS)}")
    out.append(EVALUATORS[kind](name, cfg, config, model, mesh, rules, loss_fn))
  return out
