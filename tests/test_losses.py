"""The BINGO loss against a PyTorch transcription of docs/method.md §6; the Table 9 baselines
(KD, RKD) against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bingo_jax.method import losses

BATCH, DIM, QUEUE, TAU = 16, 8, 64, 0.2


def _unit_rows(rng: np.random.RandomState, rows: int) -> np.ndarray:
  x = rng.normal(size=(rows, DIM))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def embeddings():
  rng = np.random.RandomState(0)
  names = ('q', 'p', 'm', 'k', 'kp')
  values = {name: _unit_rows(rng, BATCH) for name in names}
  values['queue'] = _unit_rows(rng, QUEUE)
  return values


def torch_ce(s: np.ndarray, t: np.ndarray, queue: np.ndarray,
             reduction: str = 'mean') -> torch.Tensor:
  """docs/method.md §6: CE of logits [s.t, s.queue_1..K] / tau with target 0 (float64)."""
  s, t, queue = (torch.from_numpy(x).double() for x in (s, t, queue))
  logits = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.T], dim=1) / TAU
  return F.cross_entropy(logits, torch.zeros(len(s), dtype=torch.long), reduction=reduction)


def torch_bingo_loss(e: dict, epoch: int, lam: float) -> float:
  """docs/method.md §6 and §7 transcribed: warm-up weights (1, 0) for epochs 0..10,
  (0.5, 0.5) after."""
  w_own, w_oth = (1.0, 0.0) if epoch <= 10 else (0.5, 0.5)
  ce = lambda s, t: torch_ce(e[s], e[t], e['queue'])
  loss = (w_own * ce('q', 'k') + w_oth * ce('q', 'kp') + w_own * ce('p', 'kp')
          + w_oth * ce('p', 'k') + lam * ce('m', 'k') + (1 - lam) * ce('m', 'kp')) / 3
  return float(loss)


def test_info_nce_matches_torch_cross_entropy(embeddings):
  ours = losses.info_nce(jnp.asarray(embeddings['q']), jnp.asarray(embeddings['k']),
                         jnp.asarray(embeddings['queue']), TAU)
  reference = torch_ce(embeddings['q'], embeddings['k'], embeddings['queue'], 'none').numpy()
  assert ours.shape == (BATCH,)
  np.testing.assert_allclose(np.asarray(ours), reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('epoch', [0, 10, 11, 150])
def test_bingo_loss_matches_torch_transcription(embeddings, epoch):
  lam = 0.3671875
  own_key_warmup_epochs = 11  # the released `epoch > 10` switch
  warm_up = epoch < own_key_warmup_epochs
  e = {name: jnp.asarray(value) for name, value in embeddings.items()}
  loss, terms = losses.bingo_loss(e['q'], e['p'], e['m'], e['k'], e['kp'], e['queue'], TAU,
                                  own_weight=1.0 if warm_up else 0.5,
                                  other_weight=0.0 if warm_up else 0.5, lam=lam)
  np.testing.assert_allclose(float(loss), torch_bingo_loss(embeddings, epoch, lam),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      float(terms['ce_m_kp']),
      float(torch_ce(embeddings['m'], embeddings['kp'], embeddings['queue'])), rtol=1e-6)


def test_bingo_loss_per_example_lam(embeddings):
  """One CutMix box per sample: each example's mix term has its own lam."""
  lam = np.linspace(0.1, 0.9, BATCH).astype(np.float32)
  e = {name: jnp.asarray(value) for name, value in embeddings.items()}
  loss, _ = losses.bingo_loss(e['q'], e['p'], e['m'], e['k'], e['kp'], e['queue'], TAU,
                              0.5, 0.5, lam=jnp.asarray(lam))
  ce = lambda s, t: torch_ce(embeddings[s], embeddings[t], embeddings['queue'], 'none')
  lam_t = torch.from_numpy(lam).double()
  reference = (0.5 * (ce('q', 'k') + ce('q', 'kp') + ce('p', 'kp') + ce('p', 'k'))
               + lam_t * ce('m', 'k') + (1 - lam_t) * ce('m', 'kp')).mean() / 3
  np.testing.assert_allclose(float(loss), float(reference), rtol=1e-6, atol=1e-6)


def test_paper_loss_is_intra_plus_inter(embeddings):
  e = {name: jnp.asarray(value) for name, value in embeddings.items()}
  loss, _ = losses.paper_eq8_loss(e['q'], e['p'], e['k'], e['queue'], TAU)
  reference = (torch_ce(embeddings['q'], embeddings['k'], embeddings['queue'])
               + torch_ce(embeddings['p'], embeddings['k'], embeddings['queue']))
  np.testing.assert_allclose(float(loss), float(reference), rtol=1e-6, atol=1e-6)


def test_contrastive_accuracy_matches_torch_topk(embeddings):
  rng = np.random.RandomState(1)
  # Keys close to the queries make some, not all, predictions correct.
  keys = embeddings['q'] + 0.6 * rng.normal(size=(BATCH, DIM)).astype(np.float32)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  top1, top5 = losses.contrastive_accuracy(jnp.asarray(embeddings['q']), jnp.asarray(keys),
                                           jnp.asarray(embeddings['queue']), TAU)
  q, k, queue = (torch.from_numpy(x).double() for x in (embeddings['q'], keys,
                                                         embeddings['queue']))
  logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1)
  top = logits.topk(5, dim=1).indices
  reference1 = 100.0 * (top[:, :1] == 0).any(1).double().mean()
  reference5 = 100.0 * (top == 0).any(1).double().mean()
  assert 0 < float(reference5) < 100 or 0 < float(reference1) < 100
  np.testing.assert_allclose([float(top1), float(top5)], [reference1, reference5], atol=1e-4)


def test_accuracy_counts_ties_and_nan_against_the_label():
  """Closed form: a row is a hit at k when fewer than k other logits are >= the label's or
  NaN; the released topk would rank the label (index 0) first among ties."""
  nan = float('nan')
  logits = jnp.asarray([[1.0, 1.0, 0.0],    # tie with a negative: others not below 1
                        [2.0, 1.0, 0.0],    # strictly largest: 0
                        [nan, 0.0, 0.0],    # NaN label: 2
                        [1.0, nan, 0.0],    # a NaN negative: 1
                        [0.0, 0.0, 0.0]],   # all equal (collapsed): 2
                       jnp.float32)
  top1, top2, top3 = losses.accuracy_topk(logits, jnp.zeros((5,), jnp.int32), (1, 2, 3))
  np.testing.assert_allclose([float(top1), float(top2), float(top3)],
                             [100 * 1 / 5, 100 * 3 / 5, 100.0], atol=1e-5)
  # The label need not be column 0.
  top1, = losses.accuracy_topk(logits[:, ::-1], jnp.full((5,), 2, jnp.int32), (1,))
  np.testing.assert_allclose(float(top1), 20.0, atol=1e-5)


@pytest.mark.parametrize('value', [0.0, float('nan')])
def test_collapsed_or_nan_embeddings_read_zero_top1(value):
  q = jnp.full((BATCH, DIM), value, jnp.float32)
  queue = jnp.full((QUEUE, DIM), value, jnp.float32)
  top1, top5 = losses.contrastive_accuracy(q, q, queue, TAU)
  assert (float(top1), float(top5)) == (0.0, 0.0)


def test_l2_normalize_matches_torch():
  x = np.random.RandomState(2).normal(size=(4, DIM)).astype(np.float32)
  x[0] = 0  # torch's epsilon keeps zero rows at zero
  np.testing.assert_allclose(np.asarray(losses.l2_normalize(jnp.asarray(x))),
                             F.normalize(torch.from_numpy(x), dim=1).numpy(), atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Table 9 baselines: KD and the similarity-preserving RKD, against numpy written from the
# formulas (values and gradients in float64)


def _numpy_kd(s: np.ndarray, t: np.ndarray) -> float:
  s, t = s.astype(np.float64), t.astype(np.float64)
  return float(np.mean([np.dot(a - b, a - b) for a, b in zip(s, t)]))


def _numpy_similarity_mse(s: np.ndarray, t: np.ndarray) -> float:
  s, t = s.astype(np.float64), t.astype(np.float64)
  n = len(s)
  total = sum((np.dot(s[i], s[j]) - np.dot(t[i], t[j])) ** 2
              for i in range(n) for j in range(n) if i != j)
  return total / (n * (n - 1))


def test_kd_l2_loss_matches_numpy_and_its_gradient(embeddings):
  s, t = embeddings['q'], embeddings['k']
  value = losses.kd_l2_loss(jnp.asarray(s), jnp.asarray(t))
  np.testing.assert_allclose(float(value), _numpy_kd(s, t), rtol=1e-6, atol=1e-6)
  # Unit rows: ||s - t||^2 = 2 - 2 s.t.
  np.testing.assert_allclose(float(value), np.mean(2 - 2 * np.sum(s * t, 1)), atol=1e-6)
  # d/ds_i = 2 (s_i - t_i) / B; nothing flows into the teacher.
  grad_s, grad_t = jax.grad(losses.kd_l2_loss, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(grad_s), 2 * (s - t) / BATCH, atol=1e-6)
  assert not np.asarray(grad_t).any()


def test_similarity_matching_loss_matches_numpy_and_its_gradient(embeddings):
  s, t = embeddings['q'], embeddings['k']
  value = losses.similarity_matching_loss(jnp.asarray(s), jnp.asarray(t))
  np.testing.assert_allclose(float(value), _numpy_similarity_mse(s, t), rtol=1e-6, atol=1e-7)
  # Same relations (a rotation of the teacher's rows): zero loss, whatever the embedding.
  rotation, _ = np.linalg.qr(np.random.RandomState(3).normal(size=(DIM, DIM)))
  np.testing.assert_allclose(float(losses.similarity_matching_loss(
      jnp.asarray(t @ rotation.astype(np.float32)), jnp.asarray(t))), 0.0, atol=1e-7)
  # d/ds_i = 4 / (B (B - 1)) sum_{j != i} (s_i.s_j - t_i.t_j) s_j (the matrix is symmetric).
  s64, t64 = s.astype(np.float64), t.astype(np.float64)
  gap = s64 @ s64.T - t64 @ t64.T
  np.fill_diagonal(gap, 0.0)
  expected = 4 * gap @ s64 / (BATCH * (BATCH - 1))
  grad_s, grad_t = jax.grad(losses.similarity_matching_loss, argnums=(0, 1))(
      jnp.asarray(s), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(grad_s), expected, atol=1e-6)
  assert not np.asarray(grad_t).any()
  with pytest.raises(ValueError, match='batch of 2 or more, got 1'):
    losses.similarity_matching_loss(jnp.asarray(s[:1]), jnp.asarray(t[:1]))
