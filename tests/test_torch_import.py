"""Reading reference PyTorch checkpoints into Flax variables (lcmt_jax.torch_import)."""

import sys

import jax
import numpy as np
import pytest

# Only the optional third-party torch may skip this module; an import of our own
# modules that fails is an error, not a skip.
torch = pytest.importorskip(
    'torch', reason='torch is needed only to test importing PyTorch checkpoints')

from lcmt_jax import models  # pylint: disable=wrong-import-position
from lcmt_jax import torch_import  # pylint: disable=wrong-import-position
from lcmt_jax.testing import torch_reference  # pylint: disable=wrong-import-position

WIDTH = 16
CONV_INDICES = (1, 3, 5, 9, 11, 13, 17, 19, 21)
FLAX_NAMES = ('conv1a', 'conv1b', 'conv1c', 'conv2a', 'conv2b', 'conv2c',
              'conv3a', 'conv3b', 'conv3c', 'dense')


@pytest.fixture(name='state_dict')
def fixture_state_dict():
  """A width-16 reference model's state dict with every entry random, so swaps show."""
  torch.manual_seed(0)
  model = torch_reference.ConvLarge(width=WIDTH)
  with torch.no_grad():
    for tensor in model.state_dict().values():
      tensor.copy_(torch.randn_like(tensor))
  return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_matches_torch(variables, state_dict):
  """Every Flax array equals the torch tensor, transposed by hand (not via the module's table)."""
  torch_prefixes = [f'conv_blocks.{i}' for i in CONV_INDICES] + ['fc']
  assert sorted(variables['params']) == sorted(FLAX_NAMES)
  assert sorted(variables['batch_stats']) == sorted(FLAX_NAMES)
  for prefix, name in zip(torch_prefixes, FLAX_NAMES):
    weight = state_dict[f'{prefix}.weight'].numpy()
    expected_v = weight.transpose(2, 3, 1, 0) if name != 'dense' else weight.T
    params = variables['params'][name]
    assert sorted(params) == ['b', 'g', 'v']
    np.testing.assert_array_equal(params['v'], expected_v)
    np.testing.assert_array_equal(params['g'], state_dict[f'{prefix}.weight_scale'].numpy())
    np.testing.assert_array_equal(params['b'], state_dict[f'{prefix}.bias'].numpy())
    np.testing.assert_array_equal(variables['batch_stats'][name]['mean'],
                                  state_dict[f'{prefix}.running_mean'].numpy())


def test_loads_saved_checkpoint_from_path(state_dict, tmp_path):
  path = tmp_path / 'model.pth'
  torch.save(state_dict, path)
  variables = torch_import.load_reference_state_dict(path)
  _assert_matches_torch(variables, state_dict)
  assert variables['params']['conv1a']['v'].shape == (3, 3, 3, WIDTH)
  assert variables['params']['conv3b']['v'].shape == (1, 1, 4 * WIDTH, 2 * WIDTH)
  assert variables['params']['dense']['v'].shape == (WIDTH, 10)


def test_loads_wrapped_checkpoint_from_path_as_string(state_dict, tmp_path):
  path = tmp_path / 'checkpoint.pth.tar'
  torch.save({'epoch': 7, 'state_dict': state_dict, 'best_prec1': 0.5}, path)
  _assert_matches_torch(torch_import.load_reference_state_dict(str(path)), state_dict)


def test_loads_data_parallel_dict(state_dict):
  prefixed = {f'module.{k}': v for k, v in state_dict.items()}
  variables = torch_import.load_reference_state_dict({'state_dict': prefixed})
  _assert_matches_torch(variables, state_dict)


def test_round_trip_into_reference_model(state_dict):
  variables = torch_import.load_reference_state_dict(state_dict)
  arrays = torch_import.to_reference_state_dict(variables)
  model = torch_reference.ConvLarge(width=WIDTH)
  model.load_state_dict(torch_reference.load_numpy_state_dict(arrays), strict=True)
  for k, v in model.state_dict().items():
    torch.testing.assert_close(v, state_dict[k], rtol=0, atol=0)


def test_layout_matches_flax_model(state_dict):
  flax_vars = jax.eval_shape(lambda: models.ConvLarge(width=WIDTH).init(
      jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False))
  imported = torch_import.load_reference_state_dict(state_dict)
  for collection in ('params', 'batch_stats'):
    expected = jax.tree.map(lambda x: x.shape, flax_vars[collection])
    assert jax.tree.map(lambda x: x.shape, imported[collection]) == expected


@pytest.mark.parametrize('bad_key', ['conv_blocks.2.weight', 'fc.num_batches_tracked'])
def test_unexpected_key_is_named(state_dict, bad_key):
  state_dict[bad_key] = torch.zeros(3)
  with pytest.raises(ValueError, match=bad_key.replace('.', r'\.')):
    torch_import.load_reference_state_dict(state_dict)


@pytest.mark.parametrize('missing_key', ['fc.bias', 'conv_blocks.13.running_mean'])
def test_missing_key_is_named(state_dict, missing_key):
  del state_dict[missing_key]
  with pytest.raises(ValueError, match=missing_key.replace('.', r'\.')):
    torch_import.load_reference_state_dict(state_dict)


@pytest.mark.parametrize('key, shape', [
    ('conv_blocks.3.weight_scale', (WIDTH + 1,)),
    ('conv_blocks.9.weight', (2 * WIDTH, WIDTH + 1, 3, 3)),  # wrong input channels
    ('conv_blocks.19.weight', (2 * WIDTH, 4 * WIDTH, 3, 3)),  # 3x3 where 1x1 belongs
    ('fc.weight', (10, WIDTH, 1, 1)),
    ('fc.running_mean', (10, 2)),
])
def test_bad_shape_is_named(state_dict, key, shape):
  state_dict[key] = torch.zeros(shape)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    torch_import.load_reference_state_dict(state_dict)


def test_accepts_scale_with_trailing_unit_axes(state_dict):
  g = state_dict['conv_blocks.1.weight_scale']
  state_dict['conv_blocks.1.weight_scale'] = g.view(-1, 1, 1, 1)
  variables = torch_import.load_reference_state_dict(state_dict)
  np.testing.assert_array_equal(variables['params']['conv1a']['g'], g.numpy())


def test_path_without_torch_asks_for_torch(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` fail
  with pytest.raises(ImportError, match='torch is needed only for importing PyTorch'):
    torch_import.load_reference_state_dict(tmp_path / 'model.pth')


def test_numpy_state_dict_needs_no_torch(state_dict, monkeypatch):
  arrays = {k: v.numpy() for k, v in state_dict.items()}
  monkeypatch.setitem(sys.modules, 'torch', None)
  _assert_matches_torch(torch_import.load_reference_state_dict(arrays), state_dict)
