"""The BINGO contrastive loss (docs/method.md §6), the Table 9 baselines (KD, RKD) and the
(1+K)-way accuracy.

Every term is an InfoNCE cross-entropy ``CE(s, t)``: the logits of a student embedding ``s``
are ``[s.t, s.queue_1, ..., s.queue_K] / tau`` and the target is index 0. All embeddings are
L2-normalised ``(batch, dim)`` float32 arrays; the negative queue is ``(K, dim)``.

The negative part of the logits depends only on the student embedding, so each student
embedding's log-sum-exp over the queue is computed once and shared by the two teacher keys
it is compared with (the released code builds the ``(batch, 2, 1+K)`` logits twice).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

Scalar = Union[float, jax.Array]


def l2_normalize(x: jax.Array, epsilon: float = 1e-12) -> jax.Array:
  """Rows divided by their norm, as ``torch.nn.functional.normalize(x, dim=1)``.

  Args:
    x: ``(batch, dim)``.
    epsilon: lower bound of the norm (torch's default).
  Returns:
    ``(batch, dim)`` float32 rows of unit length.
  """
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, epsilon)


def negative_logits(student: jax.Array, negative_queue: jax.Array,
                    temperature: float) -> jax.Array:
  """``student . queue_j / tau`` for every queue entry.

  Args:
    student: ``(batch, dim)`` student embeddings.
    negative_queue: ``(K, dim)`` teacher keys of earlier batches.
    temperature: tau.
  Returns:
    ``(batch, K)`` float32 logits.
  """
  # The queue is a buffer, never a function of the parameters (``neg.clone().detach()``).
  negative_queue = jax.lax.stop_gradient(negative_queue)
  logits = jnp.einsum('bd,kd->bk', student.astype(jnp.float32),
                      negative_queue.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  return logits / temperature


def positive_logits(student: jax.Array, teacher_keys: jax.Array,
                    temperature: float) -> jax.Array:
  """``s_i . t_i / tau``: ``(batch, dim)`` x ``(batch, dim)`` -> ``(batch,)``."""
  return jnp.sum(student.astype(jnp.float32) * teacher_keys.astype(jnp.float32),
                 axis=-1) / temperature


def _cross_entropy(positive: jax.Array, negative_log_sum_exp: jax.Array) -> jax.Array:
  """CE with target 0 of logits ``[positive, negatives]`` given ``logsumexp(negatives)``."""
  return jnp.logaddexp(positive, negative_log_sum_exp) - positive


def info_nce(student: jax.Array, teacher_keys: jax.Array, negative_queue: jax.Array,
             temperature: float) -> jax.Array:
  """Per-example ``CE(s, t)`` of docs/method.md §6.

  Args:
    student: ``(batch, dim)`` L2-normalised student embeddings.
    teacher_keys: ``(batch, dim)`` L2-normalised teacher embeddings (the positives).
    negative_queue: ``(K, dim)`` L2-normalised negatives.
    temperature: tau (0.2 released for ResNet students, 0.12 for EfficientNet-B0).
  Returns:
    ``(batch,)`` float32 cross-entropies (not averaged).
  """
  negatives_lse = jax.nn.logsumexp(negative_logits(student, negative_queue, temperature), -1)
  return _cross_entropy(positive_logits(student, teacher_keys, temperature), negatives_lse)


def bingo_loss(anchor_embeddings: jax.Array, positive_embeddings: jax.Array,
               mixed_embeddings: Optional[jax.Array], anchor_teacher_keys: jax.Array,
               positive_teacher_keys: jax.Array, negative_queue: jax.Array,
               temperature: float, own_weight: Scalar, other_weight: Scalar,
               lam: Optional[Scalar] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The released BINGO loss (docs/method.md §6)::

    L = ( w_own CE(q,k) + w_oth CE(q,kp) + w_own CE(p,kp) + w_oth CE(p,k)
          + lam CE(m,k) + (1 - lam) CE(m,kp) ) / 3

  Args:
    anchor_embeddings: ``(batch, dim)`` q = S(query view of the anchor).
    positive_embeddings: ``(batch, dim)`` p = S(student view of the bag positive).
    mixed_embeddings: ``(batch, dim)`` m = S(CutMix of the two student views), or ``None``
      without CutMix: then the mix term is dropped and the sum divided by 2 (the mean of the
      two pairs).
    anchor_teacher_keys: ``(batch, dim)`` k = T(key view of the anchor).
    positive_teacher_keys: ``(batch, dim)`` kp = T(teacher view of the bag positive).
    negative_queue: ``(K, dim)``.
    temperature: tau.
    own_weight, other_weight: ``(w_own, w_oth)``: (1, 0) in the warm-up epochs
      (``config.train.own_key_warmup_epochs``), then (0.5, 0.5).
    lam: fraction of each mixed image that comes from the anchor's query view: a scalar (one
      box per batch) or ``(batch,)`` (one box per sample or per group).
  Returns:
    ``(loss, terms)``: the scalar loss and each batch-averaged CE term, keyed ``ce_q_k``,
    ``ce_q_kp``, ``ce_p_kp``, ``ce_p_k``, ``ce_m_k``, ``ce_m_kp``.
  """
  q, p, m = anchor_embeddings, positive_embeddings, mixed_embeddings
  k, kp = anchor_teacher_keys, positive_teacher_keys  # the formula's names, for the terms
  q_lse = jax.nn.logsumexp(negative_logits(q, negative_queue, temperature), -1)
  p_lse = jax.nn.logsumexp(negative_logits(p, negative_queue, temperature), -1)
  per_example = {
      'ce_q_k': _cross_entropy(positive_logits(q, k, temperature), q_lse),
      'ce_q_kp': _cross_entropy(positive_logits(q, kp, temperature), q_lse),
      'ce_p_kp': _cross_entropy(positive_logits(p, kp, temperature), p_lse),
      'ce_p_k': _cross_entropy(positive_logits(p, k, temperature), p_lse),
  }
  pair_loss = (own_weight * (per_example['ce_q_k'] + per_example['ce_p_kp'])
               + other_weight * (per_example['ce_q_kp'] + per_example['ce_p_k']))
  num_groups = 2
  if m is not None:
    if lam is None:
      raise ValueError('bingo_loss: mixed_embeddings are given but lam is None.')
    m_lse = jax.nn.logsumexp(negative_logits(m, negative_queue, temperature), -1)
    per_example['ce_m_k'] = _cross_entropy(positive_logits(m, k, temperature), m_lse)
    per_example['ce_m_kp'] = _cross_entropy(positive_logits(m, kp, temperature), m_lse)
    lam = jnp.asarray(lam, jnp.float32)
    pair_loss = pair_loss + lam * per_example['ce_m_k'] + (1 - lam) * per_example['ce_m_kp']
    num_groups = 3
  loss = jnp.mean(pair_loss) / num_groups
  return loss, {name: jnp.mean(value) for name, value in per_example.items()}


def paper_eq8_loss(anchor_embeddings: jax.Array, positive_embeddings: jax.Array,
                   anchor_teacher_keys: jax.Array, negative_queue: jax.Array,
                   temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The paper's Eq. 8/9 form: ``CE(q, k) + CE(p, k)``, both student views against the
  anchor's teacher key; no CutMix, no ``kp``.

  Args:
    anchor_embeddings: ``(batch, dim)`` q; positive_embeddings: ``(batch, dim)`` p;
    anchor_teacher_keys: ``(batch, dim)`` k; negative_queue: ``(K, dim)``;
    temperature: tau.
  Returns:
    ``(loss, {'ce_q_k', 'ce_p_k'})``, loss = mean CE(q,k) + mean CE(p,k).
  """
  terms = {'ce_q_k': jnp.mean(info_nce(anchor_embeddings, anchor_teacher_keys, negative_queue,
                                       temperature)),
           'ce_p_k': jnp.mean(info_nce(positive_embeddings, anchor_teacher_keys,
                                       negative_queue, temperature))}
  return terms['ce_q_k'] + terms['ce_p_k'], terms


def kd_l2_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Table 9's KD baseline: ``mean_i ||s_i - t_i||^2`` (squared Euclidean, batch mean).

  Args:
    student: ``(batch, dim)`` L2-normalised student embeddings (q).
    teacher: ``(batch, dim)`` L2-normalised teacher embeddings of the same images (tq).
  Returns:
    float32 scalar in [0, 4] (``2 - 2 s.t`` per pair of unit vectors).
  """
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  difference = student.astype(jnp.float32) - teacher
  return jnp.mean(jnp.sum(jnp.square(difference), axis=-1))


def cosine_similarity_matrix(embeddings: jax.Array) -> jax.Array:
  """``(batch, dim)`` L2-normalised rows -> ``(batch, batch)`` float32 inner products."""
  embeddings = embeddings.astype(jnp.float32)
  return jnp.einsum('id,jd->ij', embeddings, embeddings, precision=jax.lax.Precision.HIGHEST)


def similarity_matching_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Table 9's RKD baseline, similarity-preserving form: the student's in-batch cosine-
  similarity matrix matched to the teacher's.

  ``mean over i != j of (s_i.s_j - t_i.t_j)^2``: the diagonal (1 for both) is left out, so the
  value is the mean squared error of the B(B-1) relations. Not RKD's distance or angle terms.

  Args:
    student: ``(batch, dim)`` L2-normalised student embeddings (q), batch >= 2.
    teacher: ``(batch, dim)`` L2-normalised teacher embeddings of the same images (tq).
  Returns:
    float32 scalar.
  """
  batch = student.shape[0]
  if batch < 2:
    raise ValueError(f'similarity_matching_loss needs a batch of 2 or more, got {batch}.')
  gap = (cosine_similarity_matrix(student)
         - jax.lax.stop_gradient(cosine_similarity_matrix(teacher)))
  off_diagonal = 1.0 - jnp.eye(batch, dtype=jnp.float32)
  return jnp.sum(jnp.square(gap) * off_diagonal) / (batch * (batch - 1))


def accuracy_topk(logits: jax.Array, labels: jax.Array,
                  topk: Sequence[int] = (1, 5)) -> list[jax.Array]:
  """Top-k accuracy in percent, as the released ``utils.accuracy``, but robust to ties.

  A prediction counts as correct for ``k`` when fewer than ``k`` other logits are greater
  than *or equal to* the label's logit, or NaN. Ties count against the label: the released
  ``topk`` breaks a tie by position, and the positive sits at index 0 of the contrastive
  logits, so collapsed (all-equal) or NaN embeddings read 100% top-1 there
  (docs/method.md §6). Counting avoids sorting the 65537 logits.

  Args:
    logits: ``(batch, classes)``.
    labels: ``(batch,)`` int class indices.
    topk: the k values.
  Returns:
    One float32 scalar in [0, 100] per k.
  """
  label_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)
  # ~(x < label) holds for x >= label and for NaN on either side; the label's own logit is
  # one of them (also when it is NaN), hence the - 1.
  rank = jnp.sum(~(logits < label_logit), axis=-1) - 1
  return [100.0 * jnp.mean((rank < k).astype(jnp.float32)) for k in topk]


def contrastive_accuracy(student: jax.Array, teacher_keys: jax.Array,
                         negative_queue: jax.Array, temperature: float,
                         topk: Sequence[int] = (1, 5)) -> list[jax.Array]:
  """Top-k accuracy (percent) of the (1+K)-way classifier of ``student`` against its key.

  Args:
    student: ``(batch, dim)``; teacher_keys: ``(batch, dim)``; negative_queue: ``(K, dim)``;
    temperature: tau; topk: the k values.
  Returns:
    One float32 scalar per k (released log: q against k, docs/method.md §6).
  """
  logits = jnp.concatenate(
      [positive_logits(student, teacher_keys, temperature)[:, None],
       negative_logits(student, negative_queue, temperature)], axis=-1)
  return accuracy_topk(logits, jnp.zeros((student.shape[0],), jnp.int32), topk)
