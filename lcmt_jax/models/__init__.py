"""The networks, registered by name, and what the training code needs of any of them.

A network is a Flax module called as `model(images, train=...)` that
- returns the logits (float32);
- sows its pooled feature vector, the one local clustering acts on, with
  `self.sow('intermediates', FEATURES, features)`;
- keeps any running statistics in the `batch_stats` collection and updates
  them in train mode (apply with `mutable=['batch_stats']`);
- draws dropout from the 'dropout' RNG stream, if it has dropout.
A network whose class sets `data_dependent_init = True` also accepts
`init_mode=True`, the pass `initialize` runs once to set its scales from a
batch (ConvLarge: docs/reference.md "Model").

`MODELS` maps `config.model` to a constructor taking the keyword arguments
`create_model` passes; adding a backbone is one module and one entry here.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcmt_jax.models.convlarge import ConvLarge
from lcmt_jax.models.convlarge import WeightNormMeanOnlyBN
from lcmt_jax.models.wide_resnet import WideResNet

FEATURES = 'features'

MODELS: dict[str, Callable[..., nn.Module]] = {
    'convlarge': ConvLarge,
    'wrn28_2': WideResNet,
}


@functools.cache
def create_model(name: str, *, num_classes: int, width: int, dropout_rate: float,
                 bn_momentum: float, dtype: str) -> nn.Module:
  """The network `name` of `MODELS`; `width` is the size of its feature vector.

  Cached: equal settings give the same object, so train states built for equal
  runs have equal static fields and share jit's compiled functions.
  """
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}: one of {sorted(MODELS)}')
  return MODELS[name](num_classes=num_classes, width=width, dropout_rate=dropout_rate,
                      bn_momentum=bn_momentum, dtype=jnp.dtype(dtype))


def init_variables(model: nn.Module, key: jax.Array, images: jax.Array) -> dict:
  """Random initial `params` and `batch_stats` (before any data-dependent pass)."""
  variables = model.init({'params': key}, images, train=False)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def data_dependent_init(model: nn.Module, variables: dict, images: jax.Array,
                        dropout_key: jax.Array) -> dict:
  """Sets every layer's `g` and `b` from one batch, layer by layer (docs/reference.md "Model")."""
  _, updated = model.apply(variables, images, train=True, init_mode=True,
                           mutable=['params'], rngs={'dropout': dropout_key})
  return {**variables, 'params': updated['params']}


def initialize(model: nn.Module, key: jax.Array, images: jax.Array,
               dropout_key: jax.Array) -> dict:
  """A network's starting variables: random, then data-dependent where the network has it."""
  variables = init_variables(model, key, images)
  if getattr(model, 'data_dependent_init', False):
    variables = data_dependent_init(model, variables, images, dropout_key)
  return variables


def apply_with_features(apply_fn: Callable, variables: dict, images: jax.Array, *, train: bool,
                        dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Any]:
  """Runs `apply_fn` (a network's `apply`) and returns `(logits, features, new_batch_stats)`.

  In eval mode `new_batch_stats` is `variables['batch_stats']` unchanged.
  """
  mutable = ['intermediates', 'batch_stats'] if train else ['intermediates']
  rngs = {'dropout': dropout_key} if dropout_key is not None else {}
  logits, state = apply_fn(variables, images, train=train, mutable=mutable, rngs=rngs)
  batch_stats = state['batch_stats'] if train else variables['batch_stats']
  return logits, state['intermediates'][FEATURES][0], batch_stats


__all__ = ['FEATURES', 'MODELS', 'ConvLarge', 'WeightNormMeanOnlyBN', 'apply_with_features',
           'WideResNet', 'create_model', 'data_dependent_init', 'init_variables',
           'initialize']
