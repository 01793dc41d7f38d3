"""The paper's training recipe (appendix A) for ``model.fit``, as timm_vib's trainer runs it.

    optimizer = keras_vib.paper_optimizer(model, learning_rate=keras_vib.cosine_schedule(6e-4, total, warmup))
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, callbacks=[keras_vib.BetaWarmup(warmup_steps=steps_per_epoch * epochs // 10)])

AdamW with weight decay off for biases, 1-D weights (LayerNorm) and every bottleneck weight (the
position embedding is decayed, as in the paper); cosine decay after a linear warm-up, stepped per
update; beta ramped up per update with timm_vib's ``beta_at`` (linear or the reference code's log ramp).
"""
import math
import numbers
import re
from typing import List, Optional

import keras

from .layers import GaussianBottleneck

__all__ = ['no_weight_decay_variables', 'paper_optimizer', 'PaperAdamW', 'cosine_schedule', 'beta_at', 'BetaWarmup',
           'BETA_SCHEDULES']

BETA_SCHEDULES = ('linear', 'log')
LOG_RAMP_START = 1e-8  # the reference code's start of its log ramp


def no_weight_decay_variables(model: keras.Model) -> List[keras.Variable]:
    """The trainable variables AdamW must not decay: biases and other 1-D weights (LayerNorm scale and
    shift) and every weight of every :class:`GaussianBottleneck` (timm_vib's ``no_weight_decay``)."""
    bottleneck = {id(v) for layer in model._flatten_layers() if isinstance(layer, GaussianBottleneck)
                  for v in layer.trainable_variables}
    return [v for v in model.trainable_variables if len(v.shape) <= 1 or id(v) in bottleneck]


@keras.saving.register_keras_serializable(package='keras_vib')
class PaperAdamW(keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` whose exclusions from weight decay are part of its config: Keras saves
    neither a ``var_list`` nor ``var_names`` given to ``exclude_from_weight_decay``, so a plain AdamW reloaded
    from a ``.keras`` file decays every variable. ``no_decay_names``: exact variable names (``variable.name``)
    left undecayed."""

    def __init__(self, *args, no_decay_names=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.no_decay_names = sorted(set(no_decay_names))
        if self.no_decay_names:
            # the last part of the name: TensorFlow hands the optimizer its own variables, named by their path
            # ('vit_tiny_vib/blocks_0/norm1/gamma:0')
            self.exclude_from_weight_decay(
                var_names=[f'(?:^|/){re.escape(n)}(?::\\d+)?$' for n in self.no_decay_names])

    def get_config(self):
        return {**super().get_config(), 'no_decay_names': list(self.no_decay_names)}


def paper_optimizer(model: keras.Model, learning_rate=6e-4, weight_decay: float = 0.05, epsilon: float = 1e-8,
                    **kwargs) -> PaperAdamW:
    """AdamW (lr 6e-4, weight decay 0.05, epsilon 1e-8 as torch's, by default) without decay on
    :func:`no_weight_decay_variables`, which stays so through ``model.save`` and ``keras.saving.load_model``.

    learning_rate: a float or a schedule (:func:`cosine_schedule`); kwargs go to ``keras.optimizers.AdamW``.
    Keras adds epsilon to the square root of the uncorrected second moment, torch to that of the
    bias-corrected one: the same value gives the same steps once the second moment's correction is near 1.
    """
    excluded = {id(v) for v in no_weight_decay_variables(model)}
    names = {v.name for v in model.trainable_variables if id(v) in excluded}
    shared = sorted(v.name for v in model.trainable_variables if id(v) not in excluded and v.name in names)
    if shared:  # the exclusions are kept by name: a name may not stand for decayed and undecayed weights
        raise ValueError(f'variables named {", ".join(sorted(set(shared)))} are both decayed and not: '
                         'paper_optimizer cannot record the exclusions by name')
    return PaperAdamW(learning_rate=learning_rate, weight_decay=weight_decay, epsilon=epsilon,
                      no_decay_names=names, **kwargs)


def cosine_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                    min_learning_rate: float = 1e-6) -> keras.optimizers.schedules.CosineDecay:
    """Linear warm-up from ``min_learning_rate`` to ``learning_rate`` over ``warmup_steps`` updates, then
    cosine decay to ``min_learning_rate`` at ``total_steps``, stepped per update (the timm_vib trainer's defaults:
    10 warm-up epochs, min lr 1e-6). The cosine starts after the warm-up, as in the reference code's
    ``cosine_scheduler``; timm's scheduler, which the timm_vib trainer uses, counts the warm-up in the cosine's
    phase instead. The two differ by at most 0.9 % of the peak over the paper's 1000 epochs (10 of warm-up), and
    by up to 13 % over the demo's 15 (2 of warm-up): docs/experiments/reference_equivalence.py."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f'warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}')
    if not 0 <= min_learning_rate <= learning_rate:
        raise ValueError(f'min_learning_rate must be in [0, learning_rate={learning_rate}], got {min_learning_rate}')
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=min_learning_rate if warmup_steps else learning_rate,
        decay_steps=total_steps - warmup_steps, alpha=min_learning_rate / learning_rate,
        warmup_target=learning_rate if warmup_steps else None, warmup_steps=warmup_steps)


def beta_at(beta: float, update: int, warmup_updates: int, schedule: str = 'linear') -> float:
    """The information cost in force at update ``update`` (0-based) of a warm-up over ``warmup_updates``
    updates, as ``timm_vib.training.beta_at``: ``linear`` rises from beta / warmup_updates to beta,
    ``log`` geometrically from 1e-8 to beta; beta itself afterwards."""
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f'beta schedule must be one of {BETA_SCHEDULES}, got {schedule!r}')
    if not (math.isfinite(beta) and beta >= 0) or update < 0 or warmup_updates < 0:
        raise ValueError(f'beta must be finite and >= 0, update and warmup_updates >= 0; got beta={beta}, '
                         f'update={update}, warmup_updates={warmup_updates}')
    if update >= warmup_updates or beta == 0:
        return beta
    if schedule == 'linear':
        return beta * (update + 1) / warmup_updates
    return math.exp(math.log(LOG_RAMP_START) + (math.log(beta) - math.log(LOG_RAMP_START)) * update / warmup_updates)


class BetaWarmup(keras.callbacks.Callback):
    """Ramps the model's beta in force up over the first ``warmup_steps`` optimizer updates (per update, as
    the timm_vib trainer), then holds it. The model's loss reads beta from a variable
    (``model.beta_variable``), so compiled steps (JAX, TensorFlow) follow without recompiling; ``model.beta``,
    which its config saves, stays the target.

    The position in the ramp is the optimizer's update count: a model saved mid-ramp and reloaded with its
    optimizer goes on where it was, and gradient accumulation counts updates, not batches. With
    ``steps_per_execution`` k > 1 beta changes once per k updates (what one compiled call runs).

    Args:
        warmup_steps: updates of the ramp (e.g. 10% of the epochs times the steps per epoch).
        beta: the final beta; default the model's beta when training starts.
        schedule: 'linear' or 'log' (see :func:`beta_at`).
    """

    def __init__(self, warmup_steps: int, beta: Optional[float] = None, schedule: str = 'linear') -> None:
        super().__init__()
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f'beta schedule must be one of {BETA_SCHEDULES}, got {schedule!r}')
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
            raise ValueError(f'warmup_steps must be an integer >= 0, got {warmup_steps!r}')
        if beta is not None:
            beta_at(beta, 0, 0)  # the same check as the trainer's: finite and >= 0
        self.warmup_steps, self.target, self.schedule = int(warmup_steps), beta, schedule
        self.step = 0  # the update the current batch makes (0-based, across fit calls)
        self._epoch_start, self._accumulate = 0, 1

    def on_train_begin(self, logs=None) -> None:
        if getattr(self.model, 'attn_mode', None) != 'vib':
            raise ValueError('BetaWarmup needs a keras_vib model with bottlenecks (attn_mode="vib")')
        if self.target is None:
            self.target = self.model.beta
        self._in_force = None

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        optimizer = self.model.optimizer  # on JAX, reading self.model syncs fit's state, the update count included
        self._epoch_start = int(keras.ops.convert_to_numpy(optimizer.iterations))
        self._accumulate = int(getattr(optimizer, 'gradient_accumulation_steps', None) or 1)

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        # batch counts the epoch's batches (by steps_per_execution with k > 1); iterations counts updates
        self.step = self._epoch_start + batch // self._accumulate
        value = beta_at(self.target, self.step, self.warmup_steps, self.schedule)
        if value != self._in_force:
            # on JAX, reading self.model hands fit's state back to the model (Keras's Callback.model does
            # that sync), so the next step reads the new value; after the ramp the model is not touched
            self.model.beta_variable.assign(value)
            self._in_force = value
