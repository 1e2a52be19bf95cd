"""PyTorch checkpoint files: reading and recognising their layouts, converting, writing.

Layouts read (``--format``; detected automatically when not given):

* ``moco``: MoCo v1/v2 ``main_moco.py`` checkpoints, ``{'state_dict': {'module.encoder_q.*',
  'module.encoder_k.*', 'module.queue', 'module.queue_ptr'}, 'epoch', 'arch', 'optimizer'}``.
  The query encoder ``encoder_q`` is the model (``encoder`` picks another one, e.g. the
  teacher ``encoder_k`` of a released-BINGO training checkpoint). MoCo v2's head is the MLP
  ``fc.0``/``fc.2``; MoCo v1's is a single ``fc`` Linear(2048, 128), converted as a ``linear``
  head with 128 outputs.
* ``swav``: SwAV releases, a flat ``{'module.conv1.weight', ..., 'module.projection_head.0/1/3.*',
  'module.prototypes.weight'}``; the prototypes are not part of the model and are dropped.
* ``torchvision``: a flat ResNet state dict (``conv1.weight``, ..., ``fc.weight``); ``fc`` is a
  ``linear`` head with ``num_classes`` outputs.
* ``efficientnet``: an ``efficientnet_pytorch`` EfficientNet-B0 state dict (``_conv_stem``,
  ``_blocks.N``, ``_conv_head``, ``_bn1``, ``_fc``).

Each may also come without the ``module.`` prefix and/or wrapped in ``{'state_dict': ...}``.
Files are read with ``torch.load(weights_only=True)``: no pickled code runs.

Layouts written (``export_torch_layout``): the same four, canonical (``moco``:
``{'state_dict': {'module.encoder_q.*'}, 'arch'}``; ``swav``: flat with ``module.``;
``torchvision`` and ``efficientnet``: flat, no prefix).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
from typing import Any, Mapping, Optional, Union

import numpy as np

from bingo_jax.store import fileio
from bingo_jax.store import model_io
from bingo_jax.torch_io import mapping as torch_mapping
from bingo_jax.torch_io.mapping.common import describe_keys

FORMATS = ('moco', 'swav', 'torchvision', 'efficientnet')
EXPORT_FORMATS = FORMATS
MODULE_PREFIX = 'module.'
# torch names of the architectures (the 'arch' entry of MoCo checkpoints).
_TORCH_ARCH_NAMES = {'efficientnet_b0': 'efficientnet-b0'}


class CheckpointError(ValueError):
  """A file that is not a usable PyTorch checkpoint; the message names the file and keys."""


@dataclasses.dataclass
class TorchModelState:
  """The tensors of one model inside a checkpoint file.

  Attributes:
    state_dict: unprefixed torch key -> numpy array (memory-mapped where possible).
    source_format: one of ``FORMATS``.
    layout: how the file wrapped them: ``wrapped_in_state_dict``, ``module_prefix``,
      ``encoder`` (MoCo layout only).
    ignored_keys: keys of the file that are not part of the model (``encoder_k.*``,
      ``queue``, ``prototypes.weight``...).
    extra: non-tensor top-level entries worth recording (``epoch``, ``arch``).
  """
  state_dict: dict
  source_format: str
  layout: dict
  ignored_keys: list
  extra: dict


def read_checkpoint(path: str) -> Mapping:
  """``torch.load`` of a file, safely (``weights_only=True``), with errors naming the file.

  Args:
    path: a ``.pth`` / ``.pth.tar`` file.
  Returns:
    The loaded top-level mapping (tensors memory-mapped when the file allows it).
  Raises:
    FileNotFoundError, CheckpointError.
  """
  import torch  # PyTorch is only needed at the PyTorch boundary
  if not fileio.isfile(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file.')
  try:
    if fileio.is_url(path):  # read whole: torch.load needs a seekable file
      with fileio.open_file(path, 'rb') as f:
        data = io.BytesIO(f.read())
      checkpoint = torch.load(data, map_location='cpu', weights_only=True)
    else:
      checkpoint = _load_local(torch, path)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
    raise CheckpointError(
        f'{path} is not a PyTorch checkpoint that can be read safely ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}). Files are read with '
        f'torch.load(weights_only=True); re-save the state dict of a trusted file if it '
        f'holds pickled Python objects.') from e
  if not isinstance(checkpoint, Mapping):
    raise CheckpointError(f'{path} is not a checkpoint: torch.load gave a '
                          f'{type(checkpoint).__name__}, expected a dict of tensors.')
  return checkpoint


def _load_local(torch, path: str) -> Any:
  try:
    return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
  except RuntimeError as e:
    if 'mmap' not in str(e):
      raise
    # Files in torch's legacy (pre-1.6) serialisation cannot be memory-mapped.
    return torch.load(path, map_location='cpu', weights_only=True)


def _is_tensor(value) -> bool:
  return hasattr(value, 'detach') and hasattr(value, 'shape')


def _to_numpy(tensor) -> np.ndarray:
  tensor = tensor.detach()
  if tensor.dtype.is_floating_point and str(tensor.dtype) != 'torch.float32':
    tensor = tensor.float()
  return tensor.cpu().numpy()


def extract_model_state(checkpoint: Mapping, source: str, source_format: Optional[str] = None,
                        encoder: str = 'encoder_q') -> TorchModelState:
  """Finds the model's tensors in a loaded checkpoint and removes the wrappers.

  Args:
    checkpoint: what ``read_checkpoint`` returned.
    source: the file name, for error messages.
    source_format: one of ``FORMATS``, or None to detect it.
    encoder: the MoCo encoder to take (``encoder_q``: the trained query encoder).
  Returns:
    A ``TorchModelState``.
  Raises:
    CheckpointError: naming the file and keys, for an unknown or inconsistent layout.
  """
  if source_format is not None and source_format not in FORMATS:
    raise CheckpointError(f'{source}: unknown --format {source_format!r}; expected one of '
                          f'{", ".join(FORMATS)}.')
  wrapped = isinstance(checkpoint.get('state_dict'), Mapping)
  inner = checkpoint['state_dict'] if wrapped else checkpoint
  tensors = {k: v for k, v in inner.items() if isinstance(k, str) and _is_tensor(v)}
  if not tensors:
    raise CheckpointError(f'{source} holds no tensors (top-level keys: '
                          f'{describe_keys(map(str, checkpoint))}); it is not a model checkpoint.')
  extra = {k: checkpoint[k] for k in ('epoch', 'arch') if wrapped and k in checkpoint
           and isinstance(checkpoint[k], (int, str))}
  ignored = sorted(str(k) for k in inner if k not in tensors)
  module_prefix = all(k.startswith(MODULE_PREFIX) for k in tensors)
  if module_prefix:
    tensors = {k[len(MODULE_PREFIX):]: v for k, v in tensors.items()}

  detected = _detect_format(tensors)
  if source_format is None:
    if detected is None:
      raise CheckpointError(
          f'{source}: unknown checkpoint layout; expected MoCo (encoder_q.*), SwAV '
          f'(projection_head.*, prototypes), torchvision ResNet (conv1.weight, layer1.0.*) or '
          f'efficientnet_pytorch (_conv_stem.weight) tensors, found: {describe_keys(tensors)}. '
          f'Name the layout with --format if it is one of these.')
    source_format = detected

  if source_format == 'moco':
    prefix = f'{encoder}.'
    model = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not model:
      encoders = sorted({k.split('.', 1)[0] for k in tensors if k.startswith('encoder_')})
      raise CheckpointError(f'{source}: --format moco expects tensors named '
                            f'{"module." if module_prefix else ""}{prefix}*, found none '
                            f'(encoders present: {encoders or "none"}; keys: '
                            f'{describe_keys(tensors)}).')
    ignored += sorted(k for k in tensors if not k.startswith(prefix))
  elif source_format == 'swav':
    model = {k: v for k, v in tensors.items() if not k.startswith('prototypes')}
    ignored += sorted(k for k in tensors if k.startswith('prototypes'))
  else:
    model = dict(tensors)
  if source_format != 'moco' and any(k.startswith('encoder_q.') for k in model):
    raise CheckpointError(f'{source}: --format {source_format} given, but the tensors are '
                          f'MoCo encoders ({describe_keys(model)}); use --format moco.')
  layout = {'wrapped_in_state_dict': wrapped, 'module_prefix': module_prefix}
  if source_format == 'moco':
    layout['encoder'] = encoder
  return TorchModelState(state_dict={k: _to_numpy(v) for k, v in model.items()},
                         source_format=source_format, layout=layout, ignored_keys=ignored,
                         extra=extra)


def _detect_format(tensors: Mapping[str, Any]) -> Optional[str]:
  if any(k.startswith('encoder_q.') for k in tensors):
    return 'moco'
  if any(k.startswith(('projection_head.', 'prototypes')) for k in tensors):
    return 'swav'
  if '_conv_stem.weight' in tensors:
    return 'efficientnet'
  if 'conv1.weight' in tensors and any(k.startswith('layer1.') for k in tensors):
    return 'torchvision'
  return None


def sha256_of(path: str, chunk_bytes: int = 1 << 24) -> str:
  digest = hashlib.sha256()
  with fileio.open_file(path, 'rb') as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
  return digest.hexdigest()


@dataclasses.dataclass
class ConvertedModel:
  """A PyTorch checkpoint as bingo_jax variables (what a model file stores)."""
  model_config: dict
  variables: dict
  metadata: dict


def convert_torch_checkpoint(path: str, source_format: Optional[str] = None,
                             arch: Optional[str] = None, head: Optional[str] = None,
                             encoder: str = 'encoder_q',
                             allow_non_finite: bool = False) -> ConvertedModel:
  """Reads a PyTorch checkpoint file and converts its model exactly.

  Args:
    path: the checkpoint file.
    source_format: one of ``FORMATS`` or None (detect).
    arch: ``create_model`` architecture, or None (infer from the tensor shapes).
    head: None (keep the head found), 'none' (drop it), or 'moco'/'swav'/'linear' (require).
    encoder: MoCo layout only: which encoder to convert.
    allow_non_finite: convert tensors holding NaN or Inf (refused by default: such a teacher
      embeds every image alike, and its bags are of chance purity).
  Returns:
    ``ConvertedModel``: model config, ``{'params', 'batch_stats'}`` numpy variables, and the
    metadata record (arch, head, source file, format, sha256, ...).
  Raises:
    FileNotFoundError, CheckpointError / ValueError naming the file and offending keys.
  """
  source = fileio.absolute(path)
  state = extract_model_state(read_checkpoint(path), source, source_format, encoder)
  model_config, head_spec = torch_mapping.infer_model_config(state.state_dict, source,
                                                             arch=arch, head=head)
  tensors = {k: v for k, v in state.state_dict.items() if k not in set(head_spec.dropped_keys)}
  if not allow_non_finite:
    bad = sorted(k for k, v in tensors.items()
                 if np.issubdtype(np.asarray(v).dtype, np.inexact) and not np.isfinite(v).all())
    if bad:
      raise ValueError(
          f'{source}: {len(bad)} of {len(tensors)} tensors hold NaN or Inf ('
          + ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
          + '): a diverged or damaged checkpoint. Pass --allow_non_finite to convert it anyway.')
  variables = torch_mapping.torch_to_flax(tensors, model_config, source=source,
                                          head_prefix=head_spec.torch_prefix)
  metadata = {
      'arch': model_config['arch'],
      'head': model_config.get('head'),
      'source_file': source,
      'source_format': state.source_format,
      'source_sha256': sha256_of(path),
      'source_layout': state.layout,
      'source_head_name': head_spec.torch_prefix,
      'dropped_head_tensors': list(head_spec.dropped_keys),
      'ignored_tensors': _summarise_keys(state.ignored_keys),
      'num_batches_tracked': torch_mapping.num_batches_tracked_of(
          tensors, model_config, head_spec.torch_prefix),
      **{f'source_{k}': v for k, v in state.extra.items()},
  }
  return ConvertedModel(model_config, variables, metadata)


def _summarise_keys(keys: list[str]) -> list[str]:
  """Groups ``encoder_k.*`` style keys so that the record stays short."""
  groups: dict[str, int] = collections.Counter(k.split('.', 1)[0] for k in keys)
  return [f'{name}.* ({count} tensors)' if count > 1 else
          next(k for k in keys if k.split('.', 1)[0] == name) for name, count in groups.items()]


def convert_to_model_file(source: str, destination: str, source_format: Optional[str] = None,
                          arch: Optional[str] = None, head: Optional[str] = None,
                          encoder: str = 'encoder_q', overwrite: bool = False,
                          allow_non_finite: bool = False) -> ConvertedModel:
  """``convert_torch_checkpoint`` + ``model_io.save_model`` (atomic). Returns the conversion.

  Raises:
    ValueError: also for tensors holding NaN or Inf (named by their PyTorch keys), unless
      ``allow_non_finite``.
    FileExistsError: ``destination`` exists and is not a model file (even with ``overwrite``).
  """
  destination = fileio.absolute(destination)
  if fileio.exists(destination) and overwrite and not fileio.isfile(
      fileio.join(destination, model_io.MODEL_RECORD)):
    # Checked before the (possibly long) conversion too; save_model checks again.
    raise FileExistsError(
        f'{destination} exists and is not a bingo_jax model file ({model_io.MODEL_RECORD} '
        'missing); --overwrite only replaces a model file. Give a new destination path.')
  converted = convert_torch_checkpoint(source, source_format, arch, head, encoder,
                                       allow_non_finite=allow_non_finite)
  model_io.save_model(destination, converted.model_config, converted.variables,
                      metadata=converted.metadata, overwrite=overwrite,
                      allow_non_finite=allow_non_finite)
  return converted


def torch_layout_state_dict(variables: Mapping, model_config: Mapping, export_format: str,
                            drop_head: bool = False,
                            num_batches_tracked: Union[None, int, Mapping[str, int]] = None
                            ) -> dict:
  """The object to ``torch.save`` for one export layout (tensors as numpy arrays).

  Args:
    variables: ``{'params', 'batch_stats'}`` of ``create_model(**model_config)``.
    model_config: ``create_model`` arguments.
    export_format: 'torchvision' (flat; linear head ``fc``, MoCo MLP ``fc.0``/``fc.2``, SwAV
      ``projection_head.0/1/3``), 'moco' (``{'state_dict': {'module.encoder_q.*'}, 'arch'}``,
      every head under ``fc``: ``fc``, ``fc.0``/``fc.2``, or ``fc.0``/``fc.1``/``fc.3`` for the
      SwAV head as the released BINGO code names it), 'swav' (flat, ``module.`` prefix, head
      ``projection_head``), 'efficientnet' (flat; ``_fc``, ``_fc.0``/``_fc.2``).
    drop_head: leave the head out (a pure backbone).
    num_batches_tracked: BatchNorm counters to write back: one int or a dict (default 0).
  Returns:
    A dict of numpy arrays (``{'state_dict': ..., 'arch': ...}`` for 'moco').
  """
  arch = model_config['arch']
  efficientnet = torch_mapping.is_efficientnet(arch)
  if export_format not in EXPORT_FORMATS:
    raise ValueError(f'Unknown export format {export_format!r}; expected one of '
                     f'{", ".join(EXPORT_FORMATS)}.')
  if efficientnet and export_format in ('torchvision', 'swav'):
    raise ValueError(f'{arch} has no {export_format} layout; export it with --format '
                     f'efficientnet or --format moco.')
  if not efficientnet and export_format == 'efficientnet':
    raise ValueError(f'{arch} is a ResNet; --format efficientnet is for efficientnet_b0.')
  config = dict(model_config)
  head = config.get('head')
  if drop_head or head in (None, 'none'):
    config['head'] = None
    head = None
    variables = {c: {k: v for k, v in tree.items() if k != 'head'}
                 for c, tree in variables.items()}
  head_prefix = None
  if export_format == 'moco' and head is not None:
    head_prefix = 'fc'
  elif export_format in ('torchvision', 'swav') and head is not None:
    head_prefix = 'projection_head' if head == 'swav' else 'fc'
  state = torch_mapping.flax_to_torch(variables, config, head_prefix=head_prefix,
                                      num_batches_tracked=num_batches_tracked)
  if export_format == 'moco':
    return {'state_dict': collections.OrderedDict(
                (f'{MODULE_PREFIX}encoder_q.{k}', v) for k, v in state.items()),
            'arch': _TORCH_ARCH_NAMES.get(arch, arch)}
  if export_format == 'swav':
    return collections.OrderedDict((MODULE_PREFIX + k, v) for k, v in state.items())
  return state


def _to_torch(tree):
  import torch
  if isinstance(tree, Mapping):
    return collections.OrderedDict((k, _to_torch(v)) for k, v in tree.items())
  if isinstance(tree, np.ndarray):
    # np.require keeps 0-d arrays 0-d; 'W' copies read-only (memory-mapped) arrays.
    return torch.from_numpy(np.require(tree, requirements=['C', 'W']))
  return tree


def save_torch(obj: Any, path: str, overwrite: bool = False) -> str:
  """``torch.save`` of ``obj`` (numpy arrays become tensors), atomically: written to a
  temporary file in the same directory, then renamed over ``path``. Returns the path."""
  import torch
  path = fileio.absolute(path)
  if fileio.exists(path) and not overwrite:
    raise FileExistsError(f'{path} already exists; pass --overwrite to replace it.')
  if fileio.exists(path) and fileio.isdir(path):
    raise FileExistsError(f'{path} exists and is not a file (a directory?); --overwrite only '
                          'replaces a file. Give a new destination path.')
  # Serialised in memory first: torch.save into a file that cannot take the bytes (a full
  # disk) fails with 'RuntimeError: [enforce fail at inline_container.cc] unexpected pos',
  # while a plain write fails with the OSError that names the cause.
  serialised = io.BytesIO()
  torch.save(_to_torch(obj), serialised)
  return fileio.atomic_write(path, lambda f: f.write(serialised.getbuffer()))


def export_torch_checkpoint(loaded: model_io.LoadedModel, path: str, export_format: str,
                            drop_head: bool = False, overwrite: bool = False) -> dict:
  """Writes a loaded bingo_jax model (converted teacher or trained student) as a PyTorch file.

  Args:
    loaded: ``model_io.load_model`` / ``checkpointing.load_any`` result.
    path: destination ``.pth`` file (written atomically).
    export_format: see ``torch_layout_state_dict``.
    drop_head: write the backbone only.
    overwrite: replace an existing file.
  Returns:
    The exported object (numpy arrays), e.g. for inspection.
  """
  # A converted teacher keeps the counters of its source; a trained student has none.
  counts = loaded.metadata.get('num_batches_tracked', 0)
  obj = torch_layout_state_dict(jax_to_numpy(loaded.variables), loaded.model_config,
                                export_format, drop_head=drop_head, num_batches_tracked=counts)
  save_torch(obj, path, overwrite=overwrite)
  return obj


def jax_to_numpy(tree):
  if isinstance(tree, Mapping):
    return {k: jax_to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
