"""GRPO training of the SOL policy: ``soljax train --config FILE [key=value ...]``.

Per data batch: sample budget targets per block, roll out K policy-sampled schedules per block on
the shared-prefix engine, turn log-likelihoods and budget penalties into group-relative
advantages, and append the episodes to a buffer. When the buffer holds at least
``ppo_target_batch_size`` step entries, one shuffled pass over it in minibatches of
``ppo_minibatch_size // rollout_len`` episodes computes the PPO-clip loss; an AdamW step follows
every ``grad_accum_steps`` minibatches (the counter crosses buffer boundaries). This is the
reference implementation's update arithmetic, so its official configs reproduce their number of
optimizer steps and their (mostly on-policy) ratios.

The whole training state (policy, optimizer, gradient accumulator, buffer, data position, RNG) is
one pytree, checkpointed with orbax every ``checkpoint_every`` optimizer updates, at the end and
on interruption (Ctrl-C, or SIGTERM from a preempted VM or a scheduler); ``--resume`` continues
exactly where a run stopped, on the same or another mesh. After a kill (even SIGKILL, even during a
checkpoint write) it continues from the last committed checkpoint and redoes the batches since, bit
for bit as if never stopped (see :mod:`soljax.train.writer`).

On several devices or hosts (``mesh_data``/``mesh_model``, ``distributed``; see
:mod:`soljax.parallel` and ``docs/scaleout.md``) the same two compiled steps run with explicit
input and output shardings; on one device they run exactly as before.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from soljax import parallel
from soljax.compress.actions import AXES
from soljax.config import TrainConfig, action_grid, check_episode_length, policy_config, sparsity_config
from soljax.control import PolicyController, SOLPolicy, init_policy
from soljax.distributions import entropy_categorical, kl_categorical, log_prob
from soljax.engine import episode_usage, rollout
from soljax.engine.observe import NUM_SCALARS
from soljax.errors import SoljaxError, Terminated
from soljax.runs import load_lm
from soljax.train.objective import GRPOConfig, compute_advantages, ppo_loss
from soljax.train.state import Buffer, TrainState


# ----------------------------------------------------------------------------------------------
# Pieces built from the config


def grpo_config(cfg: TrainConfig) -> GRPOConfig:
    return GRPOConfig(reward_agg=cfg.reward_agg, gamma=cfg.reward_gamma, level=cfg.grpo_level, norm=cfg.grpo_norm,
                      whiten=cfg.adv_whiten_global, alpha_token=cfg.alpha_tok, alpha_prune=cfg.alpha_prune,
                      alpha_quant=cfg.alpha_quant, deadzone=cfg.budget_deadzone, task_w_kl=cfg.task_w_kl,
                      clip=cfg.ppo_clip, entropy_coef=cfg.entropy_coef, kl_ref_coef=cfg.kl_pi_ref_coef,
                      estimator=cfg.estimator)


def sample_targets(cfg: TrainConfig, key: jax.Array, batch: int) -> jax.Array:
    """Budget targets ``[B, 3]`` (token, prune, quant ratio), one per block."""
    cols = []
    for axis, k in zip(AXES, jax.random.split(key, 3)):
        kind, values = cfg.budget_sampler(axis)
        if kind == "list":
            cols.append(jax.random.choice(k, jnp.asarray(values, jnp.float32), (batch,)))
        elif kind == "uniform":
            cols.append(jax.random.uniform(k, (batch,), jnp.float32, values[0], values[1]))
        else:
            cols.append(jnp.full((batch,), values[0], jnp.float32))
    return jnp.stack(cols, axis=-1)


def optimizer(cfg: TrainConfig, total_updates: int) -> optax.GradientTransformation:
    if cfg.lr_schedule == "constant":
        lr = optax.constant_schedule(cfg.lr)
    else:
        decay = max(1, total_updates - cfg.warmup_updates)
        tail = (optax.cosine_decay_schedule(cfg.lr, decay) if cfg.lr_schedule == "cosine"
                else optax.linear_schedule(cfg.lr, 0.0, decay))
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_updates), tail],
                                  [cfg.warmup_updates]) if cfg.warmup_updates else tail
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay))


# ----------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Holds the frozen LM, the data and the compiled steps; :meth:`run` trains."""

    def __init__(self, cfg: TrainConfig, lm: tuple | None = None, blocks: np.ndarray | None = None):
        from soljax.data.blocks import load_blocks

        self.cfg = cfg
        parallel.initialize_distributed(cfg)
        self.plan = parallel.plan_from_config(cfg)  # None: one device, the plain path
        lm_sharding = self.plan.lm_sharding if self.plan else None
        self.lm_cfg, self.lm_params, self.tokenizer = load_lm(cfg, lm_sharding) if lm is None else lm
        check_episode_length(cfg, self.lm_cfg)
        if self.plan is not None:
            self.lm_params = parallel.place(self.lm_params, self.plan.lm_shardings(self.lm_params))
        if blocks is None:
            blocks = load_blocks(cfg.data, self.tokenizer, context_len=cfg.context_len, rollout_len=cfg.rollout_len,
                                 seed=cfg.seed, max_blocks=cfg.max_blocks, max_docs=cfg.data_max_docs)
        self.blocks = np.asarray(blocks, np.int32)
        n_batches = int(math.floor(cfg.train_fraction * len(self.blocks) / cfg.batch_size))
        self.num_batches = min(n_batches, cfg.max_batches) if cfg.max_batches else n_batches
        if self.num_batches < 1:
            raise SoljaxError(f"not enough data: {len(self.blocks)} blocks give no batch of {cfg.batch_size}")
        self.grid = action_grid(cfg)
        self.scfg = sparsity_config(cfg)
        self.pcfg = policy_config(cfg)
        self.gcfg = grpo_config(cfg)
        self.alphas = self.gcfg.penalty_alphas(self.grid)
        self.controller = PolicyController(grid=self.grid, policy=self.pcfg)
        self.module = SOLPolicy(self.pcfg, self.grid.num_actions)
        B, K, T = cfg.batch_size, cfg.grpo_rollouts_per_input, cfg.rollout_len
        self.batches_per_buffer = math.ceil(cfg.ppo_target_batch_size / (T * B * K))
        self.capacity = self.batches_per_buffer * B * K
        self.mb_size = max(1, cfg.ppo_minibatch_size // T)
        self.num_minibatches = math.ceil(self.capacity / self.mb_size)
        total_updates = self.num_batches // self.batches_per_buffer * self.num_minibatches // cfg.grad_accum_steps
        self.total_updates = total_updates
        self.tx = optimizer(cfg, max(1, total_updates))
        if self.plan is None:
            self._collect = jax.jit(self._collect_impl)
            self._learn = jax.jit(self._learn_impl)
        else:
            self._compile_sharded()

    # ------------------------------------------------------------------ state

    def init_state(self) -> TrainState:
        """A fresh training state (on a mesh: created in its shardings by one compiled call;
        every process computes the same values from the seed). On one device it is committed to
        it, like the compiled steps' outputs and a restored checkpoint, so the steps compile once."""
        if self.plan is None:
            return jax.device_put(self._init_state_impl(), jax.devices()[0])
        return self._init_sharded()

    def _init_state_impl(self) -> TrainState:
        cfg = self.cfg
        key = jax.random.PRNGKey(cfg.seed)
        key, k_init = jax.random.split(key)
        D = self.lm_cfg.hidden_size
        params = init_policy(self.pcfg, self.grid.num_actions, D, D, k_init)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(policy=params, ref=params if cfg.kl_pi_ref_coef > 0 else {}, opt=self.tx.init(params),
                          grad_acc=jax.tree.map(jnp.zeros_like, params), accum=zero,
                          buffer=Buffer.zeros(self.capacity, cfg.rollout_len, D, NUM_SCALARS), fill=zero,
                          batch=zero, updates=zero, key=key)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state: the target checkpoints restore onto."""
        abstract = jax.eval_shape(self._init_state_impl)
        if self.plan is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
        return parallel.with_shardings(abstract, self.state_shardings)

    def _compile_sharded(self) -> None:
        """The compiled steps with explicit input/output shardings over ``self.plan``'s mesh."""
        plan = self.plan
        self.state_shardings = TrainState.from_tree(plan.state_shardings(jax.eval_shape(self._init_state_impl).to_tree()))
        lm_sh = plan.lm_shardings(self.lm_params)
        rep = plan.replicated
        self._init_sharded = jax.jit(self._init_state_impl, out_shardings=self.state_shardings)
        self._collect = jax.jit(self._collect_impl, in_shardings=(lm_sh, self.state_shardings, plan.blocks),
                                out_shardings=(self.state_shardings, rep))
        self._learn = jax.jit(self._learn_impl, in_shardings=(lm_sh["embed"], self.state_shardings),
                              out_shardings=(self.state_shardings, rep))

    # ------------------------------------------------------------------ compiled pieces

    def _collect_impl(self, lm_params: dict, state: TrainState, blocks: jax.Array):
        """Rollout + advantages for one data batch, appended to the buffer."""
        cfg = self.cfg
        B, K = cfg.batch_size, cfg.grpo_rollouts_per_input
        key, k_targets, k_roll = jax.random.split(state.key, 3)
        targets = sample_targets(cfg, k_targets, B)
        traj = rollout(self.lm_cfg, self.scfg, lm_params, blocks, targets, self.controller, state.policy,
                       k_roll, context_len=cfg.context_len, schedules=K, dense_kl=cfg.task_w_kl > 0,
                       copy_prefix=cfg.rollout_engine == "copied",
                       feed_effective=False)  # training feeds back the sampled action (reference)
        u = episode_usage(traj.usage, traj.effective)  # [B, K, 3]
        usage = {axis: u[..., i] for i, axis in enumerate(AXES)}
        adv, diag = compute_advantages(self.gcfg, traj.logp_true, traj.kl_dense, usage, targets, self.alphas)
        flat = lambda a: a.reshape((B * K,) + a.shape[2:])  # noqa: E731
        new = Buffer(h_prev=flat(traj.h_prev).astype(jnp.float32), tokens=jnp.repeat(traj.tokens, K, axis=0),
                     scalars=flat(traj.scalars), prev_action=flat(traj.prev_action), actions=flat(traj.actions),
                     logp_old=flat(traj.logp_actions), adv=flat(adv), targets=jnp.repeat(targets, K, axis=0))
        metrics = dict(diag)
        metrics.update(
            logp_true=traj.logp_true.mean(), kl_dense=traj.kl_dense.mean(), attended=traj.attended.mean(),
            **{f"target_{a}": targets[:, i].mean() for i, a in enumerate(AXES)},
            gap_abs_mean=jnp.abs(u - targets[:, None, :]).mean(),
        )
        state = state.replace(buffer=state.buffer.write(new, state.fill), fill=state.fill + B * K, key=key,
                              batch=state.batch + 1)
        return state, metrics

    def _loss(self, params, ref, mb: Buffer, mask: jax.Array, embed: jax.Array):
        tok_emb = jnp.take(embed, mb.tokens, axis=0).astype(jnp.float32)
        args = (mb.h_prev, tok_emb, mb.scalars, mb.prev_action, mb.targets)
        logits = self.module.apply(params, *args)
        kl_ref = None
        if self.cfg.kl_pi_ref_coef > 0:
            kl_ref = kl_categorical(logits, jax.lax.stop_gradient(self.module.apply(ref, *args)))
        loss_sum, denom, aux = ppo_loss(log_prob(logits, mb.actions), mb.logp_old, mb.adv, entropy_categorical(logits),
                                        mask, self.cfg.ppo_clip, self.cfg.entropy_coef, kl_ref, self.cfg.kl_pi_ref_coef)
        return loss_sum / jnp.maximum(denom, 1.0), aux

    def _learn_impl(self, embed: jax.Array, state: TrainState):
        """One shuffled pass over the full buffer; optimizer steps every grad_accum minibatches."""
        cfg = self.cfg
        key, k_perm = jax.random.split(state.key)
        n, mbs, nmb = self.capacity, self.mb_size, self.num_minibatches
        perm = jax.random.permutation(k_perm, n)
        idx = jnp.concatenate([perm, jnp.zeros((nmb * mbs - n,), perm.dtype)]).reshape(nmb, mbs)
        valid = (jnp.arange(nmb * mbs) < n).reshape(nmb, mbs)
        grad_fn = jax.grad(self._loss, has_aux=True)

        def minibatch(carry, xs):
            params, opt, acc, accum, updates, gnorm = carry
            rows, ok = xs
            mb = state.buffer.take(rows)
            mask = jnp.broadcast_to(ok[:, None], (mbs, cfg.rollout_len)).astype(jnp.float32)
            grads, aux = grad_fn(params, state.ref, mb, mask, embed)
            acc = jax.tree.map(lambda a, g: a + g / cfg.grad_accum_steps, acc, grads)
            accum = accum + 1

            def step(args):
                params, opt, acc = args
                norm = optax.tree.norm(acc)
                upd, opt = self.tx.update(acc, opt, params)
                return optax.apply_updates(params, upd), opt, jax.tree.map(jnp.zeros_like, acc), norm

            def hold(args):
                params, opt, acc = args
                return params, opt, acc, gnorm

            do = accum >= cfg.grad_accum_steps
            params, opt, acc, gnorm = jax.lax.cond(do, step, hold, (params, opt, acc))
            return (params, opt, acc, jnp.where(do, 0, accum), updates + do.astype(jnp.int32), gnorm), aux

        carry = (state.policy, state.opt, state.grad_acc, state.accum, state.updates, jnp.zeros((), jnp.float32))
        (params, opt, acc, accum, updates, gnorm), aux = jax.lax.scan(minibatch, carry, (idx, valid))
        state = state.replace(policy=params, opt=opt, grad_acc=acc, accum=accum, updates=updates,
                              fill=jnp.zeros((), jnp.int32), key=key)
        metrics = {k: v.mean() for k, v in aux.items()}
        metrics["grad_norm"] = gnorm
        return state, metrics

    # ------------------------------------------------------------------ the loop

    def batch_blocks(self, index: int) -> np.ndarray:
        B = self.cfg.batch_size
        return self.blocks[index * B:(index + 1) * B]

    def train_step(self, state: TrainState) -> tuple[TrainState, dict]:
        """One data batch (and, when the buffer is full, one pass of updates)."""
        start = time.perf_counter()
        blocks = self.batch_blocks(int(state.batch))
        blocks = jnp.asarray(blocks) if self.plan is None else self.plan.put_batch(blocks)
        state, metrics = self._collect(self.lm_params, state, blocks)
        jax.block_until_ready(state)
        rollout_s = time.perf_counter() - start
        cfg = self.cfg
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["rollout_s"] = rollout_s
        metrics["schedule_steps_per_s"] = cfg.batch_size * cfg.grpo_rollouts_per_input * cfg.rollout_len / rollout_s
        if int(state.fill) >= self.capacity:
            t0 = time.perf_counter()
            state, learn = self._learn(self.lm_params["embed"], state)
            learn = {k: float(v) for k, v in learn.items()}
            metrics.update(learn)
            metrics["learn_s"] = time.perf_counter() - t0
        metrics["batch"] = int(state.batch)
        metrics["updates"] = int(state.updates)
        return state, metrics

    def run(self, out_dir: Path, resume: bool = False, progress: bool = True,
            on_batch: Callable[[TrainState, dict], None] | None = None) -> TrainState:
        """Trains to the end of the data (or ``max_batches``); returns the final state."""
        from soljax.train.writer import RunWriter

        writer = RunWriter(Path(out_dir), self.cfg, keep=self.cfg.keep_checkpoints, primary=parallel.is_primary())
        if self.plan is not None and progress and parallel.is_primary():
            print(f"soljax: training on {parallel.describe(self.plan)}", file=sys.stderr)
        try:
            state = self._run(writer, resume, progress, on_batch)
        finally:
            writer.close()
        writer.plot()
        return state

    def _run(self, writer, resume: bool, progress: bool, on_batch) -> TrainState:
        state = writer.restore(self.abstract_state()) if resume else None
        if state is None:
            if resume:
                print(f"soljax: no checkpoint in {writer.out_dir}; starting a new run", file=sys.stderr)
            writer.start_fresh()
            state = self.init_state()
        first = int(state.batch)
        last_ckpt = int(state.updates)
        with writer.progress(total=self.num_batches, initial=first, enabled=progress) as bar:
            try:
                with _sigterm_stops():
                    while int(state.batch) < self.num_batches:
                        state, metrics = self.train_step(state)
                        writer.log(metrics)
                        bar.update(1)
                        bar.set_postfix(upd=metrics["updates"], pen=f"{metrics['penalty_mean']:.3f}",
                                        rew=f"{metrics['reward_mean']:.2f}", refresh=False)
                        if int(state.updates) - last_ckpt >= self.cfg.checkpoint_every:
                            writer.save(state)
                            last_ckpt = int(state.updates)
                        if on_batch is not None:
                            on_batch(state, metrics)
            except KeyboardInterrupt as stop:
                writer.save(state)
                bar.close()
                how = "terminated" if isinstance(stop, Terminated) else "interrupted"
                print(f"\nsoljax: {how}; state saved at batch {int(state.batch)} "
                      f"(continue with --resume)", file=sys.stderr)
                raise
        writer.save(state, final=True)
        return state


@contextlib.contextmanager
def _sigterm_stops():
    """Within: SIGTERM raises :class:`~soljax.errors.Terminated` (a KeyboardInterrupt) in the loop,
    so a preempted or killed run saves its state like Ctrl-C (signal handlers: main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: TrainConfig, out_dir: str | Path | None = None, resume: bool = False, progress: bool = True) -> TrainState:
    """Builds a :class:`Trainer` for ``cfg`` and runs it into ``out_dir`` (default ``cfg.out_dir``)."""
    trainer = Trainer(cfg)
    return trainer.run(Path(out_dir or cfg.out_dir), resume=resume, progress=progress)
