"""`config.reinit_layers`: the top transformer layers of a pretrained backbone re-initialised before
fine-tuning (loop.reinit_top_layers), in both parameter layouts."""
import jax
import numpy as np
import pytest

from w2v2_jax import configs, models
from w2v2_jax.models import presets
from w2v2_jax.train import loop


def backbone(cfg, seed):
  module = models.build(cfg)
  rngs = {"params": jax.random.PRNGKey(seed), "mask": jax.random.PRNGKey(seed + 1)}
  return jax.device_get(module.init(rngs, np.zeros((1, 8000), np.float32))["params"]["wav2vec2"])


@pytest.mark.parametrize("scan", [False, True])
def test_top_layers_come_from_the_fresh_init_and_the_rest_from_the_pretrained(scan):
  cfg = presets.get("tiny,ctc").replace(encoder_layers=3, scan_layers=scan)
  pretrained, fresh = backbone(cfg, 1), backbone(cfg, 2)
  out = models.layer_layout(loop.reinit_top_layers(pretrained, fresh, 2, cfg), False)
  pre, new = models.layer_layout(pretrained, False), models.layer_layout(fresh, False)
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),  # noqa: E731
                                                             jax.tree_util.tree_leaves(b)))
  assert same(out["encoder"]["layers_0"], pre["encoder"]["layers_0"])
  assert not same(out["encoder"]["layers_0"], new["encoder"]["layers_0"])
  for i in (1, 2):
    assert same(out["encoder"][f"layers_{i}"], new["encoder"][f"layers_{i}"])
  rest = lambda p: {k: v for k, v in p.items() if k != "encoder"}  # noqa: E731
  assert same(rest(out), rest(pre)) and same(out["encoder"]["pos_conv"], pre["encoder"]["pos_conv"])
  # The result is in the model's layout; 0 layers changes nothing; out of range is refused.
  back = loop.reinit_top_layers(pretrained, fresh, 2, cfg)
  assert jax.tree_util.tree_map(np.shape, back) == jax.tree_util.tree_map(np.shape, pretrained)
  assert loop.reinit_top_layers(pretrained, fresh, 0, cfg) is pretrained
  with pytest.raises(ValueError, match="reinit_layers=4"):
    loop.reinit_top_layers(pretrained, fresh, 4, cfg)


def test_reinit_without_a_pretrained_model_is_refused(tmp_path):
  cfg = configs.get("finetune", "tiny")
  cfg.reinit_layers = 1
  with pytest.raises(ValueError, match="reinit_layers=1 needs config.init"):
    loop.finetune(cfg, str(tmp_path / "run"))


@pytest.mark.parametrize("flag, freeze, expected", [(True, 50, 2), (False, 50, 0), (True, 300, 0)])
def test_reinit_layers_train_while_frozen_only_when_asked(flag, freeze, expected):
  """train.train_reinit_while_frozen hands the re-initialised layers to the step's freeze
  (test_finetune_step.py checks what the step does with them); a probe (freeze over every update)
  never trains the backbone."""
  cfg = configs.get("finetune", "tiny")
  cfg.reinit_layers, cfg.train.train_reinit_while_frozen, cfg.train.freeze_updates = 2, flag, freeze
  model_cfg = presets.get("tiny,ctc").replace(vocab_size=32)
  _, _, step_fn = loop.finetune_step_fn(cfg, model_cfg)
  assert step_fn.keywords["train_top_layers"] == expected
