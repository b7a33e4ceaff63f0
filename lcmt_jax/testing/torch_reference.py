"""A small PyTorch port of the reference, used as the parity oracle and speed baseline.

Written from docs/reference.md alone (clean room): it computes what the authors'
PyTorch release computes, with one deliberate difference, the local-clustering
loss returns 0 instead of NaN when no pair lies within the threshold
(docs/reference.md, Quirk 4). Parameter and buffer names match the authors'
checkpoints (`conv_blocks.<i>.weight`, `.weight_scale`, `.bias`,
`.running_mean`, `fc.*`), so `lcmt_jax.torch_import` reads both.

Images are NCHW float tensors, already normalised. Typical use:

    model = ConvLarge(width=16, dropout_rate=0.0)
    model.load_state_dict(load_numpy_state_dict(arrays))
    features, logits = model(images_from_nhwc(x))

It also defines WRN-28-2 (`WideResNet`, the oracle of `lcmt_jax.models.WideResNet`)
and `wide_resnet_state_dict`, which carries a Flax WRN's variables over to it.
"""

import contextlib
import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-8


class WeightNormMeanOnlyBN(nn.Module):
  """Weight-normalised conv (`kernel_size > 0`) or linear layer with mean-only batch norm.

  `W = g * v / sqrt(sum(v^2) + 1e-8)` per output unit; train mode returns
  `xW - batch_mean(xW) + b` and moves the running mean by `momentum`; eval mode
  subtracts the running mean instead. With `init_mode` set (see
  `data_dependent_init`) a call rescales `g`, sets `b` and returns the
  normalised activations, leaving the running mean alone.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 0,
               padding: int = 0, init_scale: float = 1.0, momentum: float = 0.001):
    super().__init__()
    shape = (out_features, in_features, kernel_size, kernel_size) if kernel_size else (
        out_features, in_features)
    self.weight = nn.Parameter(torch.randn(shape) * 0.05)              # v
    self.weight_scale = nn.Parameter(torch.ones(out_features))         # g
    self.bias = nn.Parameter(torch.zeros(out_features))                # b
    self.register_buffer('running_mean', torch.zeros(out_features))
    self.padding = padding
    self.init_scale = init_scale
    self.momentum = momentum
    self.init_mode = False

  def effective_weight(self) -> torch.Tensor:
    fan_in_dims = tuple(range(1, self.weight.dim()))
    norm = torch.sqrt(self.weight.pow(2).sum(fan_in_dims, keepdim=True) + _EPS)
    g = self.weight_scale.view(-1, *([1] * len(fan_in_dims)))
    return g * self.weight / norm

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    w = self.effective_weight()
    a = F.conv2d(x, w, padding=self.padding) if w.dim() == 4 else F.linear(x, w)
    stat_dims = (0, 2, 3) if a.dim() == 4 else (0,)
    as_channels = (lambda t: t.view(1, -1, 1, 1)) if a.dim() == 4 else (lambda t: t.view(1, -1))

    if self.init_mode:
      with torch.no_grad():
        m = a.mean(stat_dims)
        s = torch.sqrt((a - as_channels(m)).pow(2).mean(stat_dims) + _EPS)
        scale = self.init_scale / s
        self.weight_scale.mul_(scale)
        self.bias.copy_(-m * scale)
        return (a - as_channels(m)) * as_channels(scale)

    if self.training:
      mean = a.mean(stat_dims)
      with torch.no_grad():
        self.running_mean.mul_(1.0 - self.momentum).add_(self.momentum * mean)
    else:
      mean = self.running_mean
    # In `a`'s dtype, so that activations stay bfloat16 under autocast (a no-op in float32).
    return a - as_channels(mean).to(a.dtype) + as_channels(self.bias).to(a.dtype)


class ConvLarge(nn.Module):
  """The reference's "ShallowNet"; `forward` returns `(features, logits)`.

  Channel widths `w, w, w | 2w, 2w, 2w | 4w, 2w, w` with `w = width` (128 in
  the reference). `dropout_rate` is the rate before blocks 2 and 3 (0.5 in the
  reference; 0.0 makes the network deterministic for parity tests).
  """

  def __init__(self, num_classes: int = 10, width: int = 128, dropout_rate: float = 0.5,
               bn_momentum: float = 0.001):
    super().__init__()
    w = width

    def conv(cin, cout, kernel_size=3, padding=1):
      return WeightNormMeanOnlyBN(cin, cout, kernel_size, padding, momentum=bn_momentum)

    def act():
      return nn.LeakyReLU(0.1)

    # Index layout matches the authors' checkpoints: convs at 1,3,5 | 9,11,13 | 17,19,21.
    self.conv_blocks = nn.Sequential(
        nn.Dropout(0.0), conv(3, w), act(), conv(w, w), act(), conv(w, w), act(),
        nn.MaxPool2d(2, 2),
        nn.Dropout(dropout_rate), conv(w, 2 * w), act(), conv(2 * w, 2 * w), act(),
        conv(2 * w, 2 * w), act(), nn.MaxPool2d(2, 2),
        nn.Dropout(dropout_rate), conv(2 * w, 4 * w, padding=0), act(),
        conv(4 * w, 2 * w, 1, 0), act(), conv(2 * w, w, 1, 0), act())
    self.fc = WeightNormMeanOnlyBN(w, num_classes, init_scale=0.1, momentum=bn_momentum)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = self.conv_blocks(x).mean(dim=(2, 3))
    return features, self.fc(features)


# --- WRN-28-2 (lcmt_jax/models/wide_resnet.py) ----------------------------------------------

_WRN_BN_EPSILON = 1e-3
_WRN_SLOPE = 0.1


class SameConv2d(nn.Conv2d):
  """A bias-free conv padded as TensorFlow's (and `lax`'s) 'SAME': `ceil(n / stride)` outputs,
  the odd pixel of padding at the bottom and right (a stride-2 3x3 conv on an even input
  pads (0, 1), where PyTorch's `padding=1` would pad (1, 1))."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
    super().__init__(in_channels, out_channels, kernel_size, stride, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad lists the last dimension first.
      k, s = self.kernel_size[0], self.stride[0]
      total = max((-(-size // s) - 1) * s + k - size, 0)
      pads += [total // 2, total - total // 2]
    return super().forward(F.pad(x, pads))


class WideResidualBlock(nn.Module):
  """`x + conv2(act(bn2(conv1(act(bn1(x))))))`; the shortcut is projected by a 1x1 conv where
  the shape changes and takes `act(bn1(x))` instead of `x` when `activate_before_residual`."""

  def __init__(self, in_channels: int, out_channels: int, stride: int,
               activate_before_residual: bool, dropout_rate: float, bn_momentum: float):
    super().__init__()
    norm = lambda c: nn.BatchNorm2d(c, eps=_WRN_BN_EPSILON, momentum=bn_momentum)  # pylint: disable=unnecessary-lambda-assignment
    self.bn1, self.conv1 = norm(in_channels), SameConv2d(in_channels, out_channels, 3, stride)
    self.bn2, self.conv2 = norm(out_channels), SameConv2d(out_channels, out_channels, 3)
    self.dropout = nn.Dropout(dropout_rate)
    self.shortcut = (SameConv2d(in_channels, out_channels, 1, stride)
                     if in_channels != out_channels or stride != 1 else None)
    self.activate_before_residual = activate_before_residual

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    activated = F.leaky_relu(self.bn1(x), _WRN_SLOPE)
    shortcut = activated if self.activate_before_residual else x
    h = F.leaky_relu(self.bn2(self.conv1(activated)), _WRN_SLOPE)
    h = self.conv2(self.dropout(h))
    return (self.shortcut(shortcut) if self.shortcut is not None else shortcut) + h


class WideResNet(nn.Module):
  """WRN-28-2 as `lcmt_jax.models.WideResNet` defines it; `forward` returns `(features, logits)`.

  Submodule names follow the Flax module's (`stem`, `group1_block1.bn1`, ...,
  `bn_final`, `dense`), which `wide_resnet_state_dict` relies on. PyTorch's
  `momentum` is the weight of the new batch statistic, the config's
  `bn_momentum` (0.001). PyTorch (like TensorFlow) moves the running variance
  by the unbiased batch variance, Flax by the biased one.
  """

  def __init__(self, num_classes: int = 10, width: int = 128, dropout_rate: float = 0.0,
               bn_momentum: float = 0.001):
    super().__init__()
    self.stem = SameConv2d(3, width // 8, 3)
    channels = width // 8
    for group, features in enumerate((width // 4, width // 2, width)):
      for i in range(4):
        self.add_module(f'group{group + 1}_block{i + 1}', WideResidualBlock(
            channels, features, stride=2 if group and not i else 1,
            activate_before_residual=not (group or i), dropout_rate=dropout_rate,
            bn_momentum=bn_momentum))
        channels = features
    self.bn_final = nn.BatchNorm2d(width, eps=_WRN_BN_EPSILON, momentum=bn_momentum)
    self.dense = nn.Linear(width, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = self.stem(x)
    for group in range(1, 4):
      for i in range(1, 5):
        h = getattr(self, f'group{group}_block{i}')(h)
    features = F.leaky_relu(self.bn_final(h), _WRN_SLOPE).mean(dim=(2, 3))
    return features, self.dense(features)


# Flax leaf name -> (PyTorch name, NumPy transpose of the Flax array into PyTorch's layout).
_WRN_LEAVES = {'kernel': ('weight', (3, 2, 0, 1)), 'scale': ('weight', None),
               'bias': ('bias', None), 'mean': ('running_mean', None), 'var': ('running_var', None)}


def wide_resnet_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
  """A `lcmt_jax.models.WideResNet`'s `{'params', 'batch_stats'}` as a `WideResNet` state dict
  (NumPy arrays; `load_numpy_state_dict` makes them tensors). PyTorch BN's
  `num_batches_tracked` counters are left out (load with `strict=False`)."""
  out = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(variables[collection]):
      torch_name, axes = _WRN_LEAVES[path[-1]]
      leaf = np.asarray(leaf, np.float32)
      if path[0] == 'dense' and path[-1] == 'kernel':
        leaf, axes = leaf.T, None  # (in, out) -> (out, in).
      out['.'.join((*path[:-1], torch_name))] = leaf.transpose(axes) if axes else leaf
  return out


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
  items = []
  for key, value in tree.items():
    if isinstance(value, Mapping):
      items += _flatten(value, (*prefix, key))
    else:
      items.append(((*prefix, key), value))
  return items


def weight_norm_layers(model: nn.Module) -> list[WeightNormMeanOnlyBN]:
  """The model's weight-normalised layers in network order."""
  return [m for m in model.modules() if isinstance(m, WeightNormMeanOnlyBN)]


def data_dependent_init(model: nn.Module, images: torch.Tensor) -> None:
  """Sets every layer's `g` and `b` from one batch, layer by layer (docs/reference.md, "Model").

  The pass runs in train mode, so dropout is active as in the reference.
  """
  layers = weight_norm_layers(model)
  was_training = model.training
  model.train()
  for layer in layers:
    layer.init_mode = True
  try:
    with torch.no_grad():
      model(torch.as_tensor(images))
  finally:
    for layer in layers:
      layer.init_mode = False
    model.train(was_training)


def images_from_nhwc(images) -> torch.Tensor:
  """NHWC array (the JAX layout) -> contiguous NCHW float32 tensor."""
  return torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()


def load_numpy_state_dict(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """Torch-layout NumPy arrays (e.g. `torch_import.to_reference_state_dict`) -> tensors."""
  return {k: torch.as_tensor(np.array(v, dtype=np.float32)) for k, v in arrays.items()}


# --- Losses (docs/reference.md, "Losses") ---------------------------------------------------------

def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """Mean cross-entropy."""
  return F.cross_entropy(logits, labels)


def softmax_mse(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
  """Mean over batch and classes of `(softmax(p) - softmax(q))^2`; no gradient into `q`."""
  return (F.softmax(logits, dim=1) - F.softmax(target_logits.detach(), dim=1)).pow(2).mean()


def consistency_loss(zl, zu, tl, tu) -> torch.Tensor:
  """`(n_l * mse(zl, tl) + n_u * mse(zu, tu)) / (n_l + n_u)`: the 32/128 weighting.

  Weighting by the actual sub-batch sizes equals the mean over the concatenated
  batch, and gives the reference's `(32 * . + 128 * .) / 160` at its batch sizes.
  """
  n_l, n_u = zl.shape[0], zu.shape[0]
  return (n_l * softmax_mse(zl, tl) + n_u * softmax_mse(zu, tu)) / (n_l + n_u)


def pairwise_clustering_loss(a: torch.Tensor, b: torch.Tensor, threshold: float) -> torch.Tensor:
  """`sum(d * m * exp(-d / T)) / sum(m)` with `d_ij = mean_k (a_ik - b_jk)^2`, `m = [d <= T]`.

  Gradients flow through both factors of `d` into `a` and `b`; the mask is a
  constant. An empty mask gives 0 (the reference gives 0/0 = NaN).
  """
  d = (a[:, None, :] - b[None, :, :]).pow(2).mean(dim=2)
  m = (d <= threshold).to(d.dtype)
  return (d * m * torch.exp(-d / threshold)).sum() / m.sum().clamp(min=1.0)


def local_clustering_loss(fl: torch.Tensor, fu: torch.Tensor, threshold: float) -> torch.Tensor:
  """`pair(fl, fu) + pair(fu, fu)`; the second term counts the zero diagonal."""
  return pairwise_clustering_loss(fl, fu, threshold) + pairwise_clustering_loss(fu, fu, threshold)


# --- Schedules, optimiser, teacher -----------------------------------------------------------

def sigmoid_rampup(t: float, length: float) -> float:
  """1 for `t >= length`, else 0 for `t <= 0`, else `exp(-5 (1 - t / length)^2)`.

  The authors' code tests `t >= length` first, so a zero-length ramp is 1 from `t = 0`.
  """
  if t >= length:
    return 1.0
  if t <= 0:
    return 0.0
  return math.exp(-5.0 * (1.0 - t / length) ** 2)


def linear_decay_lr(epoch: int, base_lr: float, decay_start: int, decay_end: int) -> float:
  """`base_lr` until `decay_start`, then linearly down to 0 at `decay_end`; no decay if `end <= start`."""
  if epoch <= decay_start or decay_end <= decay_start:
    return base_lr
  return base_lr * (decay_end - epoch) / (decay_end - decay_start)


@dataclasses.dataclass
class HParams:
  """One run's knobs; the defaults are CIFAR-10 MT+LC with 4,000 labels.

  `lc_start=None` gives the Mean-Teacher-only run (no clustering loss).
  """
  base_lr: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 1e-4
  decay_start: int = 800
  decay_end: int = 1000
  ema_decay: float = 0.99
  cons_weight: float = 100.0
  cons_rampup: int = 5
  lc_start: int | None = 600
  lc_rampup: int = 100
  lc_weight: float = 10.0
  lc_threshold: float = 50.0


def make_optimizer(model: nn.Module, hparams: HParams) -> torch.optim.SGD:
  """Nesterov SGD with PyTorch's coupled weight decay on every parameter (Quirk 6)."""
  return torch.optim.SGD(model.parameters(), lr=hparams.base_lr, momentum=hparams.momentum,
                         nesterov=True, weight_decay=hparams.weight_decay)


def update_teacher(student: nn.Module, teacher: nn.Module, decay: float) -> None:
  """`teacher = decay * teacher + (1 - decay) * student` for `v`, `g`, `b`; running means stay."""
  with torch.no_grad():
    for t, s in zip(teacher.parameters(), student.parameters()):
      t.mul_(decay).add_(s, alpha=1.0 - decay)


def train_step(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
               batch: Mapping, epoch: int, hparams: HParams,
               autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
  """One reference training step; returns the loss terms, their weights and the lr.

  `batch` holds NCHW images `student_labeled`, `teacher_labeled`,
  `student_unlabeled`, `teacher_unlabeled` (two augmented views of each image)
  and integer `labels`. Student and teacher each run the labelled and the
  unlabelled images as separate forward passes, both in train mode.
  `autocast_dtype` (the benchmark's mixed-precision rows pass `torch.bfloat16`)
  runs the forwards and losses under `torch.autocast`; None keeps float32.
  The returned losses are read with `.item()`, so every step ends with a host
  sync, as the reference's per-step logging does.
  """
  lr = linear_decay_lr(epoch, hparams.base_lr, hparams.decay_start, hparams.decay_end)
  for group in optimizer.param_groups:
    group['lr'] = lr
  student.train()
  teacher.train()

  autocast = (contextlib.nullcontext() if autocast_dtype is None else
              torch.autocast(next(student.parameters()).device.type, dtype=autocast_dtype))
  with autocast:
    fl, zl = student(torch.as_tensor(batch['student_labeled']))
    fu, zu = student(torch.as_tensor(batch['student_unlabeled']))
    with torch.no_grad():
      _, tl = teacher(torch.as_tensor(batch['teacher_labeled']))
      _, tu = teacher(torch.as_tensor(batch['teacher_unlabeled']))

    ce = classification_loss(zl, torch.as_tensor(batch['labels']).long())
    cons = consistency_loss(zl, zu, tl, tu)
    cons_w = hparams.cons_weight * sigmoid_rampup(epoch, hparams.cons_rampup)
    loss = ce + cons_w * cons
    lc = torch.zeros(())
    lc_w = 0.0
    if hparams.lc_start is not None:
      lc = local_clustering_loss(fl, fu, hparams.lc_threshold)
      if epoch >= hparams.lc_start:
        lc_w = hparams.lc_weight * sigmoid_rampup(epoch - hparams.lc_start, hparams.lc_rampup)
      loss = loss + lc_w * lc

  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  optimizer.step()
  update_teacher(student, teacher, hparams.ema_decay)
  return {'loss': loss.item(), 'ce': ce.item(), 'cons': cons.item(), 'lc': lc.item(),
          'cons_weight': cons_w, 'lc_weight': lc_w, 'lr': lr}
