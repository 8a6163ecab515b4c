"""The training loop: read it top to bottom.

One process per device (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, NCCL on
CUDA). Every step: fetch this rank's batch, agree with the other ranks (one all_reduce) on
how many real rows there are and whether someone asked to stop, run the (accumulated)
forward/backward with the gathered CLIP loss, clip, AdamW step on the cosine schedule, clamp the
logit scale, log. Checkpoints hold open_clip-loadable weights plus optimizer, scaler, schedule
and every rank's data position; `latest.json` points at the newest complete one. The output
folder may be local or an fsspec URL (s3://bucket/run): checkpoints, `train_log.jsonl` and
`eval.jsonl` then go through wit_builder.io (atomic object writes, fresh reads).

CPU example (2 processes):
    $ torchrun --nproc-per-node 2 -m wit_builder.train --config pipelines/train-tiny.toml \\
        --data runs/demo/shards/manifest.json --out runs/demo/train --set steps=20
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from wit_builder import io as wio
from wit_builder.config import ConfigError
from wit_builder.train import data as tdata
from wit_builder.train import model as tmodel
from wit_builder.train.checkpoints import checkpoint_dir, join, latest_checkpoint
from wit_builder.train.config import TrainConfig
from wit_builder.train.loss import clip_loss

log = logging.getLogger("wit_builder.train")

MAX_LOG_SCALE = math.log(100.0)


# ---------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Join the process group torchrun describes in the environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return DistEnv(rank, world, local_rank, device)


def _all_reduce(values: list[float], env: DistEnv) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.world > 1:
        dist.all_reduce(t)
    return t.tolist()


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop finishes its step, checkpoints and returns. A second
    Ctrl-C interrupts at once; a second SIGTERM (torchrun forwards the one a scheduler sends to
    the whole job, which the rank got too) changes nothing. `signal`: the first one received."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None
        self._pid = os.getpid()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no signal handling
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker, forked before it set SIG_IGN
            return
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = True
            self.signal = signal.Signals(signum).name
            log.warning("%s: finishing this step, then saving a checkpoint", self.signal)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------- optimisation
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases, the logit scale (every tensor with < 2 dims)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, the fused kernel where torch has one for the device (CPU and CUDA
    in torch >= 2.4; several times faster than the per-tensor loop on CPU)."""
    kw = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    try:
        return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), **kw)


def lr_at(step: int, total: int, lr: float, warmup: int, min_lr: float) -> float:
    """Linear warmup to `lr` over `warmup` steps, then cosine down to `min_lr` at `total`.

    >>> [round(lr_at(s, 10, 1.0, 2, 0.0), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def _autocast(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def _features(model, images, texts, precision: str, device: torch.device):
    with _autocast(precision, device):
        out = model(images, texts)
    return out["image_features"], out["text_features"], out["logit_scale"]


def train_step(
    model,
    images: torch.Tensor,
    texts: torch.Tensor,
    valid: torch.Tensor,
    valid_total: int,
    accum: int,
    precision: str,
    device: torch.device,
    scaler=None,
) -> torch.Tensor:
    """Forward + backward for one optimizer step (gradients accumulate in .grad); returns this
    rank's loss share. With `accum` > 1, the features of every micro-batch are first computed
    without gradients, then each micro-batch is recomputed with gradients and the loss taken over
    the whole cached batch, so negatives span the global batch and the summed gradient equals the
    un-accumulated one (the logit scale takes its gradient in the last micro-step only)."""
    if accum == 1:
        img, txt, scale = _features(model, images, texts, precision, device)
        loss = clip_loss(img, txt, scale, valid, valid_total)
        (scaler.scale(loss) if scaler else loss).backward()
        return loss.detach()
    imgs, txts = images.chunk(accum), texts.chunk(accum)
    with torch.no_grad():
        cached = [_features(model, i, t, precision, device)[:2] for i, t in zip(imgs, txts)]
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for j in range(accum):
        last = j == accum - 1
        sync = contextlib.nullcontext() if (last or not ddp) else model.no_sync()
        with sync:
            img_j, txt_j, scale = _features(model, imgs[j], txts[j], precision, device)
            if not last:
                scale = scale.detach()
            img = torch.cat([c[0] for c in cached[:j]] + [img_j] + [c[0] for c in cached[j + 1 :]])
            txt = torch.cat([c[1] for c in cached[:j]] + [txt_j] + [c[1] for c in cached[j + 1 :]])
            loss = clip_loss(img, txt, scale, valid, valid_total)
            (scaler.scale(loss) if scaler else loss).backward()
    return loss.detach()


# ---------------------------------------------------------------------------- checkpoints
@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    positions: list[list[int]] = field(default_factory=list)  # per rank, per worker (this epoch)
    samples_seen: int = 0
    next_worker: list[int] = field(default_factory=list)  # per rank: whose rows come next (this epoch)
    first_loss: float | None = None  # the loss of the run's first step (the summary's first_loss)


def save_checkpoint(
    out: str,
    raw_model,
    built: tmodel.Built,
    name: str,
    optimizer,
    scaler,
    state: TrainState,
    cfg: TrainConfig,
    layout: dict[str, int],
    total_steps: int,
    keep: int,
) -> str:
    """Write step_{N}/, point latest.json at it, prune old ones. Locally the folder is written
    under a temporary name and renamed; on an object store its files are uploaded first and
    latest.json (one atomic object write) then makes it the newest complete checkpoint."""
    root = checkpoint_dir(out)
    final = join(root, f"step_{state.step:08d}")
    train_state = {
        "state": asdict(state),
        "layout": layout,
        "total_steps": total_steps,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "config": _jsonable(cfg),
    }
    pointer = join(root, "latest.json")
    if wio.is_local(out):
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmodel.save_for_open_clip(raw_model, built.model_cfg, name, tmp)
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(pointer + ".tmp", "w") as f:
            json.dump({"path": os.path.basename(final), "step": state.step}, f)
        os.replace(pointer + ".tmp", pointer)
        names = os.listdir(root)
    else:
        with tempfile.TemporaryDirectory(prefix="wit-ckpt-") as tmp:
            tmodel.save_for_open_clip(raw_model, built.model_cfg, name, tmp)
            torch.save(train_state, os.path.join(tmp, "train_state.pt"))
            wio.remove(final)  # a partial upload of a run killed while saving this step
            fs, inner = wio.filesystem(final)
            for file in sorted(os.listdir(tmp)):
                fs.put_file(os.path.join(tmp, file), f"{inner}/{file}")
        wio.write_json({"path": os.path.basename(final), "step": state.step}, pointer)
        names = [p.rsplit("/", 1)[-1] for p in wio.listdir(root)]
    steps = sorted(d for d in names if d.startswith("step_") and not d.endswith(".tmp"))
    mine = os.path.basename(final)
    # older ones beyond `keep`, and later ones: left by an abandoned run (--no-resume, or an
    # upload latest.json never pointed at), never a checkpoint of this run
    stale = [d for d in steps if d <= mine][:-keep] + [d for d in steps if d > mine]
    for old in stale:
        if wio.is_local(out):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        else:
            wio.remove(join(root, old))
    return final


def _jsonable(cfg) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


def load_checkpoint(path: str, raw_model, optimizer, scaler, layout: dict[str, int]) -> tuple[TrainState, int]:
    """Restore weights, optimizer, scaler; returns (state, total_steps of the schedule)."""
    weights = _torch_load(join(path, tmodel.WEIGHTS_FILE), weights_only=True)
    saved = _torch_load(join(path, "train_state.pt"), weights_only=False)
    try:
        raw_model.load_state_dict(weights)
        optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"checkpoint {path} does not fit this model/optimizer ({str(e)[:300]}); use a new --out or --no-resume"
        ) from None
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    state = TrainState(**saved["state"])
    mid_epoch = any(any(p) for p in state.positions)
    if mid_epoch and saved["layout"] != layout:
        raise ConfigError(
            f"checkpoint {path} stopped mid-epoch with {saved['layout']['world']} rank(s) x "
            f"{saved['layout']['workers']} worker(s); resume with the same layout (now "
            f"{layout['world']} x {layout['workers']}) or start a new --out"
        )
    return state, int(saved["total_steps"])


def _torch_load(path: str, weights_only: bool) -> Any:
    if wio.is_local(path):
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    with wio.open_file(path, "rb") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)


# ---------------------------------------------------------------------------- the loop
def _pad(
    batch: tdata.LocalBatch | None, rows: int, image_size: int, context: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = batch.rows if batch else 0
    image = torch.zeros(rows, 3, image_size, image_size)
    text = torch.zeros(rows, context, dtype=torch.long)
    if n:
        image[:n], text[:n] = batch.image, batch.text
    valid = torch.zeros(rows, dtype=torch.bool)
    valid[:n] = True
    return image, text, valid


def _gather(mine: Any, env: DistEnv) -> list[Any]:
    """Every rank's `mine` (a small picklable value), in rank order."""
    if env.world == 1:
        return [mine]
    everyone: list[Any] = [None] * env.world
    dist.all_gather_object(everyone, mine)
    return everyone


@dataclass
class _Run:
    """What `_setup` builds once: the process, the data, the model and its optimizer, the schedule."""

    cfg: TrainConfig
    env: DistEnv
    out: str
    precision: str  # resolved: "fp32", "bf16" or "fp16"
    per_rank: int  # rows of each rank's batch
    manifest: tdata.Manifest
    built: tmodel.Built
    raw_model: torch.nn.Module
    model: torch.nn.Module  # raw_model, wrapped in DDP when world > 1
    optimizer: torch.optim.Optimizer
    scaler: Any  # GradScaler for fp16, else None
    layout: dict[str, int]  # {"world", "workers"}: what a mid-epoch resume must match
    total_steps: int  # the LR schedule's length
    max_steps: int  # the run's bound (with steps = 0, epochs bound it)
    max_epochs: int

    @property
    def workers(self) -> int:
        return self.layout["workers"]


def train(
    cfg: TrainConfig,
    manifest_path: str,
    out: str,
    pretrained: str = "",
    resume: bool = True,
    keys_log: str | None = None,
) -> dict[str, Any]:
    """Train per `cfg` on the shards of `manifest_path`, writing logs and checkpoints to `out`.

    Returns a summary (rank 0 holds the complete one): steps, first/last loss, checkpoint path,
    final eval. `keys_log` (tests): a file per rank where every trained sample key is appended.
    """
    window = _Window()
    last_eval: tuple[int, dict[str, Any] | None] = (-1, None)  # (step, result) of the latest eval
    stopped: str | None = None  # the signal the ranks agreed to stop on
    with StopRequest() as stop:  # from the start: a SIGTERM during setup stops before the first step
        run, state, resumed = _setup(cfg, manifest_path, out, pretrained, resume)
        env = run.env
        log_file = _JsonLines(join(out, "train_log.jsonl")) if env.main else None
        keys_file = open(keys_log, "a") if keys_log else None
        summary: dict[str, Any] = {"first_loss": state.first_loss, "loss": None}
        last_saved = state.step if resumed else -1
        while state.step < run.max_steps and state.epoch < run.max_epochs and not stopped:
            start = state.positions[env.rank] if state.positions else [0] * run.workers
            first = state.next_worker[env.rank] if state.next_worker else 0
            batches = _epoch_batches(run, state, start, first)
            positions = state.positions[env.rank]  # advanced in place: the checkpoint's data position
            epoch_done, steps_this_epoch = False, 0
            while state.step < run.max_steps:
                t0 = time.perf_counter()
                batch = next(batches, None)
                t_data = time.perf_counter() - t0
                real, short, stopped = _agree(run, batch, stop.signal)
                if stopped:
                    break
                if real == 0 or (cfg.data.last_batch == "drop" and short):
                    epoch_done = True
                    break
                lr = lr_at(state.step, run.total_steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr)
                loss = _optimizer_step(run, batch, real, lr)
                state.step += 1
                steps_this_epoch += 1
                state.samples_seen += real
                if batch is not None:
                    positions[:] = batch.positions
                    state.next_worker[env.rank] = batch.next_worker
                    _log_keys(keys_file, state, batch)
                if state.first_loss is None:
                    state.first_loss = summary["first_loss"] = loss
                summary["loss"] = loss
                window.add(time.perf_counter() - t0, t_data, real)
                if env.main and (state.step % cfg.log_every == 0 or state.step == run.max_steps):
                    _log_step(log_file, run, state, loss, lr, window)
                    window = _Window()
                if cfg.save_every and state.step % cfg.save_every == 0:
                    _sync(log_file)  # the log first: records past a checkpoint are dropped on resume
                    _save(run, state)
                    last_saved = state.step
                if cfg.eval.every and state.step % cfg.eval.every == 0:
                    last_eval = (state.step, _evaluate(run, state.step))
                    run.model.train()
            del batches
            if epoch_done:
                if steps_this_epoch == 0 and not any(start):
                    raise _no_batch_error(run, state.epoch)
                state.epoch += 1
                state.positions, state.next_worker = [], []
        _sync(log_file)
        summary["checkpoint"] = _save(run, state) if last_saved != state.step else latest_checkpoint(out)
    if keys_file:
        keys_file.close()
    summary.update(
        steps=state.step, epoch=state.epoch, samples_seen=state.samples_seen, stopped=bool(stopped), signal=stopped
    )
    if not stopped:
        summary["eval"] = last_eval[1] if last_eval[0] == state.step else _evaluate(run, state.step)
    if log_file:
        log_file.close()
    return summary


def _setup(
    cfg: TrainConfig, manifest_path: str, out: str, pretrained: str, resume: bool
) -> tuple[_Run, TrainState, bool]:
    """Join the process group, check the batch layout, build model + optimizer, restore the latest
    checkpoint under `out` (when `resume`); returns (run, state, resumed)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = init_distributed(cfg.device)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if env.device.type == "cuda" else "fp32"
    if precision == "fp16" and env.device.type != "cuda":
        raise ConfigError("precision = 'fp16' needs CUDA (use 'bf16' or 'fp32' on CPU)")
    if cfg.batch_size % (env.world * cfg.accum_steps):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by world size {env.world} x accum_steps {cfg.accum_steps}"
        )
    manifest = tdata.load_manifest(manifest_path, cfg.data.verify_sha256)
    torch.manual_seed(cfg.seed)
    built = tmodel.build(cfg.model, str(env.device), pretrained)
    raw_model = built.model
    optimizer = make_optimizer(raw_model, cfg)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    layout = {"world": env.world, "workers": max(cfg.data.workers, 1)}
    train_fraction = 1.0 - cfg.data.holdout_fraction
    steps_per_epoch = math.ceil(manifest.total_samples * train_fraction / cfg.batch_size)
    total_steps = cfg.steps or max(cfg.epochs * steps_per_epoch, 1)
    state = TrainState()
    if env.main:
        if wio.is_local(out):
            os.makedirs(out, exist_ok=True)
        else:
            wio.makedirs(out)
            for folder in (out, checkpoint_dir(out)):  # what a killed run's atomic writes left
                wio.remove_stale_tmp(folder)
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt:
        state, _ = load_checkpoint(ckpt, raw_model, optimizer, scaler, layout)
        log.info("resumed from %s at step %d, epoch %d", ckpt, state.step, state.epoch)
    if env.main:  # the steps after the checkpoint are trained (and logged) again
        for name in ("train_log.jsonl", "eval.jsonl"):
            _trim_records(join(out, name), state.step)
    model = raw_model
    if env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )
    model.train()
    run = _Run(
        cfg=cfg,
        env=env,
        out=out,
        precision=precision,
        per_rank=cfg.batch_size // env.world,
        manifest=manifest,
        built=built,
        raw_model=raw_model,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        layout=layout,
        total_steps=total_steps,
        max_steps=cfg.steps or 1 << 62,
        max_epochs=cfg.epochs if not cfg.steps else 1 << 30,
    )
    return run, state, bool(ckpt)


def _epoch_batches(run: _Run, state: TrainState, start: list[int], first_worker: int):
    """This rank's batches of epoch `state.epoch`, from per-worker position `start` with worker
    `first_worker`'s rows first; resets `state.positions` / `state.next_worker` to this epoch
    (this rank's entries starting at `start` / `first_worker`)."""
    cfg, env = run.cfg, run.env
    spec = tdata.EpochSpec(
        [s.url for s in run.manifest.shards],
        env.rank,
        env.world,
        run.workers,
        state.epoch,
        cfg.seed,
        cfg.data.shuffle_buffer,
        cfg.data.holdout_fraction,
        cfg.data.chunk or run.per_rank,
        list(start),
        first_worker,
    )
    batches = tdata.epoch_batches(
        spec,
        run.built.train_transform,
        run.built.tokenizer,
        run.per_rank,
        cfg.data.workers,
        pin_memory=env.device.type == "cuda",
    )
    state.positions = [[0] * run.workers for _ in range(env.world)]
    state.positions[env.rank] = list(start)
    state.next_worker = [0] * env.world
    state.next_worker[env.rank] = first_worker
    return batches


def _agree(run: _Run, batch: tdata.LocalBatch | None, stop_signal: str | None) -> tuple[int, bool, str | None]:
    """One all_reduce over the ranks: (rows of the global batch, whether some rank's batch is short,
    the signal to stop on: "SIGINT" when some rank got a Ctrl-C, else "SIGTERM" when some rank got
    one, else None). Every rank gets the same answer, so all stop at the same step."""
    rows = batch.rows if batch else 0
    votes = [rows, float(rows < run.per_rank), float(stop_signal == "SIGINT"), float(stop_signal == "SIGTERM")]
    real, short, sigint, sigterm = _all_reduce(votes, run.env)
    return int(real), bool(short), "SIGINT" if sigint else "SIGTERM" if sigterm else None


def _no_batch_error(run: _Run, epoch: int) -> tdata.DataError:
    cfg = run.cfg
    return tdata.DataError(
        f"no training batch in epoch {epoch}: {run.manifest.total_samples} samples in "
        f"{run.manifest.path} (holdout {cfg.data.holdout_fraction}) for a global batch of "
        f"{cfg.batch_size} with last_batch = {cfg.data.last_batch!r}"
    )


def _optimizer_step(run: _Run, batch: tdata.LocalBatch | None, real: int, lr: float) -> float:
    """One optimizer step on this rank's (padded) batch of a global batch with `real` rows: forward/
    backward, clip, AdamW at `lr`, clamp the logit scale; returns the loss averaged over ranks."""
    cfg, env, raw_model, optimizer, scaler = run.cfg, run.env, run.raw_model, run.optimizer, run.scaler
    image, text, valid = _pad(batch, run.per_rank, run.built.image_size, run.built.context_length)
    image = image.to(env.device, non_blocking=True)
    text = text.to(env.device, non_blocking=True)
    valid = valid.to(env.device)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss_share = train_step(run.model, image, text, valid, real, cfg.accum_steps, run.precision, env.device, scaler)
    if scaler:
        scaler.unscale_(optimizer)
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    with torch.no_grad():
        raw_model.logit_scale.clamp_(0, MAX_LOG_SCALE)
    return _all_reduce([float(loss_share)], env)[0] / env.world


@dataclass
class _Window:
    """Time, data wait and samples since the last log line."""

    t: float = 0.0
    wait: float = 0.0
    samples: int = 0

    def add(self, t_step: float, t_data: float, samples: int) -> None:
        self.t += t_step
        self.wait += t_data
        self.samples += samples


def _log_step(log_file, run: _Run, state: TrainState, loss: float, lr: float, window: _Window) -> None:
    """Append one record to train_log.jsonl and log it (rank 0)."""
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": round(loss, 6),
        "logit_scale": round(float(run.raw_model.logit_scale.detach().exp()), 4),
        "lr": lr,
        "samples_per_s": round(window.samples / window.t, 2),
        "samples_per_s_per_device": round(window.samples / window.t / run.env.world, 2),
        "data_wait": round(window.wait / window.t, 4),
    }
    log_file.write(record)
    log.info(
        "step %(step)d epoch %(epoch)d loss %(loss).4f scale %(logit_scale).2f lr %(lr).2e "
        "%(samples_per_s).1f samples/s (%(samples_per_s_per_device).1f/device) "
        "data wait %(data_wait_pct).1f%%",
        {**record, "data_wait_pct": 100 * record["data_wait"]},
    )


def _log_keys(keys_file, state: TrainState, batch: tdata.LocalBatch) -> None:
    """Tests: append (epoch, step, key) of every sample this rank just trained on."""
    if keys_file:
        keys_file.write("".join(f"{state.epoch}\t{state.step}\t{k}\n" for k in batch.keys))
        keys_file.flush()


def _save(run: _Run, state: TrainState) -> str | None:
    """Checkpoint `state` with every rank's data position (all ranks call it; rank 0 writes and
    returns the path, the others None)."""
    env = run.env
    mine = (
        state.positions[env.rank] if state.positions else [0] * run.workers,
        state.next_worker[env.rank] if state.next_worker else 0,
    )
    everyone = _gather(mine, env)
    snapshot = TrainState(
        state.step,
        state.epoch,
        [list(p) for p, _ in everyone],
        state.samples_seen,
        [n for _, n in everyone],
        state.first_loss,
    )
    path = None
    if env.main:
        path = save_checkpoint(
            run.out,
            run.raw_model,
            run.built,
            run.cfg.model.name,
            run.optimizer,
            run.scaler,
            snapshot,
            run.cfg,
            run.layout,
            run.total_steps,
            run.cfg.keep_checkpoints,
        )
    if env.world > 1:
        dist.barrier()
    return path


def _trim_records(path: str, step: int) -> None:
    """Keep the JSON lines of `path` up to `step` (a resumed run writes the later ones again);
    a torn last line (a killed run) goes too."""
    lines = _read_lines(path)
    kept, dropped = [], 0
    for line in lines:
        try:
            ok = json.loads(line)["step"] <= step and line.endswith("\n")
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        if wio.is_local(path):
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        else:
            wio.write_bytes("".join(kept).encode(), path)
        log.info("%s: dropped %d record(s) after step %d", path, dropped, step)


def _read_lines(path: str) -> list[str]:
    """The lines of a text file, local or remote, with their line ends ([] when absent)."""
    if wio.is_local(path):
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return f.readlines()
    try:
        with wio.open_file(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8").splitlines(keepends=True)


class _JsonLines:
    """An append-only JSON-lines log. Local: a file opened for appending, flushed after every
    record. Remote: an object store cannot append, so the lines are kept here and the whole
    object is rewritten (atomically) by `sync`: after a record when `upload_every_s` has passed
    since the last upload, before every checkpoint, and at the end; a run killed in between
    loses only records after its last checkpoint, which a resumed run drops and writes again."""

    def __init__(self, path: str, upload_every_s: float = 30.0) -> None:
        self.path = path
        self.local = wio.is_local(path)
        self.upload_every_s = upload_every_s
        self._file = open(path, "a") if self.local else None
        self._lines = [] if self.local else _read_lines(path)
        self._dirty = False
        self._uploaded = -math.inf

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            return
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._uploaded >= self.upload_every_s:
            self.sync()

    def sync(self) -> None:
        if self._dirty:
            wio.write_bytes("".join(self._lines).encode(), self.path)
            self._dirty = False
            self._uploaded = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self.sync()


def _sync(log_file: _JsonLines | None) -> None:
    if log_file is not None:
        log_file.sync()


def _append_record(path: str, record: dict[str, Any]) -> None:
    """Append one JSON line to `path`; on an object store, the object is rewritten atomically."""
    line = json.dumps(record) + "\n"
    if wio.is_local(path):
        with open(path, "a") as f:
            f.write(line)
    else:
        wio.write_bytes(("".join(_read_lines(path)) + line).encode(), path)


def _evaluate(run: _Run, step: int) -> dict[str, Any] | None:
    """Run the configured evals on rank 0 (the others wait); append one JSON line to eval.jsonl."""
    from wit_builder.train import eval as teval

    cfg, env = run.cfg, run.env
    result = None
    if env.main:
        retrieval_manifest = None
        fraction = None
        if cfg.eval.retrieval_manifest:
            retrieval_manifest = tdata.load_manifest(cfg.eval.retrieval_manifest)
        elif cfg.data.holdout_fraction > 0:
            retrieval_manifest, fraction = run.manifest, cfg.data.holdout_fraction
        result = teval.run_evals(
            run.raw_model,
            run.built.eval_transform,
            run.built.tokenizer,
            cfg.eval,
            env.device,
            retrieval_manifest,
            fraction,
        )
        if result:
            result = {"step": step, **result}
            _append_record(join(run.out, "eval.jsonl"), result)
            log.info("eval at step %d: %s", step, json.dumps(result))
    if env.world > 1:
        dist.barrier()
    return result
