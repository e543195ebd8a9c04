"""The training loop: `train_and_evaluate(config, workdir)`.

Where the model, the optimizer, the mesh and the data meet:

  data       `data.assemble.build_pipeline` (examples, negatives, teacher, batching)
  encoder    `sparse_encoder.build_encoder`, placed on the mesh by logical axes
  optimizer  `optim.make_optimizer` (labels: frozen / head / base) -> `train_state`
  step       `train_step.make_train_step` (jitted, donated; accumulation inside)
  loop       batches put on the devices a step ahead (`prefetch`), metrics fetched
             every log_every steps (no per-step host sync) to tqdm, TensorBoard and
             history.jsonl (`metric_writers`), async orbax checkpoints of state and data
             position (awaited before evaluation, on SIGTERM, at the end), evaluation
  end        the encoder saved to WORKDIR/encoder, evaluated over the corpus.
  guards     `config_check` before anything is written; `workdir_lock` (one
             run per workdir); damaged checkpoints set aside (`checkpointing`);
             a resume with a changed config: refused when a field shapes the
             saved state, else the changes said and each config kept (`run_config`).

Every output goes through `etils.epath`, so WORKDIR may be gs://. A
non-finite loss or gradient norm is recorded in `state.bad_step` by the step;
the loop reads it at every log and checkpoint boundary and stops with
`NonFiniteLossError` without saving, so the last checkpoint stays good.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import tqdm
from flax import nnx
from jax.experimental import multihost_utils

from laspar_jax import checkpointing
from laspar_jax import config_check
from laspar_jax import config_lib
from laspar_jax import evaluate
from laspar_jax import io_utils
from laspar_jax import mesh as mesh_lib
from laspar_jax import metric_writers
from laspar_jax import optim
from laspar_jax import platform
from laspar_jax import prefetch
from laspar_jax import run_config
from laspar_jax import train_state
from laspar_jax import train_step
from laspar_jax import workdir_lock
from laspar_jax.data import assemble
from laspar_jax.models import sparse_encoder


check_config = config_check.check_config  # the name tests and callers know
RunRefusedError = run_config.RunRefusedError  # refused before anything was written (the launcher prints one line)


class NonFiniteLossError(RuntimeError):
  """The loss or the gradient became NaN/inf; the run stopped."""


def encoder_config(config: ml_collections.ConfigDict) -> sparse_encoder.EncoderConfig:
  """The EncoderConfig of a training config (config.model + config.seed)."""
  return sparse_encoder.EncoderConfig.from_dict({**config_lib.to_dict(config.model), "seed": int(config.seed)})


def _say(lead: bool, msg: str | None) -> None:
  """A progress line on the lead host (stdout, visible beside the tqdm bar); None says nothing."""
  if lead and msg:
    tqdm.tqdm.write(f"[train] {msg}")


def _check_finite(state: train_state.TrainState, last_ckpt: int | None) -> None:
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    raise NonFiniteLossError(
      f"the loss or gradient became non-finite at step {bad}: training stopped (the update of "
      f"that step was not applied). The last good checkpoint is step {last_ckpt}; lower the "
      f"learning rate or check the data before resuming."
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: io_utils.PathLike) -> dict[str, Any]:
  """Trains the sparse encoder described by `config` in `workdir`, resuming if checkpoints exist.

  Writes WORKDIR/config.json, checkpoints/ (orbax), tb/ (TensorBoard),
  history.jsonl, encoder/ (the final sparse encoder, `load_encoder`-able) and
  eval/<step>/ (index, run.trec, metrics.json).

  Args:
    config: a config from configs/*.py.
    workdir: output directory (local or gs://).

  Returns:
    {"step", "train": last logged metrics, "eval": final evaluation or None,
     "preempted": bool, "encoder": path or None}.

  Raises:
    ValueError: a bad config value (`config_check`), before anything is written.
    WorkdirLockedError: another live run holds WORKDIR (`workdir_lock`).
    NonFiniteLossError: a non-finite loss/gradient (the last good checkpoint is kept).
  """
  t_start = time.time()
  check_config(config)
  run_config.check_data(config)
  workdir = io_utils.absolute_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  lead = jax.process_index() == 0
  with workdir_lock.workdir_lock(workdir, enabled=lead):
    if lead:
      io_utils.remove_stale_tmp(workdir)  # e.g. encoder.tmp-<pid> of a killed run
    return _train(config, workdir, lead, t_start)


def _train(config: ml_collections.ConfigDict, workdir: Any, lead: bool, t_start: float) -> dict[str, Any]:
  """The body of `train_and_evaluate`, run under the workdir lock."""
  every, keep, async_save = config.train.checkpoint_every, config.train.keep_checkpoints, config.train.async_checkpoints
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", every=every, keep=keep, async_save=async_save)
  try:  # until the loop's own try: close the checkpoint manager on the way out
    latest = ckpt.latest_step()
    # a resume that changed a state-shaping field stops here, before anything is written
    changes = run_config.check_resume(workdir, config, latest) if latest is not None else []
    total, accum = int(config.train.total_steps), int(config.optim.accum_steps)
    mesh = mesh_lib.mesh_from_config(config.mesh)

    encoder, tokenizer = sparse_encoder.build_encoder(encoder_config(config))
    params = train_state.encoder_params(encoder)
    tx, lr_schedule = optim.make_optimizer(config.optim, total, params)
    trainable = optim.trainable_mask(params, config.optim)
    graphdef, rest, state, shardings = train_state.create_train_state(
      encoder, tx, mesh, seed=config.seed, rules=mesh_lib.rules_from_config(config), rng_impl=config.train.rng_impl
    )
    del encoder, params
    step_fn = train_step.make_train_step(
      graphdef,
      rest,
      tx,
      lr_schedule,
      train_step.StepConfig.from_config(config, mesh),
      shardings,
      mesh,
      trainable=None if all(jax.tree.leaves(trainable)) else trainable,
    )
    step_fn = platform.jit_boundary(step_fn, encoder_config(config).matmul_precision)  # cache on, precision

    start, data_state = 0, None
    if latest is not None:  # the backstop: array shapes the list of state-shaping fields may miss
      run_config.check_state_shapes(ckpt.array_shapes(latest), state.to_tree(), latest, ckpt.directory)
    restored = ckpt.restore_latest(state.to_tree())  # damaged steps are set aside (checkpointing)
    _say(lead, run_config.restore_message(ckpt.directory, ckpt.damaged, restored))
    if restored is not None:
      tree, meta, start = restored
      state, data_state = train_state.TrainState.from_tree(tree), meta["data"]
      if changes:
        _say(lead, "changed since the last run (resuming): " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes))
    if lead:
      run_config.record(workdir, config, start, changed=bool(changes) and restored is not None)
  except BaseException:
    ckpt.close()
    raise
  last_ckpt = start if restored is not None else None

  result: dict[str, Any] = {"step": start, "train": {}, "eval": None, "preempted": False, "encoder": None}
  pipe, old_handler, stop = None, None, {"sigterm": False}
  writer = metric_writers.MetricWriter(workdir, enabled=lead, resume_step=start)
  writer.write_hparams(config_lib.to_dict(config))
  bar = tqdm.tqdm(total=total, initial=start, desc="train", unit="step", disable=not lead, dynamic_ncols=True)
  try:
    if start < total:
      pipe, info = assemble.build_pipeline(config, tokenizer, workdir, progress=lead)
      if data_state is not None:
        pipe.set_state(data_state)
      _say(lead, f"data: {info} ({time.time() - t_start:.0f}s since start)")
      try:
        old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
      except ValueError:  # not the main thread
        old_handler = None
      batches = prefetch.device_batches(pipe, accum, mesh)  # (batch on device, data position after it)
      pending: list[dict[str, jax.Array]] = []
      t_last, n_last = time.time(), 0
      for step in range(start, total):
        batch, data_pos = next(batches)
        state, metrics = step_fn(state, batch)
        pending.append(metrics)
        done = step + 1
        bar.update(1)
        if done == start + 1:  # the first step compiled: time from here (its metrics are kept)
          jax.block_until_ready(metrics["loss"])
          t_last, n_last = time.time(), done
        if done % config.train.log_every == 0 or done == total:
          _check_finite(state, last_ckpt)
          if pending:
            avg = metric_writers.mean_metrics(jax.device_get(pending))
            if done > n_last:  # throughput over the steps after compilation
              dt = time.time() - t_last
              avg["examples_per_second"] = config.optim.batch_size * accum * (done - n_last) / max(dt, 1e-9)
              avg["seconds_per_step"] = dt / (done - n_last)
            writer.write_scalars(done, {f"train/{k}": v for k, v in avg.items()})
            bar.set_postfix(
              loss=f"{avg['loss']:.4f}",
              q=f"{avg['active_q']:.0f}",
              d=f"{avg['active_d']:.0f}",
              ex_s=f"{avg.get('examples_per_second', float('nan')):.1f}",
            )
            result["train"] = avg
            pending, t_last, n_last = [], time.time(), done
        if ckpt.should_save(done) or done == total or stop["sigterm"]:
          _check_finite(state, last_ckpt)
          ckpt.save(done, state.to_tree(), {"data": data_pos, "step": done})
          last_ckpt = done
        result["step"] = done
        if stop["sigterm"]:
          ckpt.wait()
          _say(lead, f"SIGTERM: saved checkpoint {done}, stopping")
          result["preempted"] = True
          return result
        if config.train.eval_every and done % config.train.eval_every == 0 and done < total:
          ckpt.wait()  # the step on disk and hashed before a long phase that may fail
          res = _evaluate_state(graphdef, rest, state, tokenizer, config, workdir, done, lead)
          writer.write_scalars(done, {f"eval/{k}": v for k, v in res.items()})
      ckpt.wait()
      if old_handler is not None:  # training is over: SIGTERM stops the process again
        signal.signal(signal.SIGTERM, old_handler)
        old_handler = None

    result["encoder"] = _save_final(graphdef, rest, state, tokenizer, workdir, lead)
    if config.train.final_eval:
      result["eval"] = _evaluate_state(graphdef, rest, state, tokenizer, config, workdir, total, lead)
      writer.write_scalars(total, {f"eval/{k}": v for k, v in result["eval"].items()})
    return result
  finally:
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
    if pipe is not None:
      pipe.close()
    bar.close()
    writer.close()
    ckpt.close()


def _encoder_from_state(
  graphdef: nnx.GraphDef, rest: Any, state: train_state.TrainState
) -> sparse_encoder.SparseEncoder:
  """The encoder with the state's parameters (gathered to every host when multi-host)."""
  params = state.params
  if jax.process_count() > 1:  # parameters span hosts: every host must take part
    params = jax.tree.map(jnp.asarray, multihost_utils.process_allgather(params, tiled=True))
  return nnx.merge(graphdef, params, rest)


def _save_final(
  graphdef: nnx.GraphDef, rest: Any, state: train_state.TrainState, tokenizer: Any, workdir: Any, lead: bool
) -> str | None:
  encoder = _encoder_from_state(graphdef, rest, state)  # every host takes part in the gather
  path = os.fspath(sparse_encoder.save_encoder(encoder, tokenizer, os.fspath(workdir / "encoder"))) if lead else None
  _say(lead, f"saved the encoder to {path}")
  return path


def _evaluate_state(
  graphdef: nnx.GraphDef,
  rest: Any,
  state: train_state.TrainState,
  tokenizer: Any,
  config: ml_collections.ConfigDict,
  workdir: Any,
  step: int,
  lead: bool,
) -> dict[str, float]:
  encoder = _encoder_from_state(graphdef, rest, state)
  if not lead:
    return {}
  res = evaluate.flat_metrics(evaluate.evaluate_config(encoder, tokenizer, config.eval, workdir / "eval" / str(step)))
  _say(lead, f"eval at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()))
  return res
