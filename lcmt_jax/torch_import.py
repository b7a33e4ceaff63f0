"""Read checkpoints saved by the reference PyTorch code as Flax variables.

The reference's ConvLarge keeps its nine convs in an `nn.Sequential` named
`conv_blocks` (at indices 1, 3, 5, 9, 11, 13, 17, 19, 21) and its last layer as
`fc`; each layer stores `weight` (v; OIHW for convs, (out, in) for `fc`),
`weight_scale` (g), `bias` (b) and the buffer `running_mean`. In
`lcmt_jax.models.ConvLarge` the same layers are `conv1a` ... `conv3c` and
`dense`, with `v` in HWIO (convs) or (in, out) (dense), `g`, `b` under
`params` and `mean` under `batch_stats`.

torch is optional: it is imported only to read a checkpoint file.
"""

from collections.abc import Mapping
import os

import numpy as np

# (torch module prefix, Flax module name, kernel size); network order.
LAYERS = (
    ('conv_blocks.1', 'conv1a', (3, 3)),
    ('conv_blocks.3', 'conv1b', (3, 3)),
    ('conv_blocks.5', 'conv1c', (3, 3)),
    ('conv_blocks.9', 'conv2a', (3, 3)),
    ('conv_blocks.11', 'conv2b', (3, 3)),
    ('conv_blocks.13', 'conv2c', (3, 3)),
    ('conv_blocks.17', 'conv3a', (3, 3)),
    ('conv_blocks.19', 'conv3b', (1, 1)),
    ('conv_blocks.21', 'conv3c', (1, 1)),
    ('fc', 'dense', ()),
)

# (torch name within a layer, Flax collection, Flax name).
FIELDS = (
    ('weight', 'params', 'v'),
    ('weight_scale', 'params', 'g'),
    ('bias', 'params', 'b'),
    ('running_mean', 'batch_stats', 'mean'),
)

_TORCH_INSTALL_HINT = ('torch is needed only for importing PyTorch checkpoints; install the CPU '
                       'build, e.g. `pip install torch --index-url '
                       'https://download.pytorch.org/whl/cpu`')


def _to_flax_kernel(weight: np.ndarray) -> np.ndarray:
  """OIHW -> HWIO, or (out, in) -> (in, out)."""
  axes = (2, 3, 1, 0) if weight.ndim == 4 else (1, 0)
  return np.ascontiguousarray(weight.transpose(axes))


def _to_torch_kernel(v: np.ndarray) -> np.ndarray:
  """HWIO -> OIHW, or (in, out) -> (out, in)."""
  axes = (3, 2, 0, 1) if v.ndim == 4 else (1, 0)
  return np.ascontiguousarray(v.transpose(axes))


def _read_checkpoint(path) -> Mapping:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(_TORCH_INSTALL_HINT) from e
  return torch.load(path, map_location='cpu', weights_only=True)


def _as_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; avoids importing torch here
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _unwrap(checkpoint: Mapping, key: str) -> dict[str, np.ndarray]:
  """Takes `checkpoint[key]` when present and strips DataParallel's `module.` prefixes."""
  state = checkpoint.get(key, checkpoint)
  if not isinstance(state, Mapping):
    raise ValueError(f'checkpoint entry {key!r} is a {type(state).__name__}, not a state dict')
  return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}


def _check_shapes(state: Mapping[str, np.ndarray]) -> None:
  """Each layer's weight matches its kernel size and the previous layer's output count."""
  previous_out = None
  for prefix, _, kernel_size in LAYERS:
    key = f'{prefix}.weight'
    weight = state[key]
    if weight.ndim != 2 + len(kernel_size) or tuple(weight.shape[2:]) != kernel_size:
      kind = f'{kernel_size[0]}x{kernel_size[1]} conv (out, in, kh, kw)' if kernel_size else (
          'linear (out, in)')
      raise ValueError(f'{key}: shape {tuple(weight.shape)} is not a {kind} weight')
    if previous_out is not None and weight.shape[1] != previous_out:
      raise ValueError(f'{key}: shape {tuple(weight.shape)} has {weight.shape[1]} inputs but '
                       f'the previous layer has {previous_out} outputs')
    previous_out = weight.shape[0]
    for name, _, _ in FIELDS[1:]:
      key = f'{prefix}.{name}'
      shape = tuple(state[key].shape)
      # Accepts (out,) and also (out, 1, ..., 1), a layout some ports use for g.
      if not shape or shape[0] != previous_out or any(n != 1 for n in shape[1:]):
        raise ValueError(f'{key}: shape {shape} does not match the layer\'s {previous_out} '
                         'outputs')


def load_reference_state_dict(state_dict_or_path, *, key: str = 'state_dict') -> dict:
  """Flax `{'params': ..., 'batch_stats': ...}` for `models.ConvLarge` from a reference checkpoint.

  Args:
    state_dict_or_path: a state dict (torch tensors or NumPy arrays, keys
      optionally prefixed `module.` by DataParallel), a checkpoint dict holding
      one under `key`, or the path of a file saved with `torch.save`.
    key: the entry of a checkpoint dict that holds the state dict; the
      reference's `save_checkpoint` uses 'state_dict'.

  Returns:
    Nested dicts of float NumPy arrays; width and class count follow the checkpoint.

  Raises:
    ImportError: a path is given and torch is not installed.
    ValueError: a key is missing or unexpected, or a shape does not fit.
  """
  if isinstance(state_dict_or_path, (str, os.PathLike)):
    state_dict_or_path = _read_checkpoint(state_dict_or_path)
  if not isinstance(state_dict_or_path, Mapping):
    raise ValueError(f'expected a state dict or a path, got {type(state_dict_or_path).__name__}')
  state = _unwrap(state_dict_or_path, key)

  expected = [f'{prefix}.{name}' for prefix, _, _ in LAYERS for name, _, _ in FIELDS]
  for k in expected:
    if k not in state:
      raise ValueError(f'missing key {k!r} in the reference checkpoint')
  for k in state:
    if k not in expected:
      raise ValueError(f'unexpected key {k!r} in the reference checkpoint '
                       '(not a ConvLarge parameter or running mean)')
  state = {k: _as_numpy(v) for k, v in state.items()}
  _check_shapes(state)

  variables = {'params': {}, 'batch_stats': {}}
  for prefix, module, _ in LAYERS:
    for name, collection, flax_name in FIELDS:
      value = state[f'{prefix}.{name}']
      value = _to_flax_kernel(value) if name == 'weight' else value.reshape(-1)
      variables[collection].setdefault(module, {})[flax_name] = value
  return variables


def to_reference_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
  """The inverse of `load_reference_state_dict`: torch-layout NumPy arrays keyed like the reference.

  Feed it to the reference model with
  `model.load_state_dict({k: torch.as_tensor(v) for k, v in result.items()})`.
  """
  state = {}
  for prefix, module, _ in LAYERS:
    for name, collection, flax_name in FIELDS:
      value = np.asarray(variables[collection][module][flax_name])
      state[f'{prefix}.{name}'] = _to_torch_kernel(value) if name == 'weight' else value
  return state
