"""Few-shot prompts equal OpenFlamingo's strings exactly (0 and 4 shots, every task kind), zero-shot
keeps two text-only demonstrations, and the shot arithmetic matches OpenFlamingo's own function."""

import pytest

from vlm_jax.eval import prompts

CAPTIONS = ["A cat on a mat.", "Two dogs.", "A red bus.", "Snow."]
VQA = [("What is it?", "cat"), ("How many?", "2"), ("Colour?", "red"), ("Where?", "outside")]


def _demos(template):
  if template == prompts.VQA_TEMPLATE:
    return [{"question": q, "answer": a} for q, a in VQA]
  if template == prompts.HATEFUL_MEMES_TEMPLATE:
    return [{"ocr": f"text {i}", "answer": "yes" if i % 2 else "no"} for i in range(4)]
  return [{"answer": c} for c in CAPTIONS]


# Literal strings of OpenFlamingo 2.0.1: `get_caption_prompt` / `get_vqa_prompt` / `get_imagenet_prompt` /
# `get_hateful_memes_prompt` (eval/models/open_flamingo.py) joined as evaluate.py joins them: "\n"
# after every captioning / VQA demonstration, nothing between classification demonstrations; the
# zero-shot context loses its "<image>" tags (reference/flamingo.md section 5).
EXPECTED = {
  ("caption", 4): "<image>Output:A cat on a mat.<|endofchunk|>\n<image>Output:Two dogs.<|endofchunk|>\n"
                  "<image>Output:A red bus.<|endofchunk|>\n<image>Output:Snow.<|endofchunk|>\n"
                  "<image>Output:",
  ("caption", 0): "Output:A cat on a mat.<|endofchunk|>\nOutput:Two dogs.<|endofchunk|>\n<image>Output:",
  ("vqa", 4): "<image>Question:What is it? Short answer:cat<|endofchunk|>\n"
              "<image>Question:How many? Short answer:2<|endofchunk|>\n"
              "<image>Question:Colour? Short answer:red<|endofchunk|>\n"
              "<image>Question:Where? Short answer:outside<|endofchunk|>\n"
              "<image>Question:Is it a dog? Short answer:",
  ("vqa", 0): "Question:What is it? Short answer:cat<|endofchunk|>\n"
              "Question:How many? Short answer:2<|endofchunk|>\n"
              "<image>Question:Is it a dog? Short answer:",
  ("hateful_memes", 4): "<image>is an image with: 'text 0' written on it. Is it hateful? Answer:no<|endofchunk|>"
                        "<image>is an image with: 'text 1' written on it. Is it hateful? Answer:yes<|endofchunk|>"
                        "<image>is an image with: 'text 2' written on it. Is it hateful? Answer:no<|endofchunk|>"
                        "<image>is an image with: 'text 3' written on it. Is it hateful? Answer:yes<|endofchunk|>"
                        "<image>is an image with: 'a meme' written on it. Is it hateful? Answer:",
  ("hateful_memes", 0): "is an image with: 'text 0' written on it. Is it hateful? Answer:no<|endofchunk|>"
                        "is an image with: 'text 1' written on it. Is it hateful? Answer:yes<|endofchunk|>"
                        "<image>is an image with: 'a meme' written on it. Is it hateful? Answer:",
  ("imagenet", 4): "<image>Output:A cat on a mat.<|endofchunk|><image>Output:Two dogs.<|endofchunk|>"
                   "<image>Output:A red bus.<|endofchunk|><image>Output:Snow.<|endofchunk|><image>Output:",
  ("imagenet", 0): "Output:A cat on a mat.<|endofchunk|>Output:Two dogs.<|endofchunk|><image>Output:",
}
TASKS = {
  "caption": (prompts.CAPTION_TEMPLATE, prompts.GENERATION_SEPARATOR, {}),
  "vqa": (prompts.VQA_TEMPLATE, prompts.GENERATION_SEPARATOR, {"question": "Is it a dog?"}),
  "hateful_memes": (prompts.HATEFUL_MEMES_TEMPLATE, prompts.CLASSIFICATION_SEPARATOR,
                    {"ocr": "a meme"}),
  "imagenet": (prompts.IMAGENET_TEMPLATE, prompts.CLASSIFICATION_SEPARATOR, {}),
}


@pytest.mark.parametrize("task,shots", sorted(EXPECTED))
def test_prompt_equals_openflamingo_string(task, shots):
  template, sep, query = TASKS[task]
  demos = _demos(template)[:prompts.effective_num_shots(shots)]
  assert prompts.build_prompt(template, demos, query, shots, sep) == EXPECTED[(task, shots)]


def test_zero_shot_has_two_text_only_demos():
  template, sep, query = TASKS["vqa"]
  assert prompts.effective_num_shots(0) == 2
  text = prompts.build_prompt(template, _demos(template)[:2], query, 0, sep)
  assert text.count("<image>") == 1 and text.endswith("<image>Question:Is it a dog? Short answer:")
  assert text.count("<|endofchunk|>") == 2  # both demonstrations are there, as text
  assert prompts.num_prompt_images(0) == 1 and prompts.num_prompt_images(4) == 5


def test_query_ends_right_after_the_answer_cue():
  for template in (prompts.CAPTION_TEMPLATE, prompts.VQA_TEMPLATE, prompts.HATEFUL_MEMES_TEMPLATE):
    query = prompts.render(template, {"question": "q", "ocr": "o"})
    assert query.endswith(":") and "<|endofchunk|>" not in query


def test_effective_shots_match_openflamingo():
  of_utils = pytest.importorskip("open_flamingo.eval.utils")
  for k in (0, 1, 4, 8, 16, 32):
    assert prompts.effective_num_shots(k) == of_utils.compute_effective_num_shots(k, "open_flamingo")
  with pytest.raises(ValueError, match="shots"):
    prompts.effective_num_shots(-1)


def test_bad_template_is_rejected():
  with pytest.raises(ValueError, match="no {answer}"):
    prompts.check_template("<image>Output:", "config.fewshot.tasks.x")
  with pytest.raises(ValueError, match="exactly one <image>"):
    prompts.check_template("Output:{answer}", "config.fewshot.tasks.x")
