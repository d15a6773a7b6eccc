"""A reference OpenFlamingo model built by the `open_flamingo` package itself, and the same weights in
vlm_jax (for `train_step.py --against=open_flamingo`).

Nothing is downloaded: the LM is a random-init `transformers.LlamaForCausalLM` saved with
`save_pretrained` into a local directory (with a WordLevel tokenizer of `vocab_size` tokens, so
OpenFlamingo's added `<|endofchunk|>`, `<image>`, `<PAD>` get ids vocab_size, +1, +2), and the vision
tower an open_clip ViT from a model-config JSON registered with `open_clip.add_model_config`. The model
comes from `open_flamingo.create_model_and_transforms` (frozen towers; trainable perceiver, gated xattn
layers and LM input embedding) and is converted with `vlm_jax.convert.load_openflamingo`. This is the
recipe of tests/convert/test_openflamingo.py at benchmark sizes.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The CPU torch wheel with the PyPI torchvision build: make `import open_clip` work (see the helper).
from tests.torch_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()

import open_clip  # noqa: E402
import open_flamingo  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import models as tok_models  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402

from vlm_jax.convert import load_openflamingo  # noqa: E402

# The benchmark's shapes (issue 14): ViT 224/16 384x6, LLaMA 512x8 GQA 8/4, xattn every 2 layers,
# OpenFlamingo's default Perceiver (depth 6, 64 latents, 8 heads x 64) and xattn (8 heads x 64).
SIZES = dict(image_size=224, patch_size=16, v_width=384, v_depth=6, v_head_width=64,
             vocab_size=8192, lm_width=512, lm_layers=8, lm_heads=8, lm_kv_heads=4, lm_mlp=1408,
             every=2, gate=0.5)


def word_tokenizer(path: str, vocab_size: int) -> None:
  """A WordLevel tokenizer of exactly `vocab_size` tokens (3 specials + words) saved into `path`."""
  specials = ["<unk>", "<s>", "</s>"]
  vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
  tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                       eos_token="</s>").save_pretrained(path)


def _llama_dir(path: str, s: dict) -> None:
  torch.manual_seed(0)
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=s["vocab_size"], hidden_size=s["lm_width"], num_hidden_layers=s["lm_layers"],
    num_attention_heads=s["lm_heads"], num_key_value_heads=s["lm_kv_heads"],
    intermediate_size=s["lm_mlp"], rms_norm_eps=1e-5, tie_word_embeddings=False))
  lm.save_pretrained(path)
  word_tokenizer(path, s["vocab_size"])


def _vision_cfg(s: dict) -> dict:
  """An open_clip model config: the ViT as given, a one-layer text tower (never run)."""
  return {"embed_dim": 256, "quick_gelu": True,
          "vision_cfg": {"image_size": s["image_size"], "layers": s["v_depth"], "width": s["v_width"],
                         "head_width": s["v_head_width"], "patch_size": s["patch_size"]},
          "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1}}


def openflamingo_model(root: str, lm_dir: str, name: str, vision_cfg: dict, every: int,
                       gate: float):
  """open_flamingo's factory on the HF LM in `lm_dir` and the open_clip config `vision_cfg`
  (registered as `name` from `root`/open_clip_cfg) -> (model, tokenizer, config JSON path). The tanh
  gates are set to `gate`: at OpenFlamingo's init value 0 the images would not change the outputs,
  and in training only the gates would get gradients."""
  cfg_dir = os.path.join(root, "open_clip_cfg")
  os.makedirs(cfg_dir, exist_ok=True)
  cfg_json = os.path.join(cfg_dir, f"{name}.json")
  with open(cfg_json, "w") as f:
    json.dump(vision_cfg, f)
  open_clip.add_model_config(cfg_dir)
  torch.manual_seed(1)
  model, _, tok = open_flamingo.create_model_and_transforms(
    name, None, lm_dir, lm_dir, cross_attn_every_n_layers=every,
    decoder_layers_attr_name="model.layers")
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith(("attn_gate", "ff_gate")):
        p.fill_(gate)
  return model, tok, cfg_json


def build(root: str, sizes: dict | None = None):
  """-> (open_flamingo Flamingo model, tokenizer, lm dir, open_clip config JSON) at `SIZES` (updated
  by `sizes`), every file under `root`."""
  s = {**SIZES, **(sizes or {})}
  lm_dir = os.path.join(root, "lm")
  _llama_dir(lm_dir, s)
  model, tok, cfg_json = openflamingo_model(root, lm_dir, "bench-vit", _vision_cfg(s), s["every"],
                                            s["gate"])
  return model, tok, lm_dir, cfg_json


def convert(model, root: str, lm_dir: str, cfg_json: str, every: int):
  """The open_flamingo model's full state dict -> (flamingo.Model, params) by our loader. open_clip
  3.x feeds the resampler post-ln_post tokens, hence vision_tokens="post_ln_post"."""
  path = os.path.join(root, "full.pt")
  torch.save(model.state_dict(), path)
  return load_openflamingo(path, lm=lm_dir, vision=cfg_json, cross_attn_every_n_layers=every,
                           vision_tokens="post_ln_post")


def torch_inputs(batch: dict) -> dict:
  """Our numpy batch ({"inputs": {vision_x NHWC, input_ids, attention_mask}, "labels"}) -> the keyword
  arguments of OpenFlamingo's forward (vision_x [B, T_img, 1, C, H, W], int64 ids)."""
  x = batch["inputs"]
  return {"vision_x": torch.from_numpy(x["vision_x"]).permute(0, 1, 4, 2, 3).unsqueeze(2).contiguous(),
          "lang_x": torch.from_numpy(x["input_ids"]).long(),
          "attention_mask": torch.from_numpy(x["attention_mask"]).long(),
          "labels": torch.from_numpy(batch["labels"]).long()}


class TorchTrainer:
  """OpenFlamingo's training loop (open_flamingo/train/train_utils.py, one MMC4 batch, no
  accumulation): AdamW over the params that require grad, weight decay on the gated xattn layers only,
  the input-embedding gradient masked to the <image> / <|endofchunk|> rows, clip to norm 1.0."""

  def __init__(self, model, inputs: dict, media_id: int, eoc_id: int, *, lr: float,
               weight_decay: float, clip: float = 1.0):
    torch.set_num_threads(os.cpu_count())
    self.model, self.inputs, self.clip = model.train(), inputs, clip
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    self.params = [p for _, p in named]
    self.opt = torch.optim.AdamW(
      [{"params": [p for n, p in named if "gated_cross_attn" in n], "weight_decay": weight_decay},
       {"params": [p for n, p in named if "gated_cross_attn" not in n], "weight_decay": 0.0}], lr=lr)
    self.embed = model.lang_encoder.get_input_embeddings().weight
    self.row_mask = torch.zeros_like(self.embed)
    self.row_mask[[media_id, eoc_id]] = 1.0

  def loss(self) -> float:
    """The loss of a forward pass without autograd (what an eval step does)."""
    with torch.no_grad():
      return float(self.model(**self.inputs).loss)

  def step(self) -> float:
    """zero_grad / forward / backward / mask rows / clip / AdamW step -> the loss before the step."""
    self.opt.zero_grad(set_to_none=True)
    loss = self.model(**self.inputs).loss
    loss.backward()
    self.embed.grad.mul_(self.row_mask)
    torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    return float(loss.detach())

  def _parts(self):
    """-> (patches, media, hidden, media_locations, first xattn block, lm_only): the inputs of each
    part on this batch (computed without autograd) and the LM's forward with its xattn removed."""
    m, x = self.model, self.inputs
    b, t = x["vision_x"].shape[:2]
    with torch.no_grad():
      patches = m.vision_encoder(x["vision_x"].flatten(0, 2))[1]
      patches = patches.reshape(b, t, 1, *patches.shape[1:])
      media = m.perceiver(patches)
      hidden = m.lang_encoder.get_input_embeddings()(x["lang_x"])
    media_locations = x["lang_x"] == m.media_token_id
    xattn = next(layer for layer in m.lang_encoder.gated_cross_attn_layers if layer is not None)
    layers = m.lang_encoder._get_decoder_layers()

    def lm_only():
      saved = [layer.gated_cross_attn_layer for layer in layers]
      for layer in layers:
        layer.gated_cross_attn_layer = None
      try:
        return m.lang_encoder(input_ids=x["lang_x"], attention_mask=x["attention_mask"]).logits
      finally:
        for layer, block in zip(layers, saved):
          layer.gated_cross_attn_layer = block
    return patches, media, hidden, media_locations, xattn, lm_only

  def part_fns(self) -> dict:
    """Forward-only callables of the model's parts on this batch (no autograd), as OpenFlamingo runs
    them: vision encoder, perceiver, one gated xattn block, the LM's decoder with no xattn."""
    m, x = self.model, self.inputs
    patches, media, hidden, media_locations, xattn, lm_only = self._parts()

    def no_grad(fn):
      def run():
        with torch.no_grad():
          return fn()
      return run

    return {"vision": no_grad(lambda: m.vision_encoder(x["vision_x"].flatten(0, 2))[1]),
            "resampler": no_grad(lambda: m.perceiver(patches)),
            "xattn_block": no_grad(lambda: xattn(hidden, media, media_locations=media_locations,
                                                 use_cached_media=False)),
            "lm_without_xattn": no_grad(lm_only)}

  def part_grads(self) -> dict:
    """Forward + backward of the trainable parts (the loss sum(out * 0.01)): the perceiver's params,
    one xattn block's params and input, the LM's input embedding (vlm_jax's `our_part_grads`)."""
    patches, media, hidden, media_locations, xattn, lm_only = self._parts()
    hidden.requires_grad_(True)

    def backward(fn):
      def run():
        self.model.zero_grad(set_to_none=True)
        hidden.grad = None
        (fn() * 0.01).sum().backward()
      return run
    return {"resampler_fwd_bwd": backward(lambda: self.model.perceiver(patches)),
            "xattn_block_fwd_bwd": backward(lambda: xattn(hidden, media, media_locations=media_locations,
                                                          use_cached_media=False)),
            "lm_fwd_bwd_to_embedding": backward(lm_only)}
