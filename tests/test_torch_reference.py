"""The PyTorch port (lcmt_jax/testing/torch_reference.py) against NumPy oracles of docs/reference.md."""

import math

import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason='torch is needed only for the PyTorch reference port')

from lcmt_jax.testing import torch_reference as ref  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.numerics

CONV_INDICES = (1, 3, 5, 9, 11, 13, 17, 19, 21)


def _softmax(z):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _randomise(layer, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    layer.weight_scale.copy_(1 + 0.5 * torch.rand(layer.weight_scale.shape, generator=gen))
    layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=gen))


# --- Layer -----------------------------------------------------------------------------------

@pytest.mark.parametrize('kernel_size', [0, 3])
def test_weight_norm_formula(kernel_size):
  torch.manual_seed(0)
  layer = ref.WeightNormMeanOnlyBN(4, 5, kernel_size)
  _randomise(layer, 1)
  v = layer.weight.detach().numpy().astype(np.float64)
  g = layer.weight_scale.detach().numpy()
  norm = np.sqrt((v.reshape(5, -1) ** 2).sum(axis=1) + 1e-8)
  expected = (g / norm).reshape((5,) + (1,) * (v.ndim - 1)) * v
  np.testing.assert_allclose(layer.effective_weight().detach().numpy(), expected, rtol=1e-6)


def test_linear_layer_train_and_eval_modes():
  torch.manual_seed(0)
  layer = ref.WeightNormMeanOnlyBN(6, 3, momentum=0.001)
  _randomise(layer, 2)
  x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
  w = layer.effective_weight().detach().numpy()
  b = layer.bias.detach().numpy()
  running = layer.running_mean.numpy().copy()
  a = x.astype(np.float64) @ w.T

  layer.train()
  y = layer(torch.from_numpy(x)).detach().numpy()
  np.testing.assert_allclose(y, a - a.mean(axis=0) + b, rtol=1e-5, atol=1e-5)
  new_running = 0.999 * running + 0.001 * a.mean(axis=0)
  np.testing.assert_allclose(layer.running_mean.numpy(), new_running, rtol=1e-6, atol=1e-7)

  layer.eval()
  y = layer(torch.from_numpy(x)).detach().numpy()
  np.testing.assert_allclose(y, a - new_running + b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.running_mean.numpy(), new_running, rtol=1e-6, atol=1e-7)


def test_conv_layer_mean_is_over_batch_and_space():
  torch.manual_seed(0)
  layer = ref.WeightNormMeanOnlyBN(3, 4, kernel_size=3, padding=1)
  _randomise(layer, 3)
  y = layer(torch.randn(2, 3, 5, 5)).detach()
  assert y.shape == (2, 4, 5, 5)
  torch.testing.assert_close(y.mean(dim=(0, 2, 3)), layer.bias.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize('kernel_size, init_scale', [(0, 0.1), (3, 1.0)])
def test_init_mode_normalises_and_sets_g_b(kernel_size, init_scale):
  torch.manual_seed(0)
  layer = ref.WeightNormMeanOnlyBN(3, 4, kernel_size, padding=1, init_scale=init_scale)
  x = torch.randn(16, 3, 6, 6) if kernel_size else torch.randn(16, 3)
  dims = (0, 2, 3) if kernel_size else (0,)
  layer.init_mode = True
  with torch.no_grad():
    out = layer(x)
  layer.init_mode = False
  torch.testing.assert_close(out.mean(dims), torch.zeros(4), rtol=0, atol=1e-6)
  torch.testing.assert_close(out.std(dims, unbiased=False), torch.full((4,), init_scale),
                             rtol=1e-4, atol=0)
  assert not layer.running_mean.any()
  # With the new g and b, xW + b reproduces the normalised activations.
  layer.eval()
  with torch.no_grad():
    torch.testing.assert_close(layer(x), out, rtol=1e-4, atol=1e-5)


# --- Network ---------------------------------------------------------------------------------

def test_state_dict_keys_follow_the_reference_layout():
  model = ref.ConvLarge(width=8)
  prefixes = [f'conv_blocks.{i}' for i in CONV_INDICES] + ['fc']
  names = ('weight', 'weight_scale', 'bias', 'running_mean')
  assert list(model.state_dict()) == [f'{p}.{n}' for p in prefixes for n in names]
  assert tuple(model.conv_blocks[19].weight.shape) == (16, 32, 1, 1)
  assert model.fc.init_scale == 0.1
  assert all(model.conv_blocks[i].init_scale == 1.0 for i in CONV_INDICES)
  assert [model.conv_blocks[i].p for i in (0, 8, 16)] == [0.0, 0.5, 0.5]


def test_full_width_parameter_count():
  n = sum(p.numel() for p in ref.ConvLarge(width=128).parameters())
  assert 3.0e6 < n < 3.2e6


def test_forward_shapes_and_eval_determinism():
  torch.manual_seed(0)
  model = ref.ConvLarge(num_classes=7, width=8).eval()
  x = torch.randn(4, 3, 32, 32)
  features, logits = model(x)
  assert features.shape == (4, 8) and logits.shape == (4, 7)
  torch.testing.assert_close(model(x)[1], logits, rtol=0, atol=0)


def test_data_dependent_init_sets_unit_scale_features():
  torch.manual_seed(0)
  model = ref.ConvLarge(width=8, dropout_rate=0.0)
  x = torch.randn(16, 3, 32, 32)
  g_before = model.conv_blocks[1].weight_scale.detach().clone()
  ref.data_dependent_init(model, x)
  assert model.training and all(not l.init_mode for l in ref.weight_norm_layers(model))
  assert not any(l.running_mean.any() for l in ref.weight_norm_layers(model))
  assert not torch.equal(model.conv_blocks[1].weight_scale.detach(), g_before)
  # In eval mode with zero running means the init batch reproduces the init pass:
  # logits are centred with std init_scale = 0.1 per class.
  model.eval()
  with torch.no_grad():
    _, logits = model(x)
  torch.testing.assert_close(logits.mean(0), torch.zeros(10), rtol=0, atol=1e-5)
  torch.testing.assert_close(logits.std(0, unbiased=False), torch.full((10,), 0.1),
                             rtol=1e-3, atol=0)


# --- Losses ----------------------------------------------------------------------------------

def _pair_oracle(a, b, threshold):
  total, count = 0.0, 0
  for i in range(a.shape[0]):
    for j in range(b.shape[0]):
      d = np.mean((a[i] - b[j]) ** 2)
      if d <= threshold:
        total += d * math.exp(-d / threshold)
        count += 1
  return total / count


def test_pairwise_clustering_loss_matches_double_loop():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 6))
  b = rng.normal(size=(7, 6)) * 1.5
  d = ((a[:, None] - b[None]) ** 2).mean(-1)
  # Halfway between two distances, so rounding cannot move a pair across it.
  threshold = float(np.mean(np.sort(d, axis=None)[17:19]))  # masks out half the pairs
  got = ref.pairwise_clustering_loss(torch.from_numpy(a), torch.from_numpy(b), threshold)
  np.testing.assert_allclose(got.item(), _pair_oracle(a, b, threshold), rtol=1e-12)


def test_local_clustering_loss_counts_the_unlabelled_diagonal():
  rng = np.random.default_rng(1)
  fl, fu = rng.normal(size=(3, 4)), rng.normal(size=(6, 4))
  got = ref.local_clustering_loss(torch.from_numpy(fl), torch.from_numpy(fu), 2.0)
  expected = _pair_oracle(fl, fu, 2.0) + _pair_oracle(fu, fu, 2.0)
  np.testing.assert_allclose(got.item(), expected, rtol=1e-12)


def test_pairwise_clustering_gradient_flows_into_both_inputs():
  gen = torch.Generator().manual_seed(0)
  a = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
  b = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
  assert torch.autograd.gradcheck(
      lambda a, b: ref.pairwise_clustering_loss(a, b, 1.5), (a, b))


def test_empty_mask_gives_zero_not_nan():
  a = torch.zeros(3, 4, requires_grad=True)
  b = torch.full((5, 4), 10.0)
  loss = ref.pairwise_clustering_loss(a, b, threshold=1.0)
  loss.backward()
  assert loss.item() == 0.0
  assert torch.all(torch.isfinite(a.grad)) and not a.grad.any()


def test_classification_and_consistency_losses():
  rng = np.random.default_rng(2)
  zl, tl = rng.normal(size=(4, 10)), rng.normal(size=(4, 10))
  zu, tu = rng.normal(size=(12, 10)), rng.normal(size=(12, 10))
  labels = rng.integers(0, 10, size=4)
  log_p = zl - zl.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  ce = ref.classification_loss(torch.from_numpy(zl), torch.from_numpy(labels))
  np.testing.assert_allclose(ce.item(), -log_p[np.arange(4), labels].mean(), rtol=1e-12)

  mse_l = np.mean((_softmax(zl) - _softmax(tl)) ** 2)
  mse_u = np.mean((_softmax(zu) - _softmax(tu)) ** 2)
  t = [torch.from_numpy(z).requires_grad_() for z in (zl, zu, tl, tu)]
  cons = ref.consistency_loss(*t)
  np.testing.assert_allclose(cons.item(), (4 * mse_l + 12 * mse_u) / 16, rtol=1e-12)
  cons.backward()
  assert t[0].grad is not None and t[2].grad is None and t[3].grad is None


# --- Schedules, optimiser, teacher, step -----------------------------------------------------

def test_sigmoid_rampup():
  assert ref.sigmoid_rampup(0, 5) == 0.0 and ref.sigmoid_rampup(-3, 5) == 0.0
  assert ref.sigmoid_rampup(5, 5) == 1.0 and ref.sigmoid_rampup(9, 5) == 1.0
  assert ref.sigmoid_rampup(2, 5) == pytest.approx(math.exp(-5 * 0.6 ** 2))


def test_linear_decay_lr():
  assert ref.linear_decay_lr(1, 0.05, 800, 1000) == 0.05
  assert ref.linear_decay_lr(800, 0.05, 800, 1000) == 0.05
  assert ref.linear_decay_lr(900, 0.05, 800, 1000) == pytest.approx(0.025)
  assert ref.linear_decay_lr(1000, 0.05, 800, 1000) == 0.0


def test_sgd_is_nesterov_with_coupled_weight_decay():
  hp = ref.HParams()
  layer = ref.WeightNormMeanOnlyBN(3, 2)
  opt = ref.make_optimizer(layer, hp)
  params = [p.detach().numpy().astype(np.float64) for p in layer.parameters()]
  buffers = [np.zeros_like(p) for p in params]
  x = torch.randn(4, 3)
  for step in range(3):
    opt.zero_grad()
    (layer(x) ** 2).sum().backward()
    for i, p in enumerate(layer.parameters()):
      d = p.grad.numpy() + hp.weight_decay * params[i]
      buffers[i] = d if step == 0 else hp.momentum * buffers[i] + d
      params[i] = params[i] - hp.base_lr * (d + hp.momentum * buffers[i])
    opt.step()
    for p, expected in zip(layer.parameters(), params):
      np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_update_teacher_averages_parameters_only():
  torch.manual_seed(0)
  student, teacher = ref.ConvLarge(width=8), ref.ConvLarge(width=8)
  with torch.no_grad():
    teacher.fc.running_mean.fill_(3.0)
  before = {k: v.clone() for k, v in teacher.state_dict().items()}
  ref.update_teacher(student, teacher, 0.99)
  for k, v in teacher.state_dict().items():
    expected = before[k] if k.endswith('running_mean') else (
        0.99 * before[k] + 0.01 * student.state_dict()[k])
    torch.testing.assert_close(v, expected)


def _batch(n_l=4, n_u=8, seed=0):
  gen = torch.Generator().manual_seed(seed)
  images = lambda n: torch.randn(n, 3, 32, 32, generator=gen)  # pylint: disable=unnecessary-lambda-assignment
  return {'student_labeled': images(n_l), 'teacher_labeled': images(n_l),
          'student_unlabeled': images(n_u), 'teacher_unlabeled': images(n_u),
          'labels': torch.randint(0, 10, (n_l,), generator=gen)}


@pytest.mark.parametrize('epoch, lc_on', [(2, False), (610, True)])
def test_train_step(epoch, lc_on):
  torch.manual_seed(0)
  hp = ref.HParams(lc_threshold=1e6)  # every pair inside the threshold: lc > 0
  student = ref.ConvLarge(width=8, dropout_rate=0.0)
  teacher = ref.ConvLarge(width=8, dropout_rate=0.0)
  batch = _batch()
  ref.data_dependent_init(student, batch['student_labeled'])
  ref.data_dependent_init(teacher, batch['teacher_labeled'])
  optimizer = ref.make_optimizer(student, hp)
  teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}

  # The same step by hand on a copy, to check the loss and the gradient.
  copy = ref.ConvLarge(width=8, dropout_rate=0.0)
  copy.load_state_dict(student.state_dict())
  teacher_copy = ref.ConvLarge(width=8, dropout_rate=0.0)
  teacher_copy.load_state_dict(teacher.state_dict())
  fl, zl = copy(batch['student_labeled'])
  fu, zu = copy(batch['student_unlabeled'])
  with torch.no_grad():
    tl, tu = teacher_copy(batch['teacher_labeled'])[1], teacher_copy(batch['teacher_unlabeled'])[1]
  lc_w = 10 * ref.sigmoid_rampup(epoch - 600, 100) if lc_on else 0.0
  expected_loss = (ref.classification_loss(zl, batch['labels'])
                   + 100 * ref.sigmoid_rampup(epoch, 5) * ref.consistency_loss(zl, zu, tl, tu)
                   + lc_w * ref.local_clustering_loss(fl, fu, hp.lc_threshold))
  expected_loss.backward()

  metrics = ref.train_step(student, teacher, optimizer, batch, epoch, hp)
  assert metrics['loss'] == pytest.approx(expected_loss.item(), rel=1e-5)
  assert metrics['loss'] == pytest.approx(
      metrics['ce'] + metrics['cons_weight'] * metrics['cons']
      + metrics['lc_weight'] * metrics['lc'], rel=1e-5)
  assert (metrics['lc_weight'] > 0) == lc_on and metrics['lc'] > 0
  assert metrics['lr'] == 0.05
  for p, p_copy in zip(student.parameters(), copy.parameters()):
    torch.testing.assert_close(p.grad, p_copy.grad, rtol=1e-4, atol=1e-6)

  student_state = student.state_dict()
  for k, v in teacher.state_dict().items():
    if k.endswith('running_mean'):  # the teacher's own train-mode passes moved it
      torch.testing.assert_close(v, teacher_copy.state_dict()[k])
      assert not torch.equal(v, teacher_before[k])
    else:
      torch.testing.assert_close(v, 0.99 * teacher_before[k] + 0.01 * student_state[k])
