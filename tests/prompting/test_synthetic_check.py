"""The synthetic end-to-end check of attention prompting (`vlm_jax.prompting.synthetic_check`): the
box arithmetic on hand-made maps, the two-shape renderer, the contrastive loss, and the command at
toy size (results.json, reuse of the saved CLIP, relative workdir). The learned figures of the real
run are not asserted here."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.data import synthetic
from vlm_jax.prompting import synthetic_check as sc


def test_box_weights_cover_cells_fractionally():
  # 24 px image, 6 x 6 grid: 4 px cells. Box x in [10, 24), y in [0, 6).
  w = sc.box_weights((10, 0, 24, 6), 6, 24)
  want = np.zeros((6, 6))
  want[0, 2], want[0, 3:] = 0.5, 1.0        # row 0 fully inside in y, column 2 half in x
  want[1, 2], want[1, 3:] = 0.25, 0.5       # row 1: y in [4, 6) is half the cell
  np.testing.assert_allclose(w, want)


def test_mass_fraction_of_planted_maps():
  psi = np.zeros((6, 6), np.float32)
  psi[1, 2] = 1.0  # the cell spanning x in [8, 12), y in [4, 8)
  assert sc.box_mass_fraction(psi, (10, 0, 24, 6), 24) == pytest.approx(0.25)
  psi[5, 5] = 3.0
  assert sc.box_mass_fraction(psi, (10, 0, 24, 6), 24) == pytest.approx(0.25 / 4)
  assert sc.box_mass_fraction(psi, (20, 20, 24, 24), 24) == pytest.approx(0.75)
  assert sc.box_mass_fraction(psi, (0, 0, 24, 24), 24) == pytest.approx(1.0)


def test_constant_or_empty_map_scores_the_area_fraction():
  box = (3, 5, 20, 14)
  area = 17 * 9 / 24**2
  assert sc.box_area_fraction(box, 24) == pytest.approx(area)
  assert sc.box_mass_fraction(np.full((6, 6), 0.3), box, 24) == pytest.approx(area)
  assert sc.box_mass_fraction(np.zeros((6, 6)), box, 24) == pytest.approx(area)
  assert sc.box_area_fraction((-4, 20, 30, 40), 24) == pytest.approx(24 * 4 / 24**2)  # clipped
  with pytest.raises(ValueError, match="non-negative"):
    sc.box_mass_fraction(-np.ones((6, 6)), box, 24)
  with pytest.raises(ValueError, match="square"):
    sc.box_mass_fraction(np.ones((6, 4)), box, 24)


def test_pair_image_boxes_hold_their_shapes_and_nothing_else_is_coloured():
  for i in range(6):
    rng = np.random.default_rng(i)
    target, distractor = ("circle", "red"), ("cross", "blue")
    image, tbox, dbox = synthetic.render_pair_image(rng, 96, target, distractor)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    # Opposite halves: the boxes are disjoint along one axis.
    assert tbox[2] <= dbox[0] or dbox[2] <= tbox[0] or tbox[3] <= dbox[1] or dbox[3] <= tbox[1]
    for box, (shape, colour) in ((tbox, target), (dbox, distractor)):
      side = (box[2] - box[0]) / 96
      assert 0.27 <= side <= 0.40, (shape, box)
      near = np.linalg.norm(image.astype(float) - synthetic.COLOUR_RGB[colour], axis=-1) < 45
      inside = np.zeros(near.shape, bool)
      inside[box[1]:box[3], box[0]:box[2]] = True
      assert near[inside].mean() > 0.3 and not near[~inside].any(), (shape, box)


def test_contrastive_loss_values():
  e = jnp.eye(4)
  loss, acc = sc.contrastive_loss(e, 2.0 * e, jnp.log(100.0))  # matched, orthogonal, scale 100
  assert float(loss) == pytest.approx(math.log(1 + 3 * math.exp(-100)), abs=1e-6)
  assert float(acc) == 1.0
  loss, _ = sc.contrastive_loss(jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.log(10.0))
  assert float(loss) == pytest.approx(math.log(4), rel=1e-6)  # all alike: chance


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("api_check")
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(root)  # a relative --workdir, as a user types it (orbax needs it made absolute)
    sc.main(["--toy", "--workdir=runs/api"])
  return root / "runs/api"


def test_toy_run_writes_results(toy_run):
  r = json.loads((toy_run / "results.json").read_text())
  assert r["clip"] == "trained" and r["num_images"] == sc.TOY.eval_images
  assert (toy_run / "clip/model.json").exists()
  examples = sc.pair_examples(sc.TOY)
  for b in ("target", "distractor"):
    want = np.mean([sc.box_area_fraction(e[f"{b}_box"], sc.TOY.image_size) for e in examples])
    assert r["area_fraction"][b] == pytest.approx(want)
  assert set(r["queries"]) == set(sc.QUERIES)
  for q in r["queries"].values():
    for name in ("api", "cls", "comp"):
      for which in ("query_target", "query_distractor"):
        entry = q[name][which]
        assert set(entry) == {"mass_in_target_box", "mass_in_distractor_box", "named_box_wins"}
        assert all(0.0 <= v <= 1.0 for v in entry.values())


def test_toy_run_masses_are_the_maps_box_fractions(toy_run):
  from vlm_jax import converted
  from vlm_jax.prompting import clip_model

  model = clip_model.Model(**converted.read_model_config(str(toy_run / "clip"))["model"])
  params = converted.load_converted(str(toy_run / "clip"))
  examples = sc.pair_examples(sc.TOY)
  psi = sc.attribution_maps(model, params, examples, "distractor", sc.QUERIES["shape"], sc.TOY)
  r = json.loads((toy_run / "results.json").read_text())
  got = r["queries"]["shape"]["cls"]["query_distractor"]["mass_in_target_box"]
  want = np.mean([sc.box_mass_fraction(m, e["target_box"], sc.TOY.image_size)
                  for m, e in zip(psi["cls"], examples)])
  assert got == pytest.approx(want, rel=1e-5)


def test_toy_rerun_reuses_the_clip_and_refuses_other_training(toy_run, monkeypatch):
  before = json.loads((toy_run / "results.json").read_text())
  sc.main(["--toy", f"--workdir={toy_run}"])
  after = json.loads((toy_run / "results.json").read_text())
  assert after["clip"] == "reused" and after["queries"] == before["queries"]
  with pytest.raises(SystemExit, match="another --workdir"):
    sc.main(["--toy", "--steps=4", f"--workdir={toy_run}"])
