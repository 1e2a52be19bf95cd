"""The step registry and the view contract, against the table of docs/training.md."""

import pytest

from bingo_jax.configs.common import base_config
from bingo_jax.data import views
from bingo_jax.method import config_checks, objectives, steps

# (method, loss, cutmix) -> the views the step reads, written out from the method's definition:
# the released loss embeds the anchor and its bag positive on both sides; the paper's Eq. 8/9
# needs the positive's student view only; the anchor-only loss and MoCo read the anchor alone.
EXPECTED_VIEWS = {
    ('bingo', 'bingo', 'batch'): ('query', 'key', 'pos_q', 'pos_k'),
    ('bingo', 'bingo', 'none'): ('query', 'key', 'pos_q', 'pos_k'),
    ('bingo', 'paper_eq8', 'none'): ('query', 'key', 'pos_q'),
    ('bingo', 'anchor_only', 'batch'): ('query', 'key'),
    ('moco', 'bingo', 'batch'): ('query', 'key'),
}


def test_every_method_has_a_step_builder():
  assert tuple(steps.METHODS) == config_checks.METHODS
  assert set(objectives.LOSS_NAMES) == {'bingo', 'paper_eq8', 'anchor_only'}


@pytest.mark.parametrize('method, loss, cutmix', sorted(EXPECTED_VIEWS))
def test_batch_views_per_method_and_loss(method, loss, cutmix):
  config = base_config()
  config.train.update(method=method, loss=loss, cutmix=cutmix)
  assert steps.batch_views(config) == EXPECTED_VIEWS[method, loss, cutmix]
  assert views.needs_bags(steps.batch_views(config)) == (
      'pos_q' in EXPECTED_VIEWS[method, loss, cutmix])


def test_cutmix_view_is_embedded_only_by_the_released_loss():
  train = base_config().train
  assert objectives.make_objective(train).student_views == ('query', 'pos_q', 'mix_q')
  train.cutmix = 'none'
  assert objectives.make_objective(train).student_views == ('query', 'pos_q')
  train.cutmix = 'batch'
  assert objectives.make_objective(train, 'paper_eq8').student_views == ('query', 'pos_q')


def test_unknown_method_or_view_is_named():
  config = base_config()
  config.train.method = 'byol'
  with pytest.raises(ValueError, match=r"config.train.method = 'byol'; expected one of "
                                       r"\('bingo', 'moco'\)"):
    steps.step_builder(config)
  with pytest.raises(ValueError, match=r"Unknown views \['mix_q'\]"):
    views.ordered(['query', 'mix_q'])


@pytest.mark.parametrize('loss', ['kd', 'rkd'])
def test_table9_baselines_read_the_anchor_alone_and_have_rows(loss):
  """KD and RKD: the student embeds ``query``, the teacher ``key`` (the queue) and ``query``
  itself (the same augmented image); no bag file, no CutMix; a variant and an ablation row."""
  from bingo_jax.configs import fmnist_ablation
  assert loss in objectives.BASELINE_NAMES
  config = base_config()
  config.train.update(method='bingo', loss=loss, cutmix='batch')
  objective = objectives.make_objective(config.train)
  assert objective.student_views == ('query',)
  assert objective.teacher_views == ('key', objectives.TEACHER_QUERY)
  assert not objective.uses_cutmix
  assert steps.batch_views(config) == ('query', 'key')
  row = fmnist_ablation.get_config(loss)
  assert (row.train.loss, row.train.cutmix, fmnist_ablation.ROW_BAGS[loss]) == (loss, 'none', None)
  assert base_config().train.loss != loss
  from bingo_jax.configs import variants
  assert variants.apply_variants(base_config(), loss).train.loss == loss
